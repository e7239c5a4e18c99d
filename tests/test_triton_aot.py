"""Ahead-of-time compilation of every Triton kernel for sm_80, sm_90, gfx90a and gfx942 on this
CPU-only machine: binaries, every stage, launch metadata checked against the binaries, tensor-core
instructions in the prefill matmuls, the cache."""

from __future__ import annotations

import pytest

import llmirc.targets.triton.compile as compile_mod
from llmirc.cache import NO_HOME
from llmirc.targets.triton import linear
from llmirc.targets.triton.arch import ARCHS
from llmirc.targets.triton.compile import HIDDEN_PARAMS, STAGES, CompileError, compile_kernels, sass
from llmirc.targets.triton.kinds import BUILDERS, launch_rule
from llmirc.targets.triton.spec import kernel

# its module-scoped fixtures build once: the module runs on one xdist worker (pyproject.toml)
pytestmark = pytest.mark.xdist_group("triton-aot")

INV_FREQ = [1.0 / 10000 ** (2 * i / 64) for i in range(32)]
IQ4 = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]  # ggml's kvalues_iq4nl
CALLS = [  # one call of every kind, shapes of a small Llama (head_dim 64, GQA 4)
    ("embedding", {"dim": 256, "dtype": "bfloat16", "scale": 16.0}),  # (Gemma's scale: its multiply compiled)
    ("rms_norm", {"dim": 256, "eps": 1e-5}),
    ("add_rms_norm", {"dim": 256, "eps": 1e-5}),
    ("layer_norm", {"dim": 256, "eps": 1e-5}),
    ("add_layer_norm", {"dim": 256, "eps": 1e-5, "bias": False}),
    ("linear", {"n": 384, "k": 256, "w_dtype": "bfloat16", "bias": True, "residual": True}),  # ld_* aligned too
    ("rms_norm_linear", {"n": 384, "k": 256, "w_dtype": "bfloat16", "bias": True, "residual": True, "eps": 1e-5}),
    ("act_mul_linear", {"n": 384, "k": 256, "w_dtype": "bfloat16", "bias": True, "residual": True, "act": "silu"}),
    ("rope", {"num_heads": 4, "head_dim": 64, "inv_freq": INV_FREQ}),
    ("kv_append", {"num_layers": 2, "num_kv_heads": 1, "head_dim": 64, "block_size": 16, "kv_dtype": "bfloat16"}),
    ("kv_append", {"num_layers": 2, "num_kv_heads": 1, "head_dim": 64, "block_size": 16, "kv_dtype": "int8"}),
    ("rope_kv_append", {"num_heads": 4, "num_kv_heads": 1, "head_dim": 64, "inv_freq": INV_FREQ, "num_layers": 2,
                        "block_size": 16, "kv_dtype": "bfloat16"}),
    # (Gemma 2's soft-capped scores; the plain ones are compiled by the whole models of test_gpu_targets.py)
    ("paged_attention", {"num_heads": 4, "num_kv_heads": 1, "head_dim": 64, "block_size": 16, "scale": 0.125,
                         "kv_dtype": "bfloat16", "softcap": 50.0}),
    ("act_mul", {"dim": 512, "act": "silu"}),
    ("act", {"dim": 512, "act": "gelu"}),
    ("softcap", {"dim": 1000, "cap": 30.0}),
    ("gather_rows", {"dim": 256}),
    ("add", {"dim": 256}),
    ("hadamard", {"dim": 1536, "block": 128}),
    ("argmax", {"vocab": 1000}),
    ("sample", {"vocab": 1000}),
    ("advance_step", {"block_size": 16}),
    # quantized weights: int4 groups of 32 with mins (Q4_1-like); int8 per row, act-order, zero points
    ("qlinear", {"n": 384, "k": 256, "bits": 4, "group_size": 32, "zero": "min", "zero_dtype": "float16",
                 "bias": True, "residual": True}),
    ("qlinear", {"n": 384, "k": 256, "bits": 8, "group_size": 256, "scale_dtype": "float32", "zero": "int",
                 "act_order": True}),
    ("qembedding", {"dim": 256, "bits": 4, "group_size": 32, "scale_dtype": "bfloat16", "scale": 16.0}),
    # a value table (IQ4_XS: 4-bit codes looked up, f32 scales per 32)
    ("qlinear", {"n": 384, "k": 256, "bits": 4, "group_size": 32, "scale_dtype": "float32", "values": IQ4}),
    ("qembedding", {"dim": 256, "bits": 4, "group_size": 32, "scale_dtype": "float16", "values": IQ4}),
    # two-level scales (Q4_K: int8 sub-scales and sub-mins per 32 under float16 ones per 256; Q6_K's per 16)
    ("qlinear", {"n": 384, "k": 512, "bits": 4, "group_size": 32, "scale_dtype": "int8", "zero": "min",
                 "zero_dtype": "int8", "super_group": 256}),
    ("qembedding", {"dim": 256, "bits": 6, "group_size": 16, "scale_dtype": "int8", "super_group": 256}),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(kind, kernel function, arch): [Compiled]} for every kernel of CALLS on every arch."""
    pairs, owners = {}, {}
    for kind, params in CALLS:
        for arch in ARCHS.values():
            rule = launch_rule(kind, params, arch)
            if kind.endswith("linear"):  # as a plan whose leading dimensions are multiples of 16 asks
                rule = rule.with_aligned(a for a, _ in rule.all_args())
            for key, spec in rule.kernels().items():
                pairs[(key, arch.name)] = spec
                owners.setdefault((key, arch.name), kind)  # (a fused kind's linear kernels are linear's)
    cache = tmp_path_factory.mktemp("triton-cache")
    results = compile_kernels([(spec, arch) for (_, arch), spec in pairs.items()], cache_dir=cache, jobs=2)
    out = {}
    for ((key, arch), spec), res in zip(pairs.items(), results):
        out.setdefault((owners[(key, arch)], spec.name, arch), []).append(res)
    return out, cache, [(spec, arch) for (_, arch), spec in pairs.items()]


def test_every_kind_compiles_for_every_arch(compiled):
    out, _, _ = compiled
    for kind in BUILDERS:
        for arch in ARCHS:
            assert any(k == kind and a == arch for k, _, a in out), (kind, arch)
    for (kind, fn, arch), results in out.items():
        backend = ARCHS[arch].backend
        for r in results:
            assert r.binary[:4] == b"\x7fELF", (kind, fn, arch)  # cubin and hsaco are ELF files
            assert set(r.asm) == set(STAGES[backend][:-1]) and all(r.asm.values())
            md = r.metadata
            assert md["params"][-2:] == [list(p) for p in HIDDEN_PARAMS]
            assert md["global_scratch_size"] == 0 and md["profile_scratch_size"] == 0
            assert 0 <= md["shared"] <= ARCHS[arch].max_shared
            assert md["symbol"] == fn and md["num_warps"] >= 1 and md["warp_size"] == ARCHS[arch].warp_size
            if backend == "cuda":  # sm_90 cubins are sm_90a (wgmma), from the CUDA 13 ptxas; sm_80 PTX is portable
                assert (md["ptx_target"], md["ptx_isa"] >= "8.") == ({"sm_80": "sm_80", "sm_90": "sm_90a"}[arch], True)


def _prefill_linear(out, arch):
    """The T > 128 variant (no split-K, 128-row tiles) of the linear call."""
    return [r for r in out[("linear", "linear_kernel", arch)] if r.metadata["constexprs"]["BLOCK_M"] == 128][0]


def test_tensor_core_instructions_and_wide_loads(compiled):
    out, _, _ = compiled
    hopper = sass(_prefill_linear(out, "sm_90").binary)
    assert "HGMMA.64x256x16.F32.BF16" in hopper  # Hopper warpgroup MMA, 256-wide tiles
    # with 16-divisible leading dimensions every tile copy is a 16-byte cp.async (no 4-byte ones); the
    # 128 x 256 tile's f32 stores are 4-byte ones (128 x 128 tiles stored 16 bytes: slower all the same)
    assert "LDGSTS.E.BYPASS.128" in hopper and "LDGSTS.E " not in hopper
    assert "HMMA.16816.F32.BF16" in sass(_prefill_linear(out, "sm_80").binary)   # Ampere mma.sync
    for arch in ("gfx90a", "gfx942"):
        assert "v_mfma" in _prefill_linear(out, arch).asm["amdgcn"]
    # the decode-shaped (16-row) variant uses mma.sync on Hopper as well
    decode = [r for r in out[("linear", "linear_kernel", "sm_90")] if r.metadata["constexprs"]["BLOCK_M"] == 16][0]
    assert "HMMA" in sass(decode.binary)
    for kind in ("rms_norm_linear", "act_mul_linear"):  # a prologue fused into a one-token GEMV's loads
        (fused,) = out[(kind, f"{kind}_kernel", "sm_90")]
        assert "HMMA" not in sass(fused.binary) and "LDG.E.128" in sass(fused.binary)
    # the fused activation in f32 (every program recomputes it), the act_mul kernel's in f64
    (fused,) = out[("act_mul_linear", "act_mul_linear_kernel", "sm_90")]
    (alone,) = out[("act_mul", "act_mul_kernel", "sm_90")]
    assert "DFMA" not in sass(fused.binary) and "DFMA" in sass(alone.binary)


def test_quantized_linears_use_tensor_cores(compiled):
    """qlinear's tiled variants run their bf16 products on the tensor cores (HGMMA on sm_90 from
    64 rows, mma.sync for 16; HMMA on sm_80; MFMA on gfx9); the GEMV variant (T <= 4) on FMAs."""
    out, _, _ = compiled
    for arch in ARCHS:
        dots = out[("qlinear", "qlinear_dot", arch)]
        gemv = out[("qlinear", "qlinear_gemv", arch)]
        assert len(dots) == 12 and len(gemv) == 4  # four calls: three tile sizes each
        for r in dots:
            bm = r.metadata["constexprs"]["BLOCK_M"]
            if arch == "sm_90":
                assert ("HGMMA." if bm >= 64 else "HMMA.") in sass(r.binary), bm
            elif arch == "sm_80":
                assert "HMMA.16816.F32.BF16" in sass(r.binary)
            else:
                assert "v_mfma" in r.asm["amdgcn"]
        for r in gemv:
            text = sass(r.binary) if ARCHS[arch].backend == "cuda" else r.asm["amdgcn"]
            assert "HMMA." not in text and "HGMMA." not in text and "v_mfma" not in text


def test_fp8_kv_cache_kernels_on_hopper(compiled):
    """An FP8 KV pool on sm_90: kv_append converts with the hardware's saturating E4M3 pack, and
    prefill attention widens the codes and runs its products on HGMMA."""
    _, cache, _ = compiled
    params = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 64, "block_size": 16, "kv_dtype": "float8_e4m3fn"}
    specs = [spec for kind, extra in (("kv_append", {}), ("paged_attention", {"num_heads": 4, "scale": 0.125}))
             for spec in launch_rule(kind, params | extra, ARCHS["sm_90"]).kernels().values()]
    results = compile_kernels([(spec, "sm_90") for spec in specs], cache_dir=cache, jobs=2)
    out = {r.metadata["symbol"]: sass(r.binary) for r in results}
    assert "F2FP.SATFINITE.E4M3.F32" in out["kv_append_quantized_kernel"]
    assert "E4M3.UNPACK" in out["paged_attention_prefill_kernel"] and "HGMMA." in out["paged_attention_prefill_kernel"]


def test_quantized_kv_append_divides_as_the_cpu(compiled):
    """The block scale and the factors derived from it are correctly rounded divisions (div.rn, as
    the CPU's fdiv and the interpreter compute them), not Triton's default div.full / approx."""
    out, _, _ = compiled
    for arch in ("sm_80", "sm_90"):
        ptx = out[("kv_append", "kv_append_quantized_kernel", arch)][0].asm["ptx"]
        assert ptx.count("div.rn.f32") >= 3 and "div.full" not in ptx and "div.approx" not in ptx, arch


def test_cache_hits_and_stage_times(compiled):
    _, cache, pairs = compiled
    again = compile_kernels(pairs[:1], cache_dir=cache, jobs=1)[0]
    assert again.cached and again.binary
    fresh = [r for rs in compiled[0].values() for r in rs if not r.cached]
    assert fresh and all(set(r.times) >= {"ttir", "ttgir", "llir"} for r in fresh)


def test_a_cache_that_cannot_be_written_costs_only_the_compilation(tmp_path, monkeypatch):
    """As the CPU objects' cache: a kernel cache folder that cannot be made (a file in its place, a
    read-only home) or written is said once, and the kernels compile (Triton's own cache, kept inside
    it, failed each of them: "does not compile for sm_90: Not a directory", or "No space left on
    device" when the disk was full)."""
    (tmp_path / "file").write_text("x")
    spec = next(iter(launch_rule("add", {"dim": 256}, ARCHS["sm_90"]).kernels().values()))
    said = []
    out = compile_kernels([(spec, "sm_90")], cache_dir=tmp_path / "file" / "triton", jobs=1, warn=said.append)[0]
    assert out.binary and not out.cached
    assert said == [f"the kernel cache {tmp_path / 'file' / 'triton'} cannot be written (Not a directory): nothing "
                    "compiled now is kept"]
    # A cache whose entries cannot be stored (a full disk; here a file where the arch's folder goes):
    # said once, and the kernels compile (the error went out of the worker: an internal error).
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sm_90").write_text("x")
    said.clear()
    out = compile_kernels([(spec, "sm_90")], cache_dir=tmp_path / "cache", jobs=1, warn=said.append)[0]
    assert out.binary and said == [f"the kernel cache {tmp_path / 'cache'} cannot be written (File exists): some "
                                   "kernels compiled now are not kept"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sm_90"]  # (Triton's own cache is not here)

    # No home folder to keep a cache in (llmirc.cache.cache_dir None): said, and the kernels compile.
    said.clear()
    monkeypatch.setattr(compile_mod, "default_cache_dir", lambda: None)
    out = compile_kernels([(spec, "sm_90")], jobs=1, warn=said.append)[0]
    assert out.binary and not out.cached and said == [NO_HOME]

def test_a_damaged_cache_entry_is_compiled_again(tmp_path):
    """A cache entry with a truncated binary was shipped in the bundle as it was (a cubin that only a
    GPU would refuse), and one with metadata.json unreadable or a file missing was an internal error;
    each is compiled again and stored anew, as the CPU objects' cache does."""
    spec = next(iter(launch_rule("add", {"dim": 256}, ARCHS["sm_90"]).kernels().values()))
    cache = tmp_path / "cache"
    good = compile_kernels([(spec, "sm_90")], cache_dir=cache, jobs=1)[0]
    (entry,) = (cache / "sm_90").iterdir()
    for damage in (lambda: (entry / "kernel.cubin").write_bytes(good.binary[:100]),
                   lambda: (entry / "kernel.ptx").unlink(),
                   lambda: (entry / "metadata.json").write_text("{"),
                   lambda: (entry / "metadata.json").write_text("[]")):
        damage()
        again = compile_kernels([(spec, "sm_90")], cache_dir=cache, jobs=1)[0]
        assert not again.cached and again.binary == good.binary and again.asm == good.asm
        hit = compile_kernels([(spec, "sm_90")], cache_dir=cache, jobs=1)[0]  # stored anew
        assert hit.cached and hit.binary == good.binary and hit.metadata == good.metadata


def test_shared_memory_over_the_limit_is_a_clear_error(tmp_path):
    args = next(iter(launch_rule("linear", {"n": 8, "k": 8, "w_dtype": "bfloat16"}, ARCHS["gfx942"])
                     .kernels().values())).args
    spec = kernel(linear.linear_kernel, {
        "N": 512, "K": 512, "HAS_BIAS": False, "HAS_RESIDUAL": False, "BLOCK_M": 256, "BLOCK_N": 256,
        "BLOCK_K": 128, "SPLIT_K": 1, "K_SPLIT": 512, "GROUP_M": 8, "MAX_TILES": 0, "RELEASE_ALL": True,
        "THREADS": 512, "PDL": "", "PREFETCH": 0}, args, num_warps=8, num_stages=2)
    with pytest.raises(CompileError, match=r"linear_kernel needs \d+ bytes of shared memory; gfx942"):
        compile_kernels([(spec, "gfx942")], cache_dir=tmp_path, jobs=1)


def test_unknown_arch():
    from llmirc.errors import LlmircError
    with pytest.raises(LlmircError, match="unknown GPU architecture 'sm_75'"):
        compile_kernels([(None, "sm_75")])

