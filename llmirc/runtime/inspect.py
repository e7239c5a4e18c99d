"""`llmirc inspect`: a summary of what a bundle holds, as a dict and as text."""

from __future__ import annotations

import re
import shlex
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
    for key, kind in SECTIONS.items():  # every bundle has them all; run needs them
        if key not in bundle.manifest:
            raise BundleError(f"bundle {bundle.name}: manifest.json lacks the field '{key}'")
        if not isinstance(bundle.manifest[key], kind):
            raise BundleError(f"bundle {bundle.name}: manifest.json field '{key}' is not a JSON "
                              f"{'object' if kind is dict else 'list'}")
    try:
        return _summary(bundle, verify)
    except KeyError as e:
        raise BundleError(f"bundle {bundle.name}: manifest.json lacks the field {e}") from None
    except (TypeError, AttributeError, ValueError) as e:  # a nested entry of the wrong type
        raise BundleError(f"bundle {bundle.name}: manifest.json has a malformed entry ({e})") from None


def _workspace(w) -> str:
    """The ABI's workspace size ({"T": bytes per token, "L": per logit row, "TT": per token
    squared, "const": fixed}) as text."""
    if not isinstance(w, dict):
        return f"{w} bytes"
    units = {"T": "token", "L": "logit row", "TT": "token squared"}
    terms = [f"{w[k]} bytes per {unit}" for k, unit in units.items() if w.get(k)]
    return " + ".join(terms + [f"{w.get('const', 0)} bytes"])


def parameter_count(manifest: dict, shapes: list) -> int:
    """The model's parameters in a bundle whose weights (manifest["weights"]["order"]) have these
    shapes: `logical_sizes`, less a second copy of a tensor in another type (`NAME.1` beside `NAME`,
    or a float `NAME` beside quantized `NAME.codes`: a tied LM head stored apart from its table),
    which counts nothing."""
    order = manifest["weights"]["order"]
    names, counted, total = set(order), set(), 0
    for name, size in zip(order, logical_sizes(manifest, shapes)):
        if (m := re.fullmatch(r"(.+)\.\d+", name)) and m[1] in names:
            name = m[1]
        name = name.removesuffix(".codes")
        if size and name not in counted:
            counted.add(name)
            total += size
    return total


def logical_sizes(manifest: dict, shapes: list) -> list[int]:
    """Elements of each weight (manifest["weights"]["order"], of these shapes) as the model's
    matrices count them: a quantized weight's codes its logical n x k (k from the qlinear /
    qembedding kernel that reads them), not its packed bytes; its scales, zero points and input
    order nothing; any other weight its elements."""
    order = manifest["weights"]["order"]
    kernels = {k["symbol"]: k for t in manifest.get("targets") or [] for k in t.get("kernels") or []}
    columns: dict[int, int] = {}  # index of a quantized weight's codes -> its logical input size
    for call in manifest.get("plan") or []:
        kernel, codes = kernels.get(call["kernel"]), call["args"].get("codes")
        if kernel and kernel["kind"] in ("qlinear", "qembedding") and isinstance(codes, dict):
            columns[codes["index"]] = int(kernel["params"].get("k") or kernel["params"]["dim"])
    parts = set()  # their scales, zeros and perm (`NAME.codes.1`, a copy: `NAME.scales.1`, ...)
    for i in columns:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(order):  # (summary names the manifest)
            raise ValueError(f"the plan reads weight {i!r:.40}, which weights.order does not list")
        if m := re.fullmatch(r"(.+)\.codes((?:\.\d+)?)", order[i]):
            parts.update(f"{m[1]}.{part}{m[2]}" for part in ("scales", "zeros", "perm"))
    return [0 if name in parts else int(shape[0]) * columns[i] if i in columns else _numel(shape)
            for i, (name, shape) in enumerate(zip(order, shapes))]


def _summary(bundle: Bundle, verify: bool) -> dict:
    m = bundle.manifest
    files = m["files"]
    sizes = Counter()
    for f in files:
        sizes[f["path"].split("/")[0]] += f["size"]
    weights = bundle.open_safetensors(m["weights"]["file"])
    by_dtype = Counter()
    for name in weights.names():
        if name.startswith(PADDING_PREFIX):
            continue
        dtype, shape = weights.info(name)
        by_dtype[dtypes.dtype(dtype).name] += _numel(shape) * dtypes.dtype(dtype).itemsize
    num_params = parameter_count(m, [weights.info(name)[1] for name in m["weights"]["order"]])
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
        "targets": [_target(t) for t in m.get("targets", [])],
        "quantization": _quantization(m, calls),
        "compile_options": m.get("compile_options"),  # (bundles of llmirc before 2026-12-02: None)
        "calibration": m.get("calibration"),  # text sha256, tokens, windows (None: not calibrated, or before 2026-12-03)
        "plan": {"kernel_calls": sum(calls.values()), "calls_per_kernel": dict(calls)},
        "workspace_bytes": m.get("abi", {}).get("workspace"),
        "passes": m.get("passes"),
        "rewrites": m.get("rewrites") if isinstance(m.get("rewrites"), dict) else {},
        "ir": m.get("ir"),
        "tokenizer": m.get("tokenizer"),
        "sizes_bytes": dict(sizes),
        "verified": verify,
    }


def _quantization(m: dict, calls: Counter) -> list[dict]:
    """How the linears and embedding tables of the first target store their weights: one entry
    per storage (float dtype, or bits, group size, zero points, scale dtype, act-order) with the
    kernel calls of one forward that read it."""
    kernels = (m.get("targets") or [{}])[0].get("kernels") or []
    kinds = {"linear": "linear", "qlinear": "linear", "embedding": "embedding", "qembedding": "embedding"}
    storages: Counter = Counter()
    for k in kernels:
        if k["kind"] not in kinds:
            continue
        p = k["params"]
        if k["kind"].startswith("q"):
            row = p.get("k", p.get("dim"))  # a linear's inputs, an embedding table's row
            key = (kinds[k["kind"]], f"int{p['bits']}", p["group_size"] if p["group_size"] != row else "row",
                   p["zero"], p["scale_dtype"], bool(p.get("act_order")), tuple(p.get("values") or ()) or None,
                   p.get("super_group") or None)
        else:
            key = (kinds[k["kind"]], p.get("w_dtype") or p.get("dtype") or "float32", None, None, None, False, None,
                   None)
        storages[key] += calls.get(k["symbol"], 0)
    fields = ("op", "storage", "group_size", "zero", "scale_dtype", "act_order", "values", "super_group")
    return [{**{f: list(v) if f == "values" else v for f, v in zip(fields, key) if v is not None}, "calls": n}
            for key, n in storages.items()]


def _storage(q: dict) -> str:
    """The rest of a quantized storage's description (`_quantization`), after its bits."""
    if "group_size" not in q:
        return ""
    row = "per output row" if q.get("op") == "linear" else "per row"  # (an embedding table's row: a token's)
    groups = row if q["group_size"] == "row" else f"groups of {q['group_size']}"
    zero = {"none": "symmetric", "int": "zero points", "min": "mins"}.get(q["zero"], q["zero"])
    table = f", a table of {len(q['values'])} values" if q.get("values") else ""
    scales = f"{q['scale_dtype']} scales"
    if q.get("super_group"):
        scales = f"{q['scale_dtype']} sub-scales under float16 ones per {q['super_group']}"
    return f" ({groups}, {zero}{table}, {scales}{', act-order' if q['act_order'] else ''})"


def _target(t: dict) -> dict:
    """A target's summary: a CPU library, or a GPU architecture's compiled kernels (plan kernel ->
    the Triton kernels its launch rule may run, with warps and shared memory)."""
    out = {"name": t["name"], "kind": t.get("kind", "cpu"),
           "kernels": [k["symbol"] + ": " + k["kind"] for k in t["kernels"]]}
    if out["kind"] == "cpu":
        return out | {"cpu": t.get("cpu"), "features": t.get("features"), "library": t["library"]}
    binaries = t["binaries"]
    launched = {k["symbol"]: list(dict.fromkeys(ln["kernel"] for v in k["rule"]["variants"] for ln in v["launches"]))
                for k in t["kernels"]}
    return out | {"arch": t["arch"], "binaries": len(binaries), "ptx_portable": bool(t.get("ptx_portable")),
                  "compile_seconds": t.get("compile_seconds", {}),
                  "launches": {s: [f"{binaries[key]['kernel']} ({binaries[key]['num_warps']} warps, "
                                   f"{binaries[key]['shared']} B shared)" for key in keys]
                               for s, keys in launched.items()}}


# manifest compile_options field -> (`llmirc compile` flag, its default): driver.CompileOptions.recorded(), which a
# test compares with these (the loader imports nothing of the compiler)
COMPILE_FLAGS = {
    "targets": ("--target", ["cpu"]), "passes": ("--passes", None),
    "keep_intermediates": ("--keep-intermediates", False),
    "cpu_variants": ("--cpu-variants", ["native", "baseline"]), "archs": ("--arch", []), "dtype": ("--dtype", "auto"),
    "kv_cache_dtype": ("--kv-cache-dtype", "auto"), "quant": ("--quant", "none"),
    "quant_group_size": ("--quant-group-size", 0), "quant_symmetric": ("--quant-zero-points", True),
    "quant_keep": ("--quant-keep", ["embedding"]), "quant_lm_head": ("--quant-lm-head", "auto"),
    "quant_method": ("--quant-method", "rtn"), "quant_rotate": ("--quant-rotate", None),
    "quant_smooth": ("--quant-smooth", None), "calibration": ("--calibration", None),
    "calibration_tokens": ("--calibration-tokens", 8192), "quant_iters": ("--quant-iters", 200),
    "dequantize": ("--dequantize", False), "block_size": ("--block-size", None),
    "max_model_len": ("--max-model-len", None), "gpu_fusions": ("gpu_fusions", False), "gpu_pdl": ("gpu_pdl", False)}


def compile_flags(options) -> str:
    """The manifest's compile_options as the `llmirc compile` flags that differ from the defaults
    (the text `inspect` shows; CompileOptions' gpu_fusions and gpu_pdl, which have no flag, as
    NAME=VALUE)."""
    if not isinstance(options, dict):
        return "not recorded (a bundle of llmirc before 2026-12-02)"
    flags = []
    for key, value in options.items():
        flag, default = COMPILE_FLAGS.get(key, (key, None))
        if key == "quant_rotate":  # recorded: the rotation used (None: not quantized); its default depends
            default = options.get("quant") == "int4" and options.get("quant_method") in ("gptq", "autoround")
            if value is None or value == default:
                continue
            flags.append("--quant-rotate" if value else "--no-quant-rotate")
        elif value == default:
            continue
        elif isinstance(value, bool) and flag.startswith("--"):
            flags.append(flag)  # (quant_symmetric false: --quant-zero-points)
        elif not flag.startswith("--"):  # (a field of a newer llmirc too)
            flags.append(f"{key}={value}")
        elif key == "quant_keep" and isinstance(value, list):
            flags.append(f"{flag} " + shlex.quote(",".join(map(str, value)) or "none"))
        else:
            flags.append(f"{flag} " + shlex.quote(",".join(map(str, value)) if isinstance(value, list) else str(value)))
    return " ".join(flags) or "default"


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
        text = _describe(info)
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as e:  # the manifest is untrusted
        raise BundleError(f"bundle {info['bundle']}: manifest.json has a malformed entry ({e})") from None
    # its strings too: a control character (a terminal escape sequence in `producer`, a kernel's symbol) is
    # shown escaped, as repr shows it, not sent to the terminal
    return "\n".join(line if line.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
                     for line in text.split("\n"))


def _windows(model: dict) -> str:
    """', sliding window [W, ...]' of the manifest's per-layer windows (0: full attention), and on how many
    layers where the others attend in full (Gemma 3's five of every six)."""
    per_layer = list(model.get("sliding_windows", []) or [])
    windows = sorted(set(per_layer) - {0})
    if not windows:
        return ""
    sliding = sum(1 for w in per_layer if w)
    return f", sliding window {windows}" + (f" on {sliding} of {len(per_layer)} layers" if sliding < len(per_layer)
                                             else "")


def _nope(model: dict) -> str:
    """', no rotary embedding on 1 of 4 layers' where some layers have one and others not (SmolLM3's NoPE)."""
    rope, layers = model.get("rope_layers"), model.get("num_layers")
    if not isinstance(rope, int) or not isinstance(layers, int) or not 0 < rope < layers:
        return ""
    return f", no rotary embedding on {layers - rope} of {layers} layers"


def _softcaps(model: dict) -> str:
    """', soft-capped: attention 50, logits 30' (Gemma 2) where the manifest records the caps."""
    caps = [f"{what} {model[key]:g}" for what, key in (("attention", "attention_softcap"), ("logits", "logits_softcap"))
            if model.get(key)]
    return f", soft-capped: {', '.join(caps)}" if caps else ""


def _describe(info: dict) -> str:
    model, kv = info["model"] or {}, info["kv_cache"] or {}
    lines = [
        f"bundle     {info['bundle']}  (format {info['format_version']}, {info['producer']}, {info['created_utc']})",
        f"model      {model.get('architecture')}: {_layers(model)}vocab {model.get('vocab_size')}, "
        f"context {model.get('max_position_embeddings')}"
        + (f" ({model['context_from']})" if model.get("context_from") else "")
        + _windows(model) + _nope(model) + _softcaps(model),
        f"weights    {info['weights']['parameters'] / 1e6:.2f}M parameters in {info['weights']['tensors']} tensors: "
        + ", ".join(f"{n / 2**20:.2f} MiB {d}" for d, n in info["weights"]["bytes_by_dtype"].items())
        + f" ({len(info['weights']['derived'])} concatenated, transposed or cast at compile time)",
        *[f"  {q['op']} {q['storage']}{_storage(q)}: {q['calls']} call{'s' * (q['calls'] != 1)} per step"
          for q in info["quantization"]],
        _execution(model),
        f"kv cache   paged: block size {kv.get('block_size')}, {kv.get('num_layers')} layers x "
        f"{kv.get('num_kv_heads')} kv heads x {kv.get('head_dim')}, {kv.get('dtype')}, layout [{kv.get('layout')}]"
        if kv.get("num_layers") != 0 else "kv cache   none (no attention layer uses one)",
        f"plan       {info['plan']['kernel_calls']} kernel calls per step; workspace "
        f"{_workspace(info['workspace_bytes'])}",
        "options    " + compile_flags(info.get("compile_options")),
        "passes     " + (info["passes"] or "none (--passes '': the required passes only)"),
        *[f"  {what}  x{n}" for what, n in sorted(info["rewrites"].items())],
        f"tokenizer  {info['tokenizer'] or 'none'}",
        "targets",
    ]
    for t in info["targets"]:
        if t["kind"] == "cpu":
            lines.append(f"  {t['name']:24s} cpu={t['cpu']}  {len(t['kernels'])} kernels  {t['library']}")
            lines.append(f"  {'':24s} needs: {', '.join(t['features']) or '-'}")
        else:
            lines.append(f"  {t['name']:24s} {t['kind']} {t['arch']}  {len(t['kernels'])} kernels, {t['binaries']} "
                         f"binaries{', PTX for newer GPUs' if t['ptx_portable'] else ''}")
    calls = info["plan"]["calls_per_kernel"]
    cpu = [t for t in info["targets"] if t["kind"] == "cpu"]
    lines.append("kernels (" + cpu[0]["name"] + ")" if cpu else "kernels: no cpu target")
    for k in cpu[0]["kernels"] if cpu else []:
        lines.append(f"  {k}  x{calls.get(k.split(':')[0], 0)}")
    for t in info["targets"]:
        if t["kind"] != "cpu":
            took = ", ".join(f"{s} {v:.1f}s" for s, v in t["compile_seconds"].items())
            lines.append(f"kernels ({t['name']}" + (f"; compile {took})" if took else ")"))
            for k in t["kernels"]:
                symbol = k.split(":")[0]
                lines.append(f"  {k}  x{calls.get(symbol, 0)}: " + "; ".join(t["launches"].get(symbol, [])))
    lines.append("sizes      " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(info["sizes_bytes"].items())))
    lines.append(f"checksums  {'verified' if info['verified'] else 'not verified (--no-verify)'} (every file "
                 "but manifest.json, whose values loading checks against the library: --load)")
    if "loads" in info:
        lines.append(f"loads      yes, target {info['loads']['target']}")
        lines += [f"           not using {note}" for note in info["loads"].get("not_used", [])]
        if info["loads"].get("checked"):
            lines.append(f"           checked without a GPU: {', '.join(info['loads']['checked'])}")
    return "\n".join(lines)
