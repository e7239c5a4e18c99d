"""CPU kernels of quantized weights and of the int8 KV cache: qlinear, qembedding, and kv_append
into an int8 pool (semantics in targets/signatures.py, weight layout in llmirc/quant.py).

qlinear, as llama.cpp's CPU path does it: activations are quantized per block of 32 (a
sub-group) to int8 first, into the `xq` scratch and in the weights' super-block order
(one parallel pass over the tokens), then one parallel pass over the rows of the weight:

* The inner product runs on integers: for each step of a super-block, a 32-bit lane adds the
  products of 4 unsigned code bytes and 4 signed activation bytes: x86's vpdpbusd where the
  variant has AVX512-VNNI (16 lanes) or AVX-VNNI (8 lanes), AArch64's sdot (signed bytes
  only, 4 lanes) where it has the dot product extension (FEAT_DotProd: 4, 5 and 6-bit codes
  are signed bytes as they are; 8-bit codes u go in as u - 128), on other x86 variants
  vpmaddubsw (SSSE3, AVX2, AVX512BW: pairs of products into 16-bit lanes, added up over up to
  8 steps, then vpmaddwd into 32-bit ones; 8-bit codes as u - 128 with vpsignb, as llama.cpp's
  AVX2 path does: 4-7x the generic path on a Zen 3 host, BENCHMARKS.md), elsewhere the same sums
  from 16-bit products (pmaddwd's pattern). Where 8-bit codes go in as u - 128, the 128 sum(q)
  the sums lack is folded into e below. 4, 5 and 6-bit codes are unpacked in
  registers (`_step_codes`: and 0xF or shift right 4, then for 5 and 6 bits the step's top bits
  from the high plane shifted to bit 4 and or'ed in; x86 has no byte shifts, so LLVM uses GFNI's
  vgf2p8affineqb where the variant has it, and vpternlog for the and-or). 5-bit codes cost
  about 15% of a model's prefill against a byte per code, and save a third of the bytes
  decode streams (BENCHMARKS.md, "5- and 6-bit codes"). A value table's 4-bit codes (GGUF's
  IQ4_NL / IQ4_XS) are looked up right after the unpacking (`_table`: pshufb / vpshufb on the
  16-byte table in each 128-bit lane, AArch64's tbl, elsewhere 16 selects) into the bytes
  values[u] + 128, which go on as 8-bit codes of center 128 (for sdot and vpmaddubsw the table
  holds values[u] itself, as they take 8-bit codes as u - 128, with vpmaddubsw's one step per
  16-bit sum: two products of |values| <= 128 and |q| <= 127 stay below 2^15). After a super-block's steps, lane l
  holds the integer dot product acc of sub-group l with one token's block; it is finished in
  f32 with the weight's scale s (and zero point z or min m) and the block's d = max|x| / 127
  and e (kept per block):
      none: s * (d acc + e),        e = -2^(bits-1) d sum(q)
      int:  s * (d acc - z e),      e = d sum(q)
      min:  s * d acc + m e,        e = d sum(q)
  accumulated over the super-blocks in one f32 vector per (row, token), summed at the end. With
  two-level scales (GGUF's K-quants), s and m are first made per lane from the int8 sub-scales and
  the float16 super-scales: s = D sc, m = M mn, exact in f32, so the sums are those of one-level f32
  scales of the same values, bit for bit (`scale_vecs`).
* Micro-kernels take r rows of the weight times c <= 4 tokens (r from the register file and
  c); prefill reads each block of rows once for all tokens, and streams the next block's rows
  into the cache (software prefetch) while one computes. Decode (one group of c <= 4 tokens)
  takes one row at a time, so the weight streams in address order, prefetched 16 KiB ahead:
  on a Zen 4 host 8 rows side by side reached 45% of the bandwidth floor, one row 75%
  (BENCHMARKS.md); except on Intel CPUs (CpuVariant.one_row_decode), where row blocks were
  5-10% faster. A short last super-block (576 inputs in groups of 32: a tail of 2 lanes)
  runs in 4 or 8-lane vectors when several tokens share it, not in full ones padded with
  zeros. Threads claim row blocks dynamically (irbuilder.parallel_for). Long prefills run in token slices whose quantized
  activations stay in L2.

The int8 KV cache (kv_append): one work item per (K or V, kv head) walks the tokens in order, a
run at a time (the tokens going to consecutive slots of one block), so a block's scale (max|value|
/ 127 so far) only grows; when a run needs a larger one, the codes already in the block are
requantized once (rint(code * old / new)) and the run is quantized at the new scale: the GPU
targets' arithmetic (targets/triton/rope.py), so both give the same codes.
"""

from __future__ import annotations

from types import SimpleNamespace

from llvmlite import ir

from llmirc.quant import LANES, Scheme

from . import amx
from . import irbuilder as irb
from .irbuilder import F32, I32, I64, PTR, f32, i64
from .toolchain import CpuVariant
from ..signatures import qlinear_scratch_bytes, signature

I8, I16 = irb.I8, irb.I16
KINDS = ("qlinear", "qembedding")
_GRAIN = 32768             # work (rough element-operations) a thread should get at least
_XQ_BYTES = 512 * 1024     # a token slice's quantized activations stay in L2
HALF_STORE = irb.storage("float16")  # two-level scales' super-scales and super-mins


def is_quant_kernel(kind: str, params: dict) -> bool:
    """Kernels this module emits (kv_append with an int8 pool among them)."""
    return kind in KINDS or (kind == "kv_append" and params.get("kv_dtype") == "int8")


def int_dot(variant: CpuVariant) -> tuple[str, int]:
    """(how 4-byte dot products are computed, 32-bit lanes per vector) for a variant:
    vnni (vpdpbusd) with 16 lanes on AVX512-VNNI, 8 on AVX-VNNI; sdot with 4 on AArch64 with
    the dot product extension; maddubs (vpmaddubsw then vpmaddwd) on other x86 variants, 16
    lanes with AVX512BW, 8 with AVX2, 4 with SSSE3; else generic, as wide as the variant's f32
    vectors."""
    feats = set(variant.features.split(","))
    if "+avx512vnni" in feats and variant.vector_width >= 16:
        return "vnni", 16
    if "+avxvnni" in feats or {"+avx512vnni", "+avx512vl"} <= feats:
        return "vnni", 8
    if "+dotprod" in feats and variant.arch == "aarch64":
        return "sdot", 4
    flags = set(variant.required_flags)  # cpuinfo names: also set for the x86-64-vN levels
    if variant.arch == "x86_64" and "ssse3" in flags:
        if variant.vector_width >= 16 and "avx512bw" in flags:
            return "maddubs", 16
        return "maddubs", 8 if variant.vector_width >= 8 and "avx2" in flags else 4
    return "generic", max(4, variant.vector_width)


def emit_quant_kernel(module: ir.Module, kind: str, symbol: str, params: dict, variant: CpuVariant) -> ir.Function:
    sig = signature(kind)
    p = SimpleNamespace(**sig.bind_static(params))
    fn, b = irb.define(module, symbol, [(a.name, {"ptr": PTR, "i64": I64}[a.type]) for a in sig.params])
    A = SimpleNamespace(**{a.name: a for a in fn.args})
    if kind == "qlinear":
        _emit_qlinear(module, fn, b, A, p, variant)
    elif kind == "qembedding":
        _emit_qembedding(module, fn, b, A, p, variant)
    else:
        _emit_kv_append_int8(module, fn, b, A, p)
    return fn


def _scheme(p) -> Scheme:
    s = Scheme(p.bits, p.group_size, p.scale_dtype, p.zero, bool(getattr(p, "act_order", False)),
               tuple(p.values) if p.values is not None else None, p.super_group)
    k = p.k if hasattr(p, "k") else p.dim
    why = s.check(k)
    if why is not None:
        raise ValueError(f"quantized kernel: unsupported {why}")
    return s


def _pad(b, v: ir.Value, n: int) -> ir.Value:
    """Integer vector v zero-padded to n lanes."""
    m = v.type.count
    if m == n:
        return v
    return irb.shuffle(b, v, ir.Constant(v.type, None), list(range(m)) + [m] * (n - m))


def _load_bytes(b, base: ir.Value, offset, nbytes: int) -> ir.Value:
    return b.load(irb.gep(b, base, offset, I8), typ=irb.vty(nbytes, I8), align=1)


def _step_codes(cb, s: Scheme, tt: int, load, lut=None) -> ir.Value:
    """Step tt's unsigned codes in a super-block (llmirc/quant.py's layout), as bytes: load(unit)
    gives the bytes of `unit` (4 r bytes apart in the super-block) at the caller's lanes; callers
    keep one load per unit (steps share a unit's nibbles and high plane). With a value table, lut
    (a `_table`) looks the codes up: the bytes are then the table's."""
    def const(v, x):
        return ir.Constant(v.type, [x] * v.type.count)
    if s.bits == 8:
        return load(tt)
    v = load(tt // 2)
    v = cb.lshr(v, const(v, 4)) if tt % 2 else cb.and_(v, const(v, 15))
    h = s.high_bits
    if h:
        per = 8 // h
        hv = load(s.sub_group // 8 + tt // per)
        shift = h * (tt % per) - 4  # the step's top bits to bits 4 ..
        hv = cb.lshr(hv, const(hv, shift)) if shift > 0 else cb.shl(hv, const(hv, -shift)) if shift < 0 else hv
        v = cb.or_(v, cb.and_(hv, const(hv, ((1 << h) - 1) << 4)))
    if s.values is not None:
        v = lut(cb, v)
    return v


def code_center(s: Scheme) -> int:
    """What the bytes `_step_codes` gives stand for zero at: 2^(bits-1), or 128 for a value table
    looked up as values[u] + 128 (its bytes then go on as 8-bit codes)."""
    return 128 if s.values is not None else s.center


def _table(s: Scheme, variant: CpuVariant, signed: bool):
    """lut(cb, idx): bytes values[idx] (signed: as int8; else values[idx] + 128, the u8 codes of
    center 128) of a vector of 4-bit codes idx, for a scheme with a value table. x86: pshufb (the
    16-byte table in each 128-bit lane: SSSE3, AVX2, AVX512BW); AArch64: tbl (16 bytes at a time);
    elsewhere a chain of 16 compares and selects."""
    table = [(v if signed else v + 128) & 255 for v in s.values]
    flags = set(variant.required_flags)
    if variant.arch == "x86_64":
        widest = (64 if "avx512bw" in flags or variant.has("avx512bw") else 32 if "avx2" in flags or
                  variant.has("avx2") else 16 if "ssse3" in flags or variant.has("ssse3") else 0)
    else:
        widest = 16 if variant.arch == "aarch64" else 0

    def one(cb, idx):  # idx: 16, 32 or 64 bytes, at most `widest`
        n = idx.type.count
        if variant.arch == "aarch64":
            fn = irb.declare(cb.module, "llvm.aarch64.neon.tbl1.v16i8", idx.type, [idx.type, idx.type])
            return cb.call(fn, [ir.Constant(idx.type, table), idx])
        name = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}[n]
        return cb.call(irb.declare(cb.module, name, idx.type, [idx.type, idx.type]),
                       [ir.Constant(idx.type, table * (n // 16)), idx])

    def lut(cb, idx):
        n = idx.type.count
        if not widest:
            out = ir.Constant(idx.type, [table[0]] * n)
            for i in range(1, 16):
                hit = cb.icmp_unsigned("==", idx, ir.Constant(idx.type, [i] * n))
                out = cb.select(hit, ir.Constant(idx.type, [table[i]] * n), out)
            return out
        if n < 16:
            return irb.shuffle(cb, one(cb, _pad(cb, idx, 16)), ir.Constant(irb.vty(16, I8), None), range(n))
        w = min(n, widest)
        parts = [one(cb, irb.shuffle(cb, idx, idx, range(i, i + w))) for i in range(0, n, w)]
        while len(parts) > 1:  # concatenated pairwise
            parts = [irb.shuffle(cb, a, c, range(2 * a.type.count)) for a, c in zip(parts[::2], parts[1::2])]
        return parts[0]
    return lut


def _unit_loader(load):
    """load(unit), each unit loaded once"""
    seen = {}

    def once(unit):
        if unit not in seen:
            seen[unit] = load(unit)
        return seen[unit]
    return once


def _dot(b, how: str, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """acc[l] + sum_{i<4} w[4l+i] * x[4l+i]: w unsigned bytes (signed ones, below 128, for sdot),
    x signed bytes, acc <L x i32>. (maddubs: _pairs and _quads, which the caller chains.)"""
    L = acc.type.count
    if how == "vnni":
        fn = irb.declare(b.module, f"llvm.x86.avx512.vpdpbusd.{32 * L}", acc.type, [acc.type, w.type, x.type])
        return b.call(fn, [acc, w, x])
    if how == "sdot":
        fn = irb.declare(b.module, "llvm.aarch64.neon.sdot.v4i32.v16i8", acc.type, [acc.type, w.type, x.type])
        return b.call(fn, [acc, w, x])
    n = 4 * L
    w16, x16 = b.zext(w, irb.vty(n, I16)), b.sext(x, irb.vty(n, I16))

    def half(v, first):
        return b.sext(irb.shuffle(b, v, v, range(first, n, 2)), irb.vty(n // 2, I32))
    pairs = b.add(b.mul(half(w16, 0), half(x16, 0)), b.mul(half(w16, 1), half(x16, 1)))
    quads = b.add(irb.shuffle(b, pairs, pairs, range(0, n // 2, 2)), irb.shuffle(b, pairs, pairs, range(1, n // 2, 2)))
    return b.add(acc, quads)


# vpmaddubsw, vpmaddwd and vpsignb (none in AVX-512) by vector width in 32-bit lanes
_MADDUBS = {4: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
            8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
            16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}
_PSIGN = {4: "llvm.x86.ssse3.psign.b.128", 8: "llvm.x86.avx2.psign.b"}


def _pairs(b, w: ir.Value, x: ir.Value, signed: bool) -> ir.Value:
    """vpmaddubsw: <2L x i16> sums of two products w[2i] x[2i] + w[2i+1] x[2i+1] of unsigned
    bytes w (codes below 64; signed bytes where `signed`, taken as |w| times x with w's sign, as
    llama.cpp's AVX2 path does) and signed bytes x in [-127, 127]. The instruction saturates at
    2^15; a pair stays below it (|63 * 127 * 2|, |128 * 127 * 2|), and _maddubs_chunk says how
    many pairs a 16-bit lane may add up."""
    L = len(w.type) // 4
    if signed:
        if L in _PSIGN:
            x = b.call(irb.declare(b.module, _PSIGN[L], x.type, [x.type, w.type]), [x, w])
        else:
            x = b.select(b.icmp_signed("<", w, ir.Constant(w.type, None)), b.neg(x), x)
        w = b.call(irb.declare(b.module, f"llvm.abs.v{4 * L}i8", w.type, [w.type, ir.IntType(1)]),
                   [w, ir.Constant(ir.IntType(1), 0)])
    ty = irb.vty(2 * L, I16)
    return b.call(irb.declare(b.module, _MADDUBS[L][0], ty, [w.type, x.type]), [w, x])


def _quads(b, acc: ir.Value, pairs: ir.Value) -> ir.Value:
    """acc + vpmaddwd(pairs, 1): neighbouring 16-bit lanes added into acc's 32-bit ones."""
    fn = irb.declare(b.module, _MADDUBS[acc.type.count][1], acc.type, [pairs.type, pairs.type])
    return b.add(acc, b.call(fn, [pairs, ir.Constant(pairs.type, [1] * len(pairs.type))]))


def _maddubs_chunk(bits: int, steps: int) -> int:
    """How many steps' vpmaddubsw pairs a 16-bit lane can add up exactly (below 2^15) before
    vpmaddwd widens them: 8 for 4-bit codes (a sub-group of 32 in one), 4 for 5-bit, 2 for
    6-bit, 1 for 8-bit (signed, |w| <= 128)."""
    largest = 128 if bits == 8 else (1 << bits) - 1
    return max(1, min(steps, (2**15 - 1) // (2 * 127 * largest)))


def _blocking(how: str, L: int) -> tuple[int, ...]:
    """rows[c-1]: weight rows per micro-kernel for c tokens (its c*r integer accumulators, r code
    vectors and c activation vectors in registers; the f32 accumulators, touched once per
    super-block, may live in L1)."""
    if L >= 16:
        return (8, 4, 4, 3)
    if L == 8:
        return (4, 3, 2, 2) if how in ("vnni", "maddubs") else (4, 2, 2, 1)
    return (2, 2, 1, 1)


# --- qlinear

def _emit_qlinear(module, fn, b, A, p, variant):
    s = _scheme(p)
    n, k, bits, G = p.n, p.k, p.bits, p.group_size
    if n <= 0:
        raise ValueError(f"qlinear: n must be positive, got {n}")
    how, L = int_dot(variant)
    sg = s.sub_group
    nsub = k // sg
    nfull, r_tail = divmod(nsub, LANES)
    steps = sg // 4
    sb_elems = LANES * sg                 # activation bytes (and int8 code bytes) of a full super-block
    sb_code = sb_elems * bits // 8
    row_bytes = k * bits // 8
    S = qlinear_scratch_bytes(k, sg)
    d_off, e_off = k, k + 4 * nsub        # the per-block floats d and e in a scratch row
    sst = irb.storage(s.scale_dtype)
    zst = irb.storage(s.scale_dtype) if s.zero == "min" else None
    rows = _blocking(how, L)
    C = len(rows)
    lut = _table(s, variant, how in ("sdot", "maddubs")) if s.values is not None else None
    # narrower vectors than L: the generic and maddubs paths have them all, vpdpbusd on xmm/ymm
    # needs AVX512VL (or is AVX-VNNI's), sdot has 4 lanes only
    narrower = how in ("generic", "maddubs") or (how == "vnni" and (L == 8 or variant.has("avx512vl")))

    def narrow(lw):
        """lanes per vector for a run of lw lanes: the fewest (at least 4) that hold them"""
        return min(L, max(4, 1 << (lw - 1).bit_length())) if narrower else L

    # -- activations -> xq (int8 in the super-block order, d and e per block)
    def quantize_token(cb, t, vals):
        X = irb.named(fn, vals)
        xrow = irb.gep(cb, X.x, cb.mul(t, X.ld_x))
        dst = irb.gep(cb, X.xq, cb.mul(t, i64(S)), I8)
        dptr, eptr = irb.gep(cb, dst, d_off, I8), irb.gep(cb, dst, e_off, I8)

        def block(cb, j, sb, lane, r):
            q8, d, e = _quantize_block(module, cb, X, xrow, j, s)
            cb.store(d, irb.gep(cb, dptr, j), align=4)
            cb.store(e, irb.gep(cb, eptr, j), align=4)
            base = cb.add(cb.mul(sb, i64(sb_elems)), cb.mul(lane, i64(4)))
            for tt in range(steps):
                word = cb.bitcast(irb.shuffle(cb, q8, q8, range(4 * tt, 4 * tt + 4)), I32)
                cb.store(word, irb.gep(cb, dst, cb.add(base, i64(4 * r * tt)), I8), align=1)
        if nfull:
            with irb.for_range(cb, 0, nfull * LANES, 1, "blk") as j:
                block(cb, j, cb.udiv(j, i64(LANES)), cb.urem(j, i64(LANES)), LANES)
        if r_tail:
            with irb.for_range(cb, 0, r_tail, 1, "tail") as lane:
                block(cb, cb.add(lane, i64(nfull * LANES)), i64(nfull), lane, r_tail)

    # -- the micro-kernel: out[t0:t0+c, j0:j0+r]
    def micro(cb, X, j0, r, t0, c, pf):
        zero_f = irb.const_like(irb.vty(L), 0.0)
        facc = [[irb.var(cb, irb.vty(L), zero_f) for _ in range(c)] for _ in range(r)]
        # row blocks: the f32 sums, touched once per sub-vector, stay in L1 (in registers they
        # made LLVM spill the steps' operands: +2-18% at 8-64 tokens with AVX2, BENCHMARKS.md)
        spilled = [v for row in facc for v in row] if r * c >= 6 else []
        if spilled:
            irb.keep_in_memory(cb, spilled)
        crow = [irb.gep(cb, X.codes, cb.mul(cb.add(j0, i64(ri)), i64(row_bytes)), I8) for ri in range(r)]
        prow = [irb.gep(cb, pf, i64(ri * row_bytes), I8, inbounds=False) for ri in range(r)] if pf is not None else None
        ngroups = k // G
        srow = [sst.gep(cb, X.scales, cb.mul(cb.add(j0, i64(ri)), i64(ngroups))) for ri in range(r)]
        zrow = None
        if s.zero != "none":
            zety = I8 if s.zero == "int" else zst.ety
            zrow = [irb.gep(cb, X.zeros, cb.mul(cb.add(j0, i64(ri)), i64(ngroups)), zety) for ri in range(r)]
        if s.super_group:  # the float16 super-scales (and super-mins) of the rows
            nsup = k // s.super_group
            drow = [HALF_STORE.gep(cb, X.super_scales, cb.mul(cb.add(j0, i64(ri)), i64(nsup))) for ri in range(r)]
            mrow = [HALF_STORE.gep(cb, X.super_mins, cb.mul(cb.add(j0, i64(ri)), i64(nsup))) for ri in range(r)] \
                if s.zero == "min" else None
        arow = [irb.gep(cb, X.xq, cb.mul(cb.add(t0, i64(ci)), i64(S)), I8) for ci in range(c)]

        def group_vec(cb, row, first_sub, lw, load, W, size=G):
            """per-lane values of the groups (of `size` inputs) of sub-groups first_sub ..
            first_sub+lw-1 (a row of scales, zero points, mins or super-scales) as <W x float>"""
            per = size // sg  # sub-groups per group
            if per >= W or size == k:
                gi = cb.udiv(first_sub, i64(per)) if size != k else i64(0)
                return irb.splat(cb, load(cb, row, gi, 0), W)
            ng = -(-lw // per)
            v = load(cb, row, cb.udiv(first_sub, i64(per)), ng)
            mask = [lane // per for lane in range(lw)] + [0] * (W - lw)
            return irb.shuffle(cb, v, v, mask)

        def load_scales(cb, row, gi, m):
            return sst.load(cb, row, gi, m)

        def load_zeros(cb, row, gi, m):
            if s.zero == "min":
                return zst.load(cb, row, gi, m)
            raw = cb.load(irb.gep(cb, row, gi, I8), typ=irb.vty(m, I8) if m else I8, align=1)
            return cb.uitofp(raw, irb.vty(m) if m else F32)

        def scale_vecs(cb, ri, first_sub, lw, W):
            """(s, z or m or None) of row ri's lanes: with two-level scales the products D sc, M mn"""
            sv = group_vec(cb, srow[ri], first_sub, lw, load_scales, W)
            zv = group_vec(cb, zrow[ri], first_sub, lw, load_zeros, W) if zrow is not None else None
            if s.super_group:
                sv = cb.fmul(group_vec(cb, drow[ri], first_sub, lw, HALF_STORE.load, W, s.super_group), sv)
                if zv is not None:
                    zv = cb.fmul(group_vec(cb, mrow[ri], first_sub, lw, HALF_STORE.load, W, s.super_group), zv)
            return sv, zv

        def load_floats(cb, base, off, first_sub, lw, W):
            ptr = irb.gep(cb, base, off, I8)
            v = irb.load_vec(cb, ptr, first_sub, lw)
            return irb.widen(cb, v, W) if lw < W else v

        def sub_vector(cb, code0, act0, first_sub, hoff, lanes, lw):
            """lanes [h L, h L + lw) of a super-block of `lanes` lanes (hoff = 4 L h bytes), in
            vectors of W lanes: L, or fewer for a short last super-block when several tokens share
            the codes (k = 576 in groups of 32 ends in 2 lanes: full vectors made it cost as much as
            the other 16; one token, memory-bound, ran 5-25% slower with narrow ones)"""
            W = narrow(lw) if c > 1 else L
            if spilled:
                irb.keep_in_memory(cb, spilled)
            zero_i = ir.Constant(irb.vty(W, I32), None)
            iacc = [[zero_i] * c for _ in range(r)]
            # 8-bit codes u go in as u - 128 where the dot product takes signed bytes (sdot) or
            # products would overflow (maddubs): acc = sum((u - 128) q), and the 128 sum(q) it
            # lacks is folded into the finish through e (module docstring):
            #     none: s (d acc),   int: s (d acc - (z - 128) e),   min: s d acc + (m + 128 s) e
            # (a value table's bytes are 8-bit codes too, looked up signed where these take them so)
            signed8 = how in ("sdot", "maddubs") and (bits == 8 or s.values is not None)
            pacc, chunk = [[None] * c for _ in range(r)], _maddubs_chunk(8 if s.values else bits, steps)
            units = [_unit_loader(lambda u, ri=ri: _pad(cb, _load_bytes(
                cb, crow[ri], cb.add(code0, cb.add(hoff, i64(4 * lanes * u))), 4 * lw), 4 * W)) for ri in range(r)]
            for tt in range(steps):
                wv = [_step_codes(cb, s, tt, units[ri], lut) for ri in range(r)]
                if signed8 and s.values is None:
                    wv = [cb.xor(v, ir.Constant(v.type, [128] * (4 * W))) for v in wv]
                xv = [_pad(cb, _load_bytes(cb, arow[ci], cb.add(act0, cb.add(hoff, i64(4 * lanes * tt))), 4 * lw),
                           4 * W) for ci in range(c)]
                for ri in range(r):
                    for ci in range(c):
                        if how == "maddubs":  # 16-bit sums, widened every `chunk` steps
                            pv = _pairs(cb, wv[ri], xv[ci], signed8)
                            pacc[ri][ci] = pv if pacc[ri][ci] is None else cb.add(pacc[ri][ci], pv)
                            if (tt + 1) % chunk == 0 or tt == steps - 1:
                                iacc[ri][ci], pacc[ri][ci] = _quads(cb, iacc[ri][ci], pacc[ri][ci]), None
                        else:
                            iacc[ri][ci] = _dot(cb, how, iacc[ri][ci], wv[ri], xv[ci])
            dv = [load_floats(cb, arow[ci], d_off, first_sub, lw, W) for ci in range(c)]
            ev = [load_floats(cb, arow[ci], e_off, first_sub, lw, W) for ci in range(c)]
            for ri in range(r):
                sv, zv = scale_vecs(cb, ri, first_sub, lw, W)
                if signed8 and s.zero == "int":
                    zv = cb.fsub(zv, irb.const_like(zv.type, 128.0))
                elif signed8 and s.zero == "min":
                    zv = irb.fma(cb, sv, irb.const_like(zv.type, 128.0), zv)
                for ci in range(c):
                    f = cb.sitofp(iacc[ri][ci], irb.vty(W))
                    # narrow vectors add into the accumulator's first W lanes with the same fma as
                    # full ones, so a token's result does not depend on how many share the codes
                    whole = cb.load(facc[ri][ci])
                    acc = irb.lanes(cb, whole, 0, W)
                    if s.zero == "none" and signed8:
                        acc = irb.fma(cb, sv, cb.fmul(f, dv[ci]), acc)
                    elif s.zero == "none":
                        acc = irb.fma(cb, sv, irb.fma(cb, f, dv[ci], ev[ci]), acc)
                    elif s.zero == "int":
                        acc = irb.fma(cb, sv, cb.fsub(cb.fmul(f, dv[ci]), cb.fmul(zv, ev[ci])), acc)
                    else:
                        acc = irb.fma(cb, zv, ev[ci], irb.fma(cb, sv, cb.fmul(f, dv[ci]), acc))
                    if W < L:
                        acc = irb.shuffle(cb, irb.widen(cb, acc, L), whole, [*range(W), *range(L + W, 2 * L)])
                    cb.store(acc, facc[ri][ci])

        def super_block(cb, sb, lanes):
            code0 = cb.mul(sb, i64(sb_code))
            act0 = cb.mul(sb, i64(sb_elems))
            first = cb.mul(sb, i64(LANES))
            if prow is not None and lanes == LANES:
                for ri in range(r):
                    for line in range(0, sb_code, 64):
                        irb.prefetch(cb, irb.gep(cb, prow[ri], cb.add(code0, i64(line)), I8, inbounds=False))
            if lanes == LANES and L < LANES:  # vectors narrower than a super-block: a loop over them
                with irb.for_range(cb, 0, LANES // L, 1, "h") as h:
                    sub_vector(cb, code0, act0, cb.add(first, cb.mul(h, i64(L))), cb.mul(h, i64(4 * L)), lanes, L)
            else:
                for h in range(-(-lanes // L)):
                    sub_vector(cb, code0, act0, cb.add(first, i64(h * L)), i64(4 * L * h), lanes,
                               min(L, lanes - h * L))

        if nfull:
            with irb.for_range(cb, 0, nfull, 1, "sb") as sb:
                super_block(cb, sb, LANES)
        if r_tail:
            super_block(cb, i64(nfull), r_tail)
        sums = irb.hsum_many(cb, [cb.load(facc[ri][ci]) for ci in range(c) for ri in range(r)])
        bias = irb.load_vec(cb, X.bias, j0, r) if p.bias else None
        for ci in range(c):
            t = cb.add(t0, i64(ci))
            v = irb.lanes(cb, sums, ci * r, r)
            if bias is not None:
                v = cb.fadd(v, bias)
            if p.residual:
                v = cb.fadd(v, irb.load_vec(cb, X.residual, cb.add(cb.mul(t, X.ld_res), j0), r))
            irb.store_vec(cb, v, X.out, cb.add(cb.mul(t, X.ld_out), j0))

    # -- the caller: quantize the activations, then token slices x one parallel pass over row blocks
    def vector_path():
        irb.parallel_for(module, b, T, quantize_token, irb.min_items(8 * k, _GRAIN))
        TB = max(C, (_XQ_BYTES // S) // C * C)
        with irb.for_range(b, 0, T, TB, "tsl") as t_lo:
            nt = b.sub(irb.imin(b, T, b.add(t_lo, i64(TB))), t_lo)
            ng = b.sdiv(b.add(nt, i64(C - 1)), i64(C))  # groups of base+1 (the first `extra`) or base tokens
            base, extra = b.sdiv(nt, ng), b.srem(nt, ng)
            cmax = b.add(base, b.zext(b.icmp_signed(">", extra, i64(0)), I64))

            def row_blocks(R, sizes, streamed):
                _row_blocks(module, b, fn, R, n, k, row_bytes,
                            lambda cb, X, j0, r, pf, ex: _token_groups(cb, X, j0, r, pf, ex, micro, sizes),
                            (t_lo, ng, base, extra), streamed)
            irb.by_row_blocks(b, ng, cmax, rows, row_blocks, variant.one_row_decode)

    T = A.T
    with b.if_then(b.icmp_signed(">", T, i64(0))):
        if amx_applies(s, k, variant):
            ready = b.call(irb.declare(module, "llmir_amx_ready", I32, []), [])
            tiles = b.and_(b.icmp_signed(">=", T, i64(AMX_MIN_TOKENS)), b.icmp_signed("!=", ready, irb.i32(0)))
            with b.if_else(tiles) as (amx_path, vectors):
                with amx_path:
                    _amx_qlinear(module, fn, b, p, s, T, variant)
                with vectors:
                    vector_path()
        else:
            vector_path()
    b.ret_void()


def _quantize_block(module, cb, X, xrow, j, s: Scheme):
    """Sub-group j of the activation row at xrow (through `perm` with act-order), quantized as
    every qlinear path does: (q <sg x i8>, d = max|x| / 127, e) with q = rint(x / d) and e as the
    module docstring says."""
    sg = s.sub_group
    if s.act_order:
        v = ir.Constant(irb.vty(sg), None)
        for e in range(sg):
            col = irb.load_i32(cb, X.perm, cb.add(cb.mul(j, i64(sg)), i64(e)))
            v = cb.insert_element(v, irb.load_f32(cb, xrow, col), irb.i32(e))
    else:
        v = irb.load_vec(cb, xrow, cb.mul(j, i64(sg)), sg)
    amax = irb.hmax(cb, irb.intrinsic(cb, "llvm.fabs", [v]))
    d = cb.fdiv(amax, f32(127.0))
    inv = cb.select(cb.fcmp_ordered("==", d, f32(0.0)), f32(0.0), cb.fdiv(f32(1.0), d))
    q = cb.fptosi(irb.intrinsic(cb, "llvm.rint", [cb.fmul(v, irb.splat(cb, inv, sg))]), irb.vty(sg, I32))
    total = cb.call(irb.declare(module, f"llvm.vector.reduce.add.v{sg}i32", I32, [q.type]), [q])
    e = cb.fmul(d, cb.sitofp(total, F32))
    if s.zero == "none":
        e = cb.fmul(e, f32(-code_center(s)))
    return cb.trunc(q, irb.vty(sg, I8)), d, e


# --- qlinear on AMX-INT8 tiles (prefill)

AMX_MIN_TOKENS = 32            # fewer tokens take the vector path (the crossover: benchmarks/qlinear.py)
_AMX_PANEL_BYTES = 1 << 20     # packed activations of a token panel stay in L2
_AMX_WBUF_MAX = 512 * 1024     # a 16-row block's repacked weights (20 bytes per input) on the stack


def amx_applies(s: Scheme, k: int, variant: CpuVariant) -> bool:
    """Schemes with 32-input sub-groups on a variant with AMX-INT8, with k small enough that a
    16-row block's repacked codes fit _AMX_WBUF_MAX on the stack (k <= 26214); the tiles are used
    at run time only when the OS grants them and T >= AMX_MIN_TOKENS."""
    return (variant.has("amx-int8") and variant.has("avx512f") and s.sub_group == 32
            and (k // 32) * amx.INT8_UNIT <= _AMX_WBUF_MAX)


def _amx_mode(s: Scheme, k: int) -> str:
    if s.zero == "none":
        return "row" if s.group_size == k else "group_none"
    return f"group_{s.zero}"


def _amx_qlinear(module, fn, b, p, s: Scheme, T, variant):
    """qlinear with AMX-INT8 tiles: the same integer sums as the vector path (one K = 32 tile
    product per sub-group), finished in f32 (amx.py, "INT8"). Per panel of tokens: the activations
    are quantized (as every path does) into B tiles, in parallel over 16-token blocks; then
    threads claim 16-row blocks of the weight, repack the block's codes into A tiles (signed
    u - center for symmetric codes), with its scales as f32, and run the micro-kernel over the
    panel's 16-token blocks, transposing its 16 x 16 results into out."""
    n, k, bits, G = p.n, p.k, p.bits, p.group_size
    nsub = k // 32
    nfull, r_tail = divmod(nsub, LANES)
    U = amx.INT8_UNIT
    row_bytes = k * bits // 8
    sb_code = LANES * 32 * bits // 8
    mode = _amx_mode(s, k)
    signed = s.zero == "none"
    lut = _table(s, variant, signed=True) if s.values is not None else None  # (a table's values, signed)
    sst = irb.storage(s.scale_dtype)
    panel = max(16, min(512, _AMX_PANEL_BYTES // (nsub * U // 16) // 16 * 16))
    xp = b.call(irb.declare(module, "llmir_scratch", PTR, [I64]), [i64(panel // 16 * nsub * U)])

    def pack(cb, tb, vals):
        """tokens t_lo + 16 tb .. (+16, or to tn): each sub-group's codes into column t % 16 of its B
        tile, with d and e (one thread per 16-token block: its tiles share cache lines)"""
        X, (t_lo, xp_, tn) = irb.named(fn, vals), vals[len(fn.args):]
        first = cb.mul(tb, i64(nsub * U))
        with irb.for_range(cb, 0, irb.imin(cb, i64(16), cb.sub(tn, cb.mul(tb, i64(16)))), 1, "tok") as c:
            xrow = irb.gep(cb, X.x, cb.mul(cb.add(t_lo, cb.add(cb.mul(tb, i64(16)), c)), X.ld_x))
            col = cb.mul(c, i64(4))
            with irb.for_range(cb, 0, nsub, 1, "sub") as j:
                q8, d, e = _quantize_block(module, cb, X, xrow, j, s)
                unit = irb.gep(cb, xp_, cb.add(first, cb.add(cb.mul(j, i64(U)), col)), I8)
                for kk in range(8):
                    word = cb.bitcast(irb.shuffle(cb, q8, q8, range(4 * kk, 4 * kk + 4)), I32)
                    cb.store(word, irb.gep(cb, unit, i64(64 * kk), I8), align=4)
                cb.store(d, irb.gep(cb, unit, i64(512), I8), align=4)
                cb.store(e, irb.gep(cb, unit, i64(576), I8), align=4)
        # the columns past tn: d = e = 0 (their results are not stored, but stale floats there can be
        # subnormal, and the micro-kernel's FMAs on subnormals take microcode assists)
        with irb.for_range(cb, cb.sub(tn, cb.mul(tb, i64(16))), 16, 1, "pad") as c:
            with irb.for_range(cb, 0, nsub, 1, "psub") as j:
                unit = irb.gep(cb, xp_, cb.add(first, cb.add(cb.mul(j, i64(U)), cb.mul(c, i64(4)))), I8)
                for off in (512, 576):
                    cb.store(f32(0.0), irb.gep(cb, unit, i64(off), I8), align=4)

    def tail_words(cb, row, j):
        """the 8 words (4 codes each, inputs 4kk .. 4kk+3) of sub-group j in the last, partial
        super-block (r_tail lanes) of a weight row, as bytes ready for the A tile"""
        base = cb.add(i64(nfull * sb_code), cb.mul(cb.sub(j, i64(nfull * LANES)), i64(4)))
        load = _unit_loader(lambda u: _load_bytes(cb, row, cb.add(base, i64(4 * r_tail * u)), 4))
        words = []
        for kk in range(8):
            raw = _step_codes(cb, s, kk, load, lut)
            if signed and lut is None:
                raw = cb.sub(raw, ir.Constant(raw.type, [s.center] * 4))
            words.append(raw)
        return words

    def repack_super_block(cb, codes, sb, wbuf, r):
        """row r of the A tiles of a full super-block's 16 sub-groups: step kk's 16 lanes (one word
        of each sub-group) loaded as a vector, the 8 steps transposed into 8 words per sub-group"""
        load = _unit_loader(lambda u: _load_bytes(cb, codes, cb.add(cb.mul(sb, i64(sb_code)), i64(64 * u)), 64))
        steps = [_step_codes(cb, s, c, load, lut) for c in range(8)]
        if signed and lut is None:
            steps = [cb.sub(v, ir.Constant(v.type, [s.center] * 64)) for v in steps]
        words = [cb.bitcast(v, irb.vty(16, I32)) for v in steps]
        pad = ir.Constant(irb.vty(16, I32), None)
        for lane, v in enumerate(irb.transpose(cb, words + [pad] * 8)):
            unit = irb.gep(cb, wbuf, cb.add(cb.mul(cb.add(cb.mul(sb, i64(LANES)), i64(lane)), i64(U)), i64(32 * r)), I8)
            cb.store(irb.shuffle(cb, v, v, range(8)), unit, align=4)

    def compute(cb, item, vals):
        """rows n0 = 16 item .. n0 + 15 (the last row repeated past n) over the panel"""
        X, (t_lo, xp_, tn) = irb.named(fn, vals), vals[len(fn.args):]
        n0 = cb.mul(item, i64(16))
        nv = irb.imin(cb, i64(16), cb.sub(i64(n), n0))
        wbuf = irb.var(cb, ir.ArrayType(I8, nsub * U + 64), name="wbuf")
        wbuf.align = 64
        acc = irb.var(cb, ir.ArrayType(F32, 256 * (panel // 16)), name="acc")
        acc.align = 64
        ngroups = k // G
        for r in range(16):
            row = cb.add(n0, irb.imin(cb, i64(r), cb.sub(nv, i64(1))))
            codes = irb.gep(cb, X.codes, cb.mul(row, i64(row_bytes)), I8)
            if nfull:
                with irb.for_range(cb, 0, nfull, 1, "rps") as sb:
                    repack_super_block(cb, codes, sb, wbuf, r)
            if r_tail:
                with irb.for_range(cb, nfull * LANES, nsub, 1, "rpt") as j:
                    unit = irb.gep(cb, wbuf, cb.mul(j, i64(U)), I8)
                    for kk, word in enumerate(tail_words(cb, codes, j)):
                        cb.store(word, irb.gep(cb, unit, i64(32 * r + 4 * kk), I8), align=4)
            if mode == "row":
                cb.store(sst.load(cb, X.scales, row, 0), irb.gep(cb, wbuf, i64(nsub * U + 4 * r), I8), align=4)
                continue
            with irb.for_range(cb, 0, nsub, 1, "rpg") as j:  # the group's scale (and zero or min) as f32
                unit = irb.gep(cb, wbuf, cb.mul(j, i64(U)), I8)
                g = cb.add(cb.mul(row, i64(ngroups)), cb.udiv(cb.mul(j, i64(32)), i64(G)))
                sup = cb.add(cb.mul(row, i64(k // s.super_group)), cb.udiv(cb.mul(j, i64(32)), i64(s.super_group))) \
                    if s.super_group else None

                def two_level(v, sup_ptr):  # the sub-scale (sub-min) times its super-scale (super-min)
                    return cb.fmul(HALF_STORE.load(cb, sup_ptr, sup, 0), v) if sup is not None else v
                sv = two_level(sst.load(cb, X.scales, g, 0), X.super_scales)
                cb.store(sv, irb.gep(cb, unit, i64(512 + 4 * r), I8), align=4)
                if s.zero == "int":
                    z = cb.uitofp(cb.load(irb.gep(cb, X.zeros, g, I8), typ=I8), F32)
                    cb.store(cb.fneg(z), irb.gep(cb, unit, i64(576 + 4 * r), I8), align=4)
                elif s.zero == "min":
                    mv = two_level(sst.load(cb, X.zeros, g, 0), X.super_mins)
                    cb.store(mv, irb.gep(cb, unit, i64(576 + 4 * r), I8), align=4)
        micro = amx.declare_int8(module, mode)
        srow = irb.load_vec(cb, irb.gep(cb, wbuf, i64(nsub * U), I8), 0, 16) if mode == "row" else None
        ntb = cb.sdiv(cb.add(tn, i64(15)), i64(16))
        cb.call(micro, [acc, wbuf, xp_, i64(nsub), ntb])
        with irb.for_range(cb, 0, ntb, 1, "tb") as tb:
            cols = irb.transpose(cb, [irb.load_vec(cb, acc, cb.add(cb.mul(tb, i64(256)), i64(16 * r)), 16)
                                      for r in range(16)])
            for c, v in enumerate(cols):  # token c of the block: rows n0 .. n0 + 15
                t = cb.add(t_lo, cb.add(cb.mul(tb, i64(16)), i64(c)))
                with cb.if_then(cb.icmp_signed("<", t, T)):
                    if srow is not None:
                        v = cb.fmul(v, srow)
                    with cb.if_else(cb.icmp_signed("==", nv, i64(16))) as (full, part):
                        with full:
                            _finish(cb, X, p, v, t, n0, 16)
                        with part:
                            with irb.for_range(cb, 0, nv, 1, "rv") as ri:
                                _finish(cb, X, p, cb.extract_element(v, ri), t, cb.add(n0, ri), 0)

    with irb.for_range(b, 0, T, panel, "panel") as t_lo:
        tn = irb.imin(b, i64(panel), b.sub(T, t_lo))
        ntb = b.sdiv(b.add(tn, i64(15)), i64(16))
        irb.parallel_for(module, b, ntb, pack, irb.min_items(128 * k, _GRAIN), captures=list(fn.args) + [t_lo, xp, tn],
                         dynamic=1)
        irb.parallel_for(module, b, i64(-(-n // 16)), compute, irb.min_items(16 * k, _GRAIN),
                         captures=list(fn.args) + [t_lo, xp, tn])


def _finish(cb, X, p, v, t, col, width):
    """out[t, col : col + width] = v (+ bias) (+ residual); width 0: one scalar"""
    if p.bias:
        v = cb.fadd(v, irb.load_vec(cb, X.bias, col, width) if width else irb.load_f32(cb, X.bias, col))
    res_at = cb.add(cb.mul(t, X.ld_res), col) if p.residual else None
    out_at = cb.add(cb.mul(t, X.ld_out), col)
    if width:
        if p.residual:
            v = cb.fadd(v, irb.load_vec(cb, X.residual, res_at, width))
        irb.store_vec(cb, v, X.out, out_at)
    else:
        if p.residual:
            v = cb.fadd(v, irb.load_f32(cb, X.residual, res_at))
        cb.store(v, irb.gep(cb, X.out, out_at))


def _row_blocks(module, b, fn, R, n, k, row_bytes, block, extra, streamed=False):
    """One parallel loop over blocks of R rows of the weight: block(cb, args, j0, rows, prefetch
    pointer (irbuilder.rows_ahead; `streamed`: a decode pass), extra values)."""
    nbf, rrem = divmod(n, R)
    ahead = irb.rows_ahead(R, row_bytes, streamed)

    def body(cb, rb, vals):
        X = irb.named(fn, vals)
        ex = vals[len(fn.args):]
        j0 = cb.mul(rb, i64(R))
        pf = irb.gep(cb, X.codes, cb.mul(cb.add(j0, i64(ahead)), i64(row_bytes)), I8, inbounds=False)
        if rrem:
            with cb.if_else(cb.icmp_signed("<", rb, i64(nbf))) as (full, part):
                with full:
                    block(cb, X, j0, R, pf, ex)
                with part:  # the last rows one at a time (one small micro-kernel, not another r)
                    with irb.for_range(cb, 0, rrem, 1, "rrem") as ri:
                        block(cb, X, cb.add(j0, ri), 1, None, ex)
        else:
            block(cb, X, j0, R, pf, ex)
    irb.parallel_for(module, b, i64(nbf + (1 if rrem else 0)), body, irb.min_items(R * k // 2, _GRAIN),
                     captures=list(fn.args) + list(extra))


def _token_groups(cb, X, j0, r, pf, ex, micro, sizes):
    """The r rows at j0 times each group of tokens of the slice (groups of base+1, then base)."""
    t_lo, ng, base, extra = ex
    with irb.for_range(cb, 0, ng, 1, "tg") as g:
        t0 = cb.add(t_lo, cb.add(cb.mul(g, base), irb.imin(cb, g, extra)))
        c_run = cb.add(base, cb.zext(cb.icmp_signed("<", g, extra), I64))
        for c in sizes:
            with cb.if_then(cb.icmp_signed("==", c_run, i64(c))):
                micro(cb, X, j0, r, t0, c, pf)


# --- qembedding

def _emit_qembedding(module, fn, b, A, p, variant):
    s = _scheme(p)
    lut = _table(s, variant, signed=False) if s.values is not None else None
    dim, bits, G = p.dim, p.bits, p.group_size
    sg = s.sub_group
    nsub = dim // sg
    nfull, r_tail = divmod(nsub, LANES)
    row_bytes = dim * bits // 8
    sst = irb.storage(s.scale_dtype)

    def body(cb, t, vals):
        X = irb.named(fn, vals)
        tok = irb.load_i32(cb, X.ids, t)
        codes = irb.gep(cb, X.codes, cb.mul(tok, i64(row_bytes)), I8)
        out = irb.gep(cb, X.out, cb.mul(t, X.ld_out))
        with irb.for_range(cb, 0, nsub, 1, "sub") as j:
            sb, lane = cb.udiv(j, i64(LANES)), cb.urem(j, i64(LANES))
            r = cb.select(cb.icmp_signed("<", sb, i64(nfull)), i64(LANES), i64(r_tail or LANES))
            g = cb.add(cb.mul(tok, i64(dim // G)), cb.udiv(cb.mul(j, i64(sg)), i64(G)))
            scale = sst.load(cb, X.scales, g, 0)
            if s.zero == "int":
                zero = cb.uitofp(cb.load(irb.gep(cb, X.zeros, g, I8), typ=I8), F32)
            elif s.zero == "min":
                zero = irb.storage(s.scale_dtype).load(cb, X.zeros, g, 0)
            if s.super_group:  # two-level scales: the products D sc (and M mn)
                sup = cb.add(cb.mul(tok, i64(dim // s.super_group)), cb.udiv(cb.mul(j, i64(sg)), i64(s.super_group)))
                scale = cb.fmul(HALF_STORE.load(cb, X.super_scales, sup, 0), scale)
                if s.zero == "min":
                    zero = cb.fmul(HALF_STORE.load(cb, X.super_mins, sup, 0), zero)
            start = cb.mul(sb, i64(LANES * sg * bits // 8))
            load = _unit_loader(lambda u: _load_bytes(
                cb, codes, cb.add(start, cb.add(cb.mul(r, i64(4 * u)), cb.mul(lane, i64(4)))), 4))
            for tt in range(sg // 4):
                raw = _step_codes(cb, s, tt, load, lut)
                u = cb.uitofp(raw, irb.vty(4))
                sv = irb.splat(cb, scale, 4)
                if s.zero == "none":
                    w = cb.fmul(sv, cb.fsub(u, irb.const_like(u.type, code_center(s))))
                elif s.zero == "int":
                    w = cb.fmul(sv, cb.fsub(u, irb.splat(cb, zero, 4)))
                else:
                    w = irb.fma(cb, sv, u, irb.splat(cb, zero, 4))
                if p.scale != 1:
                    w = cb.fmul(w, irb.const_like(w.type, p.scale))
                irb.store_vec(cb, w, out, cb.add(cb.mul(j, i64(sg)), i64(4 * tt)))
    irb.parallel_for(module, b, A.T, body, irb.min_items(4 * dim, 4 * _GRAIN))
    b.ret_void()


# --- kv_append into an int8 pool

def _emit_kv_append_int8(module, fn, b, A, p):
    G, hd, bs, nl = p.num_kv_heads, p.head_dim, p.block_size, p.num_layers
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(p, name) <= 0:
            raise ValueError(f"kv_append: {name} must be positive")
    chunk = G * bs * hd  # codes of one (layer, kv, block)

    def body(cb, item, vals):
        X = irb.named(fn, vals)
        kv, g = cb.udiv(item, i64(G)), cb.urem(item, i64(G))
        src0 = cb.select(cb.icmp_signed("==", kv, i64(0)), X.k, X.v)
        ld = cb.select(cb.icmp_signed("==", kv, i64(0)), X.ld_k, X.ld_v)
        plane = cb.add(cb.mul(X.layer, i64(2)), kv)  # (layer, kv)
        codes = irb.gep(cb, X.pool, cb.mul(cb.mul(plane, X.num_blocks), i64(chunk)), I8)
        scales = irb.gep(cb, X.pool, cb.mul(X.num_blocks, i64(nl * 2 * chunk)), I8)
        tok = irb.var(cb, I64, i64(0), "tok")
        with irb.while_(cb, lambda c: c.icmp_signed("<", c.load(tok), X.T), "tok"):
            t0 = cb.load(tok)
            slot = irb.load_i32(cb, X.slot_mapping, t0)
            n = irb.var(cb, I64, i64(1), "n")
            with cb.if_then(cb.icmp_signed(">=", slot, i64(0))):
                blk, off = cb.sdiv(slot, i64(bs)), cb.srem(slot, i64(bs))

                def continues(c):  # token t0 + n goes to the next slot of the block
                    m = c.load(n)
                    tn = c.add(t0, m)
                    inside = c.and_(c.icmp_signed("<", tn, X.T), c.icmp_signed("<", c.add(off, m), i64(bs)))
                    nxt = irb.load_i32(c, X.slot_mapping, irb.imin(c, tn, c.sub(X.T, i64(1))))
                    return c.and_(inside, c.icmp_signed("==", nxt, c.add(slot, m)))
                with irb.while_(cb, continues, "run"):
                    cb.store(cb.add(cb.load(n), i64(1)), n)
                rows = cb.load(n)
                src = irb.gep(cb, src0, cb.add(cb.mul(t0, ld), cb.mul(g, i64(hd))))
                head = irb.gep(cb, codes, cb.add(cb.mul(blk, i64(chunk)), cb.mul(g, i64(bs * hd))), I8)
                sptr = irb.gep(cb, scales, cb.mul(cb.add(cb.mul(plane, X.num_blocks), blk), i64(4 * G)), I8)
                sptr = irb.gep(cb, sptr, g)
                amax = irb.var(cb, F32, f32(0.0), "amax")
                with irb.for_range(cb, 0, rows, 1, "r") as r:
                    row = irb.gep(cb, src, cb.mul(r, ld))
                    with irb.for_range(cb, 0, hd, 1, "d") as d:
                        cb.store(irb.fmax(cb, cb.load(amax), irb.intrinsic(cb, "llvm.fabs", [irb.load_f32(cb, row, d)])),
                                 amax)
                need = cb.fdiv(cb.load(amax), f32(127.0))
                fresh = cb.icmp_signed("==", off, i64(0))
                old = cb.select(fresh, f32(0.0), cb.load(sptr, typ=F32, align=1))
                grow = cb.fcmp_ordered(">", need, old)
                new = cb.select(grow, need, old)
                with cb.if_then(cb.and_(grow, cb.fcmp_ordered(">", old, f32(0.0)))):
                    ratio = cb.fdiv(old, new)  # the codes already in the block, to the larger scale
                    with irb.for_range(cb, 0, cb.mul(off, i64(hd)), 1, "rq") as i:
                        ptr = irb.gep(cb, head, i, I8)
                        v = cb.fmul(cb.sitofp(cb.load(ptr, typ=I8), F32), ratio)
                        cb.store(cb.fptosi(irb.intrinsic(cb, "llvm.rint", [v]), I8), ptr)
                cb.store(new, sptr, align=1)
                inv = cb.select(cb.fcmp_ordered(">", new, f32(0.0)), cb.fdiv(f32(1.0), new), f32(0.0))
                with irb.for_range(cb, 0, rows, 1, "r") as r:
                    row = irb.gep(cb, src, cb.mul(r, ld))
                    dst = irb.gep(cb, head, cb.mul(cb.add(off, r), i64(hd)), I8)
                    with irb.for_range(cb, 0, hd, 1, "q") as d:
                        q = irb.intrinsic(cb, "llvm.rint", [cb.fmul(irb.load_f32(cb, row, d), inv)])
                        q = irb.fmin(cb, irb.fmax(cb, q, f32(-127.0)), f32(127.0))
                        cb.store(cb.fptosi(q, I8), irb.gep(cb, dst, d, I8))
            cb.store(cb.add(t0, cb.load(n)), tok)
    per_item = b.add(b.mul(A.T, i64(8 * hd)), i64(1))  # each item walks all T tokens
    irb.parallel_for(module, b, i64(2 * G), body, b.add(b.sdiv(i64(_GRAIN), per_item), i64(1)))
    b.ret_void()
