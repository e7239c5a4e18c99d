"""GPTQ and AWQ checkpoints, kept quantized, against transformers on their dequantized weights.

The tests write the checkpoints themselves: a random float Llama (save_pretrained), its
linears quantized per group (round to nearest, AutoGPTQ's Quantizer conventions for scales and
zero points) and packed as AutoGPTQ/GPTQModel and AutoAWQ publish them (qweight, qzeros,
scales, g_idx; layouts in llmirc/frontend/packed.py, packed here independently), with
config.json's quantization_config. References: transformers with the dequantized weights and
the kernels' activation quantization (exact up to f32 rounding and rare rounding ties:
relative RMS error below 1%, top-1 equal at 95% of the positions), and the float model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import hf_logits, hf_logits_quantized, make_checkpoint
from llmirc.artifact_format.safetensors import open_safetensors, save_safetensors
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import CheckpointError
from llmirc.runtime import load

pytestmark = pytest.mark.slow

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = [0, 5, 9, 200, 17, 3, 44, 91, 12, 7, 250, 300, 31, 64, 128, 2, 8, 99, 150, 42] * 2
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_groups(w, bits, group, sym, g_idx):
    """Round-to-nearest per (output, group of inputs given by g_idx): codes q [k, n] (GPTQ's
    [in, out] orientation), zeros [groups, n], float16 scales [groups, n]."""
    n, k = w.shape
    maxq = 2 ** bits - 1
    ngroups = int(g_idx.max()) + 1
    q = np.zeros((k, n), np.int64)
    zeros = np.zeros((ngroups, n), np.int64)
    scales = np.zeros((ngroups, n), np.float16)
    for gi in range(ngroups):
        cols = np.nonzero(g_idx == gi)[0]
        block = w[:, cols]
        lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        scale = ((hi - lo) / maxq).astype(np.float16)
        scale[scale == 0] = 1
        z = np.full(n, (maxq + 1) // 2) if sym else np.clip(np.rint(-lo / scale.astype(np.float64)), 0, maxq)
        q[cols] = np.clip(np.rint(block / scale.astype(np.float64)[:, None]) + z[:, None], 0, maxq).T
        zeros[gi], scales[gi] = z, scale
    deq = (q.T - zeros[g_idx].T) * scales.astype(np.float64)[g_idx].T  # [n, k]
    return q, zeros, scales, deq


def pack_rows(values, bits):
    """int32 rows of 32/bits consecutive rows of values, the first in the lowest bits (GPTQ qweight)."""
    per = 32 // bits
    v = values.astype(np.uint32).reshape(values.shape[0] // per, per, -1)
    out = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for t in range(per):
        out |= v[:, t] << np.uint32(bits * t)
    return out.view(np.int32)


def pack_cols(values, bits, order=None):
    """int32 columns of 32/bits consecutive columns (GPTQ qzeros; AWQ's with its interleaving)."""
    per = 32 // bits
    order = order or list(range(per))
    v = values.astype(np.uint32)
    out = np.zeros((v.shape[0], v.shape[1] // per), np.uint32)
    for t in range(per):
        out |= (v[:, order[t]::per] & np.uint32(2 ** bits - 1)) << np.uint32(bits * t)
    return out.view(np.int32)


def write_quantized(src, ckpt, method, bits, group, sym=False, act_order=False, fmt="gptq", seed=0):
    """The checkpoint at `src` with packed linears, written to `ckpt`; returns {module: (w, perm)}."""
    rng = np.random.default_rng(seed)
    ckpt.mkdir()
    with open_safetensors(src / "model.safetensors") as f:
        tensors = {name: np.array(f.array(name)) for name in f.names()}
    weights = {}
    for name in [n for n in tensors if n.endswith(".weight") and n.split(".")[-2] in LINEARS]:
        prefix = name[: -len(".weight")]
        w = tensors.pop(name).astype(np.float64)
        n, k = w.shape
        g = k if group == -1 else group
        g_idx = np.arange(k) // g
        if act_order:  # GPTQ's desc_act: groups formed in a permuted order of the inputs
            order = rng.permutation(k)
            g_idx = np.empty(k, np.int64)
            g_idx[order] = np.arange(k) // g
        q, zeros, scales, deq = quantize_groups(w, bits, g, sym, g_idx)
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = pack_rows(q, bits)
            tensors[f"{prefix}.qzeros"] = pack_cols(zeros - 1 if fmt == "gptq" else zeros, bits)
            tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
        else:
            tensors[f"{prefix}.qweight"] = pack_cols(q, bits, AWQ_ORDER)
            tensors[f"{prefix}.qzeros"] = pack_cols(zeros, bits, AWQ_ORDER)
        tensors[f"{prefix}.scales"] = scales
        perm = np.argsort(g_idx, kind="stable") if act_order else None
        weights[prefix] = (deq, perm, 32)
    save_safetensors(ckpt / "model.safetensors", tensors, {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                         "desc_act": act_order, "checkpoint_format": fmt}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group,
                                         "zero_point": True, "version": "gemm"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return weights


CASES = {
    "gptq-4bit-g32-sym": dict(method="gptq", bits=4, group=32, sym=True),
    "gptq-4bit-g64-act-order": dict(method="gptq", bits=4, group=64, act_order=True),
    "gptq_v2-8bit-per-channel": dict(method="gptq", bits=8, group=-1, fmt="gptq_v2"),
    "awq-4bit-g32": dict(method="awq", bits=4, group=32),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_checkpoint_matches_transformers(tmp_path, case):
    model = make_checkpoint(tmp_path / "float", "llama", intermediate_size=576, num_key_value_heads=4)
    ckpt = tmp_path / "ckpt"
    weights = write_quantized(tmp_path / "float", ckpt, **CASES[case])
    bundle = tmp_path / "q.llmir"
    # an f32 cache against the float reference (auto gives this file, whose float linear is an f32
    # LM head beside the packed ones, llama.cpp's f16 cache: passes/kv_cache_dtype.py)
    compile_model(ckpt, bundle, CompileOptions(cpu_variants=("native",), kv_cache_dtype="float32"), Progress(None))
    compiled = load(bundle)
    got = compiled.score(TOKENS)
    ref = hf_logits_quantized(model, weights, TOKENS)
    err = np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean())
    assert err < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, err
    float_ref = hf_logits(model, TOKENS)
    assert np.sqrt(((got - float_ref) ** 2).mean() / (float_ref ** 2).mean()) < (0.05 if CASES[case]["bits"] == 8
                                                                                  else 0.4)
    manifest = compiled.bundle.manifest
    stored = manifest["weights"]["dtypes"]
    # kept quantized: no float copy of a quantized linear, 4-bit codes in half a byte per weight
    assert not any(n.endswith("proj.weight") for n in stored)
    codes = [n for n in stored if n.endswith(".codes")]
    assert codes and all(stored[n] == "uint8" for n in codes)
    kernels = [k for k in manifest["targets"][0]["kernels"] if k["kind"] == "qlinear"]
    assert kernels and all(k["params"]["bits"] == CASES[case]["bits"] for k in kernels)
    act_order = CASES[case].get("act_order", False)  # (a single group per row is in order)
    assert all(k["params"]["act_order"] == (act_order and k["params"]["k"] > CASES[case]["group"]) for k in kernels)
    zero = "none" if CASES[case].get("sym") else "int"
    assert all(k["params"]["zero"] == zero for k in kernels), [k["params"] for k in kernels]


def test_bad_quantization_configs(tmp_path):
    make_checkpoint(tmp_path / "float", "llama")
    ckpt = tmp_path / "ckpt"
    write_quantized(tmp_path / "float", ckpt, method="gptq", bits=4, group=32)
    config = json.loads((ckpt / "config.json").read_text())

    def compile_with(qconfig):
        (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
        compile_model(ckpt, None, CompileOptions(emit="mlir"), Progress(None))

    for qconfig, message in (({"quant_method": "bitsandbytes"}, "unsupported quantization method"),
                             ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "3-bit"),
                             ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"},
                              "unsupported AWQ variant"),
                             ({"quant_method": "gptq", "bits": 4, "group_size": 64}, "qzeros")):
        with pytest.raises(CheckpointError, match=message):
            compile_with(qconfig)
