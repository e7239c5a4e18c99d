"""The CPU target: plan -> LLVM IR (llvmlite) -> object -> shared library, per CPU variant.

Stages, in order, each kept on request (`--keep-intermediates`): `llvm-ir`, `asm`, `obj`, `so`.
A bundle carries a library for the host CPU (`native`) and one for a portable baseline, so it
still loads on an older CPU of the same architecture.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

from llvmlite import ir

from llmirc.errors import stage
from llmirc.targets.plan import Plan

from .forward import ABI_VERSION, emit_forward
from .generic import emit_generic
from .kernels import emit_kernel
from .toolchain import CpuVariant, compile_object, emit_assembly, link_shared, variants_for

LIBRARY = "libllmir_model.so"


def llvm_module(plan: Plan, variant: CpuVariant) -> ir.Module:
    module = ir.Module(name="llmir_model")
    module.triple = variant.triple
    kernels = {symbol: emit_generic(module, call.kind, symbol, call.params) if call.kind.startswith("g_")
               else emit_kernel(module, call.kind, symbol, call.params, variant)
               for symbol, call in plan.kernels().items()}
    emit_forward(module, plan, kernels)
    return module


def target_name(variant: CpuVariant) -> str:
    """cpu-x86_64-native, cpu-x86_64-v2, cpu-aarch64-generic, ..."""
    return f"cpu-{platform.machine()}-{variant.name.removeprefix('x86-64-')}"


def build(plan: Plan, out_dir: Callable[[str], Path], variant_names: list[str], *,
          keep_intermediates: bool = False, progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Compiles the plan for each variant into `kernels/<target>/`; returns manifest entries.

    `out_dir(rel)` gives a writable path inside the bundle being written."""
    entries = []
    for variant in variants_for(variant_names):
        name = target_name(variant)
        progress(f"cpu codegen for {name} ({variant.cpu}, {variant.vector_width} f32 lanes)")
        library = f"kernels/{name}/{LIBRARY}"
        with stage(f"cpu codegen for {name}"):
            llvm_ir = str(llvm_module(plan, variant))
            obj = compile_object(llvm_ir, variant)
            link_shared([obj], out_dir(library))
        if keep_intermediates:
            out_dir(f"kernels/{name}/model.ll").write_text(llvm_ir)
            out_dir(f"kernels/{name}/model.s").write_text(emit_assembly(llvm_ir, variant))
            out_dir(f"kernels/{name}/model.o").write_bytes(obj)
        entries.append({
            "name": name, "kind": "cpu", "arch": platform.machine(), "cpu": variant.cpu,
            "features": list(variant.required_flags), "vector_width": variant.vector_width,
            "library": library, "abi_version": ABI_VERSION,
            "kernels": [{"symbol": s, "kind": c.kind, "params": c.params} for s, c in plan.kernels().items()],
        })
    return entries


def emit_text(plan: Plan, emit: str, variant_name: str = "native") -> str:
    """The text of one stage (`llvm-ir` or `asm`) for `--emit`."""
    variant = variants_for([variant_name])[0]
    with stage(f"cpu codegen for {target_name(variant)}"):
        llvm_ir = str(llvm_module(plan, variant))
        return llvm_ir if emit == "llvm-ir" else emit_assembly(llvm_ir, variant)
