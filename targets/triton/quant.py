"""Quantized weights on the GPU: qlinear and qembedding (semantics: targets/signatures.py).

The codes are read where the bundle stores them, in llmirc's super-block layout (llmirc/quant.py;
no GPU-only copy): a kernel walks a row in *blocks* of LB consecutive sub-groups (LB divides 16,
so a block lies in one super-block), BK = LB * SG columns. In the layout a block is SG/4 runs of
4 LB contiguous bytes (8-bit codes; 4-bit: SG/8 runs, each byte holding two steps' codes in its
nibbles; 5 and 6-bit: those nibbles and runs of the high plane), so the code loads are
contiguous runs; the columns of the activations are gathered in the same order (and through
`perm` for act-order), which a dot product does not mind. Codes are
unpacked in registers (shift, mask) and the zero point subtracted there: u - c is an integer of
at most 9 bits, exact in bfloat16. A value table (GGUF's IQ4: code u stands for values[u], c = 0)
is looked up right after the unpacking, from the constexpr LUT: the 16 int8 values packed 4 to an
int32 word, the word picked by three selects and the byte by two shifts (`_lookup`). Scales (and
mins) multiply once per group, after the dot:

    part = sum_{i in group} x~[t,i] (u[j,i] - c[j,g])      (tensor cores or f32 FMAs)
    out[t,j] += s[j,g] part (+ m[j,g] sum_{i in group} x~[t,i])   (f32)

with c = 2^(bits-1) (zero none), z[j,g] (int), 0 (min), and x~ = x rounded to bfloat16; with
two-level scales (GGUF's K-quants, IQ4_XS) s and m are the f32 products of the int8 sub-scale (sub-min)
and its float16 super-scale (super-min), exact (`_group_params`). A block
never spans two groups (BK <= group_size, both powers of two; per-row scales: one group), so the
scale is applied after each group's blocks (per-row: once, after the whole row).

Variants by T (the launch rule's):

    T <= 4     qlinear_gemv: one program per (32 rows, token, split), f32 FMAs and a row sum per
               block; blocks of ~256 columns. Per-row scales (one group): no split, the rows per
               program from 32 down to 4 until they fill 2 x SMs.
    T <= 16    qlinear_dot: 16 x 32 tiles, tl.dot on bf16 (x~ by u - c), blocks of ~64 columns.
    T <= 128   64 x 64 tiles.
    T > 128    128 x 128 tiles (8 warps), no split.

Split-K (splitk.py) splits the groups toward tiles x splits >= 2 x SMs, two groups a split at
least (added 2026-12-04 after the H200 measured int4 2.4x slower than bf16 at batch 1 and 5.8x
at batch 32, where o_proj's 2048 rows were 32 tiles of 64 for 132 SMs; with it, int4 decode was
1.58x faster at batch 1 and 1.68x at batch 32 on the H200, BENCHMARKS.md).

qembedding: one program per (token, BLOCK columns), each column's code found by the layout
formula; out = s (u - c) (+ m) in f32, as the CPU kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmirc.quant import LANES, Scheme

from .spec import Launch, Rule, Variant, cdiv, kernel, mul, next_pow2
from .splitk import splitk_arrive, splitk_total, workspace

@triton.jit
def _code_offsets(first, step, lanes, SG: tl.constexpr, BITS: tl.constexpr):
    """Where the codes of `step` lie, for byte position `first` (the super-block's start + 4 lane +
    byte) of a super-block of `lanes` lanes: (byte offset, nibble shift, the high plane's byte
    offset and bit shift (5 and 6-bit codes)), as llmirc/quant.py lays them out."""
    if BITS == 8:
        off = first + step * (4 * lanes)
        shift = step * 0
    else:  # steps 2c and 2c + 1 share the bytes of unit c (low, high nibble)
        off = first + (step // 2) * (4 * lanes)
        shift = (step % 2) * 4
    hoff = off
    hshift = shift
    if BITS == 5 or BITS == 6:  # the high plane: a unit per 8 / (BITS - 4) steps, after SG / 8 units
        hoff = first + (SG // 8 + step // (8 // (BITS - 4))) * (4 * lanes)
        hshift = (step % (8 // (BITS - 4))) * (BITS - 4)
    return off, shift, hoff, hshift


@triton.jit
def _unpack(raw, top, shift, hshift, BITS: tl.constexpr):
    """Codes (int32) from the bytes at `_code_offsets`' offsets (top: the high plane's; unused
    below 5 bits)."""
    if BITS != 8:
        raw = (raw >> shift) & 15
    if BITS == 5 or BITS == 6:
        raw |= ((top >> hshift) & ((1 << (BITS - 4)) - 1)) << 4
    return raw


@triton.jit
def _lookup(u, LUT: tl.constexpr):
    """values[u] (int32) of 4-bit codes u: LUT holds the table's int8 values 4 to an int32 word, value
    4 w + b in byte b of word w (`lut_words`)."""
    word = tl.where(u < 8, tl.where(u < 4, LUT[0], LUT[1]), tl.where(u < 12, LUT[2], LUT[3]))
    return (word << (24 - 8 * (u & 3))) >> 24


def lut_words(values) -> tuple[int, ...] | None:
    """`_lookup`'s LUT of a value table (None for none): 4 int32 words, value 4 w + b in byte b of word w."""
    if values is None:
        return None
    words = [sum((int(values[4 * w + b]) & 255) << (8 * b) for b in range(4)) for w in range(4)]
    return tuple(x - (1 << 32) if x >= 1 << 31 else x for x in words)


@triton.jit
def _block_layout(kb, LB: tl.constexpr, SG: tl.constexpr, NSUB: tl.constexpr, BITS: tl.constexpr,
                  BK: tl.constexpr):
    """Block kb of a row: (byte offset in the row, nibble shift, the high plane's byte offset and
    bit shift (5 and 6-bit codes), column, valid) of its BK codes, in the layout's order (runs of
    4 LB contiguous bytes)."""
    j0 = kb * LB                          # first sub-group of the block
    sb = j0 // 16                         # its super-block
    lanes = tl.minimum(NSUB - sb * 16, 16)  # sub-groups in that super-block
    p = tl.arange(0, BK)
    step = p // (4 * LB)                  # step t of the super-block (SG/4 of them)
    i = p % (4 * LB)                      # byte within the run: lane j0 % 16 + i // 4, byte i % 4
    first = sb * (2 * SG * BITS) + 4 * (j0 % 16) + i  # (the super-block: 16 SG BITS / 8 bytes)
    off, shift, hoff, hshift = _code_offsets(first, step, lanes, SG, BITS)
    col = (j0 + i // 4) * SG + 4 * step + i % 4
    return off, shift, hoff, hshift, col, (j0 + i // 4) < NSUB


@triton.jit
def _gather_x(x, ld_x, rows, row_ok, col, ok, perm, ACT_ORDER: tl.constexpr):
    """x~[rows, col] (f32 values of the bf16-rounded activations; 0 where masked); rows [R, 1],
    col and ok [BK]. With act-order, stored column col holds input column perm[col]."""
    if ACT_ORDER:
        col = tl.load(perm + col, mask=ok, other=0)
    v = tl.load(x + rows * ld_x + col[None, :], mask=row_ok & ok[None, :], other=0.0)
    return v.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _group_params(scales, zeros, super_scales, super_mins, rn, n_ok, g, NG: tl.constexpr, ZERO: tl.constexpr,
                  BITS: tl.constexpr, LUT: tl.constexpr, SUPER: tl.constexpr):
    """(s, c, m) of group g for rows rn: the scale, what is subtracted from the codes (the table's
    values, with LUT), the min. SUPER > 0 (groups per super-group): two-level scales, s and m the
    products of the int8 sub-scale and sub-min with their float16 super-scale and super-min."""
    idx = rn.to(tl.int64) * NG + g
    s = tl.load(scales + idx, mask=n_ok, other=0).to(tl.float32)
    if SUPER > 0:
        sup = rn.to(tl.int64) * (NG // SUPER) + g // SUPER
        s = tl.load(super_scales + sup, mask=n_ok, other=0.0).to(tl.float32) * s
    if ZERO == "int":
        c = tl.load(zeros + idx, mask=n_ok, other=0).to(tl.float32)
        m = tl.zeros_like(s)
    elif ZERO == "min":
        c = tl.zeros_like(s)
        m = tl.load(zeros + idx, mask=n_ok, other=0).to(tl.float32)
        if SUPER > 0:
            m = tl.load(super_mins + sup, mask=n_ok, other=0.0).to(tl.float32) * m
    elif LUT is not None:
        c = tl.zeros_like(s)
        m = tl.zeros_like(s)
    else:
        c = tl.zeros_like(s) + (1 << (BITS - 1))
        m = tl.zeros_like(s)
    return s, c, m


@triton.jit
def _codes(codes, rn, n_ok, off, shift, hoff, hshift, ok, ROW_BYTES: tl.constexpr, BITS: tl.constexpr,
           LUT: tl.constexpr):
    """Codes u [BN, BK] (int32) of rows rn at the block's offsets (with LUT: values[u])."""
    base = codes + rn.to(tl.int64)[:, None] * ROW_BYTES
    mask = n_ok[:, None] & ok[None, :]
    raw = tl.load(base + off[None, :], mask=mask, other=0).to(tl.int32)
    top = raw
    if BITS == 5 or BITS == 6:
        top = tl.load(base + hoff[None, :], mask=mask, other=0).to(tl.int32)
    u = _unpack(raw, top, shift[None, :], hshift[None, :], BITS)
    if LUT is not None:
        u = _lookup(u, LUT)
    return u


@triton.jit
def _epilogue(out, ld_out, bias, residual, ld_res, acc, rows, row_ok, rn, n_ok, HAS_BIAS: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr):
    """out[rows, rn] = acc (+ bias) (+ residual); rows [R, 1] int64, row_ok [R, 1]."""
    mask = row_ok & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual + rows * ld_res + rn[None, :], mask=mask, other=0.0)
    tl.store(out + rows * ld_out + rn[None, :], acc, mask=mask)


@triton.jit
def _chunks(split, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr, PER_SPLIT: tl.constexpr):
    """The groups (chunks) of split `split`: [lo, hi)."""
    if SPLIT_K == 1:
        return 0, CHUNKS
    lo = split * PER_SPLIT
    return lo, tl.minimum(lo + PER_SPLIT, CHUNKS)


@triton.jit
def qlinear_gemv(out, ld_out, x, ld_x, codes, scales, zeros, super_scales, super_mins, perm, bias, residual, ld_res,
                 T, splitk_workspace,
                 N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, SG: tl.constexpr, NG: tl.constexpr,
                 ZERO: tl.constexpr, LUT: tl.constexpr, SUPER: tl.constexpr, ACT_ORDER: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, LB: tl.constexpr, CHUNKS: tl.constexpr,
                 PER_CHUNK: tl.constexpr,
                 BLOCK_N: tl.constexpr,
                 SPLIT_K: tl.constexpr, PER_SPLIT: tl.constexpr, MAX_TILES: tl.constexpr, RELEASE_ALL: tl.constexpr,
                 THREADS: tl.constexpr):
    """Rows [pid0 BLOCK_N, +BLOCK_N) of the output for token pid1, groups of split pid2."""
    BK: tl.constexpr = LB * SG
    NSUB: tl.constexpr = K // SG
    ROW_BYTES: tl.constexpr = K * BITS // 8
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    row = tl.program_id(1).to(tl.int64) + tl.zeros([1, 1], tl.int64)
    row_ok = row < T
    acc = tl.zeros([BLOCK_N], tl.float32)
    lo, hi = _chunks(tl.program_id(2), CHUNKS, SPLIT_K, PER_SPLIT)
    for chunk in range(lo, hi):  # one group (per-row scales: the whole row)
        s, c, m = _group_params(scales, zeros, super_scales, super_mins, rn, n_ok, chunk, NG, ZERO, BITS, LUT, SUPER)
        part = tl.zeros([BLOCK_N], tl.float32)
        xsum = tl.zeros([1], tl.float32)
        for b in range(PER_CHUNK):
            off, shift, hoff, hshift, col, ok = _block_layout(chunk * PER_CHUNK + b, LB, SG, NSUB, BITS, BK)
            xv = _gather_x(x, ld_x, row, row_ok, col, ok, perm, ACT_ORDER)  # [1, BK]
            w = _codes(codes, rn, n_ok, off, shift, hoff, hshift, ok, ROW_BYTES, BITS, LUT).to(tl.float32) - c[:, None]
            part += tl.sum(w * xv, 1)
            if ZERO == "min":
                xsum += tl.sum(xv, 1)
        acc += part * s
        if ZERO == "min":
            acc += m * xsum
    if SPLIT_K == 1:
        _epilogue(out, ld_out, bias, residual, ld_res, acc[None, :], row, row_ok, rn, n_ok, HAS_BIAS, HAS_RESIDUAL)
    else:
        tile = tl.program_id(1) * ((N + BLOCK_N - 1) // BLOCK_N) + tl.program_id(0)  # (not tl.num_programs:
        # on AMD it reads the grid from hidden kernel arguments, which the launcher does not pass)
        offs = tl.arange(0, BLOCK_N)
        arrived = splitk_arrive(splitk_workspace, acc, offs, tile, tl.program_id(2), SPLIT_K, MAX_TILES, BLOCK_N,
                                RELEASE_ALL, THREADS)
        if arrived == SPLIT_K - 1:
            acc = splitk_total(splitk_workspace, acc, offs, tile, SPLIT_K, MAX_TILES, BLOCK_N)
            _epilogue(out, ld_out, bias, residual, ld_res, acc[None, :], row, row_ok, rn, n_ok, HAS_BIAS,
                      HAS_RESIDUAL)


@triton.jit
def qlinear_dot(out, ld_out, x, ld_x, codes, scales, zeros, super_scales, super_mins, perm, bias, residual, ld_res,
                T, splitk_workspace,
                N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, SG: tl.constexpr, NG: tl.constexpr,
                ZERO: tl.constexpr, LUT: tl.constexpr, SUPER: tl.constexpr, ACT_ORDER: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, LB: tl.constexpr, CHUNKS: tl.constexpr,
                PER_CHUNK: tl.constexpr,
                BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PER_SPLIT: tl.constexpr, MAX_TILES: tl.constexpr,
                RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr):
    """A BLOCK_M x BLOCK_N tile of the output (program pid: tile (pid // tiles_n, pid % tiles_n)),
    groups of split pid1."""
    BK: tl.constexpr = LB * SG
    NSUB: tl.constexpr = K // SG
    ROW_BYTES: tl.constexpr = K * BITS // 8
    tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = rm.to(tl.int64)[:, None]
    row_ok = rows < T
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    lo, hi = _chunks(tl.program_id(1), CHUNKS, SPLIT_K, PER_SPLIT)
    for chunk in range(lo, hi):
        s, c, m = _group_params(scales, zeros, super_scales, super_mins, rn, n_ok, chunk, NG, ZERO, BITS, LUT, SUPER)
        part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        xsum = tl.zeros([BLOCK_M], tl.float32)
        for b in range(PER_CHUNK):
            off, shift, hoff, hshift, col, ok = _block_layout(chunk * PER_CHUNK + b, LB, SG, NSUB, BITS, BK)
            xv = _gather_x(x, ld_x, rows, row_ok, col, ok, perm, ACT_ORDER)  # [BLOCK_M, BK]
            w = _codes(codes, rn, n_ok, off, shift, hoff, hshift, ok, ROW_BYTES, BITS, LUT).to(tl.float32) - c[:, None]
            part = tl.dot(xv.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), part)
            if ZERO == "min":
                xsum += tl.sum(xv, 1)
        acc += part * s[None, :]
        if ZERO == "min":
            acc += xsum[:, None] * m[None, :]
    if SPLIT_K == 1:
        _epilogue(out, ld_out, bias, residual, ld_res, acc, rows, row_ok, rn, n_ok, HAS_BIAS, HAS_RESIDUAL)
    else:
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        arrived = splitk_arrive(splitk_workspace, acc, offs, pid, tl.program_id(1), SPLIT_K, MAX_TILES,
                                BLOCK_M * BLOCK_N, RELEASE_ALL, THREADS)
        if arrived == SPLIT_K - 1:
            acc = splitk_total(splitk_workspace, acc, offs, pid, SPLIT_K, MAX_TILES, BLOCK_M * BLOCK_N)
            _epilogue(out, ld_out, bias, residual, ld_res, acc, rows, row_ok, rn, n_ok, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def qembedding_kernel(out, ld_out, codes, scales, zeros, super_scales, super_mins, ids, T, DIM: tl.constexpr,
                      BITS: tl.constexpr, SG: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr,
                      LUT: tl.constexpr, SUPER: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < DIM
    NSUB: tl.constexpr = DIM // SG
    row = tl.load(ids + t).to(tl.int64)
    j = col // SG                           # sub-group, its super-block and lane
    sb = j // 16
    lanes = tl.minimum(NSUB - sb * 16, 16)
    step = (col % SG) // 4
    base = codes + row * (DIM * BITS // 8)
    off, shift, hoff, hshift = _code_offsets(sb * (2 * SG * BITS) + 4 * (j % 16) + col % 4, step, lanes, SG, BITS)
    raw = tl.load(base + off, mask=ok, other=0).to(tl.int32)
    top = raw
    if BITS == 5 or BITS == 6:
        top = tl.load(base + hoff, mask=ok, other=0).to(tl.int32)
    u = _unpack(raw, top, shift, hshift, BITS)
    g = row * (DIM // GROUP) + col // GROUP
    s = tl.load(scales + g, mask=ok, other=0).to(tl.float32)
    if SUPER > 0:  # two-level scales: the f32 products with the super-scale (super-min), exact
        sup = row * (DIM // (GROUP * SUPER)) + col // (GROUP * SUPER)
        s = tl.load(super_scales + sup, mask=ok, other=0.0).to(tl.float32) * s
    if ZERO == "int":
        w = s * (u.to(tl.float32) - tl.load(zeros + g, mask=ok, other=0).to(tl.float32))
    elif ZERO == "min":
        m = tl.load(zeros + g, mask=ok, other=0).to(tl.float32)
        if SUPER > 0:
            m = tl.load(super_mins + sup, mask=ok, other=0.0).to(tl.float32) * m
        w = tl.fma(s, u.to(tl.float32), m)
    elif LUT is not None:
        w = s * _lookup(u, LUT).to(tl.float32)
    else:
        w = s * (u - (1 << (BITS - 1))).to(tl.float32)
    if SCALE != 1.0:
        w = w * SCALE
    tl.store(out + t * ld_out + col, w, mask=ok)


def _scheme(params, k) -> Scheme:
    values = params.get("values")
    s = Scheme(params["bits"], params["group_size"], params["scale_dtype"], params["zero"],
               bool(params.get("act_order", False)), tuple(values) if values is not None else None,
               params.get("super_group") or 0)
    why = s.check(k)
    if why is not None:
        raise ValueError(f"quantized kernel: unsupported {why}")
    if params["zero_dtype"] != s.zero_dtype:
        raise ValueError(f"quantized kernel: zero_dtype {params['zero_dtype']} (zero {s.zero} takes {s.zero_dtype})")
    return s


def _super(s: Scheme) -> int:
    """Groups per super-group of two-level scales (0: one level)."""
    return s.super_group // s.group_size if s.super_group else 0


def _blocking(s: Scheme, k: int, columns: int) -> dict:
    """LB (sub-groups per block, toward `columns` columns), CHUNKS (groups, or 1 for per-row
    scales) and PER_CHUNK (blocks per chunk)."""
    sg = s.sub_group
    per_row = s.group_size == k
    lb = min(LANES, max(1, columns // sg), LANES if per_row else s.group_size // sg)
    blocks = -(-(k // sg) // lb)
    chunks = 1 if per_row else k // s.group_size
    return {"LB": lb, "CHUNKS": chunks, "PER_CHUNK": blocks // chunks}


def _split(chunks: int, programs: int, num_sms: int) -> dict:
    """SPLIT_K and PER_SPLIT (groups a split) of a variant of `programs` unsplit programs:
    the groups split toward programs x splits >= 2 x SMs, at least two groups a split, none empty
    (per-row scales, one group, are not split)."""
    splits = max(1, min(-(-2 * num_sms // programs), chunks // 2))
    per = -(-chunks // splits)
    return {"SPLIT_K": -(-chunks // per), "PER_SPLIT": per}


def rule_qlinear(params, arch, args) -> Rule:
    n, k = int(params["n"]), int(params["k"])
    if n <= 0:
        raise ValueError(f"qlinear: n must be positive, got {n}")
    s = _scheme(params, k)
    common = {"N": n, "K": k, "BITS": s.bits, "SG": s.sub_group, "NG": k // s.group_size, "ZERO": s.zero,
              "LUT": lut_words(s.values), "SUPER": _super(s), "ACT_ORDER": s.act_order,
              "HAS_BIAS": bool(params["bias"]),
              "HAS_RESIDUAL": bool(params["residual"]),
              "RELEASE_ALL": arch.backend == "hip"}
    stages = 2 if arch.backend == "hip" else 3
    kernel_args = tuple(a for a in args if a[0] != "xq") + (("splitk_workspace", "*fp32"),)  # (xq: the CPU's scratch)
    blocking = _blocking(s, k, 256)
    bn = 32
    while blocking["CHUNKS"] == 1 and bn > 4 and -(-n // bn) < 2 * arch.num_sms:  # no split: narrower rows
        bn //= 2
    # the variants: the GEMV (T <= 4; its programs are for one token, its tiles for 4), then tl.dot tiles
    plans = [dict(fn=qlinear_gemv, when=["<=", "T", 4], grid=(-(-n // bn), "T"), warps=4,
                  c={**blocking, "BLOCK_N": bn}, programs=-(-n // bn), tiles=4 * -(-n // bn), tile=bn)]
    for t_max, bm, bn, warps in ((16, 16, 32, 4), (128, 64, 64, 4), (None, 128, 128, 8)):
        tiles = -(-t_max // bm) * -(-n // bn) if t_max else 0  # (prefill: no split)
        plans.append(dict(fn=qlinear_dot, when=["<=", "T", t_max] if t_max else 1,
                          grid=(mul(cdiv("T", bm), -(-n // bn)),), warps=warps,
                          c={**_blocking(s, k, 64), "BLOCK_M": bm, "BLOCK_N": bn}, programs=tiles, tiles=tiles,
                          tile=bm * bn))
    for v in plans:
        chunks = v["c"]["CHUNKS"]
        v["c"] |= _split(chunks, v["programs"], arch.num_sms) if v["tiles"] else {"SPLIT_K": 1, "PER_SPLIT": chunks}
    max_tiles, buffer = workspace([(v["tiles"], v["c"]["SPLIT_K"], v["tile"]) for v in plans])
    variants = []
    for v in plans:
        spec = kernel(v["fn"], {**common, **v["c"], "MAX_TILES": max_tiles if v["c"]["SPLIT_K"] > 1 else 0,
                                "THREADS": v["warps"] * arch.warp_size}, kernel_args, num_warps=v["warps"],
                      num_stages=stages)
        grid = (*v["grid"], v["c"]["SPLIT_K"]) + ((1,) if v["fn"] is qlinear_dot else ())
        variants.append(Variant(v["when"], (Launch(spec, grid),)))
    return Rule("qlinear", params, args, variants, [buffer])


def rule_qembedding(params, arch, args) -> Rule:
    dim = int(params["dim"])
    s = _scheme(params, dim)
    block = min(next_pow2(dim), 1024)
    spec = kernel(qembedding_kernel, {"DIM": dim, "BITS": s.bits, "SG": s.sub_group, "GROUP": s.group_size,
                                      "ZERO": s.zero, "LUT": lut_words(s.values), "SUPER": _super(s),
                                      "SCALE": float(params["scale"]),
                                      "BLOCK": block}, args, num_warps=max(1, min(4, block // 256)))
    return Rule("qembedding", params, args, [Variant(1, (Launch(spec, ("T", cdiv(dim, block), 1)),))])
