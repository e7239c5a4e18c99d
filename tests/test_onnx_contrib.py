"""Models in the form onnxruntime-genai's model builder writes them (onnxruntime's contrib operators
GroupQueryAttention, SkipSimplifiedLayerNormalization, SkipLayerNormalization and
SimplifiedLayerNormalization; stored rotary tables; past_key_values in, present out) compile into
paged incremental decoders whose logits are onnxruntime's, step by step with its KV cache."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmirc.frontend import onnx_ops
from llmirc.frontend.onnx_contrib import expand_contrib, matmul_nbits_weight
from llmirc.frontend.packed import repack
from llmirc.quant import Scheme, dequantize
from llmirc.artifact_format.reader import open_bundle
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import CheckpointError, LlmircError
from llmirc.runtime import load
from llmirc.runtime.inspect import summary

MS = "com.microsoft"
VOCAB, C, LAYERS = 64, 64, 2


def refused(model: onnx.ModelProto, tmp_path: Path, *needles: str) -> None:
    """Compiling `model` (saved as model.onnx) is refused with a CheckpointError naming every needle,
    and writes nothing. (In process: test_onnx_errors checks that the CLI says such an error in one line.)"""
    path, out = tmp_path / "model.onnx", tmp_path / "m.llmir"
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError) as e:
        compile_model(path, out, CompileOptions(), Progress(None))
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert not out.exists()


def builder_model(heads=4, kv_heads=2, packed=True, rotary=True, interleaved=False, window=-1, scale=None,
                  layer_norm=False, dtype=np.float32, nbits=None, zero_points=False, tied=False,
                  qk_norm=False, embed_scale=None, mha=False, partial=False, qdq=False, softcap=None,
                  final_softcap=None, positions=1024, seed=0) -> onnx.ModelProto:
    """A random decoder in the builder's form: input_ids, attention_mask and past_key_values.N.key/value
    [batch, kv_heads, past, 'kv_cache_dim'] in; logits and present.N.key/value out. With `nbits` (4 or 8)
    every MatMul is a MatMulNBits (blocks of 32, zero points or not), as the builder's `-p int4` writes;
    `tied` then reads the embedding from the LM head's codes (GatherBlockQuantized of a Reshape); without
    `nbits`, a Gather of the Transpose of the LM head's MatMul weight. `qk_norm`:
    Qwen3's per-head q/k RMSNorm as the builder writes it (the packed projection Split, each of q and k
    reshaped to [B, S*H, D], SimplifiedLayerNormalization, reshaped back); `embed_scale`: the embedding
    multiplied by that scalar (Gemma's sqrt(hidden)). `mha`: the form the builder writes for `-e cpu -p fp16`
    (separate q/k/v only): RotaryEmbedding of q and k at position_ids (an input then), and MultiHeadAttention:
    for grouped-query heads, after the past's Concat and the k/v heads' repeat in plain ops, with an additive
    causal + attention_mask bias built in the graph; else reading the past itself, unidirectional. `partial`:
    the first half of each head rotated (RotaryEmbedding's num_heads and rotary_embedding_dim). `qdq` (with
    `nbits`): the builder's `use_qdq=true` form instead, MatMul (and the embedding's Gather) of a blocked
    DequantizeLinear of int4 / int8 codes (uint4 / uint8 with `zero_points`). `softcap`, `final_softcap`: Gemma 2's,
    GroupQueryAttention's softcap attribute and the logits' Div, Tanh and Mul as the builder writes them. `positions`:
    the rotary tables' rows (the builder's: max_position_embeddings)."""
    rng = np.random.default_rng(seed)
    d = C // heads
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype if np.asarray(value).dtype.kind == "f"
                                                        else None), name))
        return name

    def w(name, *shape, s=0.3, shift=0.0):
        return init(f"W.{name}", rng.standard_normal(shape) * s + shift)

    def dequantized(name, w, axis=0):  # w [N, K] in blocks of 32 along K: DequantizeLinear of its codes,
        b, scales, zp = matmul_nbits(w, nbits, 32, zero_points, rng)  # [K, N] (axis 0, MatMul's B) or [N, K]
        n, k = w.shape

        def codes_of(packed, count):
            packed = packed.reshape(n, -1)
            return packed if nbits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(n, -1)[:, :count]
        elem = {(4, False): TensorProto.INT4, (4, True): TensorProto.UINT4, (8, False): TensorProto.INT8,
                (8, True): TensorProto.UINT8}[nbits, zero_points]
        parts = [(codes_of(b, k).astype(np.int64) - (0 if zero_points else 1 << (nbits - 1)), f"{name}_Q"),
                 (scales, f"{name}_scales")] + ([(codes_of(zp, k // 32), f"{name}_zp")] if zero_points else [])
        for i, (value, part) in enumerate(parts):
            value = value.T if axis == 0 else value
            if i == 1:
                init(part, value)
            else:
                inits.append(helper.make_tensor(part, elem, value.shape, value.reshape(-1).tolist()))
        nodes.append(helper.make_node("DequantizeLinear", [p for _, p in parts], [f"{name}_DQ"],
                                      name=f"/DQ_{len(nodes)}", axis=axis, block_size=32))
        return f"{name}_DQ"

    def node(op, inputs, outputs, domain="", **attrs):
        if op == "MatMul" and nbits and qdq:
            w = numpy_helper.to_array(next(t for t in inits if t.name == inputs[1])).astype(np.float32)
            inputs = [inputs[0], dequantized(inputs[1], w.T)]
        elif op == "MatMul" and nbits:
            w = numpy_helper.to_array(next(t for t in inits if t.name == inputs[1])).astype(np.float32)
            b, scales, zp = matmul_nbits(w.T, nbits, 32, zero_points, rng)
            parts = [init(f"{inputs[1]}_Q", b), init(f"{inputs[1]}_scales", scales)]
            parts += [init(f"{inputs[1]}_zp", zp)] if zero_points else []
            op, domain, inputs = "MatMulNBits", MS, [inputs[0], *parts]
            attrs = dict(K=w.shape[0], N=w.shape[1], bits=nbits, block_size=32)
        nodes.append(helper.make_node(op, inputs, outputs, name=f"/{op}_{len(nodes)}", domain=domain, **attrs))
        return outputs[0]

    # the builder's attention_mask subgraph: seqlens_k = sum(mask) - 1, total = mask.shape[1] (int32)
    one = init("one", np.array([1], np.int64))
    seqlens = node("Cast", [node("Sub", [node("ReduceSum", ["attention_mask", one], ["rs"], keepdims=0), one],
                                 ["sub"])], ["seqlens_k"], to=TensorProto.INT32)
    total = node("Cast", [node("Gather", [node("Shape", ["attention_mask"], ["shape"]),
                                          init("idx1", np.array(1, np.int64))], ["tot"], axis=0)],
                 ["total_len"], to=TensorProto.INT32)
    rd = d // 2 if partial else d  # the rotated width
    inv_freq = 1.0 / 10000 ** (np.arange(0, rd, 2) / rd)
    angles = np.arange(positions)[:, None] * inv_freq[None].astype(np.float32)
    init("cos_cache", np.cos(angles))
    init("sin_cache", np.sin(angles))
    if tied and not nbits:  # the builder's tied float embedding: the LM head's MatMul weight [C, VOCAB] transposed
        x = node("Gather", [node("Transpose", [w("lm_head", C, VOCAB)], ["embed_t"]), "input_ids"], ["x0"])
    elif tied:  # the builder's tied int4 embedding: the LM head's codes [VOCAB, C/32, 16] viewed as rows
        b, scales, zp = matmul_nbits(rng.standard_normal((VOCAB, C)), nbits, 32, zero_points, rng)
        head = [init("W.head_Q", b), init("W.head_scales", scales)] + \
            ([init("W.head_zp", zp.reshape(VOCAB, -1))] if zero_points else [])  # (rows: as GatherBlockQuantized needs)
        rows = node("Reshape", [head[0], init("rows_shape", np.array([VOCAB, C * nbits // 8], np.int64))], ["rows"])
        x = node("GatherBlockQuantized", [rows, "input_ids", *head[1:]], ["x0"], domain=MS, bits=nbits, block_size=32,
                 gather_axis=0, quantize_axis=1)
    elif qdq:  # the table [VOCAB, C] in blocks along C: DequantizeLinear's axis 1
        table = dequantized("W.embed", rng.standard_normal((VOCAB, C)), axis=1)
        x = node("Gather", [table, "input_ids"], ["x0"])
    else:
        x = node("Gather", [w("embed", VOCAB, C, s=1.0), "input_ids"], ["x0"])
    if embed_scale is not None:
        x = node("Mul", [x, init("embed_scale", np.array(embed_scale))], ["x0_scaled"])

    def norm(i, inp, skip=None):
        names = [f"n{i}", "", "", f"s{i}"] if skip else [f"n{i}"]
        gamma = w(f"gamma{i}", C, s=0.1, shift=1.0)
        if layer_norm:
            beta = w(f"beta{i}", C, s=0.1)
            if skip:
                return node("SkipLayerNormalization", [inp, skip, gamma, beta], names, domain=MS, epsilon=1e-5)
            return node("LayerNormalization", [inp, gamma, beta], names, axis=-1, epsilon=1e-5)
        if skip:
            return node("SkipSimplifiedLayerNormalization", [inp, skip, gamma], names, domain=MS, epsilon=1e-5)
        return node("SimplifiedLayerNormalization", [inp, gamma], names, axis=-1, epsilon=1e-5)

    h, residual, presents = norm(0, x), x, []
    for i in range(LAYERS):
        if qk_norm:
            split = node("MatMul", [h, w(f"qkv{i}", C, (heads + 2 * kv_heads) * d)], [f"qkv{i}"])
            sizes = init(f"sizes{i}", np.array([heads * d, kv_heads * d, kv_heads * d], np.int64))
            nodes.append(helper.make_node("Split", [split, sizes], [f"q{i}", f"k{i}", f"v{i}"], name=f"/Split{i}",
                                          axis=-1))
            qkv = [f"v{i}"]
            for p, n in (("k", kv_heads), ("q", heads)):
                x_heads = node("Reshape", [f"{p}{i}", init(f"{p}heads{i}", np.array([0, -1, d], np.int64))],
                               [f"{p}h{i}"])
                normed = node("SimplifiedLayerNormalization", [x_heads, w(f"{p}norm{i}", d, s=0.1, shift=1.0)],
                              [f"{p}n{i}"], axis=-1, epsilon=1e-6)
                qkv.insert(0, node("Reshape", [normed, init(f"{p}rows{i}", np.array([0, -1, n * d], np.int64))],
                                   [f"{p}r{i}"]))
        elif packed:
            qkv = [node("MatMul", [h, w(f"qkv{i}", C, (heads + 2 * kv_heads) * d)], [f"qkv{i}"]), "", ""]
        else:
            qkv = [node("MatMul", [h, w(f"{p}{i}", C, n * d)], [f"{p}{i}_out"])
                   for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
        if mha:
            a = mha_attention(node, init, qkv, i, heads, kv_heads, d, rd, interleaved, scale, presents, elem)
        else:
            attrs = dict(num_heads=heads, kv_num_heads=kv_heads, local_window_size=window, do_rotary=int(rotary),
                         rotary_interleaved=int(interleaved))
            if scale is not None:
                attrs["scale"] = scale
            if softcap is not None:
                attrs["softcap"] = softcap
            presents += [f"present.{i}.key", f"present.{i}.value"]
            a = node("GroupQueryAttention", [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                                             total, "cos_cache" if rotary else "", "sin_cache" if rotary else ""],
                     [f"attn{i}", *presents[-2:]], domain=MS, **attrs)
        o = node("MatMul", [a, w(f"o{i}", heads * d, C)], [f"o{i}_out"])
        h = norm(2 * i + 1, residual if i == 0 else f"s{2 * i}", o)
        gate = node("MatMul", [h, w(f"gate{i}", C, 2 * C)], [f"g{i}"])
        act = node("Mul", [gate, node("Sigmoid", [gate], [f"sg{i}"])], [f"silu{i}"])
        up = node("Mul", [act, node("MatMul", [h, w(f"up{i}", C, 2 * C)], [f"u{i}"])], [f"m{i}"])
        h = norm(2 * i + 2, f"s{2 * i + 1}", node("MatMul", [up, w(f"down{i}", 2 * C, C)], [f"d{i}"]))
    if tied and nbits:
        nodes.append(helper.make_node("MatMulNBits", [h, *head], ["logits"], domain=MS, K=C, N=VOCAB, bits=nbits,
                                      block_size=32))
    elif final_softcap:
        cap = init("final_softcap", np.array(final_softcap))
        logits = node("MatMul", [h, "W.lm_head" if tied else w("lm_head", C, VOCAB)], ["lm_head_out"])
        node("Mul", [node("Tanh", [node("Div", [logits, cap], ["capped"])], ["tanh"]), cap], ["logits"])
    else:
        node("MatMul", [h, "W.lm_head" if tied else w("lm_head", C, VOCAB)], ["logits"])
    past = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", elem, ["batch_size", kv_heads, "past_len",
                                                                              "kv_cache_dim"])
            for i in range(LAYERS) for kv in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_len"]), *past]
    if mha:
        inputs.insert(2, helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                       ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", VOCAB])] + \
        [helper.make_tensor_value_info(p, elem, ["batch_size", kv_heads, "total_len", d]) for p in presents]
    graph = helper.make_graph(nodes, "builder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def mha_attention(node, init, qkv, i, heads, kv_heads, d, rd, interleaved, scale, presents, elem) -> str:
    """Layer i's attention as the builder writes it for MultiHeadAttention (base.py's make_repeat_kv and
    make_attention_mask_reformatting_for_mha): its output [B, S, heads*d]."""
    made = {}

    def const(name, value):
        if name not in made:
            made[name] = init(f"{name}{i}", np.array(value, np.int64))
        return made[name]

    rope = dict(domain=MS, interleaved=int(interleaved), num_heads=0, rotary_embedding_dim=0)
    q, k, v = qkv
    qr, kr = (node("RotaryEmbedding", [x, "position_ids", "cos_cache", "sin_cache"], [f"{x}_rot"],
                   **{**rope, **(dict(num_heads=n, rotary_embedding_dim=rd) if rd < d else {})})
              for x, n in ((q, heads), (k, kv_heads)))
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    presents += [f"present.{i}.key", f"present.{i}.value"]
    attrs = dict(num_heads=heads, **({"scale": scale} if scale is not None else {}))
    if heads == kv_heads:  # the past read by the node itself
        return node("MultiHeadAttention", [qr, kr, v, "", "", "", *past], [f"attn{i}", *presents[-2:]],
                    domain=MS, unidirectional=1, **attrs)
    kv = []
    for x, p, out in zip((kr, v), past, presents[-2:]):  # [B, S, kv*d] -> present [B, kv, T, d] -> [B, T, heads*d]
        heads_first = node("Transpose", [node("Reshape", [x, const("kvshape", [0, 0, kv_heads, d])], [f"{x}_4d"])],
                           [f"{x}_bnsd"], perm=[0, 2, 1, 3])
        present = node("Concat", [p, heads_first], [out], axis=2)
        rep = node("Expand", [node("Unsqueeze", [present, const("ax2", [2])], [f"{out}_u"]),
                              const("rep", [1, 1, heads // kv_heads, 1, 1])], [f"{out}_e"])
        rep = node("Reshape", [rep, const("hshape", [0, heads, -1, d])], [f"{out}_r"])
        rep = node("Transpose", [rep], [f"{out}_t"], perm=[0, 2, 1, 3])
        kv.append(node("Reshape", [rep, const("flat", [0, 0, heads * d])], [f"{out}_flat"]))
    # the bias [1, heads, S, T]: causal (query j at past + j) plus attention_mask's, each -max where masked
    low = init(f"low{i}", np.array(np.finfo(elem_np(elem)).min, elem_np(elem)))
    zero = init(f"zero{i}", np.array(0, elem_np(elem)))
    length = node("Shape", ["input_ids"], [f"S{i}"], start=1, end=2)
    total = node("Shape", ["attention_mask"], [f"T{i}"], start=1, end=2)
    scal = [node("Squeeze", [x, const("ax0", [0])], [f"{x}_s"]) for x in (length, total)]
    first = node("Sub", [scal[1], scal[0]], [f"P{i}"])
    rows = node("Unsqueeze", [node("Range", [first, scal[1], const("one", 1)], [f"rows{i}"]), const("ax1", [1])],
                [f"rows_u{i}"])
    cols = node("Range", [const("zero_i", 0), scal[1], const("one_i", 1)], [f"cols{i}"])
    causal = node("Where", [node("LessOrEqual", [cols, rows], [f"le{i}"]), zero, low], [f"causal{i}"])
    keep = node("Cast", ["attention_mask"], [f"keep{i}"], to=TensorProto.BOOL)
    padding = node("Where", [keep, zero, low], [f"pad{i}"])  # [B, T]
    padding = node("Unsqueeze", [padding, const("ax12", [1, 2])], [f"pad_u{i}"])
    bias = node("Add", [node("Unsqueeze", [causal, const("ax01", [0, 1])], [f"causal_u{i}"]), padding], [f"bias{i}"])
    bias = node("Tile", [bias, const("tile", [1, heads, 1, 1])], [f"bias_t{i}"])
    return node("MultiHeadAttention", [qr, *kv, "", "", bias], [f"attn{i}"], domain=MS, **attrs)


def elem_np(elem: int):
    return helper.tensor_dtype_to_np_dtype(elem)


def matmul_nbits(w: np.ndarray, bits: int, block: int, zero_points: bool, rng):
    """MatMulNBits' (B, scales, zero_points) for w [N, K], round to nearest: random codes are not the
    point, so each block's scale is its range over the codes' (zero points random in [0, 2^bits))."""
    n, k = w.shape
    top = (1 << bits) - 1
    blocks = w.reshape(n, k // block, block)
    if zero_points:
        z = rng.integers(0, top + 1, (n, k // block))
        s = np.maximum(np.abs(blocks).max(-1), 1e-3) / np.maximum(np.maximum(z, top - z), 1)
    else:
        z = np.full((n, k // block), 1 << (bits - 1))
        s = np.abs(blocks).max(-1) / (1 << (bits - 1))
    codes = np.clip(np.rint(blocks / s[..., None]) + z[..., None], 0, top).astype(np.uint8)

    def pack(u):  # 8 / bits codes a byte, the first in the low bits; rows padded to whole bytes
        if bits == 8:
            return u
        u = np.concatenate([u, np.zeros((*u.shape[:-1], u.shape[-1] % 2), np.uint8)], -1)
        return u[..., 0::2] | (u[..., 1::2] << 4)
    zp = pack(z.astype(np.uint8)).reshape(-1) if zero_points else None
    return pack(codes), s.astype(np.float32), zp


def onnxruntime_steps(path, prompt: list[int], steps: int, head_dim: int):
    """Greedy decoding in onnxruntime with its own KV cache (present fed back as past): each step's
    last logits row (float64) and the tokens."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past")]
    names = {i.name for i in sess.get_inputs()}
    dtype = np.float16 if pasts[0].type == "tensor(float16)" else np.float32
    past = [np.zeros((1, i.shape[1], 0, head_dim), dtype) for i in pasts]
    rows, tokens, ids, length = [], [], list(prompt), 0
    for _ in range(steps):
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, length + len(ids)), np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, length + len(ids))[None]
        out = sess.run(None, {**feeds, **{i.name: p for i, p in zip(pasts, past)}})
        rows.append(out[0][0, -1].astype(np.float64))
        length, past = length + len(ids), out[1:]
        ids = [int(np.argmax(rows[-1]))]
        tokens.append(ids[0])
    return rows, tokens


CASES = {  # each feature once, several to a model (a case is a compile)
    "packed-window": dict(window=5),
    "separate-interleaved-layernorm-scaled": dict(packed=False, interleaved=True, layer_norm=True, scale=0.2),
    "no-rotary-mha": dict(rotary=False, heads=2, kv_heads=2),  # (the default scale; the head size inferred)
    "float16": dict(dtype=np.float16),  # llmirc computes in float32, onnxruntime partly in float16
    "qk-norm": dict(qk_norm=True),  # Qwen3
    "embedding-scale": dict(embed_scale=8.0),  # Gemma
    # Gemma 2 as the builder writes it: a cap of 50 beside a scale that is not head_dim's (query_pre_attn_scalar; the
    # product of the three, tried first, passed with a tolerance it made itself), a logits cap that bends the logits
    "softcap-window-scaled": dict(softcap=50.0, final_softcap=3.0, window=5, scale=0.0625),
    # a cap below 1 (a config may set one) and a negative logits' cap, -3 tanh(x / -3) = 3 tanh(x / 3): both were left
    # generic (a full-sequence model), no candidate matching them
    "softcap-below-one-negative-final": dict(softcap=0.5, final_softcap=-3.0),
    # rotary tables shorter than the length the attention fusion reads masks and tables at (512): read at their rows
    "window-short-tables": dict(window=5, positions=200),
    "tied": dict(tied=True),  # the embedding a Transpose of the LM head's weight: one copy in the bundle
    # weights kept quantized (bit for bit: test_matmul_nbits_weights_are_kept_exactly); llmirc's CPU
    # kernels round the activations to int8 per 32, onnxruntime does not (accuracy_level 0): on these
    # random models that alone moves the logits by 4-6% relative RMS (measured against llmirc's own
    # float bundle of the dequantized weights, which matches onnxruntime to 2e-6); the scales are kept in
    # their stored type, float32 or float16
    "qk-norm-int4": dict(qk_norm=True, nbits=4),
    "int8-float16": dict(nbits=8, dtype=np.float16),
    # Gemma's int4 form: the tied quantized embedding scaled (llmir.embedding's scale; it was left generic)
    "int4-tied-zero-points-float16-scaled": dict(nbits=4, tied=True, zero_points=True, dtype=np.float16,
                                                 embed_scale=8.0),
    "qdq-uint4-zero-points": dict(nbits=4, qdq=True, zero_points=True),  # use_qdq=true: DequantizeLinear
    # -e cpu -p fp16's RotaryEmbedding + MultiHeadAttention, in float32 (onnxruntime's float16 MultiHeadAttention
    # moves these logits by 1%; the builder's own float16 output matches to 0.1%)
    "mha-grouped": dict(mha=True, packed=False),  # the past's Concat, the heads' repeat and the bias in plain ops
    "mha-past-partial-interleaved": dict(mha=True, packed=False, heads=4, kv_heads=4, partial=True, interleaved=True,
                                         scale=0.3),
}


@pytest.mark.parametrize("case", CASES)
def test_builder_model_matches_onnxruntime(tmp_path, case):
    path = tmp_path / "model.onnx"
    onnx.save(builder_model(**CASES[case]), str(path))
    if "tied" in CASES[case]:  # the builder's config: the context and the special tokens
        (tmp_path / "genai_config.json").write_text(json.dumps(
            {"model": {"type": "llama", "context_length": 512, "eos_token_id": 7, "bos_token_id": 1},
             "search": {"do_sample": True, "temperature": 0.6, "top_k": 20, "num_beams": 1}}))
    bundle = tmp_path / "m.llmir"
    log, report = io.StringIO(), io.StringIO()
    compile_model(path, bundle, CompileOptions(cpu_variants=("native",), report=True), Progress(log), stdout=report)
    report = report.getvalue()
    if "tied" in CASES[case]:
        assert "onnx-fuse-embedding: embedding of tokens" in report, report
        order = open_bundle(bundle, verify=False).manifest["weights"]["order"]
        one_copy = ["W.lm_head.T"] if "nbits" not in CASES[case] else [f"W.head_Q.weight.{p}"
                                                                          for p in ("codes", "scales", "zeros")]
        assert [n for n in order if "head" in n or "embed" in n] == one_copy, order
        assert "context: 512 tokens (genai_config.json model context_length)" in log.getvalue(), log.getvalue()
        assert open_bundle(bundle, verify=False).manifest["generation"]["eos_token_ids"] == [7]
    assert "onnx-fuse-attention: attention" in report and "left generic: none" in report, report
    assert ("MatMulNBits -> linear" in report) == ("nbits" in CASES[case]), report
    if "nbits" in CASES[case]:  # the packed weights' scales as stored (a float16 model's in 16 bits), as inspect says
        stored = np.dtype(CASES[case].get("dtype", np.float32)).name
        dtypes = open_bundle(bundle, verify=False).manifest["weights"]["dtypes"]
        assert {d for name, d in dtypes.items() if name.endswith(".scales")} == {stored}, dtypes
        assert {q.get("scale_dtype", stored) for q in summary(bundle, verify=False)["quantization"]} == {stored}
    assert ("DequantizeLinear + MatMul -> MatMulNBits x" in report) == ("qdq" in CASES[case]), report
    assert ("DequantizeLinear + Gather -> GatherBlockQuantized x1" in report) == ("qdq" in CASES[case]), report
    if "window" in CASES[case]:  # (read from the mask at 512 positions, or at the tables' rows when fewer)
        assert f"window {CASES[case]['window']}" in report, report
    if "softcap" in CASES[case]:  # (1 / scale = 16 passed for the cap of 50 too: scores of 0.25 hardly bend)
        caps = CASES[case]["softcap"], abs(CASES[case]["final_softcap"])
        assert "softcap %g)" % caps[0] in report and "onnx-fuse-activation: softcap %g " % caps[1] in report, report
    ops = ("MultiHeadAttention x2", "RotaryEmbedding x4") if "mha" in CASES[case] else ("GroupQueryAttention x2",)
    assert "onnxruntime contrib operators replaced: " in report and all(o in report for o in ops), report
    prompt = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9]
    want_rows, want_tokens = onnxruntime_steps(path, prompt, 10, C // CASES[case].get("heads", 4))
    compiled = load(bundle)
    assert not compiled.full_sequence
    # the sampling genai_config.json's search recommends: the bundle's generation config (serve's defaults)
    assert compiled.generation_config == ({"temperature": 0.6, "top_k": 20} if "tied" in CASES[case] else {})
    got = compiled.score(prompt + want_tokens[:-1])[len(prompt) - 1:]
    if "nbits" in CASES[case]:
        want = np.array(want_rows)
        assert np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()) < 0.08
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
        return
    tol = 1e-2 if case == "float16" else 1e-4
    for i, (row, want) in enumerate(zip(got, want_rows)):
        np.testing.assert_allclose(row, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=f"step {i}")
    tokens = compiled.generate([prompt], max_new_tokens=10, ignore_eos=True)[0]
    assert list(tokens) == want_tokens  # greedy: llmirc's decode steps chose onnxruntime's tokens


@pytest.mark.parametrize("change,needle", [
    (lambda n: n.attribute.append(helper.make_attribute("smooth_softmax", 1)), "smooth_softmax=1 is not computed"),
    (lambda n: n.attribute.append(helper.make_attribute("softcap", -3.0)), "softcap=-3.0 is not a finite number"),
    (lambda n: n.input.extend(["", "", "cos_cache"]), "input 11 (head_sink)"),
    (lambda n: n.input.__setitem__(1, "x0"), "key and value must both be given"),
])
def test_builder_attention_llmirc_does_not_compute_is_refused(tmp_path, change, needle):
    model = builder_model()
    change(next(n for n in model.graph.node if n.op_type == "GroupQueryAttention"))
    refused(model, tmp_path, "model.onnx: ONNX GroupQueryAttention", needle)


@pytest.mark.parametrize("bits,zero_points,dtype", [(4, False, np.float32), (4, True, np.float16),
                                                   (8, True, np.float32), (8, False, np.float16)])
def test_matmul_nbits_weights_are_kept_exactly(bits, zero_points, dtype):
    """The layout as onnxruntime reads it (its MatMulNBits times the identity gives W^T), and llmirc's
    repacking of it (llmirc/quant.py's parts), dequantize to the same weights, bit for bit."""
    rng = np.random.default_rng()
    n, k, block = 48, 128, 32
    b, scales, zp = matmul_nbits(rng.standard_normal((n, k)), bits, block, zero_points, rng)
    scales = scales.astype(dtype)
    ref = matmul_nbits_weight(b, scales, zp, k, bits, block)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")] + \
        ([numpy_helper.from_array(zp, "zp")] if zero_points else [])
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"] + (["zp"] if zero_points else []), ["Y"], domain=MS,
                            K=k, N=n, bits=bits, block_size=block)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", elem, ["rows", k])],
                              [helper.make_tensor_value_info("Y", elem, ["rows", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"A": np.eye(k, dtype=dtype)})[0].T.astype(np.float32),
                                  ref.astype(dtype).astype(np.float32))
    # the importer's evaluators (onnx_ops) of MatMulNBits and of GatherBlockQuantized (rows of the same codes)
    attrs = dict(K=k, N=n, bits=bits, block_size=block)
    a = rng.standard_normal((3, k)).astype(dtype)
    (y,) = onnx_ops.evaluate("MatMulNBits", [a, b, scales] + ([zp] if zero_points else []), attrs)
    np.testing.assert_allclose(y, sess.run(None, {"A": a})[0], rtol=2e-3 if dtype == np.float16 else 1e-5,
                               atol=1e-2 if dtype == np.float16 else 1e-4)
    ids = rng.integers(0, n, (1, 5))
    gather_attrs = dict(bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    inputs = [b.reshape(n, -1), ids, scales.reshape(n, -1)] + ([zp.reshape(n, -1)] if zero_points else [])
    (rows,) = onnx_ops.evaluate("GatherBlockQuantized", inputs, gather_attrs)
    np.testing.assert_array_equal(rows, ref.astype(dtype)[ids])
    scheme = Scheme(bits, block, np.dtype(dtype).name, "int" if zero_points else "none")  # (scales as stored)
    tensors = {"W.qweight": b, "W.scales": scales.astype(np.float32), "W.qzeros": zp}  # (read as float32)
    parts = repack("matmul_nbits", "W", scheme, k, tensors.__getitem__)
    np.testing.assert_array_equal(dequantize(parts, scheme, k).astype(np.float32), ref)  # (one rounding of s (u - z))


@pytest.mark.parametrize("elem", [TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8])
def test_blocked_dequantize_linear_is_read_as_onnxruntimes_quantized_operators(tmp_path, elem):
    """The QDQ form's blocked DequantizeLinear before a MatMul (codes [K, N]) and a Gather (a table [V, H]),
    zero points or not, and GatherBlockQuantized of 4-bit codes: rewritten as MatMulNBits and
    GatherBlockQuantized of unsigned codes, which onnxruntime computes to the same bits; nothing of int4 is left."""
    rng = np.random.default_rng(0)
    bits, signed = (4 if elem in (TensorProto.INT4, TensorProto.UINT4) else 8), elem in (TensorProto.INT4,
                                                                                        TensorProto.INT8)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    v, k, n, block = 16, 64, 24, 32
    inits = []

    def codes(name, shape, dtype=elem):
        inits.append(helper.make_tensor(name, dtype, shape, rng.integers(lo, hi, shape).reshape(-1).tolist()))
        return name

    def scales(name, shape):
        inits.append(numpy_helper.from_array((rng.random(shape) * 0.1 + 0.01).astype(np.float32), name))
        return name
    nodes = [helper.make_node("DequantizeLinear", [codes("T", [v, k]), scales("Ts", [v, k // block])], ["t"],
                              axis=1, block_size=block),
             helper.make_node("Gather", ["t", "ids"], ["x"]),
             helper.make_node("DequantizeLinear", [codes("W", [k, n]), scales("Ws", [k // block, n]),
                                                   codes("Wz", [k // block, n])], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if bits == 4:  # (the builder's op_types_to_quantize=MatMul/Gather writes these: uint4 with zero points)
        gather = [codes("G", [v, k]), "ids", scales("Gs", [v, k // block])] + \
            ([] if signed else [codes("Gz", [v, k // block])])
        nodes.append(helper.make_node("GatherBlockQuantized", gather, ["g"], domain=MS, bits=4, block_size=block,
                                      gather_axis=0, quantize_axis=1))
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    feeds = {"ids": rng.integers(0, v, (1, 7))}
    want = _ort(model, feeds)
    done = expand_contrib(model, tmp_path / "model.onnx")
    assert sorted(done)[:2] == ["DequantizeLinear + Gather -> GatherBlockQuantized",
                                "DequantizeLinear + MatMul -> MatMulNBits"], done
    assert [nd.op_type for nd in model.graph.node][:2] == ["GatherBlockQuantized", "MatMulNBits"]
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer)
    for got, w in zip(_ort(model, feeds), want):
        np.testing.assert_array_equal(got, w)


def test_matmul_nbits_llmirc_does_not_read_is_refused(tmp_path):
    model = builder_model(nbits=4)
    next(n for n in model.graph.node if n.op_type == "MatMulNBits").input.extend(["", "g_idx"])
    model.graph.initializer.append(numpy_helper.from_array(np.arange(C, dtype=np.int32) // 32, "g_idx"))
    refused(model, tmp_path, "model.onnx: ONNX MatMulNBits", "g_idx")
    for bits, needle in ((3, "3-bit weights"), (4, "scales has 1 values")):  # a layout that is not MatMulNBits'
        model = builder_model(nbits=4, zero_points=bits == 4)
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        if bits == 3:
            next(a for a in node.attribute if a.name == "bits").i = 3
        else:
            next(t for t in model.graph.initializer if t.name == node.input[2]).CopyFrom(
                numpy_helper.from_array(np.ones(1, np.float32), node.input[2]))
        refused(model, tmp_path, "model.onnx: ONNX MatMulNBits", needle)


def test_builder_model_without_lm_head_is_refused(tmp_path):
    """exclude_lm_head=true: the output is the final norm's hidden_states, no logits; it was compiled
    as a model whose vocabulary was the hidden size."""
    model = builder_model()
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    model.graph.node.remove(head)
    model.graph.output[0].name = "hidden_states"
    next(n for n in model.graph.node if n.output[0] == head.input[0]).output[0] = "hidden_states"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = C
    refused(model, tmp_path, "model.onnx: ", "the graph's output is 'hidden_states'")


def test_builder_options_llmirc_does_not_read_are_named(tmp_path):
    """exclude_embeds=true (inputs_embeds instead of input_ids) and prune_lm_head=true (the last row's
    logits alone) are refused naming the builder's option."""
    model = builder_model()
    model.graph.input[0].name = "inputs_embeds"
    refused(model, tmp_path, "graph input 'inputs_embeds' has no known role", "exclude_embeds=true")
    model = builder_model()
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    head.output[0] = "all_logits"
    model.graph.node.append(helper.make_node("Slice", ["all_logits", "last", "end", "seq_axis"], ["logits"]))
    model.graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), name) for name, v in
                                   (("last", -1), ("end", np.iinfo(np.int64).max), ("seq_axis", 1)))
    with pytest.raises(LlmircError, match=r"output has shape \[1, 1, 64\].*prune_lm_head=true"):
        path = tmp_path / "pruned.onnx"
        onnx.save(model, str(path))
        compile_model(path, tmp_path / "p.llmir", CompileOptions(), Progress(None))


def _single_node(node, inputs: dict, inits=()) -> onnx.ModelProto:
    vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
          for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output if o]
    graph = helper.make_graph([node], "g", vi, outs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def _ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # (no fusing the expansion back)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("form", [
    "rope 3d", "rope 3d interleaved partial", "rope 4d offset", "rope 4d interleaved partial offset",
    "mha bias", "mha unidirectional past", "mha padding-mask-2d filter unidirectional",
    "mha padding-mask-3d past", "mha attention-bias past", "mha 4d-kv unidirectional"])
def test_rotary_and_multi_head_attention_are_onnxruntimes(form):
    """Each form of the two operators, one call on random inputs: onnxruntime's kernel and onnxruntime
    running llmirc's replacement agree (the semantics the compiled models rely on)."""

    rng = np.random.default_rng(1)
    B, S, N, H, P = 2, 5, 3, 8, 4
    f = rng.standard_normal
    inits = []
    if form.startswith("rope"):
        r = H // 2 if "partial" in form else H
        inits = [numpy_helper.from_array(fn(f((32, r // 2))).astype(np.float32), n)
                 for fn, n in ((np.cos, "cos"), (np.sin, "sin"))]
        x = f((B, N, S, H) if "4d" in form else (B, S, N * H)).astype(np.float32)
        pos = np.array([7]) if "offset" in form else rng.integers(0, 32, (B, S))
        feeds = {"x": x, "pos": pos}
        attrs = dict(interleaved=int("interleaved" in form))
        attrs.update(dict(num_heads=N, rotary_embedding_dim=r) if "partial" in form else {})
        node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS, **attrs)
    else:
        T = S + P if "past" in form else S
        kv = (B, N, T, H) if "4d-kv" in form else (B, S, N * H)
        feeds = {"q": f((B, S, N * H)), "k": f(kv), "v": f(kv)}
        names, outputs = ["q", "k", "v", "", "", "", "", ""], ["y"]
        attrs = dict(num_heads=N, unidirectional=int("unidirectional" in form))
        if "bias" in form and "attention" not in form:
            feeds["bias"], names[3] = f(3 * N * H), "bias"
        if "padding-mask" in form:
            mask = np.ones((B, T) if "2d" in form else (B, S, T), np.int32)
            mask[0, ..., 1] = 0
            feeds["mask"], names[4] = mask, "mask"
        if "filter" in form:
            attrs["mask_filter_value"] = -3.0
        if "attention-bias" in form:
            feeds["ab"], names[5] = 2 * f((1, N, S, T)), "ab"
        if "past" in form:
            feeds["pk"], feeds["pv"], names[6:8], outputs = f((B, N, P, H)), f((B, N, P, H)), ["pk", "pv"], \
                ["y", "present_k", "present_v"]
        feeds = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feeds.items()}
        node = helper.make_node("MultiHeadAttention", names, outputs, domain=MS, **attrs)
    model = _single_node(node, feeds, inits)
    want = _ort(model, feeds)
    assert expand_contrib(model, Path("model.onnx")) and not any(n.domain == MS for n in model.graph.node)
    for got, w in zip(_ort(model, feeds), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("op,change,needle", [
    ("RotaryEmbedding", lambda n: n.attribute.append(helper.make_attribute("is_packed_batching", 1)),
     "is_packed_batching=1"),
    ("RotaryEmbedding", lambda n: n.attribute.append(helper.make_attribute("scale", 2.0)), "scale=2.0"),
    ("MultiHeadAttention", lambda n: n.output.append("qk"), "output 3 (qk"),
    ("MultiHeadAttention", lambda n: n.input.extend(["", "position_ids"]), "input 9 (cache_indirection"),
    ("MultiHeadAttention", lambda n: n.output.__delitem__(slice(1, None)), "without the present_key"),
])
def test_builder_rotary_or_attention_llmirc_does_not_compute_is_refused(tmp_path, op, change, needle):
    model = builder_model(mha=True, packed=False, heads=4, kv_heads=4)
    change(next(n for n in model.graph.node if n.op_type == op))
    refused(model, tmp_path, f"model.onnx: ONNX {op}", needle)


def test_bfloat16_rotary_tables_are_read_at_bfloat16s_rounding():
    """`-e cuda -p bf16` stores the cos/sin caches in bfloat16, whose values up to 1 are mostly float16's
    too: they are checked at bfloat16's rounding, so the rotary and the attention are recognized (checked at
    float16's, neither was, and the builder's bf16 model compiled as a full-sequence model)."""
    from llmirc.passes.onnx_fuse_attention import _inv_freq_from_tables, _rounding, close

    def bf16(x):  # float32 rounded to the nearest bfloat16 (ties to even), as float32
        u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    angles = np.arange(512, dtype=np.float32)[:, None] * (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(
        np.float32)[None]
    cos, sin = bf16(np.cos(angles)), bf16(np.sin(angles))
    tol = _rounding(cos)
    assert tol == 2 ** -8
    inv = _inv_freq_from_tables(cos, sin)[0]
    found = (np.arange(512, dtype=np.float32)[:, None] * inv[None]).astype(np.float32).astype(np.float64)
    assert close(cos, np.cos(found), tol) and close(sin, np.sin(found), tol)


def test_quant_and_dtype_on_an_int4_model_note_that_they_changed_nothing(tmp_path):
    """--quant and --dtype on the builder's int4 model (every linear MatMulNBits, the tied embedding its codes): a
    note that they changed nothing, as for a GGUF file (an ONNX model's weights are llmir ops only after its lowering:
    none was said); a float model's weights are quantized and cast, without a note."""
    for kind, model in (("int4", builder_model(nbits=4, tied=True)), ("float", builder_model(tied=True))):
        path = tmp_path / kind / "model.onnx"
        path.parent.mkdir()
        onnx.save(model, str(path))
        for options, needle in ((dict(quant="int8"), f"--quant int8 changed nothing: the weights it would quantize are "
                                 f"stored quantized in {path} already and are kept as they are\n"),
                                (dict(dtype="bfloat16"), f"--dtype bfloat16 changed nothing: the linear and embedding "
                                 f"weights of {path} are stored quantized and are kept as they are\n")):
            log = io.StringIO()
            compile_model(path, None, CompileOptions(emit="mlir", **options), Progress(log), stdout=io.StringIO())
            assert (needle in log.getvalue()) == (kind == "int4"), log.getvalue()
