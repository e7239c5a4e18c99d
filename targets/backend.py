"""Targets as backends of one shape (Triton's backends are the model): options, an ordered list of
named stages, and a build that writes each stage's output into the bundle.

A backend takes the target-independent plan (targets/plan.py) and:

* `stages`: its stage names in order (cpu: llvm-ir, asm, obj, so; cuda: ttir, ttgir, llir, ptx,
  cubin; hip: ..., amdgcn, hsaco); `--keep-intermediates` stores all of them in the bundle;
* `text_stages`: those `--emit STAGE` prints (`emit`): all but the binaries (cpu: llvm-ir, asm);
* `check(plan)`: refuses, with a one-line LlmircError, a plan it cannot compile;
* `build(plan, bundle, progress)`: writes its binaries under `kernels/<target name>/` of `bundle`
  (artifact_format's BundleWriter: `write_bytes`, or `path(rel)` for tools that write files) and returns the
  manifest entries of the targets it built (one per CPU variant or GPU architecture), each with a
  `kind` the loader picks an executor by, and its launch metadata. `progress` is the compile's
  driver.Progress: called with a progress line; `progress.note(...)` for what the user should know.

The driver names no target: it asks `backend(kind, options)` for each requested one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from llmirc.errors import UsageError

from .plan import Plan

if TYPE_CHECKING:
    from llmirc.artifact_format.writer import BundleWriter

# kind -> "module:class", imported on demand (a CPU-only compile never imports Triton)
BACKENDS = {
    "cpu": "llmirc.targets.cpu.target:CpuBackend",
    "cuda": "llmirc.targets.triton.target:CudaBackend",
    "hip": "llmirc.targets.triton.target:HipBackend",
}
KNOWN = tuple(BACKENDS)


class Backend(Protocol):
    kind: str
    stages: tuple[str, ...]
    text_stages: tuple[str, ...]

    def check(self, plan: Plan) -> None: ...

    def emit(self, plan: Plan, stage: str) -> str: ...

    def build(self, plan: Plan, bundle: BundleWriter, progress) -> list[dict]: ...


def backend(kind: str, options) -> Backend:
    """The backend for target `kind`, configured from the compile options."""
    if kind not in KNOWN:
        raise UsageError(f"unknown target {kind!r} (choose from {', '.join(KNOWN)})")
    module, cls = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(options)
