"""ONNX operator semantics in NumPy: values (`evaluate`) and output shapes (`infer_shapes`).

The ONNX front end uses this table to constant-fold the shape arithmetic, mask and rotary-table
subgraphs that exporters emit, to check candidate fusions numerically, and tests use it as a
reference interpreter. It never runs a model in production, so clarity beats speed.

Caller's side of the contract:
- Only ops of the default domain ("" / "ai.onnx"); check `node.domain` before looking in SUPPORTED.
  CONTRIB names the onnxruntime (com.microsoft) operators evaluated here too (MatMulNBits, ...).
- `inputs[i]` is a numpy array, or None where the node leaves optional input i empty (ONNX empty
  name); trailing omitted inputs may also be left off the list.
- `attrs` holds decoded attribute values, as `attrs_of(node)` returns them: int, float, str (not
  bytes), lists of these, and numpy arrays for tensor attributes (Constant's and
  ConstantOfShape's `value`).
- Ops return every output the operator defines, optional trailing ones included (Dropout's mask,
  LayerNormalization's Mean and InvStdDev, TopK's indices): zip them with `node.output`. Split
  with neither a `split` input nor `num_outputs` (opsets 13-17) needs `n_outputs=len(node.output)`.
- Outputs may share memory with inputs (Identity, Reshape, ...): treat arrays as immutable.
- No opset argument: semantics are those of opsets 17-21 (Softmax and LogSoftmax: opset 13+, one
  axis). Where an attribute became an input (Reduce* axes in 13/18, Squeeze/Unsqueeze axes and
  Split sizes in 13, Slice's in 10, Pad's and Clip's in 11, TopK's k in 10) both forms are accepted.

Arithmetic stays in the input dtype as onnxruntime does (float32 in, float32 out, integer Div
truncates toward zero); transcendentals without a numpy ufunc (Erf) are computed in float64 and
rounded to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import NoReturn

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmirc.errors import CheckpointError
from llmirc.special_functions import erf

Shape = tuple[int, ...]
_BOOL, _INT64 = np.dtype(bool), np.dtype(np.int64)

# TensorProto codes Cast, ConstantOfShape and stash_type may name; bfloat16 maps to ml_dtypes.bfloat16.
DTYPES = {code: np.dtype(helper.tensor_dtype_to_np_dtype(code)) for code in (
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64)}


def attrs_of(node: onnx.NodeProto) -> dict:
    """A node's attributes as `evaluate` and `infer_shapes` take them."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        out[a.name] = v
    return out


class _Node:
    """The node being evaluated or shape-inferred: its attributes, known input values, errors."""

    def __init__(self, op: str, name: str, attrs: dict, values: list, present: list[bool], n_outputs: int | None):
        self.op, self.name, self.attrs, self.values, self.present, self.n_outputs = (
            op, name, attrs, values, present, n_outputs)

    def fail(self, problem: str) -> NoReturn:
        where = f" node {self.name!r}" if self.name else ""
        raise CheckpointError(f"ONNX {self.op}{where}: {problem}")

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)

    def value(self, i: int, what: str) -> np.ndarray | None:
        """Input i's value; None when the node omits it; an error when it is not a constant."""
        if i >= len(self.present) or not self.present[i]:
            return None
        if i >= len(self.values) or self.values[i] is None:
            self.fail(f"the output shape depends on input {i} ({what}), which is not a constant")
        return np.asarray(self.values[i])

    def ints(self, i: int, what: str, attr: str | None = None) -> list[int] | None:
        """Input i, or attribute `attr` (the older opsets' form), as Python ints; None when neither is given."""
        v = self.value(i, what)
        if v is None and attr is not None:
            v = self.attrs.get(attr)
        return None if v is None else [int(t) for t in np.ravel(v)]  # Python ints: no int64 overflow

    def axis(self, a: int, rank: int) -> int:
        if not -rank <= a < rank:
            self.fail(f"axis {a} is out of range for rank {rank}")
        return a % rank

    def dtype(self, code) -> np.dtype:
        if code not in DTYPES:
            name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else code
            self.fail(f"data type {name} is not supported")
        return DTYPES[code]

    def broadcast(self, *shapes: Shape) -> Shape:
        if max((len(s) for s in shapes), default=0) > MAX_RANK:
            self.fail(f"shapes of rank {max(len(s) for s in shapes)}: llmirc reads ranks up to {MAX_RANK}")
        try:
            return tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            self.fail(f"shapes {', '.join(map(str, shapes))} do not broadcast")

    def reduce_axes(self, rank: int) -> tuple[int, ...]:
        """Reduce* axes from input 1 (ReduceSum 13+, all 18+) or the attribute; () = reduce nothing."""
        axes = self.ints(1, "axes", "axes")
        if not axes:  # onnxruntime's no-op reduces over no axes: ReduceSumSquare still squares
            return () if self.attr("noop_with_empty_axes", 0) else tuple(range(rank))
        return tuple(sorted({self.axis(a, rank) for a in axes}))


_EVAL: dict[str, Callable] = {}   # op -> fn(node, *inputs) -> array | tuple of arrays
_SHAPE: dict[str, Callable] = {}  # op -> fn(node, shapes, dtypes) -> [(shape, dtype)] (values via node.value)


def _op(*names: str, shape: Callable):
    def register(fn):
        for n in names:
            _EVAL[n], _SHAPE[n] = fn, shape
        return fn
    return register


def _is_int(dt: np.dtype) -> bool:
    return dt.kind in "iu"


# --- Shape rules shared by many ops ---------------------------------------------------------

def _same(c, s, d):
    return [(s[0], d[0])]


def _same_bool(c, s, d):
    return [(s[0], _BOOL)]


def _bcast(c, s, d):
    return [(c.broadcast(*[x for x in s if x is not None]), d[0])]


def _bcast_bool(c, s, d):
    return [(c.broadcast(*s), _BOOL)]


# --- Elementwise ------------------------------------------------------------------------------

def _gelu(c, x):
    approx = c.attr("approximate", "none")
    if approx == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if approx != "none":
        c.fail(f"approximate={approx!r} is not supported (none, tanh)")
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _hard_sigmoid(x, alpha, beta):
    return np.clip(alpha * x + beta, 0, 1)


_UNARY = {  # Python scalars below are "weak": float32 stays float32
    "Identity": lambda x: x, "Abs": np.abs, "Neg": np.negative, "Sign": np.sign,
    "Sqrt": np.sqrt, "Reciprocal": lambda x: 1 / x, "Exp": np.exp, "Log": np.log,
    "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos, "Atan": np.arctan,
    "Sinh": np.sinh, "Cosh": np.cosh, "Tanh": np.tanh, "Asinh": np.arcsinh, "Acosh": np.arccosh,
    "Atanh": np.arctanh, "Erf": erf, "Floor": np.floor, "Ceil": np.ceil, "Round": np.round,  # half to even
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)), "Relu": lambda x: np.maximum(x, 0),
    "Softplus": lambda x: np.logaddexp(0, x), "Softsign": lambda x: x / (1 + np.abs(x)),
    "HardSwish": lambda x: x * _hard_sigmoid(x, 1 / 6, 0.5), "Not": np.logical_not, "BitwiseNot": np.invert,
}
for _name, _f in _UNARY.items():
    _op(_name, shape=_same)(lambda c, x, f=_f: f(x))

_op("Gelu", shape=_same)(_gelu)
_op("LeakyRelu", shape=_same)(lambda c, x: np.where(x < 0, x * c.attr("alpha", 0.01), x))
_op("Elu", shape=_same)(lambda c, x: np.where(x < 0, c.attr("alpha", 1.0) * np.expm1(x), x))
_op("Selu", shape=_same)(lambda c, x: c.attr("gamma", 1.05070102214813232421875) * np.where(
    x > 0, x, c.attr("alpha", 1.67326319217681884765625) * np.expm1(x)))
_op("HardSigmoid", shape=_same)(lambda c, x: _hard_sigmoid(x, c.attr("alpha", 0.2), c.attr("beta", 0.5)))
_op("IsNaN", shape=_same_bool)(lambda c, x: np.isnan(x))
_op("IsInf", shape=_same_bool)(lambda c, x: (np.isposinf(x) & bool(c.attr("detect_positive", 1)))
                               | (np.isneginf(x) & bool(c.attr("detect_negative", 1))))


def _clip(c, x, lo=None, hi=None):
    # Clip 11+ takes min/max as inputs, older opsets as attributes; max wins when min > max.
    for bound, attr, f in ((lo, "min", np.maximum), (hi, "max", np.minimum)):
        bound = c.attr(attr) if bound is None else bound
        if bound is not None:
            x = f(x, np.asarray(bound, x.dtype).reshape(()))
    return x


_op("Clip", shape=_same)(_clip)


def _div(a, b):
    if _is_int(a.dtype):  # C semantics: truncate toward zero, numpy floors
        q = a // b
        return q + ((q < 0) & (q * b != a)).astype(q.dtype)
    return a / b


def _pow(a, b):
    if _is_int(a.dtype):  # onnxruntime: static_cast<T>(std::pow(double, double))
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype))  # the exponent may have another type (T1)


def _mod(c, a, b):
    if c.attr("fmod", 0):
        return np.fmod(a, b)  # sign of the dividend
    if not _is_int(a.dtype):
        c.fail("fmod=0 is only defined for integer inputs")
    return np.mod(a, b)  # sign of the divisor


def _bitshift(c, a, b):
    direction = c.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        c.fail(f"direction={direction!r} is not LEFT or RIGHT")
    return (np.left_shift if direction == "LEFT" else np.right_shift)(a, b)


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div, "Pow": _pow,
    "BitwiseAnd": np.bitwise_and, "BitwiseOr": np.bitwise_or, "BitwiseXor": np.bitwise_xor,
    "PRelu": lambda x, slope: np.where(x < 0, x * slope, x),
}
for _name, _f in _BINARY.items():
    _op(_name, shape=_bcast)(lambda c, a, b, f=_f: f(a, b).astype(a.dtype, copy=False))
_op("Mod", shape=_bcast)(_mod)
_op("BitShift", shape=_bcast)(_bitshift)

_COMPARE = {"Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
            "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}
for _name, _f in _COMPARE.items():
    _op(_name, shape=_bcast_bool)(lambda c, a, b, f=_f: f(a, b))

_VARIADIC = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}
for _name, _f in _VARIADIC.items():
    _op(_name, shape=_bcast)(lambda c, *xs, f=_f: reduce(f, xs))
_op("Mean", shape=_bcast)(lambda c, *xs: reduce(np.add, xs) / len(xs))
_op("Where", shape=lambda c, s, d: [(c.broadcast(*s), d[1])])(lambda c, cond, x, y: np.where(cond, x, y))


def _cast_shape(c, s, d):
    return [(s[0], c.dtype(c.attr("to")) if c.op == "Cast" else d[1])]


# ml_dtypes' astype rounds to nearest even, as onnxruntime's float -> bfloat16 does.
_op("Cast", "CastLike", shape=_cast_shape)(
    lambda c, x, like=None: x.astype(c.dtype(c.attr("to")) if like is None else like.dtype))


def _dropout(c, x, ratio=None, training=None):
    if training is not None and training.any() and (ratio is None or ratio.item() > 0):
        c.fail("training_mode=True is not supported (inference only)")
    return x, np.ones(x.shape, bool)


_op("Dropout", shape=lambda c, s, d: [(s[0], d[0]), (s[0], _BOOL)])(_dropout)


# --- Normalization and activations along an axis ---------------------------------------------

def _softmax(c, x):
    ax = c.axis(c.attr("axis", -1), x.ndim)  # opset 13+: one axis, not a flattened 2-D view
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    return e / e.sum(axis=ax, keepdims=True)


def _log_softmax(c, x):
    ax = c.axis(c.attr("axis", -1), x.ndim)
    s = x - x.max(axis=ax, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=ax, keepdims=True))


_op("Softmax", shape=_same)(_softmax)
_op("LogSoftmax", shape=_same)(_log_softmax)


def _layer_norm(c, x, scale, bias=None):
    # The spec's function body: statistics in stash_type (float32), normalized value back in T.
    axes = tuple(range(c.axis(c.attr("axis", -1), x.ndim), x.ndim))
    xu = x.astype(c.dtype(c.attr("stash_type", TensorProto.FLOAT)))
    mean = xu.mean(axis=axes, keepdims=True)
    d = xu - mean
    inv_std = 1 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + c.attr("epsilon", 1e-5))
    y = (d * inv_std).astype(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


def _layer_norm_shape(c, s, d):
    ax = c.axis(c.attr("axis", -1), len(s[0]))
    stats = s[0][:ax] + (1,) * (len(s[0]) - ax)
    u = c.dtype(c.attr("stash_type", TensorProto.FLOAT))
    return [(s[0], d[0]), (stats, u), (stats, u)]


_op("LayerNormalization", shape=_layer_norm_shape)(_layer_norm)


def _cumsum(c, x, axis):
    ax = c.axis(int(np.ravel(axis)[0]), x.ndim)  # a scalar or a 1-element tensor
    if c.attr("reverse", 0):
        x = np.flip(x, ax)
    y = np.cumsum(x, axis=ax, dtype=_acc(x))
    if c.attr("exclusive", 0):  # shift, so float sums round exactly as onnxruntime's do
        zero = np.zeros_like(np.take(y, [0], axis=ax))
        y = np.concatenate([zero, np.take(y, np.arange(y.shape[ax] - 1), axis=ax)], axis=ax)
    return np.flip(y, ax) if c.attr("reverse", 0) else y


_op("CumSum", shape=_same)(_cumsum)

# --- Reductions --------------------------------------------------------------------------------


def _logsumexp(x, axes, keepdims):
    m = np.max(x, axis=axes, keepdims=True) if x.size else np.zeros_like(x)
    m = np.where(np.isfinite(m), m, 0)
    y = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return y if keepdims else np.squeeze(y, axes)


def _acc(x: np.ndarray) -> np.dtype | None:
    """Accumulator dtype: keep ints (numpy widens int32 sums to int64, int means to float64)."""
    return x.dtype if _is_int(x.dtype) else None


_REDUCE = {
    "ReduceSum": lambda x, a, k: np.sum(x, axis=a, dtype=_acc(x), keepdims=k),
    "ReduceMean": lambda x, a, k: np.mean(x, axis=a, dtype=_acc(x), keepdims=k),  # ints truncate, as in ORT
    "ReduceProd": lambda x, a, k: np.prod(x, axis=a, dtype=_acc(x), keepdims=k),
    "ReduceMax": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "ReduceMin": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "ReduceL1": lambda x, a, k: np.sum(np.abs(x), axis=a, dtype=_acc(x), keepdims=k),
    "ReduceL2": lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, dtype=_acc(x), keepdims=k)),
    "ReduceSumSquare": lambda x, a, k: np.sum(x * x, axis=a, dtype=_acc(x), keepdims=k),
    "ReduceLogSum": lambda x, a, k: np.log(np.sum(x, axis=a, dtype=_acc(x), keepdims=k)),
    "ReduceLogSumExp": _logsumexp,
}


def _reduce_shape(c, s, d):
    axes, keep = c.reduce_axes(len(s[0])), c.attr("keepdims", 1)
    return [(tuple(1 if i in axes else n for i, n in enumerate(s[0]) if keep or i not in axes), d[0])]


for _name, _f in _REDUCE.items():
    _op(_name, shape=_reduce_shape)(lambda c, x, axes=None, f=_f: f(
        x, c.reduce_axes(x.ndim), bool(c.attr("keepdims", 1))).astype(x.dtype, copy=False))


def _arg_index(c, x_shape) -> tuple[int, bool]:
    return c.axis(c.attr("axis", 0), len(x_shape)), bool(c.attr("keepdims", 1))


def _argmax(c, x):
    ax, keep = _arg_index(c, x.shape)
    f = np.argmax if c.op == "ArgMax" else np.argmin
    if c.attr("select_last_index", 0):
        i = x.shape[ax] - 1 - f(np.flip(x, ax), axis=ax)
    else:
        i = f(x, axis=ax)
    i = np.asarray(i, np.int64)
    return np.expand_dims(i, ax) if keep else i


def _argmax_shape(c, s, d):
    ax, keep = _arg_index(c, s[0])
    return [(s[0][:ax] + ((1,) if keep else ()) + s[0][ax + 1:], _INT64)]


_op("ArgMax", "ArgMin", shape=_argmax_shape)(_argmax)


def _topk_k(c, s: Shape) -> tuple[int, int]:
    ax = c.axis(c.attr("axis", -1), len(s))
    k = c.ints(1, "K", "k")  # k was an attribute before opset 10
    if k is None or not 0 <= k[0] <= s[ax]:
        c.fail(f"K={k} is out of range for axis {ax} of shape {s}")
    return ax, k[0]


def _topk(c, x, k=None):
    ax, k = _topk_k(c, x.shape)
    # Stable sorts: among equal values the lower index comes first, as the spec requires.
    if c.attr("largest", 1):
        idx = x.shape[ax] - 1 - np.flip(np.argsort(np.flip(x, ax), axis=ax, kind="stable"), ax)
    else:
        idx = np.argsort(x, axis=ax, kind="stable")
    idx = np.take(idx, np.arange(k), axis=ax).astype(np.int64)  # sorted=0 also returns sorted
    return np.take_along_axis(x, idx, ax), idx


def _topk_shape(c, s, d):
    ax, k = _topk_k(c, s[0])
    out = s[0][:ax] + (k,) + s[0][ax + 1:]
    return [(out, d[0]), (out, _INT64)]


_op("TopK", shape=_topk_shape)(_topk)

# --- Linear algebra ------------------------------------------------------------------------------


def _matmul_shape(c, s, d):
    a, b = s[0], s[1]
    if not a or not b:
        c.fail("inputs must have rank 1 or more")
    a2, b2 = ((1,) + a if len(a) == 1 else a), (b + (1,) if len(b) == 1 else b)  # numpy's 1-D promotion
    if a2[-1] != b2[-2]:
        c.fail(f"inner dimensions of {a} and {b} differ")
    out = c.broadcast(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    out = out[:-2] + out[-1:] if len(a) == 1 else out
    return [(out[:-1] if len(b) == 1 else out, d[0])]


_op("MatMul", shape=_matmul_shape)(lambda c, a, b: np.matmul(a, b))


def _matmul_nbits_weight(c, b, scales, zero_points, k: int, block: int):
    from .onnx_contrib import matmul_nbits_weight

    try:
        return matmul_nbits_weight(b, scales, zero_points, k, c.attr("bits", 4), block)
    except ValueError as e:
        c.fail(str(e))


def _matmul_nbits_shape(c, s, d):
    k, n = c.attr("K", 0), c.attr("N", 0)
    if not s[0] or s[0][-1] != k or n < 1:
        c.fail(f"input A {s[0]} does not end in K={k} (N={n})")
    if len(s) > 4 and s[4] is not None:
        c.fail("g_idx (act-order) is not read by llmirc")
    return [(s[0][:-1] + (n,), d[0])]


def _matmul_nbits(c, a, b, scales, zero_points=None, g_idx=None, bias=None):
    """com.microsoft.MatMulNBits: A [..., K] times the dequantized weight [N, K], transposed (+ bias)."""
    w = _matmul_nbits_weight(c, b, scales, zero_points, c.attr("K", 0), c.attr("block_size", 0))
    y = np.matmul(a, w.T.astype(a.dtype))
    return y if bias is None else y + bias


_op("MatMulNBits", shape=_matmul_nbits_shape)(_matmul_nbits)


def _gather_block_quantized_k(c, data: Shape) -> int:
    """GatherBlockQuantized's row width: uint8 data [N, ...] packs 8 / bits codes a byte."""
    if c.attr("gather_axis", 0) != 0 or c.attr("quantize_axis", 1) != len(data) - 1 or len(data) < 2:
        c.fail("llmirc reads rows (gather_axis 0) quantized along the last axis")
    return math.prod(data[1:]) * 8 // c.attr("bits", 4)


def _gather_block_quantized_shape(c, s, d):
    if d[0] != np.uint8:
        c.fail(f"data of type {d[0]}: llmirc reads uint8 codes")
    return [(tuple(s[1]) + (_gather_block_quantized_k(c, s[0]),), d[2])]


def _gather_block_quantized(c, data, indices, scales, zero_points=None):
    """com.microsoft.GatherBlockQuantized: rows `indices` of the dequantized table [N, K]."""
    w = _matmul_nbits_weight(c, data, scales, zero_points, _gather_block_quantized_k(c, data.shape),
                             c.attr("block_size", 128))
    return w[indices].astype(scales.dtype)


_op("GatherBlockQuantized", shape=_gather_block_quantized_shape)(_gather_block_quantized)


def _gemm_mn(c, a: Shape, b: Shape) -> Shape:
    if len(a) != 2 or len(b) != 2:
        c.fail(f"A and B must be 2-D, got {a} and {b}")
    (m, k), (k2, n) = (a[::-1] if c.attr("transA", 0) else a), (b[::-1] if c.attr("transB", 0) else b)
    if k != k2:
        c.fail(f"inner dimensions of {a} and {b} differ")
    return m, n


def _gemm(c, a, b, cc=None):
    a, b = (a.T if c.attr("transA", 0) else a), (b.T if c.attr("transB", 0) else b)
    y = c.attr("alpha", 1.0) * (a @ b)
    return (y if cc is None else y + c.attr("beta", 1.0) * cc).astype(a.dtype, copy=False)


def _gemm_shape(c, s, d):
    mn = _gemm_mn(c, s[0], s[1])
    if len(s) > 2 and s[2] is not None and c.broadcast(s[2], mn) != mn:
        c.fail(f"C of shape {s[2]} does not broadcast to {mn}")
    return [(mn, d[0])]


_op("Gemm", shape=_gemm_shape)(_gemm)


def _einsum_shape(c, s, d):
    lhs, arrow, rhs = c.attr("equation", "").replace(" ", "").partition("->")
    terms, dims, ellipses = lhs.split(","), {}, []
    if len(terms) != len(s):
        c.fail(f"equation {lhs!r} names {len(terms)} inputs, the node has {len(s)}")
    for term, shape in zip(terms, s):
        pre, dots, post = term.partition("...")
        n_ell = len(shape) - len(pre) - len(post)
        if n_ell < 0 or (n_ell and not dots):
            c.fail(f"term {term!r} does not match the rank of shape {shape}")
        if dots:
            ellipses.append(shape[len(pre):len(pre) + n_ell])
        for ch, n in zip(pre + post, shape[:len(pre)] + shape[len(shape) - len(post):]):
            if dims.setdefault(ch, n) != n:
                c.fail(f"label {ch!r} has sizes {dims[ch]} and {n}")
    if not arrow:  # implicit output: ellipsis dims, then the labels used once, sorted
        letters = lhs.replace("...", "").replace(",", "")
        rhs = ("..." if ellipses else "") + "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    pre, _, post = rhs.partition("...")
    return [(tuple(dims[ch] for ch in pre) + c.broadcast(*ellipses, ()) + tuple(dims[ch] for ch in post), d[0])]


_op("Einsum", shape=_einsum_shape)(lambda c, *xs: np.einsum(c.attr("equation"), *xs))

# --- Shape manipulation: one shape rule serves both evaluation and inference ----------------------


def _reshape_to(c, s: Shape) -> Shape:
    target = c.ints(1, "shape", "shape")
    if target is None:
        c.fail("the target shape is missing")
    allow_zero = c.attr("allowzero", 0)
    if not allow_zero and any(d == 0 and i >= len(s) for i, d in enumerate(target)):
        c.fail(f"a 0 in target shape {target} has no input dimension to copy from {s}")
    out = [s[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]  # 0 copies the dim
    n = math.prod(s)
    if out.count(-1) > 1 or any(d < -1 for d in out):
        c.fail(f"invalid target shape {target}")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or n % known:
            c.fail(f"cannot reshape {s} to {target}")
        out[out.index(-1)] = n // known
    if math.prod(out) != n:
        c.fail(f"cannot reshape {s} to {target}")
    return tuple(out)


def _squeeze_to(c, s: Shape) -> Shape:
    axes = c.ints(1, "axes", "axes")
    if not axes:  # omitted or empty: every dimension of size 1, as onnxruntime does
        return tuple(n for n in s if n != 1)
    axes = {c.axis(a, len(s)) for a in axes}
    if bad := [a for a in axes if s[a] != 1]:
        c.fail(f"cannot squeeze axes {bad} of shape {s}: their size is not 1")
    return tuple(n for i, n in enumerate(s) if i not in axes)


def _unsqueeze_to(c, s: Shape) -> Shape:
    axes = c.ints(1, "axes", "axes")
    if axes is None:
        c.fail("axes are missing")
    rank = len(s) + len(axes)
    axes = {c.axis(a, rank) for a in axes}  # relative to the output rank
    if len(axes) != rank - len(s):
        c.fail("axes repeat")
    dims = iter(s)
    return tuple(1 if i in axes else next(dims) for i in range(rank))


def _flatten_to(c, s: Shape) -> Shape:
    ax = c.attr("axis", 1)
    if not -len(s) <= ax <= len(s):
        c.fail(f"axis {ax} is out of range for rank {len(s)}")
    ax = ax + len(s) if ax < 0 else ax
    return math.prod(s[:ax]), math.prod(s[ax:])


for _name, _to in {"Reshape": _reshape_to, "Squeeze": _squeeze_to, "Unsqueeze": _unsqueeze_to,
                   "Flatten": _flatten_to}.items():
    _op(_name, shape=lambda c, s, d, to=_to: [(to(c, s[0]), d[0])])(
        lambda c, x, *_, to=_to: x.reshape(to(c, x.shape)))


def _expand_to(c, s: Shape) -> Shape:
    return c.broadcast(s, tuple(c.ints(1, "shape")))  # bidirectional: the target may hold 1s


_op("Expand", shape=lambda c, s, d: [(_expand_to(c, s[0]), d[0])])(
    lambda c, x, shape: np.broadcast_to(x, _expand_to(c, x.shape)).copy())


def _perm(c, rank: int) -> list[int]:
    perm = c.attr("perm") or list(range(rank))[::-1]
    if sorted(perm) != list(range(rank)):
        c.fail(f"perm {perm} is not a permutation of {rank} axes")
    return perm


_op("Transpose", shape=lambda c, s, d: [(tuple(s[0][p] for p in _perm(c, len(s[0]))), d[0])])(
    lambda c, x: np.transpose(x, _perm(c, x.ndim)))


def _tile_repeats(c, s: Shape) -> list[int]:
    reps = c.ints(1, "repeats")
    if reps is None or len(reps) != len(s) or min(reps, default=0) < 0:
        c.fail(f"repeats {reps} do not fit shape {s}")
    return reps


_op("Tile", shape=lambda c, s, d: [(tuple(n * r for n, r in zip(s[0], _tile_repeats(c, s[0]))), d[0])])(
    lambda c, x, reps: np.tile(x, _tile_repeats(c, x.shape)))


def _slices(c, s: Shape) -> tuple[slice, ...]:
    # Inputs since opset 10, attributes before; Python ints so INT64_MIN/MAX + dim cannot overflow.
    starts, ends = c.ints(1, "starts", "starts"), c.ints(2, "ends", "ends")
    if starts is None or ends is None:
        c.fail("starts and ends are missing")
    axes, steps = c.ints(3, "axes", "axes"), c.ints(4, "steps") or [1] * len(starts)
    axes = list(range(len(starts))) if axes is None else [c.axis(a, len(s)) for a in axes]
    if not len(starts) == len(ends) == len(axes) == len(steps) or len(set(axes)) != len(axes) or 0 in steps:
        c.fail(f"invalid starts/ends/axes/steps {starts}/{ends}/{axes}/{steps}")
    idx = [slice(None)] * len(s)
    for a, b, e, st in zip(axes, starts, ends, steps):
        n = s[a]
        b, e = (b + n if b < 0 else b), (e + n if e < 0 else e)
        if st > 0:
            b, e = min(max(b, 0), n), min(max(e, 0), n)
        else:  # end -1 (after clamping) means "through index 0": None in Python
            b, e = min(max(b, 0), n - 1), min(max(e, -1), n - 1)
        idx[a] = slice(b, e if e >= 0 else None, st)
    return tuple(idx)


_op("Slice", shape=lambda c, s, d: [
    (tuple(len(range(*sl.indices(n))) for sl, n in zip(_slices(c, s[0]), s[0])), d[0])])(
    lambda c, x, *_: x[_slices(c, x.shape)])


def _concat_shape(c, s, d):
    shapes = [x for x in s if x is not None]
    ax = c.axis(c.attr("axis"), len(shapes[0]))
    rest = {x[:ax] + x[ax + 1:] for x in shapes}
    if len(rest) != 1 or len({len(x) for x in shapes}) != 1:
        c.fail(f"shapes {shapes} differ outside axis {ax}")
    out = shapes[0]
    return [(out[:ax] + (sum(x[ax] for x in shapes),) + out[ax + 1:], d[0])]


_op("Concat", shape=_concat_shape)(lambda c, *xs: np.concatenate(
    [x for x in xs if x is not None], axis=c.axis(c.attr("axis"), xs[0].ndim)))


def _split_sizes(c, s: Shape) -> tuple[int, list[int]]:
    ax = c.axis(c.attr("axis", 0), len(s))
    n = s[ax]
    sizes = c.ints(1, "split", "split")
    if sizes is None and (parts := c.attr("num_outputs")):  # opset 18: the last part may be smaller
        chunk = -(-n // parts)
        sizes = [chunk] * (parts - 1) + [n - chunk * (parts - 1)]
    elif sizes is None:  # opsets 13-17: as many equal parts as the node has outputs
        if not c.n_outputs:
            c.fail("without `split` or `num_outputs` the output count is needed (n_outputs)")
        if n % c.n_outputs:
            c.fail(f"dimension {n} does not split into {c.n_outputs} equal parts")
        sizes = [n // c.n_outputs] * c.n_outputs
    if sum(sizes) != n or min(sizes) < 0:
        c.fail(f"split sizes {sizes} do not fit dimension {n}")
    return ax, sizes


def _split(c, x, split=None):
    ax, sizes = _split_sizes(c, x.shape)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=ax))


def _split_shape(c, s, d):
    ax, sizes = _split_sizes(c, s[0])
    return [(s[0][:ax] + (n,) + s[0][ax + 1:], d[0]) for n in sizes]


_op("Split", shape=_split_shape)(_split)


def _pad_widths(c, s: Shape) -> list[tuple[int, int]]:
    pads, axes = c.ints(1, "pads", "pads"), c.ints(3, "axes")  # pads: an attribute before opset 11
    axes = list(range(len(s))) if axes is None else [c.axis(a, len(s)) for a in axes]
    if pads is None or len(pads) != 2 * len(axes):
        c.fail(f"pads {pads} do not fit {len(axes)} axes")
    widths = [(0, 0)] * len(s)
    for i, a in enumerate(axes):
        widths[a] = (pads[i], pads[i + len(axes)])
    if any(n + b + e < 0 for n, (b, e) in zip(s, widths)):
        c.fail(f"pads {pads} remove more than shape {s} holds")
    return widths


def _pad(c, x, pads=None, value=None, axes=None):
    widths, mode = _pad_widths(c, x.shape), c.attr("mode", "constant")
    # Negative pads crop; np.pad takes the rest.
    x = x[tuple(slice(max(-b, 0), n - max(-e, 0)) for n, (b, e) in zip(x.shape, widths))]
    widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    if mode == "constant":
        v = c.attr("value", 0) if value is None else value.reshape(-1)[0]
        return np.pad(x, widths, mode="constant", constant_values=v)
    if mode not in ("reflect", "edge", "wrap"):
        c.fail(f"mode={mode!r} is not supported")
    return np.pad(x, widths, mode=mode)


_op("Pad", shape=lambda c, s, d: [(tuple(n + b + e for n, (b, e) in zip(s[0], _pad_widths(c, s[0]))), d[0])])(_pad)


def _trilu(c, x, k=None):
    k = 0 if k is None else int(k.reshape(()))
    return np.triu(x, k) if c.attr("upper", 1) else np.tril(x, k)  # both act on the last two axes


_op("Trilu", shape=_same)(_trilu)

# --- Indexing ---------------------------------------------------------------------------------------


def _gather_shape(c, s, d):
    ax = c.axis(c.attr("axis", 0), len(s[0]))
    return [(s[0][:ax] + s[1] + s[0][ax + 1:], d[0])]


_op("Gather", shape=_gather_shape)(
    lambda c, x, i: np.take(x, i, axis=c.axis(c.attr("axis", 0), x.ndim)))  # take wraps negative indices


def _gather_elements(c, x, i):
    ax = c.axis(c.attr("axis", 0), x.ndim)
    return np.take_along_axis(x, np.where(i < 0, i + x.shape[ax], i), ax)


_op("GatherElements", shape=lambda c, s, d: [(s[1], d[0])])(_gather_elements)


def _nd_index(c, data: Shape, indices: Shape) -> tuple[int, int]:
    b = c.attr("batch_dims", 0)
    k = indices[-1] if indices else -1
    if not (0 <= b < len(indices) and b <= len(data) - k and data[:b] == indices[:b] and k >= 1):
        c.fail(f"indices of shape {indices} do not index data of shape {data} with batch_dims={b}")
    return b, k


def _gather_nd(c, x, i):
    b, k = _nd_index(c, x.shape, i.shape)
    nb = math.prod(x.shape[:b])
    flat = i.reshape(nb, -1, k)
    out = x.reshape((nb,) + x.shape[b:])[(np.arange(nb)[:, None],) + tuple(flat[..., j] for j in range(k))]
    return out.reshape(i.shape[:-1] + x.shape[b + k:])


def _gather_nd_shape(c, s, d):
    b, k = _nd_index(c, s[0], s[1])
    return [(s[1][:-1] + s[0][b + k:], d[0])]


_op("GatherND", shape=_gather_nd_shape)(_gather_nd)

_SCATTER = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(c, out, index: tuple, updates):
    red = c.attr("reduction", "none")
    if red == "none":  # duplicate indices are undefined in the spec: the last one wins here
        out[index] = updates
    elif red in _SCATTER:
        _SCATTER[red].at(out, index, updates)
    else:
        c.fail(f"reduction={red!r} is not supported")
    return out


def _scatter_nd(c, x, i, updates):
    _nd_index(c, x.shape, i.shape)  # batch_dims is 0 for ScatterND
    return _scatter(c, x.copy(), tuple(np.moveaxis(i, -1, 0)), updates)


def _scatter_elements(c, x, i, updates):
    ax = c.axis(c.attr("axis", 0), x.ndim)
    index = list(np.indices(i.shape, sparse=True))
    index[ax] = np.where(i < 0, i + x.shape[ax], i)
    return _scatter(c, x.copy(), tuple(index), updates)


_op("ScatterND", shape=_same)(_scatter_nd)
_op("ScatterElements", shape=_same)(_scatter_elements)

# --- Sources and shapes ------------------------------------------------------------------------------


def _tensor_attr(v) -> np.ndarray:
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def _constant(c, *_):
    a = c.attrs
    if "value" in a:
        return _tensor_attr(a["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32),
                    ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dt)
    c.fail(f"attribute {next(iter(a), 'value')!r} is not supported (value, value_float(s), value_int(s))")


_op("Constant", shape=lambda c, s, d: [(_constant(c).shape, _constant(c).dtype)])(_constant)


def _fill_value(c) -> np.ndarray:
    v = c.attr("value")
    return np.zeros((), np.float32) if v is None else _tensor_attr(v).reshape(-1)[:1].reshape(())


def _dims(c, i: int, what: str) -> Shape:
    dims = c.ints(i, what)
    if dims is None or min(dims, default=0) < 0:
        c.fail(f"invalid {what} {dims}")
    return tuple(dims)


_op("ConstantOfShape", shape=lambda c, s, d: [(_dims(c, 0, "shape"), _fill_value(c).dtype)])(
    lambda c, shape: np.full(_dims(c, 0, "shape"), _fill_value(c), _fill_value(c).dtype))


def _shape_bounds(c, rank: int) -> tuple[int, int]:
    def clamp(i):  # opset 15 start/end: negative counts from the back, then clamp to [0, rank]
        return min(max(i + rank if i < 0 else i, 0), rank)
    return clamp(c.attr("start", 0)), clamp(c.attr("end", rank))


def _shape(c, x):
    b, e = _shape_bounds(c, x.ndim)
    return np.array(x.shape[b:e], np.int64)


def _shape_shape(c, s, d):
    b, e = _shape_bounds(c, len(s[0]))
    return [((max(e - b, 0),), _INT64)]


_op("Shape", shape=_shape_shape)(_shape)
_op("Size", shape=lambda c, s, d: [((), _INT64)])(lambda c, x: np.array(x.size, np.int64))


def _range_length(c, start, limit, delta) -> int:
    start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    if len({start.dtype, limit.dtype, delta.dtype}) != 1:
        c.fail(f"start, limit and delta differ in type ({start.dtype}, {limit.dtype}, {delta.dtype})")
    if delta == 0:
        c.fail("delta is 0")
    if _is_int(start.dtype):
        return max(-((int(start) - int(limit)) // int(delta)), 0)  # ceil((limit - start) / delta), exactly
    n = float(limit - start) / float(delta)
    if not math.isfinite(n):
        c.fail(f"length {n} is not finite")
    return max(math.ceil(n), 0)


def _range(c, start, limit, delta):
    n = _range_length(c, start, limit, delta)
    start, delta = np.asarray(start).reshape(()), np.asarray(delta).reshape(())
    # The spec (and onnxruntime) accumulate `current += delta` in T; cumsum is sequential, so it rounds alike.
    steps = np.full(n, delta, start.dtype)
    steps[:1] = start
    return np.cumsum(steps, dtype=start.dtype)


def _range_shape(c, s, d):
    return [((_range_length(c, *(c.value(i, w) for i, w in enumerate(("start", "limit", "delta")))),), d[0])]


_op("Range", shape=_range_shape)(_range)
def _nonzero(c, x):
    return np.array(np.nonzero(x), np.int64).reshape(x.ndim, -1)


_op("NonZero", shape=lambda c, s, d: [(_nonzero(c, c.value(0, "X")).shape, _INT64)])(_nonzero)

CONTRIB: frozenset[str] = frozenset({"MatMulNBits", "GatherBlockQuantized"})  # onnxruntime's (com.microsoft)
SUPPORTED: frozenset[str] = frozenset(_EVAL) - CONTRIB


# --- Entry points ----------------------------------------------------------------------------------------

def evaluate(op_type: str, inputs: list[np.ndarray | None], attrs: dict, node: str = "", *,
             n_outputs: int | None = None) -> list[np.ndarray]:
    """The outputs of one ONNX node of the default domain, every output the op defines.

    `inputs`: arrays, None for an omitted optional input. `attrs`: decoded as by `attrs_of`.
    `n_outputs`: the node's output count, needed only by Split with neither `split` nor
    `num_outputs`. Raises CheckpointError for an unsupported op or attribute, or inputs that do
    not fit the op (shapes, indices)."""
    inputs = [None if x is None else np.asarray(x) for x in inputs]
    c = _Node(op_type, node, attrs, inputs, [x is not None for x in inputs], n_outputs)
    shapes = [None if x is None else x.shape for x in inputs]
    out_shapes = _call(c, _SHAPE, shapes, [None if x is None else x.dtype for x in inputs])
    _check_size(c, [s for s, _ in out_shapes], shapes)  # before anything is allocated
    out = _call(c, _EVAL, *inputs)
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def infer_shapes(op_type: str, input_shapes: list[tuple[int, ...] | None], input_values: list[np.ndarray | None],
                 input_dtypes: list[np.dtype | None], attrs: dict, node: str = "", *,
                 n_outputs: int | None = None) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every output the op defines, from the inputs' shapes and dtypes.

    `input_shapes[i]` is None for an omitted optional input. `input_values[i]` is the value of
    input i when it is a constant, else None; ops whose output shape depends on a value (Reshape's
    shape, Slice's starts, Range, ...) raise CheckpointError when that value is unknown."""
    shapes = [None if s is None else tuple(int(n) for n in s) for s in input_shapes]
    dtypes = [None if t is None else np.dtype(t) for t in input_dtypes]
    c = _Node(op_type, node, attrs, list(input_values), [s is not None for s in shapes], n_outputs)
    _check_types(c, dtypes)
    out = [(tuple(int(n) for n in s), np.dtype(t)) for s, t in _call(c, _SHAPE, shapes, dtypes)]
    _check_size(c, [s for s, _ in out], shapes)
    return out


# Values an op may compute, in elements, beyond the size of its inputs together: graphs are untrusted,
# and a ConstantOfShape, Expand, Range or broadcast could otherwise ask for terabytes at compile time.
MAX_ELEMENTS = 1 << 28
MAX_RANK = 32  # numpy 1.x's limit


def _check_size(c: _Node, out_shapes, in_shapes) -> None:
    """Each output at most max(MAX_ELEMENTS, the inputs' elements together): a Transpose or Cast of a
    large weight is fine, a small input blown up is not."""
    limit = max(MAX_ELEMENTS, sum(math.prod(s) for s in in_shapes if s is not None))
    for shape in out_shapes:
        if len(shape) > MAX_RANK:
            c.fail(f"output rank {len(shape)} is more than llmirc reads ({MAX_RANK})")
        if any(d < 0 for d in shape) or math.prod(shape) > limit:
            c.fail(f"output shape {list(shape)} is {'invalid' if any(d < 0 for d in shape) else 'too large'} "
                   f"(llmirc computes at most {limit} elements here)")


# Inputs the operator schema gives one type variable T (None: all of them). A graph that mixes
# types there is invalid ONNX; `infer_shapes` names it rather than letting it reach the compiler's IR
# (`evaluate` allows mixed types: the fusions' numeric checks run float64 references through it).
SAME_TYPE = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1),
             "Equal": (0, 1), "Less": (0, 1), "Greater": (0, 1), "LessOrEqual": (0, 1), "GreaterOrEqual": (0, 1),
             "Where": (1, 2), "Concat": None, "Max": None, "Min": None, "Sum": None, "Mean": None}


def _check_types(c: _Node, dtypes: list) -> None:
    which = SAME_TYPE.get(c.op, ())
    types = [t for i, t in enumerate(dtypes) if t is not None and (which is None or i in which)]
    if len(set(types)) > 1:
        c.fail(f"inputs of element types {', '.join(str(t) for t in types)}; the operator needs them to be one type")


def _call(c: _Node, table: dict, *args):
    if c.op not in table:
        c.fail("operator is not supported")
    with np.errstate(all="ignore"):  # inf/nan are ONNX results, not warnings
        try:
            return table[c.op](c, *args)
        except (ValueError, IndexError, TypeError, OverflowError) as e:  # numpy's word on inputs that do not fit
            c.fail(f"inputs do not fit the operator ({' '.join(str(e).split())})")
