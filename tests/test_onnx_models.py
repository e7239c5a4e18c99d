"""ONNX exports (torch.onnx: the dynamo exporter, and the TorchScript one where it still runs) of
transformers models, compiled into paged, incremental decoders and compared with transformers on
the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import check_greedy, export_onnx, hf_greedy, hf_logits, make_checkpoint
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.runtime import load

pytestmark = pytest.mark.slow

CASES = {
    "llama-mask-positions": ("llama", dict(num_key_value_heads=1), dict(with_mask=True)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True), {}),
    "gpt2": ("gpt2", {}, {}),
    "llama-torchscript": ("llama", dict(num_key_value_heads=2), dict(torchscript=True)),
    # q wider than the hidden size, q/k/v not fused (q's bias a weight, k's and v's constants), gate/up
    # fused: the split's views released the slot twice, and two live values shared it
    "llama-headdim-bias": ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                         attention_bias=True), {}),
    "gpt2-torchscript": ("gpt2", {}, dict(torchscript=True)),

    "qwen3-bias-tied-torchscript": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True),
                                    dict(torchscript=True)),
    # opset 23: RMSNormalization, RotaryEmbedding and Attention, expanded into their ONNX function bodies (past
    # key/value inputs and sliding windows are read as at opset 18: the graph's own Concat and mask)
    "llama-past-kv-opset23": ("llama", dict(num_key_value_heads=1), dict(opset=23, with_past=True)),
    # per-head q/k norms; q wider than the hidden size, as Qwen3's checkpoints have it
    "qwen3-headdim-opset23": ("qwen3", dict(hidden_size=128, head_dim=64, intermediate_size=96), dict(opset=23)),
    # with past_key_values: the present keys, truncated to the window, are no affine shape (not read)
    "mistral-sliding-past-kv-opset23": ("mistral", dict(sliding_window=8), dict(opset=23, with_past=True)),
    # Gemma 2 (eager attention): soft-capped scores (tanh(s / cap) * cap before the mask) and logits, sliding and
    # full layers alternating, sandwich norms of 1 + w, the scaled embedding; with attention_mask and position_ids
    "gemma2-softcap-sliding-mask": ("gemma2", dict(sliding_window=5, attn_logit_softcapping=1.0,
                                                   final_logit_softcapping=2.0), dict(with_mask=True)),
}
PROMPTS = [[0, 5, 9, 200, 17], [0] + [(7 * i + 3) % 380 for i in range(30)]]


@pytest.mark.parametrize("case", CASES)
def test_onnx_export_matches_transformers(tmp_path, case):
    arch, config, export = CASES[case]
    model = make_checkpoint(tmp_path / "ckpt", arch, **config)
    onnx_path = export_onnx(model, tmp_path / "onnx" / "model.onnx", **export)
    bundle = tmp_path / "m.llmir"
    compile_model(onnx_path, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "onnx"
    assert manifest["kv_cache"]["num_layers"] == 2  # the paged cache, though the graph had none
    assert not manifest["model"].get("full_sequence")  # fully recognized: incremental decode
    assert "llmir.paged_attention" in (bundle / "ir" / "optimized.mlir").read_text()

    compiled = load(bundle)
    outs = compiled.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
    for prompt, got in zip(PROMPTS, outs):
        check_greedy(model, prompt, got, hf_greedy(model, prompt, 24))
    seq = PROMPTS[1] + outs[1]
    ref = hf_logits(model, seq)
    np.testing.assert_allclose(compiled.score(seq), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# Half-precision exports (model.half() / .to(torch.bfloat16), then torch.onnx.export): llmirc stores the
# linear and embedding weights in the export's type and computes in float32, as for f16/bf16 safetensors
# checkpoints. With a float32 KV cache the reference is transformers in float32 on the rounded weights
# (1e-4, as for those checkpoints), and the export itself,
# which computes in half precision, agrees within half-precision tolerances: onnxruntime (float16; its CPU
# provider has no bfloat16 kernels) within 1e-2 and transformers in bfloat16 within 5e-2 of the largest logit.
HALF_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}


# Two of the four (arch, dtype) pairs, for time: bfloat16 GPT-2 also stores its GELU constants rounded.
@pytest.mark.parametrize("arch,dtype", [("llama", "float16"), ("gpt2", "bfloat16")])
def test_half_precision_onnx_export(tmp_path, arch, dtype):
    import onnxruntime as ort
    import torch

    model = make_checkpoint(tmp_path / "ckpt", arch, dtype=dtype)  # float32, the rounded weights
    half = type(model).from_pretrained(tmp_path / "ckpt", dtype=getattr(torch, dtype)).eval()
    onnx_path = export_onnx(half, tmp_path / "onnx" / "model.onnx")
    bundle = tmp_path / "m.llmir"
    compile_model(onnx_path, bundle, CompileOptions(cpu_variants=("native",), kv_cache_dtype="float32"), Progress(None))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert not manifest["model"].get("full_sequence")
    weight_bytes = manifest["model"]["weight_bytes"]
    assert max(weight_bytes, key=weight_bytes.get) == dtype, weight_bytes

    compiled = load(bundle)
    prompt = PROMPTS[0]
    got_tokens = compiled.generate([prompt], max_new_tokens=16, ignore_eos=True)[0]
    check_greedy(model, prompt, got_tokens, hf_greedy(model, prompt, 16))
    seq = PROMPTS[1]
    got, ref = compiled.score(seq), hf_logits(model, seq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    if dtype == "float16":
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        export = sess.run(None, {"input_ids": np.array([seq], np.int64)})[0][0].astype(np.float64)
    else:
        export = hf_logits(half, seq)
    assert np.abs(got - export).max() <= HALF_TOLERANCE[dtype] * np.abs(export).max()
