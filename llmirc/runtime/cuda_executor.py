"""Runs a bundle's cuda target on an NVIDIA GPU through the CUDA driver API (cuda-python's
`cuda.bindings.driver`, the optional extra `cuda`; imported only when a GPU is tried).

NOT YET RUN ON A GPU: the host side (gpu_program.py: launches, argument packing, memory plan)
is tested without one; this file's driver calls are exercised only by benchmarks/gpu_check.py.

Picks the target for the device (`pick_target`: the cubin of its architecture, a cubin of the
same major version built for a lower minor (sm_80 SASS runs on 8.x), else PTX a newer GPU's
driver can JIT-compile), loads every kernel (`cuModuleLoadData`), uploads the weights once,
allocates inputs, workspace, logits and the rules' buffers for the largest step
(`max_batched_tokens`, `max_num_seqs`, the context), then sizes the paged KV pool from what is
free (`gpu_memory_utilization`, vLLM's rule: see gpu_program.kv_cache_blocks).

One forward = the CPU executor's flat-batch ABI: the same seven int32 inputs, logits
[L, vocab] float32 back (`forward`), or token ids sampled on the device (`forward_tokens`:
argmax, or temperature/top-k/top-p from a seed and offset per row), so a decode step copies
back L int32s. A decode step (T == B == L, one token per sequence) runs as one CUDA graph
launch: padded to a batch-size bucket (GRAPH_BUCKETS), captured on first use.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from llmirc.artifact_format.reader import Bundle
from llmirc.errors import BundleError, LlmircError

from .cpu_executor import _load_weights
from .gpu_program import GpuProgram, GpuUnavailable, align, kv_cache_blocks, pack
from .step_check import INPUTS, StepLimits, checked_inputs

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAPH_RESERVE = 256 << 20   # bytes left free for graphs and the driver's own allocations
MAX_STATIC_SHARED = 48 << 10  # above this a kernel must opt in to dynamic shared memory


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise GpuUnavailable("cuda: cuda-python is not installed (pip install 'llmirc[cuda]')") from None
    return driver


def _call(fn, *args):
    """Calls a cuda-python driver function: its results, or LlmircError naming the CUDA error."""
    driver = _driver()
    out = fn(*args)
    err, rest = out[0], out[1:]
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        raise LlmircError(f"CUDA {fn.__name__} failed: {name.decode() if isinstance(name, bytes) else err}")
    return rest[0] if len(rest) == 1 else rest


def probe(ordinal: int = 0) -> dict:
    """The device the executor would use: name, capability (major, minor), free and total bytes,
    driver version. GpuUnavailable (one line) when there is no driver or device."""
    driver = _driver()
    try:
        _call(driver.cuInit, 0)
    except Exception as e:  # noqa: BLE001  (a missing libcuda raises cuda.pathfinder's own error type)
        why = "libcuda.so.1 not found" if "NotFound" in type(e).__name__ else str(e).splitlines()[0][:120]
        raise GpuUnavailable(f"cuda: no NVIDIA driver ({why})") from None
    count = _call(driver.cuDeviceGetCount)
    if count <= ordinal:
        raise GpuUnavailable(f"cuda: no CUDA device {ordinal} ({count} found)")
    dev = _call(driver.cuDeviceGet, ordinal)
    attr = driver.CUdevice_attribute
    major = _call(driver.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _call(driver.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    name = _call(driver.cuDeviceGetName, 256, dev)
    ctx = _call(driver.cuDevicePrimaryCtxRetain, dev)
    _call(driver.cuCtxSetCurrent, ctx)
    free, total = _call(driver.cuMemGetInfo)
    return {"device": dev, "context": ctx, "name": name.split(b"\0")[0].decode(errors="replace"),
            "capability": (major, minor), "free": int(free), "total": int(total),
            "driver_version": _call(driver.cuDriverGetVersion)}


def pick_target(targets: list, capability: tuple[int, int], name: str | None = None) -> tuple[dict, bool]:
    """(cuda target entry, use_ptx) for a device of `capability`: its own architecture's cubins,
    else cubins of the same major version and a lower minor (not arch-specific `a` code), else
    portable PTX for an older architecture (JIT-compiled by the driver). GpuUnavailable otherwise."""
    major, minor = capability
    cuda = [t for t in targets if isinstance(t, dict) and t.get("kind") == "cuda"
            and (name is None or t.get("name") == name)]
    arch = f"sm_{major}{minor}"

    def cc(t):
        try:
            return int(str(t.get("arch", "")).removeprefix("sm_"))
        except ValueError:
            return -1
    for t in cuda:
        if t.get("arch") == arch:
            return t, False
    same_major = [t for t in cuda if cc(t) // 10 == major and cc(t) <= major * 10 + minor and t.get("ptx_portable")]
    if same_major:
        return max(same_major, key=cc), False
    ptx = [t for t in cuda if t.get("ptx_portable") and 0 <= cc(t) <= major * 10 + minor]
    if ptx:
        return max(ptx, key=cc), True
    have = ", ".join(str(t.get("arch")) for t in cuda) or "none"
    raise GpuUnavailable(f"cuda: this GPU is {arch}; the bundle has cuda kernels for {have} and no PTX it can "
                         "JIT-compile (compile with --arch " + arch + ")")


class CudaExecutor:
    kind = "cuda"
    threads = None  # (CPU threads: not used)

    def __init__(self, bundle: Bundle, *, max_context: int, max_batched_tokens: int, max_num_seqs: int,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 target: str | None = None, device: int = 0):
        m = bundle.manifest
        self.driver = driver = _driver()
        self.dev = probe(device)
        self.target, self.use_ptx = pick_target(m.get("targets") or [], self.dev["capability"], target)
        self.program = GpuProgram(m, self.target, bundle.name)
        kv = m["kv_cache"]
        self.block_size, self.vocab_size = int(kv["block_size"]), int(m["model"]["vocab_size"])
        self.full_sequence = False  # GPU targets refuse full-sequence models at compile time
        self.max_T, self.max_B = max_batched_tokens, max_num_seqs
        self.max_L = max_batched_tokens  # prompt-logprob steps keep a row per token
        self.max_blocks = -(-max_context // self.block_size)
        self.lock = threading.Lock()
        self._allocations: list[int] = []
        self.graphs: dict[int, object] = {}
        try:
            self._setup(bundle, kv_cache_tokens, gpu_memory_utilization)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Frees the device memory (the executor is unusable afterwards)."""
        for ptr in self._allocations:
            self.driver.cuMemFree(ptr)
        self._allocations.clear()

    def _setup(self, bundle: Bundle, kv_cache_tokens: int | None, gpu_memory_utilization: float) -> None:
        driver, m = self.driver, bundle.manifest
        kv = m["kv_cache"]

        self.stream = _call(driver.cuStreamCreate, 0)
        self.functions = {key: self._load_kernel(bundle, b) for key, b in self.program.binaries.items()}
        self.weights = weights = _load_weights(bundle, self.target["weights"])  # host views (bench reads sizes)
        offsets, total = [], 0
        for w in weights:
            offsets.append(total)
            total = align(total + w.nbytes)
        base = self._alloc(total)
        for w, off in zip(weights, offsets):
            _call(driver.cuMemcpyHtoD, base + off, w.ctypes.data, w.nbytes)
        self.addr = {"weights": [base + off for off in offsets]}
        sizes = {"token_ids": self.max_T, "positions": self.max_T, "slot_mapping": self.max_T,
                 "block_tables": self.max_B * self.max_blocks, "seq_lens": self.max_B,
                 "query_start_loc": self.max_B + 1, "logits_indices": self.max_L}
        for name in INPUTS:
            self.addr[name] = self._alloc(4 * sizes[name])
        self.addr["ws"] = self._alloc(self.program.workspace_bytes(self.max_T, self.max_L))
        self.addr["logits"] = self._alloc(4 * self.max_L * self.vocab_size)
        dims = {"T": self.max_T, "B": self.max_B, "L": self.max_L, "max_blocks": self.max_blocks}
        self.addr["buffers"] = {}
        for key, (n, zero) in self.program.buffers(dims).items():
            self.addr["buffers"][key] = self._alloc(n, zero=zero)
        self.sample_bufs = {name: self._alloc(8 * self.max_L) for name in
                            ("tokens", "temperature", "top_k", "top_p", "seeds", "offsets")}

        free, total_mem = _call(driver.cuMemGetInfo)
        block_bytes = int(kv["block_bytes"])
        if kv_cache_tokens is not None:
            self.num_blocks = -(-kv_cache_tokens // self.block_size)
            if self.num_blocks * block_bytes > free - GRAPH_RESERVE:
                raise GpuUnavailable(f"cuda: too little memory for a KV cache of {kv_cache_tokens} tokens "
                                  f"({self.num_blocks * block_bytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free)")
        else:
            self.num_blocks = kv_cache_blocks(int(free), int(total_mem), gpu_memory_utilization, GRAPH_RESERVE,
                                              block_bytes, self.max_blocks, f"cuda ({self.dev['name']})")
        self.addr["pool"] = self._alloc(self.num_blocks * block_bytes, zero=True)
        self.limits = StepLimits.from_info(self.target.get("limits") or {}, self.num_blocks, self.block_size,
                                           bundle.name)

    # -- setup -------------------------------------------------------------------------------
    def _alloc(self, n: int, zero: bool = False) -> int:
        ptr = int(_call(self.driver.cuMemAlloc, max(1, n)))
        self._allocations.append(ptr)
        if zero:
            _call(self.driver.cuMemsetD8, ptr, 0, max(1, n))
        return ptr

    def _load_kernel(self, bundle: Bundle, b: dict):
        d = self.driver
        if self.use_ptx:
            if "ptx" not in b:
                raise BundleError(f"bundle {bundle.name}: kernel {b.get('kernel')!r} has no PTX")
            image = bundle.file(b["ptx"]).read_bytes() + b"\0"
        else:
            image = bundle.file(b["binary"]).read_bytes()
        try:
            module = _call(d.cuModuleLoadData, image)
        except LlmircError as e:
            raise GpuUnavailable(f"cuda: cannot load kernel {b.get('kernel')} of {self.target['name']} "
                                 f"({'PTX ' + str(b.get('ptx_isa')) if self.use_ptx else 'cubin'}): {e}") from None
        fn = _call(d.cuModuleGetFunction, module, str(b["symbol"]).encode())
        if int(b["shared"]) > MAX_STATIC_SHARED:
            _call(d.cuFuncSetAttribute, fn,
                  d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(b["shared"]))
        return fn

    # -- steps -------------------------------------------------------------------------------
    def _launch(self, ln) -> None:
        b = self.program.binaries[ln.kernel]
        params, cells = pack(b, ln.values)
        _call(self.driver.cuLaunchKernel, self.functions[ln.kernel], *ln.grid, int(b["num_warps"]) * int(b["warp_size"]),
              1, 1, int(b["shared"]), self.stream, ctypes.addressof(params), 0)
        del cells  # the driver copied the values at the launch

    def _upload(self, name: str, a: np.ndarray) -> None:
        _call(self.driver.cuMemcpyHtoDAsync, self.addr[name], a.ctypes.data, a.nbytes, self.stream)

    def _launches(self, T: int, B: int, L: int, max_blocks: int):
        dims = {"T": T, "B": B, "L": L, "max_blocks": max_blocks, "num_blocks": self.num_blocks}
        out = self.program.forward(dims, self.addr)
        s = self.sample_bufs
        values = {"tokens": s["tokens"], "logits": self.addr["logits"], "ld_logits": self.vocab_size,
                  "temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"], "seeds": s["seeds"],
                  "offsets": s["offsets"], "L": L}
        return out + self.program.launches("sample", self.program.sampling["sample"], values, self.addr["buffers"])

    def _step(self, inputs, sampling) -> tuple[int, bool]:
        """Uploads the inputs (padded to a graph bucket for a decode step) and runs the step;
        returns L and whether it ran as a graph."""
        a = checked_inputs(self.limits, *inputs)  # every index, before it reaches a kernel
        T, B, L = len(a[0]), len(a[4]), len(a[6])
        max_blocks = a[3].shape[1] if a[3].ndim == 2 else 0
        if T > self.max_T or B > self.max_B or L > self.max_L or max_blocks > self.max_blocks:
            raise LlmircError(f"cuda: a step of {T} tokens, {B} sequences, {L} logits rows, {max_blocks} blocks "
                              f"exceeds what the executor was sized for ({self.max_T}, {self.max_B}, {self.max_L}, "
                              f"{self.max_blocks})")
        decode = T == B == L and np.array_equal(a[5], np.arange(B + 1)) and np.array_equal(a[6], np.arange(L))
        bucket = next((n for n in GRAPH_BUCKETS if n >= B and n <= self.max_B), None) if decode else None
        if bucket is not None:  # pad rows: token 0 at position 0, KV write skipped, one key
            pad = bucket - B
            a = [np.concatenate([a[0], np.zeros(pad, np.int32)]), np.concatenate([a[1], np.zeros(pad, np.int32)]),
                 np.concatenate([a[2], np.full(pad, -1, np.int32)]),
                 np.pad(a[3].reshape(B, max_blocks), ((0, pad), (0, self.max_blocks - max_blocks))),
                 np.concatenate([a[4], np.ones(pad, np.int32)]), np.arange(bucket + 1, dtype=np.int32),
                 np.arange(bucket, dtype=np.int32)]
        for name, x in zip(INPUTS, a):
            self._upload(name, np.ascontiguousarray(x))
        rows = bucket or L
        temperature, top_k, top_p, seeds, offsets = sampling
        keep = a  # host arrays stay alive until the step's copies are staged
        for name, x in (("temperature", temperature.astype(np.float32)), ("top_k", top_k.astype(np.int32)),
                        ("top_p", top_p.astype(np.float32)), ("seeds", seeds.astype(np.int64)),
                        ("offsets", offsets.astype(np.int64))):
            x = np.ascontiguousarray(np.resize(x, rows))
            _call(self.driver.cuMemcpyHtoDAsync, self.sample_bufs[name], x.ctypes.data, x.nbytes, self.stream)
            keep.append(x)
        if bucket is None:
            for ln in self._launches(T, B, L, max_blocks):
                self._launch(ln)
            return L, False
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        _call(self.driver.cuGraphLaunch, self.graphs[bucket], self.stream)
        return L, True

    def _capture(self, bucket: int):
        d = self.driver
        _call(d.cuStreamBeginCapture, self.stream, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        try:
            for ln in self._launches(bucket, bucket, bucket, self.max_blocks):
                self._launch(ln)
        finally:
            graph = _call(d.cuStreamEndCapture, self.stream)
        return _call(d.cuGraphInstantiate, graph, 0)

    def forward(self, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                logits_indices) -> np.ndarray:
        """Logits [len(logits_indices), vocab] float32, as CpuExecutor.forward."""
        L = len(logits_indices)
        greedy = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.int64),
                  np.zeros(1, np.int64))
        with self.lock:
            _call(self.driver.cuCtxSetCurrent, self.dev["context"])
            self._step((token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices),
                       greedy)
            out = np.empty((L, self.vocab_size), np.float32)
            _call(self.driver.cuMemcpyDtoHAsync, out.ctypes.data, self.addr["logits"], out.nbytes, self.stream)
            _call(self.driver.cuStreamSynchronize, self.stream)
        return out

    def forward_tokens(self, inputs, temperature, top_k, top_p, seeds, offsets) -> np.ndarray:
        """One token id (int32) per logits row, drawn on the device (targets/triton/sampling.py:
        temperature <= 1e-5 is argmax; top_k outside [1, vocab) and top_p >= 1 are off)."""
        L = len(inputs[6])
        with self.lock:
            _call(self.driver.cuCtxSetCurrent, self.dev["context"])
            self._step(inputs, tuple(np.asarray(x) for x in (temperature, top_k, top_p, seeds, offsets)))
            out = np.empty(L, np.int32)
            _call(self.driver.cuMemcpyDtoHAsync, out.ctypes.data, self.sample_bufs["tokens"], out.nbytes, self.stream)
            _call(self.driver.cuStreamSynchronize, self.stream)
        return out
