"""Token sampling from logits, with Hugging Face generate()'s order and semantics.

temperature -> top-k -> top-p -> min-p, as HF's TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper and MinPLogitsWarper (ties at the top-k boundary are all kept; top-p removes the
low tokens whose cumulative probability, summed from the least likely up, is <= 1 - top_p, and
always keeps the most likely one; min-p removes the tokens less likely than min_p times the most
likely). Probabilities are computed in float64 and sampled by inverse CDF, so a masked token can
never be drawn. Before them `penalize` applies a request's logit bias and repetition, frequency
and presence penalties to its logits, as vLLM's sampler does (greedy decoding included).

Host work per row is linear in the vocabulary, never a full sort: top-k finds its threshold
by partial selection (`np.partition`); top-p needs the row's normalizer (one pass of exp, done
for all rows at once), then sorts only the most likely candidates, a set that starts at
`TOP_P_CANDIDATES` tokens and grows only when those do not yet hold top_p of the mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np

from llmirc.errors import RequestError

GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is argmax
TOP_P_CANDIDATES = 64  # first guess of how many tokens top-p keeps; grown 8x while too small
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def sample(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None,
           rng: np.random.Generator | Sequence[np.random.Generator] | None = None, min_p: float = 0.0) -> np.ndarray:
    """One token id per row of `logits` [R, V] (any float dtype); returns int64 [R].

    `rng` is one generator for all rows (drawn in row order) or one per row (so that each
    request keeps its own seeded stream). Raises RequestError for invalid parameters."""
    validate_sampling(temperature, top_k, top_p, min_p)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {logits.shape}")
    if temperature <= GREEDY_TEMPERATURE:
        return np.argmax(logits, axis=-1).astype(np.int64)  # first max index, like torch.argmax
    uniforms = _uniforms(rng, logits.shape[0])
    _, weights = _top_k(logits, temperature, top_k)
    if top_p is not None and top_p < 1.0:  # HF adds no top-p warper for top_p == 1
        out = np.empty(len(weights), dtype=np.int64)
        for r, row in enumerate(weights):
            keep = _top_p(row, top_p)
            keep = keep[row[keep] >= min_p]  # (the most likely token, weight 1, stays)
            out[r] = keep[_draw(row[keep], uniforms[r])]
        return out
    if min_p > 0:  # a weight is the probability over the row's largest: min-p's ratio
        weights[weights < min_p] = 0.0
    # Inverse CDF over the whole row, all rows at once.
    cdf = np.cumsum(weights, axis=-1)
    picked = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(axis=-1)
    last_possible = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
    return np.minimum(picked, last_possible).astype(np.int64)


def warp(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
         min_p: float = 0.0) -> np.ndarray:
    """float64 logits / temperature with the tokens top-k, top-p and min-p remove set to -inf
    (temperature > 0).

    The dense form of what `sample` draws from, for comparison with transformers' warpers."""
    scores, weights = _top_k(np.asarray(logits), temperature, top_k)
    if top_p is not None and top_p < 1.0:
        for r, row in enumerate(weights):
            removed = np.ones(len(row), dtype=bool)
            removed[_top_p(row, top_p)] = False
            scores[r, removed] = -np.inf
    scores[weights < min_p] = -np.inf
    return scores


class BiasArrays(NamedTuple):
    """A logit bias as arrays: token ids (int64, each once) and their summed biases (float32)."""

    ids: np.ndarray
    biases: np.ndarray


def bias_arrays(logit_bias: Sequence[tuple[int, float]]) -> BiasArrays:
    """(token id, bias) pairs as BiasArrays, which `penalize` takes as its `logit_bias` too: made once
    for a request's every step."""
    if not logit_bias:
        return BiasArrays(np.zeros(0, np.int64), np.zeros(0, np.float32))
    ids, bias = zip(*logit_bias)
    ids, where = np.unique(np.array(ids, dtype=np.int64), return_inverse=True)
    with np.errstate(over="ignore"):
        return BiasArrays(ids, np.bincount(where, weights=np.array(bias, dtype=np.float64)).astype(np.float32))


def penalize(logits: np.ndarray, prompt_ids, output_ids, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             logit_bias: Sequence[tuple[int, float]] | BiasArrays = ()) -> np.ndarray:
    """One row of logits [V] (float32) as a request's logit bias and penalties change it (a new array).

    In vLLM's order: the bias is added (OpenAI's logit_bias); then the repetition penalty p divides a
    positive logit and multiplies a negative one of every token in the prompt or the output (Keskar et
    al. 2019, as HF's RepetitionPenaltyLogitsProcessor and vLLM); then a token that occurs c > 0 times
    in the output loses frequency_penalty * c + presence_penalty (OpenAI's definition; the prompt does
    not count). Token ids must lie in [0, V). `logit_bias`: pairs, or `bias_arrays` of them; a token
    twice gets both biases. A request's prompt ids as an array and its bias as `bias_arrays`, made
    once, keep the host work per step small (no conversion nor sort of the prompt, nor of the bias).

    The row stays float32 (a penalty outside float32's range acts as its nearest float32, above 0) and
    never holds +inf or NaN, whatever the values: a logit pushed past float32's largest is held there
    (a huge bias or a tiny repetition penalty; +inf would make sampling's softmax NaN), one pushed
    below its lowest is -inf (that token is never picked)."""
    row = np.array(logits, dtype=np.float32)
    with np.errstate(over="ignore"):  # (float32 overflow: handled below)
        ids, bias = logit_bias if isinstance(logit_bias, BiasArrays) else bias_arrays(logit_bias)
        if len(ids):
            row[ids] += bias  # (each id once)
            np.minimum(row, F32_MAX, out=row)
        if repetition_penalty != 1.0:
            # (an id twice is gathered twice, before any write, and written the same value twice)
            seen = np.concatenate([np.asarray(prompt_ids, dtype=np.int64), np.asarray(output_ids, dtype=np.int64)])
            v = row[seen]
            p = np.float32(min(max(repetition_penalty, F32_TINY), F32_MAX))  # (never 0 nor inf: no 0 * inf)
            row[seen] = np.minimum(np.where(v < 0, v * p, v / p), F32_MAX)  # (HF's form: 0 is divided)
        if (presence_penalty or frequency_penalty) and len(output_ids):
            ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
            row[ids] -= (np.float32(frequency_penalty) * counts + np.float32(presence_penalty)).astype(np.float32)
            np.minimum(row, F32_MAX, out=row)
    return row


def bad_words_ids(encode, words: Sequence[str]) -> list[tuple[int, ...]]:
    """The token sequences of vLLM's bad_words: each word, its leading spaces stripped, tokenized alone
    (`encode`: text -> ids, no special tokens) and after a space, the second kept when its first token
    differs and its length does not (a word-start token, as SentencePiece and byte-level BPE have)."""
    out = []
    for word in words:
        alone = tuple(encode(word.lstrip()))
        spaced = tuple(encode(" " + word.lstrip()))
        out += [alone] + ([spaced] if spaced[:1] != alone[:1] and len(spaced) == len(alone) else [])
    return [ids for ids in out if ids]


def ban_bad_words(row: np.ndarray, output_ids: Sequence[int], sequences: Sequence[tuple[int, ...]]) -> None:
    """Set to -inf, in place, the last token of each bad-word sequence whose other tokens the output ends
    with (a one-token sequence: always): vLLM's rule, so a bad word is never completed by this token."""
    for ids in sequences:
        head = len(ids) - 1
        if head <= len(output_ids) and (not head or list(output_ids[-head:]) == list(ids[:-1])):
            row[ids[-1]] = -np.inf


def _top_k(logits: np.ndarray, temperature: float, top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(float64 scores = logits / temperature with the tokens top-k removes at -inf,
    unnormalized probabilities exp(score - row max): 0 where removed), both [R, V]. `temperature`: any real
    number validate_sampling takes (a Fraction made the scores an object array, whose exp raised in the
    engine's step: every request failed and the engine served nothing more)."""
    scores = logits.astype(np.float64) / float(temperature)
    vocab = scores.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k, None]  # linear-time selection
        scores[scores < kth] = -np.inf  # every tie at the boundary is kept
    return scores, np.exp(scores - scores.max(axis=-1, keepdims=True))


def _top_p(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (most likely first) of the tokens top-p keeps, from one row of unnormalized probabilities."""
    total = weights.sum()
    n = len(weights)
    count = min(TOP_P_CANDIDATES, n)
    while True:
        cand = np.argpartition(-weights, count - 1)[:count] if count < n else np.arange(n)
        cand = cand[np.argsort(-weights[cand], kind="stable")]
        above = np.cumsum(weights[cand]) - weights[cand]  # mass of the tokens more likely than each
        # HF: the ascending cumulative probability at a token is 1 - (mass above it); removed if <= 1 - top_p.
        removed = (total - above) / total <= 1 - top_p
        removed[0] = False  # the most likely token always stays
        if removed.any() or count == n:
            return cand[:np.argmax(removed)] if removed.any() else cand
        count = min(count * 8, n)


def _draw(weights: np.ndarray, u: float) -> int:
    """Index of the first cumulative weight above u * total: tokens of weight 0 add nothing to the
    sum, so they are never the first to exceed it; u * total can round up to the total, hence the
    clamp to the last token that has weight."""
    cdf = np.cumsum(weights)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), int(np.flatnonzero(weights)[-1]))


def _uniforms(rng, rows: int) -> np.ndarray:
    if rng is None or isinstance(rng, np.random.Generator):
        return (rng if rng is not None else np.random.default_rng()).random(rows)
    if len(rng) != rows:
        raise ValueError(f"got {len(rng)} generators for {rows} rows")
    return np.array([g.random() for g in rng])


def logprobs(logits: np.ndarray, token_ids, top_n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-probabilities of the model's raw distribution (log-softmax of the logits, before any warping).

    logits [R, V]; token_ids [R]. Returns (logprob of each token [R] float32, the top_n most
    likely ids [R, top_n] int64 best first, their logprobs [R, top_n] float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = logits.max(axis=-1, keepdims=True)
    norm = peak + np.log(np.exp((logits - peak).astype(np.float64)).sum(axis=-1, keepdims=True))
    chosen = logits[np.arange(len(logits)), np.asarray(token_ids, dtype=np.int64)] - norm[:, 0]
    if top_n <= 0:
        empty = np.zeros((len(logits), 0))
        return chosen.astype(np.float32), empty.astype(np.int64), empty.astype(np.float32)
    top_n = min(top_n, logits.shape[-1])
    top = np.argpartition(-logits, top_n - 1, axis=-1)[:, :top_n]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(logits, top, -1), axis=-1, kind="stable"), -1)
    return chosen.astype(np.float32), top.astype(np.int64), (np.take_along_axis(logits, top, -1) - norm).astype(
        np.float32)


def validate_sampling(temperature, top_k, top_p, min_p=0.0) -> None:
    """Raises RequestError naming the first invalid parameter (True is not a number here: it would act as 1)."""
    if isinstance(temperature, bool) or not (isinstance(temperature, Real) and math.isfinite(temperature)
                                             and temperature >= 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}", "temperature")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise RequestError(f"top_k must be an integer >= 1 (or unset), got {top_k!r}", "top_k")
    if top_p is not None and (isinstance(top_p, bool) or not (isinstance(top_p, Real) and 0 < top_p <= 1)):
        raise RequestError(f"top_p must be in (0, 1] (or unset), got {top_p!r}", "top_p")
    if isinstance(min_p, bool) or not (isinstance(min_p, Real) and 0 <= min_p <= 1):
        raise RequestError(f"min_p must be in [0, 1], got {min_p!r}", "min_p")
