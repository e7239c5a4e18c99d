"""GGUF block-quantized tensors kept quantized (no --dequantize): every format, repacked
losslessly into llmirc's layouts (frontend/packed.py: checked bit for bit against ggml's own
dequantization, gguf.quants) and run by the quantized kernels.

Files written by the tests (tests/gguf_files.py) from random transformers models, whose weights
are then the values the file holds. References: transformers in float64 on those values with the
kernels' activation quantization (exact up to f32 rounding and rare rounding ties: relative RMS
error below 1%, top-1 equal at 95% of the positions or more); llama.cpp (llama-cpp-python, where
installed) on the same file, which quantizes activations its own way (per 32, Q8_K per 256 for
the K-quants): relative RMS difference below 5%, top-1 equal at 90% of the positions.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from gguf_files import QUANTIZED, encode, spm_tokenizer_metadata, write_gguf
from helpers import CORPUS, hf_logits_quantized, make_checkpoint
from llmirc import dtypes, quant
from llmirc.frontend.gguf_quants import FORMATS, unpack
from llmirc.frontend.packed import GGUF_SCHEMES, repack
from test_models import compile_to

TOKENS = [1, 5, 9, 200, 17, 3, 44, 91, 12, 7, 250, 300, 31, 64, 128, 2, 8, 99, 150, 42] * 2
MATRICES = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
            "qkv_proj", "gate_up_proj",  # Phi-3's
            "wte", "wpe", "c_attn", "c_proj", "c_fc")  # the last: GPT-2's


def rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def llama_cpp_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


@pytest.mark.parametrize("kind", QUANTIZED)
def test_repack_is_lossless(kind):
    """llmirc's parts of a GGUF tensor stand for exactly ggml's dequantized values (gguf.quants)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 512)).astype(np.float32) * 0.05
    raw, ggml_values, _ = encode(w, kind, rng)
    scheme = GGUF_SCHEMES[kind]
    parts = repack("gguf", "w", scheme, 512, lambda name: unpack(FORMATS[kind], raw, 512))
    assert {p: (a.dtype, a.shape) for p, a in parts.items()} == {
        p: (np.dtype(dtypes.dtype(scheme.part_dtype(p)).storage), scheme.part_shape(p, 48, 512))
        for p in scheme.parts()}
    ours = quant.dequantize(parts, scheme, 512).astype(np.float32)  # exact in float64, rounded once
    np.testing.assert_array_equal(ours, ggml_values)
    fmt = FORMATS[kind]
    bits, file_bits = 8 * sum(a.nbytes for a in parts.values()) / w.size, 8 * fmt.type_size / fmt.block_size
    if kind not in ("Q2_K", "Q3_K"):  # the file's size but a byte per 6-bit sub-scale (Q2_K / Q3_K widen codes)
        assert bits <= file_bits + 0.125, (kind, bits, file_bits)
    if kind.startswith("IQ4"):  # the nibbles as they are (4 bits a weight), the grid in the scheme
        assert scheme.bits == 4 and scheme.values == tuple(int(v) for v in gguf.quants.IQ4_NL.kvalues)


@pytest.mark.slow
@pytest.mark.parametrize("arch,kinds,overrides", [
    # every format in one file (taken in turn over the matrices; K-quants need rows of 256)
    ("llama", QUANTIZED, dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, init_std=0.03)),
    # SmolLM2's kind of file: Q4_1 everywhere, the embedding tied to the LM head
    ("qwen2", ("Q4_1",), dict(hidden_size=128, tie_word_embeddings=True)),
    # Qwen3: q_norm and k_norm (float tensors in the file), head_dim 64 of hidden 128 over 4 heads
    ("qwen3", ("Q8_0", "Q4_1"), dict(hidden_size=128, intermediate_size=256, head_dim=64, tie_word_embeddings=True)),
    # GPT-2 (fused q/k/v, biases, learned positions, tied head): every matrix quantized, the position
    # table too (llama.cpp's quantize keeps that one float: llama-quant.cpp; other writers need not)
    ("gpt2", ("Q8_0", "Q4_0", "Q5_1", "Q6_K"), dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                                  tie_word_embeddings=True)),
    # Phi-4-mini's kind: fused qkv / gate_up, partial rotary (48 of 64), longrope's short factors, tied head
    # (llama.cpp rounds its context, 128, up to 256: within original_max_position_embeddings, short factors too)
    ("phi3", ("Q8_0", "Q4_K"), dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                    num_key_value_heads=2, init_std=0.03, tie_word_embeddings=True,
                                    partial_rotary_factor=0.75, original_max_position_embeddings=256,
                                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                     "short_factor": [1 + i / 8 for i in range(24)],
                                                     "long_factor": [1 + i for i in range(24)]})),
    # Gemma 3 1B's kind: GQA 4:1, head_dim 64 (not hidden / heads), every 6th layer full (llama.cpp's default
    # pattern), a window of 8 over the 40 tokens, local and global rotary tables, the tied head scaled embedding
    ("gemma3", ("Q8_0", "Q4_K"), dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, init_std=0.03,
                                      num_hidden_layers=7, sliding_window=8, tie_word_embeddings=True)),
    # Gemma 2: every 2nd layer full, soft-capped attention scores and logits (caps that bend this model's)
    ("gemma2", ("Q8_0", "Q4_K"), dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, init_std=0.03,
                                      num_hidden_layers=4, sliding_window=8, attn_logit_softcapping=0.5,
                                      final_logit_softcapping=1.0, tie_word_embeddings=True)),
    # SmolLM3: llama's permuted q/k, the 4th layer without rope (llama.cpp's fixed step), tied head
    ("smollm3", ("Q8_0", "Q4_K"), dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, init_std=0.03, num_hidden_layers=4,
                                       tie_word_embeddings=True)),
])
def test_kept_quantized_matches_references(tmp_path, arch, kinds, overrides):
    model = make_checkpoint(tmp_path / "ckpt", arch, **overrides)
    tokenizer = spm_tokenizer_metadata(CORPUS, model.config.vocab_size)
    path = write_gguf(model, tmp_path / "m.gguf", kinds, tokenizer=tokenizer)
    from llmirc.runtime import load

    # an f32 KV cache against the float reference; the default cache (f16 for a file whose linears are
    # all quantized, as llama.cpp's) against llama.cpp
    compiled = load(compile_to(path, tmp_path / "m.llmir", kv_cache_dtype="float32"))
    default = load(compile_to(path, tmp_path / "default.llmir"))
    assert default.bundle.manifest["kv_cache"]["dtype"] == "float16"
    manifest = compiled.bundle.manifest
    assert manifest["source"]["kind"] == "gguf"
    kernels = {k["kind"] for k in manifest["targets"][0]["kernels"]}
    assert {"qlinear", "qembedding"} <= kernels and "linear" not in kernels and "embedding" not in kernels
    weights = {}
    for name, mod in model.named_modules():
        if name.split(".")[-1] in MATRICES and not (name == "lm_head" and overrides.get("tie_word_embeddings")):
            weights[name] = (mod.weight.detach().numpy(), None, None)
    # the format of each matrix (its activation block: 16 for Q6_K) from the file
    from llmirc.frontend import open_source

    src = open_source(path)
    for name in weights:
        w, _, _ = weights[name]
        hf = "lm_head.weight" if name == "lm_head" else f"{name}.weight"
        kind = src.dtype(hf)
        weights[name] = (w, None, GGUF_SCHEMES[kind].sub_group)
    src.close()
    got = compiled.score(TOKENS)
    ref = hf_logits_quantized(model, weights, TOKENS)
    assert rel_rms(got, ref) < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, rel_rms(got, ref)
    theirs = llama_cpp_logits(path, TOKENS)
    for bundle in (compiled, default):
        got = bundle.score(TOKENS)
        assert rel_rms(got, theirs) < 0.05 and (got.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9, rel_rms(got, theirs)


@pytest.mark.parametrize("kinds,cache", [
    (("Q4_0", "F32"), "float16"),   # f32 matrices beside quantized ones are fallbacks: llama.cpp's f16 cache
    (("Q4_0", "BF16"), "bfloat16"),  # a half type left in the file is the model's
    (("F32",), "float32"),
])
def test_auto_kv_cache_of_gguf_files(tmp_path, kinds, cache):
    model = make_checkpoint(tmp_path / "ckpt", "llama", hidden_size=64, intermediate_size=128)
    path = write_gguf(model, tmp_path / "m.gguf", kinds)
    compile_to(path, tmp_path / "m.llmir")
    assert json.loads((tmp_path / "m.llmir" / "manifest.json").read_text())["kv_cache"]["dtype"] == cache
