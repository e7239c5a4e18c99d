"""The peer benchmark of issue 7: llmirc against transformers, llama.cpp and onnxruntime-genai on
one checkpoint, each engine in its own process with the same token ids and thread count.

    python benchmarks/compare.py --model small|medium|gemma3-270m|smollm2|CHECKPOINT [--threads N] [--repeat 3]
        [--engines llmirc,transformers,llama.cpp:F32,...] [--json results.json]

--model names a benchmark checkpoint of benchmarks/models.py (made once, cached) or a checkpoint
folder. The peers' conversions are kept in --work (default: next to the benchmark checkpoint, or
~/.cache/llmirc/bench/path-HASH) and reused; llmirc compiles anew every run (peak RSS and time of
the compile are reported). After one warm-up round (discarded), --repeat rounds run every engine
once each, in the order given, each round starting with a bandwidth probe (its own process);
the table gives medians.

- decode: batch 1, greedy, --new-tokens after a --prompt-tokens prompt, tokens/s from the first
  generated token to the last; llmirc also decodes --batch sequences together.
- prefill: one forward over --prefill-tokens tokens (llmirc: also samples one token).
- peak RSS: the engine's whole process, loading included (ru_maxrss from wait4; Linux starts a
  child's count at its parent's peak, so this process stays small and prints its own peak).
- % of floor: bytes a batch-1 decode step reads (below) x decode tokens/s over the best bandwidth
  measured in the run (NumPy float32 matrix-vector product over 256 MiB, llmirc.runtime.bench,
  with --threads BLAS threads).

Bytes per decode token, counted in each engine's own format: every weight a step reads in full
(the input embedding table is read one row per token and left out, except when it is tied to
the LM head), at its stored size, plus the KV cache of the mean decode context (prompt + new/2):
llmirc: `llmirc bench`'s count (weights read by a non-embedding kernel, stored dtype; KV at the
bundle's KV dtype); transformers: the checkpoint's tensors as float32 (it runs in float32),
float32 KV; llama.cpp: the GGUF file's tensors (their quantized blocks and scales), float16 KV
(its default cache type); onnxruntime-genai: the ONNX initializers read by an op other than a
Gather or a rotary embedding (packed int4/int8 blocks, scales and zero points as stored), KV at the dtype of the
model's past_key_values inputs.

Also measured: the bundle's size against the checkpoint's, `llmirc run`'s peak RSS against the
bundle's weights plus the KV cache it allocates (a process of its own, 8 tokens after the
prompt), and the compile's peak RSS. The machine should be idle: the load average is printed at
the start and the end, with a warning when it is above 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import peers  # noqa: E402

FLOAT_PEERS = {"transformers", "llama.cpp:F32", "llama.cpp:F16", "llama.cpp:BF16", "ort-genai:fp32"}
ENGINES = {  # default --engines by the checkpoint's dtype
    "float32": "llmirc,transformers,llama.cpp:F32,llama.cpp:Q8_0,llama.cpp:Q4_0,ort-genai:fp32,ort-genai:int8,"
               "ort-genai:int4",
    "half": "llmirc,transformers,llama.cpp:F16,llama.cpp:BF16,llama.cpp:Q8_0,llama.cpp:Q4_0,ort-genai:fp32,"
            "ort-genai:int8,ort-genai:int4",
}
# ONNX ops that read rows of a table initializer at the tokens' ids or positions, not all of it
PER_TOKEN_ONNX_OPS = {"Gather", "GatherBlockQuantized", "GroupQueryAttention", "RotaryEmbedding"}
BANDWIDTH = "from llmirc.runtime.bench import measure_bandwidth; print(measure_bandwidth())"


# -- bytes a batch-1 decode step reads, by engine --------------------------------------------------

def kv_bytes(config: dict, context: int, itemsize: int) -> int:
    """K and V of `context` tokens in every layer (Hugging Face config names)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * context * itemsize


def transformers_bytes(checkpoint: Path, config: dict, context: int) -> dict[str, int]:
    from llmirc.artifact_format.safetensors import open_safetensors

    shapes = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open_safetensors(path) as f:
            shapes.update((name, f.info(name)[1]) for name in f.names())
    tied = "lm_head.weight" not in shapes
    read = sum(int(_prod(shape)) for name, shape in shapes.items() if tied or not name.endswith("embed_tokens.weight"))
    return {"f32": 4 * read, "kv f32": kv_bytes(config, context, 4)}


def gguf_bytes(path: Path, config: dict, context: int) -> dict[str, int]:
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    out: dict[str, int] = {}
    for t in tensors:
        if tied or t.name != "token_embd.weight":
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
    out["kv f16"] = kv_bytes(config, context, 2)
    return out


def onnx_bytes(folder: Path, config: dict, context: int) -> dict[str, int]:
    import numpy as np
    import onnx

    model = onnx.load(str(folder / json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
                          ["filename"]), load_external_data=False)
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    out: dict[str, int] = {}
    for t in graph.initializer:
        ops = consumers.get(t.name, set())
        if not ops or ops <= PER_TOKEN_ONNX_OPS:  # an embedding or rotary table: rows at the tokens' positions
            continue
        external = {e.key: e.value for e in t.external_data}
        size = int(external["length"]) if "length" in external else len(t.raw_data) or int(
            _prod(t.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
        dtype = onnx.TensorProto.DataType.Name(t.data_type).lower()
        out[dtype] = out.get(dtype, 0) + size
    past = next(i for i in graph.input if i.name.startswith("past_key_values"))
    kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    out[f"kv {onnx.TensorProto.DataType.Name(past.type.tensor_type.elem_type).lower()}"] = kv_bytes(
        config, context, np.dtype(kv_dtype).itemsize)
    return out


def decode_bytes(prepared: peers.Prepared, checkpoint: Path, config: dict, context: int,
                 runs: list[peers.Result]) -> dict[str, int]:
    """Bytes one batch-1 decode step of the engine reads, by dtype (see the module docstring)."""
    if prepared.kind == "llmirc":
        return next((r.bytes_per_token for r in runs if r.ok), {})
    if prepared.kind == "transformers":
        return transformers_bytes(checkpoint, config, context)
    if prepared.kind == "llama.cpp":
        return gguf_bytes(prepared.model, config, context)
    return onnx_bytes(prepared.model, config, context)


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


# -- memory: bundle size, `llmirc run` RSS, compile RSS --------------------------------------------

def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the files matching `pattern` in a folder; of the file itself when it is one (GGUF)."""
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file() and not p.name.startswith("."))


def memory_report(engine: str, prepared: peers.Prepared, prompt: list[int], threads: int) -> dict:
    """Sizes and peak RSS of one llmirc bundle: bundle vs what it compiled (the checkpoint or the
    GGUF file), `llmirc run` and the compile."""
    from llmirc.artifact_format.reader import open_bundle
    from llmirc.runtime.kv_cache import blocks_for
    from llmirc.runtime.model import DEFAULT_KV_TOKENS

    bundle = prepared.model
    m = open_bundle(bundle, verify=False).manifest
    kv = m["kv_cache"]
    kv_cache = blocks_for(min(int(m["model"]["max_position_embeddings"]), DEFAULT_KV_TOKENS),
                          kv["block_size"]) * kv["block_bytes"]  # what `run` allocates (load's default)
    weights = (bundle / m["weights"]["file"]).stat().st_size
    src = prepared.source  # a checkpoint folder, a GGUF file, or an ONNX file with its external data beside it
    source = (src.parent, f"{src.name}*") if src.suffix == ".onnx" else (src, "*")
    weight_source = None if src.suffix == ".onnx" else (src, "*.safetensors")
    run = peers.run_measured([sys.executable, "-m", "llmirc.cli", "run", str(bundle), "--token-ids",
                              ",".join(map(str, prompt)), "--max-new-tokens", "8", "--ignore-eos", "--json",
                              "--threads", str(threads)])
    return {
        "engine": engine, "weight_bytes_by_dtype": m["model"].get("weight_bytes"),
        "bundle_bytes": folder_bytes(bundle), "checkpoint_bytes": folder_bytes(*source),
        "bundle_weights_bytes": weights, "checkpoint_weights_bytes": folder_bytes(*(weight_source or source)),
        "kv_cache_bytes": kv_cache, "kv_cache_dtype": kv["dtype"],
        "run_peak_rss_mb": run.peak_rss_mb if run.returncode == 0 else None,
        "run_error": run.error("llmirc run") if run.returncode else "",
        "compile_seconds": prepared.compiled.seconds, "compile_peak_rss_mb": prepared.compiled.peak_rss_mb,
    }


# -- the comparison ------------------------------------------------------------------------------

def checkpoint_dtype(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=f"{'|'.join(models.NAMES)} or a checkpoint folder")
    parser.add_argument("--work", type=Path, help="folder for the converted models and bundles (reused)")
    parser.add_argument("--engines", help="comma-separated (default: by the checkpoint's dtype: "
                        f"{ENGINES['float32']} for float32; F16/BF16 instead of F32 for half checkpoints)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="llmirc's batched decode (1: none)")
    parser.add_argument("--prompt-text", help="decode after this text (tokenized with the checkpoint's "
                        "tokenizer.json) instead of --prompt-tokens synthetic ids")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    parser.add_argument("--json", type=Path, help="also write every run and figure to this file")
    args = parser.parse_args()
    if min(args.threads, args.prompt_tokens, args.prefill_tokens, args.batch, args.repeat) < 1 or args.new_tokens < 2:
        parser.error("--threads, --prompt-tokens, --prefill-tokens, --batch, --repeat must be >= 1, "
                     "--new-tokens >= 2")

    load_start = load_average()
    try:
        checkpoint, work = models.resolve(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    work = args.work or work
    config = json.loads((checkpoint / "config.json").read_text())
    dtype = checkpoint_dtype(config)
    vocab, eos = config["vocab_size"], config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_tokens)]
    if args.prompt_text is not None:
        from tokenizers import Tokenizer

        prompt = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(args.prompt_text).ids
    prefill = [(11 * i + 5) % vocab for i in range(args.prefill_tokens)]
    engines = [e.strip() for e in (args.engines or ENGINES["float32" if dtype == "float32" else "half"]).split(",")
               if e.strip()]

    prepared: dict[str, peers.Prepared] = {}
    runs: dict[str, list[peers.Result]] = {e: [] for e in engines}
    for engine in engines:
        print(f"preparing {engine}", file=sys.stderr, flush=True)
        try:
            prepared[engine] = peers.prepare(engine, checkpoint, work)
        except Exception as e:  # a peer that cannot be converted is reported, not fatal
            runs[engine].append(peers.Result(engine, "", error=f"{type(e).__name__}: {e}"))
    memory = [memory_report(e, p, prompt, args.threads) for e, p in prepared.items() if p.compiled]

    bandwidth = []
    for n in range(args.warmup + args.repeat):
        warm = n < args.warmup
        print(f"round {n + 1} of {args.warmup + args.repeat}{' (warm-up)' if warm else ''}", file=sys.stderr,
              flush=True)
        probe = peers.run_measured([sys.executable, "-c", BANDWIDTH], env=dict(
            os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads)))
        if not warm and probe.returncode == 0:
            bandwidth.append(float(probe.stdout.split()[-1]))
        for engine, p in prepared.items():
            r = peers.run_engine(p.kind, p.model, prompt, args.new_tokens, prefill, args.threads,
                                 batch=args.batch if p.kind == "llmirc" else 1)
            r.engine = engine
            if not warm or not r.ok:  # a failed warm-up is reported as the engine's failure
                runs[engine].append(r)
    harness_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # what every child started from, at most
    context = len(prompt) + args.new_tokens // 2
    bytes_read = {e: decode_bytes(p, checkpoint, config, context, runs[e]) for e, p in prepared.items()}
    report = {"model": args.model, "checkpoint": str(checkpoint), "dtype": dtype, "threads": args.threads,
              "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
              "batch": args.batch, "repeat": args.repeat, "warmup": args.warmup, "bandwidth_gb_s": bandwidth,
              "load_average": [load_start, load_average()],
              "harness_peak_rss_mb": harness_rss, "memory": memory, "bytes_per_decode_token": bytes_read,
              "runs": {e: [asdict(r) for r in rs] for e, rs in runs.items()}}
    print(format_report(report, eos))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def format_report(report: dict, eos: set[int]) -> str:
    """The table and the goal lines of issue 7 from a report (main's dict, also what --json writes)."""
    bandwidth = max(report["bandwidth_gb_s"], default=0.0)
    ok = {e: [r for r in rs if r["ok"]] for e, rs in report["runs"].items()}
    ours = next((e for e in ok if e.split(":")[0] == "llmirc" and ok[e]), None)
    reference = next((r["tokens"] for r in ok.get("transformers", [])), None)
    probes = ", ".join(f"{b:.1f}" for b in report["bandwidth_gb_s"])
    lines = [f"{report['model']} ({report['dtype']} checkpoint): {report['threads']} threads, prompt "
             f"{report['prompt_tokens']}, {report['new_tokens']} new tokens, prefill {report['prefill_tokens']}; "
             f"median of {report['repeat']} after {report['warmup']} warm-up round(s); bandwidth {bandwidth:.1f} GB/s "
             f"(best of {len(report['bandwidth_gb_s'])} probes: {probes})",
             f"load average {report['load_average'][0]:.2f} at the start, {report['load_average'][1]:.2f} at the end; "
             f"this harness's peak RSS {report['harness_peak_rss_mb']:.0f} MiB (a floor under every peak RSS below)"]
    if max(report["load_average"]) > 0.5:
        lines.append("WARNING: the machine was busy; these figures are not comparable with a quiet run")
    lines.append(f"{'engine':16s} {'decode tok/s':>12s} {'ours/it':>7s} {'prefill tok/s':>13s} {'ours/it':>7s} "
                 f"{'peak RSS MiB':>12s} {'MB/token':>8s} {'% floor':>7s}  greedy vs transformers")
    rates = {}
    for engine, results in report["runs"].items():
        if not ok[engine]:
            lines.append(f"{engine:16s} FAILED: {results[-1]['error'] if results else 'not run'}")
            continue
        decode, prefill = _median(ok[engine], "decode_tokens_per_s"), _median(ok[engine], "prefill_tokens_per_s")
        rates[engine] = decode, prefill
        mb = sum(report["bytes_per_decode_token"].get(engine, {}).values()) / 1e6
        floor = f"{100 * mb * 1e6 * decode / (bandwidth * 1e9):7.0f}" if bandwidth and mb else f"{'-':>7s}"
        vs = [f"{rates[ours][i] / x:7.2f}" if ours in rates and engine != ours else f"{'-':>7s}"
              for i, x in enumerate((decode, prefill))]
        same = first_difference(ok[engine][0]["tokens"], reference, eos) if reference else "-"
        failed = f" ({len(results) - len(ok[engine])} runs failed: {results[-1]['error']})" \
            if len(ok[engine]) < len(results) else ""
        lines.append(f"{engine:16s} {decode:12.1f} {vs[0]} {prefill:13.1f} {vs[1]} "
                     f"{max(r['peak_rss_mb'] for r in ok[engine]):12.0f} {mb:8.1f} {floor}  {same}{failed}")
    lines.append("(ours/it: llmirc's tokens/s over this engine's; MB/token: bytes a batch-1 decode step reads in the "
                 "engine's format; % floor: MB/token x tokens/s over the bandwidth)")
    for engine, by_dtype in report["bytes_per_decode_token"].items():
        lines.append(f"  {engine} reads {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in by_dtype.items())}")
    floats = [e for e in rates if e in FLOAT_PEERS]
    if ours in rates and floats:
        for i, what in enumerate(("decode", "prefill")):
            best = max(floats, key=lambda e: rates[e][i])
            lines.append(f"goal: {ours} {what} >= 1.25x the best float peer: {rates[ours][i] / rates[best][i]:.2f}x "
                         f"{best}")
    for engine in rates:
        batched = [r["batch_decode_tokens_per_s"] for r in ok[engine] if r["batch_decode_tokens_per_s"]]
        if batched:
            b8 = statistics.median(batched)
            lines.append(f"goal: {engine} batch-{report['batch']} decode >= 5x batch 1: {b8:.1f} tok/s = "
                         f"{b8 / rates[engine][0]:.2f}x")
    for m in report["memory"]:
        lines.append(f"goal: {m['engine']} bundle <= 1.05x the checkpoint: {m['bundle_bytes'] / 1e6:.1f} MB "
                     f"= {m['bundle_bytes'] / m['checkpoint_bytes']:.3f}x ({m['checkpoint_bytes'] / 1e6:.1f} MB; "
                     f"weights {m['bundle_weights_bytes'] / m['checkpoint_weights_bytes']:.3f}x)")
        budget = m["bundle_weights_bytes"] + m["kv_cache_bytes"]
        run = f"{m['run_peak_rss_mb']:.0f} MiB = {m['run_peak_rss_mb'] * 2**20 / budget:.2f}x" \
            if m["run_peak_rss_mb"] else m["run_error"]
        lines.append(f"goal: {m['engine']}: `llmirc run` peak RSS <= 1.2x weights + KV cache "
                     f"({m['bundle_weights_bytes'] / 2**20:.0f} MiB + {m['kv_cache_bytes'] / 2**20:.0f} MiB "
                     f"{m['kv_cache_dtype']}): {run}")
        lines.append(f"goal: {m['engine']}: compile peak RSS < 1.5 GB (medium): {m['compile_peak_rss_mb']:.0f} MiB, "
                     f"{m['compile_seconds']:.0f} s")
    return "\n".join(lines)


def first_difference(tokens: list[int], reference: list[int], eos: set[int]) -> str:
    """Where greedy tokens first differ from the reference, and whether that is after the
    reference's first end-of-sequence token (engines differ in what follows it: onnxruntime-genai
    cannot choose it again before its min_length)."""
    diff = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if diff is None:
        return f"equal ({len(tokens)} tokens)" if len(tokens) == len(reference) else "shorter"
    end = next((i for i, b in enumerate(reference) if b in eos), None)
    return f"equal up to the eos at {end}, differ at {diff}" if end is not None and diff >= end \
        else f"differ at {diff}"


if __name__ == "__main__":
    main()
