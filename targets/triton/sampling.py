"""Token selection on the device, so a decode step copies back token ids, not logits (GPU only).

argmax {vocab}
    (tokens, logits, ld_logits, L): tokens[l] = the first index of the largest logits[l, :]
    (torch.argmax; a NaN counts as the largest, as np.argmax). Grid (L, 1, 1).

sample {vocab}
    (tokens, logits, ld_logits, temperature, top_k, top_p, seeds, offsets, L), per row l:
    temperature[l] <= 1e-5: argmax, as llmirc.runtime.sampling. Otherwise Hugging Face's
    warpers in their order on scores s = logits / temperature (f32): top-k (top_k[l] in
    [1, vocab); other values: off) keeps the scores >= the k-th largest (ties kept); top-p
    (top_p[l] < 1; else off) removes, in the ascending stable order, the tokens whose
    cumulative probability (softmax over what top-k kept) is <= 1 - top_p, always keeping
    the most likely. The token is drawn from the softmax of the kept scores by Gumbel-max
    (argmax of s_i + G_i, exact for that distribution) with G_i = -log(-log(u_i)) in f64 and
    u_i from Philox-4x32 keyed by seeds[l] (int64) with counter (i, offsets[l] as two
    uint32 words, 0): the same (seed, offset, logits) give the same token.

    No sort: the k-th largest score and the top-p boundary are found by radix selection on
    order-preserving uint32 keys of the scores, 4 bits per pass (8 passes each; a pass is a
    16-bin histogram of counts, and of probability mass for top-p, over the row). The
    boundary's ties are resolved exactly (the lowest indices go first, as the stable sort
    orders them). Cost per sampled row: 1 + 8 (top-k) + 1 + 8 (top-p) + 1 passes over the
    row, in one program; greedy rows take one pass.

advance_step {block_size}
    (tokens, token_ids, positions, slot_mapping, block_tables, seq_lens, out, step, B,
    max_blocks, token_rows): between two greedy decode steps of a run captured in one graph
    (multi-step decode, vLLM's num_scheduler_steps; its advance_step kernels): with s = *step,
    out[s * B + b] = tokens[b]; then each live row b (slot_mapping[b] >= 0; padding rows have
    -1 and stay as they are) moves to its next position p + 1: token_ids[b] = tokens[b] (0 when
    at or past token_rows: the host ends the run there), seq_lens[b] + 1, and the slot its
    block table gives, block_tables[b, (p + 1) // block_size] * block_size + (p + 1) % block_size
    (a table entry past max_blocks reads as block 0: only after a run's last step, whose
    inputs are not used). *step += 1, after a barrier: every warp reads it first. One program:
    B <= the largest graph bucket.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .spec import Launch, Rule, Variant, kernel, next_pow2

GREEDY_TEMPERATURE = 1e-5  # llmirc.runtime.sampling.GREEDY_TEMPERATURE


@triton.jit
def _argmax(row, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """(the largest of row[:VOCAB], its first index), a NaN counting as the largest (np.argmax's
    answer: the first NaN): each lane keeps its own best over the chunks (the earliest on ties),
    then one reduction takes the lowest index holding the largest value. (A reduction per chunk,
    32 dependent ones over a 32000-entry row, took 17 us on an H200.)"""
    c = tl.arange(0, BLOCK)
    best_v = tl.load(row + c, mask=c < VOCAB, other=float("-inf"))
    best_i = c
    for c0 in range(BLOCK, VOCAB, BLOCK):
        cc = c0 + tl.arange(0, BLOCK)
        v = tl.load(row + cc, mask=cc < VOCAB, other=float("-inf"))
        better = (v > best_v) | ((v != v) & (best_v == best_v))
        best_i = tl.where(better, cc, best_i)
        best_v = tl.where(better, v, best_v)
    nan = best_v != best_v
    any_nan = tl.max(nan.to(tl.int32), 0) > 0
    best = tl.max(best_v, 0)
    first = tl.where(any_nan, tl.min(tl.where(nan, best_i, VOCAB), 0),
                     tl.min(tl.where(best_v == best, best_i, VOCAB), 0))
    return tl.where(any_nan, float("nan"), best), first


@triton.jit
def argmax_kernel(tokens, logits, ld_logits, L, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    _, i = _argmax(logits + r * ld_logits, VOCAB, BLOCK)
    tl.store(tokens + r, i)


@triton.jit
def _key(s):
    """Order-preserving uint32 key of f32 scores (NaN excluded)."""
    b = s.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return (b ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _unkey(k):
    b = (k.to(tl.int32, bitcast=True)) ^ -2147483648
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _histogram(row, temp, m, prefix, pmask, shift, thr_k, WEIGHTED: tl.constexpr, VOCAB: tl.constexpr,
               BLOCK: tl.constexpr):
    """Per 4-bit digit at `shift` of the keys >= thr_k with (key & pmask) == prefix: their count
    and, when WEIGHTED, their mass exp(s - m)."""
    bins = tl.arange(0, 16)
    cnt = tl.zeros([16], tl.int32)
    mass = tl.zeros([16], tl.float32)
    for c0 in range(0, VOCAB, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        s = tl.load(row + c, mask=c < VOCAB, other=0.0) / temp
        key = _key(s)
        ok = (c < VOCAB) & ((key & pmask) == prefix) & (key >= thr_k)
        hit = ((((key >> shift) & 15).to(tl.int32)[None, :] == bins[:, None]) & ok[None, :])
        cnt += tl.sum(hit.to(tl.int32), 1)
        if WEIGHTED:
            mass += tl.sum(tl.where(hit, tl.exp(s - m)[None, :], 0.0), 1)
    return cnt, mass


@triton.jit
def _top_k_key(row, temp, m, k, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """Key of the k-th largest score (radix select, most significant digit first)."""
    bins = tl.arange(0, 16)
    prefix = tl.zeros([], tl.uint32)
    pmask = tl.zeros([], tl.uint32)
    need = k
    for r in range(8):
        shift = 28 - 4 * r
        cnt, _ = _histogram(row, temp, m, prefix, pmask, shift, tl.zeros([], tl.uint32), False, VOCAB, BLOCK)
        suffix = tl.sum(cnt) - (tl.cumsum(cnt, 0) - cnt)  # tokens with digit >= d
        digit = tl.max(tl.where(suffix >= need, bins, 0))
        need -= tl.sum(tl.where(bins > digit, cnt, 0))
        prefix |= digit.to(tl.uint32) << shift
        pmask |= tl.full([], 15, tl.uint32) << shift
    return prefix


@triton.jit
def _top_p_cut(row, temp, m, thr_k, target, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """(key, ties removed): the smallest key whose cumulative mass (ascending) exceeds `target`,
    and how many of the tokens with that key (lowest indices first) are still removed."""
    bins = tl.arange(0, 16)
    prefix = tl.zeros([], tl.uint32)
    pmask = tl.zeros([], tl.uint32)
    below = tl.zeros([], tl.float32)
    n_tie = tl.zeros([], tl.int32)
    for r in range(8):
        shift = 28 - 4 * r
        cnt, mass = _histogram(row, temp, m, prefix, pmask, shift, thr_k, True, VOCAB, BLOCK)
        over = below + tl.cumsum(mass, 0) > target
        last = tl.max(tl.where(cnt > 0, bins, 0))  # rounding guard: no digit crosses the target
        digit = tl.minimum(tl.min(tl.where(over & (cnt > 0), bins, 16)), last)
        below += tl.sum(tl.where(bins < digit, mass, 0.0))
        n_tie = tl.sum(tl.where(bins == digit, cnt, 0))
        prefix |= digit.to(tl.uint32) << shift
        pmask |= tl.full([], 15, tl.uint32) << shift
    w = tl.exp(_unkey(prefix) - m)
    removed = tl.floor((target - below) / w).to(tl.int32)
    return prefix, tl.maximum(tl.minimum(removed, n_tie - 1), 0)


@triton.jit
def sample_kernel(tokens, logits, ld_logits, temperature, top_k, top_p, seeds, offsets, L,
                  VOCAB: tl.constexpr, BLOCK: tl.constexpr, GREEDY_T: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = logits + r * ld_logits
    temp = tl.load(temperature + r)
    best, best_i = _argmax(row, VOCAB, BLOCK)
    if temp > GREEDY_T:
        k = tl.load(top_k + r)
        p = tl.load(top_p + r)
        m = best / temp
        use_k = (k > 0) & (k < VOCAB)
        thr_k = tl.zeros([], tl.uint32)
        if use_k:
            thr_k = _top_k_key(row, temp, m, k, VOCAB, BLOCK)
        cut = tl.zeros([], tl.uint32)
        removed = tl.zeros([], tl.int32)
        use_p = p < 1.0
        if use_p:
            z = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, VOCAB, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                s = tl.load(row + c, mask=c < VOCAB, other=0.0) / temp
                z += tl.where((c < VOCAB) & (_key(s) >= thr_k), tl.exp(s - m), 0.0)
            cut, removed = _top_p_cut(row, temp, m, thr_k, (1.0 - p) * tl.sum(z), VOCAB, BLOCK)
        seed = tl.load(seeds + r)
        off = tl.load(offsets + r).to(tl.uint64)
        off_lo = tl.zeros([BLOCK], tl.uint32) + (off & 0xFFFFFFFF).to(tl.uint32)
        off_hi = tl.zeros([BLOCK], tl.uint32) + (off >> 32).to(tl.uint32)
        ties = tl.zeros([], tl.int32)
        best_g = float("-inf")
        for c0 in range(0, VOCAB, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            s = tl.load(row + c, mask=c < VOCAB, other=0.0) / temp
            key = _key(s)
            keep = (c < VOCAB) & (key >= thr_k)
            tie = keep & (key == cut)
            rank = ties + tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
            ties += tl.sum(tie.to(tl.int32))
            if use_p:
                keep &= (key > cut) | (tie & (rank >= removed))
            bits, _, _, _ = tl.philox(seed, c.to(tl.uint32), off_lo, off_hi, tl.zeros([BLOCK], tl.uint32))
            u = (bits.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # (0, 1)
            g = s - tl.log((-tl.log(u)).to(tl.float32))  # -log(u) in f64: accurate for u near 1
            g = tl.where(keep, g, float("-inf"))
            cg, ci = tl.max(g, 0, return_indices=True, return_indices_tie_break_left=True)
            better = cg > best_g
            best_i = tl.where(better, c0 + ci, best_i)
            best_g = tl.where(better, cg, best_g)
    tl.store(tokens + r, best_i)


def rule_argmax(params, arch, args) -> Rule:
    vocab = int(params["vocab"])
    block = min(next_pow2(vocab), 4096)
    spec = kernel(argmax_kernel, {"VOCAB": vocab, "BLOCK": block}, args, num_warps=8)
    return Rule("argmax", params, args, [Variant(1, (Launch(spec, ("L", 1, 1)),))])


def rule_sample(params, arch, args) -> Rule:
    vocab = int(params["vocab"])
    spec = kernel(sample_kernel, {"VOCAB": vocab, "BLOCK": min(next_pow2(vocab), 1024),
                                  "GREEDY_T": GREEDY_TEMPERATURE}, args, num_warps=8)
    return Rule("sample", params, args, [Variant(1, (Launch(spec, ("L", 1, 1)),))])


@triton.jit
def advance_step_kernel(tokens, token_ids, positions, slot_mapping, block_tables, seq_lens, out, step, B,
                        max_blocks, token_rows, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.load(step)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        rows = b < B
        t = tl.load(tokens + b, mask=rows, other=0)
        tl.store(out + s.to(tl.int64) * B + b, t, mask=rows)
        live = rows & (tl.load(slot_mapping + b, mask=rows, other=-1) >= 0)
        p = tl.load(positions + b, mask=live, other=0) + 1
        entry = p // BLOCK_SIZE
        block = tl.load(block_tables + b.to(tl.int64) * max_blocks + entry, mask=live & (entry < max_blocks),
                        other=0)
        tl.store(token_ids + b, tl.where(t < token_rows, t, 0), mask=live)
        tl.store(positions + b, p, mask=live)
        tl.store(seq_lens + b, tl.load(seq_lens + b, mask=live, other=0) + 1, mask=live)
        tl.store(slot_mapping + b, block * BLOCK_SIZE + p % BLOCK_SIZE, mask=live)
    tl.debug_barrier()  # every warp has read *step before it moves on
    tl.store(step, s + 1)


def rule_advance_step(params, arch, args) -> Rule:
    spec = kernel(advance_step_kernel, {"BLOCK_SIZE": int(params["block_size"]), "BLOCK": 256}, args, num_warps=4)
    return Rule("advance_step", params, args, [Variant(1, (Launch(spec, (1, 1, 1)),))])
