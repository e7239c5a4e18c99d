"""How sure a perplexity gap between two bundles is: the ratio of perplexities on the same texts, with a
95% interval from a block bootstrap over the scored tokens (Kunsch 1989: blocks of consecutive tokens
resampled with replacement, since neighbouring tokens' losses are correlated), per text and pooled.

    python benchmarks/ppl_gap.py REFERENCE BUNDLE --text FILE [--text FILE ...] [--block 256]
        [--context 512] [--stride 256] [--samples 10000] [--section NAME=MARKER ...]

Both bundles score the same token ids (REFERENCE's tokenizer) in the windows of `llmirc eval-ppl
--context C --stride S`, so each text's ratio is the one `eval-ppl` gives. --section splits a text at
MARKER's first occurrence in it (a licence's title, say; the first section runs from the text's start)
and prints each part's ratio too.
"""

from __future__ import annotations

import argparse

import numpy as np

from llmirc.runtime import load
from llmirc.runtime.perplexity import token_nll, windows

FORMAT = "%7.4f  [%.4f, %.4f]"  # ratio, 95% interval


def token_losses(bundle: str, ids: list[int], context: int, stride: int) -> np.ndarray:
    """Each scored token's negative log-likelihood (nats; NaN for token 0, which nothing predicts)."""
    nll = np.full(len(ids), np.nan)
    with load(bundle) as model:
        for begin, end, first in windows(len(ids), context, stride):
            logits = model.score(ids[begin:end])
            nll[first:end] = token_nll(logits[first - 1 - begin:end - 1 - begin], np.asarray(ids[first:end]))
    return nll


def interval(deltas: list[np.ndarray], block: int, samples: int, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, 2.5th, 97.5th percentile) of exp(mean loss difference), blocks of `block` tokens resampled."""
    blocks = [d[i:i + block] for d in deltas for i in range(0, len(d), block)]
    sums, counts = np.array([b.sum() for b in blocks]), np.array([len(b) for b in blocks])
    picks = np.random.default_rng(seed).integers(0, len(blocks), (samples, len(blocks)))
    boots = np.exp(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    return float(np.exp(sums.sum() / counts.sum())), *map(float, np.percentile(boots, [2.5, 97.5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference")
    parser.add_argument("bundle")
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--block", type=int, default=256, help="tokens per bootstrap block")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--section", action="append", default=[], metavar="NAME=MARKER")
    args = parser.parse_args()
    with load(args.reference) as model:
        tokenizer = model.tokenizer
    print(f"{'text':<32} {'tokens':>6} {'ratio':>7}  95% interval")
    pooled = []
    for path in args.text:
        text = open(path, encoding="utf-8").read()
        ids = tokenizer.encode(text)  # (as eval-ppl: bos first where the tokenizer adds it)
        offsets = [start for start, _ in tokenizer.backend.encode(text, add_special_tokens=False).offsets]
        starts = np.array([0] * (len(ids) - len(offsets)) + offsets)  # each token's first character
        delta = (token_losses(args.bundle, ids, args.context, args.stride)
                 - token_losses(args.reference, ids, args.context, args.stride))
        scored = ~np.isnan(delta)
        pooled.append(delta[scored])
        print(f"{path:<32} {scored.sum():>6} {FORMAT % interval([delta[scored]], args.block, args.samples)}")
        marks = sorted((text.find(marker), name) for name, marker in (s.split("=", 1) for s in args.section)
                       if marker in text)
        marks[:1] = [(0, name) for _, name in marks[:1]]  # (the first section from the text's start)
        for (lo, name), (hi, _) in zip(marks, marks[1:] + [(len(text) + 1, "")]):
            d = delta[scored & (starts >= lo) & (starts < hi)]
            print(f"  {name:<30} {len(d):>6} {FORMAT % interval([d], args.block, args.samples)}")
    if len(pooled) > 1:
        print(f"{'pooled':<32} {sum(map(len, pooled)):>6} {FORMAT % interval(pooled, args.block, args.samples)}")


if __name__ == "__main__":
    main()
