"""The contention benchmark of issue 7: llmirc with its default thread count beside a busy process,
against the same bundle with 1 thread on the idle machine.

    python benchmarks/contention.py --model small|medium|smollm2|CHECKPOINT [--repeat 3] [--busy 1]

Compiles the checkpoint (the benchmark ones come from benchmarks/models.py), then runs, after a
warm-up round (discarded), --repeat rounds of four runs, each in its own process
(benchmarks/peers.py: prefill of --prefill-tokens tokens, batch-1 greedy decode of --new-tokens
after --prompt-tokens): 1 thread idle, default threads idle, 1 thread beside --busy busy
processes, default threads beside them. A busy process is `python -c "while True: pass"`,
started before the run and killed after it. The table gives medians and each figure over the
idle 1-thread one; the goal is >= 0.8x for the default threads under contention, decode and
prefill. The machine must otherwise be idle: the load average is printed at the start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import peers  # noqa: E402
from compare import load_average  # noqa: E402

CONDITIONS = (("idle", 1), ("idle", None), ("busy", 1), ("busy", None))  # (machine, threads; None: default)


def run_beside_busy(busy: int, run):
    """run() while `busy` busy-loop processes hold CPUs; they are killed when it returns."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5)  # let them start spinning
        return run()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=f"{'|'.join(models.NAMES)} or a checkpoint folder")
    parser.add_argument("--engine", default="llmirc", help="llmirc[:VARIANT] (peers.LLMIRC_VARIANTS)")
    parser.add_argument("--work", type=Path, help="folder for the bundle")
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes beside llmirc")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    args = parser.parse_args()
    if min(args.busy, args.prompt_tokens, args.prefill_tokens, args.repeat) < 1 or args.new_tokens < 2:
        parser.error("--busy, --prompt-tokens, --prefill-tokens, --repeat must be >= 1, --new-tokens >= 2")
    if args.engine.split(":")[0] != "llmirc":
        parser.error("--engine: llmirc[:VARIANT]")
    load_start = load_average()
    try:
        checkpoint, work = models.resolve(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    prepared = peers.prepare(args.engine, checkpoint, args.work or work)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_tokens)]
    prefill = [(11 * i + 5) % vocab for i in range(args.prefill_tokens)]

    results: dict[tuple, list[peers.Result]] = {c: [] for c in CONDITIONS}
    for n in range(args.warmup + args.repeat):
        print(f"round {n + 1} of {args.warmup + args.repeat}{' (warm-up)' if n < args.warmup else ''}",
              file=sys.stderr, flush=True)
        for machine, threads in CONDITIONS:
            def run():
                return peers.run_engine("llmirc", prepared.model, prompt, args.new_tokens, prefill, threads)

            r = run_beside_busy(args.busy, run) if machine == "busy" else run()
            if not r.ok:
                sys.exit(f"{machine}, {threads or 'default'} threads: {r.error}")
            if n >= args.warmup:
                results[machine, threads].append(r)

    base = {k: statistics.median(getattr(r, k) for r in results["idle", 1])
            for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
    print(f"{args.engine} on {args.model}: prompt {len(prompt)}, {args.new_tokens} new tokens, prefill "
          f"{len(prefill)}; median of {args.repeat} after {args.warmup} warm-up round(s); {args.busy} busy "
          f"process(es) when busy; load average {load_start:.2f} at the start, {load_average():.2f} at the end")
    if load_start > 0.5:
        print("WARNING: the machine was busy before the benchmark; these figures are not comparable")
    print(f"{'machine':8s} {'threads':>12s} {'decode tok/s':>12s} {'x idle 1t':>9s} {'prefill tok/s':>13s} "
          f"{'x idle 1t':>9s}")
    ratios = {}
    for (machine, threads), rs in results.items():
        decode = statistics.median(r.decode_tokens_per_s for r in rs)
        prefill_rate = statistics.median(r.prefill_tokens_per_s for r in rs)
        ratios[machine, threads] = decode / base["decode_tokens_per_s"], prefill_rate / base["prefill_tokens_per_s"]
        print(f"{machine:8s} {threads or f'{rs[0].threads} (default)':>12} {decode:12.1f} "
              f"{ratios[machine, threads][0]:9.2f} {prefill_rate:13.1f} {ratios[machine, threads][1]:9.2f}")
    decode_ratio, prefill_ratio = ratios["busy", None]
    print(f"goal: default threads beside {args.busy} busy process(es) >= 0.8x 1 thread idle: decode "
          f"{decode_ratio:.2f}x, prefill {prefill_ratio:.2f}x")


if __name__ == "__main__":
    main()
