"""GPT-2 (`GPT2LMHeadModel`): config.json -> Gpt2Spec -> llmir graph.

What differs from the Llama family: LayerNorm with bias, learned absolute positions (`wpe`),
no rotary embedding, a fused q/k/v projection stored as a Conv1D ([in, out]: transposed
relative to nn.Linear, folded at compile time), GELU MLP, biases everywhere, tied LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xdsl.builder import ImplicitBuilder
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue

from llmirc import dialect as L

from .decoder import ShapeCheck, matrices, new_forward, weights
from .hf_config import ACTIVATIONS, MAX_LAYERS, _Reader


@dataclass(frozen=True)
class Gpt2Spec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    norm_eps: float
    act: str
    max_position_embeddings: int
    attention_scales: tuple[float, ...]  # per layer
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    conv1d_weights: bool = True  # projections stored [in, out] (Hugging Face Conv1D); False: [out, in] (GGUF)

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def sliding_windows(self) -> tuple[int, ...]:
        return (0,) * self.num_layers


def parse_gpt2_config(config: dict, source: str) -> Gpt2Spec:
    r = _Reader(config, source)
    hidden = r.get("n_embd", int, required=True, positive=True)
    heads = r.get("n_head", int, required=True, positive=True)
    layers = r.get("n_layer", int, required=True, positive=True, maximum=MAX_LAYERS)
    if hidden % heads:
        raise r.fail(f"n_embd {hidden} is not divisible by n_head {heads}")
    act = r.get("activation_function", str, default="gelu_new")
    if act not in ACTIVATIONS:
        raise r.fail(f"unsupported activation_function {act!r} (supported: {', '.join(ACTIVATIONS)})")
    if r.get("add_cross_attention", bool, default=False):
        raise r.fail("unsupported option 'add_cross_attention'")
    head_dim = hidden // heads
    scale = head_dim ** -0.5 if r.get("scale_attn_weights", bool, default=True) else 1.0
    by_layer = r.get("scale_attn_by_inverse_layer_idx", bool, default=False)
    eos = config.get("eos_token_id")
    return Gpt2Spec(
        architecture="GPT2LMHeadModel",
        vocab_size=r.get("vocab_size", int, required=True, positive=True),
        hidden_size=hidden,
        intermediate_size=r.get("n_inner", int, default=4 * hidden, positive=True),
        num_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        norm_eps=r.get("layer_norm_epsilon", float, default=1e-5, positive=True),
        act=ACTIVATIONS[act],
        max_position_embeddings=r.get("n_positions", int, default=1024, positive=True),
        attention_scales=tuple(scale / (i + 1) if by_layer else scale for i in range(layers)),
        tie_word_embeddings=r.get("tie_word_embeddings", bool, default=True),
        bos_token_id=r.get("bos_token_id", int),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ()),
        pad_token_id=r.get("pad_token_id", int),
    )


def build_gpt2(s: Gpt2Spec, check: ShapeCheck, has_tensor: Callable[[str], bool],
               packed: Callable[[str, int, int], SSAValue | None] | None = None) -> ModuleOp:
    """`packed(prefix, n, k)`: the quantized matrix `prefix` ([n, k], a GGUF file's: stored [out,
    in]) when the source holds one, else None (as for build_decoder)."""
    h_dim, inner = s.hidden_size, s.intermediate_size
    forward, weight = new_forward(s.vocab_size), weights(check)
    matrix = matrices(weight, packed)

    def conv1d(x, prefix: str, n_in: int, n_out: int) -> SSAValue:
        if s.conv1d_weights:
            w = L.TransposeOp(weight(f"{prefix}.weight", n_in, n_out)).result
        else:
            w = matrix(prefix, n_out, n_in)
        return L.LinearOp(x, w, weight(f"{prefix}.bias", n_out)).result

    def layer_norm(x, prefix: str) -> SSAValue:
        return L.LayerNormOp(x, weight(f"{prefix}.weight", h_dim), weight(f"{prefix}.bias", h_dim), s.norm_eps).result

    with ImplicitBuilder(forward.body) as (token_ids, positions):
        wte = matrix("transformer.wte", s.vocab_size, h_dim)
        wpe = matrix("transformer.wpe", s.max_position_embeddings, h_dim)
        h = L.AddOp(L.EmbeddingOp(wte, token_ids).result, L.EmbeddingOp(wpe, positions).result).result
        for i in range(s.num_layers):
            p = f"transformer.h.{i}"
            qkv = conv1d(layer_norm(h, f"{p}.ln_1"), f"{p}.attn.c_attn", h_dim, 3 * h_dim)
            q, k, v = L.SplitOp(qkv, [h_dim] * 3).outputs
            a = L.AttentionOp(q, k, v, num_heads=s.num_heads, num_kv_heads=s.num_heads, head_dim=s.head_dim,
                              scale=s.attention_scales[i]).result
            h = L.AddOp(h, conv1d(a, f"{p}.attn.c_proj", h_dim, h_dim)).result
            m = L.ActOp(conv1d(layer_norm(h, f"{p}.ln_2"), f"{p}.mlp.c_fc", h_dim, inner), s.act).result
            h = L.AddOp(h, conv1d(m, f"{p}.mlp.c_proj", inner, h_dim)).result
        h = layer_norm(h, "transformer.ln_f")
        tied = s.tie_word_embeddings or not has_tensor("lm_head.weight")
        head = wte if tied else matrix("lm_head", s.vocab_size, h_dim)
        func.ReturnOp(L.LinearOp(h, head).result)
    module = ModuleOp([forward])
    module.verify()
    return module
