"""paged_attention on the CPU: the kernel alone, timed on decode and prefill steps.

Compiles the CPU paged_attention kernel of this checkout for this host (default: SmolLM2-135M's
shape, 9 query heads, 3 kv heads, head_dim 64, blocks of 16 tokens) and prints the median time of
a step per case: one prompt prefilled whole, a chunk over a cached context, and decode steps of 1
to 16 sequences at several context lengths (1 sequence splits its keys over the threads: split-K).
To compare two builds, run it in each checkout, alternating (this machine's load drifts).

    python benchmarks/cpu_attention.py [--threads 2] [--kv-dtype float32|bfloat16|float16]
        [--heads 9 --kv-heads 3 --head-dim 64 --block-size 16] [--sliding-window 0]
        [--variant native|x86-64-v3|...] [--case NAME ...] [--repeats 7]

--variant compiles for another CPU level this host runs (x86-64-v3: AVX2); --case picks cases by
name (repeatable; default all).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llvmlite import ir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_batch  # noqa: E402  (the tests' paged KV pool)

from llmirc import dtypes  # noqa: E402
from llmirc.targets.cpu import kernels, toolchain  # noqa: E402
from llmirc.targets.cpu.target import compile_module  # noqa: E402

# (cached tokens, new tokens) of each sequence of a step
CASES = {
    "prefill 2048": [(0, 2048)],
    "chunk 512 @ 1536": [(1536, 512)],
    "decode 1 @ 200": [(200, 1)],
    "decode 1 @ 2048": [(2048, 1)],
    "decode 1 @ 8192": [(8192, 1)],
    "decode 1 @ 32767": [(32767, 1)],
    "decode 4 @ 1024": [(1024, 1)] * 4,
    "decode 16 @ 1024": [(1024, 1)] * 16,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sliding-window", type=int, default=0, help="keys a token sees (0: all)")
    ap.add_argument("--variant", default="native", help="a CPU variant, as `llmirc compile --cpu-variants` names them")
    ap.add_argument("--case", action="append", choices=list(CASES), help="default: every case")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    H, G, hd, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    variant = toolchain.variants_for([args.variant])[0]
    module = ir.Module()
    kernels.emit_kernel(module, "paged_attention", "attn", dict(
        num_heads=H, num_kv_heads=G, head_dim=hd, block_size=bs, scale=1 / math.sqrt(hd), sliding_window=args.sliding_window,
        kv_dtype=args.kv_dtype), variant)
    with tempfile.TemporaryDirectory() as tmp:
        toolchain.link_shared([compile_module(module, variant)], Path(tmp) / "attn.so")
        lib = ctypes.CDLL(str(Path(tmp) / "attn.so"))
    lib.llmir_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"paged_attention, {H} heads, {G} kv heads, head_dim {hd}, blocks of {bs}, {args.kv_dtype} pool, "
          f"{args.threads} threads, {variant.name}"
          + (f", sliding window {args.sliding_window}" if args.sliding_window else ""))
    for name in args.case or CASES:
        seqs = CASES[name]
        pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 1, G, hd)
        pool = dtypes.from_float32(pool, args.kv_dtype)
        T = len(positions)
        q = rng.standard_normal((T, H * hd)).astype(np.float32)
        out = np.empty_like(q)
        call = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else ctypes.c_int64(a) for a in
                (out, H * hd, q, H * hd, pool, nb, 0, bt, mb, lens, qsl, len(seqs), positions, T)]
        t0 = time.perf_counter()
        lib.attn(*call)
        n = max(3, int(0.2 / max(time.perf_counter() - t0, 1e-6)))  # about 0.2 s a repeat
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                lib.attn(*call)
            times.append((time.perf_counter() - t0) / n)
        print(f"  {name:18s} {statistics.median(times) * 1e6:10.1f} us")


if __name__ == "__main__":
    main()
