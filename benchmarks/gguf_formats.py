"""GGUF block formats as llama.cpp writes them, compiled by llmirc and checked against llama.cpp on
the same file: a real model quantized by llama.cpp's own quantizer (gguf-py has none for the
K-quants and IQ formats, so the tests' files use random blocks).

    python benchmarks/gguf_formats.py [--model smollm2] [--kinds Q2_K,Q3_K_M,IQ4_NL,IQ4_XS] [--new-tokens 32]

For each llama.cpp file type (LLAMA_FTYPE_MOSTLY_<KIND>), made from the checkpoint's BF16 (or F32)
conversion by benchmarks/peers.py (kept in the work folder, as for compare.py): the file is compiled with `llmirc
compile` (its matrices kept quantized); llama.cpp (llama-cpp-python, 2 threads) decodes
--new-tokens greedily after a fixed English prompt; llmirc scores the same sequence (`score`,
float32 logits [tokens, vocab]) and decodes greedily from the prompt. Printed per kind: the
file's and the bundle's weight sizes, the logits' RMS error relative to llama.cpp's (over every
position and vocabulary entry, float64), top-1 agreement, and how many greedy tokens agree from
the start (the two engines quantize activations differently, so a near tie may go either way).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import peers  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type with an oil-based ink and a wooden press. Within decades,")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help=f"{'|'.join(models.NAMES)} or a checkpoint folder")
    parser.add_argument("--kinds", default="Q2_K,Q3_K_M,IQ4_NL,IQ4_XS",
                        help=f"llama.cpp file types, of {', '.join(peers.QUANTIZED_KINDS)}")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import llama_cpp

    from llmirc.runtime import load

    checkpoint, work = models.resolve(args.model)
    print(f"{checkpoint.name}; llama-cpp-python {llama_cpp.__version__}, 2 threads")
    print("| kind | file MiB | bundle weights MiB | logits rel. RMS | top-1 | greedy tokens equal |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.kinds.split(","):
        path = peers.to_gguf(checkpoint, work, kind)
        bundle = work / f"{path.stem}.llmir"
        done = subprocess.run([sys.executable, "-m", "llmirc", "compile", str(path), "-o", str(bundle), "-q"],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"| {kind} | compile failed: {done.stderr.strip().splitlines()[-1]} |")
            continue
        llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
        ids = llm.tokenize(PROMPT.encode(), add_bos=False)
        theirs_tokens: list[int] = []
        llm.eval(ids)
        for _ in range(args.new_tokens):
            theirs_tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(theirs_tokens[-1:])
        seq = ids + theirs_tokens
        theirs = np.asarray(llm.scores[:len(seq)], np.float64)
        model = load(bundle)
        ours = np.asarray(model.score(seq), np.float64)
        ours_tokens = model.generate([ids], max_new_tokens=args.new_tokens, ignore_eos=True)[0]
        rel = float(np.sqrt(((ours - theirs) ** 2).mean() / (theirs ** 2).mean()))
        top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
        equal = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), args.new_tokens)
        weights = sum(f.stat().st_size for f in (bundle / "weights").iterdir())
        print(f"| {kind} | {path.stat().st_size / 2**20:.1f} | {weights / 2**20:.1f} | {rel:.4f} | {top1:.3f} | "
              f"{equal}/{args.new_tokens} |")


if __name__ == "__main__":
    main()
