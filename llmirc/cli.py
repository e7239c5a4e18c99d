"""The `llmirc` command line: compile, run, inspect, bench, eval-ppl.

User errors print one line (`error: ...`) and exit 1; no traceback. `compile` needs the
compiler extra; the other commands need only the loader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmirc import __version__
from llmirc.errors import LlmircError


# click >= 8.2 raises this (a UsageError whose message is the whole help) for a bare `llmirc`.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmirc")
def cli() -> None:
    """llmirc: ahead-of-time compiler for LLM inference.

    Compile a Hugging Face checkpoint into a portable bundle of compiled kernels, weights and
    a manifest, then run, inspect or benchmark the bundle with the thin loader.
    """


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True,
              help="Targets to compile for, comma-separated: cpu (cuda and hip: not yet).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Bundle directory to write (OUT.llmir).")
@click.option("--passes", default=None, help="Textual pass pipeline replacing the default, e.g. "
              "'canonicalize,cse,fuse-linears,paged-kv{block-size=32}'. prune-logits and paged-kv always run last.")
@click.option("--print-ir-after-all", is_flag=True, help="Print the IR after every pass (stderr).")
@click.option("--emit", default=None, metavar="STAGE",
              help="Print a stage to stdout: the optimized IR (mlir), or a target's stage (cpu: llvm-ir, asm).")
@click.option("--keep-intermediates", is_flag=True, help="Also store LLVM IR, assembly and objects in the bundle.")
@click.option("--cpu-variants", default="native,baseline", show_default=True,
              help="CPU libraries to build: native (this host's CPU) and/or baseline (x86-64-v2 / generic aarch64).")
@click.option("--dtype", default="auto", show_default=True,
              help="Storage type of linear and embedding weights: auto (the checkpoint's), float32, bfloat16, "
                   "float16. Norm weights and biases are float32; compute is float32.")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              help="Paged KV cache type: auto (bfloat16/float16 when the weights are), float32, bfloat16, float16, "
                   "int8 (a scale per block, kv head and K/V).")
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Quantize linear weights: int8 (per output row unless --quant-group-size), int4 (groups of 32 "
                   "unless --quant-group-size); activations are quantized to int8 on the fly.")
@click.option("--quant-group-size", type=int, default=0, show_default=True,
              help="Weights per scale along the input dimension: 16..512, a power of two (0: the scheme's default).")
@click.option("--quant-zero-points", is_flag=True, help="Asymmetric quantization: a uint8 zero point per group.")
@click.option("--quant-keep", default="embedding,lm_head", show_default=True,
              help="What stays in higher precision: embedding, lm_head and/or glob patterns over checkpoint tensor "
                   "names, comma-separated ('none': quantize everything).")
@click.option("--report", is_flag=True, help="Print what the passes fused or rewrote, and how often.")
@click.option("--dequantize", is_flag=True, help="Expand quantized tensors (GGUF Q8_0, Q4_K, ...) to float32; "
              "without it they are kept quantized (llama and qwen2 GGUF files; others are refused).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def compile_cmd(model, target, output, passes, print_ir_after_all, emit, keep_intermediates, cpu_variants, dtype,
                kv_cache_dtype, quant, quant_group_size, quant_zero_points, quant_keep, report, dequantize, quiet):
    """Compile MODEL (a Hugging Face checkpoint directory, an .onnx file or a .gguf file) into a bundle."""
    try:
        from llmirc.driver import CompileOptions, Progress, compile_model
    except ImportError as e:
        _fail(f"the compiler is not installed ({e.name} missing): pip install 'llmirc[compiler]'")
    variants = tuple(v.strip() for v in cpu_variants.split(",") if v.strip())
    targets = tuple(t.strip() for t in target.split(",") if t.strip())
    options = CompileOptions(targets=targets, passes=passes, print_ir_after_all=print_ir_after_all, emit=emit,
                             keep_intermediates=keep_intermediates, cpu_variants=variants, report=report,
                             dtype=dtype, kv_cache_dtype=kv_cache_dtype, quant=quant, quant_group_size=quant_group_size,
                             quant_symmetric=not quant_zero_points,
                             quant_keep=tuple(k.strip() for k in quant_keep.split(",") if k.strip()),
                             dequantize=dequantize)
    compile_model(model, output, options, Progress(None if quiet else sys.stderr))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch); needs a tokenizer.")
@click.option("--token-ids", "token_ids", multiple=True, help="Prompt as comma-separated token ids (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 is greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None)
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sequence on stdout.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: the CPUs this process may use).")
def run(bundle, prompts, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, as_json, threads):
    """Generate text or tokens with a compiled BUNDLE.

    Without --json, a single prompt streams its text as it is generated."""
    from llmirc.runtime import load

    if not prompts and not token_ids:
        raise LlmircError("give --prompt TEXT or --token-ids 1,2,3")
    model = load(bundle, threads=threads)
    batch = [_parse_ids(s) for s in token_ids]
    if prompts:
        if model.tokenizer is None:
            raise LlmircError(f"{bundle}: the bundle has no tokenizer; use --token-ids")
        batch += [model.tokenizer.encode(p) for p in prompts]
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  ignore_eos=ignore_eos)
    if not as_json and len(batch) == 1 and model.tokenizer is not None:
        for delta in model.stream_text(batch[0], **kwargs):
            click.echo(delta, nl=False)
        click.echo()
        return
    outputs = model.generate(batch, **kwargs)
    for prompt, out in zip(batch, outputs):
        text = model.tokenizer.decode(out) if model.tokenizer is not None else None
        if as_json:
            record = {"prompt_token_ids": prompt, "token_ids": out}
            if text is not None:
                record["text"] = text
            click.echo(json.dumps(record))
        else:
            click.echo(text if text is not None else " ".join(map(str, out)))


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LlmircError(f"--token-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise LlmircError("--token-ids: empty prompt")
    return ids


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The manifest summary as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification.")
def inspect(bundle, as_json, no_verify):
    """Show what is inside BUNDLE: model, targets, kernels, KV cache, weights, sizes, versions."""
    from llmirc.runtime.inspect import describe, summary

    info = summary(bundle, verify=not no_verify)
    click.echo(json.dumps(info, indent=2) if as_json else describe(info))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences decoded together.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Best of N runs.")
@click.option("--compare-transformers", "hf_dir", type=click.Path(path_type=Path), default=None,
              help="Also time Hugging Face transformers (eager, float32) on this checkpoint in the same run.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: the CPUs this process may use); transformers gets as many.")
@click.option("--json", "as_json", is_flag=True)
def bench(bundle, prompt_len, new_tokens, batch, repeat, hf_dir, threads, as_json):
    """Measure prefill and decode tokens/s of BUNDLE (and the memory-bandwidth floor)."""
    from llmirc.runtime.bench import format_table, run_bench

    # Checked first: transformers would fail only after our benchmark, with a hub lookup traceback.
    if hf_dir is not None and not (hf_dir / "config.json").is_file():
        raise LlmircError(f"--compare-transformers {hf_dir}: not a Hugging Face checkpoint directory "
                          "(no config.json)")
    results = run_bench(bundle, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, repeat=repeat,
                        hf_dir=hf_dir, threads=threads)
    click.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@cli.command("eval-ppl")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), required=True,
              help="UTF-8 text file to evaluate (tokenized with the bundle's tokenizer).")
@click.option("--context", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per window.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Tokens between window starts (default: half the context); each token is scored once.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Evaluate only the first N tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: the CPUs this process may use).")
@click.option("--json", "as_json", is_flag=True)
def eval_ppl(bundle, text_file, context, stride, max_tokens, threads, as_json):
    """Perplexity of BUNDLE on a text, over sliding windows (Hugging Face's perplexity guide)."""
    from llmirc.runtime import load
    from llmirc.runtime.perplexity import perplexity

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmircError(f"--text {text_file}: cannot read it as UTF-8 text: {e}") from None
    stride = stride or max(1, context // 2)
    model = load(bundle, kv_cache_tokens=context, max_batched_tokens=context, max_num_seqs=1, threads=threads)
    if model.tokenizer is None:
        raise LlmircError(f"{bundle}: the bundle has no tokenizer")
    if context > model.max_context:
        raise LlmircError(f"--context {context} exceeds the model's context of {model.max_context} tokens")
    ids = model.tokenizer.encode(text)[:max_tokens]
    result = perplexity(model.score, ids, context, stride)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        click.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats) over {result.tokens} tokens: "
                   f"{result.windows} windows of {context} tokens, stride {stride}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except LlmircError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except _NO_ARGS_IS_HELP as e:  # bare `llmirc`: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        # Usage errors too are one line (not click's usage block), with where to find help.
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        _fail(" ".join(e.format_message().split()) + hint, e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
