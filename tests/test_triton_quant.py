"""The GPU quantized kernels (qlinear, qembedding: targets/triton/quant.py) on Triton's interpreter
against float64: the weight dequantized by llmirc.quant.dequantize (fresh random codes, scales,
zeros, perm in the super-block layout), the activations rounded to bfloat16 as the GPU contract
says (targets/signatures.py), for every format the CPU kernels test (8/4-bit, zero none/int/min,
groups 16..256 and per-row, f16/bf16/f32 scales, two-level int8/f16 scales, act-order, value tables) and every
variant of the launch rule
(T <= 4: GEMV; <= 16, <= 128, > 128: tl.dot tiles)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import triton_interpreter  # noqa: F401  (bf16 fixes to Triton's interpreter)

from helpers import buf, check_guard, ld
from llmirc import quant
from llmirc.targets.triton.arch import ARCHS
from llmirc.targets.triton.kinds import launch_rule
from llmirc.targets.triton.run import allocate_buffers, run
from test_quant_kernels import SCHEMES, quantized_weight

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# k per scheme: a full super-block and a tail of lanes (576 = 18 x 32, 288 = 18 x 16), or groups that fit
K = {"i8_g16_f32": 288, "i4_g16_min_f32": 288, "i4_g128_int": 640, "i8_g256_min": 768,
     "i4_g32_min_2l": 1280, "i5_g32_min_2l": 1280, "i6_g16_2l": 768, "i4_g32_tbl_2l": 1280}  # (two levels: of 256)
T_ALL = [0, 1, 4, 9, 40, 150, 40, 1, 9]  # no rows; GEMV (<= 4); tiles of 16, 64 and 128 rows; the split ones
# again (a rule's variants share one split-K workspace, as in the loader)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def bf16(a: np.ndarray) -> np.ndarray:
    """a rounded to bfloat16 (nearest even), as float64."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).double().numpy()


def tensors(**args):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def qlinear_params(scheme, n, k, bias=False, residual=False):
    return {"n": n, "k": k, "bits": scheme.bits, "group_size": scheme.group_size, "scale_dtype": scheme.scale_dtype,
            "zero": scheme.zero, "zero_dtype": scheme.zero_dtype, "act_order": scheme.act_order,
            "values": scheme.values, "super_group": scheme.super_group, "bias": bias, "residual": residual}


def qargs(parts, scheme):
    """The kernels' weight arguments (bfloat16 parts, stored as uint16 bits, as torch bfloat16)."""
    def half(a):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if scheme.scale_dtype == "bfloat16" else a
    out = {"codes": parts["codes"], "scales": half(parts["scales"]), "zeros": np.zeros(1, np.uint8),
           "perm": parts.get("perm", np.zeros(1, np.int32))}
    for p in ("super_scales", "super_mins"):
        out[p] = parts.get(p, np.zeros(1, np.float16))
    if "zeros" in parts:
        out["zeros"] = half(parts["zeros"]) if scheme.zero == "min" else parts["zeros"]
    return out


def call_qlinear(rule, scheme, parts, ob, xb, T, bias=None, workspace=None):
    """out = ob (a [rows, ld] buffer), x = xb; with bias, ob is the residual too (in place). The
    CPU's activation scratch `xq` is one byte: the GPU kernels do not touch it. `workspace`: the
    rule's buffers (allocate_buffers), shared between calls; by default fresh ones."""
    unused = np.zeros(1, np.float32)
    run(rule, tensors(out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), **qargs(parts, scheme),
                      bias=unused if bias is None else bias, residual=unused if bias is None else ob,
                      ld_res=0 if bias is None else ld(ob), xq=np.zeros(1, np.int8), T=T) | (workspace or {}))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_qlinear(rng, name):
    """Every T range; the first formats with bias and residual, in place (out is the residual)."""
    n, k = 20, K.get(name, 576)
    scheme = SCHEMES[name](k)
    parts, _ = quantized_weight(rng, scheme, n, k)
    w = quant.dequantize(parts, scheme, k)  # float64, input columns in their original order
    fused = name in ("i8_row", "i4_g32_min", "i4_g64_act", "i8_g16_f32")
    rule = launch_rule("qlinear", qlinear_params(scheme, n, k, fused, fused), ARCHS["sm_90"])
    bias = rng.standard_normal(n).astype(np.float32)
    workspace = allocate_buffers(rule, {"T": 256}, "cpu")
    for T in T_ALL:
        xb, x = buf(rng, T, k, pad=5)
        x[:, : k // 7] *= 8  # columns of different magnitudes
        if fused:
            ob, out = buf(rng, T, n, pad=2)
            res0 = out.copy()
        else:
            ob, out = buf(rng, T, n, fill=np.nan)
        call_qlinear(rule, scheme, parts, ob, xb, T, bias if fused else None, workspace)
        xr = bf16(x)
        ref, scale = xr @ w.T, np.abs(xr) @ np.abs(w).T
        if fused:
            ref, scale = ref + bias + res0, scale + np.abs(bias) + np.abs(res0)
        else:
            check_guard(ob, T, n)
        assert np.all(np.abs(out - ref) <= 2e-6 * scale + 1e-30), (name, T, np.abs(out - ref).max())


def test_qlinear_hip_rule_and_guards(rng):
    """A gfx942 rule (its own stages) computes the same; rows past T and columns past n stay
    untouched in every variant."""
    n, k = 45, 640
    scheme = SCHEMES["i4_g128_int"](k)
    parts, _ = quantized_weight(rng, scheme, n, k)
    w = quant.dequantize(parts, scheme, k)
    rule = launch_rule("qlinear", qlinear_params(scheme, n, k), ARCHS["gfx942"])
    for T in (3, 17):
        xb, x = buf(rng, T, k)
        ob, out = buf(rng, T, n, pad=7, fill=np.nan)
        call_qlinear(rule, scheme, parts, ob, xb, T)
        np.testing.assert_allclose(out, bf16(x) @ w.T, rtol=1e-5, atol=1e-5)
        check_guard(ob, T, n)


def test_quantized_then_qlinear_is_near_the_float_product(rng):
    """quant.quantize's round to nearest through the GPU kernel: close to the float weight."""
    n, k, T = 24, 512, 2
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    x = rng.standard_normal((T, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for name, tol in (("i8_row", 0.01), ("i4_g32_min", 0.15)):
        scheme = SCHEMES[name](k)
        out = np.full((T, n), np.nan, np.float32)
        call_qlinear(launch_rule("qlinear", qlinear_params(scheme, n, k), ARCHS["sm_80"]), scheme,
                     quant.quantize(w, scheme), out, x, T)
        assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < tol, name


QE = {"i8_g32": 576, "i4_g32_min": 576, "i4_g128_int": 640, "i8_g16_f32": 80, "i8_row": 96, "i8_g32_int_bf16": 64,
      "i5_g32": 576, "i5_g32_min_f32": 96, "i6_g16_f32": 80, "i6_g64_int": 576,  # 5/6 bits: the high plane, tails
      "i4_g32_tbl": 576, "i4_g32_tbl_f32": 96,  # value tables (IQ4)
      "i4_g32_min_2l": 768, "i6_g16_2l": 256, "i4_g32_tbl_2l": 512}  # two-level scales


@pytest.mark.parametrize("name", list(QE))
def test_qembedding(rng, name):
    dim, vocab = QE[name], 30
    scheme = SCHEMES[name](dim)
    parts, _ = quantized_weight(rng, scheme, vocab, dim)
    table = quant.dequantize(parts, scheme, dim)
    params = {"dim": dim, "bits": scheme.bits, "group_size": scheme.group_size, "scale_dtype": scheme.scale_dtype,
              "zero": scheme.zero, "zero_dtype": scheme.zero_dtype, "values": scheme.values,
              "super_group": scheme.super_group}
    rule = launch_rule("qembedding", params, ARCHS["sm_90"])
    for T in (0, 1, 7):
        ids = rng.integers(0, vocab, max(T, 1)).astype(np.int32)
        ob, out = buf(rng, T, dim, fill=np.nan)
        a = qargs(parts, scheme)
        del a["perm"]
        run(rule, tensors(out=ob, ld_out=ld(ob), **a, ids=ids, T=T))
        # one rounding of the exact value (s (u - c): exact in f64); min's fma too, but its f64 value may be rounded
        np.testing.assert_allclose(out, table[ids[:T]].astype(np.float32), rtol=1.2e-7 if scheme.zero == "min" else 0,
                                   atol=0)
        check_guard(ob, T, dim)
    scale = np.float32(dim ** 0.5)  # Gemma's embedding scale: the row, then one float32 multiply
    run(launch_rule("qembedding", {**params, "scale": float(scale)}, ARCHS["sm_90"]),
        tensors(out=ob, ld_out=ld(ob), **a, ids=ids, T=T))
    np.testing.assert_allclose(out, table[ids[:T]].astype(np.float32) * scale, rtol=2.4e-7, atol=0)
