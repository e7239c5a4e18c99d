"""DecoderSpec + checkpoint tensor names -> the llmir graph of a Llama-family decoder.

The graph is the plain full-sequence forward (attention over the whole sequence, logits for
every token); the pass pipeline turns it into the paged, incremental form.
"""

from __future__ import annotations

from collections.abc import Callable

from xdsl.builder import ImplicitBuilder
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr, i32
from xdsl.ir import SSAValue

from llmirc import dialect as L
from llmirc.errors import CheckpointError

from .hf_config import DecoderSpec

# shape_check(name, expected_shape) raises if the checkpoint disagrees; returns the tensor's dtype
# (a llmirc.dtypes name: float32, bfloat16 or float16).
ShapeCheck = Callable[[str, tuple[int, ...]], str]


def arg_attrs(*names: str) -> ArrayAttr:
    return ArrayAttr([DictionaryAttr({L.ARG_ATTR: StringAttr(n)}) for n in names])


def new_forward(vocab_size: int) -> func.FuncOp:
    """The front end's function: (token_ids, positions) -> logits [T, vocab]."""
    ids_type = L.tensor(L.DYN, dtype=i32)
    return func.FuncOp("forward", ([ids_type, ids_type], [L.tensor(L.DYN, vocab_size)]),
                       arg_attrs=arg_attrs("token_ids", "positions"))


def weights(check: ShapeCheck) -> Callable[..., SSAValue]:
    """weight(name, *shape): a checkpoint tensor checked against the shape the config implies, with
    the element type it is stored in."""
    def weight(name: str, *shape: int) -> SSAValue:
        return L.WeightOp(name, shape, L.FLOAT_TYPES[check(name, shape)]).result
    return weight


def matrices(weight: Callable[..., SSAValue],
             packed: Callable[[str, int, int], SSAValue | None] | None) -> Callable[[str, int, int], SSAValue]:
    """matrix(prefix, n, k): the quantized matrix `prefix` the source holds (`packed`: GPTQ, AWQ,
    GGUF; frontend/packed.py), else its float weight `prefix.weight` [n, k]."""
    def matrix(prefix: str, n: int, k: int) -> SSAValue:
        w = packed(prefix, n, k) if packed is not None else None
        return w if w is not None else weight(f"{prefix}.weight", n, k)
    return matrix


def build_decoder(spec: DecoderSpec, check: ShapeCheck, has_tensor: Callable[[str], bool],
                  packed: Callable[[str, int, int], SSAValue | None] | None = None) -> ModuleOp:
    """`packed(prefix, n, k)`: the quantized weight `prefix` (a linear, the embedding table, the LM
    head) when the checkpoint holds one (GPTQ, AWQ, GGUF: frontend/packed.py), else None."""
    s = spec
    q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    forward, weight = new_forward(s.vocab_size), weights(check)
    matrix = matrices(weight, packed)

    def linear(x, prefix: str, n: int, k: int, bias: bool) -> SSAValue:
        b = weight(f"{prefix}.bias", n) if bias else None
        return L.LinearOp(x, matrix(prefix, n, k), b).result

    def norm(x, name: str, dim: int, heads: int | None = None) -> SSAValue:
        w = weight(f"{name}.weight", dim)
        if s.norm_offset:  # Gemma: x normalized times (1 + w)
            w = L.OffsetOp(w, s.norm_offset).result
        return L.RMSNormOp(x, w, s.norm_eps, heads).result

    with ImplicitBuilder(forward.body) as (token_ids, positions):
        embed = matrix(f"{s.tensor_prefix}embed_tokens", s.vocab_size, s.hidden_size)
        h = L.EmbeddingOp(embed, token_ids, s.embedding_scale).result
        for i in range(s.num_layers):
            p = f"{s.tensor_prefix}layers.{i}"
            x = norm(h, f"{p}.input_layernorm", s.hidden_size)
            if s.fused_projections:  # Phi-3: one qkv_proj, its rows q, k, v (as fuse-linears would make it)
                qkv = linear(x, f"{p}.self_attn.qkv_proj", q_dim + 2 * kv_dim, s.hidden_size, s.qkv_bias)
                q, k, v = L.SplitOp(qkv, [q_dim, kv_dim, kv_dim]).outputs
            else:
                q = linear(x, f"{p}.self_attn.q_proj", q_dim, s.hidden_size, s.qkv_bias)
                k = linear(x, f"{p}.self_attn.k_proj", kv_dim, s.hidden_size, s.qkv_bias)
                v = linear(x, f"{p}.self_attn.v_proj", kv_dim, s.hidden_size, s.qkv_bias)
            if s.qk_norm:  # Qwen3, Gemma 3: each head normalized over head_dim, one weight for all heads
                q = norm(q, f"{p}.self_attn.q_norm", s.head_dim, s.num_heads)
                k = norm(k, f"{p}.self_attn.k_norm", s.head_dim, s.num_kv_heads)
            if (r := s.rope_of(i)) is not None:  # (SmolLM3's NoPE layers have none)
                rope = dict(head_dim=s.head_dim, inv_freq=r.inv_freq, scaling=r.scaling, style=r.style)
                q = L.RopeOp(q, positions, num_heads=s.num_heads, **rope).result
                k = L.RopeOp(k, positions, num_heads=s.num_kv_heads, **rope).result
            a = L.AttentionOp(q, k, v, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                              scale=s.attention_scale, sliding_window=s.sliding_windows[i],
                              softcap=s.attn_softcap).result
            o = linear(a, f"{p}.self_attn.o_proj", s.hidden_size, q_dim, s.o_bias)
            if s.sandwich_norms:  # Gemma 2 and 3: the attention's output normalized before the residual add
                h = L.AddOp(h, norm(o, f"{p}.post_attention_layernorm", s.hidden_size)).result
                x = norm(h, f"{p}.pre_feedforward_layernorm", s.hidden_size)
            else:
                h = L.AddOp(h, o).result
                x = norm(h, f"{p}.post_attention_layernorm", s.hidden_size)
            if s.fused_projections:  # Phi-3: gate_up_proj, gate's rows first
                gate_up = linear(x, f"{p}.mlp.gate_up_proj", 2 * s.intermediate_size, s.hidden_size, s.mlp_bias)
                gate, up = L.SplitOp(gate_up, [s.intermediate_size, s.intermediate_size]).outputs
            else:
                gate = linear(x, f"{p}.mlp.gate_proj", s.intermediate_size, s.hidden_size, s.mlp_bias)
                up = linear(x, f"{p}.mlp.up_proj", s.intermediate_size, s.hidden_size, s.mlp_bias)
            m = L.ActMulOp(gate, up, s.act).result
            d = linear(m, f"{p}.mlp.down_proj", s.hidden_size, s.intermediate_size, s.mlp_bias)
            if s.sandwich_norms:
                d = norm(d, f"{p}.post_feedforward_layernorm", s.hidden_size)
            h = L.AddOp(h, d).result
        h = norm(h, f"{s.tensor_prefix}norm", s.hidden_size)
        if s.tie_word_embeddings or not has_tensor(f"{s.lm_head}.weight"):
            if not s.tie_word_embeddings:
                raise CheckpointError(f"checkpoint has no '{s.lm_head}.weight' and config.json does not set "
                                      "tie_word_embeddings")
            head = embed
        else:
            head = matrix(s.lm_head, s.vocab_size, s.hidden_size)
        logits = L.LinearOp(h, head).result
        if s.final_softcap:  # Gemma 2
            logits = L.SoftcapOp(logits, s.final_softcap).result
        func.ReturnOp(logits)
    module = ModuleOp([forward])
    module.verify()
    return module
