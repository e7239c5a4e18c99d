"""onnx_ops against onnxruntime: one-node models on seeded random inputs; values, shapes, dtypes."""

import zlib

import numpy as np
import pytest

import onnxruntime as ort
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from llmirc.errors import CheckpointError  # noqa: E402
from llmirc.frontend import onnx_ops  # noqa: E402

I64_MAX, I64_MIN = 2**63 - 1, -2**63


# Input makers, called with the case's seeded generator. None stands for an omitted optional input.
def F(*shape, lo=-3.0, hi=3.0, dt=np.float32):
    return lambda r: r.uniform(lo, hi, shape).astype(dt)


def I(*shape, lo=-9, hi=10, dt=np.int64):  # noqa: E743
    return lambda r: r.integers(lo, hi, shape).astype(dt)


def NZ(*shape, dt=np.int32):  # nonzero, both signs: divisors
    return lambda r: (r.integers(1, 7, shape) * r.choice([-1, 1], shape)).astype(dt)


def B(*shape):
    return lambda r: r.random(shape) < 0.5


def C(values, dt=np.int64):  # a fixed value
    return lambda r: np.array(values, dt)


CASES = []


def case(op, *inputs, opset=18, outs=1, **attrs):
    CASES.append(pytest.param(op, inputs, attrs, opset, outs, id=f"{op}-{sum(p.values[0] == op for p in CASES)}"))


X = F(2, 3, 4)
for op in ("Abs", "Neg", "Sign", "Exp", "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh", "Tanh", "Asinh", "Erf",
           "Floor", "Ceil", "Sigmoid", "Relu", "Softplus", "Softsign", "HardSwish", "Identity", "Reciprocal"):
    case(op, X)
for op in ("Sqrt", "Log"):
    case(op, F(3, 4, lo=0.1))
for op in ("Asin", "Acos", "Atanh"):
    case(op, F(3, 4, lo=-0.9, hi=0.9))
case("Acosh", F(3, 4, lo=1.1, hi=4))
case("Erf", F(1000, lo=-5, hi=5))
case("Round", C([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4, -2.6], np.float32))
for op in ("Abs", "Neg", "Sign"):
    case(op, I(3, 4, dt=np.int32))
case("Relu", I(3, 4, dt=np.int32))
case("Not", B(3, 4))
case("BitwiseNot", I(3, 4, dt=np.int32))
SPECIAL = C([0.0, np.nan, np.inf, -np.inf, -1.0], np.float32)
case("IsNaN", SPECIAL)
case("IsInf", SPECIAL)
case("IsInf", SPECIAL, detect_negative=0)
case("LeakyRelu", X, alpha=0.2)
case("Elu", X, alpha=0.5)
case("Selu", X)
case("HardSigmoid", X, alpha=0.3, beta=0.4)
case("Gelu", X, opset=20)
case("Gelu", X, opset=20, approximate="tanh")
case("Clip", X, C(-1.0, np.float32), C(0.5, np.float32))
case("Clip", X, None, C(0.5, np.float32))
case("Clip", I(3, 4), C(-2), C(3))
case("Clip", X, opset=6, min=-1.0, max=0.5)
case("Dropout", X, outs=2)

# Broadcasting arithmetic; integer Div truncates toward zero, Mod follows the divisor's sign.
for op in ("Add", "Sub", "Mul"):
    case(op, F(2, 3, 4), F(3, 1))
case("Div", F(2, 3, 4), F(4, lo=0.5))
case("Add", I(2, 3, dt=np.int32), I(3, dt=np.int32))
case("Div", I(4, 5, lo=-50, hi=50, dt=np.int32), NZ(4, 5, dt=np.int32))
case("Div", I(4, 5, lo=-50, hi=50), NZ(5, dt=np.int64))
case("Pow", F(3, 4, lo=0.5, hi=2), F(3, 4, lo=-2, hi=2))
case("Pow", F(2, 4), C([0, 1, 2, 3]))
case("Pow", I(3, 4, lo=-4, hi=5), I(3, 4, lo=0, hi=4))
case("Mod", I(4, 5, lo=-50, hi=50, dt=np.int32), NZ(4, 5, dt=np.int32))
case("Mod", I(4, 5, lo=-50, hi=50), NZ(4, 5, dt=np.int64), fmod=1)
case("Mod", F(4, 5, lo=-9, hi=9), F(5, lo=0.5, hi=3), fmod=1)
case("BitShift", I(3, 4, lo=0, hi=60, dt=np.uint8), I(3, 4, lo=0, hi=3, dt=np.uint8), direction="LEFT")
case("BitShift", I(3, 4, lo=0, hi=200, dt=np.uint32), I(4, lo=0, hi=5, dt=np.uint32), direction="RIGHT")
for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
    case(op, I(3, 4, lo=-99, hi=99, dt=np.int32), I(4, lo=-99, hi=99, dt=np.int32))
case("PRelu", X, F(4))
for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
    case(op, I(3, 4, lo=0, hi=3), I(4, lo=0, hi=3))
case("Less", F(3, 4), F(3, 1))
for op in ("And", "Or", "Xor"):
    case(op, B(2, 3, 4), B(3, 1))
for op in ("Max", "Min", "Sum"):
    case(op, F(2, 3, 4), F(3, 1), F(4))
case("Max", I(3, 4, dt=np.int32), I(4, dt=np.int32))
case("Mean", F(2, 3, 4), F(4))
case("Where", B(2, 1, 4), F(3, 4), F(2, 3, 1))
case("Where", B(3, 4), I(3, 4), C(-1))

for to, x in ((TP.INT32, F(3, 4, lo=-9, hi=9)), (TP.FLOAT16, X), (TP.FLOAT, I(3, 4)), (TP.FLOAT, B(3, 4)),
              (TP.BOOL, C([0.0, -0.0, 1.5, -2.0], np.float32)), (TP.INT32, I(3, 4)), (TP.DOUBLE, X),
              (TP.INT64, B(3, 4)), (TP.UINT8, I(5, lo=0, hi=250))):
    case("Cast", x, to=to)
case("CastLike", F(3, 4, lo=-9, hi=9), C([0]))

case("Softmax", X, axis=1)
case("Softmax", X)
case("LogSoftmax", X, axis=-2)
case("LayerNormalization", F(2, 3, 8), F(8), F(8), outs=3, opset=17)
case("LayerNormalization", F(2, 3, 8), F(3, 8), axis=-2, epsilon=1e-3, outs=3)
case("CumSum", F(3, 4), C(1))
case("CumSum", I(3, 4, dt=np.int32), C(0, np.int32), exclusive=1)
case("CumSum", F(3, 4), C(-1), reverse=1)
case("CumSum", I(3, 4), C(1), exclusive=1, reverse=1)

for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
           "ReduceLogSumExp"):
    case(op, X, C([1]))
case("ReduceProd", F(2, 3, 4, lo=0.5, hi=1.5), C([1]))
case("ReduceLogSum", F(2, 3, 4, lo=0.1), C([1]))
case("ReduceMean", X, C([-1, 0]), keepdims=0)
case("ReduceSum", X)
case("ReduceSum", X, keepdims=0)
case("ReduceSum", X, noop_with_empty_axes=1)
case("ReduceSumSquare", X, noop_with_empty_axes=1)
case("ReduceL2", X, C([], np.int64), noop_with_empty_axes=1)
case("ReduceSum", I(3, 4, dt=np.int32), C([0]))
case("ReduceMax", I(3, 4), C([1]), keepdims=0)
case("ReduceMean", I(3, 4, dt=np.int32), axes=[1], opset=17)
case("ReduceMean", X, axes=[0, 2], keepdims=0, opset=17)
case("ReduceSum", X, axes=[1], opset=11)
case("ArgMax", X, axis=1)
case("ArgMin", I(3, 6, lo=0, hi=3), axis=-1, keepdims=0, select_last_index=1)
case("ArgMax", I(3, 6, lo=0, hi=3), keepdims=0)
case("TopK", F(3, 5), C([2]), outs=2)
case("TopK", F(4, 3), C([3]), axis=0, largest=0, outs=2)
case("TopK", I(3, 6, lo=0, hi=3), C([4]), outs=2)

for a, b in (((2, 3, 4), (4, 5)), ((4,), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (4,)), ((4,), (4,))):
    case("MatMul", F(*a), F(*b))
case("MatMul", I(2, 3, dt=np.int32), I(3, 4, dt=np.int32))
case("Gemm", F(3, 4), F(5, 4), F(5), transB=1, alpha=0.5, beta=2.0)
case("Gemm", F(4, 3), F(4, 5), transA=1)
case("Gemm", F(3, 4), F(4, 5), F(3, 1))
case("Einsum", F(2, 3, 5, 4), F(2, 3, 6, 4), equation="bhid,bhjd->bhij")
case("Einsum", F(3, 4), equation="ij->ji")
case("Einsum", F(2, 3, 4), F(4, 5), equation="...ij,jk->...ik")
case("Einsum", F(3, 4), F(4), equation="ij,j")

case("Reshape", X, C([0, -1]))
case("Reshape", X, C([4, 0, -1]))
case("Reshape", F(0, 4), C([0, 4]), allowzero=1)
case("Squeeze", F(2, 1, 3, 1), C([1]))
case("Squeeze", F(2, 1, 3, 1))
case("Squeeze", F(2, 1, 3, 1), C([-1, 1]))
case("Squeeze", F(2, 1, 3, 1), C([], np.int64))
case("Squeeze", F(2, 1, 3, 1), opset=11, axes=[3])
case("Unsqueeze", F(3, 4), C([0, -1]))
case("Unsqueeze", F(3, 4), C([1]))
case("Unsqueeze", F(3, 4), opset=11, axes=[2, 0])
case("Flatten", X, axis=2)
case("Flatten", X, axis=0)
case("Flatten", X, axis=-1)
case("Expand", F(3, 1), C([2, 1, 4]))
case("Expand", F(1, 3), C([4, 1]))
case("Transpose", X)
case("Transpose", X, perm=[1, 0, 2])
case("Tile", F(2, 3), C([2, 1]))
case("Slice", F(5, 6), C([1, -3]), C([I64_MAX, -1]))
case("Slice", F(5, 6), C([-1]), C([I64_MIN]), C([1]), C([-2]))
case("Slice", F(5, 6), C([-100]), C([100]), C([0]), C([1]))
case("Slice", F(5, 6), C([10]), C([-10]), C([-1]), C([-1]))
case("Slice", F(5, 6), C([4, 1]), C([1, 5]), C([0, -1]), C([-1, 2]))
case("Slice", F(5, 6), opset=9, starts=[1], ends=[-1], axes=[1])
case("Concat", F(2, 3), F(2, 1), F(2, 4), axis=1)
case("Concat", I(2, 3), I(1, 3), axis=-2)
case("Split", F(2, 5), C([2, 3]), axis=1, outs=2)
case("Split", F(7, 2), num_outputs=3, outs=3)
case("Split", F(2, 6), axis=-1, opset=13, outs=3)
case("Split", F(5, 2), split=[1, 4], opset=11, outs=2)
case("Pad", F(3, 4), C([0, 1, 2, 0]), C(1.5, np.float32))
case("Pad", F(3, 4), C([1, -1, -1, 2]))
case("Pad", F(3, 4), C([2, 1, 0, 2]), mode="reflect")
case("Pad", F(3, 4), C([1, 2, 1, 0]), mode="edge")
case("Pad", F(3, 4), C([1, 2, 1, 0]), mode="wrap", opset=19)
case("Pad", F(2, 3, 4), C([1, 2]), None, C([-1]))
case("Trilu", F(2, 4, 5))
case("Trilu", F(4, 5), C(1))
case("Trilu", I(4, 5), C(-1), upper=0)

case("Gather", F(5, 4), I(2, 3, lo=-5, hi=5))
case("Gather", F(5, 4), C(-1), axis=1)
case("Gather", I(3, 4), I(2, lo=-4, hi=4), axis=-1)
case("GatherElements", F(3, 4), I(3, 2, lo=-4, hi=4), axis=1)
case("GatherND", F(3, 4, 5), C([[0, 1], [2, -1]]))
case("GatherND", F(2, 3, 4), C([[[1]], [[2]]]), batch_dims=1)
case("GatherND", F(2, 3, 4), C([[1, 3], [0, 0]]), batch_dims=1)
case("ScatterND", F(4, 5), C([[1], [3]]), F(2, 5))
case("ScatterND", F(4, 5), C([[1, 2], [-1, 0]]), F(2))
for red in ("add", "mul", "max", "min"):
    case("ScatterND", F(4, 5), C([[1], [1], [2]]), F(3, 5), reduction=red)
case("ScatterElements", F(3, 4), C([[1, 0], [2, -1]]), F(2, 2), axis=1)
case("ScatterElements", F(3, 4), C([[1, 0], [1, 0]]), F(2, 2), reduction="add")

case("ConstantOfShape", C([2, 3]), value=numpy_helper.from_array(np.array([7], np.int64)))
case("ConstantOfShape", C([2, 0, 3]))
case("ConstantOfShape", C([], np.int64), value=numpy_helper.from_array(np.array([1.5], np.float32)))
case("Constant", value=numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3)))
case("Constant", value_float=2.5)
case("Constant", value_ints=[1, -2, 3])
case("Constant", value_int=4)
case("Shape", X)
case("Shape", X, start=1)
case("Shape", X, start=-2, end=-1)
case("Shape", X, end=10)
case("Shape", X, start=5)
case("Size", X)
case("Range", C(2), C(11), C(3))
case("Range", C(1.0, np.float32), C(-2.0, np.float32), C(-0.5, np.float32))
case("Range", C(5, np.int32), C(1, np.int32), C(1, np.int32))
case("Range", C(0.3, np.float32), C(100.0, np.float32), C(0.7, np.float32))
case("Range", C(-3, np.int32), C(10, np.int32), C(4, np.int32))
case("NonZero", B(3, 4))
case("NonZero", I(5, lo=0, hi=2))

# Ops whose output shape may depend on an input value; for the others infer_shapes must not need one.
VALUE_DEPENDENT = {"Reshape", "Expand", "Slice", "Range", "ConstantOfShape", "Tile", "Squeeze", "Unsqueeze",
                   "Split", "TopK", "Pad", "NonZero"} | {op for op in onnx_ops.SUPPORTED if op.startswith("Reduce")}


def _session(nodes, inputs: dict, outputs: list[str], opset: int):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
                     for n, x in inputs.items()],
        [helper.make_empty_tensor_value_info(n) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the op's own kernel
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("op, makers, attrs, opset, outs", CASES)
def test_matches_onnxruntime(request, op, makers, attrs, opset, outs):
    rng = np.random.default_rng(zlib.crc32(request.node.callspec.id.encode()))
    xs = [None if m is None else m(rng) for m in makers]
    names = ["" if x is None else f"x{i}" for i, x in enumerate(xs)]
    node = helper.make_node(op, names, [f"y{i}" for i in range(outs)], name="n", **attrs)
    feeds = {n: x for n, x in zip(names, xs) if n}
    expected = _session([node], feeds, list(node.output), opset).run(None, feeds)

    a = onnx_ops.attrs_of(node)
    got = onnx_ops.evaluate(op, xs, a, node.name, n_outputs=outs)[:outs]
    for g, e in zip(got, expected, strict=True):
        assert (g.dtype, g.shape) == (e.dtype, e.shape)
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(g, e)

    shapes = [None if x is None else x.shape for x in xs]
    dtypes = [None if x is None else x.dtype for x in xs]
    want = [(e.shape, e.dtype) for e in expected]
    assert onnx_ops.infer_shapes(op, shapes, xs, dtypes, a, node.name, n_outputs=outs)[:outs] == want
    try:  # without values: the same answer, or a clear error where the shape depends on one
        assert onnx_ops.infer_shapes(op, shapes, [None] * len(xs), dtypes, a, n_outputs=outs)[:outs] == want
    except CheckpointError as e:
        assert op in VALUE_DEPENDENT and "not a constant" in str(e)


def test_every_supported_op_is_checked():
    assert onnx_ops.SUPPORTED == {p.values[0] for p in CASES}
    assert set(onnx_ops._SHAPE) == onnx_ops.SUPPORTED | onnx_ops.CONTRIB  # (those: tests/test_onnx_contrib.py)


def test_bfloat16_cast_round_trip():
    # onnxruntime's Python API has no bfloat16 arrays: compare float32 -> bfloat16 -> float32.
    x = np.random.default_rng(0).normal(size=(64,)).astype(np.float32) * 1000
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TP.BFLOAT16),
             helper.make_node("Cast", ["h"], ["y"], to=TP.FLOAT)]
    (want,) = _session(nodes, {"x": x}, ["y"], 18).run(None, {"x": x})
    (h,) = onnx_ops.evaluate("Cast", [x], {"to": TP.BFLOAT16})
    assert h.dtype.name == "bfloat16"
    assert onnx_ops.infer_shapes("Cast", [x.shape], [None], [x.dtype], {"to": TP.BFLOAT16}) == [((64,), h.dtype)]
    (y,) = onnx_ops.evaluate("Cast", [h], {"to": TP.FLOAT})
    np.testing.assert_array_equal(y, want)


def test_float_range_accumulates_like_onnxruntime():
    # The spec's loop adds delta to a running float32 value; start + i * delta rounds differently.
    args = {n: np.array(v, np.float32) for n, v in zip("sld", (0.3, 100.0, 0.7))}
    (want,) = _session([helper.make_node("Range", list(args), ["y"])], args, ["y"], 18).run(None, args)
    (got,) = onnx_ops.evaluate("Range", list(args.values()), {})
    np.testing.assert_array_equal(got, want)


def test_float32_stays_float32():
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    for op, attrs in (("Gelu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Erf", {}), ("HardSigmoid", {})):
        assert onnx_ops.evaluate(op, [x], attrs)[0].dtype == np.float32
    assert onnx_ops.evaluate("Range", [np.float32(0), np.float32(1), np.float32(0.25)], {})[0].dtype == np.float32


@pytest.mark.parametrize("call, message", [
    (lambda: onnx_ops.evaluate("LSTM", [np.zeros(3, np.float32)], {}, "lstm_0"),
     "ONNX LSTM node 'lstm_0': operator is not supported"),
    (lambda: onnx_ops.infer_shapes("If", [()], [None], [np.dtype(bool)], {}), "ONNX If: operator is not supported"),
    (lambda: onnx_ops.infer_shapes("Reshape", [(2, 3), (2,)], [None, None],
                                   [np.dtype(np.float32), np.dtype(np.int64)], {}, "r"),
     "ONNX Reshape node 'r': the output shape depends on input 1 (shape), which is not a constant"),
    (lambda: onnx_ops.evaluate("Gelu", [np.zeros(3, np.float32)], {"approximate": "fast"}, "g"),
     "ONNX Gelu node 'g': approximate='fast' is not supported (none, tanh)"),
    (lambda: onnx_ops.evaluate("Cast", [np.zeros(3, np.float32)], {"to": TP.STRING}),
     "data type STRING is not supported"),
    (lambda: onnx_ops.evaluate("Mod", [np.ones(3, np.float32)] * 2, {}), "fmod=0 is only defined for integer inputs"),
    (lambda: onnx_ops.evaluate("Pad", [np.ones(3, np.float32), np.array([1, 1])], {"mode": "mirror"}),
     "mode='mirror' is not supported"),
    (lambda: onnx_ops.evaluate("Reshape", [np.ones(6), np.array([4, -1])], {}), "cannot reshape (6,) to [4, -1]"),
    (lambda: onnx_ops.infer_shapes("Add", [(2, 3), (4,)], [None, None], [np.dtype(np.float32)] * 2, {}),
     "shapes (2, 3), (4,) do not broadcast"),
    (lambda: onnx_ops.evaluate("Gather", [np.ones(3), np.array([5])], {}, "g"),
     "ONNX Gather node 'g': inputs do not fit the operator"),
    (lambda: onnx_ops.infer_shapes("MatMul", [(2, 3), (4, 5)], [None] * 2, [np.dtype(np.float32)] * 2, {}),
     "inner dimensions of (2, 3) and (4, 5) differ"),
    (lambda: onnx_ops.infer_shapes("Split", [(5,)], [None], [np.dtype(np.float32)], {"num_outputs": 4}),
     "split sizes [2, 2, 2, -1] do not fit dimension 5"),
    (lambda: onnx_ops.evaluate("Dropout", [np.ones(3), None, np.array(True)], {}),
     "training_mode=True is not supported"),
    # Found by tests/fuzz_readers.py: values no graph should make llmirc compute, refused before allocating.
    (lambda: onnx_ops.evaluate("ConstantOfShape", [np.array([10**6, 10**6])], {}, "c"),
     "output shape [1000000, 1000000] is too large"),
    (lambda: onnx_ops.evaluate("Range", [np.int64(0), np.int64(10**12), np.int64(1)], {}), "is too large"),
    (lambda: onnx_ops.evaluate("Expand", [np.float32(1), np.array([10**5, 10**5, 10])], {}), "is too large"),
    (lambda: onnx_ops.infer_shapes("Mul", [(10**5, 1), (1, 10**5)], [None] * 2, [np.dtype(np.float32)] * 2, {}),
     "output shape [100000, 100000] is too large"),
    (lambda: onnx_ops.evaluate("Range", [np.int64(0), np.int64(4), np.float32(0.5)], {}), "differ in type"),
    (lambda: onnx_ops.evaluate("Range", [np.float32(0), np.float32(np.inf), np.float32(1)], {}), "not finite"),
    (lambda: onnx_ops.infer_shapes("Add", [(1,) * 40, (1,)], [None] * 2, [np.dtype(np.float32)] * 2, {}),
     "shapes of rank 40"),
])
def test_user_errors(call, message):
    with pytest.raises(CheckpointError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_attrs_of_decodes():
    node = helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")
    assert onnx_ops.attrs_of(node) == {"approximate": "tanh"}
    node = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.array([1, 2], np.int32)))
    v = onnx_ops.attrs_of(node)["value"]
    assert isinstance(v, np.ndarray) and v.dtype == np.int32 and v.tolist() == [1, 2]


def test_a_transpose_of_a_large_weight_is_not_too_large():
    # The size limit applies beyond the inputs' own size: folding a big weight stays possible.
    big = np.broadcast_to(np.float32(0), (onnx_ops.MAX_ELEMENTS // 1024 + 1, 1024))
    assert onnx_ops.infer_shapes("Transpose", [big.shape], [None], [big.dtype], {})[0][0] == big.shape[::-1]
