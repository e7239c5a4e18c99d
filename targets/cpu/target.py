"""The CPU backend: plan -> LLVM IR (llvmlite) -> objects -> shared library, per CPU variant.

Stages, in order, each kept on request (`--keep-intermediates`): `llvm-ir`, `asm`, `obj`, `so`.
Each plan kernel is a module of its own, and so are `llmir_forward` and the AMX micro-kernels:
one object each, compiled through the object cache (toolchain.cached_objects), in parallel. A
kernel's text comes from the IR cache where it holds it (kernel_text).
A bundle carries a library for the host CPU (`native`) and one for a portable baseline, so it
still loads on an older CPU of the same architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from llvmlite import ir

from llmirc.artifact_format.writer import BundleWriter
from llmirc.cache import NO_HOME, cache_dir
from llmirc.dtypes import FP8_E4M3, kv_cache_dtype_name
from llmirc.errors import LlmircError, UsageError, stage as internal_stage
from llmirc.targets.plan import KernelCall, Plan
from llmirc.targets.signatures import signature
from llmirc.targets.workers import run_tasks, worker_pool

from . import amx
from .forward import ABI_VERSION, emit_forward
from .generic import emit_generic
from .kernels import emit_kernel, llvm_type
from .toolchain import (CpuVariant, cached_objects, compile_object, find_linker, ir_cache_entry, known_variant_names,
                        link_shared, linked_module, read_entry, variants_for, write_entry)

LIBRARY = "libllmir_model.so"


def library_name(data: bytes) -> str:
    """`libllmir_model-<first 16 hex digits of the sha256 of data>.so`.

    A process maps a shared library once per path: dlopen of a path it has loaded before returns
    the library already in memory, even when the file there was replaced since (a bundle
    recompiled to the same path and loaded again). Naming the file by its content makes a
    different library a different path."""
    return f"{LIBRARY.removesuffix('.so')}-{hashlib.sha256(data).hexdigest()[:16]}.so"


def kernel_module(symbol: str, call: KernelCall, variant: CpuVariant) -> ir.Module:
    """One plan kernel, specialized for its params, as external function `symbol` in a module of
    its own: the unit of compilation and of the object cache."""
    module = ir.Module(name=symbol)
    module.triple = variant.triple
    if call.kind.startswith("g_"):
        emit_generic(module, call.kind, symbol, call.params)
    else:
        emit_kernel(module, call.kind, symbol, call.params, variant)
    return module


def kernel_type(call: KernelCall) -> ir.FunctionType:
    """The LLVM type of a kernel's function: void(its signature's parameters)."""
    return ir.FunctionType(ir.VoidType(), [llvm_type(p.type) for p in signature(call.kind, call.params).params])


def kernel_text(symbol: str, call: KernelCall, variant: CpuVariant, cache: Path | None) -> str:
    """The LLVM IR text of kernel_module, from the IR cache where it holds it: emitting a kernel
    with llvmlite's Python builder and printing it takes most of a compile whose objects are cached
    (0.1-0.3 s a kernel). The cache's key is the symbol, kind, params, variant, llvmlite's version and
    the sha256 of llmirc's source files (which generate the text); an entry is compressed text."""
    entry = ir_cache_entry(cache, [symbol, call.kind, call.params, dataclasses.astuple(variant)])
    if (data := read_entry(entry)) is not None:
        with contextlib.suppress(zlib.error, UnicodeDecodeError):  # (else: a damaged entry, made again)
            return zlib.decompress(data).decode()
    module = kernel_module(symbol, call, variant)
    if module.get_global(symbol).function_type != kernel_type(call):  # (llmir_forward declares it so)
        raise AssertionError(f"{symbol}: the {call.kind} kernel's function type differs from its signature's")
    text = str(module)
    write_entry(entry, zlib.compress(text.encode(), 1))
    return text


def forward_module(plan: Plan, variant: CpuVariant, uses_amx: bool) -> ir.Module:
    """`llmir_forward` and the library's info functions, calling the plan's kernels (declared as
    external functions of kernel_type)."""
    module = ir.Module(name="llmir_model")
    module.triple = variant.triple
    declared = {symbol: ir.Function(module, kernel_type(call), symbol) for symbol, call in plan.kernels().items()}
    emit_forward(module, plan, declared, uses_amx=uses_amx)
    return module


def llvm_modules(plan: Plan, variant: CpuVariant, cache: Path | None = None) -> dict[str, str]:
    """The LLVM IR texts the library of `variant` is compiled from, by unit name: one per kernel
    symbol (through the IR cache `cache`, kernel_text), `llmir_forward`, and `llmir_amx` (the AMX
    micro-kernels, amx.module_text) when a kernel calls them."""
    texts = {symbol: kernel_text(symbol, call, variant, cache) for symbol, call in plan.kernels().items()}
    extra = extra_modules(texts.values(), variant)
    texts["llmir_forward"] = str(forward_module(plan, variant, uses_amx=bool(extra)))
    for text in extra:
        texts["llmir_amx"] = text
    return texts


def library_text(texts: dict[str, str], variant: CpuVariant, stage: str) -> str:
    """`llvm-ir` (as generated) or `asm` (as compiled: optimized in a worker, as objects are, so
    that an LLVM crash stops the compile with an error) of a library's units, linked into one
    module."""
    if stage == "llvm-ir":
        return str(linked_module(list(texts.values()), variant, optimized=False)[1])
    with worker_pool(1) as pool:
        return run_tasks(pool, {"asm": (_assembly, list(texts.values()), variant)},
                         name=lambda _: f"the assembly of {target_name(variant)}")["asm"]


def _assembly(texts: list[str], variant: CpuVariant) -> str:
    tm, module = linked_module(texts, variant, optimized=True)
    return tm.emit_assembly(module)


def extra_modules(texts: Iterable[str], variant: CpuVariant) -> tuple[str, ...]:
    """LLVM IR texts the modules of `texts` call into (the AMX micro-kernels, if any calls them)."""
    texts = list(texts)
    if not any(amx.used_by(t) for t in texts):
        return ()
    return (amx.module_text(variant.triple, int8=any(amx.int8_used_by(t) for t in texts)),)


def compile_module(module: ir.Module, variant: CpuVariant) -> bytes:
    """Object code of a module of kernels, with the LLVM IR texts they call linked in."""
    text = str(module)
    return compile_object(text, variant, extra=extra_modules([text], variant))


def target_name(variant: CpuVariant) -> str:
    """cpu-x86_64-native, cpu-x86_64-v2, cpu-aarch64-generic, ..."""
    return f"cpu-{variant.arch}-{variant.name.removeprefix('x86-64-').removeprefix('aarch64-')}"


_NO_FP8 = ("target cpu: no kernel for a float8_e4m3fn (fp8) KV cache (CPUs have no FP8 arithmetic); give "
           "--kv-cache-dtype int8, or compile fp8 for --target cuda --arch sm_90")


class CpuBackend:
    kind = "cpu"
    stages = ("llvm-ir", "asm", "obj", "so")
    text_stages = ("llvm-ir", "asm")

    def __init__(self, options):
        self.variant_names = list(options.cpu_variants)
        self.keep_intermediates = options.keep_intermediates
        self.cache, self.ir_cache, self.jobs = cache_dir("cpu"), cache_dir("cpu-ir"), options.jobs
        if not self.variant_names:  # a bundle without a library cannot run anywhere
            raise UsageError(f"--cpu-variants: no CPU variant given (choose from {', '.join(known_variant_names())})")
        if kv_cache_dtype_name(options.kv_cache_dtype) == FP8_E4M3.name:  # (given as the flag: before reading)
            raise UsageError(_NO_FP8)
        variants = variants_for(self.variant_names)  # unknown variant names fail before the checkpoint is read
        if options.emit is None:  # so does a missing (cross) linker, where a bundle is written (the driver
            # passes emit None with -o; --emit alone prints a stage: nothing is linked)
            for arch in dict.fromkeys(v.arch for v in variants):
                find_linker(arch)

    def check(self, plan: Plan) -> None:
        """The variants and linkers were checked at construction; an FP8 KV cache has no CPU kernels."""
        if plan.pool.dtype == FP8_E4M3.name:  # (a kv-cache-dtype pass in --passes)
            raise UsageError(_NO_FP8)

    def emit(self, plan: Plan, stage: str) -> str:
        """The text of `llvm-ir` or `asm` for the first variant (the host's by default)."""
        variant = variants_for(self.variant_names)[0]
        with internal_stage(f"cpu codegen for {target_name(variant)}"):
            return library_text(llvm_modules(plan, variant, self.ir_cache), variant, stage)

    def build(self, plan: Plan, bundle: BundleWriter, progress) -> list[dict]:
        """Compiles the plan for each variant into `kernels/<target>/` of the bundle being written;
        returns manifest entries."""
        path = bundle.path
        variants = variants_for(self.variant_names)
        names = [target_name(v) for v in variants]
        progress("cpu codegen for " + ", ".join(f"{n} ({v.cpu}, {v.vector_width} f32 lanes)"
                                                for n, v in zip(names, variants)))
        with internal_stage(f"cpu codegen for {', '.join(names)}"):
            start = time.perf_counter()
            texts = {name: llvm_modules(plan, v, self.ir_cache) for name, v in zip(names, variants)}
            units = {(name, unit): (text, v) for name, v in zip(names, variants) for unit, text in texts[name].items()}
            if self.cache is None:
                progress.note(NO_HOME)
            objects = cached_objects(units, self.cache, self.jobs, progress.note)
            hits = sum(hit for _, hit in objects.values())
            progress(f"cpu: {len(objects)} objects ({hits} from the cache); codegen "
                     f"{time.perf_counter() - start:.1f}s")
            def link(name: str, v: CpuVariant) -> Path:
                return link_shared([objects[name, unit][0] for unit in texts[name]],
                                   path(f"kernels/{name}/{LIBRARY}"), v.arch)

            libraries = {}
            for name, v in zip(names, variants):
                try:
                    linked = link(name, v)
                except LlmircError as e:  # a bad object in the cache (a bug, or a damaged file with a good digest)?
                    cached = {key: units[key] for key in units if key[0] == name and objects[key][1]}
                    if not cached:
                        raise
                    progress.note(f"{name}: linking objects from the kernel cache failed ({e}); compiling them again")
                    objects.update(cached_objects(cached, self.cache, self.jobs, progress.note, refresh=True))
                    linked = link(name, v)
                libraries[name] = f"kernels/{name}/{library_name(linked.read_bytes())}"
                linked.rename(path(libraries[name]))
            if self.keep_intermediates:
                progress("cpu: writing the intermediates (LLVM IR and assembly of each library, the objects)")
                for name, v in zip(names, variants):
                    for stage, suffix in (("llvm-ir", "ll"), ("asm", "s")):
                        path(f"kernels/{name}/model.{suffix}").write_text(library_text(texts[name], v, stage))
                    for unit in texts[name]:
                        path(f"kernels/{name}/obj/{unit}.o").write_bytes(objects[name, unit][0])
        entries = []
        for name, variant in zip(names, variants):
            entries.append({
                "name": name, "kind": "cpu", "arch": variant.arch, "cpu": variant.cpu,
                "features": list(variant.required_flags), "vector_width": variant.vector_width,
                "library": libraries[name], "abi_version": ABI_VERSION, "entry": "llmir_forward",
                "kernels": [{"symbol": s, "kind": c.kind, "params": c.params} for s, c in plan.kernels().items()],
            })
        return entries
