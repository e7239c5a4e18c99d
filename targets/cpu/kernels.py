"""CPU kernel generators: one LLVM IR function per (kind, static specialization).

`emit_kernel(module, kind, symbol, params, variant)` adds an external function `symbol` to
`module`, with the C signature that targets/signatures.py declares for `kind` (pointers are
`T*` of the element type it names, counts `int64_t`), and the semantics written there. Static
params (sizes, eps, flags, tables, storage dtypes) are baked in as constants.

How the CPU kernels do it:

* Kernels split rows (or (token, head) pairs) across the library's threads (runtime.c: a pool
  whose regions do not wait for a thread the OS has not scheduled) when the call is large enough
  to pay for waking them; small calls run serially. Threads claim runs of work items
  dynamically, so a thread that shares its core with another process does less of the work.
* Half-precision storage (bf16/f16 weights and KV caches) is read through irbuilder.Storage:
  loads widen to f32 in registers (exact), so arithmetic is f32 as for f32 storage.
* linear: decode and short prefill (T up to 128, fewer for large k: while x[:T] fits in L2):
  one parallel pass over w in blocks of rows, each block read from memory once for all T
  tokens, which pass over it in balanced groups of <= 4; the next block's rows are
  prefetched meanwhile, and k runs in slices of <= 512 so that the block's w slice and
  x[:, slice] stay in L1. Micro-kernels of r rows of w x c tokens, one vector accumulator
  per (row, token), reduced by one hsum_many: r = 8, 8, 6, 6 rows for c = 1..4 tokens with
  AVX-512 (32 registers), 6, 4, 3, 3 with AVX2, 4, 4, 3, 2 otherwise. Longer prefill:
  token slices whose x[:, k slice] fits in L2 times k slices of <= 512, one parallel pass
  over w each, micro-kernels of r(4) rows x <= 4 tokens. Threads claim contiguous runs of row
  blocks (contiguous streams suit the hardware prefetcher).
* rope computes cos/sin with libm (accurate) per token.
* paged_attention: work units share each K/V block load among their query rows. Prefill: a
  block of 16/HP consecutive tokens of one sequence (8/HP on 16-register ISAs) times HP
  query heads of one kv head (HP divides both; scores with rows in vector lanes on AVX2 and
  AVX-512 below head_dim 256; keys stored as f16/bf16/int8 are widened into an f32 copy of the
  block first, so that loop broadcasts from L1). Decode (no sequence with more than one new
  token): one token with all query heads of several kv heads, whose blocks are adjacent in the
  pool: one contiguous read per key block. Softmax is f32 and online (running max and sum,
  updated once per block of keys) within chunks of 256 keys (of whole blocks: 255 for blocks
  of 3) cut at fixed positions; the chunks' states are merged pairwise up a binary tree over
  their indices. With fewer units than twice the threads
  and long contexts, work items take aligned groups of a unit's chunks (split-K) and the caller
  merges the groups' states up the same tree. Threads claim units dynamically, those with the
  most keys first; K/V blocks are prefetched ahead.
  Batch invariant: with finite K and V, a row's result depends only on its query, keys and
  values (a zero's sign aside). The chunks and the tree do not depend on the split or the
  threads, and both score layouts (rows in lanes for full lane groups below head_dim 256, a
  vector per row otherwise) sum each dot product and each block's p_j in one order: lane i
  the fma chain over elements i, i + vw, ..., then hsum_many's tree. So a token gets the same
  bits in a decode step, beside other sequences' prefill chunks, or as one of its own prompt's
  tokens in any chunking. (An infinite V of a key in the unit's range but not the row's adds
  0 * inf = NaN: a prompt step's row, not the same row alone.)
* Activations: silu and gelu_tanh are x * sigmoid(z) with the vector exp of irbuilder.exp
  (~1 ulp); gelu_tanh forms z = 2 sqrt(2/pi) (x + 0.044715 x^3) in f64; gelu uses
  erfc(|x|/sqrt2) = t exp(-z^2 + P(t)) (irbuilder.erfc_pos, relative error ~2e-7) with the
  exponent in f64: within 1e-6 relative of float64 for every f32 input (absolute 1e-37 where
  the result leaves f32's normal range), including the negative tails where 1 + erf and
  1 + tanh cancel in a direct f32 evaluation. act(-inf) = 0, act(inf) = inf, NaN propagates.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from llvmlite import ir

from llmirc.dtypes import QUANTIZED_KV

from . import amx
from . import irbuilder as irb
from .irbuilder import F32, I64, PTR, FAST, f32, i64
from ..signatures import signature, softcap_param
from .quant_kernels import emit_quant_kernel, is_quant_kernel
from .toolchain import CpuVariant

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

# Work (rough element-operations) one thread should get at least before a call goes parallel.
_GRAIN = 32768


def emit_kernel(module: ir.Module, kind: str, symbol: str, params: dict,
                variant: CpuVariant) -> ir.Function:
    """Add kernel `kind` specialized for `params` as external function `symbol`."""
    if is_quant_kernel(kind, params):
        return emit_quant_kernel(module, kind, symbol, params, variant)
    if kind not in _EMITTERS:
        raise ValueError(f"unknown cpu kernel kind {kind!r}")
    sig = signature(kind)
    p = sig.bind_static(params)
    fn, b = irb.define(module, symbol, [(a.name, llvm_type(a.type)) for a in sig.params])
    _EMITTERS[kind](module, fn, b, SimpleNamespace(**p), variant)
    return fn


def llvm_type(param_type: str) -> ir.Type:
    """The LLVM type of a signature parameter type (ptr, i64, f32)."""
    return {"ptr": PTR, "i64": I64, "f32": F32}[param_type]


def _positive(**kw):
    for name, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"kernel param {name} must be a positive int, got {v!r}")


def _arg(fn: ir.Function, name: str) -> ir.Argument:
    return next(a for a in fn.args if a.name == name)


def _rows(module, fn, b, nrows, work_per_row, body, grain=_GRAIN):
    """Parallel loop over rows: body(builder, row, args)."""
    irb.parallel_for(module, b, nrows, lambda cb, r, vals: body(cb, r, irb.named(fn, vals)),
                     irb.min_items(work_per_row, grain))
    b.ret_void()


def _row(b, ptr, r, ld):
    return irb.gep(b, ptr, b.mul(r, ld))


def _zero(n):
    return irb.const_like(irb.vty(n), 0.0)


_F32 = irb.storage("float32")


# --- embedding, gather_rows, add

def _emit_embedding(module, fn, b, p, cpu):
    vw = cpu.vector_width
    _positive(dim=p.dim)
    st = irb.storage(p.dtype)

    def row(c, src, dst, off, w):
        v = st.load(c, src, off, w)
        irb.store_vec(c, v if p.scale == 1 else c.fmul(v, irb.const_like(v.type, p.scale)), dst, off)

    def body(cb, t, A):
        tok = irb.load_i32(cb, A.ids, t)
        src, dst = st.gep(cb, A.table, cb.mul(tok, i64(p.dim))), _row(cb, A.out, t, A.ld_out)
        if p.dtype == "float32" and p.scale == 1:
            irb.memcpy(cb, dst, src, p.dim * 4)
        else:
            irb.vector_loop(cb, p.dim, vw, lambda c, off, w, _: row(c, src, dst, off, w))
    _rows(module, fn, b, _arg(fn, "T"), p.dim, body, grain=4 * _GRAIN)


def _emit_gather_rows(module, fn, b, p, cpu):
    _positive(dim=p.dim)

    def body(cb, r, A):
        src = irb.load_i32(cb, A.idx, r)
        irb.memcpy(cb, _row(cb, A.out, r, A.ld_out), _row(cb, A.x, src, A.ld_x), p.dim * 4)
    _rows(module, fn, b, _arg(fn, "L"), p.dim, body, grain=4 * _GRAIN)


def _emit_add(module, fn, b, p, cpu):
    vw = cpu.vector_width
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


def _emit_rms_norm(module, fn, b, p, cpu):
    vw = cpu.vector_width
    _positive(dim=p.dim, heads=p.heads)
    eps, H = float(p.eps), int(p.heads)

    def body(cb, r, A):  # r: token r / H, its head r % H
        t, h = (cb.udiv(r, i64(H)), cb.urem(r, i64(H))) if H > 1 else (r, i64(0))
        x = irb.gep(cb, _row(cb, A.x, t, A.ld_x), cb.mul(h, i64(p.dim)))
        o = irb.gep(cb, _row(cb, A.out, t, A.ld_out), cb.mul(h, i64(p.dim)))

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
    _rows(module, fn, b, b.mul(_arg(fn, "T"), i64(H)), 3 * p.dim, body)


def _emit_layer_norm(module, fn, b, p, cpu):
    vw = cpu.vector_width
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


def _emit_act_mul(module, fn, b, p, cpu):
    vw = cpu.vector_width
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


def _emit_act(module, fn, b, p, cpu):
    vw = cpu.vector_width
    _positive(dim=p.dim)
    _check_act(p.act)

    def body(cb, t, A):
        o, x = _row(cb, A.out, t, A.ld_out), _row(cb, A.x, t, A.ld_x)

        def chunk(cb, off, w, slot):
            irb.store_vec(cb, _activation(cb, p.act, irb.load_vec(cb, x, off, w)), o, off)
        irb.vector_loop(cb, p.dim, vw, chunk)
    _rows(module, fn, b, _arg(fn, "T"), _act_cost(p.act) * p.dim, body)


def _emit_softcap(module, fn, b, p, cpu):
    vw = cpu.vector_width
    _positive(dim=p.dim)
    cap = softcap_param(vars(p), "cap", "softcap")

    def body(cb, t, A):
        o, x = _row(cb, A.out, t, A.ld_out), _row(cb, A.x, t, A.ld_x)

        def chunk(cb, off, w, slot):
            irb.store_vec(cb, irb.softcap(cb, irb.load_vec(cb, x, off, w), cap), o, off)
        irb.vector_loop(cb, p.dim, vw, chunk)
    _rows(module, fn, b, _arg(fn, "T"), _act_cost("gelu_tanh") * p.dim, body)


# --- hadamard

def _emit_hadamard(module, fn, b, p, cpu):
    """Each block of a row in registers (block / vw vectors): log2(block) rounds of sums and
    differences, those of pairs more than a vector apart between vectors, the others within
    each vector by a lane shuffle (x[l ^ h]) and a blend; then times 1/sqrt(block)."""
    _positive(dim=p.dim, block=p.block)
    bs = p.block
    if bs & (bs - 1) or p.dim % bs:
        raise ValueError(f"hadamard kernel: block {bs} must be a power of two dividing dim {p.dim}")
    vw = min(cpu.vector_width, bs)
    norm = 1.0 / math.sqrt(bs)

    def body(cb, t, A):
        x, o = _row(cb, A.x, t, A.ld_x), _row(cb, A.out, t, A.ld_out)
        with irb.for_range(cb, 0, p.dim, bs, "blk") as j:
            v = [irb.load_vec(cb, x, cb.add(j, i64(i)), vw) for i in range(0, bs, vw)]
            h = 1
            while h < bs:
                if h >= vw:
                    d = h // vw
                    for i in range(len(v)):
                        if not i & d:
                            v[i], v[i + d] = cb.fadd(v[i], v[i + d]), cb.fsub(v[i], v[i + d])
                else:
                    for i, a in enumerate(v):
                        pair = irb.shuffle(cb, a, a, [lane ^ h for lane in range(vw)])
                        v[i] = irb.shuffle(cb, cb.fadd(a, pair), cb.fsub(pair, a),
                                           [lane if not lane & h else vw + lane for lane in range(vw)])
                h *= 2
            for i, a in enumerate(v):
                irb.store_vec(cb, cb.fmul(a, irb.splat(cb, norm, vw)), o, cb.add(j, i64(i * vw)))
    _rows(module, fn, b, _arg(fn, "T"), p.dim * (bs.bit_length() + 1), body)


# --- linear

_LIN_X_BYTES = 256 * 1024  # prefill: tokens per pass over w so their x rows fit in L2
# k is split into slices of about this many elements, alike for decode and prefill (batch invariance): a row
# block's slice stays in L1 while the token groups pass, and each slice ends in a horizontal sum of the tile's
# accumulators. bf16 rows in slices of 1024 (half the sums) made a Gemma 3 270M-shaped prefill 5% faster on a
# Zen 4 but SmolLM2's bf16 decode 12% slower: one token's slices are independent FMA chains that overlap, and
# fewer slices leave one row's dot product bound by the FMA latency (2026-12-06, not kept).
_LIN_KC = 512


def _linear_blocking(vw: int) -> tuple[int, tuple[int, ...]]:
    """(C, rows): tokens share a pass over w in groups of at most C, and a group of c tokens
    takes rows[c-1] rows of w per micro-kernel, so that its r*c vector accumulators, r w
    vectors and an x vector fit the register file: 32 zmm with AVX-512 (16 lanes), 16 ymm
    with AVX2 + FMA, 16 xmm otherwise (SSE has no FMA: a multiply needs a scratch register).
    Fewer tokens, more rows. Decode (one group of <= C tokens) takes one row at a time
    instead (or a few side by side: _decode_rows): w then streams from memory in address
    order, which on a Zen 4 host ran 1.5x faster than 8 rows read side by side (BENCHMARKS.md,
    "one row at a time"); not on Intel CPUs, where the row blocks were faster
    (CpuVariant.one_row_decode)."""
    if vw >= 16:
        return 4, (8, 8, 6, 6)
    if vw == 8:
        return 4, (6, 4, 3, 3)
    return 4, (4, 4, 3, 2)


def _decode_rows(vw: int, row_bytes: int) -> tuple[int, ...] | None:
    """Rows of w a decode group of 1..4 tokens reads side by side (irbuilder.by_row_blocks; None:
    one at a time). One row and one token is one FMA chain, vw lanes per FMA latency (4 cycles on
    Zen 3): with 8 f32 lanes that is 8 bytes of f32 weights a cycle, 4 of bf16, under a core's share
    of DRAM. Four rows side by side (two for two tokens): four chains, the same bits. On a Zen 3
    host, rows of 2 KiB or more ran 30% (f32) and 90% (bf16) faster from the cache on one thread,
    and about level to 26% faster from DRAM on two (the longest rows gained most); rows of 1 KiB
    (bf16, 512 inputs) were 25% slower from DRAM, so shorter rows stay one at a time (BENCHMARKS.md,
    "Decode rows side by side"). 16-lane (AVX-512) variants keep one row: not measured there."""
    return (4, 2, 1, 1) if vw <= 8 and row_bytes >= 2048 else None


def _dot_tile(b, arows, brows, n, vw, pf=None, pf_stride=0, bst=None):
    """Dot products of each of the c rows `arows` (f32) with each of the r rows `brows`
    (pointers to elements stored as `bst`, an irbuilder.Storage; default f32) over n elements,
    in one pass: c*r vector accumulators reduced together by one hsum_many. Lane ci*r + ri of
    the result is dot(arows[ci], brows[ri]), summed in an order that does not depend on c or r:
    lane j of an accumulator is the fma chain over elements j, j + vw, ... (tails zero-padded),
    and the lanes are summed by hsum_many's tree. With `pf`, the cache line at pf + ri*pf_stride +
    off (elements of bst) is prefetched next to each full vector of brows[ri] (the data the
    caller reads next, so that memory streams while this tile computes)."""
    c, r = len(arows), len(brows)
    bst = bst or _F32
    accs = [[irb.var(b, irb.vty(vw), _zero(vw)) for _ in range(r)] for _ in range(c)]
    line = 64 // bst.itemsize  # elements per cache line: prefetch once per line

    def chunk(cb, off, w, slot):
        bv = [bst.load(cb, bp, off, w) for bp in brows]
        if pf is not None and w == vw and (slot % max(1, line // vw) == 0):
            for ri in range(r):
                irb.prefetch(cb, bst.gep(cb, pf, cb.add(off, i64(ri * pf_stride)), inbounds=False))
        for ci in range(c):
            av = irb.load_vec(cb, arows[ci], off, w)
            for ri in range(r):
                # (a tail's narrower vectors are zero-padded: lane j of every accumulator is an
                # fma chain over elements j, vw + j, ...; kernels that sum alike rely on it)
                acc = irb.fma(cb, irb.widen(cb, bv[ri], vw), irb.widen(cb, av, vw), cb.load(accs[ci][ri]))
                cb.store(acc, accs[ci][ri])
    irb.vector_loop(b, n, vw, chunk, unroll=max(1, line // vw) if pf is not None else 1)
    return irb.hsum_many(b, [b.load(accs[ci][ri]) for ci in range(c) for ri in range(r)])


def _linear_micro(b, A, p, vw, j0, t0, r, c, k0=None, klen=None, first=True, pf=None):
    """out[t0:t0+c, j0:j0+r] = x[t0:t0+c, k0:k0+klen] . w[j0:j0+r, k0:k0+klen]^T (one
    _dot_tile). The first k slice (`first`: bool or i1) stores the result plus bias and
    residual; later ones add to out. `pf`: w rows to prefetch (see _dot_tile)."""
    k, klen, k0 = p.k, p.k if klen is None else klen, i64(k0 or 0)
    wst = irb.storage(p.w_dtype)
    wrow = [wst.gep(b, A.w, b.add(b.mul(b.add(j0, i64(ri)), i64(k)), k0)) for ri in range(r)]
    xrow = [irb.gep(b, _row(b, A.x, b.add(t0, i64(ci)), A.ld_x), k0) for ci in range(c)]
    if pf is not None:  # the same k offset in the rows to prefetch
        pf = wst.gep(b, pf, k0, inbounds=False)
    sums = _dot_tile(b, xrow, wrow, klen, vw, pf, k, wst)

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


def _emit_linear(module, fn, b, p, cpu):
    vw = cpu.vector_width
    _positive(n=p.n, k=p.k)
    C, rows = _linear_blocking(vw)
    T = _arg(fn, "T")
    wst = irb.storage(p.w_dtype)
    row_bytes = p.k * wst.itemsize

    def row_blocks(b, R, block, extra):
        """one parallel loop over blocks of R rows of w: block(cb, args, extra, j0, rows)"""
        nbf, rrem = divmod(p.n, R)

        def body(cb, rb, vals):
            A = irb.named(fn, vals)
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

    def groups(b, n_tok):
        """n_tok tokens in ng = ceil(n_tok / C) groups: `extra` of base+1 tokens, then base"""
        ng = b.sdiv(b.add(n_tok, i64(C - 1)), i64(C))
        return ng, b.sdiv(n_tok, ng), b.srem(n_tok, ng)

    def token_groups(cb, A, ex, j0, r, cs, k0, klen, pf):
        """the r rows of w at j0 times each group of tokens (sizes in `cs`) over the k slice
        [k0, k0+klen): the w rows stay in L1 while the groups pass"""
        t_lo, ng, base, extra = ex
        first = True if klen == p.k else cb.icmp_signed("==", k0, i64(0))
        with irb.for_range(cb, 0, ng, 1, "tg") as g:
            t0 = cb.add(t_lo, cb.add(cb.mul(g, base), irb.imin(cb, g, extra)))
            c_run = cb.add(base, cb.zext(cb.icmp_signed("<", g, extra), I64))
            for c in cs:
                with cb.if_then(cb.icmp_signed("==", c_run, i64(c))):
                    _linear_micro(cb, A, p, vw, j0, t0, r, c, k0, klen, first,
                                  pf)

    def one_pass(R, cs, streamed):
        """block(): all k slices of the row block in turn (each w slice and x[:, slice] stay
        in L1), prefetching the next block's rows meanwhile (the hardware prefetcher alone
        leaves memory idle while a block computes)"""
        ahead = irb.rows_ahead(R, row_bytes, streamed)

        def block(cb, A, ex, j0, r):
            pf = wst.gep(cb, A.w, cb.mul(cb.add(j0, i64(ahead)), i64(p.k)), inbounds=False)
            if n_kc:
                with irb.for_range(cb, 0, n_kc * KC, KC, "kc") as k0:
                    token_groups(cb, A, ex, j0, r, cs, k0, KC, pf)
            if k_rem:
                token_groups(cb, A, ex, j0, r, cs, i64(n_kc * KC), k_rem, pf)
        return block

    def k_slice(klen):
        """block(): one k slice, its start in `ex`"""
        def block(cb, A, ex, j0, r):
            token_groups(cb, A, ex[1:], j0, r, range(1, C + 1), ex[0], klen, None)
        return block

    # k in slices of KC: a row block's w slice stays in L1 while token groups pass
    nkc = -(-p.k // _LIN_KC)
    KC = -(-p.k // nkc)
    KC = -(-KC // vw) * vw  # whole vectors
    n_kc, k_rem = divmod(p.k, KC)
    # Decode and short prefill (x[:T] fits in L2): one parallel pass over w, each row block
    # read once from memory for all T tokens; its row count follows the largest group.
    small_t = max(4 * C, min(128, _LIN_X_BYTES * 2 // (4 * p.k)))
    # Longer prefill: tokens in slices of TB whose x[:, k slice] stays in L2 while all rows
    # of w stream past, one parallel pass per (token slice, k slice).
    TB = max(C, (_LIN_X_BYTES // (4 * min(p.k, KC))) // C * C)

    with b.if_then(b.icmp_signed(">", T, i64(0))):
        with b.if_else(b.icmp_signed("<=", T, i64(small_t))) as (small, large):
            with small:
                ng, base, extra = groups(b, T)
                cmax = b.add(base, b.zext(b.icmp_signed(">", extra, i64(0)), I64))
                irb.by_row_blocks(b, ng, cmax, rows,
                                  lambda r, sizes, streamed: row_blocks(b, r, one_pass(r, sizes, streamed),
                                                                        (i64(0), ng, base, extra)),
                                  cpu.one_row_decode, _decode_rows(vw, row_bytes))
            with large:
                def fma_prefill():
                    R = rows[C - 1]
                    with irb.for_range(b, 0, T, TB, "tsb") as t_lo:
                        ex = (t_lo,) + groups(b, b.sub(irb.imin(b, T, b.add(t_lo, i64(TB))), t_lo))
                        if n_kc:
                            with irb.for_range(b, 0, n_kc * KC, KC, "kc") as k0:
                                row_blocks(b, R, k_slice(KC), (k0,) + ex)
                        if k_rem:
                            row_blocks(b, R, k_slice(k_rem), (i64(n_kc * KC),) + ex)
                if _amx_applies(p, cpu):
                    ready = b.call(irb.declare(module, "llmir_amx_ready", irb.I32, []), [])
                    with b.if_else(b.icmp_signed("!=", ready, irb.i32(0))) as (tiles, vectors):
                        with tiles:
                            _amx_linear(module, fn, b, p)
                        with vectors:
                            fma_prefill()
                else:
                    fma_prefill()
    b.ret_void()


# --- linear on AMX tiles (bf16 weights, prefill)

_AMX_PANEL_BYTES = 1 << 20  # packed x of a token panel (4 bytes per element: hi + lo) stays in L2


def _amx_applies(p, cpu) -> bool:
    """bf16 weights whose rows are whole 32-element k-blocks and whose n is whole 16-row tiles, on a
    variant with AMX-BF16 (the tiles are used at run time only if the OS grants them)."""
    return cpu.has("amx-bf16") and p.w_dtype == "bfloat16" and p.k % 32 == 0 and p.n % 16 == 0


def _amx_linear(module, fn, b, p):
    """out = x . w^T (+ bias) (+ residual) with AMX-BF16 tiles (see amx.py): per panel of tokens,
    x is split into bf16 hi + lo parts and packed for the B operand (in parallel over 16-token x
    32-k sub-blocks), then threads claim pairs of 16-row blocks of w and run the micro-kernel over
    the panel's 32-token blocks, transposing its C^T tiles into out."""
    T, KB = _arg(fn, "T"), p.k // 32
    panel = max(32, min(512, _AMX_PANEL_BYTES // (4 * p.k) // 32 * 32))  # tokens per panel
    xp = b.call(irb.declare(module, "llmir_scratch", PTR, [I64]), [i64(panel * p.k * 4)])
    bf16 = irb.storage("bfloat16")

    def pack(cb, item, vals):
        """sub-block (16 tokens j, k-block kb) of the panel at t_lo into B tiles (hi and lo)"""
        A, (t_lo, xp_) = irb.named(fn, vals), vals[len(fn.args):]
        j, kb = cb.udiv(item, i64(KB)), cb.urem(item, i64(KB))
        his, los = [], []
        for ti in range(16):
            t = cb.add(t_lo, cb.add(cb.mul(j, i64(16)), i64(ti)))
            ok = cb.icmp_signed("<", t, A.T)  # past T: zeros (read row 0 rather than past the end)
            row = irb.gep(cb, _row(cb, A.x, cb.select(ok, t, i64(0)), A.ld_x), cb.mul(kb, i64(32)))
            x = [cb.select(ok, irb.load_vec(cb, row, h * 16, 16), _zero(16)) for h in range(2)]
            hi = [irb.bf16_round(cb, v) for v in x]
            lo = [irb.bf16_round(cb, cb.fsub(v, irb.bf16_widen(cb, w))) for v, w in zip(x, hi)]
            # 32 bf16 of the row as 16 pairs (k even, k odd): i32 lanes
            his.append(cb.bitcast(irb.concat(cb, hi), irb.vty(16, irb.I32)))
            los.append(cb.bitcast(irb.concat(cb, lo), irb.vty(16, irb.I32)))
        base = irb.gep(cb, xp_, cb.add(cb.mul(cb.udiv(j, i64(2)), i64(KB * 4096)),
                                       cb.add(cb.mul(kb, i64(4096)), cb.mul(cb.urem(j, i64(2)), i64(1024)))), irb.I8)
        for h, part in enumerate((his, los)):
            for r, v in enumerate(irb.transpose(cb, part)):  # row r: pair r of every token
                cb.store(v, irb.gep(cb, base, 2048 * h + 64 * r, irb.I8), align=64)

    def compute(cb, item, vals):
        """rows n0 = 32*item (.. +32, or +16 for the last of an odd count) over the panel"""
        A, (t_lo, xp_, tn) = irb.named(fn, vals), vals[len(fn.args):]
        n0 = cb.mul(item, i64(32))
        ct = irb.var(cb, ir.ArrayType(F32, panel // 32 * 2 * 2 * 256), name="ct")
        w = bf16.gep(cb, A.w, cb.mul(n0, i64(p.k)))

        def blocks(nb):
            micro = amx.declare(module, nb)
            nblocks = cb.sdiv(cb.add(tn, i64(31)), i64(32))
            cb.call(micro, [ct, w, i64(2 * p.k), xp_, i64(KB), nblocks])
            with irb.for_range(cb, 0, nblocks, 1, "tb32") as tb:
                for i in range(nb):
                    for h in range(2):
                        first = cb.add(cb.mul(tb, i64(nb * 2 * 256)), i64((2 * i + h) * 256))
                        tile = [irb.load_vec(cb, ct, cb.add(first, i64(16 * r)), 16) for r in range(16)]
                        cols = cb.add(n0, i64(16 * i))
                        bias = irb.load_vec(cb, A.bias, cols, 16) if p.bias else None
                        for c, v in enumerate(irb.transpose(cb, tile)):  # token c of the tile
                            t = cb.add(t_lo, cb.add(cb.mul(tb, i64(32)), i64(16 * h + c)))
                            with cb.if_then(cb.icmp_signed("<", t, A.T)):
                                if bias is not None:
                                    v = cb.fadd(v, bias)
                                if p.residual:
                                    v = cb.fadd(v, irb.load_vec(cb, _row(cb, A.residual, t, A.ld_res), cols, 16))
                                irb.store_vec(cb, v, _row(cb, A.out, t, A.ld_out), cols)
        if p.n % 32:
            with cb.if_else(cb.icmp_signed("<", cb.add(n0, i64(32)), i64(p.n + 1))) as (two, one):
                with two:
                    blocks(2)
                with one:
                    blocks(1)
        else:
            blocks(2)

    with irb.for_range(b, 0, T, panel, "panel") as t_lo:
        tn = irb.imin(b, i64(panel), b.sub(T, t_lo))
        nj = b.mul(b.sdiv(b.add(tn, i64(31)), i64(32)), i64(2))  # 16-token sub-blocks, padded to 32
        irb.parallel_for(module, b, b.mul(nj, i64(KB)), pack, irb.min_items(16 * 32 * 8),
                         captures=list(fn.args) + [t_lo, xp])
        irb.parallel_for(module, b, i64(-(-p.n // 32)), compute, irb.min_items(32 * p.k),
                         captures=list(fn.args) + [t_lo, xp, tn])


# --- rope

def _rope_table(module, fn, p):
    """(rotary_dim, the inv_freq table as an internal constant) of a rope's params, checked."""
    rot = p.head_dim if p.rotary_dim is None else p.rotary_dim
    _positive(num_heads=p.num_heads, head_dim=p.head_dim, rotary_dim=rot)
    if rot % 2 or rot > p.head_dim:
        raise ValueError(f"rope: rotary_dim {rot} must be even and <= head_dim {p.head_dim}")
    if p.style not in ("neox", "interleaved"):
        raise ValueError(f"rope: unknown style {p.style!r}")
    inv = [float(v) for v in p.inv_freq]
    if len(inv) != rot // 2:
        raise ValueError(f"rope: inv_freq has {len(inv)} values, expected {rot // 2}")
    tab_ty = ir.ArrayType(F32, rot // 2)
    tab = ir.GlobalVariable(module, tab_ty, module.get_unique_name(fn.name + ".inv_freq"))
    tab.global_constant = True
    tab.linkage = "internal"
    tab.initializer = ir.Constant(tab_ty, [f32(v) for v in inv])
    return rot, tab


def _cos_sin(cb, p, tab, position):
    """Arrays of cos(a) * scaling and sin(a) * scaling, a = position * inv_freq[i] (one f32 multiply)."""
    half = tab.value_type.count
    cos = irb.var(cb, tab.value_type, name="cos")
    sin = irb.var(cb, tab.value_type, name="sin")
    pos = cb.sitofp(cb.trunc(position, irb.I32), F32)
    with irb.for_range(cb, 0, half, 1, "f") as i:
        a = cb.fmul(pos, irb.load_f32(cb, tab, i))
        cs, sn = irb.libm(cb, "cosf", a), irb.libm(cb, "sinf", a)
        if float(p.scaling) != 1.0:
            cs, sn = cb.fmul(cs, f32(float(p.scaling))), cb.fmul(sn, f32(float(p.scaling)))
        cb.store(cs, irb.gep(cb, cos, i))
        cb.store(sn, irb.gep(cb, sin, i))
    return cos, sin


def _rotate_heads(cb, p, vw, rot, cos, sin, src, nh, dst, dst_head_stride, st):
    """dst[h * dst_head_stride + i] = rope(src[h * head_dim + i]) for nh heads (f32 src; dst stored
    as `st`, an irbuilder.Storage); columns past rot copied. dst may be src."""
    half = rot // 2
    with irb.for_range(cb, 0, nh, 1, "h") as h:
        xh = irb.gep(cb, src, cb.mul(h, i64(p.head_dim)))
        oh = st.gep(cb, dst, cb.mul(h, i64(dst_head_stride)))

        def rotate(cb, off, w, slot):
            c = irb.load_vec(cb, cos, off, w)
            s = irb.load_vec(cb, sin, off, w)
            if p.style == "neox":
                off2 = cb.add(off, i64(half))
                x1, x2 = irb.load_vec(cb, xh, off, w), irb.load_vec(cb, xh, off2, w)
            else:
                pair = irb.load_vec(cb, xh, cb.mul(off, i64(2)), 2 * w)
                x1 = irb.shuffle(cb, pair, pair, range(0, 2 * w, 2))
                x2 = irb.shuffle(cb, pair, pair, range(1, 2 * w, 2))
            y1 = cb.fsub(cb.fmul(x1, c), cb.fmul(x2, s))
            y2 = cb.fadd(cb.fmul(x2, c), cb.fmul(x1, s))
            if p.style == "neox":
                st.store(cb, y1, oh, off)
                st.store(cb, y2, oh, off2)
            else:
                inter = [v for i in range(w) for v in (i, w + i)]
                st.store(cb, irb.shuffle(cb, y1, y2, inter), oh, cb.mul(off, i64(2)))
        irb.vector_loop(cb, half, vw, rotate)
        if rot < p.head_dim:
            xp, op = irb.gep(cb, xh, rot), st.gep(cb, oh, rot)
            irb.vector_loop(cb, p.head_dim - rot, vw, lambda cb, off, w, s: st.store(
                cb, irb.load_vec(cb, xp, off, w), op, off))


def _emit_rope(module, fn, b, p, cpu):
    rot, tab = _rope_table(module, fn, p)

    def body(cb, t, A):
        cos, sin = _cos_sin(cb, p, tab, irb.load_i32(cb, A.positions, t))
        _rotate_heads(cb, p, cpu.vector_width, rot, cos, sin, _row(cb, A.x, t, A.ld_x), p.num_heads,
                      _row(cb, A.out, t, A.ld_out), p.head_dim, _F32)
    _rows(module, fn, b, _arg(fn, "T"), 20 * rot + 4 * p.num_heads * p.head_dim, body)


def _emit_rope_kv_append(module, fn, b, p, cpu):
    if p.kv_dtype in QUANTIZED_KV:
        raise ValueError(f"rope_kv_append: a {p.kv_dtype} pool keeps rope and kv_append (float pools only)")
    _positive(num_layers=p.num_layers, num_kv_heads=p.num_kv_heads, block_size=p.block_size)
    rot, tab = _rope_table(module, fn, p)
    G, hd, bs = p.num_kv_heads, p.head_dim, p.block_size
    st = irb.storage(p.kv_dtype)

    def body(cb, t, A):
        cos, sin = _cos_sin(cb, p, tab, irb.load_i32(cb, A.positions, t))
        _rotate_heads(cb, p, cpu.vector_width, rot, cos, sin, _row(cb, A.q, t, A.ld_q), p.num_heads,
                      _row(cb, A.out, t, A.ld_out), hd, _F32)
        s = irb.load_i32(cb, A.slot_mapping, t)
        with cb.if_then(cb.icmp_signed(">=", s, i64(0))):
            kdst, vdst = _slot_rows(cb, A, s, G, hd, bs, st)
            _rotate_heads(cb, p, cpu.vector_width, rot, cos, sin, _row(cb, A.k, t, A.ld_k), G, kdst, bs * hd, st)
            vsrc = _row(cb, A.v, t, A.ld_v)
            for g in range(G):
                _copy_head(cb, cpu.vector_width, st, hd, st.gep(cb, vdst, g * bs * hd), irb.gep(cb, vsrc, g * hd))
    _rows(module, fn, b, _arg(fn, "T"), 20 * rot + 4 * (p.num_heads + 2 * G) * hd, body)


# --- KV cache

def _slot_rows(cb, A, s, G, hd, bs, st):
    """Pointers to pool[layer, 0, s / bs, 0, s % bs, 0] and its V counterpart (kv head g is
    g * bs * hd elements further)."""
    blk, off = cb.sdiv(s, i64(bs)), cb.srem(s, i64(bs))
    kv_stride = cb.mul(A.num_blocks, i64(G * bs * hd))
    kbase = cb.add(cb.mul(cb.mul(A.layer, i64(2)), kv_stride),
                   cb.add(cb.mul(blk, i64(G * bs * hd)), cb.mul(off, i64(hd))))
    kdst = st.gep(cb, A.pool, kbase)
    return kdst, st.gep(cb, kdst, kv_stride)


def _copy_head(cb, vw, st, hd, dst, src):
    """hd f32 values from src to dst, stored as `st`."""
    if st.itemsize == 4:
        irb.memcpy(cb, dst, src, hd * 4)
    else:
        irb.vector_loop(cb, hd, vw, lambda c, off, w, _: st.store(c, irb.load_vec(c, src, off, w), dst, off))


def _emit_kv_append(module, fn, b, p, cpu):
    _positive(num_layers=p.num_layers, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
              block_size=p.block_size)
    G, hd, bs = p.num_kv_heads, p.head_dim, p.block_size
    st = irb.storage(p.kv_dtype)

    def body(cb, t, A):
        s = irb.load_i32(cb, A.slot_mapping, t)
        with cb.if_then(cb.icmp_signed(">=", s, i64(0))):
            kdst, vdst = _slot_rows(cb, A, s, G, hd, bs, st)
            ksrc, vsrc = _row(cb, A.k, t, A.ld_k), _row(cb, A.v, t, A.ld_v)
            for g in range(G):
                _copy_head(cb, cpu.vector_width, st, hd, st.gep(cb, kdst, g * bs * hd), irb.gep(cb, ksrc, g * hd))
                _copy_head(cb, cpu.vector_width, st, hd, st.gep(cb, vdst, g * bs * hd), irb.gep(cb, vsrc, g * hd))
    _rows(module, fn, b, _arg(fn, "T"), 2 * G * hd, body, grain=4 * _GRAIN)


_ATTN_HEADS = 8        # prefill: at most this many query heads of one kv head per work unit
_ATTN_SEQ_CAP = 4096   # more sequences than this: one query token per unit (no prefix array)
_ATTN_CHUNK_KEYS = 256  # keys are cut into chunks at multiples of this (of whole blocks)
_ATTN_LEVELS = 8       # levels of the chunks' merge tree kept (above 2^7 chunks: merged in order)
_ATTN_LANES_BELOW_HD = 256  # head_dim from which the row tiles compute attention (not rows in lanes)
_ATTN_PF = 4           # blocks of K/V prefetched ahead (a block computes faster than DRAM latency)
_ATTN_SPLIT_FLOATS = 16384  # split-K partial results live in this much stack (64 KiB)


def _emit_paged_attention(module, fn, b, p, cpu):
    vw = cpu.vector_width
    H, G, hd, bs = p.num_heads, p.num_kv_heads, p.head_dim, p.block_size
    _positive(num_heads=H, num_kv_heads=G, head_dim=hd, block_size=bs)
    if H % G:
        raise ValueError(f"paged_attention: num_heads {H} is not a multiple of num_kv_heads {G}")
    win = int(p.sliding_window or 0)
    if win < 0:
        raise ValueError(f"paged_attention: sliding_window must be >= 0, got {win}")
    softcap = softcap_param(vars(p), "softcap", "paged_attention")
    rep = H // G
    kvs = irb.storage(p.kv_dtype)  # how K/V are stored in the pool
    line = 64 // kvs.itemsize      # elements of K/V per cache line
    int8 = p.kv_dtype == "int8"    # codes, and a scale per (layer, K/V, block, kv head) after them
    if int8 and not p.num_layers:
        raise ValueError("paged_attention: an int8 pool needs num_layers (where its scales start)")
    ACC = 16 if vw >= 16 else 8  # vector accumulators a register tile holds
    RT = 4 if vw >= 16 else 2    # query rows per register tile
    # A work unit is (query block of qn tokens of one sequence, gn consecutive kv heads, a
    # group of hp query heads of each) and walks their keys block by block; its rows
    # (kv head, token, query head) share each K/V block load. Prefill: blocks of QB tokens
    # times HPP heads of one kv head (QB*HPP = ACC rows reuse its K/V block from L1).
    # Decode (one token per sequence): GD kv heads times HPD heads (all of a kv head's
    # heads where they fit: each K/V block is read once), the GD heads' blocks lie next to
    # each other in the pool, so each key block is one contiguous read of
    # GD * block_size * head_dim floats (short random reads cost DRAM bandwidth).
    def divisor(n, ok):
        return max(d for d in range(1, n + 1) if n % d == 0 and ok(d))
    HPP = divisor(rep, lambda d: d <= _ATTN_HEADS and ACC % d == 0)
    QB = ACC // HPP
    HPD = divisor(rep, lambda d: d <= 2 * ACC)
    GD = divisor(G, lambda d: d * HPD <= 2 * ACC)
    RMAX = max(ACC, GD * HPD)
    # Units with a full vector of rows of one kv head (prefill, and decode with one kv head per
    # unit) compute scores with rows in vector lanes, S^T[j] = sum_d Q^T[d] * K[j][d], with
    # the row tiles' summation order (score_lanes), and their online softmax runs across the
    # lanes. NLG lane groups of vw rows; scores are then [lane group][key][lane]. Row tiles
    # end each dot product in horizontal sums, which cost as much as its FMAs when head_dim is
    # small; the lanes pay a load per FMA and the order's partial sums. Measured (BENCHMARKS.md,
    # "CPU attention"): lanes faster at head_dim 64 and a little at 128 with full lane groups,
    # row tiles at 256 and with half-empty groups. (4 lanes and no FMA, the baseline: row tiles.)
    NLG = -(-RMAX // vw)
    RPAD = NLG * vw
    # A softmax state (record): running max m[RPAD], sum l[RPAD], V accumulator acc[RMAX][hd].
    REC = 2 * RPAD + RMAX * hd
    CB = max(1, _ATTN_CHUNK_KEYS // bs)  # blocks per key chunk
    LANE_MIN = vw if vw >= 8 and hd < _ATTN_LANES_BELOW_HD else None
    KGL = 4 if vw >= 16 else 3  # keys per pass of the lane score loop (each with its partial sums)
    hs = bs * hd                 # floats of one kv head's block
    nfull, tail = irb.vector_chunks(hd, vw)
    chunks = [(i * vw, vw) for i in range(nfull)] + tail  # of a head's hd elements
    bchunks = [(i * vw, vw) for i in range(bs // vw)] + irb.vector_chunks(bs, vw)[1]  # of a block's keys
    neg_inf = f32(float("-inf"))

    def key_groups(rt):
        """static (first key, keys) groups covering a block for a score tile of rt rows"""
        kg = max(1, min(bs, 1 << ((ACC // rt).bit_length() - 1)))
        return [(j, min(kg, bs - j)) for j in range(0, bs, kg)]

    def row_tiles(cb, first, n, tile):
        """tile(rho0, rt) over rows [first, first+n) in tiles of RT rows, then a narrower one"""
        end = cb.add(first, n)
        r0 = irb.var(cb, I64, first, "rt")
        with irb.while_(cb, lambda c: c.icmp_signed("<=", c.add(c.load(r0), i64(RT)), end),
                        "rt"):
            tile(cb.load(r0), RT)
            cb.store(cb.add(cb.load(r0), i64(RT)), r0)
        rem = cb.sub(end, cb.load(r0))
        for rt in range(1, RT):
            with cb.if_then(cb.icmp_signed("==", rem, i64(rt))):
                tile(cb.load(r0), rt)

    def find_seq(cb, A, cum, qbi):
        """largest b < B with cum[b] <= qbi (binary search)"""
        lo = irb.var(cb, I64, i64(0), "lo")
        hi = irb.var(cb, I64, A.B, "hi")
        with irb.while_(cb, lambda c: c.icmp_signed(">", c.sub(c.load(hi), c.load(lo)), i64(1)),
                        "bs"):
            lv, hv = cb.load(lo), cb.load(hi)
            mid = cb.lshr(cb.add(lv, hv), i64(1))
            le = cb.icmp_signed("<=", irb.load_i32(cb, cum, mid), qbi)
            cb.store(cb.select(le, mid, lv), lo)
            cb.store(cb.select(le, hv, mid), hi)
        return cb.load(lo)

    def unit_rows(cb, A, unit, L):
        """A unit's rows rho = (gg*qn + qi)*hp + hh (kv head g0+gg, token t0+qi, its query
        head hh of the unit's group): q and out pointers, key range [lo, hi]; and the union
        [klo, khi] of the ranges (the same for every head)."""
        ns = cb.udiv(i64(rep), L.hp)  # query head groups per kv head
        gu = cb.mul(cb.udiv(i64(G), L.gn), ns)  # units per query block
        qbi, gs = cb.udiv(unit, gu), cb.urem(unit, gu)
        g0 = cb.mul(cb.udiv(gs, ns), L.gn)
        hq = cb.mul(cb.urem(gs, ns), L.hp)  # first query head within a kv head
        seq = find_seq(cb, A, L.cum, qbi)
        t0 = cb.add(irb.load_i32(cb, A.query_start_loc, seq),
                    cb.mul(cb.sub(qbi, irb.load_i32(cb, L.cum, seq)), L.qb))
        qn = irb.imin(cb, L.qb, cb.sub(irb.load_i32(cb, A.query_start_loc,
                                                    cb.add(seq, i64(1))), t0))
        slen = irb.load_i32(cb, A.seq_lens, seq)
        rh = cb.mul(qn, L.hp)  # rows per kv head
        u = SimpleNamespace(seq=seq, g0=g0, rh=rh, R=cb.mul(rh, L.gn),
                            qp=irb.var(cb, ir.ArrayType(PTR, RMAX), name="qp"),
                            op=irb.var(cb, ir.ArrayType(PTR, RMAX), name="op"),
                            lo=irb.var(cb, ir.ArrayType(I64, RMAX), name="lo"),
                            hi=irb.var(cb, ir.ArrayType(I64, RMAX), name="hi"))
        klo = irb.var(cb, I64, i64(2 ** 62), "klo")
        khi = irb.var(cb, I64, i64(-1), "khi")
        with irb.for_range(cb, 0, qn, 1, "qi") as qi:
            t = cb.add(t0, qi)
            pos = irb.load_i32(cb, A.positions, t)
            # keys up to the token's own position; never past the sequence's cached length
            hi = irb.imin(cb, pos, cb.sub(slen, i64(1)))
            lo = irb.imax(cb, i64(0), cb.sub(pos, i64(win - 1))) if win else i64(0)
            cb.store(irb.imin(cb, cb.load(klo), lo), klo)
            cb.store(irb.imax(cb, cb.load(khi), hi), khi)
            with irb.for_range(cb, 0, L.gn, 1, "gg") as gg:
                h0 = cb.add(cb.mul(cb.add(g0, gg), i64(rep)), hq)
                qrow = irb.gep(cb, _row(cb, A.q, t, A.ld_q), cb.mul(h0, i64(hd)))
                orow = irb.gep(cb, _row(cb, A.out, t, A.ld_out), cb.mul(h0, i64(hd)))
                with irb.for_range(cb, 0, L.hp, 1, "hh") as hh:
                    rho = cb.add(cb.mul(cb.add(cb.mul(gg, qn), qi), L.hp), hh)
                    cb.store(irb.gep(cb, qrow, cb.mul(hh, i64(hd))), irb.gep(cb, u.qp, rho, PTR))
                    cb.store(irb.gep(cb, orow, cb.mul(hh, i64(hd))), irb.gep(cb, u.op, rho, PTR))
                    cb.store(lo, irb.gep(cb, u.lo, rho, I64))
                    cb.store(hi, irb.gep(cb, u.hi, rho, I64))
        u.klo, u.khi = cb.load(klo), cb.load(khi)
        return u

    def row_ptr(cb, arr, rho):
        return cb.load(irb.gep(cb, arr, rho, PTR), typ=PTR)

    def row_i64(cb, arr, rho):
        return cb.load(irb.gep(cb, arr, rho, I64), typ=I64)

    def launch(vals):
        """the caller's per-call values the parallel body and the combine share"""
        A = irb.named(fn, vals)
        cum, qb, gn, hp, U, S, lvl, scratch = vals[len(fn.args):]
        return A, SimpleNamespace(cum=cum, qb=qb, gn=gn, hp=hp, U=U, S=S, lvl=lvl, scratch=scratch)

    def body(cb, item, vals):
        A, L = launch(vals)
        unit = cb.sub(cb.sub(L.U, i64(1)), cb.udiv(item, L.S))  # last query blocks first:
        s = cb.urem(item, L.S)                                 # they have the most keys
        u = unit_rows(cb, A, unit, L)
        # per-row online-softmax state (a record: running max, sum, V accumulator), the
        # rescale factor of a block, and the merge tree's pending states
        st = irb.var(cb, ir.ArrayType(F32, REC), name="state")
        m_arr, l_arr, acc = rec_m(cb, st), rec_l(cb, st), rec_acc(cb, st)
        c_arr = irb.var(cb, ir.ArrayType(F32, RPAD), name="corr")
        scores = irb.var(cb, ir.ArrayType(F32, RPAD * bs), name="scores")
        tree = Tree(cb, u.R)
        reset(cb, st, u.R)
        if LANE_MIN:
            lanes = cb.and_(cb.icmp_signed("==", L.gn, i64(1)),
                            cb.icmp_signed(">=", u.rh, i64(LANE_MIN)))
            qt = irb.var(cb, ir.ArrayType(F32, NLG * hd * vw), name="qt")
            lo_v = irb.var(cb, ir.ArrayType(irb.I32, RPAD), name="lo_v")
            hi_v = irb.var(cb, ir.ArrayType(irb.I32, RPAD), name="hi_v")
            # keys stored narrower than f32: the block's keys widened once, so the score loop
            # broadcasts an f32 from L1 (a half or int8 element costs an insert and a convert
            # per FMA there: half of AVX2's prefill time at 2048 tokens went to it)
            kf = irb.var(cb, ir.ArrayType(F32, hs), name="kf") if kvs.itemsize < 4 else None
            with cb.if_then(lanes):
                transpose_q(cb, u, qt, lo_v, hi_v)

        kv_stride = cb.mul(A.num_blocks, i64(G * hs))
        heads = kvs.gep(cb, A.pool, cb.add(cb.mul(cb.mul(A.layer, i64(2)), kv_stride),
                                          cb.mul(u.g0, i64(hs))))
        bt = irb.gep(cb, A.block_tables, cb.mul(u.seq, A.max_blocks), irb.I32)

        def kbase(idx):
            """K of the unit's first kv head in logical block idx (its others follow)"""
            return kvs.gep(cb, heads, cb.mul(irb.load_i32(cb, bt, idx), i64(G * hs)))

        with cb.if_then(cb.icmp_signed("<=", u.klo, u.khi)):
            # the unit's key blocks [lb0, lb1] in chunks of CB blocks at fixed multiples (chunk c:
            # blocks [c CB, (c+1) CB)); this item takes those of group (c0 >> lvl) + s, the
            # chunks [grp 2^lvl, (grp+1) 2^lvl) (all of them when the call does not split: lvl = 62)
            lb0, lb1 = cb.sdiv(u.klo, i64(bs)), cb.sdiv(u.khi, i64(bs))
            c0, c1 = cb.sdiv(lb0, i64(CB)), cb.sdiv(lb1, i64(CB))
            grp = cb.add(cb.ashr(c0, L.lvl), s)
            ca = irb.imax(cb, c0, cb.shl(grp, L.lvl))
            ce = irb.imin(cb, cb.add(c1, i64(1)), cb.shl(cb.add(grp, i64(1)), L.lvl))
            lb_a = irb.imax(cb, lb0, cb.mul(ca, i64(CB)))  # this item's blocks
            lb_e = irb.imin(cb, cb.add(lb1, i64(1)), cb.mul(ce, i64(CB)))
            many = cb.icmp_signed(">", cb.sub(ce, ca), i64(1))
            # the first blocks: the loop below prefetches _ATTN_PF blocks ahead of itself
            with irb.for_range(cb, lb_a, irb.imin(cb, lb_e, cb.add(lb_a, i64(_ATTN_PF))), 1,
                               "pf") as lb:
                kp = kbase(lb)
                with irb.for_range(cb, 0, cb.mul(L.gn, i64(hs)), line, "pfl") as off:
                    irb.prefetch(cb, kvs.gep(cb, kp, off))
                    irb.prefetch(cb, kvs.gep(cb, kp, cb.add(off, kv_stride)))
            with irb.for_range(cb, ca, ce, 1, "chunk") as c:
                with cb.if_then(cb.icmp_signed(">", c, ca)):
                    reset(cb, st, u.R)
                with irb.for_range(cb, irb.imax(cb, lb_a, cb.mul(c, i64(CB))),
                                   irb.imin(cb, lb_e, cb.mul(cb.add(c, i64(1)), i64(CB))), 1, "lb") as lb:
                    kb = kbase(lb)
                    nkb = kbase(irb.imin(cb, cb.add(lb, i64(_ATTN_PF)), cb.sub(lb_e, i64(1))))
                    first = cb.mul(lb, i64(bs))
                    o0 = cb.sub(irb.imax(cb, u.klo, first), first)
                    o1 = cb.sub(irb.imin(cb, cb.add(u.khi, i64(1)), cb.add(first, i64(bs))), first)
                    with irb.for_range(cb, 0, L.gn, 1, "gg") as gg:
                        k = kvs.gep(cb, kb, cb.mul(gg, i64(hs)))
                        nk = kvs.gep(cb, nkb, cb.mul(gg, i64(hs)))
                        blk = SimpleNamespace(k=k, v=kvs.gep(cb, k, kv_stride), nk=nk,
                                              nv=kvs.gep(cb, nk, kv_stride), first=first,
                                              ks=None, vs=None)
                        if int8:  # the block's K and V scales: keys scale the scores, values the p_j
                            sidx = cb.add(cb.mul(cb.add(cb.mul(cb.mul(A.layer, i64(2)), A.num_blocks),
                                                        irb.load_i32(cb, bt, lb)), i64(G)), cb.add(u.g0, gg))
                            sbase = irb.gep(cb, A.pool, cb.mul(A.num_blocks, i64(p.num_layers * 2 * G * hs)), irb.I8)
                            blk.ks = cb.load(irb.gep(cb, sbase, cb.mul(sidx, i64(4)), irb.I8), typ=F32, align=1)
                            blk.vs = cb.load(irb.gep(cb, sbase, cb.mul(cb.add(sidx, cb.mul(A.num_blocks, i64(G))),
                                                                       i64(4)), irb.I8), typ=F32, align=1)
                        r_first = cb.mul(gg, u.rh)

                        def by_lanes():  # (one kv head: r_first = 0)
                            if kf is not None:
                                irb.vector_loop(cb, hs, vw, lambda c, off, w, _: irb.store_vec(
                                    c, kvs.load(c, blk.k, off, w), kf, off), unroll=4)
                            for lg in range(NLG):
                                with cb.if_then(cb.icmp_signed("<", i64(lg * vw), u.rh)):
                                    score_lanes(cb, blk, qt, lo_v, hi_v, scores, lg, kf)
                                    softmax_lanes(cb, scores, m_arr, l_arr, c_arr, lg, blk.vs)
                            row_tiles(cb, r_first, u.rh, lambda r0, rt: pv_tile(
                                cb, blk, scores, c_arr, acc, o0, o1, r0, rt, r_first, True))

                        def by_rows():
                            row_tiles(cb, r_first, u.rh, lambda r0, rt: score_tile(
                                cb, u, blk, scores, r0, rt, r_first))
                            with irb.for_range(cb, r_first, cb.add(r_first, u.rh), 1, "sm") as rho:
                                softmax_row(cb, rho, scores, m_arr, l_arr, c_arr, blk.vs)
                            row_tiles(cb, r_first, u.rh, lambda r0, rt: pv_tile(
                                cb, blk, scores, c_arr, acc, o0, o1, r0, rt, r_first, False))
                        if LANE_MIN:
                            with cb.if_else(lanes) as (then, otherwise):
                                with then:
                                    by_lanes()
                                with otherwise:
                                    by_rows()
                        else:
                            by_rows()

                with cb.if_then(many):
                    tree.push(st, c, i64(0))
            with cb.if_then(many):
                tree.fold(st)

        with cb.if_else(cb.icmp_signed("==", L.S, i64(1))) as (whole, part):
            with whole:
                finish(cb, st, u)
            with part:  # the group's state, for the combine after the parallel loop
                copy_rec(cb, st, irb.gep(cb, L.scratch, cb.mul(item, i64(REC))), u.R)

    def score_tile(cb, u, blk, scores, r0, rt, r_first):
        """scores[rho][0:bs] = scale * q_rho . K_j for rows r0..r0+rt and all keys of the
        block, -inf outside each row's key range; the head's first tile prefetches the keys
        of the block _ATTN_PF ahead"""
        rows = [cb.add(r0, i64(ri)) for ri in range(rt)]
        qrows = [row_ptr(cb, u.qp, r) for r in rows]
        lo = [row_i64(cb, u.lo, r) for r in rows]
        hi = [row_i64(cb, u.hi, r) for r in rows]
        pf = cb.select(cb.icmp_signed("==", r0, r_first), blk.nk, blk.k)
        for j0, kg in key_groups(rt):
            krows = [kvs.gep(cb, blk.k, (j0 + kk) * hd) for kk in range(kg)]
            sums = _dot_tile(cb, qrows, krows, hd, vw, kvs.gep(cb, pf, j0 * hd), hd, kvs)
            keys = cb.add(irb.splat(cb, cb.add(blk.first, i64(j0)), kg),
                          ir.Constant(irb.vty(kg, I64), list(range(kg))))
            for ri in range(rt):
                sv = scaled(cb, irb.lanes(cb, sums, ri * kg, kg), blk)
                ok = cb.and_(cb.icmp_signed(">=", keys, irb.splat(cb, lo[ri], kg)),
                             cb.icmp_signed("<=", keys, irb.splat(cb, hi[ri], kg)))
                sv = cb.select(ok, sv, irb.splat(cb, neg_inf, kg))
                dst = irb.gep(cb, scores, cb.add(cb.mul(rows[ri], i64(bs)), i64(j0)))
                cb.store(sv, dst, align=4)

    def scaled(cb, dots, blk):
        """scores of a vector of q.K dot products: times the scale (and an int8 block's K scale),
        soft-capped where p.softcap is set"""
        s = f32(p.scale) if blk.ks is None else cb.fmul(f32(p.scale), blk.ks)
        sv = cb.fmul(dots, irb.splat(cb, s, irb.width(dots)))
        return irb.softcap(cb, sv, softcap) if softcap else sv

    def softmax_row(cb, rho, scores, m_arr, l_arr, c_arr, vs):
        """online softmax over one block: running max and sum, p_j = exp(s_j - max) in
        place, and the factor that rescales the row's earlier V sum"""
        srow = irb.gep(cb, scores, cb.mul(rho, i64(bs)))
        sv = [irb.load_vec(cb, srow, off, w) for off, w in bchunks]
        mb = None
        for v in sv:
            hv = irb.hmax(cb, v) if irb.width(v) > 1 else cb.extract_element(v, irb.i32(0))
            mb = hv if mb is None else irb.fmax(cb, mb, hv)
        m_old = irb.load_f32(cb, m_arr, rho)
        m_new = irb.fmax(cb, m_old, mb)
        # a row with no key so far keeps max -inf: subtract 0 instead (its p_j are all 0)
        m_sub = cb.select(cb.fcmp_ordered("==", m_new, neg_inf), f32(0.0), m_new)
        corr = irb.exp(cb, cb.fsub(m_old, m_sub))
        lsum = None
        for (off, w), v in zip(bchunks, sv):
            pv = irb.exp(cb, cb.fsub(v, irb.splat(cb, m_sub, w)))
            irb.store_vec(cb, pv if vs is None else cb.fmul(pv, irb.splat(cb, vs, w)), srow, off)
            ps = cb.extract_element(irb.hsum_many(cb, [pv]), irb.i32(0))  # (softmax_lanes sums alike)
            lsum = ps if lsum is None else cb.fadd(lsum, ps)
        cb.store(m_new, irb.gep(cb, m_arr, rho))
        cb.store(cb.fadd(cb.fmul(irb.load_f32(cb, l_arr, rho), corr), lsum),
                 irb.gep(cb, l_arr, rho))
        cb.store(corr, irb.gep(cb, c_arr, rho))

    def transpose_q(cb, u, qt, lo_v, hi_v):
        """Q^T of a unit with rows in lanes: qt[lane group][d][lane] = q_rho[d] (0 in lanes
        without a row), and each lane's key range as i32 (empty without a row)"""
        irb.vector_loop(cb, NLG * hd * vw, vw, lambda c, off, w, _: irb.store_vec(
            c, _zero(w), qt, off))
        for lg in range(NLG):
            cb.store(irb.splat(cb, irb.i32(2 ** 31 - 1), vw), irb.gep(cb, lo_v, lg * vw, irb.I32),
                     align=4)
            cb.store(irb.splat(cb, irb.i32(-1), vw), irb.gep(cb, hi_v, lg * vw, irb.I32),
                     align=4)
        with irb.for_range(cb, 0, u.rh, 1, "qt") as rho:
            q = row_ptr(cb, u.qp, rho)
            col = irb.gep(cb, qt, cb.add(cb.mul(cb.udiv(rho, i64(vw)), i64(hd * vw)),
                                         cb.urem(rho, i64(vw))))
            with irb.for_range(cb, 0, hd, 1, "d") as d:
                cb.store(irb.load_f32(cb, q, d), irb.gep(cb, col, cb.mul(d, i64(vw))))
            for arr, src in ((lo_v, u.lo), (hi_v, u.hi)):
                cb.store(cb.trunc(row_i64(cb, src, rho), irb.I32), irb.gep(cb, arr, rho, irb.I32))

    def score_lanes(cb, blk, qt, lo_v, hi_v, scores, lg, kf):
        """S^T[j] = scale * sum_d Q^T[d] K_j[d] for the vw rows of lane group lg and all keys
        of the block (read from kf, their f32 copy, where given), -inf outside each lane's key
        range; group 0 prefetches the keys of the block _ATTN_PF ahead"""
        kst, kbase = (irb.storage("float32"), kf) if kf is not None else (kvs, blk.k)
        q0 = irb.gep(cb, qt, lg * hd * vw)
        lo = cb.load(irb.gep(cb, lo_v, lg * vw, irb.I32), typ=irb.vty(vw, irb.I32), align=4)
        hi = cb.load(irb.gep(cb, hi_v, lg * vw, irb.I32), typ=irb.vty(vw, irb.I32), align=4)
        pf = blk.nk if lg == 0 else None

        def key_group(j0, kg):
            """keys j0..j0+kg-1 (j0 may be a runtime value): each key's dot products in
            _dot_tile's order (lane i: the fma chain over elements i, vw + i, ... of `chunks`,
            zero-padded past a tail; then hsum_many's tree over i), rows in lanes"""
            krow = [kst.gep(cb, kbase, cb.mul(cb.add(j0, i64(kk)), i64(hd))) for kk in range(kg)]
            if pf is not None:
                for kk in range(kg):
                    prow = kvs.gep(cb, pf, cb.mul(cb.add(j0, i64(kk)), i64(hd)))
                    for off in range(0, hd, line):
                        irb.prefetch(cb, kvs.gep(cb, prow, off))
            trees = [irb.Butterfly(cb) for _ in range(kg)]
            order = irb.bit_reversed(vw)
            for n0 in range(0, vw, 2):  # two lanes' chains at once: more independent FMAs in flight
                lanes_ = order[n0:n0 + 2]
                accs = [[_zero(vw)] * kg for _ in lanes_]
                for off, w in chunks:
                    for li, i in enumerate(lanes_):
                        if i < w:
                            qv = irb.load_vec(cb, q0, (off + i) * vw, vw)
                            accs[li] = [irb.fma(cb, qv, irb.splat(cb, kst.load(cb, krow[kk], off + i, 0), vw), a)
                                        for kk, a in enumerate(accs[li])]
                        else:  # (_dot_tile's zero padding: + 0 * 0)
                            accs[li] = [cb.fadd(a, _zero(vw)) for a in accs[li]]
                for chains in accs:
                    for tree, a in zip(trees, chains):
                        tree.add(a)
            for kk, tree in enumerate(trees):
                key = cb.trunc(cb.add(blk.first, cb.add(j0, i64(kk))), irb.I32)
                kv = irb.splat(cb, key, vw)
                ok = cb.and_(cb.icmp_signed(">=", kv, lo), cb.icmp_signed("<=", kv, hi))
                sv = scaled(cb, tree.total(), blk)
                irb.store_vec(cb, cb.select(ok, sv, irb.splat(cb, neg_inf, vw)), scores,
                              cb.mul(cb.add(i64(lg * bs), cb.add(j0, i64(kk))), i64(vw)))
        with irb.for_range(cb, 0, bs // KGL * KGL, KGL, "kg") as j0:
            key_group(j0, KGL)
        if bs % KGL:
            key_group(i64(bs // KGL * KGL), bs % KGL)

    def softmax_lanes(cb, scores, m_arr, l_arr, c_arr, lg, vs):
        """softmax_row for the vw rows of lane group lg at once (scores in lanes layout)"""
        srow = irb.gep(cb, scores, lg * bs * vw)
        mb = irb.var(cb, irb.vty(vw), irb.splat(cb, neg_inf, vw), "mb")
        with irb.for_range(cb, 0, bs, 1, "mx") as j:
            cb.store(irb.fmax(cb, cb.load(mb), irb.load_vec(cb, srow, cb.mul(j, i64(vw)), vw)),
                     mb)
        m_old = irb.load_vec(cb, m_arr, lg * vw, vw)
        m_new = irb.fmax(cb, m_old, cb.load(mb))
        inf = irb.splat(cb, neg_inf, vw)
        m_sub = cb.select(cb.fcmp_ordered("==", m_new, inf), _zero(vw), m_new)
        corr = irb.exp(cb, cb.fsub(m_old, m_sub))
        lsum = None
        for off, w in bchunks:  # the sum of p_j in softmax_row's order: per chunk, hsum_many's tree
            tree = irb.Butterfly(cb)
            for i in irb.bit_reversed(w):
                j = off + i
                pv = irb.exp(cb, cb.fsub(irb.load_vec(cb, srow, j * vw, vw), m_sub))
                irb.store_vec(cb, pv if vs is None else cb.fmul(pv, irb.splat(cb, vs, vw)), srow, j * vw)
                tree.add(pv)
            lsum = tree.total() if lsum is None else cb.fadd(lsum, tree.total())
        irb.store_vec(cb, m_new, m_arr, lg * vw)
        irb.store_vec(cb, cb.fadd(cb.fmul(irb.load_vec(cb, l_arr, lg * vw, vw), corr), lsum),
                      l_arr, lg * vw)
        irb.store_vec(cb, corr, c_arr, lg * vw)

    def pv_tile(cb, blk, scores, c_arr, acc, o0, o1, r0, rt, r_first, lanes):
        """acc[rho] = acc[rho] * corr[rho] + sum_{o0 <= j < o1} p[rho][j] V_j for rows
        r0..r0+rt, in d-tiles of up to ACC/rt vectors (p in the lanes layout if `lanes`); the
        head's first tile prefetches the values of the block _ATTN_PF ahead"""
        rows = [cb.add(r0, i64(ri)) for ri in range(rt)]
        corr = [irb.load_f32(cb, c_arr, r) for r in rows]
        a_rows = [irb.gep(cb, acc, cb.mul(r, i64(hd))) for r in rows]
        if lanes:  # p[rho][j] at [rho / vw][j][rho % vw]
            p_rows = [irb.gep(cb, scores, cb.add(cb.mul(cb.udiv(r, i64(vw)), i64(bs * vw)),
                                                 cb.urem(r, i64(vw)))) for r in rows]
        else:
            p_rows = [irb.gep(cb, scores, cb.mul(r, i64(bs))) for r in rows]
        pjs = vw if lanes else 1
        per = max(1, ACC // rt)
        pf = cb.select(cb.icmp_signed("==", r0, r_first), blk.nv, blk.v)
        for d0 in range(0, len(chunks), per):
            dch = chunks[d0:d0 + per]
            accs = [[irb.var(cb, irb.vty(w), cb.fmul(irb.load_vec(cb, a_rows[ri], off, w),
                                                     irb.splat(cb, corr[ri], w)))
                     for off, w in dch] for ri in range(rt)]
            with irb.for_range(cb, o0, o1, 1, "vj") as j:
                vrow = kvs.gep(cb, blk.v, cb.mul(j, i64(hd)))
                prow = kvs.gep(cb, pf, cb.mul(j, i64(hd)), inbounds=False)
                pj = [irb.splat(cb, irb.load_f32(cb, p_rows[ri], cb.mul(j, i64(pjs))), vw)
                      for ri in range(rt)]
                for ci, (off, w) in enumerate(dch):
                    vv = kvs.load(cb, vrow, off, w)
                    if w == vw and off % line == 0:
                        irb.prefetch(cb, kvs.gep(cb, prow, off, inbounds=False))
                    for ri in range(rt):
                        cb.store(irb.fma(cb, irb.lanes(cb, pj[ri], 0, w), vv,
                                         cb.load(accs[ri][ci])), accs[ri][ci])
            for ri in range(rt):
                for ci, (off, w) in enumerate(dch):
                    irb.store_vec(cb, cb.load(accs[ri][ci]), a_rows[ri], off)

    # --- softmax states: each key chunk gets its own online softmax, and the chunks' states are
    # merged pairwise up a binary tree over their (absolute) indices, whether one item walks all
    # of a unit's chunks or items take aligned groups of them and the caller merges the groups:
    # so a row's result never depends on the split, the threads or the rest of the batch
    def rec_m(cb, r):
        return r

    def rec_l(cb, r):
        return irb.gep(cb, r, RPAD)

    def rec_acc(cb, r):
        return irb.gep(cb, r, 2 * RPAD)

    def reset(cb, r, R):
        """the empty state: m = -inf, l = 0, acc = 0 (rows [0, R) of acc)"""
        irb.vector_loop(cb, RPAD, vw, lambda c, off, w, _: (
            irb.store_vec(c, irb.splat(c, neg_inf, w), rec_m(c, r), off),
            irb.store_vec(c, _zero(w), rec_l(c, r), off)))
        with irb.for_range(cb, 0, R, 1, "reset") as rho:
            a_r = irb.gep(cb, rec_acc(cb, r), cb.mul(rho, i64(hd)))
            for off, w in chunks:
                irb.store_vec(cb, _zero(w), a_r, off)

    def copy_rec(cb, src, dst, R):  # (m, l and acc's first R rows)
        irb.memcpy(cb, dst, src, cb.mul(cb.add(i64(2 * RPAD), cb.mul(R, i64(hd))), i64(4)))

    merge_fn, mb = irb.define(module, fn.name + ".merge", [("R", I64), ("a", PTR), ("b", PTR), ("o", PTR)],
                              internal=True)
    R_, ra, rb_, ro = merge_fn.args
    with irb.for_range(mb, 0, R_, 1, "row") as rho:
        # o = a (+) b, b's keys after a's: M = max, l = l_a e^(m_a - M) + l_b e^(m_b - M), acc alike
        # (one function, so every merge rounds alike; o may be a or b)
        ma, mb_ = irb.load_f32(mb, rec_m(mb, ra), rho), irb.load_f32(mb, rec_m(mb, rb_), rho)
        M = irb.fmax(mb, ma, mb_)
        Ms = mb.select(mb.fcmp_ordered("==", M, neg_inf), f32(0.0), M)
        ea, eb = irb.exp(mb, mb.fsub(ma, Ms)), irb.exp(mb, mb.fsub(mb_, Ms))
        la, lb_ = irb.load_f32(mb, rec_l(mb, ra), rho), irb.load_f32(mb, rec_l(mb, rb_), rho)
        mb.store(M, irb.gep(mb, rec_m(mb, ro), rho))
        mb.store(irb.fma(mb, lb_, eb, mb.fmul(la, ea)), irb.gep(mb, rec_l(mb, ro), rho))
        a_r, b_r, o_r = (irb.gep(mb, rec_acc(mb, x), mb.mul(rho, i64(hd))) for x in (ra, rb_, ro))
        for off, w in chunks:
            irb.store_vec(mb, irb.fma(mb, irb.load_vec(mb, b_r, off, w), irb.splat(mb, eb, w),
                                      mb.fmul(irb.load_vec(mb, a_r, off, w), irb.splat(mb, ea, w))), o_r, off)
    mb.ret_void()

    class Tree:
        """The pending states of a merge tree over chunk (or group) indices: push(r, idx, lvl)
        adds the state of node idx at level lvl (covering chunks [idx 2^lvl, (idx+1) 2^lvl)),
        merging it with its left siblings as far up as they are complete; fold(dst) merges what
        is left, right to left, into dst. Levels above _ATTN_LEVELS - 1 are merged in order
        there. A level whose left sibling never came (chunks before a window) passes up
        unmerged, as if it were the empty state."""

        def __init__(self, cb, R):
            self.cb, self.R = cb, R
            self.slots = irb.var(cb, ir.ArrayType(F32, _ATTN_LEVELS * REC), name="tree")
            self.occ = irb.var(cb, I64, i64(0), "occ")

        def _slot(self, lv):
            return irb.gep(self.cb, self.slots, self.cb.mul(lv, i64(REC)))

        def _has(self, lv):
            cb = self.cb
            return cb.icmp_unsigned("!=", cb.and_(cb.lshr(cb.load(self.occ), lv), i64(1)), i64(0))

        def _mark(self, lv, on):
            cb = self.cb
            bit = cb.shl(i64(1), lv)
            occ = cb.load(self.occ)
            cb.store(cb.or_(occ, bit) if on else cb.and_(occ, cb.not_(bit)), self.occ)

        def _merge(self, a, b_, o):
            self.cb.call(merge_fn, [self.R, a, b_, o])

        def push(self, r, idx, lvl):
            cb = self.cb
            j, lv = irb.var(cb, I64, idx, "j"), irb.var(cb, I64, lvl, "lv")
            go = irb.var(cb, irb.I1, ir.Constant(irb.I1, 1), "go")
            with irb.while_(cb, lambda c: c.load(go), "push"):
                L_ = cb.load(lv)
                slot, has = self._slot(L_), self._has(L_)
                top = cb.icmp_signed("==", L_, i64(_ATTN_LEVELS - 1))
                left = cb.icmp_unsigned("==", cb.and_(cb.load(j), i64(1)), i64(0))
                with cb.if_else(cb.or_(top, left)) as (park, carry):
                    with park:  # a left child (or the top): it waits for its sibling
                        with cb.if_else(cb.and_(top, has)) as (fold_in, keep):
                            with fold_in:
                                self._merge(slot, r, slot)
                            with keep:
                                copy_rec(cb, r, slot, self.R)
                        self._mark(L_, True)
                        cb.store(ir.Constant(irb.I1, 0), go)
                    with carry:  # a right child: merged with its left sibling, one level up
                        with cb.if_then(has):
                            self._merge(slot, r, r)
                            self._mark(L_, False)
                        cb.store(cb.lshr(cb.load(j), i64(1)), j)
                        cb.store(cb.add(L_, i64(1)), lv)

        def fold(self, dst):
            cb = self.cb
            have = irb.var(cb, irb.I1, ir.Constant(irb.I1, 0), "have")
            with irb.for_range(cb, 0, _ATTN_LEVELS, 1, "fold") as lv:
                with cb.if_then(self._has(lv)):
                    with cb.if_else(cb.load(have)) as (more, first):
                        with more:
                            self._merge(self._slot(lv), dst, dst)
                        with first:
                            copy_rec(cb, self._slot(lv), dst, self.R)
                    cb.store(ir.Constant(irb.I1, 1), have)

    def finish(cb, r, u):
        """out rows = acc / l (0 for a row without keys)"""
        with irb.for_range(cb, 0, u.R, 1, "fin") as rho:
            lv = irb.load_f32(cb, rec_l(cb, r), rho)
            inv = cb.select(cb.fcmp_ordered(">", lv, f32(0.0)), cb.fdiv(f32(1.0), lv), f32(0.0))
            a_r, o_r = irb.gep(cb, rec_acc(cb, r), cb.mul(rho, i64(hd))), row_ptr(cb, u.op, rho)
            for off, w in chunks:
                irb.store_vec(cb, cb.fmul(irb.load_vec(cb, a_r, off, w), irb.splat(cb, inv, w)), o_r, off)

    def combine(cb, A, L, unit):
        """a split unit's output: its groups' states (group g in item (U-1-unit)*S + g - g0, g0 its
        first group) merged up the same tree as an unsplit unit's chunks"""
        u = unit_rows(cb, A, unit, L)
        recs = irb.gep(cb, L.scratch, cb.mul(cb.mul(cb.sub(cb.sub(L.U, i64(1)), unit), L.S), i64(REC)))
        keys = cb.icmp_signed("<=", u.klo, u.khi)  # (without keys: group 0's empty state)
        g0, g1 = (cb.select(keys, cb.ashr(cb.sdiv(cb.sdiv(k, i64(bs)), i64(CB)), L.lvl), i64(0))
                  for k in (u.klo, u.khi))
        with cb.if_then(cb.icmp_signed(">", g1, g0)):
            tree = Tree(cb, u.R)
            with irb.for_range(cb, g0, cb.add(g1, i64(1)), 1, "grp") as g:
                tree.push(irb.gep(cb, recs, cb.mul(cb.sub(g, g0), i64(REC))), g, L.lvl)
            tree.fold(recs)
        finish(cb, recs, u)

    # --- the caller: query blocks, units, split count, the parallel loop, the combine
    A = irb.named(fn, fn.args)
    T, B = A.T, A.B
    with b.if_then(b.icmp_signed(">", T, i64(0))):
        # cum[b] = query blocks of the sequences before b (a prefix array on the stack);
        # decode, or more than _ATTN_SEQ_CAP sequences: one token per unit, cum = qsl
        work = irb.var(b, I64, i64(0), "work")
        spanc = irb.var(b, I64, i64(0), "spanc")  # the most chunks between a sequence's first and last key
        maxn = irb.var(b, I64, i64(0), "maxn")
        cbuf = None
        if QB > 1:
            use_cbuf = b.icmp_signed("<=", B, i64(_ATTN_SEQ_CAP))
            cbuf = b.alloca(irb.I32, size=b.select(use_cbuf, b.add(B, i64(1)), i64(1)))
            cbuf.type = PTR
            b.store(irb.i32(0), cbuf)
        with irb.for_range(b, 0, B, 1, "seq") as sq:
            n_b = b.sub(irb.load_i32(b, A.query_start_loc, b.add(sq, i64(1))),
                        irb.load_i32(b, A.query_start_loc, sq))
            keys = irb.load_i32(b, A.seq_lens, sq)
            if win:
                keys = irb.imin(b, keys, i64(win))
            b.store(b.add(b.load(work), b.mul(n_b, keys)), work)
            # (a bound for each of its units: keys up to seq_len - 1, from the earliest token's window)
            last = b.sdiv(b.sdiv(b.sub(irb.load_i32(b, A.seq_lens, sq), i64(1)), i64(bs)), i64(CB))
            if win:
                t0 = irb.load_i32(b, A.query_start_loc, sq)
                first = irb.var(b, I64, i64(2 ** 62), "first")
                with irb.for_range(b, t0, b.add(t0, n_b), 1, "tok") as t:
                    lo = irb.imax(b, i64(0), b.sub(irb.load_i32(b, A.positions, t), i64(win - 1)))
                    b.store(irb.imin(b, b.load(first), b.sdiv(b.sdiv(lo, i64(bs)), i64(CB))), first)
                last = b.sub(last, irb.imin(b, b.load(first), last))
            b.store(irb.imax(b, b.load(spanc), last), spanc)
            b.store(irb.imax(b, b.load(maxn), n_b), maxn)
            if cbuf is not None:
                with b.if_then(use_cbuf):
                    nq = b.sdiv(b.add(n_b, i64(QB - 1)), i64(QB))
                    nxt = b.add(irb.load_i32(b, cbuf, sq), nq)
                    b.store(b.trunc(nxt, irb.I32), irb.gep(b, cbuf, b.add(sq, i64(1)), irb.I32))
        decode = b.icmp_signed("<=", b.load(maxn), i64(1))
        gn = b.select(decode, i64(GD), i64(1))
        hp = b.select(decode, i64(HPD), i64(HPP))
        if cbuf is not None:
            blocked = b.and_(use_cbuf, b.not_(decode))
            cum = b.select(blocked, cbuf, A.query_start_loc)
            qb = b.select(blocked, i64(QB), i64(1))
            nqb = b.select(blocked, irb.load_i32(b, cbuf, B), T)
        else:
            cum, qb, nqb = A.query_start_loc, i64(1), T
        U = b.mul(nqb, b.mul(b.udiv(i64(G), gn), b.udiv(i64(rep), hp)))
        # split-K when there are too few units to keep the threads busy and contexts are long:
        # item s of a unit takes the s-th group (of 2^lvl chunks) from its first chunk's; S groups
        # cover every unit's chunks (one more with a window: its chunks need not start a group),
        # about 2 threads / U of them, and their S records fit in scratch
        nth = b.sext(b.call(irb.declare(module, "llmir_num_threads", irb.I32, []), []), I64)
        S = irb.var(b, I64, i64(1), "S")
        lvl = irb.var(b, I64, i64(62), "lvl")
        maxs = b.sdiv(i64(_ATTN_SPLIT_FLOATS // REC), U)
        with b.if_then(b.and_(b.icmp_signed("<", U, b.mul(nth, i64(2))),
                              b.icmp_signed(">=", maxs, i64(2)))):
            want = b.sdiv(b.add(b.mul(nth, i64(2)), b.sub(U, i64(1))), U)
            span, more = b.load(spanc), i64(2 if win else 1)
            g = irb.var(b, I64, i64(0), "g")
            with irb.while_(b, lambda c: c.and_(c.icmp_signed("<", c.load(g), i64(_ATTN_LEVELS - 1)), c.or_(
                    c.icmp_signed(">=", c.ashr(span, c.load(g)), want),
                    c.icmp_signed(">", c.add(c.ashr(span, c.load(g)), more), maxs))), "lvl"):
                b.store(b.add(b.load(g), i64(1)), g)
            ng = b.add(b.ashr(span, b.load(g)), more)
            with b.if_then(b.and_(b.icmp_signed(">=", ng, i64(2)), b.icmp_signed("<=", ng, maxs))):
                b.store(ng, S)
                b.store(b.load(g), lvl)
        S, lvl = b.load(S), b.load(lvl)
        scratch = irb.var(b, ir.ArrayType(F32, _ATTN_SPLIT_FLOATS), name="split")
        items = b.mul(U, S)
        # team size from the work (key-head dot products) rather than the item count
        flops = irb.imax(b, i64(1), b.mul(b.load(work), i64(4 * H * hd)))
        min_items = b.add(b.sdiv(b.mul(items, i64(_GRAIN)), flops), i64(1))
        extra = [cum, qb, gn, hp, U, S, lvl, scratch]
        irb.parallel_for(module, b, items, body, min_items,
                         captures=list(fn.args) + extra, dynamic=1)
        with b.if_then(b.icmp_signed(">", S, i64(1))):
            A_, L = launch(list(fn.args) + extra)
            with irb.for_range(b, 0, U, 1, "unit") as unit:
                combine(b, A_, L, unit)
    b.ret_void()


_EMITTERS = {
    "embedding": _emit_embedding,
    "rms_norm": _emit_rms_norm,
    "layer_norm": _emit_layer_norm,
    "linear": _emit_linear,
    "rope": _emit_rope,
    "kv_append": _emit_kv_append,
    "rope_kv_append": _emit_rope_kv_append,
    "paged_attention": _emit_paged_attention,
    "act_mul": _emit_act_mul,
    "act": _emit_act,
    "softcap": _emit_softcap,
    "gather_rows": _emit_gather_rows,
    "add": _emit_add,
    "hadamard": _emit_hadamard,
}
