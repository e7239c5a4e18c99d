"""Host time of one sampling step: 64 sequences at a 32k vocabulary (issue 7, item 5).

    python benchmarks/sampling.py [--rows 64] [--vocab 32000] [--repeat 5]

Times `llmirc.runtime.sampling.sample` (partial selection) and, for reference, the same
semantics done the obvious way: one full sort of the vocabulary per row (what sampling did
before), on logits shaped like a language model's (a few likely tokens, a long tail).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llmirc.runtime.sampling import sample


def full_sort_sample(logits, temperature, top_k, top_p, rng):
    """The reference: sort every row, then HF's top-k / top-p masks, then inverse-CDF draws."""
    scores = logits.astype(np.float64) / temperature
    order = np.argsort(scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, -1)
    if top_k is not None:
        ranked[:, :-top_k] = -np.inf
    probs = np.exp(ranked - ranked[:, -1:])
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None:
        probs[np.cumsum(probs, -1) <= 1 - top_p] = 0
        probs /= probs.sum(-1, keepdims=True)
    cdf = np.cumsum(probs, -1)
    picked = (cdf <= rng.random((len(cdf), 1))).sum(-1).clip(max=cdf.shape[1] - 1)
    return np.take_along_axis(order, picked[:, None], -1)[:, 0]


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Zipf-like: a few likely tokens, a long tail, shuffled over the vocabulary.
    logits = (-1.1 * np.log(np.arange(1, args.vocab + 1))[rng.permutation(args.vocab)][None] * 3
              + rng.standard_normal((args.rows, args.vocab))).astype(np.float32)
    print(f"{args.rows} rows x {args.vocab} vocabulary, best of {args.repeat}")
    print(f"{'temperature, top_k, top_p':28s}{'llmirc ms':>11s}{'full sort ms':>14s}")
    for settings in [(1.0, None, None), (0.8, 50, None), (0.8, None, 0.95), (0.7, 40, 0.9)]:
        ours = best(lambda: sample(logits, *settings, np.random.default_rng(1)), args.repeat)
        ref = best(lambda: full_sort_sample(logits, *settings, np.random.default_rng(1)), args.repeat)
        print(f"{str(settings):28s}{1e3 * ours:11.1f}{1e3 * ref:14.1f}")


if __name__ == "__main__":
    main()
