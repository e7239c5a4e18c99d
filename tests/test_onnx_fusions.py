"""The ONNX fusion passes on small hand-built graphs: each pattern in several spellings, and the
near misses that must be left alone.

Positive cases run the whole ONNX lowering (onnx-to-llmir refuses any ONNX op left over), check
the fused op's parameters, and check that the resulting llmir function, evaluated in float64
with the reference functions below, computes what onnxruntime computes for the original graph
at two sequence lengths. Near misses run the fusions, check that the pattern was not fused, and
check that whatever was fused still computes the graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_graphs import Graph, save
from xdsl.dialects import func
from xdsl.dialects.builtin import NoneType, StringAttr

from llmirc import dialect as L
from llmirc.frontend import onnx_ops
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp
from llmirc.frontend.onnx_import import ONNX_LOWERING, OnnxCheckpoint
from llmirc.passes.func_args import arg_names, forward_func
from llmirc.passes.onnx_match import constant_value
from llmirc.passes.pipeline import make_context, parse_passes

FUSIONS = ("onnx-fuse-embedding,onnx-fuse-linear,onnx-glue,onnx-fuse-norm,onnx-fuse-activation,onnx-glue,"
           "onnx-fuse-attention,onnx-glue")
LENGTHS = (5, 13)  # neither is a probe length of the importer (3, 7, 12)
FLOAT = TensorProto.FLOAT


# -- float64 references --------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    d = x - x.mean(-1, keepdims=True)
    y = d / np.sqrt((d * d).mean(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


_erf = np.vectorize(math.erf)
ACTS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
}


def rope(x, positions, heads, d, inv_freq, scaling, style):
    """x [T, heads*d] rotated at `positions`: pairs (i, i + half) for neox, (2i, 2i + 1) interleaved."""
    T, half = x.shape[0], len(inv_freq)
    ang = positions.astype(np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    c, s = (np.cos(ang) * scaling)[:, None, :], (np.sin(ang) * scaling)[:, None, :]
    x = x.reshape(T, heads, d).copy()
    i1 = np.arange(half) if style == "neox" else 2 * np.arange(half)
    i2 = i1 + half if style == "neox" else i1 + 1
    a, b = x[..., i1].copy(), x[..., i2].copy()
    x[..., i1], x[..., i2] = a * c - b * s, b * c + a * s
    return x.reshape(T, heads * d)


def attention(q, k, v, heads, kv_heads, d, scale, window):
    """Causal grouped-query attention of one sequence (query head h reads kv head h // (heads/kv_heads))."""
    T = q.shape[0]
    q, k, v = q.reshape(T, heads, d), k.reshape(T, kv_heads, d), v.reshape(T, kv_heads, d)
    k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    s = np.where(allowed, np.einsum("thd,shd->hts", q, k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, heads * d)


# -- running passes and evaluating what they produce --------------------------------------------

def lower(model, tmp_path, spec: str = ONNX_LOWERING):
    src = OnnxCheckpoint(save(model, tmp_path))
    module = src.module()
    ctx = make_context(read_weight=src.float32, add_weight=src.add_weight)
    for p in parse_passes(spec):
        p.apply(ctx, module)
        module.verify()
    return module, src


def value_of(v, src) -> np.ndarray:
    """The value of a constant operand (llmir.weight or llmir.constant), float64 for floats."""
    op = v.owner
    a = src.float32(op.weight.data) if isinstance(op, L.WeightOp) else constant_value(op.value)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def props(op, *names) -> list:
    """Properties as Python values (IntegerAttr and FloatAttr: numbers, StringAttr: str)."""
    return [a.data if isinstance(a, StringAttr) else a.value.data for a in (getattr(op, n) for n in names)]


def matrix(v, src) -> np.ndarray:
    """A linear's weight [N, K]: a constant, or llmir.transpose of one (folded at compile time)."""
    return matrix(v.owner.input, src).T if isinstance(v.owner, L.TransposeOp) else value_of(v, src)


def _eval(op, val, src) -> list:
    """One op of the lowered function, in float64 (ONNX ops left over: onnx_ops)."""
    if isinstance(op, (L.WeightOp, L.ConstantOp)):
        return [value_of(op.result, src)]
    if isinstance(op, NoneOp):
        return [None]
    if isinstance(op, OnnxOp):
        ins = [None if isinstance(v.type, NoneType) else val(v) for v in op.operands]
        return onnx_ops.evaluate(op.op_type, ins, op.py_attrs(), n_outputs=len(op.results))
    if isinstance(op, L.EmbeddingOp):
        return [val(op.table)[val(op.token_ids)] * np.float32(op.factor)]
    if isinstance(op, L.SqueezeBatchOp):
        return [val(op.input)[0]]
    if isinstance(op, L.UnsqueezeBatchOp):
        return [val(op.input)[None]]
    if isinstance(op, L.TransposeOp):
        return [val(op.input).T]
    if isinstance(op, L.ScaleOp):  # slices along axis times (inverse: over) the scale's elements
        axis, inverse = props(op, "axis", "inverse")
        shape = [1] * len(L.shape_of(op.input))
        shape[axis] = -1
        scale = val(op.scale).reshape(shape)
        return [val(op.input) / scale if inverse else val(op.input) * scale]
    if isinstance(op, L.ConcatOp):
        return [np.concatenate([val(v) for v in op.inputs], op.axis.value.data)]
    if isinstance(op, L.SplitOp):
        return np.split(val(op.input), np.cumsum(op.sizes.get_values())[:-1], axis=1)
    if isinstance(op, L.LinearOp):
        y = val(op.input) @ val(op.weight).T
        return [y + (0 if op.bias is None else val(op.bias)) + (0 if op.residual is None else val(op.residual))]
    if isinstance(op, L.AddOp):
        return [val(op.lhs) + val(op.rhs)]
    if isinstance(op, L.RMSNormOp):
        x = val(op.input)
        return [rms_norm(x.reshape(len(x), op.heads, -1), val(op.weight), op.eps.value.data).reshape(x.shape)]
    if isinstance(op, L.LayerNormOp):
        return [layer_norm(val(op.input), val(op.weight), None if op.bias is None else val(op.bias),
                           op.eps.value.data)]
    if isinstance(op, L.ActOp):
        return [ACTS[op.act.data](val(op.input))]
    if isinstance(op, L.ActMulOp):
        return [ACTS[op.act.data](val(op.gate)) * val(op.up)]
    if isinstance(op, L.RopeOp):
        h, d, scaling, style = props(op, "num_heads", "head_dim", "scaling", "style")
        return [rope(val(op.input), val(op.positions), h, d, op.inv_freq.get_values(), scaling, style)]
    if isinstance(op, L.AttentionOp):
        h, g, d, scale, window = props(op, "num_heads", "num_kv_heads", "head_dim", "scale", "sliding_window")
        return [attention(val(op.q), val(op.k), val(op.v), h, g, d, scale, window)]
    raise AssertionError(f"no reference for {op.name}")


def run_module(module, src, ids: np.ndarray) -> np.ndarray:
    f = forward_func(module)
    S = ids.shape[1]
    feeds = {"onnx:input_ids": ids, "onnx:attention_mask": np.ones_like(ids),
             "onnx:position_ids": np.arange(S)[None], "token_ids": ids[0].astype(np.int32),
             "positions": np.arange(S, dtype=np.int32)}
    env = {arg: feeds[name] for arg, name in zip(f.args, arg_names(f))}
    for op in f.body.block.ops:
        if isinstance(op, func.ReturnOp):
            return env[op.operands[0]]
        env.update(zip(op.results, _eval(op, env.__getitem__, src)))
    raise AssertionError("no return")


def assert_computes_graph(model, module, src, lengths=LENGTHS) -> None:
    """The lowered function computes what onnxruntime computes for the graph."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(7)
    for S in lengths:
        ids = rng.integers(0, 50, (1, S)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(S)[None]}
        want = sess.run(None, {n: feeds[n] for n in names})[0].astype(np.float64)
        got = np.asarray(run_module(module, src, ids), np.float64)
        assert got.size == want.size, (got.shape, want.shape)
        tol = 2e-4 * max(1.0, float(np.abs(want[np.isfinite(want)]).max()))
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=tol, err_msg=f"S={S}")


def fused(model, tmp_path, full: bool = True):
    """Full lowering (nothing ONNX may be left; `full=False`: the fusions only) whose result
    computes the graph."""
    module, src = lower(model, tmp_path, ONNX_LOWERING if full else FUSIONS)
    assert_computes_graph(model, module, src)
    return module, src


def not_fused(model, tmp_path):
    """The fusion passes only; whatever they fused still computes the graph."""
    module, src = lower(model, tmp_path, FUSIONS)
    assert_computes_graph(model, module, src)
    return module


def ops(module, cls) -> list:
    return [op for op in module.walk() if isinstance(op, cls)]


def onnx_left(module) -> set[str]:
    return {op.op_type for op in module.walk() if isinstance(op, OnnxOp)}


def arg_of(v, module) -> str | None:
    f = forward_func(module)
    return dict(zip(f.args, arg_names(f))).get(v)


# == 1. RMSNorm ===================================================================================

def rms_graph(square="pow", rsqrt="recip", weight="left", cast=False, axes=(-1,), eps=1e-6, eps_shape=(),
              eps_after_sqrt=False):
    """x * rsqrt(mean(x^2) + eps) * w in one of its spellings; returns (model, w or None, eps)."""
    g = Graph()
    x = g.op("Cast", g.x, to=FLOAT) if cast else g.x
    sq = {"pow": lambda: g.op("Pow", x, np.float32(2)), "mul": lambda: g.op("Mul", x, x),
          "abs": lambda: g.op("Abs", x)}[square]()
    m = g.op("ReduceMean", sq, g.i64(*axes), keepdims=1)
    e = np.full(eps_shape, eps, np.float32)
    s = g.op("Add", g.op("Sqrt", m), e) if eps_after_sqrt else g.op("Sqrt", g.op("Add", m, e))
    w = g.randn(g.C, scale=0.5, shift=1.0) if weight else None
    xin = g.op("Mul", x, w) if weight == "first" else x  # the weight applied before normalizing
    n = {"recip": lambda: g.op("Mul", xin, g.op("Reciprocal", s)),
         "div_one": lambda: g.op("Mul", g.op("Div", np.float32(1), s), xin),
         "div": lambda: g.op("Div", xin, s)}[rsqrt]()
    if cast:
        n = g.op("Cast", n, to=FLOAT)
    y = {"left": lambda: g.op("Mul", w, n), "right": lambda: g.op("Mul", n, w)}.get(weight, lambda: n)()
    return g.model(y), (g.values[w] if w else None), eps


RMS_SPELLINGS = {
    "pow-recip-weight_left": {},
    "mul-recip-weight_right": dict(square="mul", weight="right"),
    "pow-div_one-weight_left": dict(rsqrt="div_one"),
    "mul-div_sqrt-weight_right": dict(square="mul", rsqrt="div"),
    "pow-div_sqrt-weight_first": dict(rsqrt="div", weight="first"),
    "no_weight": dict(weight=None),
    "cast_around": dict(cast=True),
    "cast_around-div_sqrt": dict(cast=True, rsqrt="div", weight="right"),
    "axes_positive-eps_vector": dict(axes=(2,), eps=1e-5, eps_shape=(1,)),
}


@pytest.mark.parametrize("spelling", RMS_SPELLINGS.values(), ids=RMS_SPELLINGS.keys())
def test_rms_norm(spelling, tmp_path):
    model, w, eps = rms_graph(**spelling)
    cast = spelling.get("cast", False)  # the Cast before the norm stays: see test_rms_norm_cast_lowers_fully
    module, src = fused(model, tmp_path, full=not cast)
    assert onnx_left(module) <= {"Cast"}
    (norm,) = ops(module, L.RMSNormOp)
    assert norm.eps.value.data == pytest.approx(eps, rel=1e-6)
    np.testing.assert_array_equal(value_of(norm.weight, src), np.ones(32) if w is None else w)
    assert isinstance(norm.input.owner, L.EmbeddingOp) or cast
    assert not ops(module, L.LayerNormOp)


RMS_NEAR_MISSES = {
    "mean_over_sequence_axis": dict(axes=(1,)),
    "mean_of_abs": dict(square="abs"),
    "eps_after_sqrt_large_eps": dict(eps_after_sqrt=True, eps=1e-3),  # visible even at rms ~3
    "eps_after_sqrt": dict(eps_after_sqrt=True, eps=1e-6),
}


@pytest.mark.parametrize("near_miss", RMS_NEAR_MISSES.values(), ids=RMS_NEAR_MISSES.keys())
def test_rms_norm_near_miss(near_miss, tmp_path):
    model, _, _ = rms_graph(**near_miss)
    module = not_fused(model, tmp_path)
    assert not ops(module, L.RMSNormOp) and not ops(module, L.LayerNormOp)
    assert {"ReduceMean", "Sqrt"} <= onnx_left(module)


def test_rms_norm_eps_after_sqrt_differs_near_zero(tmp_path):
    """Why that near miss matters: on activations of rms ~1e-4, x/(sqrt(m)+1e-6) and x/sqrt(m+1e-6)
    differ by a factor ~10; the lowered module must still compute the graph there."""
    g = Graph()
    x = g.op("Mul", g.x, np.float32(1e-4))  # tiny activations: eps placement matters
    m = g.op("ReduceMean", g.op("Mul", x, x), g.i64(-1))
    y = g.op("Div", x, g.op("Add", g.op("Sqrt", m), np.float32(1e-6)))
    model = g.model(y)
    not_fused(model, tmp_path)  # numerics of whatever was fused, on the tiny inputs


def test_rms_norm_two_norms_of_one_input(tmp_path):
    g = Graph()
    y = g.x
    for _ in range(2):
        m = g.op("ReduceMean", g.op("Pow", g.x, np.float32(2)), g.i64(-1))
        r = g.op("Reciprocal", g.op("Sqrt", g.op("Add", m, np.float32(1e-6))))
        n = g.op("Mul", g.op("Mul", g.x, r), g.randn(32, shift=1.0))
        y = g.op("Add", y, g.matmul(n, 32, 32))
    module, _ = fused(g.model(y), tmp_path)
    assert len(ops(module, L.RMSNormOp)) == 2


def test_rms_norm_cast_lowers_fully(tmp_path):
    model, _, _ = rms_graph(cast=True)
    fused(model, tmp_path)


def test_rms_norm_over_an_axis_that_grows_with_the_sequence(tmp_path):
    """A norm over the last axis of Reshape(y [1, S, 12], [1, 12, -1]): that axis is S long, no
    rms_norm of rows; it stays generic and computes the graph (fusing it was an internal error)."""
    g = Graph()
    y = g.op("Reshape", g.matmul(g.x, 32, 12), g.i64(1, 12, -1))
    m = g.op("ReduceMean", g.op("Pow", y, np.float32(2)), g.i64(-1))
    n = g.op("Mul", y, g.op("Reciprocal", g.op("Sqrt", g.op("Add", m, np.float32(1e-6)))))
    model = g.model(g.matmul(g.op("Reshape", n, g.i64(1, -1, 12)), 12, 32))
    module = not_fused(model, tmp_path)
    assert not ops(module, L.RMSNormOp) and "ReduceMean" in onnx_left(module)


def per_head_rms_graph(layout="reshape", weight_shape=(8,)):
    """Qwen3's q_norm: a projection's heads [1, S, 4, 8] normalized over their 8 elements each, with
    one weight for all heads; then back to [1, S, 32] for a linear. `layout`: how the heads are
    made ("reshape"; "transpose": [1, S, 8, 4], normalized over the 4 heads, a near miss)."""
    g = Graph()
    q = g.matmul(g.x, 32, 32)
    heads = g.op("Reshape", q, g.i64(1, -1, 4, 8))
    if layout == "transpose":
        heads = g.op("Transpose", heads, perm=[0, 1, 3, 2])
    m = g.op("ReduceMean", g.op("Pow", heads, np.float32(2)), g.i64(-1))
    n = g.op("Mul", g.randn(*weight_shape, shift=1.0), g.op("Mul", heads, g.op("Reciprocal", g.op(
        "Sqrt", g.op("Add", m, np.float32(1e-6))))))
    if layout == "transpose":
        n = g.op("Transpose", n, perm=[0, 1, 3, 2])
    return g.model(g.matmul(g.op("Reshape", n, g.i64(1, -1, 32)), 32, 32))


def test_rms_norm_per_head(tmp_path):
    module, _ = fused(per_head_rms_graph(), tmp_path)
    (norm,) = ops(module, L.RMSNormOp)
    assert norm.heads == 4 and L.shape_of(norm.weight) == (8,) and isinstance(norm.input.owner, L.LinearOp)


@pytest.mark.parametrize("near_miss", [dict(layout="transpose", weight_shape=(4,)), dict(weight_shape=(4, 8))],
                         ids=["normalized_over_heads", "weight_per_head"])
def test_rms_norm_per_head_near_miss(near_miss, tmp_path):
    module = not_fused(per_head_rms_graph(**near_miss), tmp_path)
    assert not ops(module, L.RMSNormOp) and "ReduceMean" in onnx_left(module)


def test_rms_norm_per_head_split_seen_at_one_length(tmp_path):
    """Reshape([1, S, 12], [1, 3, 4, -1]) is [1, S, 4, 3] at S = 3 (a probe length) only: at S = 5 the
    norm runs over 5 elements, not over heads of 3 (it was fused as rms_norm{num_heads = 4}: wrong numbers)."""
    g = Graph()
    x = g.op("Reshape", g.matmul(g.x, 32, 12), g.i64(1, 3, 4, -1))
    m = g.op("ReduceMean", g.op("Pow", x, np.float32(2)), g.i64(-1))
    n = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", m, np.float32(1e-6)))))
    module = not_fused(g.model(g.matmul(g.op("Reshape", n, g.i64(1, -1, 12)), 12, 32)), tmp_path)
    assert not ops(module, L.RMSNormOp)


# == 2. LayerNorm =================================================================================

def layer_norm_graph(form="op", bias=True, eps=1e-5, variance="centered"):
    g = Graph()
    w, b = g.randn(32, scale=0.5, shift=1.0), (g.randn(32, scale=0.5) if bias else None)
    x = g.x
    if form == "op":
        y = g.op("LayerNormalization", x, w, *([b] if b else []), axis=-1, epsilon=eps)
    else:
        mu = g.op("ReduceMean", x, g.i64(1 if variance == "sequence_mean" else -1))
        d = g.op("Sub", x, mu)
        sq = g.op("Pow", d, np.float32(2)) if variance != "no_sub" else g.op("Pow", x, np.float32(2))
        var = g.op("ReduceMean", sq, g.i64(-1))
        e = np.float32(eps)
        std = g.op("Add", g.op("Sqrt", var), e) if variance == "eps_after_sqrt" else g.op("Sqrt", g.op("Add", var, e))
        n = g.op("Div", d, std)
        y = g.op("Mul", n, w)
        y = g.op("Add", y, b) if b else y
    return g.model(y), g.values[w], (g.values[b] if b else None), eps


LAYER_NORMS = {
    "op": {}, "op_no_bias": dict(bias=False), "decomposed": dict(form="decomposed"),
    "decomposed_no_bias_eps1e-6": dict(form="decomposed", bias=False, eps=1e-6),
}


@pytest.mark.parametrize("spelling", LAYER_NORMS.values(), ids=LAYER_NORMS.keys())
def test_layer_norm(spelling, tmp_path):
    model, w, b, eps = layer_norm_graph(**spelling)
    module, src = fused(model, tmp_path)
    (norm,) = ops(module, L.LayerNormOp)
    assert norm.eps.value.data == pytest.approx(eps, rel=1e-6)
    np.testing.assert_array_equal(value_of(norm.weight, src), w)
    if b is None:
        assert norm.bias is None
    else:
        np.testing.assert_array_equal(value_of(norm.bias, src), b)
    assert not ops(module, L.RMSNormOp)


@pytest.mark.parametrize("variance", ["no_sub", "sequence_mean", "eps_after_sqrt"])
def test_layer_norm_near_miss(variance, tmp_path):
    """The variance of x around the wrong mean (or none), or eps added to the standard deviation:
    not a layer norm (nor an rms norm)."""
    model, *_ = layer_norm_graph(form="decomposed", variance=variance)
    module = not_fused(model, tmp_path)
    assert not ops(module, L.LayerNormOp) and not ops(module, L.RMSNormOp)
    assert "ReduceMean" in onnx_left(module)


# == 3. Linear ====================================================================================

def linear_graph(form):
    g = Graph()
    W, b = g.randn(32, 24, scale=0.3), g.randn(24, scale=0.1)
    x = g.x
    if form == "matmul":
        y = g.op("MatMul", x, W)
    elif form == "matmul_bias":
        y = g.op("Add", g.op("MatMul", x, W), b)
    elif form == "bias_matmul":
        y = g.op("Add", b, g.op("MatMul", x, W))
    elif form == "matmul_transposed_weight":  # W stored [N, K], transposed in the graph (folded)
        Wt = g.init(g.values[W].T.copy())
        y = g.op("Add", g.op("MatMul", x, g.op("Transpose", Wt, perm=[1, 0])), b)
    else:  # Gemm on 2-D rows between reshapes, as GPT-2 exports do
        rows = g.op("Reshape", x, g.i64(-1, 32))
        trans = form == "gemm_transB"
        Wg = g.init(g.values[W].T.copy()) if trans else W
        y = g.op("Reshape", g.op("Gemm", rows, Wg, b, transB=int(trans)), g.i64(1, -1, 24))
    return g.model(y, [1, "S", 24]), g.values[W], (None if form == "matmul" else g.values[b])


@pytest.mark.parametrize("form", ["matmul", "matmul_bias", "bias_matmul", "matmul_transposed_weight",
                                  "gemm_transB", "gemm"])
def test_linear(form, tmp_path):
    model, W, b = linear_graph(form)
    module, src = fused(model, tmp_path)
    (lin,) = ops(module, L.LinearOp)
    np.testing.assert_array_equal(matrix(lin.weight, src), W.T)
    if b is None:
        assert lin.bias is None
    else:
        np.testing.assert_array_equal(value_of(lin.bias, src), b)


def test_linear_near_miss_activation_times_activation(tmp_path):
    """x @ x^T ([1, S, S] scores-like product) has no constant weight: not a linear."""
    g = Graph()
    y = g.op("MatMul", g.x, g.op("Transpose", g.x, perm=[0, 2, 1]))
    module = not_fused(g.model(y, [1, "S", "S"]), tmp_path)
    assert not ops(module, L.LinearOp)
    assert "MatMul" in onnx_left(module)


def test_linear_near_miss_gemm_alpha(tmp_path):
    """Gemm with alpha != 1 is not a plain linear (the pass leaves it; it must not drop alpha)."""
    g = Graph()
    y = g.op("Gemm", g.op("Reshape", g.x, g.i64(-1, 32)), g.randn(32, 24), alpha=0.5)
    module = not_fused(g.model(g.op("Reshape", y, g.i64(1, -1, 24)), [1, "S", 24]), tmp_path)
    assert not ops(module, L.LinearOp)


# == 4. Activations ===============================================================================

def act_graph(form, opset=18):
    g = Graph()
    x = g.x
    half, one = np.float32(0.5), np.float32(1)
    if form == "silu":
        y = g.op("Mul", x, g.op("Sigmoid", x))
    elif form == "silu_swapped":
        y = g.op("Mul", g.op("Sigmoid", x), x)
    elif form == "gelu_erf_div":
        y = g.op("Mul", half, g.op("Mul", x, g.op("Add", one, g.op("Erf", g.op("Div", x, np.float32(math.sqrt(2)))))))
    elif form == "gelu_erf_mul":
        y = g.op("Mul", g.op("Mul", x, half), g.op("Add", g.op("Erf", g.op("Mul", x, np.float32(0.5 ** 0.5))), one))
    elif form.startswith("gelu_tanh"):
        c = {"gelu_tanh": 0.044715, "gelu_tanh_wrong_constant": 0.5}[form]
        inner = g.op("Add", x, g.op("Mul", np.float32(c), g.op("Pow", x, np.float32(3))))
        t = g.op("Tanh", g.op("Mul", np.float32(math.sqrt(2 / math.pi)), inner))
        y = g.op("Mul", g.op("Mul", half, x), g.op("Add", one, t))
    elif form.startswith("gelu_op"):
        y = g.op("Gelu", x, approximate=form.removeprefix("gelu_op_"))
    elif form == "relu":
        y = g.op("Relu", x)
    elif form == "relu6":
        y = g.op("Min", g.op("Relu", x), np.float32(6))
    elif form in ("silu_of_2x", "quick_gelu"):  # x * sigmoid(a x): not silu, not gelu
        a = np.float32(2 if form == "silu_of_2x" else 1.702)
        y = g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, a)))
    return g.model(y, opset=opset)


ACTIVATIONS = {"silu": "silu", "silu_swapped": "silu", "gelu_erf_div": "gelu", "gelu_erf_mul": "gelu",
               "gelu_tanh": "gelu_tanh", "relu": "relu"}


@pytest.mark.parametrize("form", ACTIVATIONS)
def test_activation(form, tmp_path):
    module, _ = fused(act_graph(form), tmp_path)
    (act,) = ops(module, L.ActOp)
    assert act.act.data == ACTIVATIONS[form]
    assert isinstance(act.input.owner, L.EmbeddingOp)


@pytest.mark.parametrize("approximate, act", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_activation_gelu_op(approximate, act, tmp_path):
    """onnx.Gelu (opset 20)."""
    module, _ = fused(act_graph(f"gelu_op_{approximate}", opset=20), tmp_path)
    assert [a.act.data for a in ops(module, L.ActOp)] == [act]


@pytest.mark.parametrize("form", ["silu_of_2x", "quick_gelu", "gelu_tanh_wrong_constant", "relu6"])
def test_activation_near_miss(form, tmp_path):
    module = not_fused(act_graph(form), tmp_path)
    assert not ops(module, L.ActOp) and not ops(module, L.ActMulOp)
    assert onnx_left(module) & {"Sigmoid", "Tanh", "Relu"}


@pytest.mark.parametrize("act, swapped", [("silu", False), ("silu", True), ("gelu", False)])
def test_gated_mlp(act, swapped, tmp_path):
    """act(x @ Wg) * (x @ Wu) @ Wd: the activation and the product become one act_mul."""
    g = Graph()
    gate, up = g.matmul(g.x, 32, 48), g.matmul(g.x, 32, 48)
    if act == "silu":
        a = g.op("Mul", gate, g.op("Sigmoid", gate))
    else:
        a = g.op("Mul", g.op("Mul", gate, np.float32(0.5)),
                 g.op("Add", g.op("Erf", g.op("Div", gate, np.float32(math.sqrt(2)))), np.float32(1)))
    h = g.op("Mul", up, a) if swapped else g.op("Mul", a, up)
    module, _ = fused(g.model(g.matmul(h, 48, 32)), tmp_path)
    (am,) = ops(module, L.ActMulOp)
    assert am.act.data == act and not ops(module, L.ActOp)
    assert isinstance(am.gate.owner, L.LinearOp) and isinstance(am.up.owner, L.LinearOp)
    assert len(ops(module, L.LinearOp)) == 3


# == 5. RoPE + attention ==========================================================================

H, D = 4, 8
INV_FREQ = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def _seq_shape(g, *tail):
    """[1, S, *tail] as exporters build it from Shape (s-only, not folded)."""
    return g.op("Concat", g.i64(1), g.op("Shape", g.x, start=1, end=2), g.i64(*tail), axis=0)


def _rope(g, t, n, style, table):
    """t [1, n, S, D] rotated by the tables in `table` (cos, sin)."""
    cos, sin = table
    if style == "neox":  # rotate_half: cat(-x2, x1)
        a = g.op("Slice", t, g.i64(0), g.i64(D // 2), g.i64(-1))
        b = g.op("Slice", t, g.i64(D // 2), g.i64(D), g.i64(-1))
        rot = g.op("Concat", g.op("Neg", b), a, axis=-1)
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rot, sin))
    if style == "interleaved":  # pairs via Reshape [..., D/2, 2]: (x0, x1) -> (-x1, x0)
        pairs = g.op("Reshape", t, g.i64(1, n, -1, D // 2, 2))
        x1, x2 = g.op("Split", pairs, g.i64(1, 1), axis=-1, outputs=2)
        rot = g.op("Reshape", g.op("Concat", g.op("Neg", x2), x1, axis=-1), g.i64(1, n, -1, D))
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rot, sin))
    # interleaved via Slice steps on half-width tables (Meta's / GPT-J's x[..., ::2], x[..., 1::2])
    x1 = g.op("Slice", t, g.i64(0), g.i64(D), g.i64(-1), g.i64(2))
    x2 = g.op("Slice", t, g.i64(1), g.i64(D), g.i64(-1), g.i64(2))
    o1 = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    o2 = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    pairs = g.op("Concat", g.op("Unsqueeze", o1, g.i64(-1)), g.op("Unsqueeze", o2, g.i64(-1)), axis=-1)
    return g.op("Reshape", pairs, g.i64(1, n, -1, D))


def _rope_tables(g, style, pos, freqs):
    """cos, sin broadcastable to [1, heads, S, D] (width D/2 for the slice-step style)."""
    if freqs == "stored":  # cos/sin tables stored as weights (onnxruntime-genai's builder), read at positions
        p = g.op("Squeeze", "position_ids", g.i64(0)) if pos == "position_ids" else g.positions()
        ang = np.arange(2048, dtype=np.float32)[:, None] * INV_FREQ[None]
        ang = np.concatenate([ang, ang], 1) if style == "neox" else np.repeat(ang, 2, 1)
        return [g.op("Unsqueeze", g.op("Gather", g.init(f(ang)), p, axis=0), g.i64(0, 1)) for f in (np.cos, np.sin)]
    inv = g.init(INV_FREQ, "inv_freq")
    if pos == "position_ids":
        p = g.op("Cast", g.op("Squeeze", "position_ids", g.i64(0)), to=FLOAT)
    else:
        p = g.op("Cast", g.positions(), to=FLOAT)
    if freqs == "matmul":  # HF: inv_freq[None, :, None] @ positions[None, None, :], transposed
        ang = g.op("MatMul", g.op("Unsqueeze", inv, g.i64(0, 2)), g.op("Unsqueeze", p, g.i64(0, 1)))
        ang = g.op("Squeeze", g.op("Transpose", ang, perm=[0, 2, 1]), g.i64(0))
    else:
        ang = g.op("Mul", g.op("Unsqueeze", p, g.i64(1)), inv)  # [S, D/2]
    if style == "neox":
        ang = g.op("Concat", ang, ang, axis=-1)
    elif style == "interleaved":  # repeat_interleave(2)
        u = g.op("Unsqueeze", ang, g.i64(-1))
        ang = g.op("Reshape", g.op("Concat", u, u, axis=-1), g.i64(-1, D))
    return [g.op("Unsqueeze", g.op(f, ang), g.i64(0, 1)) for f in ("Cos", "Sin")]


def _causal_mask(g, scores, mask, window):
    """scores [1, H, S, S] with the mask applied; `mask` picks the spelling."""
    if mask == "none":
        return scores
    S = g.op("Unsqueeze", g.seq_len(), g.i64(0))
    if mask.startswith("triu"):  # torch.triu(full(-inf), 1) (+ tril(full(-inf), -window))
        shape = g.op("Concat", S, S, axis=0)
        full = g.op("ConstantOfShape", shape, value=helper.make_tensor("v", FLOAT, [1], [-np.inf])) \
            if mask == "triu_constant_of_shape" else g.op("Expand", np.float32(-np.inf), shape)
        m = g.op("Trilu", full, np.array(2 if mask == "triu_shifted" else 1, np.int64), upper=1)
        if window:
            m = g.op("Add", m, g.op("Trilu", full, np.array(-window, np.int64), upper=0))
        return g.op("Add", scores, m)
    i = g.positions()
    row, col = g.op("Unsqueeze", i, g.i64(1)), g.op("Unsqueeze", i, g.i64(0))
    allowed = g.op("LessOrEqual", col, g.op("Add", row, np.int64(1)) if mask == "range_shifted" else row)
    if window:
        allowed = g.op("And", allowed, g.op("Greater", col, g.op("Sub", row, np.int64(window))))
    if mask == "where":  # GPT-2: where(causal, scores, finfo.min)
        return g.op("Where", allowed, scores, np.float32(np.finfo(np.float32).min))
    if mask == "where_masked":  # the boolean says "masked": where(masked, -inf, scores)
        return g.op("Where", g.op("Not", allowed), np.float32(-np.inf), scores)
    return g.op("Add", scores, g.op("Where", allowed, np.float32(0), np.float32(-np.inf)))


def attention_graph(kv_heads=2, rope="neox", pos="range", freqs="mul", scale="div", mask="triu", window=0,
                    softmax_axis=-1, qkv="separate", reshape="static", kv_repeat="repeat"):
    """A decoder attention block as exporters write it, [1, S, H*D] in and out (+ o_proj)."""
    C, KV = H * D, kv_heads * D
    g = Graph(C, inputs=("input_ids", "position_ids") if pos == "position_ids" else ("input_ids",))
    if qkv == "fused":
        q, k, v = g.op("Split", g.matmul(g.x, C, C + 2 * KV, bias=True), g.i64(C, KV, KV), axis=2, outputs=3)
    else:
        q, k, v = g.matmul(g.x, C, C, bias=True), g.matmul(g.x, C, KV), g.matmul(g.x, C, KV)

    def heads(t, n):
        shape = g.i64(1, -1, n, D) if reshape == "static" else _seq_shape(g, n, D)
        return g.op("Transpose", g.op("Reshape", t, shape), perm=[0, 2, 1, 3])

    q, k, v = heads(q, H), heads(k, kv_heads), heads(v, kv_heads)
    if rope:
        table = _rope_tables(g, rope, pos, freqs)
        q, k = _rope(g, q, H, rope, table), _rope(g, k, kv_heads, rope, table)
    if kv_heads != H:  # repeat_kv: [1, KVH, S, D] -> [1, KVH, rep, S, D] -> [1, H, S, D]
        # (near miss "tile": [1, rep, KVH, S, D], so head h reads kv head h % KVH, not h // rep)
        axis, rep = (2, g.i64(1, 1, H // kv_heads, 1, 1)) if kv_repeat == "repeat" else \
            (1, g.i64(1, H // kv_heads, 1, 1, 1))
        k, v = (g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, g.i64(axis)), rep), g.i64(1, H, -1, D))
                for t in (k, v))
    kt = g.op("Transpose", k, perm=[0, 1, 3, 2])
    if scale == "split":  # the SDPA decomposition: q * sqrt(scale) @ (k^T * sqrt(scale))
        root = np.float32(D ** -0.25)
        q, kt = g.op("Mul", q, root), g.op("Mul", kt, root)
    s = g.op("MatMul", q, kt)
    if scale == "div":
        s = g.op("Div", s, np.float32(math.sqrt(D)))
    elif scale == "custom":
        s = g.op("Mul", s, np.float32(0.2))
    p = g.op("Softmax", _causal_mask(g, s, mask, window), axis=softmax_axis)
    o = g.op("Transpose", g.op("MatMul", p, v), perm=[0, 2, 1, 3])
    o = g.op("Reshape", o, g.i64(1, -1, C) if reshape == "static" else _seq_shape(g, C))
    return g.model(g.matmul(o, C, C))


ROOT = D ** -0.5
ATTENTION = {  # id: (graph variant, expected kv heads, scale, sliding window, rope style)
    "llama_gqa2_neox_sqrt_split": (dict(scale="split"), 2, ROOT, 0, "neox"),
    "mqa_position_ids_range_mask": (dict(kv_heads=1, pos="position_ids", mask="range"), 1, ROOT, 0, "neox"),
    "mha_interleaved_custom_scale": (dict(kv_heads=4, rope="interleaved", scale="custom"), 4, 0.2, 0, "interleaved"),
    "gqa_interleaved_sqrt_split": (dict(rope="interleaved", mask="range", scale="split"), 2, ROOT, 0, "interleaved"),
    "window3_range_mask": (dict(mask="range", window=3), 2, ROOT, 3, "neox"),
    "window3_triu_mask_mqa": (dict(mask="triu", window=3, kv_heads=1), 1, ROOT, 3, "neox"),
    "dynamic_reshapes_softmax_axis3": (dict(reshape="dynamic", softmax_axis=3), 2, ROOT, 0, "neox"),
    "gpt2_fused_qkv_split_no_rope": (dict(kv_heads=4, rope=None, qkv="fused", mask="where"), 4, ROOT, 0, None),
    "fused_qkv_gqa_rope": (dict(qkv="fused"), 2, ROOT, 0, "neox"),
    "interleaved_slice_steps_half_tables": (dict(rope="interleaved_slices"), 2, ROOT, 0, "interleaved"),
    "freqs_by_matmul": (dict(freqs="matmul"), 2, ROOT, 0, "neox"),
    "window3_where_masked_bool": (dict(mask="where_masked", window=3), 2, ROOT, 3, "neox"),
    "stored_tables": (dict(freqs="stored"), 2, ROOT, 0, "neox"),
    "stored_tables_interleaved_position_ids": (dict(freqs="stored", rope="interleaved", pos="position_ids"), 2, ROOT, 0,
                                               "interleaved"),
}


@pytest.mark.parametrize("variant, kv_heads, scale, window, style", ATTENTION.values(), ids=ATTENTION.keys())
def test_attention(variant, kv_heads, scale, window, style, tmp_path):
    model = attention_graph(**variant)
    module, src = fused(model, tmp_path)
    (att,) = ops(module, L.AttentionOp)
    h, g, d, sc, win = props(att, "num_heads", "num_kv_heads", "head_dim", "scale", "sliding_window")
    assert (h, g, d, win) == (H, kv_heads, D, window)
    assert sc == pytest.approx(scale, rel=1e-6)
    if style is None:
        assert not ops(module, L.RopeOp)
        return
    q_rope, k_rope = att.q.owner, att.k.owner
    assert ops(module, L.RopeOp) == [q_rope, k_rope]
    for r, n in ((q_rope, H), (k_rope, kv_heads)):
        heads, d, scaling, st = props(r, "num_heads", "head_dim", "scaling", "style")
        assert (heads, d, st, scaling) == (n, D, style, 1.0)
        np.testing.assert_array_equal(np.array(r.inv_freq.get_values(), np.float32), INV_FREQ)
        assert arg_of(r.positions, module) == "positions"


def test_attention_mask_from_constant_of_shape(tmp_path):
    module, _ = fused(attention_graph(mask="triu_constant_of_shape"), tmp_path)
    assert ops(module, L.AttentionOp)


ATTENTION_NEAR_MISSES = {
    "softmax_over_axis_2": dict(softmax_axis=2),
    "kv_heads_tiled_not_repeated": dict(kv_repeat="tile"),
    "no_mask_full_attention": dict(mask="none"),
    "causal_mask_shifted_by_one_triu": dict(mask="triu_shifted"),
    "causal_mask_shifted_by_one_range": dict(mask="range_shifted", rope=None, kv_heads=1),
}


@pytest.mark.parametrize("variant", ATTENTION_NEAR_MISSES.values(), ids=ATTENTION_NEAR_MISSES.keys())
def test_attention_near_miss(variant, tmp_path):
    module = not_fused(attention_graph(**variant), tmp_path)
    assert not ops(module, L.AttentionOp) and not ops(module, L.RopeOp)
    assert "Softmax" in onnx_left(module)


# == 6. Embedding =================================================================================

def test_token_embedding(tmp_path):
    g = Graph()
    model = g.model(g.x)
    module, src = fused(model, tmp_path)
    (emb,) = ops(module, L.EmbeddingOp)
    assert arg_of(emb.token_ids, module) == "token_ids"
    np.testing.assert_array_equal(value_of(emb.table, src), g.values["embed"])


def test_token_embedding_through_cast(tmp_path):
    """Gather by Cast(input_ids, int32) is still a lookup of the tokens."""
    g = Graph()
    y = g.op("Gather", g.embed, g.op("Cast", "input_ids", to=TensorProto.INT32))
    module, _ = fused(g.model(g.op("Add", g.x, y)), tmp_path)
    assert [arg_of(e.token_ids, module) for e in ops(module, L.EmbeddingOp)] == ["token_ids"] * 2


def positions_graph(form):
    """x + pos_table[indices]: the positions 0..S-1 spelled three ways, and two near misses."""
    g = Graph(inputs={"position_ids": ("input_ids", "position_ids"),
                      "mask_cumsum": ("input_ids", "attention_mask")}.get(form, ("input_ids",)))
    table = g.randn(16, 32, scale=0.5)
    S, i64 = g.seq_len(), np.int64
    if form == "position_ids":
        idx = "position_ids"
    elif form == "mask_cumsum":  # HF: attention_mask.cumsum(-1) - 1
        idx = g.op("Sub", g.op("CumSum", "attention_mask", i64(1)), i64(1))
    else:
        start, limit, delta = {"range": (i64(0), S, i64(1)),
                               "reversed": (g.op("Sub", S, i64(1)), i64(-1), i64(-1)),
                               "offset_2": (i64(2), g.op("Add", S, i64(2)), i64(1))}[form]
        idx = g.op("Unsqueeze", g.op("Range", start, limit, delta), g.i64(0))
    return g.model(g.op("Add", g.x, g.op("Gather", table, idx, axis=0))), g.values[table]


@pytest.mark.parametrize("form", ["range", "position_ids", "mask_cumsum"])
def test_position_embedding(form, tmp_path):
    model, table = positions_graph(form)
    module, src = fused(model, tmp_path)
    embs = {arg_of(e.token_ids, module): e for e in ops(module, L.EmbeddingOp)}
    assert set(embs) == {"token_ids", "positions"}
    np.testing.assert_array_equal(value_of(embs["positions"].table, src), table)
    assert len(ops(module, L.AddOp)) == 1


@pytest.mark.parametrize("form", ["reversed", "offset_2"])
def test_position_embedding_near_miss(form, tmp_path):
    """Indices S-1..0 (or 2..S+1) are not the positions 0..S-1."""
    model, _ = positions_graph(form)
    module = not_fused(model, tmp_path)
    assert [arg_of(e.token_ids, module) for e in ops(module, L.EmbeddingOp)] == ["token_ids"]
    assert "Gather" in onnx_left(module)
