"""A bundle's cuda target run end to end without a GPU: the real GpuExecutor (and the engine, through
`load(..., target="cuda")`) over an emulating driver whose device is Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py), compared with the same bundle's cpu target.

The emulated device: memory is one torch uint8 tensor (a bump allocator, 256-byte aligned, at a
fake base address), all bytes 0xFF until written (NaN as float32, -1 as int32: what the executor
reads without uploading or zeroing it shows, where a GPU's uninitialized memory might not); copies
and memsets are byte copies on it; a kernel "module" is the cubin image, whose binary entry in the
target names the @triton.jit function, constexprs, parameters and launch configuration (the
KernelSpec rebuilt from them has the binary's key: the content hash the compiler gave it); a
launch unpacks the ctypes parameter array as the binary's parameter types say, turns each pointer
into a tensor view of the arena of the pointer's element type, and runs the kernel on the
interpreter as targets/triton/run.py does; a graph is the list of launches made while capturing,
replayed on graph_launch.

This checks what the host-side tests cannot: the cuda target's own plan (by default without the
GPU-only fusions of targets/triton/fuse.py), the launch rules' variants and scalars, argument packing, the
workspace and buffer layout, graph capture and replay of decode steps with their padding rows, and
the engine's multi-step decode (forward_greedy: a graph of the step and advance_step, replayed with
nothing copied between steps).
"""

from __future__ import annotations

import bisect
import ctypes
import importlib
import io

import numpy as np
import pytest
import torch
from helpers import make_checkpoint

from llmirc.artifact_format.reader import open_bundle
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import LlmircError
from llmirc.runtime import gpu_drivers
from llmirc.runtime import model as model_module
from llmirc.runtime.cpu_executor import CpuExecutor
from llmirc.runtime.gpu_drivers import OPERATIONS, CudaDriver, Driver
from llmirc.runtime.gpu_executor import GpuExecutor
from llmirc.runtime.gpu_program import ALIGN, HIDDEN
from llmirc.runtime.model import load
from llmirc.targets.triton import attention, elementwise, linear, norm, quant, rope, sampling
from llmirc.targets.triton.spec import KernelSpec

importlib.import_module("triton_interpreter")  # its bf16 fixes to Triton's interpreter (tests/)

# its module-scoped bundle builds once: the module runs on one xdist worker (pyproject.toml)
pytestmark = pytest.mark.xdist_group("gpu-emulated")

KERNEL_MODULES = (attention, elementwise, linear, norm, quant, rope, sampling)
TORCH_DTYPES = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16, "*i32": torch.int32,
                "*i8": torch.int8, "*u8": torch.uint8, "*i64": torch.int64, "*fp8e4nv": torch.float8_e4m3fn}
VALUE_CTYPES = {"i64": ctypes.c_int64, "i32": ctypes.c_int32, "fp32": ctypes.c_float}
BASE = 1 << 32           # the arena's fake device address
ARENA = 64 << 20         # bytes of emulated device memory
REPORTED = 1 << 30       # what mem_info says is free (and total): above the executor's graph reserve
BLOCK_SIZE = 16          # the bundle's KV block size (the default)
BLOCKS = 3               # KV blocks per sequence in the executor checks
CONTEXT = 512            # the executor's: decode graphs split attention in two (the last split merges)


def _spec(key: str, b: dict) -> KernelSpec:
    """The KernelSpec of a binary entry (function, constexprs, arguments, hints, launch config),
    checked against its key: the compiler's content hash of the spec it compiled."""
    fn = next(getattr(m, b["kernel"]) for m in KERNEL_MODULES if hasattr(m, b["kernel"]))
    args = tuple(tuple(p) for p in b["params"][:-len(HIDDEN)])
    aligned = frozenset(name for (name, _), hint in zip(args, b["hints"]) if hint.endswith(":16"))
    order = {n: i for i, n in enumerate(fn.arg_names)}
    spec = KernelSpec(fn, tuple(sorted(b["constexprs"].items(), key=lambda c: order[c[0]])), args,
                      int(b["num_warps"]), int(b["num_stages"]), aligned)
    assert spec.key() == key, b["kernel"]
    return spec


class Emulated(Driver):
    """A cuda driver whose device is Triton's interpreter over one CPU arena (module docstring)."""

    kind = "cuda"
    CALLS = {op: op for op in OPERATIONS}
    capture_mode = "thread-local"

    def __init__(self, bundle):
        super().__init__()
        self.arena = torch.full((ARENA,), 0xFF, dtype=torch.uint8)
        self.host = self.arena.data_ptr()
        self.starts, self.ends = [], []  # allocations, in address order (bump allocator)
        self.capturing = None            # the launches of the graph being captured
        self.launched = []               # kernel names of every launch run, captured ones when replayed
        self.graph_launches = 0          # graph_launch calls
        self.specs = {}                  # cubin image -> (binary entry, KernelSpec)
        target = next(t for t in bundle.manifest["targets"] if t["kind"] == "cuda")
        for key, b in target["binaries"].items():
            image = bundle.file(b["binary"]).read_bytes()
            assert image not in self.specs, b["kernel"]  # an image names one kernel
            self.specs[image] = (b, _spec(key, b))

    def open(self, ordinal=0):
        self.device = {"name": "emulated", "arch": "sm_90", "capability": (9, 0), "free": REPORTED,
                       "total": REPORTED}
        return self.device

    make_current = opt_in_shared = lambda self, *a: None
    create_stream = lambda self: "stream"
    instantiate = lambda self, graph: tuple(graph)
    pick_target = CudaDriver.pick_target

    def _at(self, address: int, n: int = 0) -> tuple[int, int]:
        """The arena offsets of device `address` and of the end of its allocation, which must hold the
        `n` bytes from `address`."""
        i = bisect.bisect_right(self.starts, address) - 1
        assert i >= 0 and address + n <= self.ends[i], f"{address:#x} + {n} is outside the allocations"
        return address - BASE, self.ends[i] - BASE

    def _view(self, address: int, t: str) -> torch.Tensor:
        """A pointer argument: the arena from `address` to the end of its allocation, of its element type."""
        dtype = TORCH_DTYPES[t]
        if address == 0:  # a nullable argument's NULL: the kernel does not read it
            return torch.zeros(1, dtype=dtype)
        off, end = self._at(address)
        size = torch.empty((), dtype=dtype).element_size()
        return self.arena[off:off + (end - off) // size * size].view(dtype)

    def call(self, op, *args):
        if self.capturing is not None and op not in ("launch", "end_capture"):
            raise LlmircError(f"emulated cuda: {op} during a graph capture")
        if op == "alloc":
            start = BASE + (self.ends[-1] - BASE + ALIGN - 1) // ALIGN * ALIGN if self.ends else BASE
            if start + args[0] > BASE + ARENA:
                raise LlmircError("emulated cuda: out of memory")
            self.starts.append(start)
            self.ends.append(start + args[0])
            return start
        if op == "memset_d8":
            off = self._at(args[0], args[2])[0]
            self.arena[off:off + args[2]] = args[1]
        elif op in ("htod", "htod_async"):
            ctypes.memmove(self.host + self._at(args[0], args[2])[0], args[1], args[2])
        elif op == "dtoh_async":
            ctypes.memmove(args[0], self.host + self._at(args[1], args[2])[0], args[2])
        elif op == "dtod_async":
            dst, src = self._at(args[0], args[2])[0], self._at(args[1], args[2])[0]
            ctypes.memmove(self.host + dst, self.host + src, args[2])
        elif op == "mem_info":
            return REPORTED, REPORTED
        elif op == "load_module":
            return args[0]
        elif op == "get_function":
            b, spec = self.specs[args[0]]
            assert args[1] == b["symbol"].encode()
            return b, spec
        elif op == "launch":
            self._launch(*args)
        elif op == "begin_capture":
            self.capturing = []
        elif op == "end_capture":
            graph, self.capturing = self.capturing, None
            return graph
        elif op == "graph_launch":
            self.graph_launches += 1
            for launch in args[0]:
                self._run(*launch)
        return None

    def _launch(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        """Unpacks the parameters (the values are copied now, as the driver does) and runs the kernel,
        or records it while capturing."""
        b, spec = fn
        assert (bx, by, bz) == (int(b["num_warps"]) * 32, 1, 1) and shared == int(b["shared"]) and extra == 0
        types = [t for _, t in b["params"]]
        cells = (ctypes.c_void_p * len(types)).from_address(params)
        values = [ctypes.cast(cells[i], ctypes.POINTER(ctypes.c_uint64 if t.startswith("*") else VALUE_CTYPES[t]))
                  .contents.value for i, t in enumerate(types)]
        assert values[-len(HIDDEN):] == [0] * len(HIDDEN), b["kernel"]  # Triton's scratch pointers: unused
        launch = (spec, (gx, gy, gz), values[:-len(HIDDEN)])
        if self.capturing is not None:
            self.capturing.append(launch)
        else:
            self._run(*launch)

    def _run(self, spec, grid, values):
        args = [self._view(v, t) if t.startswith("*") else v for (_, t), v in zip(spec.args, values)]
        spec.fn[grid](*args, **dict(spec.constexprs), num_warps=spec.num_warps, num_stages=spec.num_stages)
        self.launched.append(spec.name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bf16 Gemma 3 (hidden 64, 2 layers: a sliding window of 8 on the first; the scaled embedding, q/k and
    sandwich norms; Gemma 2's soft-capped logits, which Gemma3ForCausalLM computes where its config sets them (not
    the attention scores' cap, which it reads and never applies: test_triton_kernels.py's test_paged_attention_softcap
    runs that kernel); intermediate 1024, so down_proj splits k in the T <= 16 and T <= 128 variants, which share
    a workspace) compiled for cpu and cuda sm_90, its Triton cache its own."""
    tmp = tmp_path_factory.mktemp("gpu-emulated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMIRC_CACHE_DIR", str(tmp / "cache"))
        make_checkpoint(tmp / "ckpt", "gemma3", dtype="bfloat16", intermediate_size=1024, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0)
        compile_model(tmp / "ckpt", tmp / "m.llmir", CompileOptions(targets=("cpu", "cuda"), archs=("sm_90",),
                                                                    cpu_variants=("baseline",), jobs=2),
                      Progress(io.StringIO()))
    return tmp / "m.llmir"


def _step(seqs, tables, logits_rows):
    """The flat-batch inputs of one step (step_check.INPUTS): `seqs` is [(tokens, first position)] per
    sequence, `tables` their block tables, `logits_rows` the rows (indices into the step) to score."""
    bs = BLOCK_SIZE
    ids, pos, slots, starts, lens = [], [], [], [0], []
    for (tokens, first), table in zip(seqs, tables):
        p = np.arange(first, first + len(tokens))
        ids += tokens
        pos += list(p)
        slots += list(np.asarray(table)[p // bs] * bs + p % bs)
        starts.append(starts[-1] + len(tokens))
        lens.append(first + len(tokens))
    return (np.array(ids, np.int32), np.array(pos, np.int32), np.array(slots, np.int32),
            np.array(tables, np.int32), np.array(lens, np.int32), np.array(starts, np.int32),
            np.array(logits_rows, np.int32))


def _close(gpu, cpu, what, tolerance=2e-2):
    """Logits within bf16 rounding of the activations (the GPU kernels round them before the tensor-core
    dots, the CPU kernels not always: 0.42-0.47% relative error here; a norm weight left out gives 15%),
    and the same argmax wherever the CPU's top two are not a near-tie."""
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all(), what
    rel = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
    assert rel < tolerance, (what, rel)
    top2 = np.sort(cpu, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2e-2 * np.abs(cpu).max()
    assert (gpu.argmax(-1) == cpu.argmax(-1))[clear].all(), what


def test_executor_matches_cpu_target(bundle):
    """Prefill, decode (graphs) and a mixed step through GpuExecutor.forward against CpuExecutor.forward
    on the same inputs: every logits row close, and no fused prologue (gpu_fusions is off by default)."""
    b = open_bundle(bundle)
    driver = Emulated(b)
    gpu = GpuExecutor(b, driver, max_context=CONTEXT, max_num_batched_tokens=64, max_num_seqs=4,
                      kv_cache_tokens=2 * BLOCKS * BLOCK_SIZE)
    assert gpu.block_size == BLOCK_SIZE
    # the split paths run: split-K in the prefill's and the decode's down_proj, two attention splits in decode
    splits = {T: {(gpu.program.binaries[ln.kernel]["kernel"], dict(zip(
        [n for n, _ in gpu.program.binaries[ln.kernel]["params"]], ln.values)).get("num_splits"),
        gpu.program.binaries[ln.kernel]["constexprs"].get("SPLIT_K")) for ln in gpu._launches(T, 2, T, m)}
        for T, m in ((33, BLOCKS), (2, gpu.max_blocks))}
    assert ("linear_kernel", None, 4) in splits[33] and ("linear_kernel", None, 2) in splits[2]
    assert ("paged_attention_decode_kernel", 2, None) in splits[2]
    cpu = CpuExecutor(b, gpu.num_blocks)
    rng = np.random.default_rng(0)
    a, c = [int(t) for t in rng.integers(0, 384, 20)], [int(t) for t in rng.integers(0, 384, 30)]
    tables = [list(range(BLOCKS)), list(range(BLOCKS, 2 * BLOCKS))]
    steps = [  # (what, inputs): two sequences of 20 + 3 and 13 + 1 + 17 + 2 tokens
        ("prefill, every row scored", _step([(a, 0), (c[:13], 0)], tables, range(33))),
        ("decode", _step([(a[-1:], 20), (c[12:13], 13)], tables, [0, 1])),
        ("mixed: a decode and a prefill chunk", _step([(a[-2:-1], 21), (c[13:], 14)], tables, [0, 17])),
        ("decode", _step([(a[-3:-2], 22), (c[-1:], 31)], tables, [0, 1])),
        ("decode", _step([(a[-4:-3], 23), (c[-2:-1], 32)], tables, [0, 1])),
    ]
    fused = {"rms_norm_linear_kernel", "act_mul_linear_kernel", "rms_norm_into_kernel", "act_mul_into_kernel"}
    for what, inputs in steps:
        driver.launched.clear()
        _close(gpu.forward(*inputs), cpu.forward(*inputs), what)
        assert {"rms_norm_kernel", "linear_kernel", "softcap_kernel"} <= set(driver.launched)
        assert not fused & set(driver.launched)
    assert list(gpu.graphs) == [2] and driver.graph_launches == 3  # decode: captured once, launched per step
    gpu.close()


@pytest.fixture(scope="module")
def quantized_bundle(tmp_path_factory):
    """A bf16 Llama with a tied embedding compiled for cpu and cuda sm_90 with int4 weights in groups of 32 with
    zero points, down_proj's input rotated, the table (and so the LM head) in 6-bit groups of 32 as `--quant
    int4` stores a tied one, and an int8 KV cache; its Triton cache its own."""
    tmp = tmp_path_factory.mktemp("gpu-emulated-quantized")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMIRC_CACHE_DIR", str(tmp / "cache"))
        make_checkpoint(tmp / "ckpt", "llama", dtype="bfloat16", intermediate_size=1024, tie_word_embeddings=True)
        compile_model(tmp / "ckpt", tmp / "m.llmir", CompileOptions(
            targets=("cpu", "cuda"), archs=("sm_90",), cpu_variants=("baseline",), jobs=2, quant="int4",
            quant_group_size=32, quant_symmetric=False, quant_rotate=True, kv_cache_dtype="int8"),
            Progress(io.StringIO()))
    return tmp / "m.llmir"


@pytest.fixture(scope="module")
def iq4_bundle(tmp_path_factory):
    """A Llama GGUF file of IQ4_NL, IQ4_XS, Q4_K and Q6_K matrices (the tied embedding among them), kept as
    4-bit codes looked up in the scheme's value table, and the last three with their two-level scales (int8
    sub-scales under float16 ones per 256), compiled for cpu and cuda sm_90; its Triton cache its own."""
    from gguf_files import write_gguf

    tmp = tmp_path_factory.mktemp("gpu-emulated-iq4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMIRC_CACHE_DIR", str(tmp / "cache"))
        model = make_checkpoint(tmp / "ckpt", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=2, init_std=0.03, tie_word_embeddings=True)
        path = write_gguf(model, tmp / "m.gguf", ("IQ4_NL", "IQ4_XS", "Q4_K", "Q6_K"))
        compile_model(path, tmp / "m.llmir", CompileOptions(
            targets=("cpu", "cuda"), archs=("sm_90",), cpu_variants=("baseline",), jobs=2), Progress(io.StringIO()))
    return tmp / "m.llmir"


@pytest.mark.xdist_group("gpu-emulated-quantized")  # (its own worker: the module's group has the float bundle)
def test_quantized_executor_matches_cpu_target(quantized_bundle):
    """The quantized kernels of the cuda target (qembedding of the 6-bit table, qlinear's gemv and dot variants,
    the Hadamard rotation, int8 KV appends and paged attention over them) against the cpu target's on the same
    prefill, decode and mixed steps. The GPU's qlinear rounds its activations to bfloat16, the CPU's to int8 per
    32 values: 1.6-2.4% relative error in the logits here, so the bound is 4%."""
    _check_quantized_executor(quantized_bundle, {"qembedding_kernel", "qlinear_gemv", "qlinear_dot", "hadamard_kernel",
                                                 "kv_append_quantized_kernel", "paged_attention_decode_kernel"})


@pytest.mark.xdist_group("gpu-emulated-quantized")
def test_value_table_executor_matches_cpu_target(iq4_bundle):
    """GGUF IQ4_NL / IQ4_XS weights (4-bit codes and kvalues_iq4nl) and Q4_K / Q6_K ones (two-level scales)
    through the cuda target's qembedding and qlinear variants against the cpu target's, as above."""
    kernels = open_bundle(iq4_bundle).manifest["targets"][0]["kernels"]
    qlinears = [k["params"] for k in kernels if k["kind"] == "qlinear"]
    assert any(len(p.get("values") or ()) == 16 for p in qlinears)
    assert {(p["bits"], p.get("super_group")) for p in qlinears} >= {(4, 256), (6, 256)}
    _check_quantized_executor(iq4_bundle, {"qembedding_kernel", "qlinear_gemv", "qlinear_dot"})


def _check_quantized_executor(bundle, kernels):
    b = open_bundle(bundle)
    driver = Emulated(b)
    gpu = GpuExecutor(b, driver, max_context=CONTEXT, max_num_batched_tokens=64, max_num_seqs=4,
                      kv_cache_tokens=2 * BLOCKS * BLOCK_SIZE)
    cpu = CpuExecutor(b, gpu.num_blocks)
    rng = np.random.default_rng(1)
    a, c = [int(t) for t in rng.integers(0, 384, 20)], [int(t) for t in rng.integers(0, 384, 30)]
    tables = [list(range(BLOCKS)), list(range(BLOCKS, 2 * BLOCKS))]
    steps = [("prefill, every row scored", _step([(a, 0), (c[:13], 0)], tables, range(33))),
             ("decode", _step([(a[-1:], 20), (c[12:13], 13)], tables, [0, 1])),
             ("mixed: a decode and a prefill chunk", _step([(a[-2:-1], 21), (c[13:], 14)], tables, [0, 17]))]
    launched = set()
    for what, inputs in steps:
        _close(gpu.forward(*inputs), cpu.forward(*inputs), what, tolerance=4e-2)
        launched |= set(driver.launched)
    assert kernels <= launched
    gpu.close()


def test_engine_greedy_matches_cpu_target(bundle, monkeypatch):
    """Greedy generation through the engine: the cuda target (multi-step decode: forward_greedy's
    graph of the step and advance_step) gives the cpu target's tokens."""
    prompts = [[17, 42, 99, 5, 230, 7, 64, 3, 11, 250, 13, 8, 90, 21, 33, 2, 44, 6], [9, 5, 7, 300], [120, 3]]
    with load(bundle, target="cpu", kv_cache_tokens=256) as model:
        want = model.generate(prompts, 6, ignore_eos=True)
    driver = Emulated(open_bundle(bundle))
    monkeypatch.setitem(gpu_drivers.DRIVERS, "cuda", lambda: driver)
    with load(bundle, target="cuda", kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4) as model:
        assert model.executor.kind == "cuda"
        got = model.generate(prompts, 6, ignore_eos=True)
        assert ("run", 4) in model.executor.graphs and "advance_step_kernel" in driver.launched
    assert got == want


def test_every_decode_batch_runs_as_a_graph(bundle):
    """With max_num_seqs 28 (not a power of two) a decode batch of 28 runs as the graph of bucket 28, max_num_seqs
    itself, and one of 20 (their next tokens) as the graph of bucket 24, four rows of it padding: the logits of
    both are those of the same steps run without a graph (launch by launch, at the batch's own size) and close to
    the cpu target's. (Steps of one token per sequence from position 0: a prefill of 28 sequences on the
    interpreter would double the test's time; the context is short for the same reason.)"""
    b = open_bundle(bundle)
    driver = Emulated(b)
    seqs = 28
    gpu = GpuExecutor(b, driver, max_context=2 * BLOCK_SIZE, max_num_batched_tokens=seqs, max_num_seqs=seqs,
                      kv_cache_tokens=seqs * BLOCK_SIZE)
    assert gpu.buckets == (1, 2, 4, 8, 16, 24, 28)
    cpu = CpuExecutor(b, gpu.num_blocks)
    tokens = np.random.default_rng(2).integers(0, 384, (seqs, 2)).tolist()
    tables = [[i] for i in range(seqs)]
    for batch, position, bucket in ((seqs, 0, seqs), (20, 1, 24)):
        decode = _step([(t[position:position + 1], position) for t in tokens[:batch]], tables[:batch], range(batch))
        launches = driver.graph_launches
        graph = gpu.forward(*decode)
        assert bucket in gpu.graphs and driver.graph_launches == launches + 1, batch
        buckets, gpu.buckets = gpu.buckets, ()  # the same step (its K/V written again, alike) without a graph
        eager = gpu.forward(*decode)
        gpu.buckets = buckets
        assert driver.graph_launches == launches + 1, batch
        _close(graph, eager, f"decode of {batch}: graph against launches", tolerance=1e-3)
        _close(graph, cpu.forward(*decode), f"decode of {batch}")
    assert list(gpu.graphs) == [seqs, 24]
    gpu.close()


def test_executor_refuses_fewer_batched_tokens_than_sequences(bundle):
    """GpuExecutor checks max_num_batched_tokens >= max_num_seqs (as the scheduler does) before it touches the
    device: its inputs and workspace, sized for max_num_batched_tokens tokens, hold a decode graph of max_num_seqs
    rows."""
    b = open_bundle(bundle)
    for tokens, seqs, message in ((2, 4, r"max_num_batched_tokens \(2\) must be >= max_num_seqs \(4\)"),
                                  (8, 0, "max_num_seqs must be >= 1")):
        driver, calls = Emulated(b), []
        driver.open = driver.call = lambda *args: calls.append(args)
        with pytest.raises(LlmircError, match=message):
            GpuExecutor(b, driver, max_context=CONTEXT, max_num_batched_tokens=tokens, max_num_seqs=seqs,
                        kv_cache_tokens=2 * BLOCKS * BLOCK_SIZE)
        assert calls == []


def test_a_failed_load_frees_the_device(bundle, monkeypatch):
    """load() failing after it made the GPU executor (here the scheduler, made to refuse) frees what the
    executor took on the device (its KV cache: most of the GPU by default), so that a load with corrected
    options finds the memory free. max_num_batched_tokens < max_num_seqs fails before the device is touched."""
    driver = Emulated(open_bundle(bundle))
    freed, call = [], driver.call
    driver.call = lambda op, *args: freed.append(args[0]) if op == "free" else call(op, *args)
    monkeypatch.setitem(gpu_drivers.DRIVERS, "cuda", lambda: driver)
    with pytest.raises(LlmircError, match="max_num_batched_tokens"):
        load(bundle, target="cuda", kv_cache_tokens=256, max_num_batched_tokens=2, max_num_seqs=4)
    assert driver.starts == []

    def refuse(*args, **kwargs):
        raise LlmircError("refused")
    monkeypatch.setattr(model_module, "Scheduler", refuse)
    with pytest.raises(LlmircError, match="refused"):
        load(bundle, target="cuda", kv_cache_tokens=256, max_num_batched_tokens=8, max_num_seqs=4)
    assert driver.starts and sorted(freed) == driver.starts


def test_a_closed_executor_runs_nothing(bundle):
    """After close() (its memory freed, its stream destroyed) every step raises LlmircError before a copy
    or launch: on a GPU they would write into freed memory."""
    b = open_bundle(bundle)
    driver = Emulated(b)
    gpu = GpuExecutor(b, driver, max_context=CONTEXT, max_num_batched_tokens=8, max_num_seqs=2,
                      kv_cache_tokens=2 * BLOCKS * BLOCK_SIZE)
    gpu.close()
    calls, call = [], driver.call
    driver.call = lambda op, *args: calls.append(op) or call(op, *args)
    decode = _step([([5], 3), ([7], 1)], [[0], [1]], [0, 1])
    prefill = _step([([5, 6, 7], 0)], [[0]], [2])
    for run in (lambda: gpu.forward(*prefill), lambda: gpu.forward(*decode),
                lambda: gpu.forward_tokens(decode, *(np.zeros(2),) * 5), lambda: gpu.forward_greedy(decode, 2)):
        with pytest.raises(LlmircError, match="closed"):
            run()
    assert calls == [] and driver.launched == []
