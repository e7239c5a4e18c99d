"""Perplexity of llmirc bundles and llama.cpp GGUF files on the same token ids (issue 9's quality goal).

    python benchmarks/perplexity.py --model smollm2 --text FILE [--text FILE2 ...] [--context 512] [--stride 256]
        [--max-tokens N] [--threads 2] [--engines llmirc:bf16,llmirc:int8,...] [--gguf FILE] [--json OUT]

--model: a benchmark checkpoint of benchmarks/models.py or a checkpoint folder; engines are
prepared as benchmarks/peers.py does it (llmirc:VARIANT compiles the checkpoint with that
variant's options, llama.cpp:KIND converts it with convert_hf_to_gguf.py / llama.cpp's
quantizer; conversions are cached in the model's work folder). --gguf FILE adds two engines on
that file as it is: `llmirc:gguf` (compiled without --dequantize: its blocks kept quantized) and
`llama.cpp:file`.

Each text is tokenized once, with the checkpoint's tokenizer (no BOS added), and every engine
(prepared once: an autoround compile takes half an hour) scores the same ids of each text over
the same sliding windows (llmirc.runtime.perplexity: windows of --context tokens every --stride
tokens, each token scored once with at least context - stride tokens before it, as Hugging
Face's perplexity guide does; `llmirc eval-ppl` computes the same).
llama.cpp scores a window with llama-cpp-python (logits_all, its KV cache reset between windows).
The load average is printed at the start and the end (other work slows the run, not the result).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import peers  # noqa: E402

DEFAULT_ENGINES = "llmirc:bf16,llmirc:int8,llmirc:int4-g128,llama.cpp:Q8_0,llama.cpp:Q4_0"


def llmirc_scorer(bundle: Path, context: int, threads: int):
    from llmirc.runtime import load

    model = load(bundle, kv_cache_tokens=context, max_num_batched_tokens=context, max_num_seqs=1, threads=threads)
    return model.score


def llama_cpp_scorer(gguf_file: Path, context: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_file), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def score(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], np.float32)

    return score


def prepare(engine: str, checkpoint: Path, work: Path, gguf_file: Path | None) -> tuple[str, Path]:
    """(kind, model path) of an engine: peers.prepare's, or the --gguf file's."""
    if engine == "llama.cpp:file":
        return "llama.cpp", gguf_file
    if engine == "llmirc:gguf":
        bundle = work / f"{gguf_file.stem}.llmir"
        peers._run([sys.executable, "-m", "llmirc.cli", "compile", str(gguf_file), "-o", str(bundle), "-q",
                    "--cpu-variants", "native"], "llmirc compile")
        return "llmirc", bundle
    prepared = peers.prepare(engine, checkpoint, work)
    return prepared.kind, prepared.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", type=Path, required=True, action="append", metavar="FILE",
                        help="a UTF-8 text file; repeat for more")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=DEFAULT_ENGINES)
    parser.add_argument("--gguf", type=Path, default=None, help="also llmirc and llama.cpp on this GGUF file")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from llmirc.runtime.perplexity import perplexity
    from llmirc.runtime.tokenizer import Tokenizer

    checkpoint, work = models.resolve(args.model)
    work = args.work or work
    tokenizer = Tokenizer.from_bundle_dir(checkpoint)
    texts = {str(t): tokenizer.encode(t.read_text(encoding="utf-8"))[:args.max_tokens] for t in args.text}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.gguf is not None:
        engines += ["llmirc:gguf", "llama.cpp:file"]
    print(f"load average {os.getloadavg()[0]:.2f} at the start; " + ", ".join(
        f"{len(ids)} tokens of {t}" for t, ids in texts.items()) + f"; context {args.context}, stride "
          f"{args.stride}, {args.threads} threads", file=sys.stderr, flush=True)
    results = {t: {} for t in texts}
    for engine in engines:
        try:
            kind, model = prepare(engine, checkpoint, work, args.gguf)
            scorer = (llmirc_scorer if kind == "llmirc" else llama_cpp_scorer)(model, args.context, args.threads)
            for text, ids in texts.items():
                start = time.perf_counter()
                r = perplexity(scorer, ids, args.context, args.stride)
                results[text][engine] = dict(r.to_json(), model=str(model), seconds=time.perf_counter() - start,
                                             load_average=os.getloadavg()[0])
                print(f"{engine:18s} perplexity {r.perplexity:8.4f}  ({Path(text).name}: {r.tokens} tokens, "
                      f"{r.windows} windows, {results[text][engine]['seconds']:.0f} s, load "
                      f"{results[text][engine]['load_average']:.2f})", flush=True)
        except Exception as e:  # a failing engine is reported, the others go on
            for r in results.values():
                r.setdefault(engine, {"error": f"{type(e).__name__}: {e}"})
            print(f"{engine:18s} FAILED: {type(e).__name__}: {e}", flush=True)
    for text, by_engine in results.items():
        if base := by_engine[engines[0]].get("perplexity"):
            print(f"{Path(text).name} (relative to {engines[0]}): " + ", ".join(
                f"{e} {r['perplexity'] / base - 1:+.2%}" for e, r in by_engine.items() if "perplexity" in r))
    print(f"load average {os.getloadavg()[0]:.2f} at the end", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"texts": {t: len(ids) for t, ids in texts.items()}, "context": args.context,
                                         "stride": args.stride, "threads": args.threads, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
