"""Runs a bundle's cuda or hip target on a GPU through the vendor's driver API: one executor over
a small driver adapter (gpu_drivers.py: cuda-python's `cuda.bindings.driver`, hip-python's
`hip.hip`, optional extras imported only when a GPU is tried).

Run on an NVIDIA H200 through the cuda adapter (the GPU tests and benchmarks/gpu_check.py); not
yet on an AMD GPU. Without a GPU, the host side (gpu_program.py: launches, argument packing,
memory plan; this file's step padding, graph buckets and call sequence, through a recording
driver) is tested. Host arrays are uploaded with async copies from pageable
memory, which CUDA stages and HIP performs synchronously before returning (both drivers'
documented behaviour for unpinned memory), so the arrays may go once the call returns.

Picks the target for the device (the driver's `pick_target`: cuda, the cubin of its architecture,
a cubin of the same major version built for a lower minor (sm_80 SASS runs on 8.x), else PTX a
newer GPU's driver can JIT-compile; hip, the hsaco of its gfx architecture), loads every kernel,
uploads the weights once, allocates inputs, workspace, logits and the rules' buffers for the
largest step (`max_num_batched_tokens`, `max_num_seqs`, the context), then sizes the paged KV pool
from what is free (`gpu_memory_utilization`, vLLM's rule: see gpu_program.kv_cache_blocks).

One forward = the CPU executor's flat-batch ABI: the same seven int32 inputs, logits
[L, vocab] float32 back (`forward`), or token ids sampled on the device (`forward_tokens`:
argmax, or temperature/top-k/top-p from a seed and offset per row), so a decode step copies
back L int32s. A decode step (T == B == L, one token per sequence) runs as one CUDA/HIP graph
launch: padded to a batch-size bucket (graph_buckets: 1, 2, 4, 8, 16, 24, ... max_num_seqs),
captured on first use. A run of greedy decode steps (`forward_greedy`, the engine's multi-step
decode) launches a second graph per bucket, the step followed by advance_step
(targets/triton/sampling.py), once per step with nothing copied between them: the next step's
inputs are computed on the device and the tokens of every step come back in one copy.
forward_greedy has NOT run on a GPU yet (written after the H200 runs of 2026-12-04): the engine
uses it only with num_scheduler_steps > 1 (the default, 8); load(..., num_scheduler_steps=1)
turns it off.
"""

from __future__ import annotations

import threading

import numpy as np

from llmirc.artifact_format.reader import Bundle
from llmirc.errors import BundleError, LlmircError

from .cpu_executor import _load_weights
from .gpu_drivers import Driver
from .gpu_program import GpuProgram, GpuUnavailable, align, kv_cache_blocks, pack
from .step_check import INPUTS, StepLimits, checked_decode_run, checked_inputs

GRAPH_STEP = 8              # decode graph buckets: 1, 2, 4, then multiples of 8 (graph_buckets)
GRAPH_RESERVE = 256 << 20   # bytes left free for graphs and the driver's own allocations
MAX_RUN = 64                # decode steps one forward_greedy call runs at most
PDL_DRIVER = 12030          # CUDA 12.3: stream capture keeps programmatic dependent launch (cuDriverGetVersion)
GREEDY = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.int64),
          np.zeros(1, np.int64))  # temperature, top_k, top_p, seeds, offsets of argmax sampling


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The batch sizes a decode step is padded to and captured at: 1, 2, 4, then multiples of
    GRAPH_STEP below `max_num_seqs`, then `max_num_seqs` itself, so that every decode batch runs as
    a graph with fewer than GRAPH_STEP padding rows (vLLM's capture sizes, whose largest is
    max_num_seqs rounded up: here the buffers are sized for max_num_seqs rows, so the last bucket
    is that). Graphs are captured on first use and replay into the one workspace sized for the
    largest step: a bucket costs its capture (the step's launches, recorded once) and the
    executable graph's own memory, no buffers."""
    return tuple([n for n in (1, 2, 4) if n < max_num_seqs] + list(range(GRAPH_STEP, max_num_seqs, GRAPH_STEP)) +
                 [max_num_seqs])


class GpuExecutor:
    """The executor of a GPU target over `driver` (a gpu_drivers.Driver, opened here on `device`).
    GpuUnavailable (one line) when the host cannot run it; BundleError for a malformed target."""

    threads = None  # (CPU threads: not used)

    def __init__(self, bundle: Bundle, driver: Driver, *, max_context: int, max_num_batched_tokens: int,
                 max_num_seqs: int, kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 target: str | None = None, device: int = 0):
        # checked before the device is touched (the scheduler's rules): a decode step of max_num_seqs rows,
        # its graph bucket included, must fit the inputs and workspace sized for max_num_batched_tokens
        if max_num_seqs < 1:
            raise LlmircError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise LlmircError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({max_num_seqs})")
        m = bundle.manifest
        self.driver, self.kind = driver, driver.kind
        self.dev = driver.open(device)
        self.target, self.use_ptx = driver.pick_target(m.get("targets") or [], target)
        self.program = GpuProgram(m, self.target, bundle.name)
        # programmatic dependent launch where the bundle asks for it (targets/triton/pdl.py) and graph
        # capture keeps it; an older driver gets plain launches, which the kernels' wait makes no different
        self.pdl = self.kind == "cuda" and int(self.dev.get("driver_version") or 0) >= PDL_DRIVER
        kv = m["kv_cache"]
        self.block_size, self.vocab_size = int(kv["block_size"]), int(m["model"]["vocab_size"])
        self.full_sequence = False  # GPU targets refuse full-sequence models at compile time
        self.max_T, self.max_B = max_num_batched_tokens, max_num_seqs
        self.buckets = graph_buckets(max_num_seqs)
        self.max_L = max_num_batched_tokens  # prompt-logprob steps keep a row per token
        self.max_blocks = -(-max_context // self.block_size)
        self.lock = threading.Lock()
        self._allocations: list[int] = []
        self.modules: list = []
        self.graphs: dict = {}  # bucket, or ("run", bucket) for forward_greedy -> executable graph
        self.stream = None
        self.run_out = self.run_step = None  # forward_greedy's token rows and step counter (device)
        try:
            self._setup(bundle, kv_cache_tokens, gpu_memory_utilization)
        except BaseException:
            try:
                self.close()
            except LlmircError:
                pass  # the setup's own error says more
            raise

    def close(self) -> None:
        """Waits for the stream, then destroys what the executor made on the device: graphs,
        modules, memory, the stream (the executor is unusable afterwards; a second call does
        nothing). Every release is tried; the first driver error (LlmircError) is raised after."""
        first = None
        steps = [("synchronize", self.stream)] if self.stream is not None else []
        steps += [("destroy_graph_exec", g) for g in self.graphs.values()]
        steps += [("unload_module", m) for m in self.modules] + [("free", p) for p in self._allocations]
        steps += [("destroy_stream", self.stream)] if self.stream is not None else []
        self.graphs, self.modules, self._allocations, self.stream = {}, [], [], None
        for op, handle in steps:
            try:
                self.driver.call(op, handle)
            except LlmircError as e:
                first = first or e
        if first is not None:
            raise first

    def _setup(self, bundle: Bundle, kv_cache_tokens: int | None, gpu_memory_utilization: float) -> None:
        driver, m = self.driver, bundle.manifest
        kv = m["kv_cache"]

        self.stream = driver.create_stream()
        self.functions = {key: self._load_kernel(bundle, b) for key, b in self.program.binaries.items()}
        self.weights = weights = _load_weights(bundle, self.target["weights"])  # host views (bench reads sizes)
        offsets, total = [], 0
        for w in weights:
            offsets.append(total)
            total = align(total + w.nbytes)
        base = self._alloc(total)
        for w, off in zip(weights, offsets):
            driver.call("htod", base + off, w.ctypes.data, w.nbytes)
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
        self.run_bucket = self.max_B  # forward_greedy's largest bucket (out rows of one run)
        if "advance_step" in self.program.sampling:  # multi-step decode
            self.run_out, self.run_step = self._alloc(4 * MAX_RUN * self.run_bucket), self._alloc(4)

        free, total_mem = driver.call("mem_info")
        block_bytes = int(kv["block_bytes"])
        if kv_cache_tokens is not None:
            self.num_blocks = -(-kv_cache_tokens // self.block_size)
            if self.num_blocks * block_bytes > free - GRAPH_RESERVE:
                raise GpuUnavailable(f"{self.kind}: too little memory for a KV cache of {kv_cache_tokens} tokens "
                                  f"({self.num_blocks * block_bytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free)")
        else:
            self.num_blocks = kv_cache_blocks(int(free), int(total_mem), gpu_memory_utilization, GRAPH_RESERVE,
                                              block_bytes, self.max_blocks,
                                              f"{self.kind} ({self.dev['name']})")
        self.addr["pool"] = self._alloc(self.num_blocks * block_bytes, zero=True)
        self.limits = StepLimits.from_info(self.target.get("limits") or {}, self.num_blocks, self.block_size,
                                           bundle.name)

    # -- setup -------------------------------------------------------------------------------
    def _alloc(self, n: int, zero: bool = False) -> int:
        ptr = self.driver.alloc(n)
        self._allocations.append(ptr)
        if zero:
            self.driver.call("memset_d8", ptr, 0, max(1, n))
        return ptr

    def _load_kernel(self, bundle: Bundle, b: dict):
        if self.use_ptx:
            if "ptx" not in b:
                raise BundleError(f"bundle {bundle.name}: kernel {b.get('kernel')!r} has no PTX")
            image = bundle.file(b["ptx"]).read_bytes() + b"\0"
        else:
            image = bundle.file(b["binary"]).read_bytes()
        form = f"PTX {b.get('ptx_isa')}" if self.use_ptx else b["binary"].rsplit(".", 1)[-1]
        module, fn = self.driver.load(image, str(b["symbol"]), int(b["shared"]),
                                      f"{b.get('kernel')} of {self.target['name']} ({form})")
        self.modules.append(module)
        return fn

    # -- steps -------------------------------------------------------------------------------
    def _launch(self, ln) -> None:
        b = self.program.binaries[ln.kernel]
        params, cells = pack(b, ln.values)
        self.driver.launch(self.functions[ln.kernel], ln.grid, int(b["num_warps"]) * int(b["warp_size"]),
                           int(b["shared"]), self.stream, params, pdl=self.pdl and b.get("launch_pdl", False))
        del cells  # the driver copied the values at the launch

    def _upload(self, name: str, a: np.ndarray) -> None:
        self.driver.call("htod_async", self.addr[name], a.ctypes.data, a.nbytes, self.stream)

    def _launches(self, T: int, B: int, L: int, max_blocks: int):
        """The step's launches, then the sampling kernel's, each computed as it is asked for."""
        dims = {"T": T, "B": B, "L": L, "max_blocks": max_blocks, "num_blocks": self.num_blocks}
        yield from self.program.forward(dims, self.addr)
        s = self.sample_bufs
        values = {"tokens": s["tokens"], "logits": self.addr["logits"], "ld_logits": self.vocab_size,
                  "temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"], "seeds": s["seeds"],
                  "offsets": s["offsets"], "L": L}
        yield from self.program.launches("sample", self.program.sampling["sample"], values, self.addr["buffers"])

    def _step(self, inputs, sampling) -> tuple[int, bool]:
        """Uploads the inputs (padded to a graph bucket for a decode step) and runs the step;
        returns L and whether it ran as a graph."""
        T, B, L, max_blocks, bucket = self._stage(checked_inputs(self.limits, *inputs), sampling)
        if bucket is None:
            for ln in self._launches(T, B, L, max_blocks):
                self._launch(ln)
            return L, False
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        self.driver.call("graph_launch", self.graphs[bucket], self.stream)
        return L, True

    def _stage(self, a: list, sampling) -> tuple:
        """Uploads checked inputs `a` (padded to a graph bucket for a decode step) and the sampling
        parameters (pageable copies: the arrays may go once the calls return); (T, B, L, max_blocks,
        bucket or None). LlmircError once the executor is closed (its memory freed)."""
        if self.stream is None:
            raise LlmircError(f"{self.kind}: the executor is closed")
        T, B, L = len(a[0]), len(a[4]), len(a[6])
        max_blocks = a[3].shape[1] if a[3].ndim == 2 else 0
        if T > self.max_T or B > self.max_B or L > self.max_L or max_blocks > self.max_blocks:
            raise LlmircError(f"{self.kind}: a step of {T} tokens, {B} sequences, {L} logits rows, {max_blocks} blocks "
                              f"exceeds what the executor was sized for ({self.max_T}, {self.max_B}, {self.max_L}, "
                              f"{self.max_blocks})")
        decode = T == B == L and np.array_equal(a[5], np.arange(B + 1)) and np.array_equal(a[6], np.arange(L))
        bucket = next((n for n in self.buckets if n >= B), None) if decode else None
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
        for name, x in (("temperature", temperature.astype(np.float32)), ("top_k", top_k.astype(np.int32)),
                        ("top_p", top_p.astype(np.float32)), ("seeds", seeds.astype(np.int64)),
                        ("offsets", offsets.astype(np.int64))):
            x = np.ascontiguousarray(np.resize(x, rows))
            self.driver.call("htod_async", self.sample_bufs[name], x.ctypes.data, x.nbytes, self.stream)
        return T, B, L, max_blocks, bucket

    def _capture(self, bucket: int, run: bool = False):
        """A graph of one decode step of `bucket` rows; `run`: followed by advance_step (forward_greedy)."""
        def record():
            for ln in self._launches(bucket, bucket, bucket, self.max_blocks):
                self._launch(ln)
            if run:
                values = {"tokens": self.sample_bufs["tokens"], "out": self.run_out, "step": self.run_step,
                          "B": bucket, "max_blocks": self.max_blocks, "token_rows": self.limits.token_rows} | \
                    {name: self.addr[name] for name in ("token_ids", "positions", "slot_mapping", "block_tables",
                                                        "seq_lens")}
                for ln in self.program.launches("advance_step", self.program.sampling["advance_step"], values,
                                                self.addr["buffers"]):
                    self._launch(ln)
        return self.driver.capture(self.stream, record)

    def forward(self, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                logits_indices) -> np.ndarray:
        """Logits [len(logits_indices), vocab] float32, as CpuExecutor.forward."""
        L = len(logits_indices)
        with self.lock:
            self.driver.make_current()
            self._step((token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices),
                       GREEDY)
            out = np.empty((L, self.vocab_size), np.float32)
            self.driver.call("dtoh_async", out.ctypes.data, self.addr["logits"], out.nbytes, self.stream)
            self.driver.call("synchronize", self.stream)
        return out

    def forward_tokens(self, inputs, temperature, top_k, top_p, seeds, offsets) -> np.ndarray:
        """One token id (int32) per logits row, drawn on the device (targets/triton/sampling.py:
        temperature <= 1e-5 is argmax; top_k outside [1, vocab) and top_p >= 1 are off)."""
        L = len(inputs[6])
        with self.lock:
            self.driver.make_current()
            self._step(inputs, tuple(np.asarray(x) for x in (temperature, top_k, top_p, seeds, offsets)))
            out = np.empty(L, np.int32)
            self.driver.call("dtoh_async", out.ctypes.data, self.sample_bufs["tokens"], out.nbytes, self.stream)
            self.driver.call("synchronize", self.stream)
        return out

    @property
    def supports_greedy_runs(self) -> bool:
        """Whether forward_greedy runs (the bundle has advance_step kernels: compiled since 2026-12-04)."""
        return self.run_out is not None

    def forward_greedy(self, inputs, steps: int) -> np.ndarray:
        """Tokens [n, B] int32 of n <= `steps` greedy decode steps (CpuExecutor.forward_greedy's
        contract): `inputs` is a decode step of B sequences with one token each, whose block
        tables already hold the slots of the next steps. The first and last step's inputs are
        checked (RuntimeLimitError). The steps run as launches of one graph (a decode step of
        the bucket, then advance_step) with no copy between them; the tokens come back once.
        Fewer rows come back than asked for past MAX_RUN, and after a step whose token falls
        outside the embedding table (the steps after it still run on the device, feeding token 0
        and writing K/V into slots the run reserved, which the next step writes again).
        LlmircError for a bundle without advance_step."""
        if not self.supports_greedy_runs:
            raise LlmircError(f"{self.kind}: this bundle has no advance_step kernels (compiled before 2026-12-04): "
                              "no multi-step decode")
        steps = max(1, min(steps, MAX_RUN))
        first = checked_decode_run(self.limits, inputs, steps)
        B = len(first[4])
        zero = np.zeros(1, np.int32)
        with self.lock:
            self.driver.make_current()
            bucket = self._stage(first, GREEDY)[-1]
            self.driver.call("htod_async", self.run_step, zero.ctypes.data, 4, self.stream)
            if ("run", bucket) not in self.graphs:
                self.graphs[("run", bucket)] = self._capture(bucket, run=True)
            for _ in range(steps):
                self.driver.call("graph_launch", self.graphs[("run", bucket)], self.stream)
            out = np.empty((steps, bucket), np.int32)
            self.driver.call("dtoh_async", out.ctypes.data, self.run_out, out.nbytes, self.stream)
            self.driver.call("synchronize", self.stream)
        out = out[:, :B]
        outside = np.flatnonzero((out >= self.limits.token_rows).any(axis=1))
        return out[:outside[0] + 1] if len(outside) else out
