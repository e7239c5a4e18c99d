"""`llmirc inspect`: a summary of what a bundle holds, as a dict and as text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from llmirc import dtypes
from llmirc.artifact_format.reader import Bundle, open_bundle
from llmirc.artifact_format.safetensors import PADDING_PREFIX
from llmirc.errors import BundleError


# Manifest sections inspect reads, and their JSON types (the manifest is untrusted input).
SECTIONS = {"model": dict, "generation": dict, "kv_cache": dict, "abi": dict, "weights": dict, "targets": list,
            "plan": list}


def summary(path: Path, verify: bool = True) -> dict:
    bundle = open_bundle(path, verify=verify)
    for key, kind in SECTIONS.items():
        if key in bundle.manifest and not isinstance(bundle.manifest[key], kind):
            raise BundleError(f"bundle {bundle.name}: manifest.json field '{key}' is not a JSON "
                              f"{'object' if kind is dict else 'list'}")
    try:
        return _summary(bundle, verify)
    except KeyError as e:
        raise BundleError(f"bundle {bundle.name}: manifest.json lacks the field {e}") from None
    except (TypeError, AttributeError, ValueError) as e:  # a nested entry of the wrong type
        raise BundleError(f"bundle {bundle.name}: manifest.json has a malformed entry ({e})") from None


def _summary(bundle: Bundle, verify: bool) -> dict:
    m = bundle.manifest
    files = m["files"]
    sizes = Counter()
    for f in files:
        sizes[f["path"].split("/")[0]] += f["size"]
    weights = bundle.open_safetensors(m["weights"]["file"])
    num_params, by_dtype = 0, Counter()
    for name in weights.names():
        if name.startswith(PADDING_PREFIX):
            continue
        dtype, shape = weights.info(name)
        d = dtypes.dtype(dtype)
        num_params += _numel(shape)
        by_dtype[d.name] += _numel(shape) * d.itemsize
    calls = Counter(step["kernel"] for step in m.get("plan", []))
    return {
        "bundle": str(bundle.root),
        "format_version": m.get("format_version"),
        "producer": m.get("producer"),
        "created_utc": m.get("created_utc"),
        "source": m.get("source"),
        "model": m.get("model"),
        "generation": m.get("generation"),
        "kv_cache": m.get("kv_cache"),
        "weights": {"file": m["weights"]["file"], "tensors": len(m["weights"]["order"]),
                    "parameters": num_params, "bytes_by_dtype": dict(by_dtype),
                    "derived": m["weights"].get("derived", {})},
        "targets": [{"name": t["name"], "cpu": t.get("cpu"), "features": t.get("features"),
                     "library": t["library"], "kernels": [k["symbol"] + ": " + k["kind"] for k in t["kernels"]]}
                    for t in m.get("targets", [])],
        "plan": {"kernel_calls": sum(calls.values()), "calls_per_kernel": dict(calls)},
        "workspace_bytes": m.get("abi", {}).get("workspace"),
        "passes": m.get("passes"),
        "rewrites": m.get("rewrites") if isinstance(m.get("rewrites"), dict) else {},
        "ir": m.get("ir"),
        "tokenizer": m.get("tokenizer"),
        "sizes_bytes": dict(sizes),
        "verified": verify,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _execution(model: dict) -> str:
    if not model.get("full_sequence"):
        return "execution  incremental: prefill once, then one token per step (paged KV cache)"
    ops = model.get("generic_ops") or {}
    listed = ", ".join(f"{k} x{n}" for k, n in ops.items()) if isinstance(ops, dict) else str(ops)
    return (f"execution  full-sequence model (ONNX ops left generic: {listed}): correct but slow, every step "
            "recomputes the whole sequence")


def _layers(model: dict) -> str:
    if "num_layers" not in model:  # a full-sequence model with no attention recognized
        return "no attention recognized, "
    which = "recognized attention layers" if model.get("full_sequence") else "layers"
    return (f"{model.get('num_layers')} {which}, hidden {model.get('hidden_size')}, heads {model.get('num_heads')}/"
            f"{model.get('num_kv_heads')} kv x {model.get('head_dim')}, ")


def describe(info: dict) -> str:
    """`summary` as text; BundleError when a manifest field it shows has the wrong type."""
    try:
        return _describe(info)
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as e:  # the manifest is untrusted
        raise BundleError(f"bundle {info['bundle']}: manifest.json has a malformed entry ({e})") from None


def _describe(info: dict) -> str:
    model, kv = info["model"] or {}, info["kv_cache"] or {}
    windows = sorted(set(model.get("sliding_windows", []) or [0]) - {0})
    lines = [
        f"bundle     {info['bundle']}  (format {info['format_version']}, {info['producer']}, {info['created_utc']})",
        f"model      {model.get('architecture')}: {_layers(model)}vocab {model.get('vocab_size')}, "
        f"context {model.get('max_position_embeddings')}"
        + (f" ({model['context_from']})" if model.get("context_from") else "")
        + (f", sliding window {windows}" if windows else ""),
        f"weights    {info['weights']['parameters'] / 1e6:.2f}M parameters in {info['weights']['tensors']} tensors: "
        + ", ".join(f"{n / 2**20:.2f} MiB {d}" for d, n in info["weights"]["bytes_by_dtype"].items())
        + f" ({len(info['weights']['derived'])} concatenated, transposed or cast at compile time)",
        _execution(model),
        f"kv cache   paged: block size {kv.get('block_size')}, {kv.get('num_layers')} layers x "
        f"{kv.get('num_kv_heads')} kv heads x {kv.get('head_dim')}, {kv.get('dtype')}, layout [{kv.get('layout')}]"
        if kv.get("num_layers") != 0 else "kv cache   none (no attention layer uses one)",
        f"plan       {info['plan']['kernel_calls']} kernel calls per step; workspace "
        f"{info['workspace_bytes']} bytes (per T tokens / L logit rows / TT: T^2)",
        f"passes     {info['passes']}",
        *[f"  {what}  x{n}" for what, n in sorted(info["rewrites"].items())],
        f"tokenizer  {info['tokenizer'] or 'none'}",
        "targets",
    ]
    for t in info["targets"]:
        lines.append(f"  {t['name']:24s} cpu={t['cpu']}  {len(t['kernels'])} kernels  {t['library']}")
        lines.append(f"  {'':24s} needs: {', '.join(t['features']) or '-'}")
    lines.append("kernels (" + info["targets"][0]["name"] + ")" if info["targets"] else "kernels: none")
    if info["targets"]:
        calls = info["plan"]["calls_per_kernel"]
        for k in info["targets"][0]["kernels"]:
            lines.append(f"  {k}  x{calls.get(k.split(':')[0], 0)}")
    lines.append("sizes      " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(info["sizes_bytes"].items())))
    lines.append(f"checksums  {'verified' if info['verified'] else 'not verified (--no-verify)'}")
    return "\n".join(lines)
