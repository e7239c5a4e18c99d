"""Row-wise kernels: embedding, gather_rows, add, act, act_mul, softcap, hadamard (semantics:
targets/signatures.py).

Each program handles one row and one column block of BLOCK = min(next_pow2(dim), 1024)
columns; grid (rows, cdiv(dim, BLOCK)); hadamard takes 64 rows at a time (its docstring).
Activations are computed as in the CPU kernels: silu and gelu_tanh are x * sigmoid(z) with z
and the exponential in f64, gelu is x * Phi(x) with erfc(|x|/sqrt2) = t exp(-z^2 + P(t)) in f64
(Numerical Recipes' erfcc, relative error ~1.2e-7), so every f32 input is within ~1e-6 relative
of float64, tails included; act(-inf) = 0, act(inf) = inf, NaN propagates.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmirc.targets.signatures import softcap_param

from .pdl import pdl_mode, pdl_trigger
from .spec import Launch, Rule, Variant, cdiv, kernel, next_pow2

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
HADAMARD_MIN, HADAMARD_MAX = 16, 128  # hadamard's blocks (tl.dot's least side; its [B, B] signs in registers)


@triton.jit
def _sigmoid_mul(x, z):
    """x * sigmoid(z) = x / (1 + exp(-z)) for f32 x and z of z's type (f64, or f32 in the fused
    prologues), without overflow or cancellation."""
    t = tl.exp(-tl.abs(z))
    xd = x.to(z.dtype)
    num = tl.where(z < 0, tl.where(t > 0, xd * t, 0.0), xd)
    return (num / (1.0 + t)).to(tl.float32)


@triton.jit
def _erfc_pos(z):
    """erfc(z) for f64 z >= 0 (Numerical Recipes erfcc), f64."""
    t = 1.0 / (1.0 + 0.5 * z)
    p = t * 0.17087277 - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    return t * tl.exp(p - z * z)


@triton.jit
def softcap(x, CAP: tl.constexpr):
    """CAP * tanh(x / CAP) of an f32 tensor, as the CPU kernels compute it (irbuilder.softcap): x / CAP as
    x * (1 / CAP); tanh(y) = y P(y^2) below 0.35 (Maclaurin, six terms), else sign(y) (1 - t) / (1 + t) with
    t = exp(-2|y|). Within ~5 ulp; NaN propagates, +-inf gives +-CAP."""
    y = x * (1.0 / CAP)
    a = tl.abs(y)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    u = y * y
    p = -1382.0 / 155925.0
    p = p * u + 62.0 / 2835.0
    p = p * u - 17.0 / 315.0
    p = p * u + 2.0 / 15.0
    p = p * u - 1.0 / 3.0
    p = p * u + 1.0
    return tl.where(a < 0.35, y * p, tl.where(y < 0, -big, big)) * CAP


@triton.jit
def softcap_kernel(out, ld_out, x, ld_x, T, DIM: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    v = tl.load(x + t * ld_x + c, mask=m).to(tl.float32)
    tl.store(out + t * ld_out + c, softcap(v, CAP), mask=m)


@triton.jit
def activation(x, ACT: tl.constexpr, WIDE: tl.constexpr = tl.float64):
    """silu, gelu, gelu_tanh or relu of an f32 tensor (see the module docstring), computed in
    WIDE: float64, or float32 where every program of a linear recomputes its input's activations
    (act_mul_linear: f64 exp and division there would cost more than the launch they save; f32
    is within ~1e-6 relative, and the result is rounded to the weights' half dtype anyway)."""
    if ACT == "silu":
        y = _sigmoid_mul(x, x.to(WIDE))
    elif ACT == "gelu_tanh":
        xd = x.to(WIDE)
        y = _sigmoid_mul(x, 1.5957691216057308 * (xd + 0.044715 * xd * xd * xd))  # 2 sqrt(2/pi)
    elif ACT == "gelu":
        xd = x.to(WIDE)
        half = 0.5 * _erfc_pos(tl.abs(xd) * 0.7071067811865476)
        phi = tl.where(xd < 0, half, 1.0 - half)
        y = tl.where(phi == 0, 0.0, xd * phi).to(tl.float32)
    else:
        tl.static_assert(ACT == "relu", "unknown activation")
        y = tl.where(x < 0, 0.0, x)
    return y


@triton.jit
def embedding_kernel(out, ld_out, table, ids, T, DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    row = tl.load(ids + t).to(tl.int64)
    v = tl.load(table + row * DIM + c, mask=m).to(tl.float32)
    if SCALE != 1.0:
        v = v * SCALE
    tl.store(out + t * ld_out + c, v, mask=m)


@triton.jit
def gather_rows_kernel(out, ld_out, x, ld_x, idx, L, DIM: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    src = tl.load(idx + r).to(tl.int64)
    tl.store(out + r * ld_out + c, tl.load(x + src * ld_x + c, mask=m), mask=m)


@triton.jit
def add_kernel(out, ld_out, a, ld_a, b, ld_b, T, DIM: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    s = tl.load(a + t * ld_a + c, mask=m) + tl.load(b + t * ld_b + c, mask=m)
    tl.store(out + t * ld_out + c, s, mask=m)


@triton.jit
def act_kernel(out, ld_out, x, ld_x, T, DIM: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
               PDL: tl.constexpr):
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    tl.store(out + t * ld_out + c, activation(tl.load(x + t * ld_x + c, mask=m), ACT), mask=m)


@triton.jit
def act_mul_kernel(out, ld_out, gate, ld_gate, up, ld_up, T, DIM: tl.constexpr, ACT: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < DIM
    g = tl.load(gate + t * ld_gate + c, mask=m)
    u = tl.load(up + t * ld_up + c, mask=m)
    tl.store(out + t * ld_out + c, activation(g, ACT) * u, mask=m)


@triton.jit
def act_mul_into_kernel(x, ld_x, gate, ld_gate, up, ld_up, T, DIM: tl.constexpr, ACT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """act_mul_kernel under act_mul_linear's argument names: x = act(gate) * up."""
    act_mul_kernel(x, ld_x, gate, ld_gate, up, ld_up, T, DIM, ACT, BLOCK, "")


@triton.jit
def hadamard_kernel(out, ld_out, x, ld_x, T, B: tl.constexpr, BT: tl.constexpr):
    """BT rows' blocks of B columns times the [B, B] signs (-1)^popcount(i & l) (symmetric) on the
    tensor cores, then times 1/sqrt(B). x is split into three bfloat16 parts (x = hi + mid + lo
    to 24 bits, as f32 holds), each product with the signs (exact in bfloat16) accumulated in
    f32, so the result is f32-accurate. Tried on sm_90 first: a reduction per row compiled to a
    warp shuffle per product (896 SHFL for B = 128); an f32 ("ieee") tl.dot spilled (about 1000
    local loads)."""
    r = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * B + tl.arange(0, B)
    m = (r < T)[:, None]
    v = tl.load(x + r[:, None] * ld_x + c[None, :], mask=m, other=0.0)
    i = tl.arange(0, B)
    p = i[:, None] & i[None, :]
    p = p ^ (p >> 4)  # parity of up to 8 bits (B <= 128)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    sign = tl.where((p & 1) == 0, 1.0, -1.0).to(tl.bfloat16)
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    y = tl.dot(lo, sign, tl.dot(mid, sign, tl.dot(hi, sign)))
    y = y * (1.0 / tl.sqrt(B * 1.0))
    tl.store(out + r[:, None] * ld_out + c[None, :], y, mask=m)


def rule_hadamard(params, arch, args) -> Rule:
    dim, block = params["dim"], params["block"]
    if not HADAMARD_MIN <= block <= HADAMARD_MAX or block & (block - 1) or dim % block:
        raise ValueError(f"hadamard: block {block} must be a power of two from {HADAMARD_MIN} to {HADAMARD_MAX} "
                         f"dividing dim {dim}")
    # 64 rows, 4 warps: on sm_90 (B = 128) no spills and HGMMA, 6k thread-instructions per row's block;
    # 32 rows spilled, 16 rows took 2.7x the instructions per row
    bt = 64
    spec = kernel(hadamard_kernel, {"B": block, "BT": bt}, args, num_warps=4)
    return Rule("hadamard", params, args, [Variant(1, (Launch(spec, (cdiv("T", bt), dim // block, 1)),))])


def _row_rule(kind, params, fn, args, rows, constexprs) -> Rule:
    dim = params["dim"]
    block = min(next_pow2(dim), 1024)
    spec = kernel(fn, {"DIM": dim, "BLOCK": block, **constexprs}, args, num_warps=max(1, min(4, block // 256)))
    grid = (rows, cdiv(dim, block), 1)
    return Rule(kind, params, args, [Variant(1, (Launch(spec, grid),))])


def rule_embedding(params, arch, args) -> Rule:
    return _row_rule("embedding", params, embedding_kernel, args, "T", {"SCALE": float(params["scale"])})


def rule_gather_rows(params, arch, args) -> Rule:
    return _row_rule("gather_rows", params, gather_rows_kernel, args, "L", {})


def rule_add(params, arch, args) -> Rule:
    return _row_rule("add", params, add_kernel, args, "T", {})


def _check_act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")


def rule_act(params, arch, args) -> Rule:
    _check_act(params["act"])
    return _row_rule("act", params, act_kernel, args, "T", {"ACT": params["act"], "PDL": pdl_mode(arch)})


def rule_softcap(params, arch, args) -> Rule:
    cap = softcap_param(params, "cap", "softcap")
    return _row_rule("softcap", params, softcap_kernel, args, "T", {"CAP": cap, "PDL": pdl_mode(arch)})


def act_mul_into_launch(dim: int, act: str, types: dict) -> Launch:
    """act_mul_linear's prologue launched alone (T > 1): x = act(gate) * up."""
    _check_act(act)
    rule = _row_rule("act_mul", {"dim": dim, "act": act}, act_mul_into_kernel,
                     tuple((a, types[a]) for a in ("x", "ld_x", "gate", "ld_gate", "up", "ld_up", "T")), "T",
                     {"ACT": act})
    return rule.variants[0].launches[0]


def rule_act_mul(params, arch, args) -> Rule:
    _check_act(params["act"])
    return _row_rule("act_mul", params, act_mul_kernel, args, "T", {"ACT": params["act"], "PDL": pdl_mode(arch)})
