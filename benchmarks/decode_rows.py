"""The float linear kernel at decode: one row of the weight at a time against rows side by side.

Compiles the `linear` kernel for this host twice, once with its decode blocking (rows side by side
where kernels._decode_rows says so) and once one row at a time (the blocking before 2026-12-05),
and times both on T tokens, alternating, over weights larger than the last-level cache (copies
cycled, so every call reads from DRAM; `--cached`: one copy, as hot as the cache keeps it). Prints
GB/s of weight bytes per call (best of `--repeats`), NumPy's matrix-vector product on the same
copies for scale (float32 copies of half-precision weights), and whether both kernels gave the same bits (they must: each row and token is
the same FMA chain either way).

    python benchmarks/decode_rows.py [--threads 2] [--tokens 1] [--dtype float32|bfloat16|float16]
        [--shapes 2752x512,512x1376,8192x2048,2048x5632] [--repeats 7] [--cached]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from llvmlite import ir

from llmirc.targets.cpu import kernels as K
from llmirc.targets.cpu import toolchain as tc
from llmirc.targets.cpu.target import compile_module
from llmirc.targets.signatures import signature

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DRAM_BYTES = 320 << 20  # weights cycled per round: ten times a 32 MB L3


def build(host, shapes, dtype, decode_rows, path):
    module = ir.Module(name="decode_rows")
    module.triple = host.triple
    saved, K._decode_rows = K._decode_rows, decode_rows
    try:
        for n, k in shapes:
            K.emit_kernel(module, "linear", f"lin_{n}_{k}", dict(n=n, k=k, w_dtype=dtype), host)
    finally:
        K._decode_rows = saved
    tc.link_shared([compile_module(module, host)], path)
    return ctypes.CDLL(str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--shapes", default="2752x512,512x1376,8192x2048,2048x5632", help="n x k, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cached", action="store_true", help="one copy of each weight (no DRAM traffic once warm)")
    a = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes) or min(a.threads, a.tokens, a.repeats) < 1:
        ap.error("--shapes: NxK pairs of positive integers; --threads, --tokens, --repeats >= 1")
    host = tc.host_variant()
    params = [p.name for p in signature("linear").params]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"one row": build(host, shapes, a.dtype, lambda vw, row_bytes: None, Path(tmp) / "one.so"),
                "side by side": build(host, shapes, a.dtype, K._decode_rows, Path(tmp) / "side.so")}
        for lib in libs.values():
            lib.llmir_set_num_threads(a.threads)
        print(f"{host.cpu}, {a.threads} threads, {a.tokens} tokens, {a.dtype} weights, "
              f"{'cached' if a.cached else 'from DRAM'}; GB/s of weight bytes")
        print(f"{'n x k':>11}{'rows side by side':>19}{'one row':>9}{'side by side':>14}{'numpy':>8}  same bits")
        for n, k in shapes:
            w_bytes = n * k * np.dtype(DTYPES[a.dtype]).itemsize
            copies = 1 if a.cached else max(1, min(64, DRAM_BYTES // w_bytes))
            ws = [rng.standard_normal((n, k)).astype(np.float32).astype(DTYPES[a.dtype]) for _ in range(copies)]
            x = rng.standard_normal((a.tokens, k)).astype(np.float32)
            outs = {name: np.zeros((a.tokens, n), np.float32) for name in libs}
            calls = {}
            for name, lib in libs.items():
                f = getattr(lib, f"lin_{n}_{k}")
                f.restype = None
                f.argtypes = [ctypes.c_void_p if p.type == "ptr" else ctypes.c_int64 for p in signature("linear").params]
                calls[name] = (f, [dict(out=outs[name].ctypes.data, ld_out=n, x=x.ctypes.data, ld_x=k,
                                        w=w.ctypes.data, bias=None, residual=None, ld_res=0, T=a.tokens)
                                   for w in ws])
            best = {name: float("inf") for name in [*libs, "numpy"]}
            inner = 1 if not a.cached else max(1, (64 << 20) // w_bytes)
            wf = [w.astype(np.float32) for w in ws] if a.dtype != "float32" else ws
            for _ in range(a.repeats):  # the kernels alternate, so drift in the machine's load hits both
                for name, (f, arg_sets) in calls.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        for args in arg_sets:
                            f(*[args[p] for p in params])
                    best[name] = min(best[name], (time.perf_counter() - t0) / (inner * len(arg_sets)))
                t0 = time.perf_counter()
                for w in wf:
                    w @ x.T
                best["numpy"] = min(best["numpy"], (time.perf_counter() - t0) / len(wf))
            same = np.array_equal(outs["one row"], outs["side by side"])
            rows = K._decode_rows(host.vector_width, k * np.dtype(DTYPES[a.dtype]).itemsize)
            side = rows[min(a.tokens, 4) - 1] if rows else 1
            rates = [w_bytes / best[name] / 1e9 for name in libs] + [wf[0].nbytes / best["numpy"] / 1e9]
            print(f"{f'{n}x{k}':>11}{side:>19}{rates[0]:>9.1f}{rates[1]:>14.1f}{rates[2]:>8.1f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
