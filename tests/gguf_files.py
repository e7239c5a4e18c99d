"""GGUF files the tests write themselves with the `gguf` package's GGUFWriter, laid out as llama.cpp's
convert_hf_to_gguf.py writes them (metadata keys, tensor names, q/k row permutation for llama,
transposed GPT-2 projections, tokenizer metadata), from transformers models made by helpers.py."""

from __future__ import annotations

import math

from pathlib import Path

import numpy as np

import gguf

QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
FLOAT_ONLY = ("IQ2_XXS", "IQ3_S")  # (some of them) read with --dequantize only
# where each random-block format keeps its float16 super-scales (d, and dmin): byte offsets in a block
_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,), "IQ4_NL": (0,),
           "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ3_S": (0,)}
CONTROL, NORMAL, UNKNOWN, BYTE = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL),
                                  int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (half-split rotary rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks of a format gguf-py has no quantizer for (K-quants, IQ4) with scales chosen so that
    the values are of the size of a trained weight: uint8 [rows, bytes per row]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at, (lo, hi) in zip(_SCALES[qtype.name], ((1e-4, 3e-4), (5e-4, 2e-3))):  # d, then dmin
        raw[:, at:at + 2] = rng.uniform(lo, hi, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def encode(array: np.ndarray, kind: str, rng) -> tuple[np.ndarray, np.ndarray, gguf.GGMLQuantizationType]:
    """(data to write, float32 values it stands for, type) for a weight stored as `kind`."""
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32" or array.ndim == 1:
        a = array.astype(np.float32)
        return a, a, gguf.GGMLQuantizationType.F32
    if kind == "F16":
        a = array.astype(np.float16)
        return a, a.astype(np.float32), qtype
    if kind == "BF16":
        raw = gguf.quants.quantize(array.astype(np.float32), qtype)
        return raw, gguf.quants.dequantize(raw, qtype), qtype
    if kind in _SCALES:
        raw = random_blocks(qtype, array.shape[0], array.shape[1], rng)
    else:
        raw = gguf.quants.quantize(array.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype), qtype


def hf_to_gguf_names(config, arch: str) -> dict[str, str]:
    names = {}
    if arch == "gpt2":
        names.update({"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                      "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                      "lm_head.weight": "output.weight"})
        parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for i in range(config.n_layer):
            for hf, gg in parts.items():
                for kind in ("weight", "bias"):
                    names[f"transformer.h.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
        return names
    names.update({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"})
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # (qwen3, gemma3)
    if arch == "phi3":  # fused
        parts |= {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    if arch in ("gemma2", "gemma3"):  # the attention's output normalized, and the MLP's input and output
        parts |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(config.num_hidden_layers):
        for hf, gg in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    return names


def write_gguf(model, path: Path, kind: str | tuple[str, ...] = "F32", *, tokenizer: dict | None = None,
               seed: int = 0, extra_tensors: dict | None = None, split_max_tensors: int = 0) -> Path:
    """Writes `model` (a transformers model of llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3/smollm3/gpt2) to a GGUF
    file at `path` with its 2-D weights stored as `kind` (several kinds: taken in turn, matrix by matrix), and loads
    the values the file holds back into `model`, so that model is the float32 reference of the file.
    tokenizer: `tokenizer.*` metadata; extra_tensors: written as they are (float32); split_max_tensors: split the
    model as llama.cpp's gguf-split does, into `path`'s stem-0000i-of-0000N.gguf files of at most that many tensors."""
    import torch

    rng = np.random.default_rng(seed)
    c = model.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "smollm3": "smollm3", "gpt2": "gpt2"}[c.model_type]
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    if arch == "gpt2":
        w.add_feed_forward_length(c.n_inner or 4 * c.hidden_size)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        rope = c.rope_parameters if getattr(c, "rope_parameters", None) else (c.rope_scaling or {})
        if arch == "gemma3":  # as convert_hf_to_gguf's Gemma3Model writes them, but for the layers' pattern:
            w.add_sliding_window(c.sliding_window)  # (convert leaves it to llama.cpp's default, every 6th full)
            sliding = [t == "sliding_attention" for t in c.layer_types]
            if sliding != [i % 6 < 5 for i in range(c.num_hidden_layers)]:
                w.add_sliding_window_pattern(sliding)
            w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
            rope = rope["full_attention"]
        if arch == "gemma2":  # as convert_hf_to_gguf's Gemma2Model writes them (llama.cpp: every 2nd layer full)
            assert c.layer_types == ["sliding_attention" if i % 2 == 0 else "full_attention"
                                     for i in range(c.num_hidden_layers)]
            w.add_sliding_window(c.sliding_window)
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_rope_freq_base(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        w.add_vocab_size(c.vocab_size)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if arch in ("llama", "smollm3"):
            w.add_rope_dimension_count(head_dim)
        if head_dim != c.hidden_size // c.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if arch == "phi3":  # as convert_hf_to_gguf's Phi3MiniModel writes them
            w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
            w.add_sliding_window(c.sliding_window or 0)
            original = c.original_max_position_embeddings
            w.add_rope_scaling_orig_ctx_len(original)
            if rope.get("rope_type") == "longrope":
                scale = c.max_position_embeddings / original
                attn_factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
                w.add_rope_scaling_attn_factors(attn_factor)
                w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
                w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_file_type(0)
    for key, value in (tokenizer or {}).items():
        _add(w, key, value)

    names = hf_to_gguf_names(c, arch)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if getattr(c, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    values, matrices = {}, 0
    for hf_name, tensor in state.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in hf_name:
            continue
        gguf_name = names[hf_name]
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.T
        if arch in ("llama", "smollm3") and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads
            tensor = permute(tensor, heads)
        shift = 1.0 if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight") else 0.0  # Gemma's 1 + w
        tensor = tensor + np.float32(shift)
        matrices += tensor.ndim == 2
        this = kind if isinstance(kind, str) else kind[(matrices - 1) % len(kind)] if tensor.ndim == 2 else "F32"
        data, value, qtype = encode(np.ascontiguousarray(tensor), this, rng)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        # The reference: the stored values, un-permuted / transposed back to the model's layout.
        if arch in ("llama", "smollm3") and (".q_proj." in hf_name or ".k_proj." in hf_name):
            value = value.reshape(heads, -1, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            value = value.T
        value = value - np.float32(shift)  # (exact for the weights near 0 the tests make: Sterbenz)
        values[hf_name] = torch.from_numpy(np.ascontiguousarray(value))
    for name, tensor in (extra_tensors or {}).items():
        w.add_tensor(name, tensor)
    model.load_state_dict(values, strict=False)
    if getattr(c, "tie_word_embeddings", False):
        model.tie_weights()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def bpe_tokenizer_metadata(tokenizer_json: Path, pre: str = "gpt-2", **extra) -> dict:
    """`tokenizer.*` metadata for a byte-level BPE tokenizer.json (as convert's _set_vocab_gpt2 writes it)."""
    import json

    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["id"] for a in data["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [CONTROL if i in specials else NORMAL for i in range(len(tokens))],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
            **extra}


def spm_tokenizer_metadata(corpus: list[str], vocab_size: int, **extra) -> dict:
    """`tokenizer.*` metadata of a SentencePiece-style BPE vocabulary trained on `corpus`: <unk>, <s>,
    </s>, the 256 byte tokens, then pieces scored by merge order (score -rank, as sentencepiece's BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=head, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    vocab = tok.get_vocab()
    pieces = sorted((i, t) for t, i in vocab.items() if i >= len(head))
    tokens = head + [t for _, t in pieces]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * len(head) + [-float(r) for r in range(len(pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, **extra}
