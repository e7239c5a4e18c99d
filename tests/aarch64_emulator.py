"""AArch64 kernels run on an x86-64 host under qemu-user, for the kernel tests.

`build(module, variant, path)` compiles an llvmlite module of kernels for an aarch64 variant,
links it with the thread pool (runtime.c) and a small C driver into a static executable
(aarch64-linux-gnu-gcc), and returns an `Emulated` library: `lib.symbol(*args)` writes the
arguments (integers, None, NumPy arrays) to a file, runs the executable under qemu-aarch64
(`-cpu max`: it has the dot product extension, FEAT_DotProd) and copies every array back from
the file the driver writes, so a test reads results in place as it does with ctypes. An array
passed twice (an in-place kernel) is one buffer there too.

The tools come from Debian's `qemu-user` and `gcc-aarch64-linux-gnu` (tests skip without them;
`missing()` says which).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from llmirc.targets.cpu import toolchain as tc

QEMU, CC = "qemu-aarch64", "aarch64-linux-gnu-gcc"
MAX_ARGS = 16

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*kernel)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
%(externs)s
static void *const table[] = {%(table)s};

static int64_t word(FILE *f) {
    int64_t v;
    if (fread(&v, 8, 1, f) != 1) exit(3);
    return v;
}

/* request: symbol index, argument count, then per argument a kind and a value:
   0 integer (value), 1 buffer (byte count, then the bytes), 2 NULL, 3 an earlier argument's buffer.
   reply: the bytes of every buffer (kind 1), in argument order. */
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *in = fopen(argv[1], "rb");
    if (!in) return 2;
    int64_t sym = word(in), n = word(in), a[%(max)d] = {0}, kind[%(max)d], size[%(max)d];
    if (sym < 0 || sym >= (int64_t)(sizeof table / sizeof table[0]) || n < 0 || n > %(max)d) return 2;
    for (int64_t i = 0; i < n; i++) {
        kind[i] = word(in);
        int64_t v = word(in);
        if (kind[i] == 1) {
            size[i] = v;
            void *p = aligned_alloc(64, (v + 63) / 64 * 64 + 64);
            if (!p || fread(p, 1, v, in) != (size_t)v) return 3;
            a[i] = (int64_t)p;
        } else if (kind[i] == 3) {
            a[i] = a[v];
        } else {
            a[i] = kind[i] == 0 ? v : 0;
        }
    }
    fclose(in);
    ((kernel)table[sym])(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
                         a[13], a[14], a[15]);
    FILE *out = fopen(argv[2], "wb");
    if (!out) return 2;
    for (int64_t i = 0; i < n; i++)
        if (kind[i] == 1 && fwrite((void *)a[i], 1, size[i], out) != (size_t)size[i]) return 3;
    return fclose(out) != 0;
}
"""


def missing() -> str | None:
    """Why AArch64 code cannot run here (None: it can)."""
    absent = [tool for tool in (QEMU, CC) if shutil.which(tool) is None]
    return f"no {' or '.join(absent)} (Debian: qemu-user, gcc-aarch64-linux-gnu)" if absent else None


class Emulated:
    def __init__(self, exe: Path, symbols: list[str]):
        self.exe, self.symbols = exe, symbols

    def __getattr__(self, sym: str):
        if sym not in self.symbols:
            raise AttributeError(sym)
        return lambda *args: self.call(sym, args)

    def call(self, sym: str, args) -> None:
        assert len(args) <= MAX_ARGS, sym
        request, reply = self.exe.with_suffix(".in"), self.exe.with_suffix(".out")
        buffers = []  # (argument index, array) of kind 1
        parts = [struct.pack("<qq", self.symbols.index(sym), len(args))]
        for i, arg in enumerate(args):
            if arg is None:
                parts.append(struct.pack("<qq", 2, 0))
            elif isinstance(arg, np.ndarray):
                assert arg.flags.c_contiguous, f"{sym}: argument {i} is not contiguous"
                same = [j for j, b in buffers if b.ctypes.data == arg.ctypes.data and b.nbytes == arg.nbytes]
                if same:
                    parts.append(struct.pack("<qq", 3, same[0]))
                    continue
                parts.append(struct.pack("<qq", 1, arg.nbytes) + arg.tobytes())
                buffers.append((i, arg))
            else:
                parts.append(struct.pack("<qq", 0, int(arg)))
        request.write_bytes(b"".join(parts))
        run = subprocess.run([QEMU, "-cpu", "max", str(self.exe), str(request), str(reply)], capture_output=True,
                             timeout=600, check=False)
        assert run.returncode == 0, f"{sym} under {QEMU}: exit {run.returncode} {run.stderr.decode()[-500:]}"
        data, at = reply.read_bytes(), 0
        for _, arr in buffers:
            arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, arr.nbytes, at)
            at += arr.nbytes
        assert at == len(data), f"{sym}: the reply has {len(data)} bytes, expected {at}"


def build(module, variant: tc.CpuVariant, path: Path, symbols: list[str]) -> Emulated:
    """The kernels `symbols` of llvmlite `module`, compiled for `variant`, as an Emulated library
    at `path` (the executable; its request and reply files go next to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj, driver = path.with_suffix(".o"), path.with_suffix(".c")
    obj.write_bytes(tc.compile_object(str(module), variant))
    driver.write_text(DRIVER % {"max": MAX_ARGS, "externs": "\n".join(f"extern void {s}(void);" for s in symbols),
                                    "table": ", ".join(f"(void *){s}" for s in symbols)})
    subprocess.run([CC, "-static", "-O2", "-std=c11", "-pthread", "-o", str(path), str(driver), str(obj),
                    str(tc.RUNTIME_C), "-lm"], check=True, capture_output=True)
    return Emulated(path, symbols)
