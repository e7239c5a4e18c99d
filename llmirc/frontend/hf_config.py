"""Hugging Face `config.json` -> DecoderSpec: every field that changes the math, validated.

Anything a config can say that we do not implement is an error naming the option, never
silently different math. Rotary tables follow transformers' `modeling_rope_utils` in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmirc.errors import CheckpointError
from llmirc.small_files import parse_json, present, read_small_text

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
                 "Gemma3ForCausalLM": "gemma3", "SmolLM3ForCausalLM": "smollm3", "GPT2LMHeadModel": "gpt2"}
MODEL_TYPES = {"gemma3_text": "Gemma3ForCausalLM"}  # where a config's model_type is not its family's name
# Multimodal checkpoints compiled as their text model (text_config): model_type -> (the checkpoint's architecture,
# its text model's); another architecture of that model_type (Gemma3ForSequenceClassification) is refused
MULTIMODAL = {"gemma3": ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")}
# Gemma3TextConfig's defaults of the sizes other families' configs must state (a Gemma3ForConditionalGeneration's
# text_config, as the Hub's gemma-3-4b-it ships it, leaves out those its defaults give)
GEMMA3_SIZES = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                "num_attention_heads": 8}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "relu": "relu"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
MAX_INT = 2**31 - 1      # sizes and ids: the kernels index with int32
MAX_LAYERS = MAX_HEAD_DIM = 1 << 16  # per-layer and rotary tables are built from these before weights are read
F32_FACTORS = (2.0**-126, 2.0**126)  # float32 normals whose reciprocals are float32 normals too
# transformers 5.24's defaults where its config classes differ (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
# Phi3Config, Gemma2Config, Gemma3TextConfig, SmolLM3Config): a field missing from config.json takes these; a field
# set to null takes num_attention_heads (kv heads), hidden_size / num_attention_heads (head_dim) or turns sliding
# windows off; rope_theta where it is not 10000 (the config class's default_theta).
FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None, "sliding_window": None,
              "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096,
                "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096,
              "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096,
              "head_dim": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "phi3": {"max_position_embeddings": 4096, "num_key_value_heads": None, "sliding_window": None,
             "head_dim": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "gemma2": {"max_position_embeddings": 8192, "num_key_value_heads": 4, "sliding_window": 4096,
               "head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"max_position_embeddings": 131072, "num_key_value_heads": 4, "sliding_window": 4096,
               "head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "smollm3": {"max_position_embeddings": 32768, "num_key_value_heads": 4, "sliding_window": None,
                "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 2_000_000.0},
}
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta


@dataclass(frozen=True)
class RopeSpec:
    inv_freq: tuple[float, ...]  # rotary_dim / 2 float32 values
    scaling: float = 1.0         # multiplies cos and sin (yarn's attention factor)
    long_inv_freq: tuple[float, ...] | None = None  # longrope: the long factors' table (for_context)
    style: str = "neox"


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    act: str
    max_position_embeddings: int
    rope: RopeSpec
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_windows: tuple[int, ...]  # per layer; 0 = full attention
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each q and k head (q_norm, k_norm) before the rotary embedding
    fused_projections: bool = False  # Phi-3: qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows)
    rope_context: int | None = None  # longrope with its short factors: the positions they are for (the context's cap)
    # per layer where layers differ (Gemma 3's local and global tables; SmolLM3's NoPE layers: None); () = rope
    layer_ropes: tuple[RopeSpec | None, ...] = ()
    norm_offset: float = 0.0  # Gemma: RMSNorm weights are stored as w and multiply by norm_offset + w
    sandwich_norms: bool = False  # Gemma 3: post_attention_layernorm on the attention's output, pre_ and
    #                               post_feedforward_layernorm around the MLP (Llama's post_attention is Gemma's pre_ff)
    embedding_scale: float = 1.0  # Gemma: the embedding's rows times sqrt(hidden_size), not the tied LM head's
    tensor_prefix: str = "model."  # of the decoder's tensors (a multimodal checkpoint's text model: its own)
    lm_head: str = "lm_head"
    query_pre_attn_scalar: float | None = None  # Gemma: attention scores scaled by its -1/2 power, not head_dim's
    attn_softcap: float = 0.0   # Gemma 2: attention scores s -> cap * tanh(s / cap) (attn_logit_softcapping); 0: none
    final_softcap: float = 0.0  # Gemma 2: logits likewise (final_logit_softcapping); 0: none
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_of(self, layer: int) -> RopeSpec | None:
        """The layer's rotary table (None: the layer has no position embedding)."""
        return self.layer_ropes[layer] if self.layer_ropes else self.rope


def load_config(path: Path) -> dict:
    if not present(path):
        raise CheckpointError(f"{path}: not found (a Hugging Face checkpoint needs config.json)")
    text = read_small_text(path, CheckpointError)
    try:
        config = parse_json(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


class _Reader:
    """Typed access to config fields with errors that name the file and the field."""

    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {message}")

    def get(self, key: str, kind: type | tuple, default=None, required: bool = False, positive: bool = False,
            maximum: int = MAX_INT):
        """config[key] of type `kind` (an int is accepted for float), positive if asked, integers at most
        `maximum` (sizes are untrusted: the compiler allocates from some before the weights can disagree)."""
        value = self.config.get(key)
        if value is None:
            if required:
                raise self.fail(f"missing required field '{key}'")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(f"field '{key}' must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"field '{key}' must be a finite number, got {value!r}")
        if positive and not value > 0:
            raise self.fail(f"field '{key}' must be positive, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and value > maximum:
            raise self.fail(f"field '{key}' is {value}, more than llmirc reads ({maximum})")
        return value

    def factor(self, key: str, default: float | None = None) -> float | None:
        """A positive float the kernels compute with in float32, and with its reciprocal (a soft-cap, Gemma's
        query_pre_attn_scalar): within float32's normal range, as its reciprocal must be too."""
        value = self.get(key, float, default=default, positive=True)
        if value is not None and not F32_FACTORS[0] <= value <= F32_FACTORS[1]:
            raise self.fail(f"field '{key}' is {value!r}, outside what llmirc computes with in float32 "
                            f"({F32_FACTORS[0]:.3g} to {F32_FACTORS[1]:.3g})")
        return value


def text_config(config: dict, source: str = "config.json") -> dict | None:
    """A multimodal checkpoint's config (Gemma3ForConditionalGeneration: model_type gemma3) -> its text
    model's, as Gemma3Config builds it: `text_config` (absent: every default), with the top level's special
    tokens and tie_word_embeddings, without final_logit_softcapping (Gemma3ForConditionalGeneration, unlike
    Gemma3ForCausalLM, does not apply it); None for any other config."""
    model_type = config.get("model_type")
    if model_type not in MULTIMODAL:
        return None
    archs = config.get("architectures")
    if archs and archs != [MULTIMODAL[model_type][0]]:  # (a classifier's score.weight read as the image model's)
        named = ", ".join(a if isinstance(a, str) and a.isprintable() else repr(a) for a in archs) \
            if isinstance(archs, list) else repr(archs)
        raise CheckpointError(f"{source}: unsupported architecture {named} for model_type {model_type!r} (supported: "
                              f"{MULTIMODAL[model_type][0]})"[:300])
    text = config.get("text_config") or {}
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: field 'text_config' must be an object, got {text!r}"[:300])
    text = dict(text, architectures=[MULTIMODAL[model_type][1]])
    text.pop("model_type", None)
    text.pop("final_logit_softcapping", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if key in config:
            text[key] = config[key]
    return text


def architecture(config: dict, source: str = "config.json") -> tuple[str, str]:
    """(architecture, family) from `architectures`, or from `model_type` when that is missing."""
    r = _Reader(config, source)
    archs = r.get("architectures", list)
    model_type = r.get("model_type", str)
    if archs:
        if len(archs) != 1 or not isinstance(archs[0], str) or archs[0] not in ARCHITECTURES:
            named = ", ".join(a if isinstance(a, str) and a.isprintable() else repr(a) for a in archs)
            raise r.fail(f"unsupported architecture {named} "
                         f"(supported: {', '.join([*ARCHITECTURES, *(a for a, _ in MULTIMODAL.values())])})")
        arch = archs[0]
    else:
        by_type = {v: k for k, v in ARCHITECTURES.items()} | MODEL_TYPES
        if model_type not in by_type:
            raise r.fail(f"unsupported model_type {model_type!r} and no 'architectures' field")
        arch = by_type[model_type]
    return arch, ARCHITECTURES[arch]


def parse_config(config: dict, source: str = "config.json") -> DecoderSpec:
    """A Llama-family config (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3's text model, SmolLM3)."""
    arch, family = architecture(config, source)
    if family == "gemma3":
        config = GEMMA3_SIZES | config
    r = _Reader(config, source)
    if family not in FAMILY_DEFAULTS:
        raise r.fail(f"{arch} is not a Llama-family architecture")

    hidden = r.get("hidden_size", int, required=True, positive=True)
    heads = r.get("num_attention_heads", int, required=True, positive=True)
    defaults = FAMILY_DEFAULTS[family]
    kv_heads = r.get("num_key_value_heads", int, positive=True) if "num_key_value_heads" in config \
        else defaults["num_key_value_heads"]
    kv_heads = kv_heads or heads  # null: as many as the query heads
    head_dim = r.get("head_dim", int, default=defaults["head_dim"] if "head_dim" not in config else None,
                     positive=True, maximum=MAX_HEAD_DIM)
    if head_dim is None:
        if hidden % heads:
            raise r.fail(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
        if head_dim > MAX_HEAD_DIM:
            raise r.fail(f"hidden_size / num_attention_heads is {head_dim}, a head dim more than llmirc reads "
                         f"({MAX_HEAD_DIM})")
    if heads % kv_heads:
        raise r.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    gemma = family in ("gemma2", "gemma3")
    act_key = "hidden_activation" if gemma else "hidden_act"  # (Gemma's MLP reads only hidden_activation)
    act_name = r.get(act_key, str, default="gelu_pytorch_tanh" if gemma else "silu")
    if act_name not in ACTIVATIONS:
        raise r.fail(f"unsupported {act_key} {act_name!r} (supported: {', '.join(ACTIVATIONS)})")
    for unsupported in ("attention_chunk_size",) + (() if gemma else ("attn_logit_softcapping",
                                                                      "final_logit_softcapping")):
        if config.get(unsupported) is not None:
            raise r.fail(f"unsupported option '{unsupported}'")
    # (Gemma: a missing field takes the config class's default, null turns the capping off; transformers 5.24's
    # Gemma 3 reads attn_logit_softcapping but never passes it to its attention, as llama.cpp's gemma3 never caps it)
    softcaps = [r.factor(key) if key in config else defaults.get(key)
                for key in ("attn_logit_softcapping", "final_logit_softcapping")] if gemma else [None, None]
    if family == "gemma3":
        softcaps[0] = None
    if r.get("use_bidirectional_attention", bool, default=False):
        raise r.fail("use_bidirectional_attention (an encoder, as EmbeddingGemma) is not a causal language model")

    layers = r.get("num_hidden_layers", int, required=True, positive=True, maximum=MAX_LAYERS)
    max_pos = r.get("max_position_embeddings", int, default=defaults["max_position_embeddings"], positive=True)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    attention_bias = r.get("attention_bias", bool, default=False)
    qkv_bias = {"llama": attention_bias, "mistral": False, "qwen2": True, "qwen3": attention_bias,
                "phi3": False, "gemma2": attention_bias, "gemma3": attention_bias, "smollm3": attention_bias}[family]
    o_bias = family in ("llama", "qwen3", "gemma2", "gemma3", "smollm3") and qkv_bias
    mlp_bias = family in ("llama", "smollm3") and r.get("mlp_bias", bool, default=False)
    windows = _sliding_windows(r, family, layers)
    if family == "gemma3":  # a rotary table per layer type (layer_types, as _sliding_windows checked them)
        types = _gemma_layer_types(r, family, layers)
        tables = {t: _rope_spec(r, head_dim, max_pos, family, t)[0] for t in sorted(set(types))}
        rope, rope_context, layer_ropes = tables.get("full_attention", tables[types[0]]), None, \
            tuple(tables[t] for t in types)
    else:
        (rope, rope_context), layer_ropes = _rope_spec(r, head_dim, max_pos, family), ()
        if family == "smollm3":  # NoPE layers: no rotary embedding at all
            layer_ropes = tuple(rope if use else None for use in _smollm3_rope_layers(r, layers))
    return DecoderSpec(
        architecture=arch,
        vocab_size=r.get("vocab_size", int, required=True, positive=True),
        hidden_size=hidden,
        intermediate_size=r.get("intermediate_size", int, required=True, positive=True),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=r.get("rms_norm_eps", float, default=defaults["rms_norm_eps"], positive=True),
        act=ACTIVATIONS[act_name],
        max_position_embeddings=max_pos,
        rope=rope,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=r.get("tie_word_embeddings", bool, default=defaults["tie_word_embeddings"]),
        sliding_windows=windows,
        qk_norm=family in ("qwen3", "gemma3"),
        fused_projections=family == "phi3",
        rope_context=rope_context,
        layer_ropes=layer_ropes,
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        # Gemma3TextScaledWordEmbedding: sqrt(hidden_size) as a float32 tensor (cast to the weights' dtype,
        # which the float32 reference keeps)
        embedding_scale=float(np.float32(math.sqrt(hidden))) if gemma else 1.0,
        query_pre_attn_scalar=r.factor("query_pre_attn_scalar", default=256.0) if gemma else None,
        attn_softcap=softcaps[0] or 0.0,
        final_softcap=softcaps[1] or 0.0,
        bos_token_id=r.get("bos_token_id", int),
        eos_token_ids=eos_ids,
        pad_token_id=r.get("pad_token_id", int),
    )


def _sliding_windows(r: _Reader, family: str, layers: int) -> tuple[int, ...]:
    """Per layer, as transformers 5.24 reads them: Llama has none; Mistral one window for every layer;
    Qwen2 and Qwen3 a window only with use_sliding_window, on the layers that
    layer_types marks sliding_attention (by default those from max_window_layers on)."""
    if family == "llama":
        return (0,) * layers
    default = FAMILY_DEFAULTS[family]["sliding_window"] if "sliding_window" not in r.config else None
    window = r.get("sliding_window", int, positive=True, default=default)
    if family == "phi3":  # (Phi3Model: a sliding-window mask on every layer when sliding_window is set)
        return (window or 0,) * layers
    if family == "smollm3":  # (on the layers layer_types names, as transformers' masks and vLLM read it, whatever
        # use_sliding_window says, which only SmolLM3Config's default layer_types follows: the NoPE layers with it)
        types = _layer_types(r, layers)
        if types is None:
            use = r.get("use_sliding_window", bool, default=False)
            types = tuple("full_attention" if rope or not use else "sliding_attention"
                          for rope in _smollm3_rope_layers(r, layers))
        return tuple(window if t == "sliding_attention" and window is not None else 0 for t in types)
    if family in ("gemma2", "gemma3"):  # (null: the sliding_attention layers attend to everything)
        return tuple((window or 0) if t == "sliding_attention" else 0 for t in _gemma_layer_types(r, family, layers))
    if family == "mistral":
        if "layer_types" in r.config:  # AutoConfig then reads it as Ministral, MistralForCausalLM ignores them
            raise r.fail("field 'layer_types' in a Mistral config is ambiguous in transformers (Ministral or Mistral "
                         "attention); not supported")
        return (window or 0,) * layers
    if not r.get("use_sliding_window", bool, default=False):
        window = None
    layer_types = _layer_types(r, layers)
    if layer_types is None:
        first = r.get("max_window_layers", int, default=28)
        return tuple(window if window is not None and i >= first else 0 for i in range(layers))
    if "sliding_attention" in layer_types and window is None:
        raise r.fail("layer_types has sliding_attention layers but no sliding window is in use "
                     "(sliding_window with use_sliding_window)")
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)


def _layer_types(r: _Reader, layers: int) -> tuple[str, ...] | None:
    """config.json's layer_types, 'full_attention' or 'sliding_attention' for each layer; None when absent."""
    types = r.get("layer_types", list)
    if types is not None and (len(types) != layers or
                              not all(t in ("full_attention", "sliding_attention") for t in types)):
        raise r.fail("field 'layer_types' must list 'full_attention'/'sliding_attention' for each layer")
    return None if types is None else tuple(types)


def _smollm3_rope_layers(r: _Reader, layers: int) -> tuple[bool, ...]:
    """SmolLM3Config's no_rope_layers (1: the layer has a rotary embedding), else every
    no_rope_layer_interval-th layer (4 by default) without one."""
    flags = r.get("no_rope_layers", list)
    if flags is None:
        interval = r.get("no_rope_layer_interval", int, default=4, positive=True)
        return tuple((i + 1) % interval != 0 for i in range(layers))
    if len(flags) != layers or not all(f in (0, 1) and not isinstance(f, float) for f in flags):
        raise r.fail(f"field 'no_rope_layers' must hold {layers} flags, 1 or 0 (one per layer), got {flags!r}"[:300])
    return tuple(bool(f) for f in flags)


def _gemma_layer_types(r: _Reader, family: str, layers: int) -> tuple[str, ...]:
    """Gemma2Config's and Gemma3TextConfig's layer_types: the field, else every sliding_window_pattern-th
    layer (Gemma 2: every 2nd; Gemma 3: 6th by default) full_attention and the others sliding_attention."""
    types = _layer_types(r, layers)
    if types is None:
        pattern = 2 if family == "gemma2" else r.get("sliding_window_pattern", int, default=6, positive=True)
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    return types


def _gemma3_rope_parameters(r: _Reader, max_pos: int, layer_type: str) -> dict:
    """One layer type's rope parameters as Gemma3TextConfig.convert_rope_params_to_dict and
    standardize_rope_params make them: `rope_parameters` keyed by layer type (a type missing takes the
    default rope), the legacy `rope_scaling` merged into full_attention's, the theta from the entry, else
    rope_theta (full_attention) or rope_local_base_freq (sliding_attention), else 1e6 / 1e4."""
    config = r.config
    nested = config.get("rope_parameters") or {}
    if not isinstance(nested, dict) or not set(nested) <= set(GEMMA3_THETA) or \
            not all(v is None or isinstance(v, dict) for v in nested.values()):
        raise r.fail("field 'rope_parameters' of a Gemma 3 config must map full_attention and sliding_attention to "
                     f"objects, got {nested!r}"[:300])
    params = dict(nested.get(layer_type) or {"rope_type": "default"})
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise r.fail(f"field 'rope_scaling' must be an object, got {scaling!r}")
    if layer_type == "full_attention" and scaling:
        params.update(scaling)
    key = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
    params.setdefault("rope_theta", config.get(key, GEMMA3_THETA[layer_type]))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", max_pos)
    return params


def rope_parameters(r: _Reader, max_pos: int, family: str = "llama", layer_type: str | None = None) -> dict:
    """The rope parameters as transformers 5.24 standardizes them (RotaryEmbeddingConfigMixin's
    convert_rope_params_to_dict and standardize_rope_params, run again when the rotary embedding is
    built): `rope_scaling` (the legacy name) before `rope_parameters`; rope_type from `rope_type`,
    else `type`, else "default"; rope_theta and partial_rotary_factor from the dict, else the top
    level, else 10000 and 1; for llama3, yarn and longrope, original_max_position_embeddings from the
    top level (Phi-3 style configs put it there; Phi3Config's default 4096), else the dict, else
    max_position_embeddings. Phi-3's legacy rope type "yarn" is longrope (Phi3Config; its "su" fails there).
    Gemma 3: the parameters of `layer_type`'s layers (_gemma3_rope_parameters)."""
    if family == "gemma3":
        return _gemma3_rope_parameters(r, max_pos, layer_type)
    config = r.config
    scaling, parameters = config.get("rope_scaling"), config.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value is not None and not isinstance(value, dict):
            raise r.fail(f"field '{key}' must be an object, got {value!r}")
    params = dict(scaling or parameters or {})
    if "layer_types" in config and any(isinstance(v, dict) for v in params.values()):
        raise r.fail("per-layer rope_parameters are not supported")
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", FAMILY_DEFAULTS.get(family, {}).get("rope_theta", 1e4)))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if family == "phi3" and params["rope_type"] == "yarn":
        params["rope_type"] = "longrope"
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in config:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        elif family == "phi3":
            params["original_max_position_embeddings"] = 4096
        else:
            params.setdefault("original_max_position_embeddings", max_pos)
    return params


def _rope_spec(r: _Reader, head_dim: int, max_pos: int, family: str,
               layer_type: str | None = None) -> tuple[RopeSpec, int | None]:
    """Inverse frequencies and attention factor as transformers' rope initialisation functions
    (modeling_rope_utils.ROPE_INIT_FUNCTIONS, and the default of LlamaRotaryEmbedding) compute them
    in float32; tests/test_hf_config.py compares the two for every rope type and spelling. And the
    context they hold for: longrope's short factors, original_max_position_embeddings (transformers
    switches every position to the long factors once a sequence is longer; not built), else None.
    Values past float32's range compute as transformers' do, without NumPy's warnings; a frequency or
    factor that is not finite then (a linear factor of 1e-300 divides by zero) is refused."""
    params = rope_parameters(r, max_pos, family, layer_type)
    with np.errstate(all="ignore"):
        spec, context = _rope_tables(r, params, head_dim, max_pos, family)
    if not all(map(math.isfinite, (*spec.inv_freq, *(spec.long_inv_freq or ()), spec.scaling))):
        raise r.fail(f"rope parameters {params} give rotary frequencies or an attention "
                     "factor that are not finite in float32")
    return spec, context


def _rope_tables(r: _Reader, params: dict, head_dim: int, max_pos: int,
                 family: str) -> tuple[RopeSpec, int | None]:
    rope_type, theta = params["rope_type"], params["rope_theta"]
    supported = [t for t in ROPE_TYPES if family != "gemma3" or t != "longrope"]  # (a context per layer type: no)
    if rope_type not in supported:
        raise r.fail(f"unsupported rope type {rope_type!r} (supported: {', '.join(supported)})")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
        raise r.fail(f"rope_theta must be a positive finite number, got {theta!r}")
    partial = params.get("partial_rotary_factor", 1.0)
    if family == "phi3":  # Phi3's rotary embedding rotates the first int(head_dim * partial) of each head
        if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
            raise r.fail(f"partial_rotary_factor must be a number in (0, 1], got {partial!r}")
        dim = int(head_dim * partial)
        if dim < 2 or dim % 2:
            raise r.fail(f"partial_rotary_factor {partial!r} rotates {dim} of the head's {head_dim} dims, "
                         "not an even number of at least 2")
    elif rope_type != "default" and partial != 1.0:
        # transformers' default rope ignores it; the others make tables narrower than the head, which
        # Llama, Mistral and Qwen2 cannot apply.
        raise r.fail(f"partial_rotary_factor {partial!r} with rope type {rope_type!r} is not supported (these "
                     "architectures rotate the whole head)")
    else:
        dim = head_dim

    def need(key: str, positive: bool = True) -> float:
        value = params.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
                (positive and value <= 0):
            raise r.fail(f"rope type {rope_type!r} needs a {'positive ' if positive else ''}finite number '{key}'"
                         + (f", got {value!r}" if key in params else ""))
        return float(value)

    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)))
    scaling, context = 1.0, None
    if rope_type == "linear":
        inv_freq = inv_freq / f32(need("factor"))
    elif rope_type == "dynamic":
        # transformers rescales only past max_position_embeddings, which the bundle's context never exceeds.
        need("factor")
    elif rope_type == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old_len = need("original_max_position_embeddings")
        if high == low:
            raise r.fail("rope type 'llama3' needs high_freq_factor != low_freq_factor")
        low_wavelen, high_wavelen = f32(old_len / low), f32(old_len / high)
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
        smooth = (f32(old_len) / wavelen - f32(low)) / f32(high - low)
        smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(f32)
    elif rope_type == "yarn":
        inv_freq, scaling = _yarn(params, need, float(theta), dim, max_pos, r)
    elif rope_type == "longrope":
        inv_freq, long, scaling, context = _longrope(params, need, float(theta), dim, max_pos, r)
        return RopeSpec(inv_freq=_floats(inv_freq), scaling=float(scaling), long_inv_freq=_floats(long)), context
    return RopeSpec(inv_freq=_floats(inv_freq), scaling=float(scaling)), context


def _floats(values) -> tuple[float, ...]:
    return tuple(float(x) for x in np.asarray(values, dtype=np.float32))


def for_context(spec: DecoderSpec, max_model_len: int | None) -> DecoderSpec:
    """`spec` for a bundle of `max_model_len` tokens (None: the one the source states): with longrope,
    the long factors' table where that is past original_max_position_embeddings, as llama.cpp chooses by
    its context size (transformers chooses per forward, by the sequence's length), else the short one."""
    if spec.rope_context is None or max_model_len is None or max_model_len <= spec.rope_context:
        return spec
    rope = dataclasses.replace(spec.rope, inv_freq=spec.rope.long_inv_freq)
    return dataclasses.replace(spec, rope=rope, rope_context=None)


def _longrope(params: dict, need, base: float, dim: int, max_pos: int, r: _Reader):
    """transformers' _compute_longrope_parameters: (the short factors' inv_freq, the long factors', the
    attention factor, original_max_position_embeddings)."""
    f32 = np.float32
    original = need("original_max_position_embeddings")
    for key in ("short_factor", "long_factor"):
        factors = params.get(key)
        if not isinstance(factors, list) or len(factors) != dim // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                for x in factors):
            raise r.fail(f"rope type 'longrope' needs '{key}': {dim // 2} positive numbers (one per rotary "
                         f"frequency), got {factors!r}"[:300])
    factor = need("factor") if params.get("factor") is not None else max_pos / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        attention = need("attention_factor")
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    short, long = (f32(1.0) / (np.asarray(params[k], dtype=f32) * f32(base) ** shape) for k in ("short_factor",
                                                                                            "long_factor"))
    return short.astype(f32), long.astype(f32), float(attention), int(original)


def _yarn(params: dict, need, base: float, dim: int, max_pos: int, r: _Reader):
    """transformers' _compute_yarn_parameters."""
    f32 = np.float32
    original = need("original_max_position_embeddings")
    if "factor" not in params:
        raise r.fail("rope type 'yarn' needs a numeric 'factor'")
    factor = max_pos / original if params["factor"] is None else need("factor")
    for key in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if params.get(key) is not None:
            need(key, positive=False)
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
            else get_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation = f32(1) - ramp
    pos_freqs = f32(base) ** (np.arange(0, dim, 2).astype(f32) / f32(dim))
    inv = (f32(1) / (f32(factor) * pos_freqs)) * (f32(1) - extrapolation) + (f32(1) / pos_freqs) * extrapolation
    return inv.astype(f32), float(attention)
