"""CPU kernel generators: one LLVM IR function per (kind, static specialization).

`emit_kernel(module, kind, symbol, params, variant)` adds an external function `symbol` with
the C signature below to `module`. Static params (sizes, eps, flags, tables) are baked in as
constants; everything else is an argument.

Conventions (the contract the compiler's plan relies on):

* Matrices are row-major f32 with a leading dimension `ld_*` in elements (int64), so a kernel
  can read or write a column slice of a bigger buffer. Row r of `x` starts at `x + r*ld_x`.
* Counts are int64 (`T`, `L`, `B`, ...), indices are int32 (`const int32_t*`).
* Every function returns void, is a no-op for zero rows and is correct for any row count.
* Arithmetic is f32. Sums and dot products may be reassociated (vector accumulators), so
  results differ from a sequential f32 loop by rounding only.
* Kernels split rows (or (token, head) pairs) across libgomp threads when the call is large
  enough to pay for a fork/join (OMP_NUM_THREADS applies); small calls run serially.
* Unless stated, `out` must not overlap the inputs.

Kernels (`p.` = static param):

embedding {dim}
    void f(float *out, int64_t ld_out, const float *table, const int32_t *ids, int64_t T)
    out[t, 0:dim] = table[ids[t]*dim : ids[t]*dim + dim]          (table is [vocab, dim])

rms_norm {dim, eps}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, const float *w, int64_t T)
    r_t = 1 / sqrt(sum_i(x[t,i]^2) / dim + eps)
    out[t,i] = (x[t,i] * r_t) * w[i]                               (Hugging Face order)
    out may equal x (same pointer and ld).

layer_norm {dim, eps, bias: bool}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, const float *w,
           const float *b, int64_t T)
    mu = mean_i x[t,i];  var = mean_i (x[t,i] - mu)^2  (biased, two-pass)
    out[t,i] = (x[t,i] - mu) / sqrt(var + eps) * w[i] (+ b[i] if p.bias; b may be NULL otherwise)
    out may equal x.

linear {n, k, bias: bool, residual: bool}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, const float *w,
           const float *bias, const float *residual, int64_t ld_res, int64_t T)
    w is [n, k] row-major, contiguous (ld = k).
    out[t,j] = sum_i x[t,i] * w[j,i]  (+ bias[j] if p.bias)  (+ residual[t,j] if p.residual)
    for t < T, j < n. `out` may be the same pointer as `residual` (with ld_out == ld_res);
    out never aliases x or w. bias / residual are ignored (may be NULL) when the flag is off.
    Prefill (T >= 4 with AVX-512, T >= 2 otherwise): micro-kernels of 4 rows of w x 4 tokens
    (x 2 tokens on 16-register ISAs), one vector accumulator per (row, token); k in slices
    of <= 512 (partial sums accumulate in out) and tokens in slices whose x[:, k slice] fits
    in L2; within a slice, row blocks are split across threads and token blocks run inner,
    so the w block stays in L1. Decode (fewer tokens): 8 (4) rows of w per micro-kernel,
    each w row read once for all T tokens, row blocks split across threads.

rope {num_heads, head_dim, rotary_dim, style: 'neox'|'interleaved', inv_freq: [rotary_dim/2]
      floats, scaling: float}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, const int32_t *positions,
           int64_t T)
    For token t, head h (base = h*head_dim), i < rotary_dim/2:
      a = (float)positions[t] * inv_freq[i]   (one f32 multiply)
      c = cosf(a) * scaling;  s = sinf(a) * scaling                (libm, accurate)
      neox:        x1 = x[base+i],   x2 = x[base+i+rotary_dim/2]  -> same slots
      interleaved: x1 = x[base+2i],  x2 = x[base+2i+1]            -> same slots
      out(x1 slot) = x1*c - x2*s;  out(x2 slot) = x2*c + x1*s
    Elements base+rotary_dim .. base+head_dim are copied unchanged. out may equal x.

kv_append {num_layers, num_kv_heads, head_dim, block_size}
    void f(float *pool, int64_t num_blocks, int64_t layer, const float *k, int64_t ld_k,
           const float *v, int64_t ld_v, const int32_t *slot_mapping, int64_t T)
    pool is [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim].
    For token t with s = slot_mapping[t] >= 0 (s < 0 is skipped), blk = s / block_size,
    off = s % block_size, kv head g:
      pool[layer, 0, blk, g, off, :] = k[t*ld_k + g*head_dim : +head_dim]
      pool[layer, 1, blk, g, off, :] = v[t*ld_v + g*head_dim : +head_dim]
    Offsets are computed in int64.

paged_attention {num_heads, num_kv_heads, head_dim, block_size, scale: float,
                 sliding_window: int (0 = none)}
    void f(float *out, int64_t ld_out, const float *q, int64_t ld_q, const float *pool,
           int64_t num_blocks, int64_t layer, const int32_t *block_tables, int64_t max_blocks,
           const int32_t *seq_lens, const int32_t *query_start_loc, int64_t B,
           const int32_t *positions, int64_t T)
    For token t: b = the sequence with query_start_loc[b] <= t < query_start_loc[b+1]
    (binary search over query_start_loc[0..B]), p = positions[t]; for head h,
    g = h / (num_heads / num_kv_heads):
      keys j in [lo, hi], lo = max(0, p - sliding_window + 1) if sliding_window > 0 else 0,
      hi = min(p, seq_lens[b] - 1) (= p for consistent inputs; the bound only keeps a bad
      position from reading past the sequence's blocks);
      key j is at block block_tables[b*max_blocks + j/block_size], slot j % block_size of
      the pool (K at kv=0, V at kv=1), kv head g;
      s_j = scale * dot(q[t*ld_q + h*head_dim : +head_dim], K_j)
      out[t*ld_out + h*head_dim : +head_dim] = sum_j softmax(s)_j * V_j
    Softmax is f32 and online (running max and sum, updated once per block of keys); a token
    with no keys gets zeros. out may equal q (same pointer and ld). Work items are (token,
    kv head, up to 4 of its query heads), so each K/V block is read once for those heads;
    items are interleaved across threads (causal prefill has triangular work).

act_mul {dim, act: 'silu'|'gelu'|'gelu_tanh'|'relu'}
    void f(float *out, int64_t ld_out, const float *gate, int64_t ld_gate, const float *up,
           int64_t ld_up, int64_t T)
    out[t,i] = act(gate[t,i]) * up[t,i], i < dim. out may equal gate or up.

act {dim, act}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, int64_t T)
    out[t,i] = act(x[t,i]). out may equal x.

    silu(x)      = x / (1 + exp(-x))
    gelu(x)      = 0.5 x (1 + erf(x / sqrt(2)))
    gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    relu(x)      = max(x, 0)
    Accuracy: within 1e-6 relative of float64 for every f32 input (absolute 1e-37 where the
    result leaves f32's normal range), including the negative tails where 1 + erf and
    1 + tanh cancel in a direct f32 evaluation (as in PyTorch). All are inline vector code
    (no libm calls): silu and gelu_tanh are x * sigmoid(z) with the vector exp of
    irbuilder.exp (~1 ulp); gelu_tanh forms z = 2 sqrt(2/pi) (x + 0.044715 x^3) in f64;
    gelu uses erfc(|x|/sqrt2) = t exp(-z^2 + P(t)) (irbuilder.erfc_pos, relative error
    ~2e-7) with the exponent in f64. act(-inf) = 0, act(inf) = inf, NaN propagates.

gather_rows {dim}
    void f(float *out, int64_t ld_out, const float *x, int64_t ld_x, const int32_t *idx,
           int64_t L)
    out[l, 0:dim] = x[idx[l], 0:dim]

add {dim}
    void f(float *out, int64_t ld_out, const float *a, int64_t ld_a, const float *b,
           int64_t ld_b, int64_t T)
    out[t,i] = a[t,i] + b[t,i]. out may equal a or b.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from llvmlite import ir

from . import irbuilder as irb
from .irbuilder import F32, I64, PTR, FAST, f32, i64
from .toolchain import CpuVariant

# kind -> static parameter names (all required unless they have a default in _DEFAULTS)
KERNEL_KINDS: dict[str, tuple[str, ...]] = {
    "embedding": ("dim",),
    "rms_norm": ("dim", "eps"),
    "layer_norm": ("dim", "eps", "bias"),
    "linear": ("n", "k", "bias", "residual"),
    "rope": ("num_heads", "head_dim", "rotary_dim", "style", "inv_freq", "scaling"),
    "kv_append": ("num_layers", "num_kv_heads", "head_dim", "block_size"),
    "paged_attention": ("num_heads", "num_kv_heads", "head_dim", "block_size", "scale",
                        "sliding_window"),
    "act_mul": ("dim", "act"),
    "act": ("dim", "act"),
    "gather_rows": ("dim",),
    "add": ("dim",),
}

_DEFAULTS: dict[str, dict] = {
    "layer_norm": {"bias": True},
    "linear": {"bias": False, "residual": False},
    "rope": {"style": "neox", "scaling": 1.0, "rotary_dim": None},
    "paged_attention": {"sliding_window": 0},
}

_F = "float*"
_CF = "const float*"
_CI = "const int32_t*"
_L = "int64_t"

# kind -> C arguments (name, C type), in order
KERNEL_ARGS: dict[str, tuple[tuple[str, str], ...]] = {
    "embedding": (("out", _F), ("ld_out", _L), ("table", _CF), ("ids", _CI), ("T", _L)),
    "rms_norm": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("w", _CF), ("T", _L)),
    "layer_norm": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("w", _CF),
                   ("b", _CF), ("T", _L)),
    "linear": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("w", _CF),
               ("bias", _CF), ("residual", _CF), ("ld_res", _L), ("T", _L)),
    "rope": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("positions", _CI),
             ("T", _L)),
    "kv_append": (("pool", _F), ("num_blocks", _L), ("layer", _L), ("k", _CF), ("ld_k", _L),
                  ("v", _CF), ("ld_v", _L), ("slot_mapping", _CI), ("T", _L)),
    "paged_attention": (("out", _F), ("ld_out", _L), ("q", _CF), ("ld_q", _L), ("pool", _CF),
                        ("num_blocks", _L), ("layer", _L), ("block_tables", _CI),
                        ("max_blocks", _L), ("seq_lens", _CI), ("query_start_loc", _CI),
                        ("B", _L), ("positions", _CI), ("T", _L)),
    "act_mul": (("out", _F), ("ld_out", _L), ("gate", _CF), ("ld_gate", _L), ("up", _CF),
                ("ld_up", _L), ("T", _L)),
    "act": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("T", _L)),
    "gather_rows": (("out", _F), ("ld_out", _L), ("x", _CF), ("ld_x", _L), ("idx", _CI),
                    ("L", _L)),
    "add": (("out", _F), ("ld_out", _L), ("a", _CF), ("ld_a", _L), ("b", _CF), ("ld_b", _L),
            ("T", _L)),
}

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

# Work (rough element-operations) one thread should get at least before a call goes parallel.
_GRAIN = 32768


def emit_kernel(module: ir.Module, kind: str, symbol: str, params: dict,
                variant: CpuVariant) -> ir.Function:
    """Add kernel `kind` specialized for `params` as external function `symbol`."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown cpu kernel kind {kind!r}")
    p = dict(_DEFAULTS.get(kind, {}))
    p.update(params)
    unknown = set(p) - set(KERNEL_KINDS[kind])
    missing = [n for n in KERNEL_KINDS[kind] if n not in p]
    if unknown or missing:
        raise ValueError(f"{kind} kernel {symbol}: unknown params {sorted(unknown)}, "
                         f"missing params {missing}")
    fn, b = irb.define(module, symbol, [(n, PTR if t.endswith("*") else I64)
                                        for n, t in KERNEL_ARGS[kind]])
    _EMITTERS[kind](module, fn, b, SimpleNamespace(**p), variant.vector_width)
    return fn


def _positive(**kw):
    for name, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"kernel param {name} must be a positive int, got {v!r}")


def _arg(fn: ir.Function, name: str) -> ir.Argument:
    return next(a for a in fn.args if a.name == name)


def _args(fn: ir.Function, vals) -> SimpleNamespace:
    return SimpleNamespace(**{a.name: v for a, v in zip(fn.args, vals)})


def _rows(module, fn, b, nrows, work_per_row, body, grain=_GRAIN):
    """Parallel loop over rows: body(builder, row, args)."""
    irb.parallel_for(module, b, nrows, lambda cb, r, vals: body(cb, r, _args(fn, vals)),
                     irb.min_items(work_per_row, grain))
    b.ret_void()


def _row(b, ptr, r, ld):
    return irb.gep(b, ptr, b.mul(r, ld))


def _zero(n):
    return irb.const_like(irb.vty(n), 0.0)


# --- embedding, gather_rows, add

def _emit_embedding(module, fn, b, p, vw):
    _positive(dim=p.dim)

    def body(cb, t, A):
        tok = irb.load_i32(cb, A.ids, t)
        irb.memcpy(cb, _row(cb, A.out, t, A.ld_out), irb.gep(cb, A.table, cb.mul(tok, i64(p.dim))),
                   p.dim * 4)
    _rows(module, fn, b, _arg(fn, "T"), p.dim, body, grain=4 * _GRAIN)


def _emit_gather_rows(module, fn, b, p, vw):
    _positive(dim=p.dim)

    def body(cb, r, A):
        src = irb.load_i32(cb, A.idx, r)
        irb.memcpy(cb, _row(cb, A.out, r, A.ld_out), _row(cb, A.x, src, A.ld_x), p.dim * 4)
    _rows(module, fn, b, _arg(fn, "L"), p.dim, body, grain=4 * _GRAIN)


def _emit_add(module, fn, b, p, vw):
    _positive(dim=p.dim)

    def body(cb, t, A):
        o, x, y = _row(cb, A.out, t, A.ld_out), _row(cb, A.a, t, A.ld_a), _row(cb, A.b, t, A.ld_b)

        def chunk(cb, off, w, slot):
            s = cb.fadd(irb.load_vec(cb, x, off, w), irb.load_vec(cb, y, off, w))
            irb.store_vec(cb, s, o, off)
        irb.vector_loop(cb, p.dim, vw, chunk, unroll=2)
    _rows(module, fn, b, _arg(fn, "T"), p.dim, body, grain=2 * _GRAIN)


# --- norms

def _sum_vec(b, n, vw, value_fn, unroll=4):
    """sum over i < n of value_fn(b, off, width) (vectors), with `unroll` accumulators."""
    unroll = max(1, min(unroll, n // vw))
    accs = [irb.var(b, irb.vty(vw), _zero(vw)) for _ in range(unroll)]

    def chunk(cb, off, w, slot):
        v = irb.widen(cb, value_fn(cb, off, w), vw)
        cb.store(cb.fadd(cb.load(accs[slot]), v, flags=FAST), accs[slot])
    irb.vector_loop(b, n, vw, chunk, unroll=unroll)
    tot = b.load(accs[0])
    for a in accs[1:]:
        tot = b.fadd(tot, b.load(a), flags=FAST)
    return irb.hsum(b, tot)


def _emit_rms_norm(module, fn, b, p, vw):
    _positive(dim=p.dim)
    eps = float(p.eps)

    def body(cb, t, A):
        x, o = _row(cb, A.x, t, A.ld_x), _row(cb, A.out, t, A.ld_out)

        def sq(cb, off, w):
            v = irb.load_vec(cb, x, off, w)
            return cb.fmul(v, v, flags=FAST)
        ss = _sum_vec(cb, p.dim, vw, sq)
        ms = cb.fadd(cb.fdiv(ss, f32(p.dim)), f32(eps))
        r = cb.fdiv(f32(1.0), irb.sqrt(cb, ms))

        def scale(cb, off, w, slot):
            y = cb.fmul(irb.load_vec(cb, x, off, w), irb.splat(cb, r, w))
            irb.store_vec(cb, cb.fmul(y, irb.load_vec(cb, A.w, off, w)), o, off)
        irb.vector_loop(cb, p.dim, vw, scale, unroll=2)
    _rows(module, fn, b, _arg(fn, "T"), 3 * p.dim, body)


def _emit_layer_norm(module, fn, b, p, vw):
    _positive(dim=p.dim)
    eps = float(p.eps)

    def body(cb, t, A):
        x, o = _row(cb, A.x, t, A.ld_x), _row(cb, A.out, t, A.ld_out)
        mu = cb.fdiv(_sum_vec(cb, p.dim, vw, lambda c, off, w: irb.load_vec(c, x, off, w)),
                     f32(p.dim))

        def dev(cb, off, w):
            d = cb.fsub(irb.load_vec(cb, x, off, w), irb.splat(cb, mu, w))
            return cb.fmul(d, d, flags=FAST)
        var = cb.fdiv(_sum_vec(cb, p.dim, vw, dev), f32(p.dim))
        r = cb.fdiv(f32(1.0), irb.sqrt(cb, cb.fadd(var, f32(eps))))

        def scale(cb, off, w, slot):
            d = cb.fsub(irb.load_vec(cb, x, off, w), irb.splat(cb, mu, w))
            y = cb.fmul(cb.fmul(d, irb.splat(cb, r, w)), irb.load_vec(cb, A.w, off, w))
            if p.bias:
                y = cb.fadd(y, irb.load_vec(cb, A.b, off, w))
            irb.store_vec(cb, y, o, off)
        irb.vector_loop(cb, p.dim, vw, scale, unroll=2)
    _rows(module, fn, b, _arg(fn, "T"), 4 * p.dim, body)


# --- activations

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _activation(b, act, x):
    c = lambda v: irb.const_like(x.type, v)  # noqa: E731
    if act == "silu":
        return irb.sigmoid_mul(b, x, x)
    if act == "gelu_tanh":
        # 0.5 x (1 + tanh(y)) = x sigmoid(2y); y in f64 so exp(-2y) keeps f32 accuracy
        xd = b.fpext(x, _f64_like(x))
        cd = lambda v: irb.const_like(xd.type, v)  # noqa: E731
        x3 = b.fmul(b.fmul(xd, xd), xd)
        z = b.fmul(cd(2.0 * _SQRT_2_OVER_PI), irb.fma(b, cd(0.044715), x3, xd))
        return irb.sigmoid_mul(b, x, z)
    if act == "gelu":
        # x Phi(x), Phi(x) = 0.5 (1 + erf(x/sqrt2)) = 0.5 erfc(|x|/sqrt2) for x < 0 (no
        # cancellation) and 1 - 0.5 erfc(x/sqrt2) for x >= 0
        xd = b.fpext(x, _f64_like(x))
        z = b.fmul(irb.intrinsic(b, "llvm.fabs", [xd]), irb.const_like(xd.type, 0.5 ** 0.5))
        half = b.fmul(c(0.5), irb.erfc_pos(b, z))
        phi = b.select(b.fcmp_ordered("<", x, c(0.0)), half, b.fsub(c(1.0), half))
        return b.select(b.fcmp_ordered("==", phi, c(0.0)), c(0.0), b.fmul(x, phi))
    if act == "relu":
        return b.select(b.fcmp_ordered("<", x, c(0.0)), c(0.0), x)  # NaN stays NaN
    raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")


def _f64_like(x):
    return irb.vty(irb.width(x), irb.F64) if irb.width(x) else irb.F64


def _check_act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")


def _act_cost(act):
    return {"relu": 1, "silu": 12, "gelu_tanh": 14, "gelu": 30}.get(act, 20)


def _emit_act_mul(module, fn, b, p, vw):
    _positive(dim=p.dim)
    _check_act(p.act)

    def body(cb, t, A):
        o = _row(cb, A.out, t, A.ld_out)
        g, u = _row(cb, A.gate, t, A.ld_gate), _row(cb, A.up, t, A.ld_up)

        def chunk(cb, off, w, slot):
            y = _activation(cb, p.act, irb.load_vec(cb, g, off, w))
            irb.store_vec(cb, cb.fmul(y, irb.load_vec(cb, u, off, w)), o, off)
        irb.vector_loop(cb, p.dim, vw, chunk)
    _rows(module, fn, b, _arg(fn, "T"), _act_cost(p.act) * p.dim, body)


def _emit_act(module, fn, b, p, vw):
    _positive(dim=p.dim)
    _check_act(p.act)

    def body(cb, t, A):
        o, x = _row(cb, A.out, t, A.ld_out), _row(cb, A.x, t, A.ld_x)

        def chunk(cb, off, w, slot):
            irb.store_vec(cb, _activation(cb, p.act, irb.load_vec(cb, x, off, w)), o, off)
        irb.vector_loop(cb, p.dim, vw, chunk)
    _rows(module, fn, b, _arg(fn, "T"), _act_cost(p.act) * p.dim, body)


# --- linear

_LIN_X_BYTES = 256 * 1024  # prefill: tokens per pass over w so their x rows fit in L2
_LIN_KC = 512              # prefill: k is split into slices of about this many elements


def _linear_blocking(vw: int) -> tuple[int, int, int]:
    """(rows of w, tokens) of the prefill micro-kernel and rows of the decode (T < tokens)
    micro-kernel, sized to the vector register file: 32 registers with AVX-512 (16 lanes),
    16 with AVX2/SSE/NEON-as-baseline."""
    if vw >= 16:
        return 4, 4, 8   # 16 accumulators + 4 w + 1 x of 32 zmm
    return 4, 2, 4       # 8 accumulators + 4 w + 1 x of 16 ymm/xmm


def _linear_micro(b, A, p, vw, j0, t0, r, c, k0=None, klen=None, first=True):
    """out[t0:t0+c, j0:j0+r] = x[t0:t0+c, k0:k0+klen] . w[j0:j0+r, k0:k0+klen]^T: r*c vector
    accumulators over the k slice, reduced together by one hsum_many. The first k slice
    (`first`: bool or i1) stores the result plus bias and residual; later ones add to out."""
    k, klen = p.k, p.k if klen is None else klen
    wrow = [irb.gep(b, A.w, b.add(b.mul(b.add(j0, i64(ri)), i64(k)), k0 or i64(0)))
            for ri in range(r)]
    xrow = [irb.gep(b, _row(b, A.x, b.add(t0, i64(ci)), A.ld_x), k0 or i64(0))
            for ci in range(c)]
    accs = [[irb.var(b, irb.vty(vw), _zero(vw)) for _ in range(r)] for _ in range(c)]

    def chunk(cb, off, w, slot):
        wv = [irb.load_vec(cb, wp, off, w) for wp in wrow]
        for ci in range(c):
            xv = irb.load_vec(cb, xrow[ci], off, w)
            for ri in range(r):
                acc = cb.load(accs[ci][ri])
                if w == vw:
                    acc = irb.fma(cb, wv[ri], xv, acc)
                else:  # k tail: narrower vectors
                    acc = cb.fadd(acc, irb.widen(cb, cb.fmul(wv[ri], xv, flags=FAST), vw),
                                  flags=FAST)
                cb.store(acc, accs[ci][ri])
    irb.vector_loop(b, klen, vw, chunk)

    sums = irb.hsum_many(b, [b.load(accs[ci][ri]) for ci in range(c) for ri in range(r)])

    def store(first_slice: bool):
        bias = irb.load_vec(b, A.bias, j0, r) if p.bias and first_slice else None
        for ci in range(c):
            t = b.add(t0, i64(ci))
            v = irb.lanes(b, sums, ci * r, r)
            o = b.add(b.mul(t, A.ld_out), j0)
            if not first_slice:
                v = b.fadd(irb.load_vec(b, A.out, o, r), v)
            if bias is not None:
                v = b.fadd(v, bias)
            if p.residual and first_slice:
                v = b.fadd(v, irb.load_vec(b, A.residual, b.add(b.mul(t, A.ld_res), j0), r))
            irb.store_vec(b, v, A.out, o)

    if isinstance(first, bool):
        store(first)
    else:
        with b.if_else(first) as (then, otherwise):
            with then:
                store(True)
            with otherwise:
                store(False)


def _emit_linear(module, fn, b, p, vw):
    _positive(n=p.n, k=p.k)
    R, C, RD = _linear_blocking(vw)
    T = _arg(fn, "T")
    # prefill: k in slices of KC (the w block of R rows stays in L1), tokens in slices of TB
    # whose x[:, k slice] stays in L2 while all rows of w stream past
    nkc = -(-p.k // _LIN_KC)
    KC = -(-(-(-p.k // nkc)) // vw) * vw
    n_kc, k_rem = divmod(p.k, KC)
    TB = max(C, (_LIN_X_BYTES // (4 * min(p.k, KC))) // C * C)

    def row_blocks(b, R, block, extra=()):
        """parallel loop over blocks of R rows of w: block(cb, args, extra, j0, rows)"""
        nbf, rrem = divmod(p.n, R)

        def body(cb, rb, vals):
            A = _args(fn, vals)
            ex = vals[len(fn.args):]
            j0 = cb.mul(rb, i64(R))
            if rrem:
                with cb.if_else(cb.icmp_signed("<", rb, i64(nbf))) as (full, part):
                    with full:
                        block(cb, A, ex, j0, R)
                    with part:
                        block(cb, A, ex, j0, rrem)
            else:
                block(cb, A, ex, j0, R)
        irb.parallel_for(b.module, b, i64(nbf + (1 if rrem else 0)), body,
                         irb.min_items(R * p.k), captures=list(fn.args) + list(extra))

    def prefill_block(klen):
        def block(cb, A, ex, j0, r):
            # tokens [t_lo, t_hi) inner: the r rows of w stay in L1 while x streams
            t_lo, t_hi, k0 = ex
            first = True if klen == p.k else cb.icmp_signed("==", k0, i64(0))
            n_tok = cb.sub(t_hi, t_lo)
            tfull = cb.add(t_lo, cb.and_(n_tok, i64(-C)))
            with irb.for_range(cb, t_lo, tfull, C, "tb") as t0:
                _linear_micro(cb, A, p, vw, j0, t0, r, C, k0, klen, first)
            trem = cb.sub(t_hi, tfull)
            for c in range(1, C):
                with cb.if_then(cb.icmp_signed("==", trem, i64(c))):
                    _linear_micro(cb, A, p, vw, j0, tfull, r, c, k0, klen, first)
        return block

    def decode_block(cb, A, ex, j0, r):
        for c in range(1, C):
            with cb.if_then(cb.icmp_signed("==", A.T, i64(c))):
                _linear_micro(cb, A, p, vw, j0, i64(0), r, c)

    with b.if_then(b.icmp_signed(">", T, i64(0))):
        with b.if_else(b.icmp_signed("<", T, i64(C))) as (dec, pre):
            with dec:
                row_blocks(b, RD, decode_block)
            with pre:
                with irb.for_range(b, 0, T, TB, "tsb") as t_lo:
                    t_hi = irb.imin(b, T, b.add(t_lo, i64(TB)))
                    if n_kc:
                        with irb.for_range(b, 0, n_kc * KC, KC, "kc") as k0:
                            row_blocks(b, R, prefill_block(KC), (t_lo, t_hi, k0))
                    if k_rem:
                        row_blocks(b, R, prefill_block(k_rem), (t_lo, t_hi, i64(n_kc * KC)))
    b.ret_void()


# --- rope

def _emit_rope(module, fn, b, p, vw):
    rot = p.head_dim if p.rotary_dim is None else p.rotary_dim
    _positive(num_heads=p.num_heads, head_dim=p.head_dim, rotary_dim=rot)
    if rot % 2 or rot > p.head_dim:
        raise ValueError(f"rope: rotary_dim {rot} must be even and <= head_dim {p.head_dim}")
    if p.style not in ("neox", "interleaved"):
        raise ValueError(f"rope: unknown style {p.style!r}")
    half = rot // 2
    inv = [float(v) for v in p.inv_freq]
    if len(inv) != half:
        raise ValueError(f"rope: inv_freq has {len(inv)} values, expected {half}")
    scaling = float(p.scaling)

    tab_ty = ir.ArrayType(F32, half)
    tab = ir.GlobalVariable(module, tab_ty, module.get_unique_name(fn.name + ".inv_freq"))
    tab.global_constant = True
    tab.linkage = "internal"
    tab.initializer = ir.Constant(tab_ty, [f32(v) for v in inv])

    def body(cb, t, A):
        cos = irb.var(cb, tab_ty, name="cos")
        sin = irb.var(cb, tab_ty, name="sin")
        pos = cb.sitofp(cb.trunc(irb.load_i32(cb, A.positions, t), irb.I32), F32)
        with irb.for_range(cb, 0, half, 1, "f") as i:
            a = cb.fmul(pos, irb.load_f32(cb, tab, i))
            cs, sn = irb.libm(cb, "cosf", a), irb.libm(cb, "sinf", a)
            if scaling != 1.0:
                cs, sn = cb.fmul(cs, f32(scaling)), cb.fmul(sn, f32(scaling))
            cb.store(cs, irb.gep(cb, cos, i))
            cb.store(sn, irb.gep(cb, sin, i))
        x, o = _row(cb, A.x, t, A.ld_x), _row(cb, A.out, t, A.ld_out)
        with irb.for_range(cb, 0, p.num_heads, 1, "h") as h:
            base = cb.mul(h, i64(p.head_dim))
            xh, oh = irb.gep(cb, x, base), irb.gep(cb, o, base)

            def rotate(cb, off, w, slot):
                c = irb.load_vec(cb, cos, off, w)
                s = irb.load_vec(cb, sin, off, w)
                if p.style == "neox":
                    off2 = cb.add(off, i64(half))
                    x1, x2 = irb.load_vec(cb, xh, off, w), irb.load_vec(cb, xh, off2, w)
                else:
                    off2 = None
                    pair = irb.load_vec(cb, xh, cb.mul(off, i64(2)), 2 * w)
                    x1 = irb.shuffle(cb, pair, pair, range(0, 2 * w, 2))
                    x2 = irb.shuffle(cb, pair, pair, range(1, 2 * w, 2))
                y1 = cb.fsub(cb.fmul(x1, c), cb.fmul(x2, s))
                y2 = cb.fadd(cb.fmul(x2, c), cb.fmul(x1, s))
                if p.style == "neox":
                    irb.store_vec(cb, y1, oh, off)
                    irb.store_vec(cb, y2, oh, off2)
                else:
                    inter = [v for i in range(w) for v in (i, w + i)]
                    irb.store_vec(cb, irb.shuffle(cb, y1, y2, inter), oh, cb.mul(off, i64(2)))
            irb.vector_loop(cb, half, vw, rotate)
            if rot < p.head_dim:
                xp, op = irb.gep(cb, xh, rot), irb.gep(cb, oh, rot)
                irb.vector_loop(cb, p.head_dim - rot, vw, lambda cb, off, w, s: irb.store_vec(
                    cb, irb.load_vec(cb, xp, off, w), op, off))
    _rows(module, fn, b, _arg(fn, "T"), 40 * half + 4 * p.num_heads * p.head_dim, body)


# --- KV cache

def _emit_kv_append(module, fn, b, p, vw):
    _positive(num_layers=p.num_layers, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
              block_size=p.block_size)
    G, hd, bs = p.num_kv_heads, p.head_dim, p.block_size

    def body(cb, t, A):
        s = irb.load_i32(cb, A.slot_mapping, t)
        with cb.if_then(cb.icmp_signed(">=", s, i64(0))):
            blk, off = cb.sdiv(s, i64(bs)), cb.srem(s, i64(bs))
            kv_stride = cb.mul(A.num_blocks, i64(G * bs * hd))
            kbase = cb.add(cb.mul(cb.mul(A.layer, i64(2)), kv_stride),
                           cb.add(cb.mul(blk, i64(G * bs * hd)), cb.mul(off, i64(hd))))
            kdst = irb.gep(cb, A.pool, kbase)
            vdst = irb.gep(cb, kdst, kv_stride)
            ksrc, vsrc = _row(cb, A.k, t, A.ld_k), _row(cb, A.v, t, A.ld_v)
            for g in range(G):
                irb.memcpy(cb, irb.gep(cb, kdst, g * bs * hd), irb.gep(cb, ksrc, g * hd), hd * 4)
                irb.memcpy(cb, irb.gep(cb, vdst, g * bs * hd), irb.gep(cb, vsrc, g * hd), hd * 4)
    _rows(module, fn, b, _arg(fn, "T"), 2 * G * hd, body, grain=4 * _GRAIN)


_ATTN_HEADS = 4  # at most this many query heads of one kv head share a pass over its keys


def _emit_paged_attention(module, fn, b, p, vw):
    H, G, hd, bs = p.num_heads, p.num_kv_heads, p.head_dim, p.block_size
    _positive(num_heads=H, num_kv_heads=G, head_dim=hd, block_size=bs)
    if H % G:
        raise ValueError(f"paged_attention: num_heads {H} is not a multiple of num_kv_heads {G}")
    win = int(p.sliding_window or 0)
    if win < 0:
        raise ValueError(f"paged_attention: sliding_window must be >= 0, got {win}")
    rep = H // G
    # Work item = (token, kv head, group of HP query heads). The HP heads walk the keys
    # together, block by block, so each K/V block is read from memory once and then from L1.
    HP = max(d for d in range(1, min(rep, _ATTN_HEADS) + 1) if rep % d == 0)
    NS = rep // HP
    nfull, tail = irb.vector_chunks(hd, vw)
    chunks = [(i * vw, vw) for i in range(nfull)] + tail
    neg_inf = f32(float("-inf"))
    KG = min(vw, 16, 1 << (bs.bit_length() - 1))  # keys scored at once (one hsum_many)

    def key_dot(cb, qv, kblk, o):
        """q . K[o] as a vector whose lanes sum to the score (q is pre-scaled)."""
        kp = irb.gep(cb, kblk, cb.mul(o, i64(hd)))
        acc = None
        for ci, (off, w) in enumerate(chunks):
            kv = irb.load_vec(cb, kp, off, w)
            if acc is None:
                acc = cb.fmul(qv[ci], kv, flags=FAST)
            elif w == irb.width(acc):
                acc = irb.fma(cb, qv[ci], kv, acc)
            else:
                acc = cb.fadd(acc, irb.widen(cb, cb.fmul(qv[ci], kv, flags=FAST),
                                             irb.width(acc)), flags=FAST)
        return acc

    def groups(cb, lo, hi, n, group, single, name):
        """group(offset) for offsets lo, lo+n, ... while a whole group of n fits below hi,
        then single(offset) for the rest."""
        o = irb.var(cb, I64, lo, name)
        with irb.while_(cb, lambda c: c.icmp_signed("<=", c.add(c.load(o), i64(n)), hi), name):
            ov = cb.load(o)
            group(ov)
            cb.store(cb.add(ov, i64(n)), o)
        with irb.for_range(cb, cb.load(o), hi, 1, name + "1") as oj:
            single(oj)

    def body(cb, item, A):
        t = cb.udiv(item, i64(G * NS))
        gs = cb.urem(item, i64(G * NS))
        g = cb.udiv(gs, i64(NS))
        h0 = cb.add(cb.mul(g, i64(rep)), cb.mul(cb.urem(gs, i64(NS)), i64(HP)))
        # sequence of token t: largest b with query_start_loc[b] <= t
        lo = irb.var(cb, I64, i64(0), "lo")
        hi = irb.var(cb, I64, A.B, "hi")
        with irb.while_(cb, lambda c: c.icmp_signed(">", c.sub(c.load(hi), c.load(lo)), i64(1)),
                        "bs"):
            lv, hv = cb.load(lo), cb.load(hi)
            mid = cb.lshr(cb.add(lv, hv), i64(1))
            le = cb.icmp_signed("<=", irb.load_i32(cb, A.query_start_loc, mid), t)
            cb.store(cb.select(le, mid, lv), lo)
            cb.store(cb.select(le, hv, mid), hi)
        seq = cb.load(lo)
        pos = irb.load_i32(cb, A.positions, t)
        # keys up to the token's own position; never past the sequence's cached length
        jend = irb.imin(cb, cb.add(pos, i64(1)), irb.load_i32(cb, A.seq_lens, seq))
        jlo = irb.imax(cb, i64(0), cb.sub(pos, i64(win - 1))) if win else i64(0)

        qrow = irb.gep(cb, _row(cb, A.q, t, A.ld_q), cb.mul(h0, i64(hd)))
        orow = irb.gep(cb, _row(cb, A.out, t, A.ld_out), cb.mul(h0, i64(hd)))
        # per-head online-softmax state: running max, sum, and the V accumulator
        m_arr = irb.var(cb, ir.ArrayType(F32, HP), name="m")
        l_arr = irb.var(cb, ir.ArrayType(F32, HP), name="l")
        acc_arr = irb.var(cb, ir.ArrayType(F32, HP * hd), name="acc")
        scores = irb.var(cb, ir.ArrayType(F32, bs), name="scores")
        with irb.for_range(cb, 0, HP, 1, "init") as r:
            cb.store(neg_inf, irb.gep(cb, m_arr, r))
            cb.store(f32(0.0), irb.gep(cb, l_arr, r))
        irb.vector_loop(cb, HP * hd, vw, lambda c, off, w, s: irb.store_vec(
            c, _zero(w), acc_arr, off))

        head_stride = bs * hd
        kv_stride = cb.mul(A.num_blocks, i64(G * head_stride))
        layer_base = irb.gep(cb, A.pool, cb.add(cb.mul(cb.mul(A.layer, i64(2)), kv_stride),
                                                 cb.mul(g, i64(head_stride))))
        bt = irb.gep(cb, A.block_tables, cb.mul(seq, A.max_blocks), irb.I32)

        with cb.if_then(cb.icmp_signed("<", jlo, jend)):
            lb_end = cb.add(cb.sdiv(cb.sub(jend, i64(1)), i64(bs)), i64(1))
            with irb.for_range(cb, cb.sdiv(jlo, i64(bs)), lb_end, 1, "lb") as lb:
                phys = irb.load_i32(cb, bt, lb)
                kblk = irb.gep(cb, layer_base, cb.mul(phys, i64(G * head_stride)))
                vblk = irb.gep(cb, kblk, kv_stride)
                first = cb.mul(lb, i64(bs))
                o0 = cb.sub(irb.imax(cb, jlo, first), first)
                o1 = cb.sub(irb.imin(cb, jend, cb.add(first, i64(bs))), first)
                with irb.for_range(cb, 0, HP, 1, "head") as r:
                    head_block(cb, qrow, r, kblk, vblk, o0, o1, m_arr, l_arr, acc_arr, scores)

        with irb.for_range(cb, 0, HP, 1, "fin") as r:
            lv = irb.load_f32(cb, l_arr, r)
            inv = cb.select(cb.fcmp_ordered(">", lv, f32(0.0)), cb.fdiv(f32(1.0), lv), f32(0.0))
            base = cb.mul(r, i64(hd))
            a_h, o_h = irb.gep(cb, acc_arr, base), irb.gep(cb, orow, base)
            for off, w in chunks:
                irb.store_vec(cb, cb.fmul(irb.load_vec(cb, a_h, off, w), irb.splat(cb, inv, w)),
                              o_h, off)

    def head_block(cb, qrow, r, kblk, vblk, o0, o1, m_arr, l_arr, acc_arr, scores):
        """One head's online-softmax update with keys o0..o1 of one block."""
        q_h = irb.gep(cb, qrow, cb.mul(r, i64(hd)))
        qv = [cb.fmul(irb.load_vec(cb, q_h, off, w), irb.splat(cb, f32(p.scale), w))
              for off, w in chunks]
        # pass 1: scores and their max
        mb = irb.var(cb, irb.vty(KG), irb.const_like(irb.vty(KG), float("-inf")), "mb")

        def score_group(ov):
            sv = irb.hsum_many(cb, [key_dot(cb, qv, kblk, cb.add(ov, i64(kk)))
                                    for kk in range(KG)])
            irb.store_vec(cb, sv, scores, ov)
            cb.store(irb.fmax(cb, cb.load(mb), sv), mb)

        def score_one(oj):
            sj = irb.hsum(cb, key_dot(cb, qv, kblk, oj))
            cb.store(sj, irb.gep(cb, scores, oj))
            cb.store(irb.fmax(cb, cb.load(mb), irb.splat(cb, sj, KG)), mb)
        groups(cb, o0, o1, KG, score_group, score_one, "kg")
        m_slot, l_slot = irb.gep(cb, m_arr, r), irb.gep(cb, l_arr, r)
        m_old = cb.load(m_slot, typ=F32)
        m_new = irb.fmax(cb, m_old, irb.hmax(cb, cb.load(mb)))
        corr = irb.exp(cb, cb.fsub(m_old, m_new))
        cb.store(m_new, m_slot)
        # pass 2: p_j = exp(s_j - m) in place, and their sum
        lsum = irb.var(cb, irb.vty(KG), _zero(KG), "lsum")

        def exp_group(ov):
            pv = irb.exp(cb, cb.fsub(irb.load_vec(cb, scores, ov, KG), irb.splat(cb, m_new, KG)))
            irb.store_vec(cb, pv, scores, ov)
            cb.store(cb.fadd(cb.load(lsum), pv, flags=FAST), lsum)

        def exp_one(oj):
            pj = irb.exp(cb, cb.fsub(irb.load_f32(cb, scores, oj), m_new))
            cb.store(pj, irb.gep(cb, scores, oj))
            cb.store(cb.fadd(cb.load(lsum), irb.widen(cb, irb.splat(cb, pj, 1), KG),
                             flags=FAST), lsum)
        groups(cb, o0, o1, KG, exp_group, exp_one, "eg")
        cb.store(cb.fadd(cb.fmul(cb.load(l_slot, typ=F32), corr), irb.hsum(cb, cb.load(lsum))),
                 l_slot)
        # pass 3: acc = acc * corr + sum_j p_j V_j
        a_h = irb.gep(cb, acc_arr, cb.mul(r, i64(hd)))
        accs = [irb.var(cb, irb.vty(w), cb.fmul(irb.load_vec(cb, a_h, off, w),
                                                 irb.splat(cb, corr, w))) for off, w in chunks]
        with irb.for_range(cb, o0, o1, 1, "vj") as oj:
            pj = irb.splat(cb, irb.load_f32(cb, scores, oj), vw)
            vp = irb.gep(cb, vblk, cb.mul(oj, i64(hd)))
            for ci, (off, w) in enumerate(chunks):
                acc = irb.fma(cb, irb.lanes(cb, pj, 0, w), irb.load_vec(cb, vp, off, w),
                              cb.load(accs[ci]))
                cb.store(acc, accs[ci])
        for ci, (off, w) in enumerate(chunks):
            irb.store_vec(cb, cb.load(accs[ci]), a_h, off)

    irb.parallel_for(module, b, b.mul(_arg(fn, "T"), i64(G * NS)),
                     lambda cb, it, vals: body(cb, it, _args(fn, vals)),
                     irb.min_items(64 * hd * HP), interleave=True)
    b.ret_void()


_EMITTERS = {
    "embedding": _emit_embedding,
    "rms_norm": _emit_rms_norm,
    "layer_norm": _emit_layer_norm,
    "linear": _emit_linear,
    "rope": _emit_rope,
    "kv_append": _emit_kv_append,
    "paged_attention": _emit_paged_attention,
    "act_mul": _emit_act_mul,
    "act": _emit_act,
    "gather_rows": _emit_gather_rows,
    "add": _emit_add,
}
