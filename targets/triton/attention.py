"""paged_attention {num_heads, num_kv_heads, head_dim, block_size, scale, sliding_window, softcap, kv_dtype}.

Semantics and arguments as targets/signatures.py says (shared with the CPU target), the pool
in `kv_dtype` (float32, bfloat16, float16, or int8 / FP8 codes with float32 scales after them),
plus one buffer:

    (out, ld_out, q, ld_q, pool, num_blocks, layer, block_tables, max_blocks, seq_lens,
     query_start_loc, B, positions, T, attn_workspace)

Each program takes the HP = num_heads / num_kv_heads query heads that share a kv head (GQA
packing) for some tokens and streams that kv head's keys through the block table in tiles of
BLOCK_N keys (any block_size: each key's block is looked up), with an online softmax in f32
(exp2, scale folded with log2 e; with a softcap, the scores capped by elementwise.softcap first).
Scores and P.V are tl.dot: for f32 pools in input_precision="ieee"; for bf16/f16 pools q and P
are rounded to the pool's dtype (tensor
cores, f32 accumulation), as a half-precision model computes them. A quantized pool's codes
(int8, FP8 E4M3) widen exactly to bf16 and go through the tensor cores with bf16 q: each key's
block scale multiplies its score column, each value's its column of P before P is rounded (so
P.V sums P_j * scale_j * code_j). A token with no keys gets zeros. head_dim <= 256 (padded to a
power of two); any block_size, any HP.

Two kernels, chosen by the launch rule:

* T <= B (decode: one token per sequence, or fewer): flash-decoding. Grid (T, num_kv_heads, S):
  split s of token t covers a contiguous S-th of the token's key range [lo, hi]. With
  S = max(1, min(cdiv(max_blocks * block_size, 256), cdiv(4 * SMs, T * num_kv_heads))) the
  grid fills the GPU at batch 1 and long contexts. S == 1: the kernel writes `out` directly.
  S > 1: each split writes (acc, max, sum) of its heads to `attn_workspace` and counts itself
  on the (token, kv head)'s counter in `attn_counters` (splitk.py's `arrive`); the last to
  arrive resets the counter and merges the S partials in split order into `out`. One launch
  either way (a reduce kernel of its own cost 2.3 us a layer on an H200). attn_workspace:
  4 * (head_dim + 2) * num_heads * (T + cdiv(4 * SMs, num_kv_heads)) bytes (an upper bound of
  T * S rows); attn_counters: 4 * T * num_kv_heads bytes, zeroed once (zero after each launch).
* otherwise (prefill, chunked prefill, mixed batches): flash attention over variable-length
  sequences in one flat batch. Program (i, g) takes a tile of BLOCK_Q = BLOCK_M / HP
  consecutive tokens of one sequence: tile j of sequence b is program
  query_start_loc[b] // BLOCK_Q + b + j (binary search over the B sequences), so the grid is
  (T // BLOCK_Q + B, num_kv_heads) and surplus programs return. Each row has its own causal
  (and sliding-window) key range; the tile streams the union.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmirc import dtypes
from llmirc.targets.signatures import softcap_param

from .elementwise import softcap
from .pdl import pdl_mode, pdl_trigger
from .rope import check_quantized_pool, pool_scales
from .spec import Launch, Rule, Variant, add, cdiv, eq, kernel, le, max_, min_, mul, next_pow2
from .splitk import arrive

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
KEYS_PER_SPLIT = 256  # the fewest keys a decode split takes (before the GPU is full)


@triton.jit
def _find_sequence(query_start_loc, B, t):
    """b with query_start_loc[b] <= t < query_start_loc[b + 1] (binary search)."""
    lo = 0
    hi = B.to(tl.int32)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) <= t:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _attend(q, ld_q, tok, head, row_ok, pool, num_blocks, layer, g, block_tables_b, k_lo, k_hi, row_lo, row_hi,
            M: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
            BLOCK_N: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, KV_F32: tl.constexpr,
            NUM_LAYERS: tl.constexpr):
    """(acc [M, D_PAD], max [M], sum [M]): online softmax of M query rows (row r: token tok[r], head
    head[r], keys row_lo[r]..row_hi[r]) over the keys k_lo..k_hi of kv head g, key j read at block
    block_tables_b[j // BS], slot j % BS of the pool. NUM_LAYERS > 0: a quantized pool (its scales
    after the codes of NUM_LAYERS layers). SOFTCAP > 0: scores SOFTCAP * tanh(s / SOFTCAP)."""
    d = tl.arange(0, D_PAD)
    q_mask = row_ok[:, None] & (d[None, :] < D)
    qt = tl.load(q + tok.to(tl.int64)[:, None] * ld_q + head[:, None] * D + d[None, :], mask=q_mask, other=0.0)
    if NUM_LAYERS > 0:
        qt = qt.to(tl.bfloat16)
    elif not KV_F32:
        qt = qt.to(pool.dtype.element_ty)
    nb = num_blocks.to(tl.int64)
    V_OFF = nb * G * BS * D  # the V plane
    kv = pool + layer.to(tl.int64) * 2 * V_OFF + g * (BS * D)
    scales = pool_scales(pool, nb, layer, g, NUM_LAYERS, G, BS, D)  # (NUM_LAYERS > 0)
    G_STRIDE: tl.constexpr = G * BS * D
    acc = tl.zeros([M, D_PAD], tl.float32)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    for j0 in range(k_lo, k_hi + 1, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j <= k_hi
        blk = tl.load(block_tables_b + j // BS, mask=j_ok, other=0).to(tl.int64)
        rows = kv + blk[:, None] * G_STRIDE + (j % BS)[:, None] * D + d[None, :]
        kv_mask = j_ok[:, None] & (d[None, :] < D)
        k = tl.load(rows, mask=kv_mask, other=0.0)
        if NUM_LAYERS > 0:
            s = tl.dot(qt, tl.trans(k.to(tl.bfloat16))) * tl.load(scales + blk * G, mask=j_ok, other=0.0)[None, :]
        elif KV_F32:
            s = tl.dot(qt, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(k))
        if SOFTCAP > 0:
            s = softcap(s * SCALE, SOFTCAP) * LOG2E
        else:
            s = s * (SCALE * LOG2E)
        ok = (j[None, :] >= row_lo[:, None]) & (j[None, :] <= row_hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(rows + V_OFF, mask=kv_mask, other=0.0)
        if NUM_LAYERS > 0:
            p = p * tl.load(scales + (nb + blk) * G, mask=j_ok, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
        elif KV_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_range(pos, seq_len, WINDOW: tl.constexpr):
    hi = tl.minimum(pos, seq_len - 1)
    if WINDOW > 0:
        lo = tl.maximum(pos - WINDOW + 1, 0)
    else:
        lo = tl.zeros_like(pos)
    return lo, hi


@triton.jit
def paged_attention_decode_kernel(
        out, ld_out, q, ld_q, pool, num_blocks, layer, block_tables, max_blocks, seq_lens, query_start_loc, B,
        positions, T, attn_workspace, attn_counters, num_splits,
        H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
        SCALE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HP: tl.constexpr, HP_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, KV_F32: tl.constexpr, NUM_LAYERS: tl.constexpr, DIRECT: tl.constexpr,
        RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    t = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    b = _find_sequence(query_start_loc, B, t)
    lo, hi = _key_range(tl.load(positions + t), tl.load(seq_lens + b), WINDOW)
    chunk = tl.cdiv(tl.cdiv(hi - lo + 1, num_splits), BLOCK_N) * BLOCK_N
    k_lo = lo + split * chunk
    k_hi = tl.minimum(k_lo + chunk - 1, hi)

    r = tl.arange(0, HP_PAD)
    head = g * HP + r
    tok = tl.zeros([HP_PAD], tl.int32) + t
    acc, m_i, l_i = _attend(q, ld_q, tok, head, r < HP, pool, num_blocks, layer, g,
                            block_tables + b.to(tl.int64) * max_blocks, k_lo, k_hi, tl.zeros([HP_PAD], tl.int32) + k_lo,
                            tl.zeros([HP_PAD], tl.int32) + k_hi, HP_PAD, G, BS, D, D_PAD, BLOCK_N, SCALE, SOFTCAP,
                            KV_F32, NUM_LAYERS)
    d = tl.arange(0, D_PAD)
    t64 = t.to(tl.int64)
    q_mask = (r[:, None] < HP) & (d[None, :] < D)
    dst = out + t64 * ld_out + head[:, None] * D + d[None, :]
    if DIRECT:
        tl.store(dst, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], mask=q_mask)
    else:
        rows = ((t64 * H + head) * num_splits) * (D + 2)  # split s of head h: rows + s * (D + 2)
        tl.store(attn_workspace + rows[:, None] + split * (D + 2) + d[None, :], acc, mask=q_mask)
        tl.store(attn_workspace + rows + split * (D + 2) + D, m_i, mask=r < HP)
        tl.store(attn_workspace + rows + split * (D + 2) + D + 1, l_i, mask=r < HP)
        counter = attn_counters + t * G + g
        if arrive(counter, RELEASE_ALL, THREADS) == num_splits - 1:  # the last split merges them all
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            m = tl.full([HP_PAD], float("-inf"), tl.float32)
            for s in range(num_splits):
                m = tl.maximum(m, tl.load(attn_workspace + rows + s * (D + 2) + D, mask=r < HP,
                                          other=float("-inf"), cache_modifier=".cg"))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            total = tl.zeros([HP_PAD, D_PAD], tl.float32)
            l_sum = tl.zeros([HP_PAD], tl.float32)
            for s in range(num_splits):
                part = attn_workspace + rows + s * (D + 2)
                w = tl.exp2(tl.load(part + D, mask=r < HP, other=float("-inf"), cache_modifier=".cg") - m_safe)
                l_sum += w * tl.load(part + D + 1, mask=r < HP, other=0.0, cache_modifier=".cg")
                total += w[:, None] * tl.load(part[:, None] + d[None, :], mask=q_mask, other=0.0,
                                              cache_modifier=".cg")
            tl.store(dst, total / tl.where(l_sum > 0, l_sum, 1.0)[:, None], mask=q_mask)


@triton.jit
def paged_attention_prefill_kernel(
        out, ld_out, q, ld_q, pool, num_blocks, layer, block_tables, max_blocks, seq_lens, query_start_loc, B,
        positions, T,
        H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
        SCALE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KV_F32: tl.constexpr, NUM_LAYERS: tl.constexpr,
        PDL: tl.constexpr):
    pdl_trigger(PDL)
    i = tl.program_id(0)
    g = tl.program_id(1)
    # sequence b owns programs [qsl[b] // BLOCK_Q + b, qsl[b + 1] // BLOCK_Q + b + 1)
    lo = 0
    hi = B.to(tl.int32)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= i:
            lo = mid
        else:
            hi = mid
    b = lo
    q_start = tl.load(query_start_loc + b)
    q_end = tl.load(query_start_loc + b + 1)
    t0 = q_start + (i - (q_start // BLOCK_Q + b)) * BLOCK_Q
    if t0 < q_end:
        r = tl.arange(0, BLOCK_M)
        tok = t0 + r // HP
        head = g * HP + r % HP
        row_ok = (r < BLOCK_Q * HP) & (tok < q_end)
        pos = tl.load(positions + tok, mask=row_ok, other=0)
        row_lo, row_hi = _key_range(pos, tl.load(seq_lens + b), WINDOW)
        row_hi = tl.where(row_ok, row_hi, -1)
        k_lo = tl.min(tl.where(row_ok, row_lo, 2147483647))
        k_hi = tl.max(row_hi)

        acc, m_i, l_i = _attend(q, ld_q, tok, head, row_ok, pool, num_blocks, layer, g,
                                block_tables + b.to(tl.int64) * max_blocks, k_lo, k_hi, row_lo, row_hi, BLOCK_M, G, BS,
                                D, D_PAD, BLOCK_N, SCALE, SOFTCAP, KV_F32, NUM_LAYERS)
        d = tl.arange(0, D_PAD)
        tok64 = tok.to(tl.int64)
        q_mask = row_ok[:, None] & (d[None, :] < D)
        res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + tok64[:, None] * ld_out + head[:, None] * D + d[None, :], res, mask=q_mask)


def rule_paged_attention(params, arch, args) -> Rule:
    h, g, d, bs = (int(params[p]) for p in ("num_heads", "num_kv_heads", "head_dim", "block_size"))
    if h % g:
        raise ValueError(f"paged_attention: num_heads {h} is not a multiple of num_kv_heads {g}")
    d_pad = max(16, next_pow2(d))
    if d_pad > 256:
        raise ValueError(f"paged_attention: head_dim {d} > 256 is not supported on GPU targets")
    kv_f32 = params["kv_dtype"] == "float32"
    num_layers = 0
    if params["kv_dtype"] in dtypes.QUANTIZED_KV:
        check_quantized_pool(params, arch)
        num_layers = int(params["num_layers"])
    hp = h // g
    common = {"H": h, "G": g, "D": d, "D_PAD": d_pad, "BS": bs, "SCALE": float(params["scale"]),
              "SOFTCAP": softcap_param(params, "softcap", "paged_attention"),
              "WINDOW": int(params["sliding_window"] or 0), "HP": hp, "KV_F32": kv_f32, "NUM_LAYERS": num_layers,
              "PDL": pdl_mode(arch)}
    ws_rows = add("T", -(-4 * arch.num_sms // g))
    ws = {"name": "attn_workspace", "type": "*fp32", "bytes": mul(4 * (d + 2) * h, ws_rows), "zero_init": False}
    counters = {"name": "attn_counters", "type": "*i32", "bytes": mul(4 * g, "T"), "zero_init": True}
    # decode: flash-decoding split over the key range, the last split of a token merging them
    splits = max_(1, min_(cdiv(mul("max_blocks", bs), KEYS_PER_SPLIT), cdiv(4 * arch.num_sms, max_(1, mul("T", g)))))
    # key tiles of <= 32 KB of K and V (64 KB of LDS on gfx9)
    block_n = max(16, min(64, 32768 // (2 * d_pad * (4 if kv_f32 else 2))))
    warps_dec = 4 if d_pad <= 128 else 8
    dec = {**common, "HP_PAD": max(16, next_pow2(hp)), "BLOCK_N": block_n, "RELEASE_ALL": arch.backend == "hip",
           "THREADS": warps_dec * arch.warp_size}
    dec_args = args + (("attn_workspace", "*fp32"), ("attn_counters", "*i32"), ("num_splits", "i64"))
    direct = kernel(paged_attention_decode_kernel, dec | {"DIRECT": True}, dec_args, num_warps=warps_dec,
                    num_stages=2)
    split = kernel(paged_attention_decode_kernel, dec | {"DIRECT": False}, dec_args, num_warps=warps_dec,
                   num_stages=2)
    # prefill: varlen flash attention
    block_m = max(16 if d_pad > 128 else 64, next_pow2(hp))
    block_q = block_m // hp
    pre = kernel(paged_attention_prefill_kernel, {**common, "BLOCK_M": block_m, "BLOCK_Q": block_q, "BLOCK_N": block_n},
                 args, num_warps=4 if d_pad <= 128 else 8, num_stages=2)
    variants = [
        Variant(["and", le("T", "B"), eq(splits, 1)],
                (Launch(direct, ("T", g, 1), (("num_splits", 1),)),)),
        Variant(le("T", "B"), (Launch(split, ("T", g, splits), (("num_splits", splits),)),)),
        Variant(1, (Launch(pre, (_prefill_grid(block_q), g, 1)),)),
    ]
    return Rule("paged_attention", params, args, variants, [ws, counters])


def _prefill_grid(block_q: int):
    """T // BLOCK_Q + B programs along x (T // BLOCK_Q = cdiv(T + 1, BLOCK_Q) - 1)."""
    return add(["-", cdiv(add("T", 1), block_q), 1], "B")

