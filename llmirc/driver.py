"""`llmirc compile`: checkpoint -> front end -> passes -> plan -> target code -> bundle.

Each step reports progress; the bundle is written atomically (nothing is left behind when
any step fails).
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from llmirc import __version__
from llmirc.artifact_format.writer import BundleWriter
from llmirc.errors import CheckpointError, LlmircError
from llmirc.frontend.checkpoint import Checkpoint
from llmirc.frontend.decoder import build_decoder
from llmirc.passes.pipeline import parse_passes, print_ir, run_passes
from llmirc.targets.plan import Plan, build_plan

TARGETS = ("cpu", "cuda", "hip")
EMIT_STAGES = ("mlir", "llvm-ir", "asm")


@dataclass
class CompileOptions:
    target: str = "cpu"
    passes: str | None = None           # None: the default pipeline
    print_ir_after_all: bool = False
    emit: str | None = None             # print this stage to stdout
    keep_intermediates: bool = False
    cpu_variants: tuple[str, ...] = ("native", "baseline")


class Progress:
    def __init__(self, stream: TextIO | None = sys.stderr):
        self.stream, self.start = stream, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.stream is not None:
            self.stream.write(f"[{time.perf_counter() - self.start:6.1f}s] {message}\n")
            self.stream.flush()


def compile_model(model: Path, out: Path | None, options: CompileOptions, progress: Progress | None = None,
                  stdout: TextIO = sys.stdout) -> Plan:
    progress = progress or Progress()
    if options.target not in TARGETS:
        raise LlmircError(f"unknown target {options.target!r} (choose from {', '.join(TARGETS)})")
    if options.target != "cpu":
        raise LlmircError(f"target {options.target!r} is not implemented yet; only 'cpu' can be compiled today")
    if options.emit is not None and options.emit not in EMIT_STAGES:
        raise LlmircError(f"unknown --emit stage {options.emit!r} (choose from {', '.join(EMIT_STAGES)})")
    if out is None and options.emit is None:
        raise LlmircError("no output: give -o OUT.llmir (or --emit STAGE to print a stage)")
    if out is not None:
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():  # else the writer's mkdir fails with a bare "File exists"
            raise LlmircError(f"-o {out}: cannot create the bundle there: {parent} is not a directory")
    if out is not None and not options.cpu_variants:  # a bundle without a library cannot run anywhere
        raise LlmircError("--cpu-variants: no CPU variant given (choose native and/or baseline)")
    if options.passes is not None:
        parse_passes(options.passes)  # fail before the checkpoint is read
    if not model.exists():
        raise CheckpointError(f"{model}: no such file or directory")
    if model.is_file() and model.suffix == ".onnx":
        raise CheckpointError(f"{model}: the ONNX front end is not implemented yet")

    ckpt = Checkpoint(model)
    try:
        spec = ckpt.spec
        progress(f"front end: {spec.architecture}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
                 f"vocab {spec.vocab_size}")
        module = build_decoder(spec, lambda name, shape: _check_shape(ckpt, name, shape), ckpt.has)
        input_ir = print_ir(module)
        progress("running passes")
        run_passes(module, options.passes, print_after_all=sys.stderr if options.print_ir_after_all else None)
        optimized_ir = print_ir(module)
        if options.emit == "mlir":
            stdout.write(optimized_ir)
        plan = build_plan(module)
        progress(f"plan: {len(plan.calls)} kernel calls, {len(plan.kernels())} kernels, "
                 f"{len(plan.weights)} weights, {len(plan.slots)} workspace buffers")
        if options.emit in ("llvm-ir", "asm"):
            from llmirc.targets.cpu.target import emit_text

            stdout.write(emit_text(plan, options.emit))
        if out is not None:
            _write_bundle(ckpt, plan, out, options, input_ir, optimized_ir, progress)
            progress(f"wrote {out}")
        return plan
    finally:
        ckpt.close()


def _check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    actual = ckpt.shape(name)
    if tuple(actual) != tuple(shape):
        raise CheckpointError(f"{ckpt.root}: tensor '{name}' has shape {list(actual)}, "
                              f"config.json implies {list(shape)}")


def _write_bundle(ckpt: Checkpoint, plan: Plan, out: Path, options: CompileOptions, input_ir: str,
                  optimized_ir: str, progress: Callable[[str], None]) -> None:
    from llmirc.targets.cpu import target as cpu

    spec = ckpt.spec
    with BundleWriter(out) as bundle:
        weights_file = "weights/model.safetensors"
        writer = bundle.safetensors(weights_file, {"producer": f"llmirc {__version__}"})
        for w in plan.weights:
            writer.declare(w.name, "F32", w.shape)
        total = sum(int(np.prod(w.shape)) * 4 for w in plan.weights)
        progress(f"writing {len(plan.weights)} weights ({total / 2**20:.1f} MiB)")
        for w in plan.weights:
            writer.write(w.name, w.materialize(ckpt.float32))
        writer.close()
        targets = cpu.build(plan, bundle.path, list(options.cpu_variants),
                            keep_intermediates=options.keep_intermediates, progress=progress)
        bundle.write_text("ir/input.mlir", input_ir)
        bundle.write_text("ir/optimized.mlir", optimized_ir)
        bundle.copy_file("config.json", ckpt.config_path)
        if (ckpt.root / "generation_config.json").is_file():
            bundle.copy_file("generation_config.json", ckpt.root / "generation_config.json")
        tokenizer = None
        for path in ckpt.tokenizer_files():
            bundle.copy_file(f"tokenizer/{path.name}", path)
            if path.name == "tokenizer.json":
                tokenizer = "tokenizer/tokenizer.json"
        generation = ckpt.generation_config()
        eos = generation.get("eos_token_id", list(spec.eos_token_ids))
        pool = plan.pool
        bundle.commit({
            "producer": f"llmirc {__version__}",
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"kind": "hf-safetensors", "name": ckpt.root.name, "fingerprint": ckpt.fingerprint()},
            "model": {
                "architecture": spec.architecture, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
                "intermediate_size": spec.intermediate_size, "num_layers": spec.num_layers,
                "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                "max_position_embeddings": spec.max_position_embeddings, "dtype": "float32",
                "sliding_windows": list(spec.sliding_windows), "rope_scaling": spec.rope.scaling,
            },
            "generation": {
                "bos_token_id": generation.get("bos_token_id", spec.bos_token_id),
                "eos_token_ids": eos if isinstance(eos, list) else [eos],
                "pad_token_id": generation.get("pad_token_id", spec.pad_token_id),
            },
            "kv_cache": {"block_size": pool.block_size.data, "num_layers": pool.layers.data,
                         "num_kv_heads": pool.kv_heads.data, "head_dim": pool.head_dim.data, "dtype": "float32",
                         "layout": "layer,kv,block,kv_head,slot,dim"},
            "abi": {"version": 1, "entry": "llmir_forward", "workspace": plan.workspace()},
            "weights": {"file": weights_file, "order": [w.name for w in plan.weights],
                        "fused": {w.name: w.sources() for w in plan.weights if w.expr[0] != "tensor"}},
            "targets": targets,
            "passes": options.passes or "default",
            "plan": plan.to_json(),
            "ir": {"input": "ir/input.mlir", "optimized": "ir/optimized.mlir"},
            "tokenizer": tokenizer,
        })


__all__ = ["CompileOptions", "compile_model", "asdict"]
