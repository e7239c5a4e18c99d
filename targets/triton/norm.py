"""RMSNorm and LayerNorm, alone (semantics: targets/signatures.py) and fused with the residual add.

One program per row (grid (T, 1, 1)); the row is read in chunks of BLOCK = min(next_pow2(dim),
4096) columns: one pass for the statistics (two for LayerNorm's mean and variance, which is
two-pass as on the CPU), one to write. Reductions are f32 tree sums; 1/sqrt is sqrt_rn and an
f32 division.

GPU-only fused kinds (vLLM's fused_add_rms_norm), the residual stream `h` updated in place:

add_rms_norm {dim, eps}
    (out, ld_out, h, ld_h, x, ld_x, w, T):  h[t,:] = h[t,:] + x[t,:];  out[t,:] = rms_norm(h[t,:]) * w
add_layer_norm {dim, eps, bias}
    (out, ld_out, h, ld_h, x, ld_x, w, b, T):  h[t,:] += x[t,:];  out[t,:] = layer_norm(h[t,:])
out may equal x (not h).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import pdl_mode, pdl_trigger
from .spec import Launch, Rule, Variant, kernel, next_pow2


@triton.jit
def _load_row(src, ld_src, x, ld_x, t, c, m, ADD: tl.constexpr):
    """Columns c of row t of src (0 where not m); with ADD, src's row += x's first (and stored)."""
    v = tl.load(src + t * ld_src + c, mask=m, other=0.0)
    if ADD:
        v += tl.load(x + t * ld_x + c, mask=m, other=0.0)
        tl.store(src + t * ld_src + c, v, mask=m)
    return v


@triton.jit
def rms_scale(src, ld_src, x, ld_x, t, DIM: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
               ADD: tl.constexpr):
    """1/sqrt(mean(row^2) + eps) of row t of src (after src += x when ADD)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, DIM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DIM
        v = _load_row(src, ld_src, x, ld_x, t, c, m, ADD)
        acc += v * v
    return 1.0 / tl.sqrt_rn(tl.sum(acc) / DIM + EPS)


@triton.jit
def _rms_write(out, ld_out, src, ld_src, w, t, r, DIM: tl.constexpr, BLOCK: tl.constexpr):
    for c0 in range(0, DIM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DIM
        v = tl.load(src + t * ld_src + c, mask=m)
        tl.store(out + t * ld_out + c, (v * r) * tl.load(w + c, mask=m), mask=m)


@triton.jit
def rms_norm_kernel(out, ld_out, x, ld_x, w, T, DIM: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    """Row t = program_id(0), its head program_id(1) (the grid's heads: DIM columns each)."""
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    x += h * DIM
    out += h * DIM
    r = rms_scale(x, ld_x, x, ld_x, t, DIM, EPS, BLOCK, False)
    _rms_write(out, ld_out, x, ld_x, w, t, r, DIM, BLOCK)


@triton.jit
def rms_norm_into_kernel(x, ld_x, src, ld_src, norm_w, T, DIM: tl.constexpr, EPS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """rms_norm_kernel under rms_norm_linear's argument names: x = rms_norm(src) * norm_w."""
    t = tl.program_id(0).to(tl.int64)
    r = rms_scale(src, ld_src, src, ld_src, t, DIM, EPS, BLOCK, False)
    _rms_write(x, ld_x, src, ld_src, norm_w, t, r, DIM, BLOCK)


@triton.jit
def add_rms_norm_kernel(out, ld_out, h, ld_h, x, ld_x, w, T, DIM: tl.constexpr, EPS: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    t = tl.program_id(0).to(tl.int64)
    r = rms_scale(h, ld_h, x, ld_x, t, DIM, EPS, BLOCK, True)
    _rms_write(out, ld_out, h, ld_h, w, t, r, DIM, BLOCK)


@triton.jit
def _layer_norm_row(out, ld_out, src, ld_src, x, ld_x, w, b, t, DIM: tl.constexpr, EPS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, DIM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DIM
        acc += _load_row(src, ld_src, x, ld_x, t, c, m, ADD)
    mu = tl.sum(acc) / DIM
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, DIM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DIM
        d = tl.where(m, tl.load(src + t * ld_src + c, mask=m, other=0.0) - mu, 0.0)
        acc += d * d
    r = 1.0 / tl.sqrt_rn(tl.sum(acc) / DIM + EPS)
    for c0 in range(0, DIM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DIM
        y = (tl.load(src + t * ld_src + c, mask=m) - mu) * r * tl.load(w + c, mask=m)
        if HAS_BIAS:
            y += tl.load(b + c, mask=m)
        tl.store(out + t * ld_out + c, y, mask=m)


@triton.jit
def layer_norm_kernel(out, ld_out, x, ld_x, w, b, T, DIM: tl.constexpr, EPS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    _layer_norm_row(out, ld_out, x, ld_x, x, ld_x, w, b, tl.program_id(0).to(tl.int64), DIM, EPS, HAS_BIAS,
                    BLOCK, False)


@triton.jit
def add_layer_norm_kernel(out, ld_out, h, ld_h, x, ld_x, w, b, T, DIM: tl.constexpr, EPS: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    _layer_norm_row(out, ld_out, h, ld_h, x, ld_x, w, b, tl.program_id(0).to(tl.int64), DIM, EPS, HAS_BIAS,
                    BLOCK, True)


def _norm_rule(kind, params, fn, args, constexprs, heads: int = 1) -> Rule:
    dim = params["dim"]
    block = min(next_pow2(dim), 4096)
    spec = kernel(fn, {"DIM": dim, "EPS": float(params["eps"]), "BLOCK": block, **constexprs}, args,
                  num_warps=max(1, min(8, block // 256)))
    return Rule(kind, params, args, [Variant(1, (Launch(spec, ("T", heads, 1)),))])


def rms_norm_into_launch(dim: int, eps: float, types: dict) -> Launch:
    """rms_norm_linear's prologue launched alone (T > 1): x = rms_norm(src) * norm_w, a row a program."""
    rule = _norm_rule("rms_norm", {"dim": dim, "eps": eps}, rms_norm_into_kernel,
                      tuple((a, types[a]) for a in ("x", "ld_x", "src", "ld_src", "norm_w", "T")), {})
    return rule.variants[0].launches[0]


def rule_rms_norm(params, arch, args) -> Rule:
    return _norm_rule("rms_norm", params, rms_norm_kernel, args, {"PDL": pdl_mode(arch)}, int(params["heads"]))


def rule_add_rms_norm(params, arch, args) -> Rule:
    return _norm_rule("add_rms_norm", params, add_rms_norm_kernel, args, {"PDL": pdl_mode(arch)})


def rule_layer_norm(params, arch, args) -> Rule:
    return _norm_rule("layer_norm", params, layer_norm_kernel, args,
                      {"HAS_BIAS": bool(params["bias"]), "PDL": pdl_mode(arch)})


def rule_add_layer_norm(params, arch, args) -> Rule:
    return _norm_rule("add_layer_norm", params, add_layer_norm_kernel, args,
                      {"HAS_BIAS": bool(params["bias"]), "PDL": pdl_mode(arch)})
