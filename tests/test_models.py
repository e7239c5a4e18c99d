"""Whole models against Hugging Face transformers (float32) on checkpoints the tests make.

For each architecture and each config option that changes the math: greedy tokens equal for
32 new tokens on a batch of prompts of different lengths (a divergence only where the
reference's top two logits are nearly tied), and `score` logits within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import check_greedy, hf_greedy, hf_logits, make_checkpoint
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.runtime import load

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
PROMPTS = [[0, 5, 9, 200, 17], list(range(2, 19)), [0] + [(7 * i + 3) % 380 for i in range(40)]]

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-headdim-bias": ("llama", dict(num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True)),
    "llama-tied-linear-rope": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("llama", dict(rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-yarn-gelu": ("llama", dict(hidden_act="gelu_pytorch_tanh", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    # Phi-3 style: original_max_position_embeddings at the top level, where transformers reads it first.
    "llama-yarn-original-top-level": ("llama", dict(original_max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})),
    "mistral-sliding": ("mistral", dict(sliding_window=8)),
    "gpt2": ("gpt2", {}),
    "gpt2-untied-relu-layer-scaled": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu",
                                                   scale_attn_by_inverse_layer_idx=True)),
    "qwen2-tied-sliding": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                                         max_window_layers=1)),
}


def compile_to(ckpt, out, **options):
    compile_model(ckpt, out, CompileOptions(cpu_variants=("native",), **options), Progress(None))
    return out


def check_model(model, bundle, prompts=PROMPTS, **load_options):
    compiled = load(bundle, **load_options)
    ours = compiled.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, got in zip(prompts, ours):
        check_greedy(model, prompt, got, hf_greedy(model, prompt, NEW_TOKENS))
    seq = prompts[-1] + ours[-1]
    ref = hf_logits(model, seq)
    got = compiled.score(seq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    return compiled


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    model = make_checkpoint(tmp_path / "ckpt", arch, **overrides)
    check_model(model, compile_to(tmp_path / "ckpt", tmp_path / "m.llmir"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    # The reference is the rounded weights in float32: the compiled model computes in f32 too.
    model = make_checkpoint(tmp_path / "ckpt", "llama", dtype=dtype)
    check_model(model, compile_to(tmp_path / "ckpt", tmp_path / "m.llmir"), prompts=PROMPTS[:1])


def test_sharded_checkpoint_chunked_prefill_small_cache(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "qwen2", max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")
    # A token budget smaller than the prompts forces chunked prefill mixed with decode steps;
    # a cache of 8 blocks of 16 tokens forces the third prompt to wait for the first two.
    check_model(model, bundle, max_batched_tokens=8, max_num_seqs=4, kv_cache_tokens=128)


def test_without_fusion_passes_same_result(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "llama")
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir", passes="canonicalize,paged-kv{block-size=4}")
    compiled = check_model(model, bundle, prompts=PROMPTS[1:2])
    assert compiled.block_size == 4


def test_baseline_cpu_library_matches(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "mistral", sliding_window=8)
    bundle = tmp_path / "m.llmir"
    compile_model(tmp_path / "ckpt", bundle, CompileOptions(cpu_variants=("baseline",)), Progress(None))
    check_model(model, bundle, prompts=PROMPTS[2:])
