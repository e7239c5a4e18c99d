"""Rotary embedding and the paged KV write: rope, kv_append (semantics: targets/signatures.py) and
their fusion, rope_kv_append.

One program per token (grid (T, 1, 1)) handles all its heads: a [heads, rotary_dim/2] tile.
The angle is positions[t] * inv_freq[i] (one f32 multiply; inv_freq is baked into the kernel
as constants), cos/sin are Triton's accurate ones (libdevice-class, with range reduction),
times `scaling`. Pool offsets are int64. KV values are rounded to the pool's dtype (`kv_dtype`:
float32, bfloat16 or float16; round to nearest even).

kv_append into a quantized pool: int8, or float8_e4m3fn (FP8) where the architecture has it
(codes, then float32 scales [num_layers, 2, num_blocks, num_kv_heads] after them, as on the CPU:
targets/signatures.py). Grid (T, num_kv_heads): the program of token t does work only when t
starts a *run*, the tokens of this call that go to consecutive slots of one block (t's slot is at
offset 0 of its block, or token t - 1 went elsewhere). It then writes the whole run for its kv
head, K and V each as one [block_size, head_dim] tile: the block's scale becomes max(old,
max|run| / QMAX) (QMAX 127 for int8, 448 for FP8 E4M3; old = 0 when the run starts the block),
the codes already in the block are requantized to it (code * old / new, rounded: a no-op when it
did not grow), and the run's codes are x / new rounded: rint for int8, the conversion's round to
nearest even for FP8. So each call requantizes a block at most once, in the CPU's int8 kernel's
arithmetic (correctly rounded divisions included): both targets give the same codes and scales.

rope_kv_append (the fuse-rope-kv-append pass; float pools): one program per token rotates its q
heads into out and its k heads straight into their pool slots (one cos/sin per token for both),
and copies v.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmirc import dtypes

from .spec import Launch, Rule, Variant, kernel, next_pow2


@triton.jit
def _cos_sin(pos, INV_FREQ: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, SCALING: tl.constexpr):
    i = tl.arange(0, HALF_PAD)
    f = tl.zeros([HALF_PAD], tl.float32)
    for j in tl.static_range(HALF):
        f = tl.where(i == j, INV_FREQ[j], f)
    a = pos.to(tl.float32) * f
    return tl.cos(a) * SCALING, tl.sin(a) * SCALING


@triton.jit
def _rope_heads(dst, head_stride, src, c, s, ok, NH: tl.constexpr, NH_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                ROT: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dst[h * head_stride + i] = rope(src[h * HEAD_DIM + i]) for the NH heads (columns ROT..HEAD_DIM
    copied), rounded to dst's dtype, where `ok` (a [1, 1] block). dst may be src."""
    h = tl.arange(0, NH_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    if INTERLEAVED:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + ROT // 2
    m = (h < NH) & (i < ROT // 2) & ok
    x1 = tl.load(src + h * HEAD_DIM + c1, mask=m, other=0.0)
    x2 = tl.load(src + h * HEAD_DIM + c2, mask=m, other=0.0)
    dt = dst.dtype.element_ty
    if ROT < HEAD_DIM:
        cc = ROT + tl.arange(0, TAIL_PAD)[None, :]
        mt = (h < NH) & (cc < HEAD_DIM) & ok
        tl.store(dst + h * head_stride + cc, tl.load(src + h * HEAD_DIM + cc, mask=mt).to(dt), mask=mt)
    tl.store(dst + h * head_stride + c1, (x1 * c[None, :] - x2 * s[None, :]).to(dt), mask=m)
    tl.store(dst + h * head_stride + c2, (x2 * c[None, :] + x1 * s[None, :]).to(dt), mask=m)


@triton.jit
def rope_kernel(out, ld_out, x, ld_x, positions, T, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                ROT: tl.constexpr, INTERLEAVED: tl.constexpr, INV_FREQ: tl.constexpr, SCALING: tl.constexpr,
                NH_PAD: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c, s = _cos_sin(tl.load(positions + t), INV_FREQ, ROT // 2, HALF_PAD, SCALING)
    _rope_heads(out + t * ld_out, HEAD_DIM, x + t * ld_x, c, s, tl.full([1, 1], 1, tl.int1), NUM_HEADS, NH_PAD,
                HEAD_DIM, ROT, HALF_PAD, TAIL_PAD, INTERLEAVED)


@triton.jit
def _load_slot(slot_mapping, t):
    """slot_mapping[t] as a [1, 1] block (it masks [heads, dims] tiles; Triton's interpreter turns
    a scalar bool combined with a block bool into int32)."""
    return tl.load(slot_mapping + t + tl.zeros([1, 1], tl.int32))


@triton.jit
def _slot_base(pool, num_blocks, layer, slot, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """Pointer to pool[layer, 0, slot / BS, 0, slot % BS, 0] (the V plane is num_blocks*G*BS*D further)."""
    blk = (slot // BS).to(tl.int64)
    off = (slot % BS).to(tl.int64)
    return pool + ((layer.to(tl.int64) * 2 * num_blocks + blk) * G * BS + off) * D


@triton.jit
def _write_heads(dst, src, m_row, G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                 D_PAD: tl.constexpr):
    """dst[g*BS*D + d] = src[g*D + d] (one token's heads into their pool slots), rounded to dst's dtype."""
    g = tl.arange(0, G_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    m = (g < G) & (d < D) & m_row
    tl.store(dst + g * (BS * D) + d, tl.load(src + g * D + d, mask=m).to(dst.dtype.element_ty), mask=m)


@triton.jit
def kv_append_kernel(pool, num_blocks, layer, k, ld_k, v, ld_v, slot_mapping, T, G: tl.constexpr,
                     D: tl.constexpr, BS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = _load_slot(slot_mapping, t)
    ok = slot >= 0
    base = _slot_base(pool, num_blocks, layer, tl.maximum(slot, 0), G, BS, D)
    _write_heads(base, k + t * ld_k, ok, G, G_PAD, BS, D, D_PAD)
    _write_heads(base + num_blocks.to(tl.int64) * G * BS * D, v + t * ld_v, ok, G, G_PAD, BS, D, D_PAD)


@triton.jit
def _rint(x):
    """x (f32, |x| < 2^22) rounded to the nearest integer, ties to even: the f32 add rounds (no
    libdevice, so Triton's interpreter runs it too). Give it a value, not a product: ptxas fuses a
    product into the add (FFMA) and rounds the exact product instead (_codes_of clamps first)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _codes_of(x, QMAX: tl.constexpr, dt: tl.constexpr):
    """x (f32, scaled to [-QMAX, QMAX]) as codes of dt: int8 by rint, FP8 by its conversion."""
    x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
    if dt == tl.int8:
        return _rint(x).to(dt)
    return x.to(dt)


@triton.jit
def _append_run(codes, scale, src, ld, t, off0, n, lead, QMAX: tl.constexpr, BS: tl.constexpr,
                BS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One kv head's block: `codes` [BS, D] (int8 or FP8) and its `scale`; the run's n tokens (rows
    t..t+n-1 of src, head columns) go to offsets off0..off0+n-1. off0, n, lead: [1, 1] blocks."""
    r = tl.arange(0, BS_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    i = r - off0
    new_rows = lead & (i >= 0) & (i < n) & (d < D)
    old_rows = lead & (r < off0) & (d < D)
    x = tl.load(src + (t + i).to(tl.int64) * ld + d, mask=new_rows, other=0.0)
    old = tl.load(scale + tl.zeros([1, 1], tl.int32), mask=lead & (off0 > 0), other=0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1, keep_dims=True), axis=0, keep_dims=True)
    # correctly rounded divisions (div.rn, not Triton's default div.full), as the CPU's: the same scales
    new = tl.maximum(old, tl.div_rn(amax, tl.full([1, 1], QMAX, tl.float32)))
    safe = tl.where(new > 0, new, 1.0)
    ratio = tl.div_rn(old, safe)
    inv = tl.where(new > 0, tl.div_rn(tl.full([1, 1], 1.0, tl.float32), safe), 0.0)
    kept = tl.load(codes + r * D + d, mask=old_rows).to(tl.float32) * ratio  # (masked lanes: not kept)
    dt = codes.dtype.element_ty
    tl.store(codes + r * D + d, _codes_of(tl.where(r < off0, kept, x * inv), QMAX, dt), mask=old_rows | new_rows)
    tl.store(scale + tl.zeros([1, 1], tl.int32), new, mask=lead)


@triton.jit
def pool_scales(pool, nb, layer, g, NUM_LAYERS: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """Pointer to a quantized pool's float32 scale of (layer, K, block 0, kv head g): block b's is
    b * G further, V's nb * G further (the scales follow the codes of all NUM_LAYERS layers)."""
    scales = (pool + NUM_LAYERS * 2 * nb * (G * BS * D)).to(tl.pointer_type(tl.float32), bitcast=True)
    return scales + layer.to(tl.int64) * 2 * nb * G + g


@triton.jit
def kv_append_quantized_kernel(pool, num_blocks, layer, k, ld_k, v, ld_v, slot_mapping, T, G: tl.constexpr,
                               D: tl.constexpr, BS: tl.constexpr, NUM_LAYERS: tl.constexpr, QMAX: tl.constexpr,
                               BS_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    slot = _load_slot(slot_mapping, t)
    t11 = tl.zeros([1, 1], tl.int64) + t
    prev = tl.load(slot_mapping + t11 - 1, mask=t11 > 0, other=-2)
    off0 = slot % BS
    lead = (slot >= 0) & ((off0 == 0) | (prev != slot - 1))
    # the run: tokens t + i whose slots continue t's within its block
    i = tl.arange(0, BS_PAD)[None, :]
    nxt = tl.load(slot_mapping + t + i, mask=(t + i < T) & (i < BS - off0), other=-1)
    n = tl.min(tl.where(nxt == slot + i, BS_PAD, i), axis=1, keep_dims=True)
    blk = (tl.maximum(slot, 0) // BS).to(tl.int64)
    nb = num_blocks.to(tl.int64)
    scales = pool_scales(pool, nb, layer, g, NUM_LAYERS, G, BS, D)
    head = layer.to(tl.int64) * 2 * nb + blk  # [1, 1]: (layer, K, block); V is nb blocks further
    _append_run(pool + (head * G + g) * (BS * D), scales + blk * G, k + g * D, ld_k, t, off0, n, lead,
                QMAX, BS, BS_PAD, D, D_PAD)
    head += nb
    _append_run(pool + (head * G + g) * (BS * D), scales + (nb + blk) * G, v + g * D, ld_v, t, off0, n, lead,
                QMAX, BS, BS_PAD, D, D_PAD)


@triton.jit
def rope_kv_append_kernel(out, ld_out, q, ld_q, k, ld_k, v, ld_v, positions, pool, num_blocks, layer,
                          slot_mapping, T, NUM_HEADS: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                          ROT: tl.constexpr, INTERLEAVED: tl.constexpr, INV_FREQ: tl.constexpr,
                          SCALING: tl.constexpr, BS: tl.constexpr, NH_PAD: tl.constexpr, G_PAD: tl.constexpr,
                          HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c, s = _cos_sin(tl.load(positions + t), INV_FREQ, ROT // 2, HALF_PAD, SCALING)
    _rope_heads(out + t * ld_out, HEAD_DIM, q + t * ld_q, c, s, tl.full([1, 1], 1, tl.int1), NUM_HEADS, NH_PAD,
                HEAD_DIM, ROT, HALF_PAD, TAIL_PAD, INTERLEAVED)
    slot = _load_slot(slot_mapping, t)
    ok = slot >= 0
    base = _slot_base(pool, num_blocks, layer, tl.maximum(slot, 0), G, BS, HEAD_DIM)
    _rope_heads(base, BS * HEAD_DIM, k + t * ld_k, c, s, ok, G, G_PAD, HEAD_DIM, ROT, HALF_PAD, TAIL_PAD,
                INTERLEAVED)
    _write_heads(base + num_blocks.to(tl.int64) * G * BS * HEAD_DIM, v + t * ld_v, ok, G, G_PAD, BS, HEAD_DIM,
                 D_PAD)


def _rope_constexprs(params) -> dict:
    head_dim = int(params["head_dim"])
    rot = int(params["rotary_dim"] or head_dim)
    if rot % 2 or rot > head_dim or len(params["inv_freq"]) != rot // 2:
        raise ValueError(f"rope: rotary_dim {rot} must be even, <= head_dim {head_dim}, "
                         f"with rotary_dim/2 inv_freq values (got {len(params['inv_freq'])})")
    style = params["style"]
    if style not in ("neox", "interleaved"):
        raise ValueError(f"rope: unknown style {style!r}")
    return {"HEAD_DIM": head_dim, "ROT": rot, "INTERLEAVED": style == "interleaved",
            "INV_FREQ": tuple(float(f) for f in params["inv_freq"]), "SCALING": float(params["scaling"]),
            "HALF_PAD": next_pow2(rot // 2), "TAIL_PAD": next_pow2(max(1, head_dim - rot))}


def _warps(elems: int) -> int:
    return max(1, min(8, elems // 512))


def rule_rope(params, arch, args) -> Rule:
    cx = _rope_constexprs(params)
    nh = int(params["num_heads"])
    spec = kernel(rope_kernel, {"NUM_HEADS": nh, "NH_PAD": next_pow2(nh), **cx}, args,
                  num_warps=_warps(next_pow2(nh) * cx["HALF_PAD"]))
    return Rule("rope", params, args, [Variant(1, (Launch(spec, ("T", 1, 1)),))])


QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}  # a quantized pool's largest code


def check_quantized_pool(params, arch) -> None:
    """A quantized pool's float32 scales start right after its codes: 4-byte aligned when a block's
    codes are an even number of bytes. FP8 needs an architecture that converts to and from it."""
    if int(params["num_layers"]) <= 0:
        raise ValueError("quantized KV pool: num_layers must be positive (the scales follow the codes of every layer)")
    if int(params["block_size"]) * int(params["head_dim"]) % 2:
        raise ValueError(f"quantized KV pool: block_size {params['block_size']} x head_dim {params['head_dim']} must "
                         "be even on GPU targets (the float32 scales after the codes must be 4-byte aligned)")
    if params["kv_dtype"] == dtypes.FP8_E4M3.name and not arch.has_fp8_e4m3:
        raise ValueError(f"{arch.name} has no float8_e4m3fn conversions (sm_89 and newer have)")


def rule_kv_append(params, arch, args) -> Rule:
    g, d = int(params["num_kv_heads"]), int(params["head_dim"])
    if params["kv_dtype"] in dtypes.QUANTIZED_KV:
        bs = int(params["block_size"])
        check_quantized_pool(params, arch)
        spec = kernel(kv_append_quantized_kernel, {
            "G": g, "D": d, "BS": bs, "NUM_LAYERS": int(params["num_layers"]), "QMAX": QMAX[params["kv_dtype"]],
            "BS_PAD": next_pow2(bs), "D_PAD": next_pow2(d)}, args, num_warps=_warps(next_pow2(bs) * next_pow2(d)))
        return Rule("kv_append", params, args, [Variant(1, (Launch(spec, ("T", g, 1)),))])
    spec = kernel(kv_append_kernel, {"G": g, "D": d, "BS": int(params["block_size"]), "G_PAD": next_pow2(g),
                                     "D_PAD": next_pow2(d)}, args, num_warps=_warps(next_pow2(g) * next_pow2(d)))
    return Rule("kv_append", params, args, [Variant(1, (Launch(spec, ("T", 1, 1)),))])


def rule_rope_kv_append(params, arch, args) -> Rule:
    if params["kv_dtype"] in dtypes.QUANTIZED_KV:
        raise ValueError("rope_kv_append: no quantized pool (plans use rope then kv_append for it)")
    cx = _rope_constexprs(params)
    nh, g = int(params["num_heads"]), int(params["num_kv_heads"])
    spec = kernel(rope_kv_append_kernel, {
        "NUM_HEADS": nh, "G": g, "BS": int(params["block_size"]), "NH_PAD": next_pow2(nh), "G_PAD": next_pow2(g),
        "D_PAD": next_pow2(cx["HEAD_DIM"]), **cx}, args,
        num_warps=_warps(next_pow2(nh + g) * next_pow2(cx["HEAD_DIM"])))
    return Rule("rope_kv_append", params, args, [Variant(1, (Launch(spec, ("T", 1, 1)),))])
