"""Perplexity of a token sequence under a loaded bundle, over sliding windows.

As Hugging Face's perplexity guide (and llama.cpp's perplexity tool, which uses stride =
context and scores the second half of each chunk) do it: windows of `context` tokens start
every `stride` tokens; each token is scored once, in the first window that holds it with at
least context - stride tokens before it, and never as a window's first token, which has no
prediction in it (so with stride = context those are not scored, as in the guide). The negative log-likelihood of token t is
-log softmax(logits[t - 1])[ids[t]], in float64; perplexity = exp(mean NLL).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from llmirc.errors import LlmircError, UsageError


@dataclass
class PerplexityResult:
    perplexity: float   # exp(nll); inf past float64's range (a mean NLL above ~709.78 nats)
    nll: float          # mean negative log-likelihood (nats per token)
    tokens: int         # tokens scored
    windows: int
    context: int
    stride: int

    def to_json(self) -> dict:
        """The fields; an infinite perplexity as null (JSON has no infinity)."""
        return dict(self.__dict__, perplexity=self.perplexity if math.isfinite(self.perplexity) else None)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    if context < 2 or not 1 <= stride <= context:
        raise UsageError(f"perplexity: need context >= 2 and 1 <= stride <= context, got {context} and {stride}")
    out, scored = [], 1  # tokens [0, scored) are done (token 0 has no prediction)
    begin = 0
    while scored < n:
        end = min(begin + context, n)
        out.append((begin, end, max(scored, begin + 1)))  # a window's first token has no prediction in it
        scored = end
        begin += stride
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] per row, in float64 (logits [rows, vocab])."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(score, ids: list[int], context: int, stride: int, on_window=None) -> PerplexityResult:
    """Perplexity of `ids`, with `score(window ids) -> logits [len, vocab]` (Model.score);
    `on_window()`, if given, is called after each window is scored (a progress bar)."""
    if len(ids) < 2:
        raise LlmircError("perplexity: the text has fewer than 2 tokens")
    total, count = 0.0, 0
    spans = windows(len(ids), context, stride)
    for begin, end, first in spans:
        logits = score(ids[begin:end])
        rows = logits[first - 1 - begin:end - 1 - begin]
        total += float(token_nll(rows, np.asarray(ids[first:end])).sum())
        count += end - first
        if on_window is not None:
            on_window()
    mean = total / count
    return PerplexityResult(math.exp(mean) if mean < math.log(sys.float_info.max) else math.inf, mean, count,
                            len(spans), context, stride)
