"""`llmirc bench`: prefill and decode speed of a bundle, against the memory-bandwidth floor and,
optionally, Hugging Face transformers (eager, float32) on the same checkpoint in the same run.

Decode is memory-bound: each step reads every weight except the embedding table (one row
per token) plus the KV cache, so bytes per step / measured bandwidth is the floor. The
bandwidth is measured here with a NumPy (BLAS) matrix-vector product over as many bytes, the
same access pattern as decode with the same working set (a small quantized model's weights can
sit in the last-level cache, and a floor at memory's bandwidth would be beaten). This machine
may be shared and noisy: every figure is the best of `repeat` runs, and peers are run back to
back in one process.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmirc import __version__
from llmirc.errors import BundleError, LlmircError, RuntimeLimitError
from llmirc.small_files import parse_json, read_small_text

from .inspect import logical_sizes, parameter_count
from .model import _whole, declared_model, load


def measure_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """GB/s of a BLAS sgemv reading a float32 matrix of about `nbytes` bytes: by default 256 MiB,
    much larger than the caches (memory's bandwidth); `llmirc bench` gives a decode step's bytes,
    so that a model whose weights fit the last-level cache is held against the cache's bandwidth,
    as its decode is. Best of `repeat` timings, each of at least 50 ms of sgemvs. NumPy's BLAS
    uses its own thread count (all cores unless OPENBLAS_NUM_THREADS says otherwise)."""
    cols = 4096
    a = np.ones((max(nbytes // (4 * cols), 1), cols), dtype=np.float32)
    x = np.ones(cols, dtype=np.float32)
    calls = max(1, math.ceil(0.05 / _timed(lambda: a @ x)))

    def run():
        for _ in range(calls):
            a @ x
    return a.nbytes * calls / min(_timed(run) for _ in range(repeat)) / 1e9


def measure_peak_gflops(n: int = 1024, repeat: int = 3) -> float:
    """GFLOP/s of a BLAS sgemm: the compute roof prefill is held against."""
    a = np.ones((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def prefill_flops(model, prompt_len: int) -> float:
    """Matmul FLOPs of a prefill: every layer weight per token, the LM head once (prune-logits),
    causal attention scores and values."""
    vocab, hidden, layers, heads, head_dim = (_size(model, f) for f in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"))
    sizes = logical_sizes(model.bundle.manifest, [w.shape for w in model.executor.weights])
    layer_params = sum(sizes[i] for i in _weights_read(model)) - vocab * hidden
    attention = 2 * 2 * prompt_len * (prompt_len + 1) / 2 * layers * heads * head_dim
    return 2 * layer_params * prompt_len + 2 * vocab * hidden + attention


def _size(model, field: str) -> int:
    """A positive whole number of the manifest's model fields (the library does not read these:
    loading does not check them). Raises BundleError."""
    try:
        value = _whole(model.config.get(field), f"model.{field}")
    except TypeError as e:
        raise BundleError(f"bundle {model.bundle.name}: manifest.json {e}") from None
    if value < 1:
        raise BundleError(f"bundle {model.bundle.name}: manifest.json model.{field} is {value}, not positive")
    return value


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _weights_read(model) -> list[int]:
    """Indices of the weights a step reads in full (embedding tables are read a row per token)."""
    kinds = {k["symbol"]: k["kind"] for k in model.executor.target["kernels"]}
    used = {}  # weight index -> read in full by some non-embedding kernel
    for call in model.executor.target.get("plan") or model.bundle.manifest["plan"]:  # (a GPU target's own)
        for arg in call["args"].values():
            if isinstance(arg, dict) and arg.get("ptr") == "weight":
                if not (isinstance(arg.get("index"), int) and 0 <= arg["index"] < len(model.executor.weights)):
                    raise BundleError(f"bundle {model.bundle.name}: manifest.json's plan reads weight "
                                      f"{arg.get('index')!r}, which the bundle does not have")
                if call["kernel"] not in kinds:
                    raise BundleError(f"bundle {model.bundle.name}: manifest.json's plan calls {call['kernel']!r}, "
                                      f"which target {model.executor.target.get('name')!r} does not list")
                full = kinds[call["kernel"]] not in ("embedding", "qembedding")
                used[arg["index"]] = used.get(arg["index"], False) or full
    if not any(used.values()):  # (the CPU library holds its own plan: a model without this one still runs)
        raise BundleError(f"bundle {model.bundle.name}: manifest.json's plan reads no weights, so the bytes a step "
                          "reads are unknown")
    return [i for i, full in used.items() if full]


def decode_bytes_per_step(model, context: int, sequences: int = 1) -> dict[str, int]:
    """Bytes one decode step reads, by dtype: the weights (embedding tables read one row per token),
    once for the batch, and the KV caches of `sequences` sequences of `context` tokens each (under
    "kv <dtype>")."""
    out: dict[str, int] = {}
    for i in _weights_read(model):
        w = model.executor.weights[i]
        name = model.bundle.manifest["weights"]["dtypes"][model.bundle.manifest["weights"]["order"][i]]
        out[name] = out.get(name, 0) + w.nbytes
    kv = model.bundle.manifest["kv_cache"]
    out[f"kv {kv['dtype']}"] = sequences * context * kv["block_bytes"] // kv["block_size"]
    return out


def bench_llmirc(bundle: Path, prompt: list[int], batch: int, new_tokens: int, repeat: int,
                 threads: int | None = None, kv_cache_tokens: int | None = None, target: str | None = None,
                 cpu_only: bool = False) -> dict:
    def open_model(tokens: int):  # no prefix caching: every repeat must compute its prompt
        try:
            return load(bundle, kv_cache_tokens=tokens, threads=threads, enable_prefix_caching=False, target=target)
        except RuntimeLimitError:  # a cache sized for --batch sequences (no --kv-cache-tokens) too large
            if kv_cache_tokens is not None:
                raise
            raise RuntimeLimitError(f"--batch {batch} sequences of {len(prompt) + new_tokens} tokens: a KV cache of "
                                    f"{tokens} tokens for them cannot be allocated; lower --batch") from None

    need = len(prompt) + new_tokens
    model = open_model(kv_cache_tokens or batch * need + 64)
    if need > model.max_context:
        raise LlmircError(f"--prompt-len {len(prompt)} + --new-tokens {new_tokens} = {need} tokens exceeds the "
                          f"model's context of {model.max_context}")
    blocks = batch * -(-need // model.block_size)  # each sequence holds whole blocks
    if kv_cache_tokens is None and blocks > model.num_blocks:
        model.close()
        model = open_model(blocks * model.block_size)
    if blocks > model.num_blocks:
        raise LlmircError(f"--kv-cache-tokens {kv_cache_tokens}: a KV cache of {model.num_blocks} "
                          f"block{'s' * (model.num_blocks != 1)} of {model.block_size} tokens cannot hold "
                          f"--batch {batch} sequences of {need} tokens ({blocks} blocks)")
    device = getattr(model.executor, "dev", {}).get("name")
    if cpu_only and device is not None:  # (refused before the long run)
        model.close()
        raise LlmircError(f"--compare-transformers times transformers on the CPU, and the bundle ran on "
                          f"{device} (target {model.executor.target['name']}): give --target cpu, or compare on "
                          "the GPU with benchmarks/gpu_check.py")
    try:  # the manifest's fields the figures need, read (and refused when malformed) before the long run
        by_dtype = decode_bytes_per_step(model, len(prompt) + new_tokens // 2, batch)  # (each sequence its KV)
        flops = prefill_flops(model, len(prompt))
        params = parameter_count(model.bundle.manifest, [w.shape for w in model.executor.weights])
    except BaseException as e:
        model.close()
        # (the plan, the kernels' kinds, weights.dtypes and kv_cache.block_bytes: the library reads none of them)
        if isinstance(e, KeyError):
            raise BundleError(f"bundle {model.bundle.name}: manifest.json lacks the field {e}") from None
        if isinstance(e, (TypeError, AttributeError, ValueError)):
            raise BundleError(f"bundle {model.bundle.name}: manifest.json has a malformed entry ({e})") from None
        raise
    prefill, first, whole = [], [], []
    for _ in range(repeat):
        prefill.append(_timed(lambda: model.generate([prompt], max_new_tokens=1, ignore_eos=True)))
        # Per decode step: the whole run less one that stops at the first token (the prompts'
        # prefill), each the fastest of the rounds. Not the time between streamed tokens: greedy
        # decode steps run in bursts of num_scheduler_steps, and a prompt of one token starts the first burst.
        first.append(_timed(lambda: model.generate([prompt] * batch, max_new_tokens=1, ignore_eos=True)))
        whole.append(_timed(lambda: model.generate([prompt] * batch, max_new_tokens=new_tokens, ignore_eos=True)))
    step = _decode_step(first + (prefill if batch == 1 else []), whole, new_tokens, "llmirc")  # (the same run at 1)
    out = {"prefill_tok_s": len(prompt) / min(prefill), "decode_tok_s": batch / step, "decode_ms_per_step": step * 1e3,
            "bytes_per_step": sum(by_dtype.values()), "bytes_per_step_by_dtype": by_dtype,
            "prefill_gflop": flops / 1e9, "params": params, "model": model.config,
            "threads": model.executor.threads, "target": model.executor.target["name"],
            "device": device, "amx": getattr(model.executor, "amx", False)}
    driver = getattr(model.executor, "driver", None)  # a GPU target's
    model.close()
    if driver is not None:  # the device's copy bandwidth, in the memory the model held
        out["device_bandwidth_gb_s"] = driver.copy_bandwidth() / 1e9
    return out


def check_same_model(model: dict, hf_dir: Path) -> None:
    """Raises LlmircError when the checkpoint in `hf_dir` is not the model of the bundle's manifest
    `model` (architecture, layers, hidden size, vocabulary): a comparison with another model's
    speed was printed as a ratio."""
    try:
        config = parse_json(read_small_text(hf_dir / "config.json"))
    except ValueError as e:
        raise LlmircError(f"--compare-transformers {hf_dir}: config.json is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise LlmircError(f"--compare-transformers {hf_dir}: config.json is not a JSON object")
    archs = config.get("architectures")
    theirs = {"architecture": archs[0] if isinstance(archs, list) and archs else None,
              "num_layers": config.get("num_hidden_layers", config.get("n_layer")),
              "hidden_size": config.get("hidden_size", config.get("n_embd")), "vocab_size": config.get("vocab_size")}
    if not str(model.get("architecture")).isidentifier():  # an ONNX export's: "ONNX (pytorch 2.13.0)"
        del theirs["architecture"]
    differ = [f"{key} {value!r}, the bundle's {model.get(key)!r}" for key, value in theirs.items()
              if value is not None and value != model.get(key)]
    if differ:
        raise LlmircError(f"--compare-transformers {hf_dir}: another model than the bundle's ({'; '.join(differ)})")


def load_transformers(hf_dir: Path):
    """transformers' float32 model of the checkpoint in `hf_dir`; LlmircError (one line) when it
    cannot load it (an unknown model type, no weights, ...)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # its "Loading weights" progress bar only at a terminal: in a log it is carriage returns
    quiet = hf_logging.is_progress_bar_enabled() and not (sys.stderr is not None and sys.stderr.isatty())
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... by what is wrong
        raise LlmircError(f"--compare-transformers {hf_dir}: transformers cannot load it: "
                          f"{' '.join(str(e).split())[:300]}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _decode_step(first: list[float], whole: list[float], new_tokens: int, engine: str) -> float:
    """Seconds per decode step: the fastest run to `new_tokens` tokens less the fastest run to the
    first (the prefill), over the steps between. LlmircError when the longer run was no slower:
    the steps took less than the timing's noise, and any figure would be made up."""
    if min(whole) <= min(first):
        raise LlmircError(f"{engine}: decode could not be timed: {new_tokens} new tokens took no longer than 1 "
                          f"({min(whole) * 1e3:.2f} ms against {min(first) * 1e3:.2f} ms); give more --new-tokens "
                          "or --repeat")
    return (min(whole) - min(first)) / (new_tokens - 1)


def bench_transformers(model, prompt: list[int], batch: int, new_tokens: int, repeat: int, threads: int) -> dict:
    """Times transformers' `model` (load_transformers) as bench_llmirc times a bundle."""
    import torch

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    prefill, first, whole = [], [], []
    with torch.inference_mode():
        for _ in range(repeat):
            prefill.append(_timed(lambda: model(ids)))
            first.append(_timed(lambda: model.generate(ids.repeat(batch, 1), max_new_tokens=1, min_new_tokens=1,
                                                       do_sample=False, pad_token_id=0)))
            whole.append(_timed(lambda: model.generate(ids.repeat(batch, 1), max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)))
    step = _decode_step(first, whole, new_tokens, "transformers")
    return {"prefill_tok_s": len(prompt) / min(prefill), "decode_tok_s": batch / step, "decode_ms_per_step": step * 1e3}


def run_bench(bundle: Path, *, prompt_len: int | None = None, new_tokens: int | None = None, batch: int = 1,
              repeat: int = 3, hf_dir: Path | None = None, threads: int | None = None,
              kv_cache_tokens: int | None = None, target: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """`prompt_len` and `new_tokens` (tokens) default to 128 and 64, or to two thirds and one third
    of a shorter context. `progress(message)`, if given, hears each stage as it starts (transformers'
    eager runs take minutes on a larger model)."""
    progress = progress or (lambda message: None)
    model = declared_model(bundle)
    context = model.get("max_position_embeddings")
    derived = new_tokens is None
    if isinstance(context, int) and not isinstance(context, bool):  # (else the load says what is wrong)
        if prompt_len is None:
            prompt_len = max(1, min(128, context * 2 // 3 if new_tokens is None else context - new_tokens,
                                    context - 2))
        if new_tokens is None:
            new_tokens = min(64, context - prompt_len)
    prompt_len, new_tokens = prompt_len or 128, 64 if new_tokens is None else new_tokens
    if new_tokens < 2 and derived:  # (the context left after --prompt-len)
        raise LlmircError(f"--prompt-len {prompt_len} leaves {max(0, new_tokens)} of the model's context of {context} "
                          "tokens to decode, and decode is timed over at least 2 new tokens")
    if new_tokens < 2:
        raise LlmircError(f"--new-tokens {new_tokens}: decode is timed over at least 2 new tokens")
    hf_model = None
    if hf_dir is not None:  # loaded first: a checkpoint transformers cannot load fails before the long run
        check_same_model(model, Path(hf_dir))
        progress(f"loading {hf_dir} in transformers")
        hf_model = load_transformers(Path(hf_dir))
    vocab = model.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:  # (the prompt's ids are drawn below it)
        raise BundleError(f"bundle {bundle}: manifest.json's model.vocab_size is {vocab!r}, not a whole number "
                          "(at least 1)")
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_len).tolist()
    progress(f"timing llmirc: prefill of {prompt_len} tokens, decode of {new_tokens}, best of {repeat}")
    ours = bench_llmirc(bundle, prompt, batch, new_tokens, repeat, threads, kv_cache_tokens, target,
                        cpu_only=hf_model is not None)
    bandwidth, peak = ours.pop("device_bandwidth_gb_s", None), None  # a GPU's: no matmul roof without a BLAS there
    if bandwidth is None:
        progress("measuring memory bandwidth and sgemm (numpy)")
        bandwidth, peak = measure_bandwidth(ours["bytes_per_step"]), measure_peak_gflops()
    floor_ms = ours["bytes_per_step"] / (bandwidth * 1e9) * 1e3
    results = {
        "bundle": str(Path(bundle).resolve()), "llmirc_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.processor() or platform.machine(),
        "threads": ours["threads"], "target": ours["target"], "device": ours["device"], "amx": ours["amx"],
        "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "repeat": repeat,
        "bandwidth_gb_s": bandwidth, "decode_floor_ms_per_step": floor_ms, "sgemm_gflop_s": peak,
        "llmirc": {k: v for k, v in ours.items() if k not in ("model", "threads", "target", "device", "amx")},
        "model": ours["model"],
    }
    results["llmirc"]["fraction_of_floor"] = floor_ms / ours["decode_ms_per_step"]
    results["llmirc"]["prefill_gflop_s"] = ours["prefill_gflop"] * ours["prefill_tok_s"] / prompt_len
    if hf_model is not None:
        progress(f"timing transformers (eager), best of {repeat}")
        results["transformers"] = bench_transformers(hf_model, prompt, batch, new_tokens, repeat, ours["threads"])
    return results


def format_table(r: dict) -> str:
    m, gpu = r["model"], r.get("device")
    amx = " (AMX tiles)" if r.get("amx") else ""
    where = f"target {r['target']} ({gpu})" if gpu else \
        f"{r['threads']} thread{'s' * (r['threads'] != 1)}, target {r['target']}{amx}"
    lines = [
        f"{r['bundle']}: {m['architecture']}, {r['llmirc']['params'] / 1e6:.1f}M parameters; "
        f"prompt {r['prompt_len']}, {r['new_tokens']} new tokens, batch {r['batch']}, best of {r['repeat']}, {where}",
        f"{'':22s}{'prefill tok/s':>14s}{'decode tok/s':>14s}{'ms/step':>10s}",
    ]
    for name, key in (("llmirc", "llmirc"), ("transformers (eager)", "transformers")):
        if key in r:
            x = r[key]
            lines.append(f"{name:22s}{x['prefill_tok_s']:14.1f}{x['decode_tok_s']:14.1f}{x['decode_ms_per_step']:10.2f}")
    if "transformers" in r:
        ours, peer = r["llmirc"], r["transformers"]
        lines.append(f"llmirc / transformers: prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x, "
                     f"decode {ours['decode_tok_s'] / peer['decode_tok_s']:.2f}x")
    split = ", ".join(f"{n / 1e6:.1f} MB {d}" for d, n in r["llmirc"]["bytes_per_step_by_dtype"].items())
    probe = "the device's copies, bytes read + written" if gpu else "numpy sgemv over as many bytes"
    lines.append(f"decode floor: {r['llmirc']['bytes_per_step'] / 1e6:.1f} MB/step ({split}) at "
                 f"{r['bandwidth_gb_s']:.1f} GB/s "
                 f"({probe}) = {r['decode_floor_ms_per_step']:.2f} ms/step; llmirc reaches "
                 f"{100 * r['llmirc']['fraction_of_floor']:.0f}% of it")
    if r["llmirc"]["fraction_of_floor"] > 1.5:  # (multithreaded BLAS stalls beside other work: 0.4 GB/s seen)
        lines.append("warning: above the floor, so the bandwidth probe was slowed (by other work on this machine, "
                     "probably): the floor is not reliable; rerun when the machine is idle")
    if r["sgemm_gflop_s"]:
        lines.append(f"prefill: {r['llmirc']['prefill_gflop_s']:.0f} GFLOP/s of matmul work, "
                     f"{100 * r['llmirc']['prefill_gflop_s'] / r['sgemm_gflop_s']:.0f}% of numpy sgemm's "
                     f"{r['sgemm_gflop_s']:.0f} GFLOP/s (1024^3)")
    else:
        lines.append(f"prefill: {r['llmirc']['prefill_gflop_s']:.0f} GFLOP/s of matmul work")
    return "\n".join(lines)
