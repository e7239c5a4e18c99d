"""config.json read as the pinned transformers reads it: every field that changes the math, with its
location, priority and default, compared with what transformers itself computes from the same file.

Rotary embeddings: for every rope type and spelling llmirc accepts, llmirc's inverse frequencies and
attention factor against the model's own rotary class (which calls transformers' rope
initialisation functions, modeling_rope_utils.ROPE_INIT_FUNCTIONS), and the attention scale against
the attention module's. Other fields: against the attributes of the loaded config (family defaults
included). What transformers refuses, llmirc refuses too, naming the field.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import transformers

from llmirc.errors import CheckpointError
from llmirc.frontend.hf_config import parse_config

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
            "gemma2": "Gemma2", "gemma3": "Gemma3", "smollm3": "SmolLM3"}
MODEL_TYPES = {"gemma3": "gemma3_text"}  # (model_type "gemma3" is the multimodal Gemma3Config)


def base(family: str = "llama", **overrides) -> dict:
    cfg = {"architectures": [f"{FAMILIES[family]}ForCausalLM"], "model_type": MODEL_TYPES.get(family, family),
           "vocab_size": 384,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512}
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not DROP}


DROP = object()  # base(key=DROP): the field is absent from config.json


def hf(tmp_path, config: dict):
    """transformers' config loaded from a config.json holding `config`."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    return transformers.AutoConfig.from_pretrained(tmp_path)


def hf_rope(tmp_path, config: dict) -> tuple[np.ndarray, float, float]:
    """(inv_freq, attention factor of cos/sin, attention scale) as transformers' modules compute them."""
    cfg = hf(tmp_path, config)
    module = getattr(transformers.models, cfg.model_type)
    modeling = getattr(module, f"modeling_{cfg.model_type}")
    prefix = FAMILIES[cfg.model_type]
    rotary = getattr(modeling, f"{prefix}RotaryEmbedding")(cfg)
    attention = getattr(modeling, f"{prefix}Attention")(cfg, layer_idx=0)
    return rotary.inv_freq.numpy(), float(rotary.attention_scaling), float(attention.scaling)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
# longrope's factors, one per rotary frequency (head_dim 16: 8; Phi-3's partial 0.5: 4)
SHORT, LONG = [1.0, 1.1, 1.3, 1.7, 2.2, 3.0, 4.1, 5.5], [1.2, 1.9, 3.1, 5.0, 8.2, 13.0, 21.0, 34.0]
LONGROPE = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

ROPE_CASES = {
    "no-rope-fields": base(),
    "top-level-theta": base(rope_theta=50000.0),
    "default-in-rope_parameters": base(rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    "theta-in-dict-beats-top-level": base(rope_theta=7.0, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 30000.0}),
    "theta-top-level-with-dict-without": base(rope_theta=40000.0, rope_parameters={"rope_type": "linear",
                                                                                   "factor": 2.0}),
    "default-ignores-partial_rotary_factor": base(partial_rotary_factor=0.5),
    "explicit-head_dim": base(head_dim=32, rope_theta=1e6),
    "linear-legacy-type-key": base(rope_scaling={"type": "linear", "factor": 2.0}),
    "linear-rope_type": base(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}),
    "rope_type-beats-type": base(rope_scaling={"type": "dynamic", "rope_type": "linear", "factor": 2.0}),
    "rope_scaling-beats-rope_parameters": base(rope_scaling={"rope_type": "linear", "factor": 4.0},
                                               rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "empty-rope_scaling-falls-back": base(rope_scaling={}, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "dynamic": base(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3": base(rope_theta=50000.0, rope_scaling=LLAMA3),
    "llama3-original-top-level-only": base(original_max_position_embeddings=64, rope_scaling={
        k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}),
    "llama3-original-top-level-wins": base(original_max_position_embeddings=32, rope_scaling=LLAMA3),
    "llama3-original-defaults-to-max-positions": base(max_position_embeddings=4096, rope_scaling={
        k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}),
    "yarn": base(rope_scaling=YARN),
    "yarn-legacy-type-key": base(rope_scaling={"type": "yarn", "factor": 2.0,
                                               "original_max_position_embeddings": 256}),
    "yarn-original-top-level-only": base(original_max_position_embeddings=128,
                                         rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    "yarn-original-top-level-wins": base(original_max_position_embeddings=64, rope_scaling=YARN),
    "yarn-original-defaults-to-max-positions": base(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    "yarn-factor-null": base(max_position_embeddings=1024, rope_scaling=dict(YARN, factor=None)),
    "yarn-attention-factor": base(rope_scaling=dict(YARN, attention_factor=0.8)),
    "yarn-mscale-pair": base(rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707 * 2)),
    "yarn-mscale-alone": base(rope_scaling=dict(YARN, mscale=2.0)),
    "yarn-betas-no-truncate": base(rope_scaling=dict(YARN, beta_fast=16, beta_slow=2, truncate=False)),
    "yarn-factor-below-one": base(rope_scaling=dict(YARN, factor=0.5)),
    "mistral-defaults": base("mistral", rope_theta=1e6),
    "qwen2-yarn": base("qwen2", rope_parameters=dict(YARN, rope_theta=1e6)),
    "phi3-default": base("phi3", rope_theta=20000.0),
    "phi3-partial": base("phi3", partial_rotary_factor=0.75),
    "phi3-longrope": base("phi3", original_max_position_embeddings=128, rope_scaling=LONGROPE),
    "phi3-yarn-is-longrope": base("phi3", original_max_position_embeddings=64, rope_scaling={
        "type": "yarn", "short_factor": SHORT, "long_factor": LONG}),
    "phi3-longrope-original-default": base("phi3", max_position_embeddings=8192, rope_scaling=LONGROPE),
    "phi3-longrope-partial": base("phi3", partial_rotary_factor=0.5, original_max_position_embeddings=128,
                                  rope_parameters={"rope_type": "longrope", "short_factor": SHORT[:4],
                                                   "long_factor": LONG[:4], "rope_theta": 10000.0}),
    "phi3-longrope-factor-and-attention": base("phi3", original_max_position_embeddings=128, rope_scaling=dict(
        LONGROPE, factor=2.0, attention_factor=1.1)),
    "llama-longrope": base(original_max_position_embeddings=128, rope_scaling=LONGROPE),
    # past float32's range: computed as transformers computes them (NumPy warned on stderr)
    "theta-past-float32": base(rope_parameters={"rope_type": "default", "rope_theta": 1e300}),
    "linear-factor-past-float32": base(rope_parameters={"rope_type": "linear", "factor": 1e300,
                                                        "rope_theta": 10000.0}),
    "yarn-factor-past-float32": base(rope_scaling=dict(YARN, factor=1e300)),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_matches_transformers(tmp_path, case):
    config = ROPE_CASES[case]
    inv_freq, factor, scale = hf_rope(tmp_path, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI would print them beside its own lines
        spec = parse_config(config)
    np.testing.assert_allclose(np.array(spec.rope.inv_freq), inv_freq, rtol=1e-6, atol=0)
    assert spec.rope.scaling == pytest.approx(factor, rel=1e-7)
    assert spec.attention_scale == pytest.approx(scale, rel=1e-7)


REFUSED = {
    # transformers raises while loading (a required rope key is missing) ...
    "yarn-without-factor": (base(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 128}),
                            "factor"),
    "llama3-without-low-freq": (base(rope_scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
                                "low_freq_factor"),
    "linear-without-factor": (base(rope_scaling={"rope_type": "linear"}), "factor"),
    # ... or builds rotary tables narrower than the head, which these models cannot apply.
    "partial-rotary-with-scaling": (base(partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear",
                                                                                   "factor": 2.0}),
                                    "partial_rotary_factor"),
    # AutoConfig reads a Mistral config with layer_types as Ministral, MistralForCausalLM ignores them.
    "mistral-layer-types": (base("mistral", layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    "unknown-rope-type": (base(rope_scaling={"rope_type": "proportional", "factor": 2.0}), "proportional"),
    # Phi3Config turns the legacy "su" into longrope after its original_max_position_embeddings would have been read
    "phi3-su-legacy-type": (base("phi3", rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG}),
                            "unsupported rope type 'su'"),
    "longrope-without-factors": (base(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "short_factor"),
    "longrope-factors-of-another-length": (base("phi3", partial_rotary_factor=0.5, rope_scaling=LONGROPE),
                                           "'short_factor': 4 positive numbers"),
    "rope-parameters-not-an-object": (base(rope_parameters=[1, 2]), "rope_parameters"),
    "yarn-original-null-at-top-level": (base(original_max_position_embeddings=None, rope_scaling=YARN),
                                        "original_max_position_embeddings"),
    # Sizes the compiler would allocate from before any weight can disagree (found by tests/fuzz_readers.py).
    "huge-head-dim": (base(head_dim=10**12), "field 'head_dim' is 1000000000000, more than llmirc reads"),
    "huge-layer-count": (base(num_hidden_layers=10**9), "'num_hidden_layers' is 1000000000"),
    "huge-vocab": (base(vocab_size=2**40), "'vocab_size' is 1099511627776"),
    # frequencies divided by a factor that is 0 in float32: infinite (an internal error writing the manifest)
    "linear-factor-zero-in-float32": (base(rope_parameters={"rope_type": "linear", "factor": 1e-300,
                                                            "rope_theta": 10000.0}), "not finite in float32"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_rope_refused_by_name(case):
    config, needle = REFUSED[case]
    with pytest.raises(CheckpointError, match=needle):
        parse_config(config, "m/config.json")


def gemma3(**overrides) -> dict:
    return base("gemma3", head_dim=16, **overrides)


# Gemma 3: a rotary table per layer type, from the nested rope_parameters of transformers 5 or the Hub's
# legacy fields (rope_theta and rope_scaling for full_attention, rope_local_base_freq for sliding_attention)
GEMMA3_ROPE_CASES = {
    "defaults": gemma3(num_hidden_layers=7),
    "legacy-fields": gemma3(num_hidden_layers=4, sliding_window_pattern=2, rope_theta=50000.0,
                            rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                            query_pre_attn_scalar=20),
    "legacy-type-key": gemma3(rope_scaling={"type": "linear", "factor": 2.0}, layer_types=["full_attention"] * 2),
    "nested": gemma3(layer_types=["sliding_attention", "full_attention"], rope_parameters={
        "full_attention": dict(YARN, rope_theta=1e5), "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 300.0}}),
    "nested-one-type": gemma3(layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=700.0,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e5}}),
    "rope_scaling-merged-into-nested": gemma3(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 2e4}}, layer_types=["full_attention"] * 2),
}


@pytest.mark.parametrize("case", GEMMA3_ROPE_CASES)
def test_gemma3_rope_per_layer_type_matches_transformers(tmp_path, case):
    config = GEMMA3_ROPE_CASES[case]
    cfg = hf(tmp_path, config)
    modeling = transformers.models.gemma3.modeling_gemma3
    rotary, spec = modeling.Gemma3RotaryEmbedding(cfg), parse_config(config)
    for i, layer_type in enumerate(cfg.layer_types):
        rope = spec.rope_of(i)
        np.testing.assert_allclose(np.array(rope.inv_freq), getattr(rotary, f"{layer_type}_inv_freq").numpy(),
                                   rtol=1e-6, atol=0)
        assert rope.scaling == pytest.approx(getattr(rotary, f"{layer_type}_attention_scaling"), rel=1e-7)
        attention = modeling.Gemma3Attention(cfg, layer_idx=i)
        assert spec.attention_scale == pytest.approx(attention.scaling, rel=1e-7)
        sliding = cfg.layer_types[i] == "sliding_attention" and cfg.sliding_window is not None
        assert spec.sliding_windows[i] == (cfg.sliding_window if sliding else 0)
        assert attention.sliding_window in (None, spec.sliding_windows[i])
    assert spec.embedding_scale == np.float32(cfg.hidden_size ** 0.5)


GEMMA3_REFUSED = {
    # transformers 5.24 ignores the keys of a flat dict (every layer type takes its default)
    "flat-rope_parameters": (gemma3(rope_parameters={"rope_type": "linear", "factor": 2.0}),
                             "'rope_parameters' of a Gemma 3 config must map full_attention"),
    "longrope": (gemma3(layer_types=["full_attention"] * 2,
                        rope_parameters={"full_attention": dict(LONGROPE, rope_theta=1e4)}), "'longrope'"),
    "bidirectional": (gemma3(use_bidirectional_attention=True), "use_bidirectional_attention"),
    "softcapping-not-a-number": (gemma3(attn_logit_softcapping="50"), "attn_logit_softcapping"),
    "softcapping-negative": (gemma3(final_logit_softcapping=-30.0), "final_logit_softcapping"),
    # (the kernels compute with the cap and its reciprocal, with query_pre_attn_scalar's -1/2 power, in float32)
    "softcapping-past-float32": (gemma3(attn_logit_softcapping=1e39), "'attn_logit_softcapping' is 1e.39, outside"),
    "softcapping-below-float32": (gemma3(final_logit_softcapping=1e-300), "'final_logit_softcapping' is 1e-300"),
    "query-scalar-below-float32": (gemma3(query_pre_attn_scalar=1e-80), "'query_pre_attn_scalar' is 1e-80"),
    "layer-types-length": (gemma3(layer_types=["full_attention"]), "layer_types"),
    "layer-types-unhashable": (gemma3(layer_types=[["full_attention"], "full_attention"]), "layer_types"),
}


@pytest.mark.parametrize("case", GEMMA3_REFUSED)
def test_gemma3_refused_by_name(case):
    config, needle = GEMMA3_REFUSED[case]
    with pytest.raises(CheckpointError, match=needle):
        parse_config(config, "m/config.json")


# Gemma 2: soft-capping (Gemma2Config's 50 and 30 when the fields are missing, none when null), sliding and full
# layers alternating unless layer_types says otherwise, query_pre_attn_scalar
GEMMA2_CASES = {
    "defaults": base("gemma2", num_hidden_layers=5, head_dim=16),
    "null-caps-layer-types": base("gemma2", head_dim=16, attn_logit_softcapping=None, final_logit_softcapping=None,
                                  layer_types=["full_attention", "sliding_attention"], sliding_window=9,
                                  query_pre_attn_scalar=20),
    "caps": base("gemma2", head_dim=16, attn_logit_softcapping=7.5, final_logit_softcapping=12.0,
                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}),
}


@pytest.mark.parametrize("case", GEMMA2_CASES)
def test_gemma2_matches_transformers(tmp_path, case):
    config = GEMMA2_CASES[case]
    cfg = hf(tmp_path, config)
    modeling = transformers.models.gemma2.modeling_gemma2
    spec = parse_config(config)
    assert spec.final_softcap == (cfg.final_logit_softcapping or 0.0)
    np.testing.assert_allclose(spec.rope.inv_freq, modeling.Gemma2RotaryEmbedding(cfg).inv_freq.numpy(), rtol=1e-6)
    for i in range(cfg.num_hidden_layers):
        attention = modeling.Gemma2Attention(cfg, layer_idx=i)
        assert spec.attention_scale == pytest.approx(attention.scaling, rel=1e-7)
        assert spec.attn_softcap == (attention.attn_logit_softcapping or 0.0)
        assert spec.sliding_windows[i] == (attention.sliding_window or 0)
    assert not spec.qk_norm and spec.sandwich_norms and spec.norm_offset == 1.0
    assert spec.embedding_scale == np.float32(cfg.hidden_size ** 0.5)


def test_softcapping_read_for_gemma3_refused_elsewhere():
    """Gemma3ForCausalLM caps the logits where its config sets final_logit_softcapping, Gemma3ForConditionalGeneration
    does not; neither caps the attention scores (transformers 5.24's Gemma3Attention reads attn_logit_softcapping
    but never applies it: tests/test_models.py's gemma3-softcaps); families whose models never cap refuse the fields."""
    from llmirc.frontend.hf_config import text_config

    spec = parse_config(gemma3(attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert (spec.attn_softcap, spec.final_softcap) == (0.0, 30.0)
    assert (parse_config(gemma3()).attn_softcap, parse_config(gemma3()).final_softcap) == (0.0, 0.0)
    multimodal = {"model_type": "gemma3", "text_config": gemma3(attn_logit_softcapping=50.0,
                                                                final_logit_softcapping=30.0)}
    spec = parse_config(text_config(multimodal))
    assert (spec.attn_softcap, spec.final_softcap) == (0.0, 0.0)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        with pytest.raises(CheckpointError, match=key):
            parse_config(base("llama", **{key: 30.0}))


def test_gemma3_multimodal_config_is_read_as_its_text_config(tmp_path):
    """gemma-3-4b-it's config.json kind: the sizes it leaves out of text_config take Gemma3TextConfig's
    defaults, the special tokens come from the top level."""
    from llmirc.frontend.hf_config import text_config

    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 1024}, "vision_config": {"model_type": "siglip_vision_model"}}
    cfg = hf(tmp_path, config).text_config
    spec = parse_config(text_config(config))
    assert (spec.vocab_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers) == \
        (cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers)
    assert spec.eos_token_ids == (1, 106) and spec.tie_word_embeddings
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(cfg)
    for i, layer_type in enumerate(cfg.layer_types):
        np.testing.assert_allclose(spec.rope_of(i).inv_freq, getattr(rotary, f"{layer_type}_inv_freq").numpy(),
                                   rtol=1e-6)
    assert spec.sliding_windows == tuple(1024 if t == "sliding_attention" else 0 for t in cfg.layer_types)



@pytest.mark.parametrize("archs", [["Gemma3ForSequenceClassification"], ["Gemma3ForCausalLM"], ["A", "B"], "x"])
def test_gemma3_multimodal_config_of_another_architecture_is_refused_by_name(archs):
    """model_type gemma3 with an architecture other than Gemma3ForConditionalGeneration: refused by name (a
    Gemma3ForSequenceClassification compiled as a language model, its score.weight counted as the image model's)."""
    from llmirc.frontend.hf_config import text_config

    config = {"architectures": archs, "model_type": "gemma3", "text_config": {"num_hidden_layers": 2}}
    with pytest.raises(CheckpointError, match="^m/config.json: unsupported architecture .* for model_type 'gemma3' "
                                              r"\(supported: Gemma3ForConditionalGeneration\)$"):
        text_config(config, "m/config.json")
    assert text_config(dict(config, architectures=["Gemma3ForConditionalGeneration"]))["architectures"] == \
        ["Gemma3ForCausalLM"]

SMOLLM3_CASES = {
    "defaults": base("smollm3", num_hidden_layers=8, num_key_value_heads=DROP),  # rope_theta 2e6, every 4th NoPE
    "interval-sliding": base("smollm3", num_hidden_layers=6, no_rope_layer_interval=3, use_sliding_window=True,
                             sliding_window=7, rope_theta=1e5),
    "flags-layer-types": base("smollm3", no_rope_layers=[0, 1], use_sliding_window=True, sliding_window=7,
                              layer_types=["full_attention", "sliding_attention"],
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "window-without-use": base("smollm3", sliding_window=7),
    # (the sliding_attention layers' masks slide without use_sliding_window, which only the flash-attention path and
    # SmolLM3Config's default layer_types read)
    "layer-types-without-use": base("smollm3", num_hidden_layers=3, sliding_window=7,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


@pytest.mark.parametrize("case", SMOLLM3_CASES)
def test_smollm3_nope_layers_and_windows_match_transformers(tmp_path, case):
    """SmolLM3: the rotary table on the layers no_rope_layers (or its interval) gives one, none on the others; the
    windows on the sliding_attention layers (as SmolLM3Model's masks: the attention's own sliding_window, for flash
    attention, also needs use_sliding_window); SmolLM3Config's defaults."""
    config = SMOLLM3_CASES[case]
    cfg = hf(tmp_path, config)
    modeling = transformers.models.smollm3.modeling_smollm3
    rotary, spec = modeling.SmolLM3RotaryEmbedding(cfg), parse_config(config)
    for i in range(cfg.num_hidden_layers):
        attention = modeling.SmolLM3Attention(cfg, layer_idx=i)
        rope = spec.rope_of(i)
        assert (rope is not None) == bool(attention.use_rope)
        if rope is not None:
            np.testing.assert_allclose(np.array(rope.inv_freq), rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
        sliding = cfg.layer_types[i] == "sliding_attention" and cfg.sliding_window is not None
        assert spec.sliding_windows[i] == (cfg.sliding_window if sliding else 0)
        assert attention.sliding_window in (None, spec.sliding_windows[i])
        assert spec.attention_scale == pytest.approx(attention.scaling, rel=1e-7)
    assert (spec.num_kv_heads, spec.tie_word_embeddings, spec.max_position_embeddings) == \
        (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.max_position_embeddings)


def test_transformers_refuses_the_missing_keys_too(tmp_path):
    for case in ("yarn-without-factor", "llama3-without-low-freq", "linear-without-factor"):
        with pytest.raises(KeyError):
            hf(tmp_path, REFUSED[case][0])


FIELD_CASES = {
    "llama-explicit": base(),
    "llama-defaults": base(num_key_value_heads=DROP, max_position_embeddings=DROP),
    "llama-kv-null": base(num_key_value_heads=None),
    "mistral-defaults": base("mistral", num_key_value_heads=DROP, max_position_embeddings=DROP, num_attention_heads=8,
                             hidden_size=128, sliding_window=DROP),
    "mistral-window-null": base("mistral", sliding_window=None),
    "qwen2-defaults": base("qwen2", num_key_value_heads=DROP, max_position_embeddings=DROP, num_attention_heads=32,
                           hidden_size=256),
    "qwen2-sliding-default-window": base("qwen2", use_sliding_window=True, max_window_layers=1),
    "qwen2-window-needs-use_sliding_window": base("qwen2", sliding_window=8, max_window_layers=0),
    "qwen2-layer-types": base("qwen2", use_sliding_window=True, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"]),
    "qwen3-defaults": base("qwen3", num_key_value_heads=DROP, max_position_embeddings=DROP, num_attention_heads=32,
                           hidden_size=256, head_dim=DROP),
    "qwen3-sliding-layer-types": base("qwen3", use_sliding_window=True, sliding_window=6,
                                      layer_types=["full_attention", "sliding_attention"]),
    "phi3-defaults": base("phi3", num_key_value_heads=DROP, max_position_embeddings=DROP, sliding_window=DROP),
    "phi3-sliding-tied": base("phi3", sliding_window=7, tie_word_embeddings=True),
    "gemma3-defaults": base("gemma3", num_key_value_heads=DROP, max_position_embeddings=DROP, sliding_window=DROP,
                            num_hidden_layers=7),
    "gemma3-untied-window-null": base("gemma3", tie_word_embeddings=False, sliding_window=None, head_dim=32),
    "gemma3-pattern": base("gemma3", sliding_window=9, sliding_window_pattern=3, num_hidden_layers=6),
}


def _hf_windows(cfg) -> tuple[int, ...]:
    if cfg.model_type in ("mistral", "phi3"):
        return (cfg.sliding_window or 0,) * cfg.num_hidden_layers
    if cfg.model_type in ("qwen2", "qwen3", "gemma3_text"):
        return tuple((cfg.sliding_window or 0) if t == "sliding_attention" else 0 for t in cfg.layer_types)
    return (0,) * cfg.num_hidden_layers


@pytest.mark.parametrize("case", FIELD_CASES)
def test_fields_match_transformers(tmp_path, case):
    config = FIELD_CASES[case]
    cfg, spec = hf(tmp_path, config), parse_config(config)
    assert spec.num_kv_heads == cfg.num_key_value_heads
    assert spec.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert spec.max_position_embeddings == cfg.max_position_embeddings
    assert spec.norm_eps == cfg.rms_norm_eps
    assert spec.tie_word_embeddings == cfg.tie_word_embeddings
    assert spec.sliding_windows == _hf_windows(cfg)
