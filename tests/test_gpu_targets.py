"""`compile --target cpu,cuda,hip` on this CPU-only machine: one bundle with a library for the CPU and
a cubin/hsaco per kernel and architecture, launch metadata that agrees with the binaries, HGMMA in
the sm_90 prefill matmuls, every stage on request, and full-sequence models refused."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from helpers import make_checkpoint
from onnx_graphs import save
from test_cli_errors import llmirc as cli
from test_onnx_fallback import bidirectional_decoder

from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import LlmircError
from llmirc.runtime import inspect
from llmirc.targets.plan import Dim, KernelCall, Plan, Ref
from llmirc.targets.triton.compile import HIDDEN_PARAMS, sass

# its module-scoped fixtures build once: the module runs on one xdist worker (pyproject.toml)
pytestmark = pytest.mark.xdist_group("gpu-targets")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A Triton kernel cache for this module (LLMIRC_CACHE_DIR)."""
    path = tmp_path_factory.mktemp("llmirc-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMIRC_CACHE_DIR", str(path))
        yield path


def llmirc(*args):
    """The CLI (test_cli_errors.llmirc) with this module's kernel cache. That helper's environment is
    os.environ as test_cli_errors was imported, before `cache` set LLMIRC_CACHE_DIR: the CLI read and
    filled the run's cache instead (`--emit ptx` compiled every sm_90 kernel of `llama` again)."""
    return cli(*args, env={k: v for k, v in os.environ.items() if k == "LLMIRC_CACHE_DIR"})


def _compile(src, out, **kw):
    log = io.StringIO()
    compile_model(src, out, CompileOptions(cpu_variants=("baseline",), jobs=2, **kw), Progress(log))
    return json.loads((out / "manifest.json").read_text()), log.getvalue()


@pytest.fixture(scope="module")
def llama(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("gpu-llama")
    make_checkpoint(tmp / "ckpt", "llama", dtype="bfloat16", tokenizer=True)
    manifest, log = _compile(tmp / "ckpt", tmp / "m.llmir", targets=("cpu", "cuda", "hip"))
    return tmp, manifest, log


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("gpu-gpt2")
    make_checkpoint(tmp / "ckpt", "gpt2")
    manifest, _ = _compile(tmp / "ckpt", tmp / "m.llmir", targets=("cuda", "hip"), archs=("sm_90", "gfx942"))
    return tmp, manifest


def _gpu(manifest):
    return {t["arch"]: t for t in manifest["targets"] if t["kind"] in ("cuda", "hip")}


def _check_target(bundle, manifest, t):
    """Every launch of every kernel (plan and sampling) has its binary, and the binary's parameters
    are the launch's arguments (typed as the rule says) then the two hidden pointers."""
    plan_symbols = {step["kernel"] for step in t["plan"]}
    assert {k["symbol"] for k in t["kernels"]} == plan_symbols
    magic = b"\x7fELF"
    for rule in [k["rule"] for k in t["kernels"]] + list(t["sampling"].values()):
        types = dict(map(tuple, rule["args"]))
        for v in rule["variants"]:
            for ln in v["launches"]:
                b = t["binaries"][ln["kernel"]]
                assert (bundle / b["binary"]).read_bytes()[:4] == magic
                want = [[a, "i64" if a in ln["scalars"] else types[a]] for a in ln["args"]]
                assert b["params"] == want + [list(p) for p in HIDDEN_PARAMS], (rule["kind"], b["kernel"])
                assert b["global_scratch_size"] == 0 and b["num_ctas"] == 1 and b["num_warps"] >= 1


def test_one_bundle_for_cpu_cuda_hip(llama):
    tmp, manifest, log = llama
    bundle = tmp / "m.llmir"
    gpu = _gpu(manifest)
    assert sorted(gpu) == ["gfx90a", "gfx942", "sm_80", "sm_90"]
    assert [t["kind"] for t in manifest["targets"]] == ["cpu", "cuda", "cuda", "hip", "hip"]
    for t in gpu.values():
        _check_target(bundle, manifest, t)
        assert t["name"] == f"{t['kind']}-{t['arch']}" and set(t["compile_seconds"]) >= {"ttir", "ttgir", "llir"}
        assert f"{t['name']}: {len(t['binaries'])} kernels" in log  # compile time per stage is reported
    # weights once: one tensor file for every target
    assert [f["path"] for f in manifest["files"] if f["path"].startswith("weights/")] == ["weights/model.safetensors"]
    # sm_80's PTX is kept (a newer GPU's driver can JIT it); sm_90a PTX is not portable
    assert gpu["sm_80"]["ptx_portable"] and not gpu["sm_90"]["ptx_portable"]
    assert all((bundle / b["ptx"]).read_text().lstrip().startswith("//") for b in gpu["sm_80"]["binaries"].values())
    assert not any("ptx" in b for b in gpu["sm_90"]["binaries"].values())
    assert all(b["binary"].endswith(".hsaco") for b in gpu["gfx942"]["binaries"].values())
    # no source line info: the binaries do not name the checkout that compiled them
    checkout = str(Path(__file__).resolve().parents[1]).encode()
    assert [p.name for p in (bundle / "kernels").rglob("*") if p.is_file() and checkout in p.read_bytes()] == []


def test_sm90_prefill_matmuls_use_hgmma(llama):
    tmp, manifest, _ = llama
    t = _gpu(manifest)["sm_90"]
    linears = [k for k in t["kernels"] if k["kind"] == "linear"]
    assert linears
    for k in linears:
        prefill = k["rule"]["variants"][-1]  # T > 128
        assert prefill["when"] == 1
        binary = t["binaries"][prefill["launches"][0]["kernel"]]
        assert "HGMMA." in sass((tmp / "m.llmir" / binary["binary"]).read_bytes()), k["symbol"]


def test_inspect_lists_kernels_per_architecture(llama):
    tmp, manifest, _ = llama
    text = inspect.describe(inspect.summary(tmp / "m.llmir"))
    for arch in ("cuda-sm_80", "cuda-sm_90", "hip-gfx90a", "hip-gfx942"):
        assert f"kernels ({arch}; compile ttir" in text
    assert "PTX for newer GPUs" in text and "linear_kernel (8 warps" in text


def test_cpu_target_of_a_mixed_bundle_runs(llama):
    from llmirc.runtime.model import load
    tmp, _, _ = llama
    model = load(tmp / "m.llmir", kv_cache_tokens=256)
    assert model.executor.target["kind"] == "cpu"
    assert len(model.generate([[0, 5, 7]], 4, ignore_eos=True)[0]) == 4


def test_gpt2_compiles_for_cuda_and_hip(gpt2):
    tmp, manifest = gpt2
    gpu = _gpu(manifest)
    assert sorted(gpu) == ["gfx942", "sm_90"]
    assert {k["kind"] for k in gpu["sm_90"]["kernels"]} >= {"layer_norm", "act", "linear", "paged_attention"}
    for t in gpu.values():
        _check_target(tmp / "m.llmir", manifest, t)


def test_qwen3_head_norms_compile_for_cuda_and_hip(tmp_path, cache):
    """Qwen3's q_norm and k_norm: rms_norm per head, one program per (token, head)."""
    make_checkpoint(tmp_path / "ckpt", "qwen3", head_dim=32)
    manifest, _ = _compile(tmp_path / "ckpt", tmp_path / "m.llmir", targets=("cuda", "hip"), archs=("sm_90", "gfx942"))
    for t in _gpu(manifest).values():
        _check_target(tmp_path / "m.llmir", manifest, t)
        grids = {tuple(ln["grid"]) for k in t["kernels"] if k["kind"] == "rms_norm"
                 for v in k["rule"]["variants"] for ln in v["launches"]}
        assert grids == {("T", 1, 1), ("T", 4, 1), ("T", 2, 1)}, grids  # final/layer norms, q_norm, k_norm


def test_keep_intermediates_and_emit(llama, tmp_path):
    tmp, _, _ = llama
    manifest, _ = _compile(tmp / "ckpt", tmp_path / "k.llmir", targets=("hip",), archs=("gfx942",),
                           keep_intermediates=True)
    b = next(iter(manifest["targets"][0]["binaries"].values()))
    stem = (tmp_path / "k.llmir" / b["binary"]).with_suffix("")
    for stage in ("ttir", "ttgir", "llir", "amdgcn", "hsaco"):
        assert stem.with_suffix(f".{stage}").stat().st_size > 0, stage
    r = llmirc("compile", tmp / "ckpt", "--target", "cuda", "--arch", "sm_90", "--emit", "ptx", "-q")
    assert r.returncode == 0, r.stderr
    assert ".entry linear_kernel(" in r.stdout and ".target sm_90a" in r.stdout
    # an MLIR stage: a module per kernel, apart by `// -----` as --split-input-file reads them, each parsing
    # alone (one file of them did not: each module defines its own #loc aliases)
    from triton._C.libtriton import ir
    r = llmirc("compile", tmp / "ckpt", "--target", "cuda", "--arch", "sm_90", "--emit", "ttgir", "-q")
    assert r.returncode == 0, r.stderr
    modules = r.stdout.split("\n// -----\n")
    assert len(modules) == r.stdout.count("tt.func public @") > 1
    for i, text in enumerate(modules):
        (tmp_path / f"{i}.ttgir").write_text(text)
        ctx = ir.context()
        ir.load_dialects(ctx)
        assert ir.parse_mlir_module(str(tmp_path / f"{i}.ttgir"), ctx) is not None, text[:200]
    # a stage two targets have: the note names what is not printed; options that do nothing here warn
    r = llmirc("compile", tmp / "ckpt", "--target", "cuda,hip", "--arch", "sm_90,gfx942", "--emit", "llir", "-q",
               "--cpu-variants", "baseline", "--keep-intermediates")
    assert r.returncode == 0 and r.stderr.splitlines() == [
        "warning: --cpu-variants has no effect without --target cpu: the bundle has no CPU library",
        "warning: --keep-intermediates has no effect without -o: no bundle is written",
        "note: --emit llir: the text for sm_90 only; not for hip (--target hip alone prints its own)"], r.stderr


def test_gpu_option_errors(llama, tmp_path):
    tmp, _, _ = llama
    for args, message in [
        (("--target", "cuda", "--arch", "sm_75"), "unknown GPU architecture 'sm_75'"),
        (("--target", "cuda", "--arch", "gfx942"), "--arch gfx942: no cuda architecture given"),
        (("--target", "cpu", "--arch", "sm_90"), "--arch sm_90: no --target here compiles for it"),
        (("--target", "cuda", "--emit", "cubin"), "--emit cubin: not a text stage of the targets given (choose "
                                                  "from mlir, ttir, ttgir, llir, ptx); binary stages go into the "
                                                  "bundle (-o)"),
        (("--target", "cuda", "--emit", "foo"), "--emit foo: not a text stage of the targets given (choose "
                                                "from mlir, ttir, ttgir, llir, ptx) (see"),  # (no hint: no stage)
        # an fp8 KV cache: E4M3 conversions only from sm_89; none on the CPU
        (("--target", "cuda", "--kv-cache-dtype", "fp8"), "target cuda: no fp8 KV cache on sm_80 (FP8 E4M3 "
                                                          "conversions need sm_89 or newer; sm_80,sm_90 is the "
                                                          "default --arch); give --arch sm_90"),
        (("--target", "hip", "--arch", "gfx942", "--kv-cache-dtype", "fp8"), "target hip: no fp8 KV cache on gfx942"),
        (("--kv-cache-dtype", "fp8_e5m2"), "--kv-cache-dtype: fp8_e5m2 is not supported"),
        (("--target", "cpu,cuda", "--arch", "sm_90", "--kv-cache-dtype", "fp8"),
         "target cpu: no kernel for a float8_e4m3fn (fp8) KV cache"),
        (("--target", "cuda", "--arch", ""), "--arch '': no architecture named"),  # (the defaults were taken)
    ]:
        r = llmirc("compile", tmp / "ckpt", *args, "-o", tmp_path / "x.llmir", "-q")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x.llmir").exists()


def test_kernel_limits_are_user_errors(tmp_path):
    """Shapes a GPU kernel cannot take fail before anything is compiled, naming the target: the
    float32 scales after an int8 pool's codes need block_size x head_dim even (head_dim 5 here)."""
    make_checkpoint(tmp_path / "ckpt", "gpt2", hidden_size=20, num_attention_heads=4)
    r = llmirc("compile", tmp_path / "ckpt", "--target", "cuda", "--arch", "sm_90", "--block-size", "1",
               "--kv-cache-dtype", "int8", "-o", tmp_path / "m.llmir")
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "m.llmir").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        "error: target cuda (sm_90): quantized KV pool: block_size 1 x head_dim 5 must be even on GPU targets "
        "(the float32 scales after the codes must be 4-byte aligned)")


def _ws(i, col=0):
    return Ref("ws", i, col)


def _norm_call(out, x, dim=64, symbol="llmir_rms_norm_0"):
    """A plan's rms_norm call (weight 0) over T rows."""
    return KernelCall("rms_norm", {"dim": dim, "eps": 1e-5}, {"out": out, "ld_out": dim, "x": x, "ld_x": dim,
                                                             "w": Ref("weight", 0), "T": Dim("T")}, symbol)


def _linear_call(out, x, *, n=32, k=64, ld_x=None, residual=None, symbol="llmir_linear_1"):
    """A plan's bf16 linear call (weight 1; ld_x k unless given; with a residual add when given)."""
    null = Ref("null")
    return KernelCall("linear", {"n": n, "k": k, "bias": False, "residual": residual is not None,
                                 "w_dtype": "bfloat16"},
                      {"out": out, "ld_out": n, "x": x, "ld_x": ld_x or k, "w": Ref("weight", 1), "bias": null,
                       "residual": residual or null, "ld_res": n, "T": Dim("T")}, symbol)


def _act_mul_call(out, gate_up, dim, symbol="llmir_act_mul_3"):
    """A plan's silu act_mul call: gate and up side by side in the rows of `gate_up`."""
    return KernelCall("act_mul", {"dim": dim, "act": "silu"},
                      {"out": out, "ld_out": dim, "gate": gate_up, "ld_gate": 2 * dim,
                       "up": Ref(gate_up.space, gate_up.index, gate_up.col + dim), "ld_up": 2 * dim, "T": Dim("T")},
                      symbol)


def test_prologue_fusion_conditions():
    """fuse.py fuses a norm or act_mul with the linear after it only when the linear reads exactly
    its output, writes none of its inputs, and nothing later reads that output before it is
    written again."""
    from llmirc.targets.triton.fuse import fuse_prologues
    ws, norm = _ws, _norm_call

    def linear(out, x, residual=None, k=64):
        return _linear_call(out, x, k=k, ld_x=64, residual=residual)

    def add(out, a, b):
        return KernelCall("add", {"dim": 32}, {"out": out, "ld_out": 32, "a": a, "ld_a": 32, "b": b, "ld_b": 32,
                                               "T": Dim("T")}, "llmir_add_2")

    def kinds(calls):
        return [c.kind for c in fuse_prologues(Plan(calls=calls)).calls]
    fused = fuse_prologues(Plan(calls=[norm(ws(0), ws(1)), linear(ws(2), ws(0))])).calls
    assert [c.kind for c in fused] == ["rms_norm_linear"] and fused[0].symbol == "llmir_rms_norm_linear_2"
    assert fused[0].args["src"] == ws(1) and fused[0].args["x"] == ws(0) and fused[0].params["eps"] == 1e-5
    assert kinds([norm(ws(0), ws(1)), linear(ws(2), ws(0)), add(ws(3), ws(0), ws(2))]) == ["rms_norm", "linear", "add"]
    assert kinds([norm(ws(0), ws(1)), linear(ws(2), ws(0)), add(ws(0), ws(2), ws(2)), add(ws(3), ws(0), ws(2))]) \
        == ["rms_norm_linear", "add", "add"]  # written again before it is read
    assert kinds([norm(ws(0), ws(1)), linear(ws(1), ws(0), residual=ws(1))]) == ["rms_norm", "linear"]  # out = src
    assert kinds([norm(ws(0), ws(1)), linear(ws(2), ws(0, 8))]) == ["rms_norm", "linear"]  # another view
    assert kinds([norm(ws(0), ws(1)), linear(ws(2), ws(0), k=128)]) == ["rms_norm", "linear"]
    act = _act_mul_call(ws(0), ws(1), 64)
    fused = fuse_prologues(Plan(calls=[act, linear(ws(2), ws(0), residual=ws(2))])).calls
    assert [c.kind for c in fused] == ["act_mul_linear"] and fused[0].args["up"] == ws(1, 64)
    assert fused[0].params["act"] == "silu" and fused[0].params["residual"]
    from llmirc.targets.triton.target import CudaBackend  # by default (gpu_fusions off) the manifest's plan
    plan = Plan(calls=[act, linear(ws(2), ws(0))])
    fusing = CudaBackend(CompileOptions(targets=("cuda",), gpu_fusions=True))
    assert [c.kind for c in fusing.plan(plan).calls] == ["act_mul_linear"]
    assert CudaBackend(CompileOptions(targets=("cuda",))).plan(plan) is plan


def _pdl_plan():
    """A norm, linear, act_mul and linear (the decode step's pattern) as a Plan."""
    from llmirc.targets.plan import NO_POOL, Slot, WeightEntry
    return Plan(calls=[
        _norm_call(_ws(0), _ws(1), dim=256, symbol="norm"),
        _linear_call(_ws(2), _ws(0), n=1024, k=256, symbol="gate_up"),
        _act_mul_call(_ws(3), _ws(2), 512, symbol="act_mul"),
        _linear_call(_ws(1), _ws(3), n=256, k=512, residual=_ws(1), symbol="down")], pool=NO_POOL, logits_cols=256,
        slots=[Slot("float32", {"T": 4096})] * 4,
        weights=[WeightEntry(f"w{i}", (1,), ("tensor", f"w{i}", "bfloat16"), "bfloat16") for i in range(2)])


def test_pdl_rules(cache):
    """CompileOptions.gpu_pdl (targets/triton/pdl.py): on sm_90 the linears wait (launched with PDL,
    their decode variants prefetching the first 1 KB of each weight row of their k range) and the
    kernels before them trigger; sm_80 and hip compile as without it, and so does sm_90 by default.
    The sm_90 SASS: each linear variant (GEMV-shaped, split-K, prefill; with a residual) prefetches
    (decode), then waits (ACQBULK) before any other load, store or atomic; the norm triggers its
    dependents first (PREEXIT); the binary's metadata asks for the launch."""
    from llmirc.targets.triton.compile import compile_kernels
    from llmirc.targets.triton.linear import _prefetch
    from llmirc.targets.triton.target import CudaBackend, HipBackend

    def modes(backend, arch):
        return {(s, ln.kernel.name, dict(ln.kernel.constexprs).get("PDL"), dict(ln.kernel.constexprs).get("PREFETCH"))
                for s, r in backend.rules(_pdl_plan(), arch).items() for v in r.variants for ln in v.launches}
    pdl = CudaBackend(CompileOptions(targets=("cuda",), gpu_pdl=True))
    on = modes(pdl, "sm_90")
    assert {(s, m, p) for s, _, m, p in on if s in ("gate_up", "down")} == {
        ("gate_up", "wait", 256), ("gate_up", "wait", 0), ("down", "wait", 512), ("down", "wait", 256),
        ("down", "wait", 0)}  # (down's T <= 128 variant splits k in two)
    assert {s for s, _, m, _ in on if m == "trigger"} == {"norm", "act_mul"}
    assert {s for s, _, m, _ in on if not m} == {"argmax", "sample", "advance_step"}
    off = [modes(pdl, "sm_80"), modes(CudaBackend(CompileOptions(targets=("cuda",))), "sm_90"),
           modes(HipBackend(CompileOptions(targets=("hip",), gpu_pdl=True)), "gfx942")]
    assert all(not m and not p for mo in off for _, _, m, p in mo)
    assert [_prefetch(k, "bfloat16") for k in (8, 64, 100, 256, 700, 4096)] == [64, 64, 64, 256, 512, 512]
    assert [_prefetch(k, "float32") for k in (8, 700)] == [32, 256]

    rules = pdl.rules(_pdl_plan(), "sm_90")
    specs = [v.launches[0].kernel for v in rules["down"].variants] + [rules["norm"].variants[0].launches[0].kernel]
    assert [s.launch_pdl for s in specs] == [True, True, True, False]
    *downs, norm = compile_kernels([(s, "sm_90") for s in specs], cache_dir=cache, jobs=2)
    assert all(d.metadata["launch_pdl"] for d in downs) and not norm.metadata["launch_pdl"]

    def opcodes(c):  # ("--:-:-:-:1\t@P0 LDG.E R2, [R4];": the control code, a predicate, the opcode)
        return [next(t for t in line.split("\t")[1].split() if not t.startswith("@")).rstrip(";")
                for line in sass(c.binary).splitlines() if "\t" in line]
    memory = ("LDG", "LDGSTS", "STG", "ATOM", "RED", "LDL", "STL", "UBLKCP", "UTMALDG")
    for d, prefetched in zip(downs, (True, True, False)):
        ops = opcodes(d)
        wait = ops.index("ACQBULK")
        assert not [op for op in ops[:wait] if op.startswith(memory)], ops[:wait]
        assert any(op.startswith("CCTL") for op in ops[:wait]) == prefetched  # prefetch.global.L2: CCTL.E.PF2
    ops = opcodes(norm)
    assert ops.index("PREEXIT") < min(i for i, op in enumerate(ops) if op.startswith("LDG"))


def test_full_sequence_models_are_refused(tmp_path):
    path = save(bidirectional_decoder(), tmp_path)
    r = llmirc("compile", path, "--target", "cuda", "-o", tmp_path / "m.llmir")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: target cuda: this is a full-sequence model (ONNX ops left generic), which only the cpu target "
        "runs; compile it with --target cpu")
    assert not (tmp_path / "m.llmir").exists()
    with pytest.raises(LlmircError, match="target hip: this is a full-sequence model"):
        compile_model(path, None, CompileOptions(targets=("hip",), emit="mlir"), Progress(None), stdout=io.StringIO())


# --- the GPU executor's host side (no GPU here): launches, argument packing, memory, target choice

def _program(tmp, manifest, arch="sm_90"):
    from llmirc.runtime.gpu_program import GpuProgram
    return GpuProgram(manifest, _gpu(manifest)[arch], "m.llmir")


def _regions(program, dims):
    """Fake device addresses (256-aligned, far apart) of every buffer, and their byte ranges."""
    from llmirc.runtime.gpu_program import INPUTS
    sizes = {name: 4 * 4096 for name in INPUTS} | {"ws": program.workspace_bytes(dims["T"], dims["L"]),
                                                    "logits": 4 * dims["L"] * 384, "pool": 1 << 20}
    addr, regions, base = {}, [], 1 << 32
    for name, n in sizes.items():
        addr[name] = base
        regions.append((base, base + n))
        base += 1 << 24
    addr["weights"] = []
    for w in program.target["weights"]:
        import numpy as np

        from llmirc import dtypes
        addr["weights"].append(base)
        n = int(np.prod(w[1])) * dtypes.dtype(w[0]).itemsize
        regions.append((base, base + n))
        base += 1 << 24
    addr["buffers"] = {}
    for key, (n, _) in program.buffers(dims).items():
        addr["buffers"][key] = base
        regions.append((base, base + n))
        base += 1 << 24
    return addr, regions


@pytest.mark.parametrize("T,B,L", [(1, 1, 1), (8, 8, 8), (37, 2, 2), (300, 1, 1)])
def test_launches_point_inside_their_buffers(llama, T, B, L):
    import ctypes

    from llmirc.runtime.gpu_program import pack
    tmp, manifest, _ = llama
    program = _program(tmp, manifest)
    dims = {"T": T, "B": B, "L": L, "max_blocks": 4, "num_blocks": 64}
    addr, regions = _regions(program, dims | {"T": 512, "L": 512})
    launches = list(program.forward(dims, addr))
    assert len(launches) >= len(program.steps)
    # the GPU's own plan is the manifest's by default (the GPU-only fusions of fuse.py are off)
    kernels = {program.binaries[ln.kernel]["kernel"] for ln in launches}
    assert len(program.steps) == len(manifest["plan"])
    assert {"rms_norm_kernel", "act_mul_kernel", "linear_kernel"} <= kernels
    assert not kernels & {"rms_norm_linear_kernel", "act_mul_linear_kernel", "rms_norm_into_kernel",
                          "act_mul_into_kernel"}
    for ln in launches:
        b = program.binaries[ln.kernel]
        array, cells = pack(b, ln.values)
        for i, ((name, t), v) in enumerate(zip(b["params"], ln.values)):
            raw = ctypes.cast(array[i], ctypes.POINTER({"fp32": ctypes.c_float, "i64": ctypes.c_int64}.get(
                t, ctypes.c_uint64))).contents.value
            assert raw == pytest.approx(v), (b["kernel"], name)
            if t.startswith("*") and name not in ("global_scratch", "profile_scratch", "bias", "residual", "b"):
                assert any(lo <= v < hi for lo, hi in regions), (b["kernel"], name, hex(v))
        assert ln.values[-2:] == (0, 0) and all(g >= 1 for g in ln.grid)
    # the linear variant follows T (decode: 16- and 32-row tiles, split-K; prefill above 128 rows: 128-row tiles)
    first_linear = next(ln for ln in launches if program.binaries[ln.kernel]["kernel"] == "linear_kernel")
    block_m = program.binaries[first_linear.kernel]["constexprs"]["BLOCK_M"]
    assert block_m == (16 if T <= 16 else 32 if T <= 128 else 128)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, cache, llama):
    """Bundles of quantized weights with cuda (and hip) entries: --quant int4 (cpu,cuda by the CLI)
    and int8 (cuda, hip; with an int8 KV cache), a GPTQ act-order checkpoint, a GGUF file kept quantized (Q4_1, Q6_K's
    groups of 16, Q4_K's f32 scales and mins, Q8_0)."""
    from gguf_files import write_gguf
    from test_gptq_awq import write_quantized
    tmp = tmp_path_factory.mktemp("gpu-quant")
    out = {}
    r = llmirc("compile", llama[0] / "ckpt", "--target", "cpu,cuda", "--arch", "sm_90", "--quant", "int4",
               "--cpu-variants", "baseline", "-o", tmp / "int4.llmir", "-q")
    assert r.returncode == 0, r.stderr
    out["int4"] = (tmp / "int4.llmir", json.loads((tmp / "int4.llmir" / "manifest.json").read_text()))
    out["int8"] = (tmp / "int8.llmir", _compile(llama[0] / "ckpt", tmp / "int8.llmir", targets=("cuda", "hip"),
                                                archs=("sm_90", "gfx942"), quant="int8", kv_cache_dtype="int8")[0])
    make_checkpoint(tmp / "float", "llama")  # (the shapes of `llama`: its other kernels are in the cache)
    write_quantized(tmp / "float", tmp / "gptq", method="gptq", bits=4, group=32, act_order=True)
    out["gptq"] = (tmp / "gptq.llmir", _compile(tmp / "gptq", tmp / "gptq.llmir", targets=("cuda",),
                                                archs=("sm_90",))[0])
    model = make_checkpoint(tmp / "k", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2, init_std=0.03)
    path = write_gguf(model, tmp / "m.gguf", ("Q4_1", "Q6_K", "Q4_K", "Q8_0"))
    out["gguf"] = (tmp / "gguf.llmir", _compile(path, tmp / "gguf.llmir", targets=("cuda",), archs=("sm_90",))[0])
    return out


@pytest.mark.parametrize("case", ["int4", "int8", "gptq", "gguf"])
def test_quantized_weights_compile_for_gpus(quantized, case):
    """Quantized weights reach the GPU targets: qlinear/qembedding kernels in every GPU entry, their
    binaries agree with their launch rules, and every launch of a step points inside its buffers."""
    bundle, manifest = quantized[case]
    gpu = _gpu(manifest)
    assert sorted(gpu) == {"int4": ["sm_90"], "int8": ["gfx942", "sm_90"]}.get(case, ["sm_90"])
    if case == "int4":
        assert [t["kind"] for t in manifest["targets"]] == ["cpu", "cuda"]
    for t in gpu.values():
        _check_target(bundle, manifest, t)
        params = [k["params"] for k in t["kernels"] if k["kind"] == "qlinear"]
        assert params and all(p["bits"] == (8 if case == "int8" else p["bits"]) for p in params)
        if case == "gptq":
            assert any(p["act_order"] and p["zero"] == "int" for p in params)
        if case == "int8":  # the int8 KV cache's kernels
            kv = {k["kind"]: k["params"] for k in t["kernels"] if k["kind"] in ("kv_append", "paged_attention")}
            assert {p["kv_dtype"] for p in kv.values()} == {"int8"} and kv["paged_attention"]["num_layers"] == 2
            assert any(b["kernel"] == "kv_append_quantized_kernel" for b in t["binaries"].values())
            if t["arch"] == "sm_90":  # the codes, widened to bf16, go through the tensor cores
                prefill = [b for b in t["binaries"].values() if b["kernel"] == "paged_attention_prefill_kernel"]
                assert prefill and "HGMMA" in sass((bundle / prefill[0]["binary"]).read_bytes())
        if case == "gguf":
            kinds = {k["kind"] for k in t["kernels"]}
            assert "qembedding" in kinds and "linear" not in kinds
            assert {(p["group_size"], p["scale_dtype"], p["zero"], p.get("super_group", 0)) for p in params} >= {
                (32, "float16", "min", 0), (16, "int8", "none", 256), (32, "int8", "min", 256),
                (32, "float16", "none", 0)}  # Q4_1, Q6_K and Q4_K (two-level scales), Q8_0
    program = _program(bundle, manifest)
    for T in (1, 37, 300):
        dims = {"T": T, "B": 1, "L": 1, "max_blocks": 20, "num_blocks": 64}
        addr, regions = _regions(program, dims | {"T": 512, "L": 512})
        launches = list(program.forward(dims, addr))
        names = {program.binaries[ln.kernel]["kernel"] for ln in launches}
        assert ("qlinear_gemv" if T == 1 else "qlinear_dot") in names
        for ln in launches:
            b = program.binaries[ln.kernel]
            for (name, t), v in zip(b["params"], ln.values):
                nullable = name in ("bias", "residual", "b", "zeros", "perm", "super_scales", "super_mins")
                if t.startswith("*") and name not in ("global_scratch", "profile_scratch") and not (nullable and v == 0):
                    assert any(lo <= v < hi for lo, hi in regions), (b["kernel"], name, hex(v))


def test_misaligned_buffers_and_bad_entries_are_refused(llama):
    import copy

    from llmirc.errors import BundleError
    from llmirc.runtime.gpu_program import GpuProgram
    tmp, manifest, _ = llama
    program = _program(tmp, manifest)
    dims = {"T": 4, "B": 4, "L": 4, "max_blocks": 4, "num_blocks": 64}
    addr, _ = _regions(program, dims)
    addr["ws"] += 8  # a workspace that is not 16-byte aligned
    with pytest.raises(BundleError, match="was compiled for .* % 16 == 0"):
        list(program.forward(dims, addr))
    bad = copy.deepcopy(manifest)
    target = _gpu(bad)["sm_90"]
    next(iter(target["binaries"].values()))["params"].pop(0)
    with pytest.raises(BundleError, match="its launch rule passes"):
        GpuProgram(bad, target, "m.llmir")
    bad = copy.deepcopy(manifest)
    _gpu(bad)["sm_90"]["plan"][0]["args"]["ids"] = {"ptr": "input", "index": "../etc"}
    with pytest.raises(BundleError, match="unknown input"):  # when the bundle is opened
        GpuProgram(bad, _gpu(bad)["sm_90"], "m.llmir")
    # entries of the wrong type in a rule, a launch or the plan (were TypeError, KeyError: internal errors)
    for edit in (lambda t: t["kernels"][0].update(rule=None), lambda t: t["kernels"][0]["rule"].update(args=None),
                 lambda t: t["kernels"][0]["rule"]["variants"][0].update(launches="x"),
                 lambda t: t["kernels"][0]["rule"]["variants"][0]["launches"][0].pop("kernel"),
                 lambda t: t["plan"][0].update(kernel=[]), lambda t: t.update(binaries=None)):
        bad = copy.deepcopy(manifest)
        edit(_gpu(bad)["sm_90"])
        with pytest.raises(BundleError, match="GPU target 'cuda-sm_90' is malformed"):
            GpuProgram(bad, _gpu(bad)["sm_90"], "m.llmir")
    # programmatic dependent launch: only for a kernel of a cuda sm_90+ target compiled to wait
    for arch, wait, flag, ok in [("sm_90", "wait", True, True), ("sm_90", "", True, False),
                                 ("sm_80", "wait", True, False), ("gfx942", "wait", True, False),
                                 ("sm_90", "wait", "yes", False), ("sm_90", "", False, True)]:
        pdl = copy.deepcopy(manifest)
        b = next(iter(_gpu(pdl)[arch]["binaries"].values()))
        b["launch_pdl"], b["constexprs"]["PDL"] = flag, wait
        if ok:
            GpuProgram(pdl, _gpu(pdl)[arch], "m.llmir")
        else:
            with pytest.raises(BundleError, match=f"asks for launch_pdl {flag!r}, which only a kernel of a cuda"):
                GpuProgram(pdl, _gpu(pdl)[arch], "m.llmir")


def test_kv_cache_memory_plan():
    from llmirc.runtime.gpu_program import GpuUnavailable, kv_cache_blocks
    GiB = 2**30
    # 140 GiB device, 2 GiB used by others, our weights etc. 10 GiB already allocated: free 128
    assert kv_cache_blocks(128 * GiB, 140 * GiB, 0.9, GiB, 2**20, 64) == (126 * GiB - 12 * GiB - GiB) // 2**20
    assert kv_cache_blocks(GiB, 8 * GiB, 0.9, 0, 2**20, 64) == 204  # (0.9 * 8 - 7) GiB in MiB blocks
    with pytest.raises(GpuUnavailable, match=r"^cuda \(H\): too little memory: 0.5 of 8.0 GiB free"):
        kv_cache_blocks(GiB // 2, 8 * GiB, 0.9, 0, 2**20, 64, "cuda (H)")
    with pytest.raises(LlmircError, match="gpu_memory_utilization must be in"):
        kv_cache_blocks(GiB, 8 * GiB, 1.5, 0, 2**20, 64)


def test_target_choice_per_device(llama):
    from llmirc.runtime.gpu_drivers import pick_cuda_target, pick_hip_target
    from llmirc.runtime.gpu_program import GpuUnavailable
    _, manifest, _ = llama
    targets = manifest["targets"]
    picks = [pick_cuda_target(targets, cc) for cc in ((9, 0), (8, 0), (8, 9), (10, 0))]
    assert [(t["name"], ptx) for t, ptx in picks] == [("cuda-sm_90", False), ("cuda-sm_80", False),
                                                      ("cuda-sm_80", False), ("cuda-sm_80", True)]
    with pytest.raises(GpuUnavailable, match=r"^cuda: this GPU is sm_75; the bundle has cuda kernels for sm_80, "
                                             r"sm_90 and no PTX it can JIT-compile"):
        pick_cuda_target(targets, (7, 5))
    with pytest.raises(GpuUnavailable, match="sm_120; the bundle has cuda kernels for sm_90 and no PTX"):
        pick_cuda_target([t for t in targets if t.get("arch") == "sm_90"], (12, 0))
    # hsaco runs only on its own architecture: no fallback (an RDNA3 gfx1100 gets nothing)
    assert [pick_hip_target(targets, a)["name"] for a in ("gfx90a", "gfx942")] == ["hip-gfx90a", "hip-gfx942"]
    with pytest.raises(GpuUnavailable, match=r"^hip: this GPU is gfx1100; the bundle has hip kernels for gfx90a, "
                                             r"gfx942 \(compile with --arch gfx1100\)$"):
        pick_hip_target(targets, "gfx1100")
    with pytest.raises(GpuUnavailable, match=r"gfx942; the bundle has hip kernels for gfx90a \("):
        pick_hip_target(targets, "gfx942", name="hip-gfx90a")


def _why_not(kind):
    """The one line saying why this host cannot run `kind`, or None when it can."""
    from llmirc.runtime.gpu_drivers import DRIVERS
    from llmirc.runtime.gpu_program import GpuUnavailable
    try:
        DRIVERS[kind]().open()
    except GpuUnavailable as e:
        return str(e)
    return None


def test_loader_says_why_a_gpu_target_is_not_used(llama):
    from llmirc.runtime.gpu_program import GpuUnavailable
    from llmirc.runtime.model import load
    why = [_why_not("cuda"), _why_not("hip")]
    if None in why:
        pytest.skip("this host has a GPU")
    tmp, _, _ = llama
    model = load(tmp / "m.llmir", kv_cache_tokens=256)
    assert model.executor.kind == "cpu"
    assert model.target_notes == why  # cuda tried first, then hip
    assert why[0].startswith(("cuda: no NVIDIA driver", "cuda: cuda-python is not installed")) and "\n" not in why[0]
    assert why[1] in ("hip: no AMD driver (libamdhip64.so not found)",
                      "hip: hip-python is not installed (pip install 'llmirc[hip]')")
    for name in ("cuda-sm_90", "hip-gfx942"):
        with pytest.raises(GpuUnavailable, match=f"^{name.split('-')[0]}: "):
            load(tmp / "m.llmir", target=name)
    r = llmirc("run", tmp / "m.llmir", "--token-ids", "0,5", "--max-new-tokens", "2")
    assert r.returncode == 0 and f"note: not using {why[0]}" in r.stderr and f"note: not using {why[1]}" in r.stderr
    r = llmirc("inspect", tmp / "m.llmir", "--load", "--json")  # and inspect --load's report says so too
    assert r.returncode == 0 and json.loads(r.stdout)["loads"]["not_used"] == why, r.stderr
    assert json.loads(r.stdout)["loads"]["checked"] == ["cuda-sm_80", "cuda-sm_90", "hip-gfx90a", "hip-gfx942"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b.update(binary="../../etc/passwd"), "no file '../../etc/passwd' listed in manifest.json"),
    (lambda b: b["params"].pop(0), "its launch rule passes"),
    (lambda b: b.update(launch_pdl=True), "asks for launch_pdl True"),
])
def test_inspect_load_checks_gpu_targets_without_a_gpu(llama, tmp_path, damage, message):
    """`inspect --load` on a host without the GPU (a CI build step): the GPU targets it cannot load
    still get the host-side checks, so a damaged one fails there, not on the GPU host."""
    import shutil
    if None in (_why_not("cuda"), _why_not("hip")):
        pytest.skip("this host has a GPU")
    tmp, _, _ = llama
    bundle = shutil.copytree(tmp / "m.llmir", tmp_path / "m.llmir")
    manifest = json.loads((bundle / "manifest.json").read_text())
    damage(next(iter(_gpu(manifest)["gfx942"]["binaries"].values())))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = llmirc("inspect", bundle, "--load")
    assert r.returncode == 1 and "Traceback" not in r.stderr and message in r.stderr.splitlines()[-1], r.stderr


def test_a_gpu_only_bundle_says_why_it_cannot_run(gpt2):
    """A bundle of GPU targets alone on a host that runs none: one line naming each kind's reason."""
    from llmirc.runtime.gpu_program import GpuUnavailable
    from llmirc.runtime.model import load
    why = [_why_not("cuda"), _why_not("hip")]
    if None in why:
        pytest.skip("this host has a GPU")
    tmp, _ = gpt2
    with pytest.raises(GpuUnavailable) as e:
        load(tmp / "m.llmir")
    assert str(e.value) == f"bundle {tmp / 'm.llmir'}: no target this host can run ({why[0]}; {why[1]})"
    r = llmirc("run", tmp / "m.llmir", "--token-ids", "0,5", "--max-new-tokens", "2")
    assert r.returncode == 1 and r.stderr == f"error: {e.value}\n", r.stderr


def test_gpu_bundles_are_reproducible_with_source_date_epoch(gpt2, tmp_path, monkeypatch):
    """With SOURCE_DATE_EPOCH the stages' compile times, which a cold kernel cache measures anew,
    are left out of the manifest: two compiles give the same bytes; inspect shows the target."""
    tmp, _ = gpt2
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bundles = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.llmir"
        manifest, _ = _compile(tmp / "ckpt", out, targets=("cuda",), archs=("sm_90",))
        assert "compile_seconds" not in _gpu(manifest)["sm_90"]
        bundles.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert bundles[0] == bundles[1]
    assert "kernels (cuda-sm_90)" in inspect.describe(inspect.summary(tmp_path / "a.llmir"))


def test_inspect_load_reports_a_damaged_gpu_only_bundle_before_the_missing_gpu(gpt2, tmp_path):
    """A GPU-only bundle checked on a host without that GPU (a CI build step): `inspect --load`
    names the damage first; an intact one is refused only for want of a GPU."""
    import shutil
    why = [_why_not("cuda"), _why_not("hip")]
    if None in why:
        pytest.skip("this host has a GPU")
    tmp, _ = gpt2
    r = llmirc("inspect", tmp / "m.llmir", "--load")
    assert r.returncode == 1 and "no target this host can run" in r.stderr.splitlines()[-1], r.stderr
    bundle = shutil.copytree(tmp / "m.llmir", tmp_path / "m.llmir")
    manifest = json.loads((bundle / "manifest.json").read_text())
    next(iter(_gpu(manifest)["sm_90"]["binaries"].values()))["params"].pop(0)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = llmirc("inspect", bundle, "--load")
    assert r.returncode == 1 and "its launch rule passes" in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.parametrize("kind,module,message", [
    ("cuda", "cuda", "cuda: cuda-python is not installed (pip install 'llmirc[cuda]')"),
    ("hip", "hip", "hip: hip-python is not installed (pip install 'llmirc[hip]')")])
def test_missing_bindings_are_named(monkeypatch, kind, module, message):
    import sys

    from llmirc.runtime.gpu_drivers import DRIVERS
    from llmirc.runtime.gpu_program import GpuUnavailable
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(GpuUnavailable) as e:
        DRIVERS[kind]().open()
    assert str(e.value) == message


@pytest.mark.parametrize("kind,module", [("cuda", "cuda.bindings"), ("hip", "hip")])
def test_driver_tables_name_real_functions(kind, module):
    """Each adapter maps every operation to a function of the installed bindings (and names the
    enums it uses); the operations are the same for both kinds."""
    from llmirc.runtime.gpu_drivers import DRIVERS, OPERATIONS
    pytest.importorskip(module)
    driver = DRIVERS[kind]
    api = driver.import_api()
    assert set(driver.CALLS) == set(OPERATIONS)
    names = [*driver.CALLS.values(), *driver.OTHER, driver.ERROR_NAME]
    missing = [f for f in names if not callable(getattr(api, f, None))]
    assert missing == []
    if kind == "cuda":
        assert api.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL is not None
        assert api.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES is not None
    else:
        assert api.hipStreamCaptureMode.hipStreamCaptureModeThreadLocal is not None
        assert api.hipError_t.hipSuccess == 0


def _recording_driver(kind, arch):
    """A driver that runs nothing: it records the host side's calls (allocations get fake
    addresses; no kernel runs; copies back give zeros). For testing the call sequence only."""
    import ctypes

    from llmirc.runtime.gpu_drivers import OPERATIONS, CudaDriver, Driver, HipDriver

    class Recording(Driver):
        CALLS = {op: op for op in OPERATIONS}
        capture_mode = "thread-local"

        def __init__(self):
            super().__init__()
            self.kind, self.log, self.allocated = kind, [], []

        def open(self, ordinal=0):
            self.device = {"name": "recording", "arch": arch, "capability": (int(arch[3]), int(arch[4:]))
                           if kind == "cuda" else None, "driver_version": 13000}
            return self.device

        def call(self, op, *args):
            self.log.append((op, args))
            if op == "alloc":  # 256-byte aligned, as cuMemAlloc / hipMalloc
                self.allocated.append((self.allocated[-1] if self.allocated else 1 << 32) + (1 << 30))
                return self.allocated[-1]
            if op in ("load_module", "get_function"):  # a distinct handle per kernel
                return (op, *args)
            if op == "dtoh_async":  # zeros come back
                ctypes.memset(args[0], 0, args[2])
            return {"mem_info": (8 << 30, 16 << 30), "end_capture": "graph"}.get(op)

        make_current = opt_in_shared = lambda self, *a: None
        create_stream = lambda self: "stream"
        instantiate = lambda self, graph: f"exec({graph})"
        pick_target = {"cuda": CudaDriver, "hip": HipDriver}[kind].pick_target

        def launch(self, fn, grid, threads, shared, stream, params, pdl=False):  # (pdl: the flag, logged)
            Driver.launch(self, fn, grid, threads, shared, stream, params)
            self.log[-1] = ("launch", self.log[-1][1] + (pdl,))
    return Recording()



def test_a_failed_capture_ends_it_and_destroys_its_graph():
    """Driver.capture when what it records raises (Ctrl-C, a refused launch): the capture is ended and the
    graph it made destroyed, and the recording's error is the one raised, also where ending the capture
    fails (CUDA invalidates a capture a launch failed in)."""
    from llmirc.runtime.gpu_drivers import OPERATIONS, Driver

    class Recording(Driver):
        CALLS = {op: op for op in OPERATIONS}
        capture_mode, log, end_fails = "thread-local", [], False

        def call(self, op, *args):
            self.log.append(op)
            if op == "end_capture" and self.end_fails:
                raise LlmircError("CUDA cuStreamEndCapture failed: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")
            return "graph" if op == "end_capture" else None

    def record(error):
        def run():
            raise error
        return run
    driver = Recording()
    with pytest.raises(KeyboardInterrupt):
        driver.capture("stream", record(KeyboardInterrupt()))
    assert driver.log == ["begin_capture", "end_capture", "destroy_graph"]
    driver.log.clear()
    driver.end_fails = True
    with pytest.raises(LlmircError, match="launch refused"):
        driver.capture("stream", record(LlmircError("launch refused")))
    assert driver.log == ["begin_capture", "end_capture"]


@pytest.mark.parametrize("kind, error", [("cuda", "CUDA_ERROR_OUT_OF_MEMORY"), ("hip", "hipErrorOutOfMemory")])
def test_an_allocation_the_device_cannot_hold_is_too_little_memory(kind, error):
    """Driver.alloc failing for want of memory (weights larger than the GPU) raises GpuUnavailable, as a KV
    cache that does not fit does, so that the loader notes it and runs the bundle's cpu target; another
    driver error stays a plain LlmircError."""
    from types import SimpleNamespace

    from llmirc.runtime.gpu_drivers import DRIVERS
    from llmirc.runtime.gpu_program import GpuUnavailable
    codes = {1: error, 2: "CUDA_ERROR_INVALID_VALUE"}
    driver = DRIVERS[kind]()
    driver.success, failing = 0, [1]
    driver.api = SimpleNamespace(**{driver.CALLS["alloc"]: lambda n: (failing[0], 0),
                                    driver.ERROR_NAME: lambda e: (0, codes[e].encode())})
    with pytest.raises(GpuUnavailable, match=f"^{kind}: too little memory for {3 << 30} bytes .*{error}"):
        driver.alloc(3 << 30)
    failing[0] = 2
    with pytest.raises(LlmircError, match="INVALID_VALUE") as e:
        driver.alloc(3 << 30)
    assert not isinstance(e.value, GpuUnavailable)

def test_cuda_pdl_launch_passes_the_attribute():
    """CudaDriver.launch(pdl=True) is cuLaunchKernelEx with the launch attribute
    PROGRAMMATIC_STREAM_SERIALIZATION (built with the installed cuda-bindings' own types); without
    pdl, cuLaunchKernel as before; the hip adapter refuses pdl."""
    import ctypes

    pytest.importorskip("cuda.bindings")
    from llmirc.runtime.gpu_drivers import CudaDriver, HipDriver

    class Recording(CudaDriver):
        def call(self, op, *args):
            self.log.append((op, args))

    driver = Recording()
    driver.api, driver.log = CudaDriver.import_api(), []
    params, stream = (ctypes.c_void_p * 2)(), driver.api.CUstream(0)
    driver.launch("fn", (3, 2, 1), 64, 1024, stream, params, pdl=True)
    driver.launch("fn", (3, 2, 1), 64, 1024, stream, params)
    driver.launch("fn2", (3, 2, 1), 64, 1024, stream, params, pdl=True)
    (op, (config, fn, address, extra)), plain, again = driver.log
    assert again == ("cuLaunchKernelEx", (config, "fn2", address, 0))  # the configuration is built once
    assert op == "cuLaunchKernelEx" and fn == "fn" and address == ctypes.addressof(params) and extra == 0
    assert (config.gridDimX, config.gridDimY, config.gridDimZ, config.blockDimX, config.blockDimY,
            config.blockDimZ, config.sharedMemBytes, config.numAttrs) == (3, 2, 1, 64, 1, 1, 1024, 1)
    (attr,) = config.attrs
    ids = driver.api.CUlaunchAttributeID
    assert attr.id == ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1
    assert plain == ("launch", ("fn", 3, 2, 1, 64, 1, 1, 1024, stream, ctypes.addressof(params), 0))
    with pytest.raises(LlmircError, match="programmatic dependent launch is a CUDA feature"):
        HipDriver().launch("fn", (1, 1, 1), 64, 0, "stream", params, pdl=True)


def test_cuda_and_hip_share_one_executor(llama):
    """GpuExecutor over a recording driver, for cuda-sm_90 and hip-gfx942: the kernels it launches
    are the bundle's plan then sampling, one thread block of num_warps x the architecture's warp
    size; a decode step is captured once per bucket, then one graph launch per step."""
    import numpy as np

    from llmirc.artifact_format.reader import open_bundle
    from llmirc.runtime.gpu_executor import GpuExecutor
    tmp, manifest, _ = llama
    bundle = open_bundle(tmp / "m.llmir")
    kernels = {}
    for kind, arch in (("cuda", "sm_90"), ("hip", "gfx942")):
        driver = _recording_driver(kind, arch)
        ex = GpuExecutor(bundle, driver, max_context=64, max_num_batched_tokens=32, max_num_seqs=4)
        assert ex.kind == kind and ex.target["name"] == f"{kind}-{arch}"
        # prefill of 5 tokens, one sequence: no graph
        driver.log.clear()
        ex.forward(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32),
                   np.zeros((1, 4), np.int32), np.array([5], np.int32), np.array([0, 5], np.int32),
                   np.array([4], np.int32))
        launches = [args for op, args in driver.log if op == "launch"]
        key_of = {f: k for k, f in ex.functions.items()}
        assert len(key_of) == len(ex.functions) == len(ex.program.binaries)
        kernels[kind] = [ex.program.binaries[key_of[a[0]]]["kernel"] for a in launches]
        warp = 32 if kind == "cuda" else 64
        for a in launches:
            b = ex.program.binaries[key_of[a[0]]]
            assert a[4:7] == (int(b["num_warps"]) * warp, 1, 1) and a[7] == int(b["shared"]) and a[8] == "stream"
        assert [op for op, _ in driver.log][-2:] == ["dtoh_async", "synchronize"]
        # two decode steps of 3 sequences: bucket 4, captured once, launched twice
        driver.log.clear()
        for _ in range(2):
            ex.forward_tokens((np.array([1, 2, 3], np.int32), np.array([5, 5, 5], np.int32),
                               np.array([5, 69, 133], np.int32), np.array([[0], [1], [2]], np.int32),
                               np.array([6, 6, 6], np.int32), np.arange(4, dtype=np.int32),
                               np.arange(3, dtype=np.int32)), np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3),
                              np.zeros(3))
        ops = [op for op, _ in driver.log]
        assert ops.count("begin_capture") == 1 and ops.count("graph_launch") == 2
        assert ops.index("destroy_graph") == ops.index("end_capture") + 1  # the template goes once instantiated
        assert list(ex.graphs) == [4] and ops.index("begin_capture") < ops.index("launch") < ops.index("end_capture")
        modules = list(ex.modules)  # one per kernel, what load_module returned
        assert len(modules) == len(ex.program.binaries) and all(m[0] == "load_module" for m in modules)
        driver.log.clear()
        ex.close()
        ex.close()  # a second close does nothing
        done = {op: [a[0] for o, a in driver.log if o == op] for op in
                ("synchronize", "destroy_graph_exec", "unload_module", "free", "destroy_stream")}
        assert [op for op, _ in driver.log][0] == "synchronize" and done["destroy_stream"] == ["stream"]
        assert done["destroy_graph_exec"] == ["exec(graph)"] and done["unload_module"] == modules
        assert sorted(done["free"]) == sorted(driver.allocated)
    assert kernels["cuda"] == kernels["hip"]  # one plan: the same kernels in the same order


def test_graph_buckets_cover_every_decode_batch():
    """Decode graph buckets are vLLM's capture sizes (1, 2, 4, then multiples of 8) ending at max_num_seqs, so
    every batch up to max_num_seqs has one with fewer than 8 padding rows; a power of two as before is no different
    below 8 (tests/test_gpu_emulated.py runs batches of 20 and 28 as graphs)."""
    from llmirc.runtime.gpu_executor import graph_buckets
    assert graph_buckets(1) == (1,) and graph_buckets(3) == (1, 2, 3) and graph_buckets(4) == (1, 2, 4)
    assert graph_buckets(24) == (1, 2, 4, 8, 16, 24) and graph_buckets(28) == (1, 2, 4, 8, 16, 24, 28)
    assert graph_buckets(100) == (1, 2, 4, *range(8, 97, 8), 100) and len(graph_buckets(256)) == 35
    for max_num_seqs in range(1, 300):
        buckets = graph_buckets(max_num_seqs)
        assert list(buckets) == sorted(set(buckets)) and buckets[-1] == max_num_seqs
        assert all(0 <= next(n for n in buckets if n >= b) - b < 8 for b in range(1, max_num_seqs + 1))


def test_pdl_kernels_are_launched_with_it(llama, tmp_path):
    """A bundle whose sm_90 linears were compiled to wait (as CompileOptions.gpu_pdl compiles them;
    here their manifest entries say so): the executor launches exactly those with programmatic
    dependent launch, eagerly and in a captured decode step, on a driver of CUDA 12.3 or newer;
    on an older one (graph capture would drop it) none."""
    import shutil

    import numpy as np

    from llmirc.artifact_format.reader import open_bundle
    from llmirc.runtime.gpu_executor import GpuExecutor
    tmp, _, _ = llama
    bundle = shutil.copytree(tmp / "m.llmir", tmp_path / "m.llmir")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for b in _gpu(manifest)["sm_90"]["binaries"].values():
        if b["kernel"] == "linear_kernel":
            b["launch_pdl"], b["constexprs"]["PDL"] = True, "wait"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    step = (np.array([1, 2, 3], np.int32), np.array([5, 5, 5], np.int32), np.array([5, 69, 133], np.int32),
            np.array([[0], [1], [2]], np.int32), np.array([6, 6, 6], np.int32), np.arange(4, dtype=np.int32),
            np.arange(3, dtype=np.int32))
    for version, expected in ((13000, True), (12020, False)):
        driver = _recording_driver("cuda", "sm_90")
        driver.open = (lambda open_: lambda ordinal=0: dict(open_(ordinal), driver_version=version))(driver.open)
        ex = GpuExecutor(open_bundle(bundle), driver, max_context=64, max_num_batched_tokens=32, max_num_seqs=4)
        key_of = {f: k for k, f in ex.functions.items()}
        ex.forward(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32),
                   np.zeros((1, 4), np.int32), np.array([5], np.int32), np.array([0, 5], np.int32),
                   np.array([4], np.int32))
        ex.forward_tokens(step, np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3))
        ops = [op for op, _ in driver.log]
        assert ops.count("begin_capture") == 1
        launches = [(ex.program.binaries[key_of[a[0]]]["kernel"], a[-1]) for op, a in driver.log if op == "launch"]
        assert {k for k, _ in launches} > {"linear_kernel"}
        assert all(pdl == (expected and kernel == "linear_kernel") for kernel, pdl in launches), launches
        ex.close()


def test_multi_step_decode_is_one_graph_per_bucket(llama, monkeypatch):
    """forward_greedy over a recording driver: the inputs go up once, a graph of the decode step and
    advance_step is captured once per bucket and launched once per step, and every step's tokens
    come back in one copy; the last step's inputs are checked first, and a run is cut at MAX_RUN
    steps. The engine's multi-step decode runs through it."""
    import numpy as np

    from llmirc.artifact_format.reader import open_bundle
    from llmirc.errors import RuntimeLimitError
    from llmirc.runtime import gpu_drivers
    from llmirc.runtime.gpu_executor import MAX_RUN, GpuExecutor
    from llmirc.runtime.model import load
    tmp, _, _ = llama
    driver = _recording_driver("cuda", "sm_90")
    ex = GpuExecutor(open_bundle(tmp / "m.llmir"), driver, max_context=256, max_num_batched_tokens=32, max_num_seqs=4)
    assert ex.supports_greedy_runs and ex.run_bucket == 4
    bs, nb = ex.block_size, -(-(6 + MAX_RUN) // ex.block_size)
    tables = np.arange(3 * nb, dtype=np.int32).reshape(3, nb)
    step = (np.array([1, 2, 3], np.int32), np.array([5, 5, 5], np.int32), tables[:, 0] * bs + 5, tables,
            np.array([6, 6, 6], np.int32), np.arange(4, dtype=np.int32), np.arange(3, dtype=np.int32))
    key_of = {f: k for k, f in ex.functions.items()}
    for steps in (5, 3):
        driver.log.clear()
        tokens = ex.forward_greedy(step, steps)
        assert tokens.shape == (steps, 3) and tokens.dtype == np.int32 and not tokens.any()
        ops = [op for op, _ in driver.log]
        assert ops.count("graph_launch") == steps and ops.count("begin_capture") == (steps == 5)
        assert ops.count("dtoh_async") == 1 and ops[-2:] == ["dtoh_async", "synchronize"]
        assert "htod_async" not in ops[ops.index("graph_launch"):]
        if steps == 5:  # the captured step ends with advance_step
            last = [args for op, args in driver.log if op == "launch"][-1]
            assert ex.program.binaries[key_of[last[0]]]["kernel"] == "advance_step_kernel"
    assert list(ex.graphs) == [("run", 4)]
    with pytest.raises(RuntimeLimitError, match="block"):  # the last step's positions need blocks the tables lack
        ex.forward_greedy((*step[:3], tables[:, :1], *step[4:]), bs)
    with pytest.raises(LlmircError, match="needs a KV slot"):  # (a run would keep such a row as padding)
        ex.forward_greedy((*step[:2], np.array([5, -1, 5], np.int32), *step[3:]), 2)
    assert len(ex.forward_greedy(step, 10 * MAX_RUN)) == MAX_RUN
    ex.close()

    driver = _recording_driver("cuda", "sm_90")
    monkeypatch.setitem(gpu_drivers.DRIVERS, "cuda", lambda: driver)
    with load(tmp / "m.llmir", target="cuda", max_num_seqs=4) as model:
        assert model.generate([[1, 2, 3]] * 2, max_new_tokens=12, ignore_eos=True) == [[0] * 12] * 2
        assert ("run", 2) in model.executor.graphs and [op for op, _ in driver.log].count("graph_launch") == 11


def test_bench_of_a_gpu_target_holds_it_against_the_device(llama, monkeypatch):
    """`llmirc bench`'s run on a cuda target (a recording driver: the host side only): the floor is
    the device's copy bandwidth (11 device-to-device copies, after the model is closed), no numpy
    sgemm roof, and the table names the device instead of threads."""
    from llmirc.runtime import gpu_drivers
    from llmirc.runtime.bench import format_table, run_bench
    tmp, _, _ = llama
    drivers = []
    monkeypatch.setitem(gpu_drivers.DRIVERS, "cuda", lambda: drivers.append(_recording_driver("cuda", "sm_90")) or
                        drivers[-1])
    r = run_bench(tmp / "m.llmir", prompt_len=8, new_tokens=16, repeat=2, target="cuda")
    log, allocated = drivers[-1].log, drivers[-1].allocated  # the model's driver probes once it is closed
    assert r["device"] == "recording" and r["target"] == "cuda-sm_90" and r["sgemm_gflop_s"] is None
    ops = [op for op, _ in log]
    assert ops.count("dtod_async") == 11 and sorted(a[0] for op, a in log if op == "free") == allocated
    freed_first = {a[0] for op, a in log[:ops.index("dtod_async")] if op == "free"}
    assert freed_first == set(allocated[:-2])  # the model's memory went first; the probe's two buffers after
    table = format_table(r)
    assert "target cuda-sm_90 (recording)" in table and "the device's copies, bytes read + written" in table
    assert "thread" not in table and "sgemm" not in table
    with pytest.raises(LlmircError, match=r"^--compare-transformers times transformers on the CPU, and the bundle ran "
                       r"on recording \(target cuda-sm_90\): give --target cpu"):
        run_bench(tmp / "m.llmir", prompt_len=8, new_tokens=16, repeat=1, target="cuda", hf_dir=tmp / "ckpt")


@pytest.fixture
def gpu_load():
    """`load` on a GPU host (skips elsewhere); the models are closed after the test: each holds its
    weights and a KV cache of most of the free device memory (gpu_memory_utilization) until then."""
    from llmirc.runtime.model import load
    why = _why_not("cuda")
    if why:
        pytest.skip(why)
    models = []

    def open_model(path, **kw):
        models.append(load(path, **kw))
        assert models[-1].executor.kind == "cuda" and models[-1].target_notes == []
        return models[-1]
    yield open_model
    for m in models:
        m.close()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["int8", "int4-g64-zero-points-all", "int4-down-proj-int8", "int4-rotated"])
def test_gpu_quantized_matches_transformers(tmp_path, cache, gpu_load, case):
    """On a GPU: a quantized bundle's cuda target against transformers in float64 with the bundle's
    weights dequantized and the inputs of its quantized linears rounded to bfloat16 (the GPU
    contract, targets/signatures.py): the tolerances of test_quant_models.py's exact reference."""
    from test_quant_models import OVERRIDES, TOKENS, case_of, emulated, pass_of, rel_rms

    options, head, embedding, int8, rotated = case_of(case)
    options = {k: v for k, v in options.items() if k != "cpu_variants"}
    model = make_checkpoint(tmp_path / "ckpt", "llama", **OVERRIDES)
    _compile(tmp_path / "ckpt", tmp_path / "m.llmir", targets=("cuda",), **options)
    compiled = gpu_load(tmp_path / "m.llmir")
    ref = emulated(model, pass_of(options).scheme, head, embedding, TOKENS, block=None, int8=int8, rotated=rotated)
    got = compiled.score(TOKENS)
    assert rel_rms(got, ref) < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, rel_rms(got, ref)
    out = compiled.generate([TOKENS[:12]], max_new_tokens=6, ignore_eos=True)[0]  # the decode (GEMV) variant
    assert out == [int(t) for t in compiled.score(TOKENS[:12] + out[:-1])[11:].argmax(-1)]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_gpu_quantized_kv_cache(tmp_path, cache, gpu_load, kv_dtype):
    """On a GPU: an int8 or FP8 KV cache (test_quant_models.py's test_int8_kv_cache on the cuda
    target): logits against transformers, prefill in chunks, decode against scoring the same
    sequence."""
    import numpy as np
    from test_quant_models import OVERRIDES, TOKENS, rel_rms

    from helpers import hf_logits
    model = make_checkpoint(tmp_path / "ckpt", "llama", **OVERRIDES)
    _compile(tmp_path / "ckpt", tmp_path / "m.llmir", targets=("cuda",), kv_cache_dtype=kv_dtype,
             archs=("sm_90",) if kv_dtype == "fp8" else ())
    compiled = gpu_load(tmp_path / "m.llmir", max_num_batched_tokens=13, max_num_seqs=2)
    assert compiled.bundle.manifest["kv_cache"]["dtype"] == {"int8": "int8", "fp8": "float8_e4m3fn"}[kv_dtype]
    seq = TOKENS + TOKENS[::-1]
    got = compiled.score(seq)
    ref = hf_logits(model, seq)
    # K and V rounded per block in transformers (hooks on k_proj/v_proj) gave 0.0085 (int8) and 0.029 (FP8: 3
    # mantissa bits), top-1 1.0 and 0.95
    tol = {"int8": 0.02, "fp8": 0.05}[kv_dtype]
    assert rel_rms(got, ref) < tol and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, rel_rms(got, ref)
    prompts = [TOKENS[:5], TOKENS[:23]]
    for prompt, out in zip(prompts, compiled.generate(prompts, max_new_tokens=20, ignore_eos=True)):
        step = compiled.score(prompt + out[:-1])
        assert np.mean(np.array(out) == step[len(prompt) - 1:].argmax(-1)) >= 0.9


@pytest.mark.gpu
def test_gpu_pdl_changes_no_result(tmp_path, cache, gpu_load):
    """On a GPU: a bundle compiled with programmatic dependent launch (CompileOptions.gpu_pdl) gives
    the default bundle's logits bit for bit (a prefill and decode steps, with split-K and the
    attention's merge, and multi-step decode in one graph) where the device has PDL."""
    import numpy as np

    make_checkpoint(tmp_path / "ckpt", "llama", dtype="bfloat16", intermediate_size=1024, max_position_embeddings=512)
    seq = [int(t) for t in np.random.default_rng(1).integers(0, 384, 300)]
    got = {}
    for pdl in (False, True):
        manifest, _ = _compile(tmp_path / "ckpt", tmp_path / f"{pdl}.llmir", targets=("cuda",), gpu_pdl=pdl)
        model = gpu_load(tmp_path / f"{pdl}.llmir")
        kernels = {b["kernel"] for t in manifest["targets"] if t["name"] == model.executor.target["name"]
                   for b in t["binaries"].values() if b["launch_pdl"]}
        assert kernels == ({"linear_kernel"} if pdl and int(model.executor.target["arch"][3:]) >= 90 else set())
        got[pdl] = (model.score(seq), model.generate([seq[:40], seq[:7]], 24, ignore_eos=True))
    assert np.array_equal(got[False][0], got[True][0]) and got[False][1] == got[True][1]


@pytest.mark.gpu
@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                        ("mistral", "bfloat16")])
def test_gpu_greedy_matches_transformers(tmp_path, cache, gpu_load, arch, dtype):
    """On a GPU: greedy tokens of the cuda target equal transformers' (near-ties excepted)."""
    from helpers import check_greedy, hf_greedy

    ref = make_checkpoint(tmp_path / "ckpt", arch, dtype=dtype)
    _compile(tmp_path / "ckpt", tmp_path / "m.llmir", targets=("cuda",))
    model = gpu_load(tmp_path / "m.llmir")
    prompt = [0, 17, 42, 99, 5]
    ours = model.generate([prompt], 16, ignore_eos=True)[0]
    check_greedy(ref, prompt, ours, hf_greedy(ref, prompt, 16), margin=1e-2 if dtype == "bfloat16" else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", pytest.param("mistral", marks=pytest.mark.xfail(
    reason="on an H200 (2026-12-04): top-1 0.9883 (253 of 256), max logit error 0.0086; transformers' bf16 "
           "0.9922, 0.0127 (llama 1.0 and qwen2 0.9922 pass)", strict=False))])
def test_gpu_bf16_logits_match_transformers(tmp_path, cache, gpu_load, arch):
    """On a GPU: a bf16 checkpoint's logits over 256 positions against transformers in float32 on the
    same (exactly widened) weights: logits within the CPU target's bound for a half-precision KV
    cache (test_models.py), and top-1 agreement at least its 99%, or at least that of transformers
    itself running the checkpoint in bf16 on this GPU (random models have near-ties; the GPU
    target rounds activations to bf16 at each linear besides: targets/signatures.py)."""
    import copy

    import numpy as np
    import torch
    from test_models import HALF_KV_LOGITS, HALF_KV_TOP1

    from helpers import hf_logits
    overrides = dict(sliding_window=8) if arch == "mistral" else {}
    ref_model = make_checkpoint(tmp_path / "ckpt", arch, dtype="bfloat16", **overrides)
    _compile(tmp_path / "ckpt", tmp_path / "m.llmir", targets=("cuda",))
    model = gpu_load(tmp_path / "m.llmir")
    assert model.bundle.manifest["kv_cache"]["dtype"] == "bfloat16"
    seq = [int(t) for t in np.random.default_rng(0).integers(0, 384, 256)]
    ref, got = hf_logits(ref_model, seq), model.score(seq)
    with torch.no_grad():
        theirs = copy.deepcopy(ref_model).to(torch.bfloat16).cuda()(torch.tensor([seq]).cuda()).logits[0]
    theirs = theirs.double().cpu().numpy()
    scale = np.abs(ref).max()
    ours_top1, ours_err = (ref.argmax(-1) == got.argmax(-1)).mean(), np.abs(got - ref).max() / scale
    hf_top1, hf_err = (ref.argmax(-1) == theirs.argmax(-1)).mean(), np.abs(theirs - ref).max() / scale
    print(f"{arch} bf16, 256 positions against transformers f32: llmirc cuda top-1 {ours_top1:.4f}, max logit "
          f"error {ours_err:.4f}; transformers bf16 on this GPU top-1 {hf_top1:.4f}, max logit error {hf_err:.4f}")
    assert ours_err <= HALF_KV_LOGITS and ours_top1 >= min(HALF_KV_TOP1, hf_top1), (ours_top1, ours_err, hf_top1)
