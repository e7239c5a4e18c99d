"""Generic kernels (targets/cpu/generic.py) against onnx_ops on fresh random inputs.

The calls are made by the planner's own helpers (targets/generic_plan.py, generic_rules.py)
over views of numpy buffers: transposed, broadcast (stride 0), reversed (negative strides),
offset. A `Recorder` stands in for the lowering: it records the calls, and the test runs them
through ctypes. Every kernel specialization any case needs is compiled once, into one library.
Outputs are poisoned (NaN, or a sentinel for integers) so unwritten elements show.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from llvmlite import ir

from llmirc import dtypes
from llmirc.frontend import onnx_ops
from llmirc.targets import generic_plan as G
from llmirc.targets import generic_rules as R
from llmirc.targets.cpu import generic as K
from llmirc.targets.cpu import toolchain as tc
from llmirc.targets.plan import KernelCall, Ref

# its module-scoped fixtures build once: the module runs on one xdist worker (pyproject.toml)
pytestmark = pytest.mark.xdist_group("generic-kernels")

DT = {dtypes.dtype(short).numpy: short for short in G.GENERIC_DTYPES}
NP = {v: k for k, v in DT.items()}


class Recorder:
    """Stands in for GenericLowering: records kernel calls over numpy buffers."""

    strides_for = G.GenericLowering.strides_for
    map = G.GenericLowering.map

    def __init__(self):
        self.calls: list[tuple] = []
        self.buffers: list[np.ndarray] = []

    def emit(self, kind, params, meta, refs):
        self.calls.append((kind, params, meta, refs))

    def view(self, a: np.ndarray, base: np.ndarray | None = None, T: int | None = None) -> G.Tensor:
        """A Tensor reading `a`, a view of `base` (its own buffer by default). With T, dims equal to
        T are written as the polynomial T (the kernel then evaluates them at run time)."""
        base = a if base is None else base
        self.buffers.append(base)
        item = a.itemsize
        offset = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // item
        shape = tuple(G.T_POLY if T is not None and n == T else G.const(n) for n in a.shape)
        return G.Tensor(Ref("ws", len(self.buffers) - 1), DT[a.dtype], shape,
                        tuple(G.const(s // item) for s in a.strides), G.const(offset))

    def new(self, shape, dtype, temp=False) -> G.Tensor:
        return self.view(poison(np.empty(tuple(n[0] for n in shape), NP[dtype])))

    def array(self, t: G.Tensor) -> np.ndarray:
        return self.buffers[t.ref.index]

    def run(self, lib, T: int = 0) -> None:
        for kind, params, meta, refs in self.calls:
            fn = lib.function(kind, params)
            table = np.array([c for m in meta for c in m], np.int64)
            fn(table.ctypes.data, T, *[self.buffers[r.index].ctypes.data for r in refs])


def poison(a: np.ndarray) -> np.ndarray:
    a[...] = np.nan if a.dtype.kind == "f" else 77 if a.dtype != np.bool_ else True
    return a


def operand(rng, shape, dtype, layout="plain"):
    """A random array of `shape` and a view of it in `layout`: plain, transposed (the last two
    axes swapped in memory), reversed (negative strides along axis 0) or offset (inside a bigger
    buffer). Returns (value, base buffer)."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        make = lambda s: rng.standard_normal(s).astype(dt)  # noqa: E731
    elif dt == np.bool_:
        make = lambda s: rng.random(s) < 0.5  # noqa: E731
    else:
        make = lambda s: rng.integers(-9 if dt.kind == "i" else 0, 10, s).astype(dt)  # noqa: E731
    if layout == "transposed" and len(shape) >= 2:
        base = make(shape[:-2] + shape[-1:] + shape[-2:-1])
        return np.swapaxes(base, -1, -2), base
    if layout == "reversed" and len(shape) >= 1:
        base = make(shape)
        return base[::-1], base
    if layout == "offset":
        base = make((int(np.prod(shape)) + 5,))
        return base[5:].reshape(shape), base
    base = make(shape)
    return base, base


def reference(op, ins, attrs=None, n_outputs=None):
    return onnx_ops.evaluate(op, [None if x is None else np.array(x) for x in ins], attrs or {},
                             n_outputs=n_outputs)[0]


def assert_matches(got, want, rtol=2e-6):
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.nanmax(np.abs(want),
                                                                                         initial=0))),
                                   equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


# -- cases: each builds its calls on a Recorder and returns a check to run after them ------------------

def elementwise(op, shapes, dtypes, layouts, attrs=None, out_dtype=None, values=None, T=None):
    def build(rec, rng):
        arrays, views = [], []
        for i, (s, d, lay) in enumerate(zip(shapes, dtypes, layouts)):
            a, base = operand(rng, s, d, lay)
            if values is not None and values[i] is not None:
                a[...] = values[i]
            arrays.append(a)
            views.append(rec.view(a, base, T))
        want = reference(op, arrays, attrs) if op != "Cast" else arrays[0].astype(NP[out_dtype])
        out = rec.new([G.const(n) for n in want.shape], out_dtype or DT[want.dtype])
        if T is not None:
            out.shape = tuple(G.T_POLY if n == G.const(T) else n for n in out.shape)
        flags = dict(attrs or {})
        if op == "Clip":
            flags.update(has_min=True, has_max=len(shapes) > 2)
        rec.map(op, out, views, {k: v for k, v in flags.items() if k != "to"})
        return lambda: assert_matches(rec.array(out), want, rtol=2e-6 if op not in ("Pow", "Gelu") else 1e-5)
    return build


SPECIALS = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-30, 30.0, -30.0], np.float32).reshape(2, 1, 5)
UNARY = ["Abs", "Neg", "Sign", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh",
         "Tanh", "Asinh", "Erf", "Floor", "Ceil", "Round", "Sigmoid", "Relu", "Softplus", "Softsign", "HardSwish",
         "IsNaN", "IsInf"]
CASES = {}
for _op in UNARY:
    CASES[f"unary_{_op}_specials"] = elementwise(_op, [(2, 1, 5)], ["float32"], ["plain"], values=[SPECIALS])
    CASES[f"unary_{_op}_reversed"] = elementwise(_op, [(3, 7, 5)], ["float32"], ["reversed"])
for _op, _attrs in [("Gelu", {}), ("Gelu", {"approximate": "tanh"}), ("LeakyRelu", {"alpha": 0.2}),
                    ("Elu", {"alpha": 0.7}), ("Selu", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4})]:
    CASES[f"unary_{_op}_{len(_attrs)}"] = elementwise(_op, [(4, 33)], ["float32"], ["transposed"], _attrs)
CASES["unary_Acos_in_range"] = elementwise("Acos", [(9,)], ["float32"], ["plain"],
                                                      values=[np.linspace(-0.9, 0.9, 9)])
CASES["unary_Acosh"] = elementwise("Acosh", [(5,)], ["float64"], ["plain"], values=[[1.0, 1.5, 3.0, 10.0, 0.5]])
CASES["unary_Not"] = elementwise("Not", [(4, 6)], ["bool"], ["transposed"])
CASES["unary_BitwiseNot_i32"] = elementwise("BitwiseNot", [(17,)], ["int32"], ["plain"])
CASES["unary_Neg_i64_Abs"] = elementwise("Abs", [(2, 3, 4)], ["int64"], ["offset"])

BROADCASTS = [((3, 1, 5), (4, 1)), ((2, 3, 4, 5), (5,)), ((1,), (2, 6, 7)), ((), (2, 3, 1)), ((5, 1, 1, 2), (1, 3, 2))]
for _op in ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"]:
    for _i, (_a, _b) in enumerate(BROADCASTS):
        CASES[f"binary_{_op}_f32_{_i}"] = elementwise(_op, [_a, _b], ["float32", "float32"],
                                                      ["transposed", "reversed"])
for _op in ["Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "BitwiseAnd", "BitwiseOr", "BitwiseXor"]:
    CASES[f"binary_{_op}_i64"] = elementwise(_op, [(4, 1, 3), (5, 1)], ["int64", "int64"], ["plain", "offset"])
    CASES[f"binary_{_op}_i32"] = elementwise(_op, [(2, 9), (9,)], ["int32", "int32"], ["reversed", "plain"])
CASES["binary_Mod_fmod_f32"] = elementwise("Mod", [(6, 5), (5,)], ["float32", "float32"], ["plain", "plain"],
                                           {"fmod": 1})
CASES["binary_Mod_fmod_i64"] = elementwise("Mod", [(6, 5), (5,)], ["int64", "int64"], ["plain", "plain"], {"fmod": 1})
CASES["binary_Pow_f32_i64_exponent"] = elementwise("Pow", [(3, 4), (4,)], ["float32", "int64"], ["plain", "plain"],
                                                   values=[None, [0, 1, 2, 3]])
CASES["binary_BitShift_u8"] = elementwise("BitShift", [(8,), (8,)], ["uint8", "uint8"], ["plain", "plain"],
                                          {"direction": "LEFT"}, values=[None, [0, 1, 2, 3, 0, 1, 2, 3]])
CASES["binary_Max_nan"] = elementwise("Max", [(4,), (4,)], ["float32", "float32"], ["plain", "plain"],
                                      values=[[np.nan, 1, 2, np.nan], [0, np.nan, 3, 1]])
for _op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]:
    CASES[f"compare_{_op}_f32"] = elementwise(_op, [(3, 4, 5), (4, 1)], ["float32", "float32"],
                                              ["transposed", "plain"], values=[None, [[0.0], [np.nan], [1], [-1]]])
    CASES[f"compare_{_op}_i64"] = elementwise(_op, [(6, 5), (5,)], ["int64", "int64"], ["reversed", "plain"])
for _op in ["And", "Or", "Xor", "Equal"]:
    CASES[f"logic_{_op}"] = elementwise(_op, [(3, 5), (3, 1)], ["bool", "bool"], ["transposed", "plain"])
CASES["where"] = elementwise("Where", [(4, 1, 6), (5, 1), (6,)], ["bool", "float32", "float32"],
                             ["plain", "plain", "reversed"])
CASES["where_i64"] = elementwise("Where", [(2, 3), (2, 3), ()], ["bool", "int64", "int64"], ["transposed"] * 3)
CASES["clip_min_max"] = elementwise("Clip", [(5, 6), (), ()], ["float32"] * 3, ["transposed", "plain", "plain"],
                                    values=[None, -0.5, 0.7])
CASES["clip_min_i64"] = elementwise("Clip", [(9,), ()], ["int64"] * 2, ["plain", "plain"], values=[None, 2])
CASES["broadcast_T_dims"] = elementwise("Add", [(7, 5), (7, 1)], ["float32"] * 2, ["transposed", "plain"], T=7)

CAST_TYPES = ["float32", "float64", "int64", "int32", "uint8", "bool"]
for _src in CAST_TYPES:
    for _dst in CAST_TYPES:
        if _src != _dst:
            CASES[f"cast_{_src}_{_dst}"] = elementwise("Cast", [(4, 5)], [_src], ["transposed"], out_dtype=DT[
                np.dtype(_dst)], values=[None] if _src not in ("float32", "float64") or _dst not in (
                    "uint8", "int8") else [np.arange(20).reshape(4, 5) % 7])


def trilu(upper, k, shape=(2, 5, 7)):
    def build(rec, rng):
        a, base = operand(rng, shape, "float32", "transposed")
        out = rec.new([G.const(n) for n in shape], "f32")
        rec.map("Trilu", out, [rec.view(a, base)], {"upper": upper}, extra=[G.const(k)])
        return lambda: assert_matches(rec.array(out), reference("Trilu", [a, np.array(k)], {"upper": upper}))
    return build


for _upper in (0, 1):
    for _k in (-2, 0, 1, 3):
        CASES[f"trilu_{_upper}_{_k}"] = trilu(_upper, _k)


def fill(value, dtype):
    def build(rec, rng):
        out = rec.new([G.const(3), G.const(4)], dtype)
        rec.map("Fill", out, [], {"value": G.json_safe(value)})
        return lambda: assert_matches(rec.array(out), np.full((3, 4), value, NP[dtype]))
    return build


CASES["fill_f32_-inf"] = fill(-np.inf, "f32")
CASES["fill_i64"] = fill(-5, "i64")
CASES["fill_bool"] = fill(True, "bool")

REDUCE = ["ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSumExp"]


def reduce(op, shape, axes, keepdims, dtype="float32", layout="transposed", select_last=0):
    def build(rec, rng):
        a, base = operand(rng, shape, dtype, layout)
        if op == "ReduceProd":
            a[...] = np.clip(a, -1.5, 1.5)
        if op == "ReduceLogSum":
            a[...] = np.abs(a) + 0.1
        attrs = {"keepdims": keepdims}
        if op in ("ArgMax", "ArgMin"):
            attrs.update(axis=axes, select_last_index=select_last)
            want = reference(op, [a], attrs)
            norm = (onnx_ops._Node(op, "", attrs, [], [], None).axis(axes, len(shape)),)
        else:
            want = reference(op, [a, None if axes is None else np.array(axes, np.int64)], attrs)
            norm = onnx_ops._Node(op, "", attrs, [None, None if axes is None else np.array(axes)],
                                  [True, axes is not None], None).reduce_axes(len(shape))
        out = rec.new([G.const(n) for n in want.shape], DT[want.dtype])
        R.reduce_call(rec, op, rec.view(a, base), out, norm, keepdims, select_last)
        return lambda: assert_matches(rec.array(out), want, rtol=1e-5)
    return build


for _op in REDUCE + ["ReduceLogSum"]:
    CASES[f"{_op}_axes_-1_keep"] = reduce(_op, (3, 4, 5), [-1], 1)
    CASES[f"{_op}_axes_0_2"] = reduce(_op, (3, 4, 5), [0, -1], 0, layout="reversed")
    CASES[f"{_op}_all"] = reduce(_op, (2, 3, 1, 4), None, 0)
for _op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceSumSquare"]:
    CASES[f"{_op}_i64"] = reduce(_op, (4, 6), [1], 1, "int64", "offset")
for _op in ["ArgMax", "ArgMin"]:
    for _last in (0, 1):
        CASES[f"{_op}_i64_ties_{_last}"] = reduce(_op, (5, 6), 1, 1, "int64", "plain", _last)
        CASES[f"{_op}_f32_axis0_{_last}"] = reduce(_op, (5, 3, 2), -3, 0, "float32", "transposed", _last)


def along_axis(op, shape, axis, attrs=None, dtype="float32", layout="transposed"):
    def build(rec, rng):
        a, base = operand(rng, shape, dtype, layout)
        attrs_ = dict(attrs or {})
        if op == "CumSum":
            want = reference(op, [a, np.array(axis)], attrs_)
            kind, params = "g_cumsum", {"dtype": DT[a.dtype], "exclusive": attrs_.get("exclusive", 0),
                                        "reverse": attrs_.get("reverse", 0)}
        else:
            want = reference(op, [a], {"axis": axis})
            kind, params = "g_softmax", {"log": int(op == "LogSoftmax"), "dtype": DT[a.dtype]}
        out = rec.new([G.const(n) for n in want.shape], DT[want.dtype])
        norm = onnx_ops._Node(op, "", {}, [], [], None).axis(axis, len(shape))
        R.axis_call(rec, kind, params, rec.view(a, base), out, norm)
        return lambda: assert_matches(rec.array(out), want, rtol=1e-5)
    return build


for _op in ["Softmax", "LogSoftmax"]:
    for _axis in (0, 1, -1):
        CASES[f"{_op}_{_axis}"] = along_axis(_op, (3, 5, 7), _axis)
CASES["Softmax_plain"] = along_axis("Softmax", (2, 3), -1, layout="plain")
for _attrs in ({}, {"exclusive": 1}, {"reverse": 1}, {"exclusive": 1, "reverse": 1}):
    for _dtype in ("float32", "int64"):
        CASES[f"CumSum_{_dtype}_{len(_attrs)}{_attrs.get('reverse', 0)}"] = along_axis(
            "CumSum", (4, 6), -1 if _attrs.get("reverse") else 0, _attrs, _dtype)


def matmul(sa, sb, la="plain", lb="plain", dtype="float32"):
    def build(rec, rng):
        a, ba = operand(rng, sa, dtype, la)
        b, bb = operand(rng, sb, dtype, lb)
        want = reference("MatMul", [a, b])
        out = rec.new([G.const(n) for n in want.shape], DT[want.dtype])
        R.matmul(rec, rec.view(a, ba), rec.view(b, bb), out)
        return lambda: assert_matches(rec.array(out), want, rtol=1e-5)
    return build


MATMULS = [((4, 5), (5, 3)), ((2, 3, 4, 5), (5, 6)), ((3, 1, 4, 5), (2, 5, 6)), ((5,), (5, 3)), ((2, 4, 5), (5,)),
           ((5,), (5,)), ((1, 7), (7, 1)), ((2, 1, 3, 6), (1, 4, 6, 2))]
for _i, (_a, _b) in enumerate(MATMULS):
    CASES[f"matmul_{_i}"] = matmul(_a, _b)
    CASES[f"matmul_{_i}_views"] = matmul(_a, _b, "transposed", "reversed")
CASES["matmul_f64"] = matmul((3, 4), (4, 2), dtype="float64")


def einsum(equation, *shapes, layouts=None):
    def build(rec, rng):
        arrays = [operand(rng, sh, "float32", lay) for sh, lay in zip(shapes, layouts or ["transposed"] * len(shapes))]
        want = reference("Einsum", [a for a, _ in arrays], {"equation": equation})
        out = rec.new([G.const(n) for n in want.shape], "f32")
        R.einsum(rec, equation, [rec.view(a, base) for a, base in arrays], out)
        return lambda: assert_matches(rec.array(out), want, rtol=1e-5)
    return build


EINSUMS = [("bhqd,bhkd->bhqk", (1, 2, 5, 4), (1, 2, 3, 4)), ("ij,jk->ik", (3, 4), (4, 5)), ("i,j->ij", (3,), (4,)),
           ("ii->i", (4, 4)), ("ii", (3, 3)), ("...ij,...jk->...ik", (2, 1, 3, 4), (5, 4, 2)), ("ij->", (3, 4)),
           ("ij->ji", (3, 4)), ("ij,jk", (2, 3), (3, 2)), ("bi,bi->b", (4, 6), (4, 6))]
for _i, (_eq, *_shapes) in enumerate(EINSUMS):
    CASES[f"einsum_{_i}"] = einsum(_eq, *_shapes)
CASES["einsum_reversed"] = einsum("ij,jk->ik", (3, 4), (4, 5), layouts=["reversed", "offset"])


def gathering(op, data_shape, idx, attrs, itype="int64", layout="transposed"):
    def build(rec, rng):
        data, base = operand(rng, data_shape, "float32", layout)
        index = np.asarray(idx, itype)
        want = reference(op, [data, index], attrs)
        out = rec.new([G.const(n) for n in want.shape], "f32")
        R.gather(rec, op, attrs, rec.view(data, base), rec.view(index), out)
        return lambda: assert_matches(rec.array(out), want)
    return build


CASES["gather_axis0"] = gathering("Gather", (5, 4), [[0, 4], [-1, 2]], {})
CASES["gather_axis_-1_i32"] = gathering("Gather", (3, 4, 6), [5, 0, -2], {"axis": -1}, "int32")
CASES["gather_axis1_scalar"] = gathering("Gather", (3, 4, 6), 2, {"axis": 1})
CASES["gather_rank0_out"] = gathering("Gather", (7,), -3, {})
CASES["gather_elements"] = gathering("GatherElements", (2, 4), [[0, 3, -1], [2, 1, 0]], {"axis": 1})
CASES["gather_elements_axis0"] = gathering("GatherElements", (3, 4), [[0, 2, 1, 0], [2, -3, 1, 2]], {"axis": 0},
                                           layout="reversed")
CASES["gather_nd"] = gathering("GatherND", (3, 4, 5), [[0, 1], [2, -1]], {})
CASES["gather_nd_batch"] = gathering("GatherND", (2, 4, 5), [[[1], [3]], [[0], [2]]], {"batch_dims": 1})


def scattering(op, data_shape, idx, upd_shape, attrs):
    def build(rec, rng):
        data, base = operand(rng, data_shape, "float32", "transposed")
        upd, ubase = operand(rng, upd_shape, "float32", "reversed")
        index = np.asarray(idx, np.int64)
        want = reference(op, [data, index, upd], attrs)
        out = rec.new([G.const(n) for n in want.shape], "f32")
        R.scatter(rec, op, attrs, rec.view(data, base), rec.view(index), rec.view(upd, ubase), out)
        return lambda: assert_matches(rec.array(out), want)
    return build


for _red in ("none", "add", "mul", "max"):
    CASES[f"scatter_elements_{_red}"] = scattering("ScatterElements", (2, 5), [[1, 0, 4], [2, 2, 0]], (2, 3),
                                                   {"axis": 1, "reduction": _red})
    CASES[f"scatter_nd_{_red}"] = scattering("ScatterND", (4, 3), [[1], [3], [1]], (3, 3), {"reduction": _red})
CASES["scatter_nd_elements"] = scattering("ScatterND", (2, 3, 4), [[0, 1, 2], [1, 2, -1]], (2,), {})


def range_(dtype, start, delta, n):
    def build(rec, rng):
        out = rec.new([G.const(n)], dtype)
        rec.emit("g_range", {"dtype": dtype, "start": start, "delta": delta}, [G.const(n), out.offset], [out.ref])
        want = reference("Range", [np.array(start, NP[dtype]), np.array(start + n * delta, NP[dtype]),
                                   np.array(delta, NP[dtype])])
        return lambda: assert_matches(rec.array(out), want[:n])
    return build


CASES["range_i64"] = range_("i64", 3, -2, 6)
CASES["range_f32_accumulates"] = range_("f32", 0.5, 0.1, 40)


def affine(dtype):
    def build(rec, rng):
        out = rec.new([G.const(3)], dtype)
        T = 7
        rec.emit("g_affine", {"dtype": dtype, "n": 3}, [out.offset, (1, 0, 0), (0, 1, 0), (-2, 3, 1)], [out.ref])
        rec.T = T
        return lambda: assert_matches(rec.array(out), np.array([1, T, -2 + 3 * T + T * T]).astype(NP[dtype]))
    return build


CASES["affine_i64"] = affine("i64")
CASES["affine_f32"] = affine("f32")


# -- running --------------------------------------------------------------------------------------------

class Lib:
    def __init__(self, path, symbols):
        self.dll, self.symbols = ctypes.CDLL(str(path)), symbols

    def function(self, kind, params):
        f = getattr(self.dll, self.symbols[KernelCall(kind, params, []).key()])
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * K.pointer_count(kind, params)
        return f


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """One library with every specialization the cases use (built once: the module's tests run on
    one xdist worker)."""
    symbols = {}
    module = ir.Module(name="generic_test")
    variant = tc.host_variant()
    module.triple = variant.triple
    for case in CASES.values():
        rec = Recorder()
        case(rec, np.random.default_rng(0))
        for kind, params, _, _ in rec.calls:
            key = KernelCall(kind, params, []).key()
            if key not in symbols:
                symbols[key] = f"g{len(symbols)}"
                K.emit_generic(module, kind, symbols[key], params)
    path = tmp_path_factory.mktemp("generic") / "libgeneric.so"
    tc.link_shared([tc.compile_object(str(module), variant)], path)
    return Lib(path, symbols)


@pytest.fixture
def rng():
    seed = int(os.environ.get("LLMIRC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"LLMIRC_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("case", CASES)
def test_generic_kernel(lib, rng, case):
    rec = Recorder()
    check = CASES[case](rec, rng)
    with np.errstate(all="ignore"):
        rec.run(lib, getattr(rec, "T", 7))
        check()


def test_polynomial_fit():
    lengths = G.PROBE_LENGTHS + G.CHECK_LENGTHS
    assert G.fit([2 * s - 1 for s in lengths], lengths) == (-1, 2, 0)
    assert G.fit([s * s + 3 for s in lengths], lengths) is None
    assert G.fit([s * s + 3 for s in lengths], lengths, quadratic=True) == (3, 0, 1)
    assert G.fit([max(s - 2, 0) for s in lengths], lengths) is None  # affine only from S = 2 on
    with pytest.raises(Exception, match="faster than T"):
        G.pmul((0, 0, 1), (0, 1, 0))
