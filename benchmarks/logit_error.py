"""RMS and largest error of bundles' logits against a reference bundle's, on the same tokens:
a steadier measure than perplexity for comparing quantizations of one model (BENCHMARKS.md,
"Where int8 loses to Q8_0").

    python benchmarks/logit_error.py REFERENCE BUNDLE [BUNDLE ...] --text FILE [--tokens 256]

The first --tokens tokens of FILE (the reference's tokenizer, no BOS) are scored in one window
by each bundle (`Model.score`: float32 logits [tokens, vocab]); the error is taken in float64
over every position and vocabulary entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llmirc.runtime import load


def logits(bundle: Path, ids: list[int]) -> np.ndarray:
    model = load(bundle, kv_cache_tokens=len(ids), max_num_batched_tokens=len(ids), max_num_seqs=1)
    return np.asarray(model.score(ids), np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    ids = load(args.reference, kv_cache_tokens=16).tokenizer.encode(args.text.read_text(encoding="utf-8"))
    ids = ids[:args.tokens]
    ref = logits(args.reference, ids)
    for bundle in args.bundles:
        d = logits(bundle, ids) - ref
        print(f"{bundle}: logit RMS error {np.sqrt((d * d).mean()):.4f}, max {np.abs(d).max():.3f} "
              f"({len(ids)} tokens)")


if __name__ == "__main__":
    main()
