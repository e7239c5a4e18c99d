"""The optimization pipeline, read top to bottom, in named phases.

`--passes` replaces the phases with the user's own textual pipeline; the target's required
lowering (`required()`) always runs after it and is a no-op where it has already happened.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from dataclasses import dataclass, field
import re
from collections.abc import Callable
from typing import TextIO

import numpy as np
from xdsl.context import Context
from xdsl.dialects import builtin, func
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass, PassPipeline
from xdsl.printer import Printer
from xdsl.utils.arg_spec import PipelineLexer, SpecTokenKind
from xdsl.utils.exceptions import ArgSpecParseError, VerifyException

from llmirc.dialect import LLMIR
from llmirc.errors import UsageError, stage

from . import PASSES

PHASES: list[tuple[str, str]] = [
    # Phase 1: clean up what the front end emitted.
    ("cleanup", "canonicalize,cse"),
    # Phase 2: LLM-specific rewrites on the high-level graph.
    ("llm-fusion", "prune-logits,cse,fuse-linears,fuse-residual-add"),
    # Phase 3: the paged KV cache: full-sequence attention becomes incremental.
    ("kv-cache", "paged-kv{{block-size={block_size}}}"),
    # Phase 4: tidy up before code generation.
    ("finalize", "canonicalize,cse,dce"),
]
DEFAULT_BLOCK_SIZE = 16


def required(dtype: str = "auto", kv_cache_dtype: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE,
             quantize: str = "") -> str:
    """What every target needs before code generation: weights quantized as asked (`quantize`: a
    quantize-weights pass spec, from `--quant`) and the others in the requested type, the ABI's
    logits rows and the paged KV cache of the requested type and block (`--dtype`,
    `--kv-cache-dtype`, `--block-size`; a paged-kv that already ran decides the block). Then
    fuse-rope-kv-append, an optimization every target implements, which must see the pool's
    type (it leaves quantized pools alone)."""
    return (f"{quantize + ',' if quantize else ''}cast-weights{{dtype={dtype}}},prune-logits,"
            f"paged-kv{{block-size={block_size}}},"
            f"kv-cache-dtype{{dtype={kv_cache_dtype} weights={dtype}}},fuse-rope-kv-append,dce")


def default_pipeline(block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    return ",".join(spec.format(block_size=block_size) for _, spec in PHASES)


@dataclass
class LlmirContext(Context):
    """xDSL's context plus access to the model's weights, for passes that fold or check values
    (the ONNX fusions evaluate s-only subgraphs and add synthesized weights)."""

    read_weight: Callable[[str], np.ndarray] | None = None
    add_weight: Callable[[str, np.ndarray], None] | None = None
    report: Counter = field(default_factory=Counter)  # rewrites done, see passes/report.py
    calibration: object | None = None  # llmirc.calibration.Calibration: Hessians for quantize-weights' GPTQ
    tied_storage: tuple[str, str] | None = None  # quantize-weights: (table, head) storages of a tied pair stored twice


def make_context(read_weight=None, add_weight=None) -> LlmirContext:
    ctx = LlmirContext(read_weight=read_weight, add_weight=add_weight)
    for dialect in (builtin.Builtin, func.Func, LLMIR):
        ctx.load_dialect(dialect)
    return ctx


def print_ir(module: ModuleOp, generic: bool = True) -> str:
    out = io.StringIO()
    Printer(stream=out, print_generic_format=generic).print_op(module)
    return out.getvalue() + "\n"


def parse_passes(spec: str) -> list[ModulePass]:
    """The passes of a --passes pipeline, their options checked. Raises UsageError naming --passes."""
    from .paged_kv import PagedKV, block_size_problem

    try:
        passes = list(PassPipeline.parse_spec(PASSES, spec).passes)
    except ArgSpecParseError as e:  # a BaseException in xDSL: bad syntax, with the column in its text
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        where = re.search(r":\d+:(\d+)$", lines[1]) if len(lines) > 1 else None
        raise UsageError(f"--passes {spec!r}: {'column ' + where[1] + ': ' if where else ''}{lines[-1]}") from None
    except Exception as e:  # xDSL raises assorted errors for bad pass options
        if isinstance(e, ValueError) and "Unrecognized passes" in str(e):  # (the ONNX lowering's are not for --passes)
            available = sorted(n for n in PASSES if not n.startswith("onnx-"))
            unknown = [n for n in re.findall(r"'([^']*)'", str(e))] or [str(e)]
            raise UsageError(f"--passes {spec!r}: unknown pass{'es' * (len(unknown) > 1)} {', '.join(unknown)} "
                             f"(available: {', '.join(available)})") from None
        raise UsageError(f"--passes {spec!r}: {_option_error(str(e).splitlines()[0])}") from None
    if repeated := _repeated_option(spec):
        raise UsageError(f"--passes {spec!r}: {repeated[0]} takes {repeated[1]} once, given twice here (a list "
                         "is one option, comma-separated: keep=embedding,lm_head)")
    for p in passes:  # (before the checkpoint is read)
        if isinstance(p, PagedKV) and (why := block_size_problem(p.block_size)):
            raise UsageError(f"--passes {spec!r}: paged-kv block-size {p.block_size}: {why}")
    return passes


def _repeated_option(spec: str) -> tuple[str, str] | None:
    """(pass, option) of an option given twice in one pass's braces of `spec` (a pipeline xDSL parsed),
    which xDSL would take the last of, silently; None if there is none."""
    lexer = PipelineLexer(spec)
    name, keys, before = "", None, None
    while (token := lexer.lex()).kind is not SpecTokenKind.EOF:
        if token.kind is SpecTokenKind.L_BRACE:
            keys = set()
        elif token.kind is SpecTokenKind.R_BRACE:
            keys = None
        elif token.kind is SpecTokenKind.IDENT and keys is None:
            name = token.span.text
        elif token.kind is SpecTokenKind.IDENT and before in (SpecTokenKind.L_BRACE, SpecTokenKind.SPACE):
            key = token.span.text.replace("_", "-")  # (xDSL reads block_size as block-size)
            if key in keys:
                return name, key
            keys.add(key)
        before = token.kind
    return None


_KINDS = {"int": "an integer", "float": "a number with a decimal point (as 0.5 or 2.0)", "str": "a string",
          "bool": "true or false"}


def _option_error(text: str) -> str:
    """xDSL's message for a bad pass option, in the pipeline's own words."""
    if m := re.fullmatch(r"Incompatible types: given \((.*?),?\), expected <class '(\w+)'>", text):
        return f"an option takes {_KINDS.get(m[2], m[2])}, got {m[1]}"
    if m := re.fullmatch(r"Provided arguments \[(.*)\] not found in expected arguments \[(.*)\]", text):
        return (f"unknown option {m[1].replace('_', '-')} (the pass takes "
                f"{m[2].replace('_', '-') if m[2] else 'no options'})")
    return text


def _failing_op(e: VerifyException) -> str | None:
    """The op a verifier failed on, from the module xDSL prints into the exception's notes with the
    failing op underlined: its results, name, operands and types (`%6 = "llmir.rms_norm"(%4, %3) :
    (tensor<?x64xf32>, tensor<384x64xf32>) -> tensor<?x64xf32>`), without its properties."""
    for text in getattr(e, "__notes__", ()):
        lines = text.splitlines()
        for above, line in zip(lines, lines[1:]):
            if re.fullmatch(r"\s*\^+-*", line):
                op = above.strip()
                head = op[:op.index(")") + 1] if ")" in op else op
                types = op.rfind(" : (")
                return head + (op[types:] if types > len(head) else "")
    return None


@dataclass(frozen=True)
class IRPrinting:
    """Which IR dumps run_passes writes, as mlir-opt's --mlir-print-ir-* options choose them: before
    and after the passes named (or every pass: `before_all`, `after_all`), after only where the pass
    changed the IR (`after_change`, with after or after_all), and the IR as a failing pass left it
    (`after_failure`). Each dump is headed `// -----// IR Dump After NAME //----- //` (Before, and
    `After NAME Failed`), the pass's --passes name, as mlir-opt heads them."""

    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()
    before_all: bool = False
    after_all: bool = False
    after_change: bool = False
    after_failure: bool = False

    def check(self) -> None:
        """UsageError for a pass name no pass has (the option named as the CLI spells it)."""
        for option, names in (("--print-ir-before", self.before), ("--print-ir-after", self.after)):
            if unknown := sorted(n for n in names if n not in PASSES):
                raise UsageError(f"{option} {','.join(unknown)}: no such pass (available: "
                                 f"{', '.join(sorted(PASSES))})")

    def prints_before(self, name: str) -> bool:
        return self.before_all or name in self.before

    def prints_after(self, name: str) -> bool:
        return self.after_all or name in self.after


def run_passes(module: ModuleOp, spec: str | None = None, *, printing: IRPrinting | None = None,
               print_to: TextIO | None = None, on_pass: Callable[[str], None] | None = None,
               ctx: LlmirContext | None = None, prefix: str = "", tail: str | None = None,
               block_size: int = DEFAULT_BLOCK_SIZE) -> list[str]:
    """Runs `prefix` (a front end's lowering, then `smooth` when --quant-smooth asks: it needs the
    linears unfused), the user's (or default) pipeline, then `tail`
    (default: `required()`); verifies after every pass.

    `printing`: the IR dumps to write to `print_to` (default: stderr). `block_size`: the KV cache
    block of the default pipeline and of the default tail's paged-kv (a user pipeline's own
    paged-kv, when it has one, runs first and decides). Returns the names of the passes that
    ran, in order."""
    ctx = ctx or make_context()
    passes = (parse_passes(prefix) if prefix else []) + \
        parse_passes(spec if spec is not None else default_pipeline(block_size)) + \
        parse_passes(tail or required(block_size=block_size))
    show = printing or IRPrinting()
    out = print_to or sys.stderr

    def dump(when: str, name: str, text: str | None = None) -> None:
        out.write(f"// -----// IR Dump {when} {name} //----- //\n")
        out.write(text if text is not None else print_ir(module))

    ran = []
    for p in passes:
        if on_pass:
            on_pass(p.name)
        if show.prints_before(p.name):
            dump("Before", p.name)
        before = print_ir(module) if show.after_change and show.prints_after(p.name) else None
        with stage(f"pass {p.name}"):
            try:
                p.apply(ctx, module)
                module.verify()
            except Exception as e:
                if show.after_failure:
                    try:
                        dump("After", f"{p.name} Failed")
                    except Exception:  # noqa: BLE001 (IR too broken to print: the pass's error is what counts)
                        out.write("(the IR cannot be printed)\n")
                if not isinstance(e, VerifyException):
                    raise
                where = _failing_op(e)
                raise AssertionError(f"IR does not verify after pass {p.name}: {e}"
                                     + (f", at {where}" if where else "")) from e
        ran.append(p.name)
        if show.prints_after(p.name):
            after = print_ir(module)
            if before is None or after != before:
                dump("After", p.name, after)
    return ran



