"""Token sampling from logits, with Hugging Face generate()'s order and semantics.

temperature -> top-k -> top-p, as HF's TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper (ties at the top-k boundary are all kept; top-p removes the low tokens whose
cumulative probability is <= 1 - top_p and always keeps the most likely one). The warped logits
are turned into probabilities in float64 and sampled by inverse CDF, so a masked token can never
be drawn.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from llmirc.errors import LlmircError

GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is argmax


def sample(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """One token id per row of `logits` [R, V]; returns int64 [R]."""
    _validate(temperature, top_k, top_p)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {logits.shape}")
    if temperature <= GREEDY_TEMPERATURE:
        return np.argmax(logits, axis=-1).astype(np.int64)  # first max index, like torch.argmax
    scores = warp(logits, temperature, top_k, top_p)
    return _draw(_softmax(scores), rng if rng is not None else np.random.default_rng())


def warp(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """float64 logits / temperature with the tokens top-k and top-p remove set to -inf (temperature > 0)."""
    scores = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        scores = apply_top_k(scores, top_k)
    if top_p is not None and top_p < 1.0:  # HF adds no top-p warper for top_p == 1
        scores = apply_top_p(scores, top_p)
    return scores


def apply_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Mask (-inf) every score below the k-th largest of its row."""
    kth = np.partition(scores, scores.shape[-1] - top_k, axis=-1)[:, -top_k, None]
    return np.where(scores < kth, -np.inf, scores)


def apply_top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Mask the least likely tokens whose cumulative probability stays <= 1 - top_p."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Index of the first cumulative probability above u: tokens of probability 0 add nothing
    # to the sum, so they are never the first to exceed u.
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    picked = (cdf <= u).sum(axis=-1)
    # u * total can round up to total; then fall back to the last token that has probability.
    last_possible = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(picked, last_possible).astype(np.int64)


def _validate(temperature, top_k, top_p) -> None:
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature >= 0):
        raise LlmircError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise LlmircError(f"top_k must be an integer >= 1 (or unset), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
        raise LlmircError(f"top_p must be in (0, 1] (or unset), got {top_p!r}")
