"""qlinear (quantized linear) on the CPU: AMX-INT8 tiles against the vector (VNNI) path.

Compiles the qlinear kernel for each shape and scheme twice for this host, once as is and once
with AMX-INT8 turned off in the variant's features (the vector path), and prints the median time
of each over token counts (the two alternating, so that drift in the machine's load hits both) as
GMAC/s (n * k multiply-adds per token), with the ratio. Below AMX_MIN_TOKENS (32) both run the
vector path, so those rows show the measurement's own noise.
Both paths compute the same integer sums (targets/cpu/quant_kernels.py); the check column is the
largest difference of their outputs relative to the output's scale.

    python benchmarks/qlinear.py [--threads 2] [--tokens 16,32,64,128,512] [--repeats 15]
        [--shapes 960x576,576x576,3072x576,576x1536] [--schemes int8,int4]

A scheme with groups must divide each shape's k (int4-g128-zp: --shapes 1024x512,512x1024).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llvmlite import ir

from llmirc import dtypes, quant
from llmirc.quant import Scheme
from llmirc.targets.cpu import quant_kernels as QK
from llmirc.targets.cpu import toolchain as tc
from llmirc.targets.cpu.target import compile_module
from llmirc.targets.signatures import qlinear_scratch_bytes, signature

SCHEMES = {"int8": lambda k: Scheme(8, k, "float32"), "int8-g32": lambda k: Scheme(8, 32, "float16"),
           "int4": lambda k: Scheme(4, 32, "float16"), "int4-g128-zp": lambda k: Scheme(4, 128, "float16", "int")}


def build(variant, specs, path):
    module = ir.Module(name="qlinear_bench")
    module.triple = variant.triple
    for sym, params in specs:
        QK.emit_quant_kernel(module, "qlinear", sym, params, variant)
    tc.link_shared([compile_module(module, variant)], path)
    lib = ctypes.CDLL(str(path))
    for sym, _ in specs:
        f = getattr(lib, sym)
        f.restype = None
        f.argtypes = [ctypes.c_void_p if a.type == "ptr" else ctypes.c_int64 for a in signature("qlinear").params]
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="16,32,64,128,512")
    ap.add_argument("--shapes", default="960x576,576x576,3072x576,576x1536", help="n x k, comma-separated")
    ap.add_argument("--schemes", default="int8,int4", help=",".join(SCHEMES))
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 for shape in shapes):
        ap.error("--shapes: NxK pairs, --tokens: integers, comma-separated")
    if min(a.threads, a.repeats, *tokens, *(v for shape in shapes for v in shape)) < 1:
        ap.error("--threads, --repeats, --tokens and the sizes of --shapes must be >= 1")
    for name in a.schemes.split(","):
        if name not in SCHEMES:
            ap.error(f"--schemes: unknown {name!r} (known: {', '.join(SCHEMES)})")
        for n, k in shapes:
            if (why := SCHEMES[name](k).check(k)) is not None:
                ap.error(f"--schemes {name} on {n}x{k}: {why}")
    host = tc.host_variant()
    if not host.has("amx-int8"):
        print("this host has no AMX-INT8: nothing to compare", file=sys.stderr)
        return 1
    vector = dataclasses.replace(host, name="native-noamx", features=host.features.replace("+amx-int8", "-amx-int8"))
    rng = np.random.default_rng(0)
    cases, specs = [], []
    for name in a.schemes.split(","):
        for n, k in shapes:
            s = SCHEMES[name](k)
            sym = f"q_{name.replace('-', '_')}_{n}_{k}"
            specs.append((sym, dict(n=n, k=k, bits=s.bits, group_size=s.group_size, scale_dtype=s.scale_dtype,
                                    zero=s.zero, zero_dtype=s.zero_dtype, act_order=False)))
            w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
            cases.append((name, n, k, sym, s, quant.quantize(w, s)))
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"amx": build(host, specs, Path(tmp) / "amx.so"), "vector": build(vector, specs, Path(tmp) / "vec.so")}
        for lib in libs.values():
            lib.llmir_set_num_threads(a.threads)
        print(f"{'scheme':<13}{'n x k':>11}{'T':>6}{'vector GMAC/s':>15}{'AMX GMAC/s':>12}{'AMX/vector':>12}{'max diff':>10}")
        for name, n, k, sym, s, parts in cases:
            for T in tokens:
                x = rng.standard_normal((T, k)).astype(np.float32)
                xq = np.zeros(T * qlinear_scratch_bytes(k, s.sub_group), np.int8)
                calls, outs = {}, {}
                for path, lib in libs.items():
                    outs[path] = np.zeros((T, n), np.float32)
                    # (no super_scales, super_mins, perm, bias, residual)
                    args = [outs[path].ctypes.data, n, x.ctypes.data, k, parts["codes"].ctypes.data,
                            parts["scales"].ctypes.data, parts["zeros"].ctypes.data if "zeros" in parts else None,
                            None, None, None, None, None, 0, xq.ctypes.data, T]
                    calls[path] = (getattr(lib, sym), args)
                    calls[path][0](*args)  # warm-up
                times = {path: [] for path in calls}
                for _ in range(a.repeats):  # the two paths alternate, so drift in the machine's load hits both
                    for path, (f, args) in calls.items():
                        t0 = time.perf_counter()
                        f(*args)
                        times[path].append(time.perf_counter() - t0)
                rates = {path: T * n * k / statistics.median(ts) / 1e9 for path, ts in times.items()}
                diff = np.abs(outs["amx"] - outs["vector"]).max() / (np.abs(outs["vector"]).max() + 1e-30)
                print(f"{name:<13}{f'{n}x{k}':>11}{T:>6}{rates['vector']:>15.1f}{rates['amx']:>12.1f}"
                      f"{rates['amx'] / rates['vector']:>11.2f}x{diff:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
