"""The `llmirc` command line: compile, run, chat, serve, inspect, bench, eval-ppl.

Exit codes: 0 success; 1 a user error (bad checkpoint, bundle, request, or an option that does
not fit them) or the machine's (no space left, permission denied: the files named): one line
`error: ...`; 2 a command-line usage error (click's, and an option wrong whatever the input:
errors.UsageError); 3 an internal error, a bug in llmirc (one line `internal
error in <stage>: ...; please report`, the traceback with `--debug` or LLMIRC_DEBUG=1); 130
interrupted, 143 terminated, 129 hung up. Never a traceback otherwise. `compile` needs the compiler
extra, `serve` the serve extra; the other commands need only the loader. Where a
vLLM flag means the same thing, the same name is used (--max-model-len, --block-size,
--kv-cache-dtype, --max-num-seqs, ...), so a vLLM command line carries over.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import time
import traceback
from pathlib import Path

import click

from llmirc import __version__, dtypes
from llmirc.errors import LlmircError, UsageError, internal_stage
from llmirc.small_files import parse_json

INTERNAL_ERROR = 3  # exit code of a bug in llmirc (user errors: 1, usage errors: 2)
SHUTDOWN_GRACE_S = 5  # `serve`: how long Ctrl-C waits for running requests before aborting them
_debug = os.environ.get("LLMIRC_DEBUG", "") not in ("", "0")
_command = "llmirc"  # the subcommand running, for internal errors with no known stage


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan compares false with any bound, so
    FloatRange lets it through to fail later as an input error, exit 1)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class PathArg(click.Path):
    """click.Path that refuses an empty value, which pathlib would read as the current folder."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path.", param, ctx)
        return super().convert(value, param, ctx)


def _threads_option(help: str):
    """--threads N (N >= 1), with a warning on stderr when N is more than the CPUs this process may use:
    the threads then take turns on the cores, and decode runs slower than with one per core."""
    def warn_oversubscribed(ctx, param, value):
        from llmirc.targets.workers import usable_cpus

        if value is not None and value > (cpus := usable_cpus()):
            click.echo(f"warning: --threads {value} is more than the {cpus} CPUs this process may use: threads "
                       "will share cores (slower than one per core)", err=True)
        return value
    return click.option("--threads", type=click.IntRange(min=1), default=None, callback=warn_oversubscribed,
                        help=help)


def _not_empty(ctx, param, value, blank_is_empty: bool = True):
    """click callback: an option (each value of a repeatable one) must not be given as '' (an unset
    shell variable, `--host "$HOST"`): an empty --host would listen on every interface and an empty
    --api-key turn authentication off. With `blank_is_empty` False (`_no_empty_stop`) only '' is: whitespace
    is a stop string as any other (`--stop $'\\n'`, the Python API's stop="\\n")."""
    for v in value if isinstance(value, tuple) else (value,):
        if v is not None and not (v.strip() if blank_is_empty else v):
            raise click.BadParameter("empty (an unset shell variable?); leave the option out for its default",
                                     param=param)
    return value


def _no_empty_stop(ctx, param, value):
    return _not_empty(ctx, param, value, blank_is_empty=False)


# click >= 8.2 raises this (a UsageError whose message is the whole help) for a bare `llmirc`.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmirc")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error (also: LLMIRC_DEBUG=1).")
def cli(debug: bool) -> None:
    """llmirc: ahead-of-time compiler for LLM inference.

    Compile a checkpoint (Hugging Face safetensors, ONNX or GGUF) into a portable bundle of
    compiled kernels, weights and a manifest, then run, serve, inspect or benchmark the bundle
    with the thin loader.

    Exit codes: 0 success; 1 an error in the input or of the machine (one line
    `error: ...` on stderr); 2 a command-line usage error; 3 an internal error
    (a bug in llmirc: please report); 130 interrupted (SIGINT; `serve` stops
    on it and exits 0), 143 terminated (SIGTERM), 129 hung up (SIGHUP).
    Results go to stdout, progress, notes and errors to stderr.
    """
    global _debug, _command
    _debug = _debug or debug
    ctx = click.get_current_context()  # (its path is how llmirc was started: "llmirc", "python -m llmirc")
    _command = f"{ctx.command_path} {ctx.invoked_subcommand}"


@cli.command("compile")
@click.argument("model", type=PathArg())
@click.option("--target", default="cpu", show_default=True,
              help="Targets to compile for, comma-separated: cpu, cuda, hip (one bundle, weights stored once).")
@click.option("-o", "--output", type=PathArg(),
              help="Bundle directory to write (OUT.llmir); required unless --emit prints a stage.")
@click.option("--passes", default=None, help="Textual pass pipeline replacing the default, e.g. "
              "'canonicalize,cse,fuse-linears,paged-kv{block-size=32}'. Whatever it says, the weights' "
              "quantization and type, prune-logits, paged-kv, kv-cache-dtype, fuse-rope-kv-append and dce run "
              "at the end (as its own paged-kv, kv-cache-dtype... say); a pass here and the flag doing its job "
              "(--quant, --dtype, --kv-cache-dtype, --block-size, --quant-smooth) cannot go together.")
@click.option("--print-ir-after-all", is_flag=True, help="Print the IR after every pass (stderr; mlir-opt's "
              "--mlir-print-ir-* options, as the next five).")
@click.option("--print-ir-before-all", is_flag=True, help="Print the IR before every pass.")
@click.option("--print-ir-after", "print_ir_after", multiple=True, metavar="PASSES",
              help="Print the IR after the passes named (comma-separated --passes names; repeatable).")
@click.option("--print-ir-before", "print_ir_before", multiple=True, metavar="PASSES",
              help="Print the IR before the passes named.")
@click.option("--print-ir-after-change", is_flag=True,
              help="With --print-ir-after(-all): only where the pass changed the IR.")
@click.option("--print-ir-after-failure", is_flag=True, help="Print the IR as a failing pass left it.")
@click.option("--emit", default=None, metavar="STAGE",
              help="Print a stage to stdout: the optimized IR (mlir), or a target's text stage (cpu: llvm-ir, asm; "
                   "cuda: ttir, ttgir, llir, ptx; hip: ttir, ttgir, llir, amdgcn). The binary stages (obj, so, "
                   "cubin, hsaco) go into the bundle, not to stdout (obj with --keep-intermediates).")
@click.option("--keep-intermediates", is_flag=True, help="Also store every stage in the bundle (cpu: LLVM IR, "
              "assembly, objects; cuda/hip: ttir, ttgir, llir, ptx/amdgcn).")
@click.option("--arch", default=None, metavar="ARCHS",
              help="GPU architectures, comma-separated: sm_80, sm_90 (cuda), gfx90a, gfx942 (hip). Default: "
                   "sm_80,sm_90 (sm_80's PTX kept for newer GPUs) and gfx90a,gfx942.")
@click.option("--cpu-variants", default="native,baseline", show_default=True,
              help="CPU libraries to build: native (this host's CPU), baseline (x86-64-v2 / generic aarch64), "
                   "x86-64-v3, x86-64-v4, aarch64-generic, aarch64-dotprod (the aarch64 ones from any host, with "
                   "the cross compiler aarch64-linux-gnu-gcc).")
@click.option("--dtype", default="auto", show_default=True,
              help="Storage type of linear and embedding weights: auto (the checkpoint's), float32, bfloat16, "
                   "float16. Norm weights and biases are float32; compute is float32.")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              help="Paged KV cache type: auto (bfloat16/float16 when the weights are, or were before --quant; "
                   "float16 when linears are quantized, by --quant or by the checkpoint as GGUF/GPTQ/AWQ files are, "
                   "and none is in bfloat16/float16; else float32), "
                   "float32, bfloat16, float16, int8 (a scale per block, kv head and K/V), "
                   "fp8 (the same with FP8 E4M3 codes; cuda sm_90 only).")
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Quantize linear weights: int8 (per output row unless --quant-group-size), int4 (groups of 32 "
                   "unless --quant-group-size); activations are quantized to int8 on the fly.")
@click.option("--quant-group-size", type=int, default=0, show_default=True,
              help="Weights per scale along the input dimension: 16..512, a power of two (0: the scheme's default); "
                   "halved for a weight whose input size it does not divide.")
@click.option("--quant-zero-points", is_flag=True, help="Asymmetric quantization: a uint8 zero point per group.")
@click.option("--quant-keep", multiple=True, default=["embedding"], show_default=True,
              help="What stays in higher precision: embedding, lm_head and/or glob patterns over checkpoint tensor "
                   "names, comma-separated or in repeated --quant-keep (in that order), the first naming a weight "
                   "deciding ('none' alone: quantize everything); float, or 8 bits per output row for an item "
                   "ending in =int8 "
                   "('embedding,*.down_proj.*=int8'). An LM head not kept is stored as "
                   "--quant-lm-head says, and so is the embedding table it is tied to (one copy, as llama.cpp "
                   "stores a tied token_embd); 'embedding=float' keeps such a table, and its head, in float.")
@click.option("--quant-lm-head", type=click.Choice(["auto", "int8", "int6", "int4"]), default="auto",
              show_default=True,
              help="An LM head not kept: int8, one scale per output row; int6 in groups of 32 (the size of "
                   "llama.cpp's Q6_K); int4 in --quant-group-size groups (as onnxruntime-genai's int4 models); "
                   "auto: int6 with --quant int4, int8 with --quant int8 (as llama.cpp stores the output matrix "
                   "of its Q4 and Q8_0 files; a head tied to its embedding table, and the table, in 8-bit groups "
                   "of 32 with --quant int8, as Q8_0). The smaller, the faster a decode step, at a quality cost.")
@click.option("--quant-method", type=click.Choice(["rtn", "gptq", "autoround"]), default="rtn", show_default=True,
              help="rtn: round to nearest. gptq: GPTQ (Frantar et al. 2023), each linear's rounding error "
                   "compensated with the Hessian of its inputs on --calibration text; slower to compile, "
                   "better quality at 4 bits. autoround: GPTQ's codes, then each code's rounding learned by "
                   "signed gradient descent on its decoder layer's output error (AutoRound, Cheng et al. 2023); "
                   "the best quality, about 10x GPTQ's compile time (--quant-iters steps per layer).")
@click.option("--quant-iters", type=click.IntRange(min=0), default=200, show_default=True,
              help="--quant-method autoround: signed-gradient steps per decoder layer, each on about 1024 "
                   "calibration tokens (0: GPTQ with Hessians from the quantized layers).")
@click.option("--quant-rotate/--no-quant-rotate", default=None,
              help="Rotate the input of each MLP's down projection by a block Hadamard transform (QuaRot's online "
                   "Hadamard: one more small kernel per layer), its weight rotated to match, before quantizing. "
                   "Default: on for --quant int4 --quant-method gptq or autoround (on SmolLM2-135M it took int4-g128's "
                   "perplexity cost from +9.1% to +6.9%, with zero points from +8.2% to +5.5%), off otherwise "
                   "(round to nearest got worse).")
@click.option("--quant-smooth", type=FiniteRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="ALPHA", help="SmoothQuant (Xiao et al. 2023) before quantizing: each linear input's outlier "
              "channels shrunk by (max|x|^ALPHA / max|w|^(1-ALPHA)) relative to the median channel, the weights "
              "scaled to match, so int8 activations lose less. Needs --calibration; 0.5 is usual.")
@click.option("--calibration", type=PathArg(), default=None, metavar="FILE",
              help="UTF-8 text for --quant-method gptq or autoround and --quant-smooth, tokenized with the checkpoint's tokenizer (use text other "
                   "than what you evaluate on).")
@click.option("--calibration-tokens", type=click.IntRange(min=16), default=8192, show_default=True,
              help="At most this many tokens of --calibration, in windows of up to 512.")
@click.option("--report", is_flag=True, help="Print what the passes fused or rewrote, and how often.")
@click.option("--dequantize", is_flag=True, help="Expand quantized tensors (GGUF Q8_0, Q4_K, ...) to float32; "
              "without it matrices are kept quantized (a quantized bias or norm is refused), and formats "
              "llmirc has no layout for (IQ1-IQ3, TQ1_0/TQ2_0, MXFP4) are refused.")
@click.option("--block-size", type=int, default=None,
              help="Tokens per paged KV cache block (a power of two up to 256; default 16), as vLLM's --block-size.")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="The bundle's context in tokens (default: what the model states; refused above what its "
                   "config or position tables support).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Kernels compiled at once, in processes (default and most: the CPUs this process may use). "
                   "Compiled kernels are cached in $LLMIRC_CACHE_DIR (default $XDG_CACHE_HOME/llmirc, "
                   "~/.cache/llmirc).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output (notes and warnings still show).")
def compile_cmd(model, target, output, passes, print_ir_after_all, print_ir_before_all, print_ir_after,
                print_ir_before, print_ir_after_change, print_ir_after_failure, emit, keep_intermediates, arch,
                cpu_variants, dtype, kv_cache_dtype, quant, quant_group_size, quant_zero_points, quant_keep,
                quant_lm_head, quant_method, quant_iters, quant_rotate, quant_smooth, calibration, calibration_tokens,
                report, dequantize, block_size, max_model_len, jobs, quiet):
    """Compile MODEL (a Hugging Face checkpoint directory, an .onnx file, a .gguf file, or a repository id
    ORG/NAME in the Hugging Face hub's cache: nothing is downloaded) into a bundle.

    An existing bundle at -o is replaced whole (files added to its folder go with it). Compiling
    a checkpoint again on one machine gives the same bundle, byte for byte, but for
    manifest.json's created_utc and a GPU target's compile_seconds (with SOURCE_DATE_EPOCH set,
    those too: the time is that, and compile_seconds is left out)."""
    from llmirc.artifact_format.writer import created_utc

    created_utc()  # a malformed SOURCE_DATE_EPOCH, before importing scipy (numpy's f2py reads it, and fails)
    try:
        from llmirc.driver import CompileOptions, Progress, compile_model
    except ImportError as e:
        _fail(f"the compiler is not installed ({e.name} missing): pip install 'llmirc[compiler]'")
    for given in quant_keep:  # (repeated, as llama-quantize's --tensor-type: each adds its items, in order)
        if not given.replace(",", "").strip():
            raise UsageError(f"--quant-keep {given!r}: nothing named (none alone quantizes everything)")
    quant_keep = ",".join(quant_keep)
    _warn_unused_quant_options(quant, quant_keep)
    if quant_method != "autoround" and _given("quant_iters"):
        click.echo("warning: --quant-iters has no effect without --quant-method autoround", err=True)
    if quant_method == "rtn" and quant_smooth is None and _given("calibration_tokens"):
        click.echo("warning: --calibration-tokens has no effect without --quant-method gptq|autoround or "
                   "--quant-smooth", err=True)
    from llmirc.small_files import is_gguf

    if dequantize and not is_gguf(model):
        click.echo("warning: --dequantize has no effect: it expands a GGUF file's quantized blocks", err=True)
    variants = tuple(v.strip() for v in cpu_variants.split(",") if v.strip())
    targets = tuple(t.strip() for t in target.split(",") if t.strip())
    archs = tuple(a.strip() for a in (arch or "").split(",") if a.strip())
    if arch is not None and not archs:  # (an unset shell variable: the defaults were taken silently)
        raise UsageError(f"--arch {arch!r}: no architecture named")
    if "cpu" not in targets and _given("cpu_variants"):
        click.echo("warning: --cpu-variants has no effect without --target cpu: the bundle has no CPU library",
                   err=True)
    if keep_intermediates and output is None:
        click.echo("warning: --keep-intermediates has no effect without -o: no bundle is written", err=True)
    from llmirc.passes.pipeline import IRPrinting

    names = lambda given: frozenset(n.strip() for g in given for n in g.split(",") if n.strip())  # noqa: E731
    printing = IRPrinting(before=names(print_ir_before), after=names(print_ir_after), before_all=print_ir_before_all,
                          after_all=print_ir_after_all, after_change=print_ir_after_change,
                          after_failure=print_ir_after_failure)
    if print_ir_after_change and not (print_ir_after_all or printing.after):
        click.echo("warning: --print-ir-after-change has no effect without --print-ir-after or --print-ir-after-all",
                   err=True)
    options = CompileOptions(targets=targets, passes=passes, print_ir=printing, emit=emit,
                             keep_intermediates=keep_intermediates, cpu_variants=variants, report=report, archs=archs,
                             dtype=dtype, kv_cache_dtype=kv_cache_dtype, quant=quant, quant_group_size=quant_group_size,
                             quant_symmetric=not quant_zero_points,
                             quant_keep=tuple(k.strip() for k in quant_keep.split(",") if k.strip()),
                             quant_lm_head=quant_lm_head, quant_method=quant_method, quant_iters=quant_iters,
                             quant_rotate=quant_rotate,
                             quant_smooth=quant_smooth,
                             calibration=calibration,
                             calibration_tokens=calibration_tokens, dequantize=dequantize, block_size=block_size,
                             max_model_len=max_model_len, jobs=jobs)
    compile_model(model, output, options, Progress(None if quiet else sys.stderr, notes=sys.stderr))


def listen(host: str, port: int) -> socket.socket:
    """serve's listening socket. Made here, not in uvicorn: an address in use is the user's error (an
    LlmircError), and uvicorn's startup failure exits 3, llmirc's code for an internal error. Without Nagle's
    delay (TCP_NODELAY, which Linux's accepted sockets inherit): a response's headers and body are two
    writes, and with it the body waited for the client's delayed ACK, 40 ms, on every request after a
    connection's first (asyncio disables Nagle only on sockets made with proto IPPROTO_TCP, not
    socket.create_server's, proto 0)."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise LlmircError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _origins(value: str | None) -> tuple[str, ...]:
    """--allowed-origins as a tuple: comma-separated, or a JSON list of strings (vLLM's form)."""
    if value is None:
        return ()
    shown = value if len(value) <= 80 else f"{value[:60]}... ({len(value)} characters)"
    if value.lstrip().startswith("["):
        try:
            origins = parse_json(value)
        except ValueError as e:
            raise UsageError(f"--allowed-origins {shown}: not a JSON list ({e})") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise UsageError(f"--allowed-origins {shown}: the list must hold strings")
    else:
        origins = value.split(",")
    origins = tuple(o.strip() for o in origins if o.strip())
    if not origins:
        raise UsageError(f"--allowed-origins {value!r}: no origin named")
    for origin in origins:  # what a browser sends in Origin: scheme://host[:port], nothing after
        if origin != "*" and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#\"']+", origin):
            raise UsageError(f"--allowed-origins: {origin!r} is not an origin (scheme://host[:port] without a "
                             "path, as browsers send it, e.g. https://app.example; or *)")
    return origins


def _given(name: str) -> bool:
    """Whether the current command's option `name` (its parameter name) was on the command line."""
    return click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def _warn_unused_quant_options(quant: str, quant_keep: str) -> None:
    """A warning for --quant-* options given where they change nothing (as --top-k at temperature 0)."""
    given = [f"--{name.replace('_', '-')}" for name in ("quant_group_size", "quant_zero_points", "quant_keep",
                                                         "quant_lm_head", "quant_rotate") if _given(name)]
    rotate = click.get_current_context().params["quant_rotate"]
    given = [g if g != "--quant-rotate" or rotate else "--no-quant-rotate" for g in given]
    if quant == "none" and given:
        click.echo(f"warning: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                   "--quant int8|int4", err=True)
    keep = {k.strip().partition("=")[0] for k in quant_keep.split(",")}
    if quant != "none" and "--quant-lm-head" in given and "lm_head" in keep and "none" not in keep:
        click.echo("warning: --quant-lm-head has no effect: --quant-keep lm_head decides how the LM head is kept", err=True)


def _target_option(fn):
    return click.option("--target", default=None,
                        help="Run this target of the bundle: a name `llmirc inspect` lists (cpu-x86_64-v2, ...) "
                             "or the best of a kind (cpu, cuda, hip); default: the best this host runs.")(fn)


def _template_kwargs(text: str | None, flag: str = "--chat-template-kwargs") -> dict:
    """A JSON object of the chat template's variables (vLLM's chat_template_kwargs)."""
    if text is None:
        return {}
    try:
        kwargs = parse_json(text)
    except ValueError as e:
        raise UsageError(f"{flag}: not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"{flag}: expected a JSON object, e.g. '{{\"enable_thinking\": false}}', got {text!r}")
    if "tokenize" in kwargs:  # Model.apply_chat_template's own argument (False: text, not ids)
        raise UsageError(f"{flag}: tokenize is not a template variable")
    return kwargs


_chat_template_kwargs_option = click.option(
    "--chat-template-kwargs", "template_kwargs", default=None, metavar="JSON",
    help="Variables for the chat template, a JSON object (vLLM's chat_template_kwargs), e.g. "
         "'{\"enable_thinking\": false}' for Qwen3's non-thinking mode.")


def _sampling_options(fn, max_new_tokens: click.Option | None = None):
    """The sampling options run and chat share (transformers' semantics; 0 is greedy)."""
    for option in reversed([
        max_new_tokens or click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
                                       help="Tokens generated per sequence at most (fewer at end-of-sequence or "
                                            "--stop); a prompt whose tokens and these would pass the model's "
                                            "context is refused."),
        click.option("--temperature", type=FiniteRange(min=0.0), default=0.0, show_default=True,
                     help="0 is greedy decoding."),
        click.option("--top-k", type=click.IntRange(min=1), default=None,
                     help="Sample from the K most likely tokens only (default: all; with --temperature > 0)."),
        click.option("--top-p", type=FiniteRange(min=0.0, max=1.0, min_open=True), default=None,
                     help="Sample from the smallest set of tokens whose probability reaches P (nucleus sampling; "
                          "default: 1, all; with --temperature > 0)."),
        click.option("--min-p", type=FiniteRange(min=0.0, max=1.0), default=0.0,
                     help="Sample only tokens at least P times as likely as the most likely one (default: 0, "
                          "all; with --temperature > 0)."),
        click.option("--repetition-penalty", type=FiniteRange(min=0.0, min_open=True), default=1.0,
                     help="Divide positive logits (multiply negative ones) of tokens already in the prompt or "
                          "the output by this (1: none; as transformers' and vLLM's, greedy decoding too)."),
        click.option("--presence-penalty", type=FiniteRange(min=-2.0, max=2.0), default=0.0,
                     help="Subtract this from the logits of tokens the output already holds (OpenAI's; 0: none)."),
        click.option("--frequency-penalty", type=FiniteRange(min=-2.0, max=2.0), default=0.0,
                     help="Subtract this times its count in the output from a token's logit (OpenAI's; 0: none)."),
        click.option("--seed", type=click.IntRange(min=0), default=None,
                     help="Seed for sampling (reproducible output)."),
        click.option("--stop", "stops", multiple=True, callback=_no_empty_stop,
                     help="Stop at this text (repeatable); it is left out."),
        click.option("--kv-cache-tokens", type=click.IntRange(min=1), default=None,
                     help="KV cache size in tokens (default: the model's context, at most 16384)."),
        click.option("--no-verify", is_flag=True, help="Skip checksum verification (by default it runs once per "
                                                       "unchanged bundle and is remembered); a damaged kernel "
                                                       "library may then crash the process."),
        _threads_option("CPU threads (default: the CPUs this process may use)."),
        _target_option,
    ]):
        fn = option(fn)
    return fn


def _load(bundle, kv_cache_tokens, no_verify, **kwargs):
    from llmirc.runtime import load

    model = load(bundle, kv_cache_tokens=kv_cache_tokens, verify=not no_verify, **kwargs)
    for note in model.target_notes:  # GPU targets of the bundle this host cannot run, one line each
        click.echo(f"note: not using {note}", err=True)
    return model


def _warn_unused_sampling(temperature, top_k, top_p, seed, min_p) -> None:
    unused = [flag for flag, value in (("--top-k", top_k), ("--top-p", top_p), ("--seed", seed),
                                       ("--min-p", min_p or None)) if value is not None]
    if temperature == 0 and unused:
        click.echo(f"warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with "
                   "--temperature 0 (greedy decoding); give --temperature > 0 to sample", err=True)


@cli.command()
@click.argument("bundle", type=PathArg())
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text (repeat for a batch; '-' reads standard input); needs a tokenizer.")
@click.option("--prompt-file", "prompt_files", multiple=True, type=PathArg(),
              help="Read a prompt from this file (repeatable; '-' reads standard input).")
@click.option("--token-ids", "token_ids", multiple=True, help="Prompt as comma-separated token ids (repeatable).")
@click.option("--chat", is_flag=True, help="Each prompt is a user message, formatted with the bundle's chat template.")
@click.option("--system", default=None, help="A system message for --chat.")
@_chat_template_kwargs_option
@_sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None,
              help="With --json: each token's logprob and the N most likely tokens.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per sequence: tokens, text, finish_reason, timings (and logprobs).")
@click.option("--json-schema", default=None, metavar="SCHEMA",
              help="Hold the text to this JSON schema (llama.cpp's flag; whitespace between JSON's tokens allowed).")
@click.option("--json-schema-file", type=PathArg(), default=None, help="--json-schema read from this file.")
@click.option("--grammar", default=None, metavar="GRAMMAR",
              help="Hold the text to this grammar: EBNF as llama.cpp's GBNF (root ::= ...), or Lark (start: ...).")
@click.option("--grammar-file", type=PathArg(), default=None, help="--grammar read from this file (a .gbnf file).")
@click.option("--regex", default=None, help="Hold the text to this regular expression (the whole text matches it).")
@click.option("-q", "--quiet", is_flag=True, help="No tokens/s and time-to-first-token summary on stderr.")
def run(bundle, prompts, prompt_files, token_ids, chat, system, template_kwargs, max_new_tokens, temperature, top_k, top_p,
        min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stops, kv_cache_tokens, no_verify,
        threads, target, ignore_eos, logprobs, as_json, json_schema, json_schema_file, grammar, grammar_file, regex,
        quiet):
    """Generate text or tokens with a compiled BUNDLE.

    Without --json, a single prompt streams its text as it is generated; a batch prints each
    sequence under a label [i], i counting the --token-ids prompts first, then --prompt, then
    --prompt-file (each in the order given). A summary (tokens/s, time to first token) goes to stderr."""
    if [*prompts, *map(str, prompt_files), *(str(f) for f in (json_schema_file, grammar_file) if f)].count("-") > 1:
        raise UsageError("standard input ('-') can be read once: give '-' to one --prompt, --prompt-file, "
                         "--json-schema-file or --grammar-file")
    texts = [_read_prompt(p) for p in prompts] + \
        [_read_text(f, "--prompt-file").rstrip("\n") for f in prompt_files]
    if not texts and not token_ids:
        raise UsageError("give --prompt TEXT, --prompt-file PATH or --token-ids 1,2,3")
    if chat and token_ids:
        raise UsageError("--chat takes text prompts (--prompt, --prompt-file), not --token-ids")
    if system is not None and not chat:
        click.echo("warning: --system has no effect without --chat", err=True)
    if template_kwargs is not None and not chat:
        click.echo("warning: --chat-template-kwargs has no effect without --chat", err=True)
    template_kwargs = _template_kwargs(template_kwargs)
    _warn_unused_sampling(temperature, top_k, top_p, seed, min_p)
    if logprobs is not None and not as_json:
        click.echo("warning: --logprobs has no effect without --json (they are printed in its records)", err=True)
    structured = _structured_outputs(json_schema, json_schema_file, grammar, grammar_file, regex)
    model = _load(bundle, kv_cache_tokens, no_verify, threads=threads, target=target)
    batch = [_parse_ids(s) for s in token_ids]
    if stops and model.tokenizer is None:  # (the engine's error offers stop token ids, which run has no flag for)
        raise LlmircError(f"{bundle}: the bundle has no tokenizer, so no --stop strings (its checkpoint had no "
                          "tokenizer.json)")
    if texts:
        if model.tokenizer is None:
            raise LlmircError(f"{bundle}: the bundle has no tokenizer; use --token-ids")
        if chat:
            head = [{"role": "system", "content": system}] if system is not None else []
            batch += [model.apply_chat_template(head + [{"role": "user", "content": t}], **template_kwargs)
                      for t in texts]
        else:
            batch += [model.encode(t) for t in texts]
    stream = len(batch) == 1 and not as_json and model.tokenizer is not None
    records = [{"prompt_token_ids": p, "token_ids": [], "text": "", "logprobs": []} for p in batch]
    start = time.perf_counter()
    for out in model.generate_stream(batch, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos,
                                     stop=stops, logprobs=logprobs, min_p=min_p, repetition_penalty=repetition_penalty,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     structured_outputs=structured):
        r = records[out.request_id]
        if out.token is not None:
            r["token_ids"].append(out.token)
            r.setdefault("first_token_s", time.perf_counter() - start)
        if out.logprob is not None:
            r["logprobs"].append({"token": out.logprob.token, "logprob": out.logprob.logprob,
                                  "top": [list(t) for t in out.logprob.top]})
        r["text"] += out.text
        if stream and out.text:
            click.echo(out.text, nl=False)
        if out.finished:
            r.update(finish_reason=out.finish_reason, stop_reason=out.stop_reason, cached_tokens=out.cached_tokens,
                     total_s=time.perf_counter() - start)
    for i, r in enumerate(records):
        if as_json:
            n, total = len(r["token_ids"]), r["total_s"]
            record = {"index": i, "prompt_token_ids": r["prompt_token_ids"], "token_ids": r["token_ids"],
                      "finish_reason": r["finish_reason"], "stop_reason": r["stop_reason"],
                      "cached_tokens": r["cached_tokens"],
                      "timings": {"time_to_first_token_s": r.get("first_token_s"), "total_s": total,
                                  "tokens_per_s": n / total if total > 0 else None}}
            if model.tokenizer is not None:
                record["text"] = r["text"]
            if logprobs is not None:
                record["logprobs"] = r["logprobs"]
            click.echo(json.dumps(record))
        elif stream:
            click.echo()
        else:
            text = r["text"] if model.tokenizer is not None else " ".join(map(str, r["token_ids"]))
            click.echo(f"[{i}] {text}" if len(batch) > 1 else text)
    if not quiet:
        click.echo(_summary(records, time.perf_counter() - start, model.executor.target["name"]), err=True)


def _summary(records: list[dict], elapsed: float, target: str) -> str:
    generated = sum(len(r["token_ids"]) for r in records)
    prompt = sum(len(r["prompt_token_ids"]) for r in records)
    cached = sum(r.get("cached_tokens") or 0 for r in records)
    firsts = [r["first_token_s"] for r in records if "first_token_s" in r]
    ttft = f"; time to first token {1e3 * sum(firsts) / len(firsts):.0f} ms" + (" (mean)" if len(firsts) > 1 else "")
    return (f"{len(records)} sequence{'s' if len(records) > 1 else ''}: prompt {prompt} tokens"
            f"{f' ({cached} cached)' if cached else ''}, {generated} generated in {elapsed:.2f} s "
            f"({generated / elapsed if elapsed > 0 else 0:.1f} tok/s){ttft if firsts else ''}; target {target}")


def _read_prompt(text: str) -> str:
    """--prompt TEXT; '-' reads standard input (trailing newlines dropped, as $(...) does)."""
    return _read_text("-", "--prompt").rstrip("\n") if text == "-" else text


def _structured_outputs(json_schema, json_schema_file, grammar, grammar_file, regex) -> dict | None:
    """run's structured-output flags as Model.generate's structured_outputs (at most one of them)."""
    given = {flag: value for flag, value in (("--json-schema", json_schema), ("--json-schema-file", json_schema_file),
                                             ("--grammar", grammar), ("--grammar-file", grammar_file),
                                             ("--regex", regex)) if value is not None}
    if len(given) > 1:
        raise UsageError(f"give one of {', '.join(given)}")
    if not given:
        return None
    (flag, value), = given.items()
    where = flag
    if flag.endswith("-file"):
        where = f"{flag} {value}"
        value = _read_text(value, flag).removeprefix("\ufeff")  # (a byte order mark, as some editors write)
    kind = {"--json-schema": "json", "--grammar": "grammar", "--regex": "regex"}[flag.removesuffix("-file")]
    try:
        from llmirc.runtime import structured

        structured.grammar(kind, value)  # (its errors name the flag)
    except LlmircError as e:  # the flag's own value is wrong whatever the model: a usage error; a file's, its input
        raise (LlmircError if flag.endswith("-file") else UsageError)(f"{where}: {e}") from None
    return {kind: value}


def _read_text(path: Path | str, flag: str) -> str:
    """The text of file `path`, '-' standard input, read alike: UTF-8 whatever the locale, with
    universal newlines (as Path.read_text). Raises LlmircError naming `flag` and the path, also for
    a device or a folder (/dev/zero would be read until memory runs out); pipes are read."""
    try:
        if str(path) != "-" and not stat.S_ISREG(mode := os.stat(path).st_mode) and not stat.S_ISFIFO(mode):
            raise LlmircError(f"{flag} {path}: not a file or a pipe")
        if str(path) == "-" and sys.stdin is None:  # started with `<&-`
            raise LlmircError(f"{flag} -: standard input is closed")
        data = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise LlmircError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, ValueError, AttributeError) as e:  # stdin: closed, or not a byte stream
        raise LlmircError(f"{flag} {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


@cli.command()
@click.argument("bundle", type=PathArg())
@click.option("--system", default=None, help="A system message starting the conversation.")
@_chat_template_kwargs_option
@functools.partial(_sampling_options, max_new_tokens=click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=None,
    help="Cut a reply after this many tokens (default: when the model ends its turn, within the context)."))
def chat(bundle, system, template_kwargs, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
         presence_penalty, frequency_penalty, seed, stops, kv_cache_tokens, no_verify, threads, target):
    """Chat with BUNDLE in the terminal: each input line is a user message; replies stream.

    Uses the bundle's chat template. Earlier turns stay in the prefix cache, so each reply
    prefills only the new message. /reset starts over, /exit (or end of input) quits; Ctrl-C
    stops a reply (what it said stays in the conversation), at the prompt it quits (with input
    from a pipe or file, it always quits: exit 130). In a
    terminal, a reply cut by --max-new-tokens or the context says so. A turn past the context or
    KV cache, a line that is not UTF-8 or an unknown /command is an error line and the chat goes
    on; with input from a pipe or file, the command then exits 1 at the end. A --system message the
    template refuses, or that fills the context, is refused at start."""
    from llmirc.errors import RuntimeLimitError

    _warn_unused_sampling(temperature, top_k, top_p, seed, min_p)
    template_kwargs = _template_kwargs(template_kwargs)
    model = _load(bundle, kv_cache_tokens, no_verify, threads=threads, target=target)
    if model.tokenizer is None:
        raise LlmircError(f"{bundle}: the bundle has no tokenizer, so no chat (its checkpoint had no tokenizer.json)")
    if model.chat_template is None:
        raise LlmircError(f"{bundle}: the bundle has no chat template (its tokenizer_config.json has no "
                          "chat_template and there is no chat_template.jinja)")
    model.engine.start()  # steps on their own thread: Ctrl-C lands between them, on this one
    start = [{"role": "system", "content": system}] if system is not None else []
    room = min(model.max_context, model.num_blocks * model.block_size)  # one conversation's tokens at most
    if start:  # a template refusing system messages, or one too long, fails now, not at every turn
        if (used := len(model.apply_chat_template(start + [{"role": "user", "content": ""}], **template_kwargs))) \
                >= room:
            limit = f"model's context is {model.max_context}" if room == model.max_context else \
                f"KV cache holds {room} (--kv-cache-tokens)"
            raise LlmircError(f"--system: the system message takes {used} tokens in the chat template, and the "
                              f"{limit}")
    history = list(start)
    if sys.stdin is None:
        raise LlmircError("standard input is closed: chat reads the user's messages from it")
    interactive = sys.stdin.isatty()
    turn, failed = 0, False
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        data = sys.stdin.buffer.readline()
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            click.echo(f"error: the line is not UTF-8 text ({e.reason} at byte {e.start}); not sent", err=True)
            failed = True
            continue
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if re.fullmatch(r"/\w+", line.strip()):
            click.echo(f"error: unknown command {line.strip()} (/reset, /exit); not sent", err=True)
            failed = True
            continue
        if not line.strip():
            continue
        messages = history + [{"role": "user", "content": line.rstrip("\r\n")}]
        reply, stream = "", None
        try:
            prompt = model.apply_chat_template(messages, **template_kwargs)
            if max_new_tokens is None and len(prompt) >= room:  # no room left for a reply
                raise RuntimeLimitError(f"the chat is {len(prompt)} tokens with this message, and a reply needs "
                                        f"room after them: the model holds {room} (its context or KV cache)")
            budget = max_new_tokens or room - len(prompt)  # default: the rest of the context (or KV cache)
            stream = model.generate_stream([prompt], budget, temperature=temperature, top_k=top_k, top_p=top_p,
                                           seed=None if seed is None else seed + turn, stop=stops, min_p=min_p,
                                           repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                           frequency_penalty=frequency_penalty)
            for event in stream:
                reply += event.text or ""
                click.echo(event.text or "", nl=False)
                if event.finish_reason == "length" and interactive:
                    click.echo("\n[cut: " + ("the context is full]" if max_new_tokens is None else
                                              f"--max-new-tokens {max_new_tokens}]"), nl=False, err=True)
        except RuntimeLimitError as e:
            click.echo(f"error: {e} (" + ("the conversation is too long: /reset starts over)" if history != start
                                          else "the message is too long for the context or the KV cache)"), err=True)
            failed = True
            continue
        except LlmircError as e:  # the template refused the turn, a text too long to tokenize, ...
            click.echo(("\n" if reply else "") + f"error: {e} (the message is not kept)", err=True)
            failed = True
            continue
        except KeyboardInterrupt:
            if not interactive:
                raise
            if stream is not None:
                stream.close()  # aborts the request; its KV blocks are freed
            click.echo("\n[stopped]", nl=False, err=True)
        click.echo()
        history = messages + [{"role": "assistant", "content": reply}]
        turn += 1
    if failed and not interactive:  # a script's turn was lost
        sys.exit(1)


@cli.command()
@click.argument("bundle", type=PathArg())
@click.option("--host", default="127.0.0.1", show_default=True, callback=_not_empty,
              help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port to listen on (0: one the system picks, printed at start).")
@click.option("--served-model-name", default=None, help="The model name clients use (default: BUNDLE as given).")
@click.option("--api-key", default=None, envvar="LLMIRC_API_KEY", callback=_not_empty,
              help="Require 'Authorization: Bearer KEY' (also from $LLMIRC_API_KEY).")
@click.option("--allowed-origins", default=None, metavar="ORIGINS",
              help="Web origins whose pages may call the server (CORS), comma-separated or a JSON list as vLLM "
                   "takes it; '*' for any. Default: none (vLLM's is any: every page the user visits could "
                   "reach a local server).")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="The longest prompt + completion accepted (at most the bundle's context).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True,
              help="Sequences in one batch.")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens in one step; longer prompts are prefilled in chunks.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
              help="Share the KV blocks of common prompt prefixes across requests.")
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), default=None,
              help="KV cache size in tokens (default: the model's context, at most 16384).")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              help="auto, or the dtype the bundle was compiled with (`llmirc inspect` shows it).")
@click.option("--gpu-memory-utilization", type=FiniteRange(0.0, 1.0, min_open=True), default=None,
              help="The share of the GPU's memory, in (0, 1], the model may use: the KV cache takes what the "
                   "weights and buffers leave (vLLM's; default 0.9; --kv-cache-tokens sizes it instead). GPU "
                   "targets only (no effect on a CPU bundle).")
@_threads_option("CPU threads for the model (default: all cores this process may use).")
@_target_option
@click.option("--num-scheduler-steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Greedy decode steps run in one native call while every running request is greedy, without "
                   "logprobs, penalties or stop strings, and none waits (CPU targets); streamed tokens come in "
                   "bursts of up to this many. 1: one step at a time.")
@click.option("--max-queued-requests", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Requests that may wait beyond the running batch; more are answered 503.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=64 << 20, show_default=True,
              help="The largest request body accepted; a larger one is answered 413 before it is read whole.")
@click.option("--chat-template", default=None,
              help="A jinja chat template replacing the bundle's: a file, or the template itself (text with "
                   "'{' that names no file, as vLLM takes it).")
@click.option("--default-chat-template-kwargs", "template_kwargs", default=None, metavar="JSON",
              help="Chat template variables for every chat request, a JSON object, e.g. "
                   "'{\"enable_thinking\": false}'; a request's chat_template_kwargs override them (vLLM's flag).")
@click.option("--enable-auto-tool-choice", is_flag=True,
              help="Chat requests with tools may leave tool_choice at auto: the model chooses, and the calls in its "
                   "text are found by --tool-call-parser (vLLM's flags; named and required tool choices need "
                   "neither).")
@click.option("--tool-call-parser", type=click.Choice(["hermes", "llama3_json"]), default=None,
              help="The tool-call format of the model's family, for --enable-auto-tool-choice: hermes "
                   "(<tool_call>{...}</tool_call>: Qwen2.5, Qwen3, Hermes), llama3_json (a JSON object {name, "
                   "parameters}: Llama 3.1-3.3).")
@click.option("--reasoning-parser", type=click.Choice(["deepseek_r1", "qwen3"]), default=None,
              help="Answer a thinking model's <think>...</think> text as message.reasoning_content (and "
                   "reasoning), apart from its content (vLLM's flag): deepseek_r1 (DeepSeek-R1 and its "
                   "distills, QwQ), qwen3 (Qwen3).")
@click.option("--generation-config", "generation_config", type=click.Choice(["auto", "vllm"]), default="auto",
              show_default=True, help="auto: requests that leave temperature, top_p, top_k, min_p or "
                                      "repetition_penalty out get the model's generation_config.json values, and "
                                      "chat requests without max_tokens its max_new_tokens (vLLM's and SGLang's "
                                      "default); vllm: the APIs' own defaults (temperature 1, no top-p, top-k, "
                                      "min-p or penalty)")
@click.option("--no-verify", is_flag=True,
              help="Skip checksum verification (a damaged kernel library may then crash the process).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log messages at this level and above (stderr).")
def serve(bundle, host, port, served_model_name, api_key, allowed_origins, max_model_len, max_num_seqs,
          max_num_batched_tokens, enable_prefix_caching, kv_cache_tokens, kv_cache_dtype, gpu_memory_utilization,
          threads, target, num_scheduler_steps, max_queued_requests, max_body_bytes, chat_template, template_kwargs,
          enable_auto_tool_choice, tool_call_parser, reasoning_parser, generation_config, no_verify, log_level):
    """Serve BUNDLE over HTTP: vLLM's OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /v1/models) and SGLang's native API (/generate, /get_model_info, /get_server_info, /abort_request,
    /health_generate, /flush_cache), plus
    /health and /metrics.
    Ctrl-C gives running requests 5 s to finish, then aborts them."""
    try:
        import uvicorn

        from llmirc.server.app import ServerOptions, create_app, sampling_defaults
    except ImportError as e:
        raise LlmircError(f"serving needs the serve extra ({e.name} missing): pip install 'llmirc[serve]'") from None
    origins = _origins(allowed_origins)
    template_kwargs = _template_kwargs(template_kwargs, "--default-chat-template-kwargs")
    if enable_auto_tool_choice != (tool_call_parser is not None):
        raise UsageError("--enable-auto-tool-choice and --tool-call-parser go together")
    if max_num_batched_tokens < max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be >= --max-num-seqs "
                         f"({max_num_seqs})")
    if kv_cache_dtype != "auto":  # vLLM's flag; the cache type was chosen when compiling (checked before loading)
        from llmirc.artifact_format.reader import read_manifest

        asked = dtypes.kv_cache_dtype_name(kv_cache_dtype)
        if asked is None:
            raise UsageError(f"--kv-cache-dtype {kv_cache_dtype}: unknown dtype (auto, or the bundle's: float32, "
                             "bf16, fp16, int8, fp8)")
        dtype = (read_manifest(bundle, str(bundle)).get("kv_cache") or {}).get("dtype", "float32")
        if asked != dtype:
            raise LlmircError(f"--kv-cache-dtype {kv_cache_dtype}: this bundle's KV cache is {dtype} (the cache "
                              "dtype is chosen when compiling: llmirc compile --kv-cache-dtype)")
    model = _load(bundle, kv_cache_tokens, no_verify, max_num_batched_tokens=max_num_batched_tokens,
                  max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                  threads=threads, target=target, gpu_memory_utilization=gpu_memory_utilization or 0.9,
                  num_scheduler_steps=num_scheduler_steps)
    if gpu_memory_utilization is not None and model.executor.kind == "cpu":
        click.echo("warning: --gpu-memory-utilization applies to GPU targets; this bundle runs on the CPU "
                   "(size its KV cache with --kv-cache-tokens)", err=True)
    capacity = model.num_blocks * model.block_size
    if kv_cache_tokens is not None and capacity < model.max_context:
        click.echo(f"warning: --kv-cache-tokens {kv_cache_tokens} makes a KV cache of {capacity} tokens, less than "
                   f"the {model.max_context} a request may use: longer requests are refused (lower --max-model-len "
                   "to match)", err=True)
    if chat_template is not None:
        from llmirc.runtime.chat_template import ChatTemplate

        if model.tokenizer is None:
            raise LlmircError(f"--chat-template {chat_template}: the bundle has no tokenizer")
        if not chat_template.strip():
            raise UsageError("--chat-template: empty (give a file or the template itself)")
        if "{" in chat_template and not os.path.exists(chat_template):  # the template itself
            source, name = chat_template, "--chat-template"
        else:
            try:
                source, name = Path(chat_template).read_text(encoding="utf-8"), chat_template
            except (OSError, UnicodeDecodeError) as e:
                raise LlmircError(f"--chat-template {chat_template}: cannot read it: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        model.chat_template = ChatTemplate(source, model.tokenizer.special_tokens_map, name)
        model.chat_template.check()  # a syntax error now, not in every chat request
    name = served_model_name or str(bundle)
    defaults = {}
    if generation_config == "auto":
        defaults = sampling_defaults(model.generation_config, f"bundle {bundle}: generation_config.json")
        if defaults:
            listed = ", ".join(f"{k} {v}" for k, v in defaults.items())
            click.echo(f"note: requests that leave them out get the model's generation_config.json sampling: {listed} "
                       "(--generation-config vllm: the APIs' own defaults)", err=True)
    app = create_app(model, ServerOptions(served_model_name=name, api_key=api_key,
                                          allowed_origins=origins, default_chat_template_kwargs=template_kwargs,
                                          max_queued_requests=max_queued_requests, max_body_bytes=max_body_bytes,
                                          sampling_defaults=defaults, tool_call_parser=tool_call_parser,
                                          reasoning_parser=reasoning_parser))
    sock = listen(host, port)
    port = sock.getsockname()[1]  # --port 0: the port the system chose
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    click.echo(f"llmirc serve: {name} on {url} ({model.num_blocks} KV blocks of {model.block_size} tokens, "
               f"context {model.max_context}, prefix caching {'on' if enable_prefix_caching else 'off'}, "
               f"target {model.executor.target['name']})", err=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logging.getLogger("llmirc").addHandler(handler)
    logging.getLogger("llmirc").setLevel(log_level.upper())
    class Server(uvicorn.Server):
        loop = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def stop_requests(self):
            """Running requests are aborted (finish_reason "abort"), so their responses end properly;
            a request whose body is still arriving gets a 503 (RequestBody)."""
            model.engine.abort_all()
            app.state.server.closing.set()

        def handle_exit(self, sig, frame):
            # A second Ctrl-C (or signal) stops the requests now, as the grace's end does, instead of
            # uvicorn's force exit, which cancelled them: 500s and tracebacks. (Captured once: uvicorn
            # raises each captured signal again at its end.)
            if self.should_exit:
                if self.loop is not None:
                    self.loop.call_soon_threadsafe(self.stop_requests)
                return
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            # Ctrl-C: the requests still running after the grace period are stopped; uvicorn cancels
            # what is left 5 s later.
            stop = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, self.stop_requests)
            try:
                await super().shutdown(sockets)
            finally:
                stop.cancel()

    server = Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 5))
    # uvicorn shuts down gracefully on SIGINT and SIGTERM only: SIGHUP (the terminal closed) as SIGTERM,
    # and the exit then says hung up (129), as every other command's
    hung_up = []

    def hang_up(signum, frame):
        hung_up.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGHUP, hang_up)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly and re-raised Ctrl-C: exit 0, as uvicorn.run does
        pass
    except _Terminated as e:  # uvicorn re-raised the SIGTERM it captured
        if hung_up and e.signum == signal.SIGTERM:
            raise _Terminated(signal.SIGHUP) from None
        raise
    if not server.started:
        raise RuntimeError("the server did not start (uvicorn's error above)")


def _parse_ids(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if not any(items):
        raise UsageError("--token-ids: empty prompt")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UsageError(f"--token-ids {text!r}: expected comma-separated integers") from None


@cli.command()
@click.argument("bundle", type=PathArg())
@click.option("--json", "as_json", is_flag=True, help="The manifest summary as JSON.")
@click.option("--no-verify", is_flag=True,
              help="Skip checksum verification (a damaged kernel library may then crash the process).")
@click.option("--load", "try_load", is_flag=True,
              help="Also load the bundle as `run` does (its library for this host, the manifest checked against "
                   "it, one token through the model): a check that it runs here; first, every GPU target gets "
                   "the checks that need no GPU (launch rules against binaries, files). The "
                   "checksums cover every file but manifest.json, whose values only loading checks.")
@_target_option
def inspect(bundle, as_json, no_verify, try_load, target):
    """Show what is inside BUNDLE: model, targets, kernels, KV cache, weights, sizes, versions, compile options."""
    from llmirc.artifact_format.reader import open_bundle
    from llmirc.runtime.gpu_program import check_target
    from llmirc.runtime.inspect import describe, summary

    info = summary(bundle, verify=not no_verify)
    if try_load:
        # Every GPU target's host-side checks first (no driver needed): a damaged one is reported as
        # such on any host, before a GPU-only bundle is refused for want of a GPU.
        opened = open_bundle(bundle, verify=False)  # (summary verified the checksums)
        gpu = [t for t in opened.manifest["targets"] if t.get("kind") in ("cuda", "hip")]
        for t in gpu:
            check_target(opened, t)
        model = _load(bundle, 64, no_verify, target=target)  # (a KV cache of 64 tokens is enough here)
        model.score([0])
        info["loads"] = {"target": model.executor.target["name"], "not_used": list(model.target_notes),
                         "checked": [t["name"] for t in gpu if t["name"] != model.executor.target["name"]]}
    elif target is not None:
        click.echo("warning: --target has no effect without --load", err=True)
    click.echo(json.dumps(info, indent=2) if as_json else describe(info))


@cli.command()
@click.argument("bundle", type=PathArg())
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="Prompt tokens (default: 128, or two thirds of a shorter context).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None,
              help="Tokens generated per sequence; decode is timed over all but the first (default: 64, or a "
                   "third of a shorter context).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences decoded together.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Best of N runs.")
@click.option("--compare-transformers", "hf_dir", type=PathArg(), default=None,
              help="Also time Hugging Face transformers (eager, float32, on the CPU) on this checkpoint in the "
                   "same run (a CPU target only).")
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), default=None,
              help="KV cache size in tokens (default: what the benchmark needs).")
@_threads_option("CPU threads (default: the CPUs this process may use); transformers gets as many.")
@_target_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: bundle, llmirc_version, date, host, threads, target, device (a GPU's "
                   "name, else null), the run's sizes, bandwidth_gb_s, decode_floor_ms_per_step, sgemm_gflop_s "
                   "(null on a GPU), llmirc {prefill_tok_s, decode_tok_s, "
                   "decode_ms_per_step, fraction_of_floor, ...}, model; transformers likewise with "
                   "--compare-transformers.")
def bench(bundle, prompt_len, new_tokens, batch, repeat, hf_dir, kv_cache_tokens, threads, target, as_json):
    """Measure prefill and decode tokens/s of BUNDLE (and the memory-bandwidth floor).

    Prefill is timed on one prompt of --prompt-len random tokens, decode on --batch sequences of
    that prompt; each figure is the best of --repeat runs. At a terminal each stage is said on
    stderr as it starts."""
    from llmirc.runtime.bench import format_table, run_bench

    # Checked first: transformers would fail only after our benchmark, with a hub lookup traceback.
    if hf_dir is not None and not (hf_dir / "config.json").is_file():
        raise LlmircError(f"--compare-transformers {hf_dir}: not a Hugging Face checkpoint directory "
                          "(no config.json)")
    if hf_dir is not None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise LlmircError(f"--compare-transformers needs PyTorch and transformers ({e.name} missing), which "
                              "the loader alone does not install") from None
    start = time.perf_counter()
    stages = (lambda message: click.echo(f"[{time.perf_counter() - start:6.1f}s] {message}", err=True)) \
        if sys.stderr.isatty() else None  # (at a terminal, as compile's progress; a log gets the table alone)
    results = run_bench(bundle, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, repeat=repeat,
                        hf_dir=hf_dir, threads=threads, kv_cache_tokens=kv_cache_tokens, target=target,
                        progress=stages)
    click.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@cli.command("eval-ppl")
@click.argument("bundle", type=PathArg())
@click.option("--text", "text_file", type=PathArg(), required=True,
              help="UTF-8 text file to evaluate (tokenized with the bundle's tokenizer); '-' reads standard input.")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Tokens per window (default: 512, or the model's context when shorter).")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Tokens between window starts (default: half the context); each token is scored at most "
                   "once (a window's first token is not scored: nothing precedes it there).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Evaluate only the first N tokens.")
@_threads_option("CPU threads (default: the CPUs this process may use).")
@_target_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: perplexity (null past float64's range), nll (mean, nats), tokens, windows, "
                   "context, stride, target, bundle, text, text_sha256 (of the text read), llmirc_version, seconds.")
def eval_ppl(bundle, text_file, context, stride, max_tokens, threads, target, as_json):
    """Perplexity of BUNDLE on a text, over sliding windows (Hugging Face's perplexity guide)."""
    from llmirc.runtime.model import declared_model
    from llmirc.runtime.perplexity import perplexity, windows

    text = _read_text(text_file, "--text")
    asked, given_stride = context, stride
    context = context or 512
    stride = stride or max(1, context // 2)
    if stride > context:  # (a usage error before the bundle loads)
        raise UsageError(f"--stride {stride} exceeds the window of {context} tokens (--context"
                         f"{'' if asked else ', by default 512'})")
    started = time.perf_counter()
    if asked:  # (before the KV cache is sized for it: an absurd one failed as a KV cache too large)
        declared = declared_model(bundle).get("max_position_embeddings")
        if isinstance(declared, int) and not isinstance(declared, bool) and 0 < declared < context:
            raise LlmircError(f"--context {context} exceeds the model's context of {declared} tokens")
    model = _load(bundle, context, no_verify=False, max_num_batched_tokens=context, max_num_seqs=1, threads=threads,
                  target=target)
    if model.tokenizer is None:
        raise LlmircError(f"{bundle}: the bundle has no tokenizer")
    if context > model.max_context:  # the default (--context past it was refused above)
        context = model.max_context
        stride = given_stride or max(1, context // 2)
        if stride > context:
            raise LlmircError(f"--stride {stride} exceeds the window of {context} tokens (the model's context, "
                              "shorter than --context's default of 512)")
    if not text.strip():
        raise LlmircError(f"--text {text_file}: the text is empty")
    ids = _first_tokens(model.tokenizer.encode, text, max_tokens)
    if len(ids) < 2:
        raise LlmircError(f"--text {text_file}: {len(ids)} token{'' if len(ids) == 1 else 's'}, and perplexity "
                          "needs at least 2")
    if sys.stderr.isatty():  # a progress bar at a terminal only: stderr may be merged with --json's stdout
        with click.progressbar(length=len(windows(len(ids), context, stride)), label="scoring windows",
                               file=sys.stderr) as bar:
            result = perplexity(model.score, ids, context, stride, on_window=lambda: bar.update(1))
    else:
        result = perplexity(model.score, ids, context, stride)
    used = model.executor.target["name"]
    if as_json:
        click.echo(json.dumps({**result.to_json(), "target": used, "bundle": str(Path(bundle).resolve()),
                               "text": "-" if str(text_file) == "-" else str(Path(text_file).resolve()),
                               "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                               "llmirc_version": __version__, "seconds": round(time.perf_counter() - started, 3)}))
    else:
        span = min(context, len(ids))
        if len(ids) < context:  # (a perplexity over shorter windows than asked: not comparable with one over full ones)
            which = f"the {len(ids)} tokens of --max-tokens" if max_tokens == len(ids) else \
                f"the text's {len(ids)} tokens"
            click.echo(f"note: {which} are fewer than a window's {context}: one window of {len(ids)} tokens", err=True)
        click.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats) over {result.tokens} "
                   f"token{'s' * (result.tokens != 1)}: {result.windows} window{'s' * (result.windows != 1)} of "
                   f"{'up to ' * (span < len(ids))}{span} tokens, stride {stride}; target {used}")


def _first_tokens(encode, text: str, n: int | None) -> list[int]:
    """encode(text)[:n], encoding only a prefix of the text where one holds well over n tokens
    (cut at a line's end, 64 tokens past the n kept: no token kept meets the cut), so that
    `eval-ppl --max-tokens 100` of a 100 MB text does not tokenize it all (minutes, gigabytes)."""
    size = 16 * (n or len(text))
    while size < len(text):
        if (cut := text.rfind("\n", 0, size)) > 0 and len(ids := encode(text[:cut])) >= n + 64:
            return ids[:n]
        size *= 4
    return encode(text)[:n]


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (the terminal closed), raised where Python next runs, so that `with`
    blocks clean up (the bundle writer's temporary directory, calibration's Hessian files) as they
    do for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise _Terminated(signum)


def _stopped(message: str, code: int) -> None:
    """_fail for a signal's exit: a second Ctrl-C (or SIGTERM, SIGHUP) is ignored from here on, as
    it would interrupt the exit's waits for the compile's worker processes (targets/workers.py)
    with a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _fail(message, code)


class _StandardOutput:
    """sys.stdout whose write and flush errors name it, as errors of other files name theirs (`llmirc
    inspect B > /dev/full`: "standard output: No space left on device"); everything else is the stream's."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _named(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:  # (EPIPE stays a BrokenPipeError: OSError() picks the subclass by errno)
            raise OSError(e.errno, e.strerror, "standard output") from None

    def write(self, text):
        return self._named(self._stream.write, text)

    def flush(self):
        return self._named(self._stream.flush)


def main() -> None:
    # (started with standard output closed, `>&-`: what goes there is dropped)
    sys.stdout = _StandardOutput(sys.stdout if sys.stdout is not None else open(os.devnull, "w"))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `llmirc serve`: uvicorn installs its own while it runs
        signal.signal(sig, _terminate)
    try:
        cli.main(standalone_mode=False)
    except _Terminated as e:
        _stopped("terminated" if e.signum == signal.SIGTERM else "hung up (SIGHUP)", 128 + e.signum)
    except UsageError as e:  # exit 2 and the help's name, as click's own usage errors
        _fail(f"{str(e).splitlines()[0]} (see '{_command} --help')", 2)
    except LlmircError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except click.exceptions.Abort as e:  # click's form of Ctrl-C (after printing a newline)
        _stopped("interrupted" if isinstance(e.__cause__, KeyboardInterrupt) else "aborted", 130)
    except KeyboardInterrupt:
        _stopped("interrupted", 130)
    except _NO_ARGS_IS_HELP as e:  # bare `llmirc`: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        # Usage errors too are one line (not click's usage block), with where to find help.
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        _fail(" ".join(e.format_message().split()) + hint, e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:  # stdout closed early (`llmirc run ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except MemoryError as e:
        _fail(f"out of memory in {internal_stage(e) or _command}")
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            _internal_error(e)
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        if files == "standard output":  # (`> /dev/full`): what is left in its buffer goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _fail(f"{internal_stage(e) or _command}: {files + ': ' if files else ''}{e.strerror}")
    except Exception as e:
        _internal_error(e)


# OSErrors of the machine, not of llmirc: disk full or over quota, read-only or denied, too many files.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE,
                       errno.ENFILE, errno.EFBIG, errno.ENAMETOOLONG}


def _internal_error(e: Exception) -> None:
    """A bug in llmirc: one line, the traceback only when asked for; exit 3."""
    if _debug:
        traceback.print_exception(e)
    reason = " ".join(str(e).split("\n", 1)[0].split())
    reason = f"{type(e).__name__}: {reason[:300]}" if reason else type(e).__name__
    hint = "" if _debug else " (--debug or LLMIRC_DEBUG=1 shows the traceback)"
    click.echo(f"internal error in {internal_stage(e) or _command}: {reason}; please report{hint}", err=True)
    sys.exit(INTERNAL_ERROR)


if __name__ == "__main__":
    main()
