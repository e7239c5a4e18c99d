"""`llmirc compile`: checkpoint -> front end -> passes -> plan -> target code -> bundle.

Each step reports progress; the bundle is written atomically (nothing is left behind when
any step fails).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
import dataclasses
import hashlib
import json
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import numpy as np

from llmirc import __version__, dtypes
from llmirc import dialect as L
from llmirc import scratch
from llmirc.artifact_format.reader import is_bundle
from llmirc.artifact_format.writer import (BundleWriter, check_replaceable, created_utc, host_tag,
                                           remove_stale_temporaries)
from llmirc.errors import CheckpointError, LlmircError, UsageError, naming, stage
from llmirc.frontend import open_source
from llmirc.frontend.checkpoint import missing_tokenizer_note, source_name
from llmirc.frontend.context import Limit, index_limits, resolve_context, table_rows
from llmirc.passes.func_args import forward_func
from llmirc.passes.pipeline import (DEFAULT_BLOCK_SIZE, IRPrinting, make_context, parse_passes, print_ir, required,
                                   run_passes)
from llmirc.passes.cast_weights import float_type, weight_uses
from llmirc.passes.kv_cache_dtype import kv_type
from llmirc.passes.paged_kv import block_size_problem
from llmirc.passes.quantize_weights import (METHODS, NOTHING_FITS, NOTHING_FITS_BUT_KEPT, TIED_HEAD, TIED_TWICE,
                                            QuantizeWeights, source_names)
from llmirc.targets.backend import backend
from llmirc.targets.triton.compile import STAGES as GPU_STAGES
from llmirc.targets.plan import ABI_INPUTS, ABI_VERSION, Plan, build_plan


@dataclass
class CompileOptions:
    targets: tuple[str, ...] = ("cpu",)
    passes: str | None = None           # None: the default pipeline
    print_ir: IRPrinting | None = None  # IR dumps during the passes (stderr), as mlir-opt's --mlir-print-ir-*
    emit: str | None = None             # print this stage to stdout
    keep_intermediates: bool = False
    report: bool = False                # print what the passes did
    cpu_variants: tuple[str, ...] = ("native", "baseline")
    archs: tuple[str, ...] = ()         # GPU architectures (sm_80, sm_90, gfx90a, gfx942); () = each target's defaults
    jobs: int | None = None             # kernel compilations at once (processes); None = the usable CPUs
    dtype: str = "auto"                 # weights of linear/embedding ops: auto (the checkpoint's), float32, ...
    kv_cache_dtype: str = "auto"        # the paged KV pool: auto (half for half or pre-quantized weights), float32, ..., int8
    quant: str = "none"                 # none, int8, int4: quantize linear weights (quantize-weights)
    quant_group_size: int = 0           # 0: per output row for int8, 32 for int4
    quant_symmetric: bool = True        # false: a zero point per group
    quant_keep: tuple[str, ...] = ("embedding",)  # what stays in higher precision (quantize-weights' keep)
    quant_lm_head: str = "auto"         # auto (int6 for int4, int8 for int8), int8 (per row), int6, int4
    quant_method: str = "rtn"           # rtn (round to nearest), gptq or autoround (need `calibration`)
    quant_rotate: bool | None = None    # rotate down_proj's input by a block Hadamard (quantize-weights' rotate);
                                        # None: for int4 with GPTQ or autoround
    quant_smooth: float | None = None   # SmoothQuant's alpha (the smooth pass; needs `calibration`); None: off
    calibration: Path | None = None     # text file GPTQ and smoothing calibrate on
    calibration_tokens: int = 8192      # at most this many of its tokens
    quant_iters: int = 200              # autoround's signed-gradient steps per decoder layer
    dequantize: bool = False            # expand quantized tensors (GGUF) to float32 instead of keeping them
    block_size: int | None = None       # KV cache block (tokens); None: the pipeline's (16)
    max_model_len: int | None = None    # the context the bundle states (<= the checkpoint's)
    gpu_fusions: bool = False           # GPU targets: norms and act_mul into the next linear (targets/triton/fuse.py;
                                        # off by default: the first design was slower on an H200,
                                        # DESIGN.md "GPU kernels")
    gpu_pdl: bool = False               # cuda sm_90+: programmatic dependent launch, each linear streaming its
                                        # weights into L2 while the kernel before it runs
                                        # (targets/triton/pdl.py; off until measured on a GPU)

    def recorded(self) -> dict:
        """The options as the manifest records them (`compile_options`; JSON: tuples as lists),
        but for those of how the compile ran, which do not change the bundle (so `-j` does not
        change its bytes). The calibration text is named by its file's name alone (its bytes by
        `calibration`'s sha256): a path of the build machine is no part of a portable bundle, and
        the same file named from another folder gives the same bytes."""
        recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                    if k not in ("jobs", "report", "print_ir", "emit")}
        return dict(recorded, quant_rotate=self.rotates() if self.quant != "none" else None,
                    calibration=unicode_text(Path(self.calibration).name) if self.calibration is not None else None)

    def quantize_pass(self) -> str:
        """The quantize-weights pass spec `--quant` asks for ('' for none)."""
        if self.quant == "none":
            return ""
        if self.quant not in ("int8", "int4"):
            raise UsageError(f"--quant: unknown scheme {self.quant!r} (choose none, int8 or int4)")
        if self.quant_lm_head not in ("auto", "int8", "int6", "int4"):
            raise UsageError(f"--quant-lm-head: unknown scheme {self.quant_lm_head!r} (choose auto, int8, int6 "
                             "or int4)")
        keep = ",".join(f'"{k}"' for k in self.quant_keep) or '"none"'
        head = 0 if self.quant_lm_head == "auto" else self.quant_lm_head[3:]
        return (f"quantize-weights{{bits={self.quant[3:]} group-size={self.quant_group_size} "
                f"symmetric={str(self.quant_symmetric).lower()} keep={keep} "
                f"lm-head-bits={head} method={self.quant_method} rotate={str(self.rotates()).lower()}}}")

    def rotates(self) -> bool:
        """Whether down_proj's input is rotated (`quant_rotate`, by default for int4 with GPTQ or
        autoround: DESIGN.md, "Rotation")."""
        if self.quant_rotate is None:
            return self.quant == "int4" and self.quant_method in ("gptq", "autoround")
        return bool(self.quant_rotate)

    def check_calibration(self) -> None:
        """--quant-method, --quant-smooth and --calibration agree (before the checkpoint is read)."""
        if self.quant_method not in METHODS:
            raise UsageError(f"--quant-method: unknown method {self.quant_method!r} (choose rtn, gptq or autoround)")
        if isinstance(self.quant_iters, bool) or not isinstance(self.quant_iters, int) or self.quant_iters < 0:
            raise UsageError(f"--quant-iters {self.quant_iters!r}: a whole number of steps, 0 or more")
        if self.quant_method == "autoround" and self.quant_smooth is not None:
            raise UsageError("--quant-smooth cannot go with --quant-method autoround (the codes are learned "
                             "for the weights as the checkpoint has them)")
        for option, wanted in ((f"--quant-method {self.quant_method}", self.quant_method != "rtn"),
                               (f"--quant-smooth {self.quant_smooth}", self.quant_smooth is not None)):
            if wanted and self.quant == "none":
                raise UsageError(f"{option}: give --quant int8 or int4 too")
            if wanted and self.calibration is None:
                raise UsageError(f"{option} needs --calibration FILE (text to calibrate on)")
        if self.quant_smooth is not None and (isinstance(self.quant_smooth, bool) or
                                              not isinstance(self.quant_smooth, (int, float))):
            raise UsageError(f"--quant-smooth {self.quant_smooth!r}: alpha must be a number between 0 and 1")
        if self.quant_smooth is not None and not 0 < self.quant_smooth < 1:
            raise UsageError(f"--quant-smooth {self.quant_smooth}: alpha must be between 0 and 1 (0.5 is usual)")
        if self.calibration is not None and not self.calibrates():
            raise UsageError("--calibration is only read by --quant-method gptq or autoround and --quant-smooth")
        if self.calibration is None:
            return
        path = Path(self.calibration)  # (the Python API may give a str)
        if path.is_dir():
            raise LlmircError(f"--calibration {path}: a directory, not a text file")
        if not path.exists():
            raise LlmircError(f"--calibration {path}: no such file")
        if not path.is_file():
            raise LlmircError(f"--calibration {path}: not a regular file")
        self.calibration = path

    def smooth_pass(self) -> str:
        """The smooth pass spec `--quant-smooth` asks for ('' for none); it runs before the pipeline."""
        if self.quant_smooth is None:
            return ""
        return f"smooth{{alpha={np.format_float_positional(self.quant_smooth)}}}"  # xDSL reads no 1e-05

    def calibrates(self) -> bool:
        return self.quant_method != "rtn" or self.quant_smooth is not None

    def required(self) -> str:
        return required(self.dtype, self.kv_cache_dtype, self.block_size or DEFAULT_BLOCK_SIZE, self.quantize_pass())


class Progress:
    """Progress lines of a compile ("[  1.2s] message") on `stream`, and notes (things the user
    should know: an option that changed nothing, a missing tokenizer) among them. With `stream`
    None (`llmirc compile -q`), the notes go to `notes` once the compile has succeeded (a failed
    one prints its error alone); both None: silent."""

    def __init__(self, stream: TextIO | None = sys.stderr, notes: TextIO | None = None):
        self.stream, self.notes, self.start = stream, notes, time.perf_counter()
        self.pending: list[str] = []

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {message}\n"
        if self.stream is not None and not _write(self.stream, line):
            self.stream = None

    def note(self, message: str) -> None:
        if self.stream is not None:
            self(f"note: {message}")
        else:
            self.pending.append(message)

    def done(self) -> None:
        """The compile succeeded: the notes held back under -q (a full or closed stream loses them)."""
        if self.notes is not None and self.pending:
            _write(self.notes, "".join(f"note: {m}\n" for m in self.pending))
        self.pending = []


def _write(stream: TextIO, text: str) -> bool:
    """Writes and flushes; False where the stream is full or closed (`2>/dev/full`, `| head -1`):
    what a compile says about itself never fails it."""
    try:
        stream.write(text)
        stream.flush()
        return True
    except OSError:
        return False


def compile_model(model: Path, out: Path | None, options: CompileOptions, progress: Progress | None = None,
                  stdout: TextIO = sys.stdout) -> Plan:
    progress = progress or Progress()
    if not options.targets:
        raise UsageError("--target: no target given (choose from cpu, cuda, hip)")
    if options.print_ir is not None:
        options.print_ir.check()
    # (emit None: a bundle is written, so the backends check the tools it needs, a cross linker, now; with -o,
    # --emit prints a stage and the bundle is still written)
    building = dataclasses.replace(options, emit=None) if out is not None else options
    backends = [backend(kind, building) for kind in dict.fromkeys(options.targets)]
    stages: dict = {}
    for b in backends:  # a stage two targets share (ttir, ...) is emitted for the first named
        for name in b.text_stages:
            stages.setdefault(name, b)
    unused = [a for a in options.archs if not any(a in getattr(b, "archs", ()) for b in backends)]
    if unused:
        raise UsageError(f"--arch {','.join(unused)}: no --target here compiles for it (sm_*: cuda, gfx*: hip)")
    if options.emit is not None and options.emit != "mlir" and options.emit not in stages:
        binary = options.emit in {s for b in backends for s in b.stages}
        owner = next((kind for kind, names in GPU_STAGES.items() if options.emit in names and
                      kind not in {b.kind for b in backends}), None)  # a stage of a target not given
        raise UsageError(f"--emit {options.emit}: not a text stage of the targets given (choose from mlir, "
                         f"{', '.join(stages)})" + ("; binary stages go into the bundle (-o)" if binary else "")
                         + (f"; {options.emit} is a stage of --target {owner}" if owner else ""))
    if out is None and options.emit is None:
        raise UsageError("no output: give -o OUT.llmir (or --emit STAGE to print a stage)")
    if out is not None:
        check_replaceable(out)  # before the checkpoint is read (the writer checks again)
    user_passes = parse_passes(options.passes) if options.passes is not None else []  # fail before reading
    if lowering := [p.name for p in user_passes if p.name.startswith("onnx-")]:
        raise UsageError(f"--passes: {lowering[0]} is the ONNX front end's lowering, which runs on ONNX input "
                         "before the pipeline; leave it out")
    if options.block_size is not None and (why := block_size_problem(options.block_size)):
        raise UsageError(f"--block-size {options.block_size}: {why}")
    # a flag and a pass in --passes doing one job: the user's pass would run first and the flag's
    # (in the required tail, or smooth before the pipeline) find it done, or undo it
    flags = {"quantize-weights": ("--quant", options.quant != "none"),
             "cast-weights": ("--dtype", options.dtype != "auto"),
             "kv-cache-dtype": ("--kv-cache-dtype", options.kv_cache_dtype != "auto"),
             "paged-kv": ("--block-size", options.block_size is not None),
             "smooth": ("--quant-smooth", options.quant_smooth is not None)}
    first: dict = {}  # (and one of those passes twice, differently: the first would decide, the second do nothing)
    for p in user_passes:
        if p.name in flags and flags[p.name][1]:
            raise UsageError(f"{flags[p.name][0]} and a {p.name} pass in --passes: give it in one place")
        if p.name in flags and first.setdefault(p.name, p) != p:
            raise UsageError(f"--passes: {p.name} twice, with other options: give it once")
        if isinstance(p, QuantizeWeights):
            p.check()
    created_utc()  # a malformed SOURCE_DATE_EPOCH fails before the checkpoint is read
    block_size = options.block_size or DEFAULT_BLOCK_SIZE
    # the required tail's kv-cache-dtype (which would put auto back) does what the user's asked
    kv_cache_dtype = next((p.dtype for p in reversed(user_passes) if p.name == "kv-cache-dtype"),
                          options.kv_cache_dtype)
    options.check_calibration()
    if options.dtype != "auto":  # bad option values fail before the checkpoint is read, by their names
        float_type(options.dtype, "--dtype")
    if options.kv_cache_dtype != "auto":
        kv_type(options.kv_cache_dtype, "--kv-cache-dtype")
    quantize = next((p for p in parse_passes(options.required()) if isinstance(p, QuantizeWeights)), None)
    if quantize is not None:  # (the flags made it: errors name them)
        quantize.check({"group-size": "--quant-group-size", "keep": "--quant-keep"})
    if removed := scratch.remove_stale():
        progress.note(f"removed {_listed_names(removed)} from {tempfile.gettempdir()}: left by compiles that were "
                      "killed")
    if out is not None:
        removed, unknown = remove_stale_temporaries(out)
        if removed:
            progress.note(f"removed {_listed_names(removed)}: left by compiles to {out} that were killed")
        # ours, kept because out is missing: a writer killed between its two moves
        kept = [n for n in unknown if f"-{host_tag()}-" in n] if not os.path.lexists(out) else []
        if kept:
            progress.note(f"{out} is missing: a compile replacing it was killed; beside it, {_listed_names(kept)} "
                          f"(.old-: the previous bundle, .tmp-: the new one): move one back to {out.name} to keep it, "
                          "this compile writes a new one")
        if others := [n for n in unknown if n not in kept]:
            progress.note(f"{_listed_names(others)} next to {out} may be left by a killed compile (on another "
                          "host or by an older llmirc): remove it unless a compile is still writing it")
    from llmirc.frontend.gguf_checkpoint import split_files

    files = split_files(Path(model)) if os.path.isfile(model) else []  # (errors are the front end's to report)
    size = sum(os.path.getsize(f) for f in files)
    if size >= 16 << 20:  # a big file (GGUF, ONNX) takes seconds to parse
        progress(f"reading {Path(model).name}{f' and {len(files) - 1} more' if len(files) > 1 else ''} "
                 f"({size / 2**20:.0f} MiB)")
    if is_bundle(os.path.realpath(model)):
        raise CheckpointError(f"{model}: a compiled llmir bundle, not a checkpoint (`llmirc run` runs it; compile "
                              "the checkpoint it came from)")
    with stage("front end"):
        source = open_source(model, dequantize=options.dequantize)
    highest_token = _check_tokenizer(source, progress) if out is not None else None
    calibration = None
    try:
        # auto: the checkpoint's types; a half-precision ONNX export is read as float32 and stored as it was
        dtype = options.dtype if options.dtype != "auto" else source.model_info().get("weight_dtype") or "auto"
        ctx = make_context(read_weight=source.float32, add_weight=source.add_weight)
        with stage(f"front end ({source.kind})"):
            if hasattr(source, "use_context"):  # (a rotary table chosen by the context: longrope)
                source.use_context(options.max_model_len)
            module = source.module()
        facts = model_facts(module)
        layers = facts.get("num_layers")  # (none found in a full-sequence ONNX graph)
        _note_ids_outside_vocab(source, facts.get("vocab_size"), highest_token, progress)
        if other := getattr(source, "other_modalities", None):
            progress.note(f"{Path(model).name} is a multimodal checkpoint: compiled as its text model "
                          f"({_count(len(other), 'tensor')} of the image model left out; prompts are text only)")
        if unused := source.unused_tensors():
            verb = "is" if len(unused) == 1 else "are"
            progress.note(f"{_count(len(unused), 'tensor')} of {Path(model).name} {verb} not used by "
                          f"the model its config describes: {_listed_names(unused)} (where the config leaves out a "
                          "feature the tensors have, biases say, the model is not the one trained)")
        progress(f"front end: {source.kind}" + (f", {layers} attention layers" if layers is not None else ""))
        stored = _stored_quantized(source, module)
        if options.quant_method != "rtn" and stored is not None:
            _check_something_to_calibrate(model, source, module, stored, quantize)
        elif options.quant_smooth is not None and stored is not None and not stored[0]:
            raise LlmircError(f"--quant-smooth: every linear weight of {model} is stored quantized already, so there "
                              f"is nothing to smooth{_DEQUANTIZE_HINT.get(source.kind, '')}")
        if options.calibrates():
            with stage("calibration"):
                ctx.calibration = calibration = _calibrate(source, options, progress)
            method = {"gptq": "GPTQ"}.get(options.quant_method, options.quant_method)
            uses = " and ".join(u for u, on in ((method, options.quant_method != "rtn"),
                                                (f"smooth, alpha {options.quant_smooth}",
                                                 options.quant_smooth is not None)) if on)
            ctx.report[f"calibration ({uses}): {calibration.tokens} tokens of {options.calibration.name} in "
                       f"{_count(calibration.windows, 'window')}"] += 1
        input_ir = print_ir(module) if out is not None else ""  # only the bundle keeps it
        progress("running passes")
        with naming(model, getattr(source, "path", model)):  # a node the ONNX lowering evaluated
            run_passes(module, options.passes, printing=options.print_ir,
                       ctx=ctx, prefix=",".join(filter(None, (source.lowering, options.smooth_pass()))),
                       block_size=block_size,
                       tail=dataclasses.replace(options, dtype=dtype, kv_cache_dtype=kv_cache_dtype).required())
        if stored is None:  # (an ONNX model's weights are llmir ops once lowered; the quantize pass's own come
            stored = _stored_quantized(None, module)  # from QuantizeOps, which the checks below look for)
        kept_stored = options.quant != "none" and stored and stored[1] and \
            not any(isinstance(op, L.QuantizeOp) for op in module.walk())
        if kept_stored:
            progress.note(f"--quant {options.quant} changed nothing: the weights it would quantize are stored "
                          f"quantized in {model} already and are kept as they are"
                          f"{_DEQUANTIZE_HINT.get(source.kind, '')}")
        cast = any(k.startswith("cast-weights:") for k in ctx.report)
        if options.dtype != "auto" and stored and stored[1] and not cast:
            progress.note(f"--dtype {options.dtype} changed nothing: the linear and embedding weights of {model} are "
                          "stored quantized and are kept as they are"
                          + (" (--dequantize reads them as float, in that type)" if source.kind == "gguf" else ""))
        if NOTHING_FITS_BUT_KEPT in ctx.report or NOTHING_FITS in ctx.report:
            why = (f"the linear weights of {model} whose inputs fit its groups are kept in float by --quant-keep, and "
                   f"the others' fit none" if NOTHING_FITS_BUT_KEPT in ctx.report else
                   f"no linear weight of {model} has inputs in groups its scheme takes, so every one stays in float")
            progress.note(f"--quant {options.quant} quantized nothing: {why} (--report lists them)")
        if options.quant_smooth is not None and not any(k.startswith("smooth: ") for k in ctx.report):
            progress.note(f"--quant-smooth smoothed nothing: no norm or act_mul of {model} feeds only linears with "
                          f"float weights{_DEQUANTIZE_HINT.get(source.kind, '')}")
        if options.quant_rotate and quantize is not None and not kept_stored and \
                not any(k.startswith("quantize-weights: input rotated") for k in ctx.report):
            progress.note(f"--quant-rotate rotated nothing: no MLP down projection of {model} is quantized from float "
                          f"weights with a power-of-two block of at least 16 dividing its inputs")
        if quantize is not None and not kept_stored and (unmatched := quantize.unmatched_keep(module)):
            example = next((n for u, w in weight_uses(module) if isinstance(u, L.LinearOp)
                            for n in source_names(w)), "")
            progress.note(f"--quant-keep {', '.join(unmatched)} named no weight of {model} (its weights are named "
                          f"like {example})")
        for item, deciders in quantize.shadowed_keep(module) if quantize is not None and not kept_stored else ():
            progress.note(f"--quant-keep {item} is given twice: the second changes nothing" if deciders == [item] else
                          f"--quant-keep {item} changes nothing: every weight it names is decided by "
                          f"{', '.join(deciders)} before it (the first item naming a weight decides)")
        if TIED_TWICE in ctx.report:
            table, head = ctx.tied_storage
            int4 = "; with --quant int4, --quant-keep none and --quant-lm-head int4 share int4 codes" * \
                (options.quant == "int4")
            progress.note(f"the LM head is tied to the embedding table but stored apart: the table {table}, the head "
                          f"{head}, a second copy of the matrix (one copy: --quant-keep embedding, the default, stores "
                          f"both as --quant-lm-head says, embedding=float both in float, embedding=int8 both in int8 "
                          f"per row with --quant-lm-head auto{int4})")
        if TIED_HEAD in ctx.report:  # its largest matrix, in float whatever --quant-lm-head says
            ignored = f"; --quant-lm-head {options.quant_lm_head} changes nothing" * (options.quant_lm_head != "auto")
            progress.note("the LM head is tied to the embedding table, which --quant-keep keeps in float: it stays "
                          f"float (--quant-keep embedding, the default, quantizes both as --quant-lm-head says, one "
                          f"copy; embedding=int8 both in int8 per row){ignored}")
        optimized_ir = print_ir(module)
        generic = generic_ops(module)
        if generic:
            progress(f"full-sequence model (ONNX ops left generic: {_listed(generic)}): correct but slow, every "
                     "step recomputes the whole sequence")
        report = format_report(source, ctx.report, generic)
        if options.report:
            (sys.stderr if options.emit else stdout).write(report)
        context = resolve_context(source.model_info(), module, options.max_model_len)
        progress(f"context: {context.tokens} tokens ({context.why})")
        if not any(isinstance(op, (L.AttentionOp, L.PagedAttentionOp)) or L.FULL_SEQUENCE in op.attributes
                   for op in module.walk()):
            raise CheckpointError(f"{model}: the model has no attention layer (no token reads the ones before "
                                  "it): llmirc compiles decoder language models")
        with stage("plan"), naming(model, getattr(source, "path", model)):  # a node a generic kernel lowers
            plan = build_plan(module, read_weight=source.read)
        read = source.read if calibration is None else \
            (lambda name: calibration.read(name) if calibration.has(name) else source.read(name))
        plan.limits = index_limits(module, context)
        for b in backends:
            b.check(plan)
        if options.emit == "mlir":  # (after the targets' checks: a compile that fails prints nothing)
            stdout.write(optimized_ir)
        by_dtype = ", ".join(f"{n / 2**20:.1f} MiB {d}" for d, n in plan.bytes_by_dtype().items())
        progress(f"plan: {len(plan.calls)} kernel calls, {len(plan.kernels())} kernels, "
                 f"{len(plan.weights)} weights ({by_dtype}), {len(plan.slots)} workspace buffers, "
                 f"{plan.pool.dtype} KV cache")
        if options.emit in stages:
            emitter = stages[options.emit]
            choices = list(getattr(emitter, "archs", None) or getattr(emitter, "variant_names", ()))
            others = [b.kind for b in backends if b is not emitter and options.emit in b.text_stages]
            if len(choices) > 1 or others:  # (the first CPU variant, the first GPU architecture)
                progress.note(f"--emit {options.emit}: the text for {choices[0]} only"
                              + (f", the first of {', '.join(choices)}" if len(choices) > 1 else "")
                              + (f"; not for {' or '.join(others)} (--target {others[0]} alone prints its own)"
                                 if others else ""))
            stdout.write(emitter.emit(plan, options.emit))
        if out is not None:
            with stage("bundle writer"):
                calibrated = calibration and {"text_sha256": _sha256(options.calibration),
                                              "tokens": calibration.tokens, "windows": calibration.windows}
                _write_bundle(source, read, module, plan, backends, out, options, input_ir, optimized_ir, progress,
                              dict(ctx.report), context, calibrated)
            progress(f"wrote {out}")
        progress.done()
        return plan
    finally:
        if calibration is not None:
            calibration.close()
        source.close()


_DEQUANTIZE_HINT = {"gguf": " (--dequantize expands them to float32 first, to quantize them again)"}


def _stored_quantized(source, module) -> tuple[int, int] | None:
    """(float, quantized) counts of the linear weights of a front end's llmir module as the checkpoint
    stores them; None for a source lowered by passes (ONNX), whose weights are not llmir ops yet (source None:
    a module after its passes)."""
    if source is not None and source.lowering:
        return None
    floats = [L.is_float(w.type.element_type) for user, w in weight_uses(module) if isinstance(user, L.LinearOp)]
    return sum(floats), len(floats) - sum(floats)


def _check_something_to_calibrate(model: Path, source, module, stored: tuple[int, int], quantize) -> None:
    """Refuses GPTQ (before calibrating) when the quantize pass would quantize no linear weight of
    the front end's module: each is stored quantized or kept in float."""
    seen = SimpleNamespace(report=Counter())  # what the pass keeps, counted
    if any(isinstance(user, L.LinearOp) for user, *_ in quantize.plan(module, seen)):
        return
    floats, quantized = stored
    why = ["stored quantized already"] if quantized else []
    if floats:
        tied = " (the LM head is tied to an embedding table kept in float)" if TIED_HEAD in seen.report else ""
        why.append(f"kept in float by --quant-keep {','.join(quantize.keep) or 'none'}{tied}")
    raise LlmircError(f"--quant-method {quantize.method}: every linear weight of {model} is {' or '.join(why)}, so there is "
                      f"nothing to calibrate{_DEQUANTIZE_HINT.get(source.kind, '') if quantized else ''}")


def _check_tokenizer(source, progress: Progress) -> int | None:
    """Loads the checkpoint's tokenizer.json (with its tokenizer_config.json) as the loader will load
    the bundle's copy, so that a corrupt one is refused naming the checkpoint's file (LlmircError)
    instead of making a bundle that fails on every text prompt; so is a chat template with a
    syntax error, where jinja2 (the serve extra) is installed. Notes a checkpoint without one.
    Returns the tokenizer's highest token id (None without one)."""
    from llmirc.runtime.chat_template import ChatTemplate
    from llmirc.runtime.tokenizer import Tokenizer

    files = {p.name: p for p in source.tokenizer_files()}
    if "tokenizer.json" in files:
        tokenizer = Tokenizer.from_bundle_dir(files["tokenizer.json"].parent)
        template = ChatTemplate.from_folder(files["tokenizer.json"].parent, tokenizer.special_tokens_map)
        if template is not None and source.kind == "gguf":  # (written to a scratch folder from the metadata)
            template.name = f"{source.path}: tokenizer.chat_template"
        if template is not None and importlib.util.find_spec("jinja2") is not None:
            template.check()
        return max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=None)
    if note := missing_tokenizer_note(Path(source.root)):  # a GGUF file's embedded one counts
        progress.note(note)
    return None


def _note_ids_outside_vocab(source, vocab: int | None, highest_token: int | None, progress: Progress) -> None:
    """A note for token ids the model's logits cannot hold (`vocab` columns): an eos id of the
    generation config (generation then never ends on it), tokenizer ids past the vocabulary (a
    prompt with one is refused). Both come from a checkpoint's files that do not agree."""
    if vocab is None:
        return
    eos = source.generation_config().get("eos_token_id", source.model_info()["eos_token_ids"])
    outside = [t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int) and not 0 <= t < vocab]
    if outside:
        progress.note(f"eos_token_id {', '.join(map(str, outside))} is outside the model's vocabulary of {vocab}: "
                      "generation never ends on it (only at the length asked or a stop)")
    if highest_token is not None and highest_token >= vocab:
        progress.note(f"the tokenizer has token ids up to {highest_token}, outside the model's vocabulary of "
                      f"{vocab}: a prompt holding one is refused")


def _sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (the manifest records the calibration text by it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _calibrate(source, options: CompileOptions, progress: Callable[[str], None]):
    """The linears' inputs on --calibration text: maxima, and Hessians for GPTQ (llmirc/calibration.py)."""
    from llmirc.calibration import calibrate, read_token_ids, windows
    from llmirc.runtime.tokenizer import Tokenizer

    files = {p.name: p for p in source.tokenizer_files()}
    if "tokenizer.json" not in files:
        raise LlmircError(f"--calibration: {source.root} has no tokenizer.json to tokenize the text with")
    tokenizer = Tokenizer.from_bundle_dir(files["tokenizer.json"].parent)
    try:
        ids = read_token_ids(options.calibration, lambda text: tokenizer.encode(text, add_special_tokens=False),
                             options.calibration_tokens)
    except (OSError, UnicodeDecodeError) as e:
        raise LlmircError(f"--calibration {options.calibration}: cannot read it as UTF-8 text ({e})") from None
    if len(ids) < 16:
        raise LlmircError(f"--calibration {options.calibration}: {len(ids)} tokens; calibration needs text of at least 16 "
                          "tokens (a few thousand are better)")
    module = source.module()  # a copy in full-sequence form: the passes rewrite the other one
    run_passes(module, "canonicalize,cse", prefix=source.lowering, tail="dce",
               ctx=make_context(read_weight=source.float32, add_weight=source.add_weight))
    vocab = table_rows(module, "token_ids")
    if vocab is not None and max(ids, default=0) >= vocab:
        raise LlmircError(f"--calibration: the tokenizer gives token id {max(ids)}, past the {vocab} rows of the "
                          "model's embedding table (is tokenizer.json the model's?)")
    context = resolve_context(source.model_info(), module, options.max_model_len)  # what the bundle will run
    chunks = windows(ids, min(512, context.tokens))
    progress(f"calibration: {sum(map(len, chunks))} tokens of {options.calibration.name} in "
             f"{_count(len(chunks), 'window')}")
    if options.quant_method == "autoround":
        from llmirc.autoround import calibrate_autoround
        from llmirc.passes.quantize_weights import rotation_block

        quantize = next(p for p in parse_passes(options.required()) if isinstance(p, QuantizeWeights))
        planned = {user: (scheme, rotation_block(user, k) if quantize.rotate else 0)
                   for user, _, k, scheme in quantize.plan(module) if isinstance(user, L.LinearOp)}
        return calibrate_autoround(module, source, chunks, planned, options.quant_iters, progress)
    return calibrate(module, source, chunks, progress, hessians=options.quant_method == "gptq")


def format_report(source, report, generic: dict | None = None) -> str:
    """`--report`: what each pass rewrote, and what was left for generic code."""
    lines = [f"compile report ({source.kind}{': ' + source.summary if source.summary else ''})"]
    width = max((len(k) for k in report), default=0)
    lines += [f"  {what:{width}s}  x{n}" for what, n in sorted(report.items())]
    if generic:
        lines.append(f"  left generic: {_listed(generic)} (a full-sequence model: correct but slow)")
    else:
        lines.append("  left generic: none (every op has an llmir kernel)")
    return "\n".join(lines) + "\n"


def generic_ops(module) -> dict[str, int]:
    """ONNX op types the optimized forward still holds (a full-sequence model), with counts."""
    from collections import Counter

    from llmirc.frontend.onnx_dialect import OnnxOp

    return dict(sorted(Counter(op.op_type for op in module.walk() if isinstance(op, OnnxOp)).items()))


def _listed_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _listed(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in ops.items())


def model_facts(module) -> dict:
    """What the graph itself says about the model (sizes, layers, heads, windows, rotary layers, soft-capping)."""
    from llmirc import dialect as L

    facts: dict = {}
    attn = [op for op in module.walk() if isinstance(op, (L.AttentionOp, L.PagedAttentionOp))]
    if attn:
        a = attn[0]
        facts.update(num_layers=len(attn), num_heads=a.num_heads.value.data, num_kv_heads=a.num_kv_heads.value.data,
                     head_dim=a.head_dim.value.data, sliding_windows=[o.sliding_window.value.data for o in attn])
        if a.softcap is not None:
            facts["attention_softcap"] = a.softcap_value()
        # layers whose queries a rotary embedding turns (SmolLM3's NoPE layers have none)
        facts["rope_layers"] = sum(isinstance(o.q.owner, (L.RopeOp, L.RopeKVAppendOp)) for o in attn)
    for op in module.walk():
        if isinstance(op, L.EmbeddingOp):
            facts.setdefault("hidden_size", L.shape_of(op.table)[1])
    ret = forward_func(module).get_return_op()
    if ret is not None and ret.operands and len(L.shape_of(ret.operands[0])) == 2:
        facts["vocab_size"] = L.shape_of(ret.operands[0])[1]
        if isinstance(ret.operands[0].owner, L.SoftcapOp):
            facts["logits_softcap"] = ret.operands[0].owner.cap.value.data
    return facts


def _write_bundle(source, read, module, plan: Plan, backends: list, out: Path, options: CompileOptions, input_ir: str,
                  optimized_ir: str, progress: Callable[[str], None], report: dict, context: Limit,
                  calibrated: dict | None) -> None:
    info, facts = source.model_info(), model_facts(module)
    facts.update(full_sequence=plan.full_sequence, generic_ops=generic_ops(module))
    with BundleWriter(out) as bundle:
        weights_file = "weights/model.safetensors"
        writer = bundle.safetensors(weights_file, {"producer": f"llmirc {__version__}"})
        for w in plan.weights:
            writer.declare(w.name, dtypes.dtype(w.dtype).safetensors, w.shape)
        total = sum(w.nbytes for w in plan.weights)
        gptq = f"quantizing ({ {'gptq': 'GPTQ', 'autoround': 'learned codes'}[options.quant_method]}) and " \
            if options.quant_method != "rtn" and options.quant != "none" else ""
        progress(f"{gptq}writing {len(plan.weights)} weights ({total / 2**20:.1f} MiB)")
        effort = [_effort(w) for w in plan.weights]
        total, done, shown, parts, when = sum(effort), 0, 0, {}, time.monotonic()
        slow = total > 2**30 or options.quant_method != "rtn"
        for i, w in enumerate(plan.weights):
            writer.write(w.name, w.materialize(read, parts))
            source.drop_pages()  # the weights stream through: what was read need not stay resident
            done += effort[i]
            # big models and GPTQ: a line per tenth, and every 5 s (GPTQ's time goes by weight, not by byte)
            if slow and (done - shown >= total / 10 or time.monotonic() - when > 5):
                shown, when = done, time.monotonic()
                progress(f"  {i + 1} of {len(plan.weights)} weights written ({100 * done // max(total, 1)}% of the work)")
        writer.close()
        targets = [entry for b in backends for entry in b.build(plan, bundle, progress)]
        bundle.write_text("ir/input.mlir", input_ir)
        bundle.write_text("ir/optimized.mlir", optimized_ir)
        for path in source.config_files():
            bundle.copy_file(path.name, path)
        tokenizer = None
        for path in source.tokenizer_files():
            bundle.copy_file(f"tokenizer/{path.name}", path)
            if path.name == "tokenizer.json":
                tokenizer = "tokenizer/tokenizer.json"
        generation = source.generation_config()
        if generation and "generation_config.json" not in [p.name for p in source.config_files()]:
            bundle.write_text("generation_config.json", json.dumps(generation, indent=2) + "\n")  # (genai_config's)
        eos = generation.get("eos_token_id", info["eos_token_ids"])
        bundle.commit({
            "producer": f"llmirc {__version__}",
            "created_utc": created_utc(),
            "source": {"kind": source.kind, "name": unicode_text(source_name(source.root)),
                       "fingerprint": source.fingerprint()},
            "compile_options": options.recorded(),
            "calibration": calibrated,
            "model": {"architecture": info["architecture"], **facts,
                      "max_position_embeddings": context.tokens, "context_from": context.why,
                      "weight_bytes": plan.bytes_by_dtype()},
            "generation": {
                "bos_token_id": generation.get("bos_token_id", info["bos_token_id"]),
                "eos_token_ids": [t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int)],
                "pad_token_id": generation.get("pad_token_id", info["pad_token_id"]),
            },
            "kv_cache": plan.pool.to_json(),
            "abi": {"version": ABI_VERSION, "inputs": list(ABI_INPUTS), "workspace": plan.workspace()},
            "weights": {"file": weights_file, "order": [w.name for w in plan.weights],
                        "dtypes": {w.name: w.dtype for w in plan.weights},
                        "derived": {w.name: w.sources() for w in plan.weights if w.expr[0] != "tensor"}},
            "targets": targets,
            "passes": "default" if options.passes is None else options.passes,  # ("": the required passes only)
            "rewrites": report,
            "plan": plan.to_json(),
            "ir": {"input": "ir/input.mlir", "optimized": "ir/optimized.mlir"},
            "tokenizer": tokenizer,
        })


def unicode_text(name: str) -> str:
    """A file name as text JSON can hold: the bytes of a name that is not UTF-8 (which Python keeps
    as lone surrogates, and json.dumps's output cannot be encoded with) as U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def _effort(w) -> int:
    """About what writing weight entry `w` costs, in bytes written, for the progress lines: its
    bytes, or for the codes of a weight GPTQ quantizes, its O(n k^2) run (about a third of a
    nanosecond per n k^2 in NumPy, a byte's write a nanosecond; the other parts come from the
    same run)."""
    e = w.expr
    if e[0] == "quantize" and e[3] is not None:
        k = w.shape[1] * 8 // e[2].bits if e[4] == "codes" else 0
        return w.shape[0] * k * k // 3
    return w.nbytes


def _count(n: int, noun: str) -> str:
    """'1 window', '3 windows'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
