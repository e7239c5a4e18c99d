"""The CPU backend: plan -> LLVM IR (llvmlite) -> object -> shared library, per CPU variant.

Stages, in order, each kept on request (`--keep-intermediates`): `llvm-ir`, `asm`, `obj`, `so`.
A bundle carries a library for the host CPU (`native`) and one for a portable baseline, so it
still loads on an older CPU of the same architecture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from llvmlite import ir

from llmirc.errors import LlmircError, stage as internal_stage
from llmirc.targets.plan import Plan

from . import amx
from .forward import ABI_VERSION, emit_forward
from .generic import emit_generic
from .kernels import emit_kernel
from .toolchain import CpuVariant, compile_object, emit_assembly, find_linker, link_shared, variants_for

LIBRARY = "libllmir_model.so"


def library_name(data: bytes) -> str:
    """`libllmir_model-<first 16 hex digits of the sha256 of data>.so`.

    A process maps a shared library once per path: dlopen of a path it has loaded before returns
    the library already in memory, even when the file there was replaced since (a bundle
    recompiled to the same path and loaded again). Naming the file by its content makes a
    different library a different path."""
    return f"{LIBRARY.removesuffix('.so')}-{hashlib.sha256(data).hexdigest()[:16]}.so"


def llvm_module(plan: Plan, variant: CpuVariant) -> ir.Module:
    module = ir.Module(name="llmir_model")
    module.triple = variant.triple
    kernels = {symbol: emit_generic(module, call.kind, symbol, call.params) if call.kind.startswith("g_")
               else emit_kernel(module, call.kind, symbol, call.params, variant)
               for symbol, call in plan.kernels().items()}
    emit_forward(module, plan, kernels)
    return module


def extra_modules(module: ir.Module, variant: CpuVariant) -> tuple[str, ...]:
    """LLVM IR texts the module's kernels call into (the AMX micro-kernels)."""
    return (amx.module_text(variant.triple, int8=amx.int8_used_by(module)),) if amx.used_by(module) else ()


def compile_module(module: ir.Module, variant: CpuVariant) -> bytes:
    """Object code of a module of kernels, with the LLVM IR texts they call linked in."""
    return compile_object(str(module), variant, extra=extra_modules(module, variant))


def target_name(variant: CpuVariant) -> str:
    """cpu-x86_64-native, cpu-x86_64-v2, cpu-aarch64-generic, ..."""
    return f"cpu-{variant.arch}-{variant.name.removeprefix('x86-64-').removeprefix('aarch64-')}"


class CpuBackend:
    kind = "cpu"
    stages = ("llvm-ir", "asm", "obj", "so")
    text_stages = ("llvm-ir", "asm")

    def __init__(self, options):
        self.variant_names = list(options.cpu_variants)
        self.keep_intermediates = options.keep_intermediates
        if not self.variant_names:  # a bundle without a library cannot run anywhere
            raise LlmircError("--cpu-variants: no CPU variant given (choose native and/or baseline)")
        variants = variants_for(self.variant_names)  # unknown variant names fail before the checkpoint is read
        if options.emit is None:  # so does a missing (cross) linker (--emit alone prints a stage: nothing is linked)
            for arch in dict.fromkeys(v.arch for v in variants):
                find_linker(arch)

    def check(self, plan: Plan) -> None:
        """Nothing to check against the plan: the variants and linkers were checked at construction."""

    def emit(self, plan: Plan, stage: str) -> str:
        """The text of `llvm-ir` or `asm` for the first variant (the host's by default)."""
        variant = variants_for(self.variant_names)[0]
        with internal_stage(f"cpu codegen for {target_name(variant)}"):
            module = llvm_module(plan, variant)
            extra = extra_modules(module, variant)
            return "\n".join([str(module), *extra]) if stage == "llvm-ir" else emit_assembly(str(module), variant,
                                                                                             extra=extra)

    def build(self, plan: Plan, path: Callable[[str], Path], progress: Callable[[str], None]) -> list[dict]:
        """Compiles the plan for each variant into `kernels/<target>/`; returns manifest entries.

        `path(rel)` gives a writable path inside the bundle being written."""
        entries = []
        for variant in variants_for(self.variant_names):
            name = target_name(variant)
            progress(f"cpu codegen for {name} ({variant.cpu}, {variant.vector_width} f32 lanes)")
            with internal_stage(f"cpu codegen for {name}"):
                module = llvm_module(plan, variant)
                llvm_ir, extra = str(module), extra_modules(module, variant)
                obj = compile_object(llvm_ir, variant, extra=extra)
                linked = link_shared([obj], path(f"kernels/{name}/{LIBRARY}"), variant.arch)
                library = f"kernels/{name}/{library_name(linked.read_bytes())}"
                linked.rename(path(library))
            if self.keep_intermediates:
                path(f"kernels/{name}/model.ll").write_text("\n".join([llvm_ir, *extra]))
                path(f"kernels/{name}/model.s").write_text(emit_assembly(llvm_ir, variant, extra=extra))
                path(f"kernels/{name}/model.o").write_bytes(obj)
            entries.append({
                "name": name, "kind": "cpu", "arch": variant.arch, "cpu": variant.cpu,
                "features": list(variant.required_flags), "vector_width": variant.vector_width,
                "library": library, "abi_version": ABI_VERSION, "entry": "llmir_forward",
                "kernels": [{"symbol": s, "kind": c.kind, "params": c.params} for s, c in plan.kernels().items()],
            })
        return entries
