"""Programmatic dependent launch (PDL; sm_90 and newer, CompileOptions.gpu_pdl): a kernel starts
while the one before it in the stream still runs, and streams its weights into L2 meanwhile.

CUDA runs a stream's kernels one after another: a linear's programs start only once the norm,
activation or attention kernel before it has finished, and its weight stream, what a decode step
is bound by, starts from cold each time. With PDL (CUDA programming guide, "Programmatic
Dependent Launch and Synchronization"; PTX `griddepcontrol`):

    trigger   a kernel that may precede a linear lets the next launch start as soon as all its
              own programs have started (`griddepcontrol.launch_dependents`, first thing);
    wait      a kernel launched with the PDL attribute (its compiled metadata's `launch_pdl`,
              which the loader passes to cuLaunchKernelEx) prefetches the first PREFETCH columns
              of its weight rows into L2, then waits (`griddepcontrol.wait`) until the kernel
              before it has completed and its writes are visible, before it reads or writes
              anything else.

A kernel without the trigger lets its dependents start when it completes, and one launched
without the attribute is ordered as usual, so any mix is correct; only the waiting kernel must
touch nothing before its wait but read-only weights. The constexpr `PDL` of a kernel is "" (off),
"trigger" or "wait" (KernelSpec.launch_pdl: launched with the attribute).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LINE = tl.constexpr(128)  # bytes per L2 prefetch (a cache line)


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """First thing in a kernel that may precede a waiting one (PDL "trigger" or "wait")."""
    if PDL != "":
        gdc_launch_dependents()


@triton.jit
def pdl_wait(w, rows, ld: tl.constexpr, n_rows: tl.constexpr, k0, n_cols: tl.constexpr, prefetch,
             PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """PDL "wait": when `prefetch` (a program's choice: one of the programs reading the same rows),
    prefetch w[rows, k0:k0 + PREFETCH] into L2 (rows clamped to n_rows, columns to n_cols: no
    address past the matrix); then wait for the kernel before. `rows` [R] int32; ld, n_cols,
    PREFETCH in elements of w."""
    if PDL == "wait":
        if PREFETCH > 0 and prefetch:
            step: tl.constexpr = LINE * 8 // w.dtype.element_ty.primitive_bitwidth  # elements per line
            cols = tl.minimum(k0 + tl.arange(0, PREFETCH // step) * step, n_cols - 1)
            lines = w + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * ld + cols[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines],
                                      dtype=tl.int32, is_pure=False, pack=1)
        gdc_wait()


def pdl_mode(arch) -> str:
    """The constexpr PDL of a kernel that may precede a linear: "trigger" when the compile uses
    PDL on `arch` (Arch.pdl), else ""."""
    return "trigger" if arch.pdl else ""
