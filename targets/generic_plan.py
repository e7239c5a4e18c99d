"""The ONNX ops of a full-sequence model -> calls of generic kernels (targets/cpu/generic.py).

A forward marked `llmir.full_sequence` still holds `onnx.*` ops: what the fusions did not
recognize. It runs over one whole sequence per step (T = S tokens), so every ONNX value's
shape is a polynomial in T, known at compile time: the graph is interpreted abstractly at a few
lengths (passes/onnx_match.Oracle) and each dim is fitted as a*T + b, then checked at other
lengths (1, 2 and 20 too, so a shape that is only affine from some length on is refused rather
than run wrong). Nothing about shapes is computed at run time but the polynomials' values.

Values at run time are strided views (`Tensor`: a base pointer, an element offset and a stride
per dim, all polynomials in T), so Reshape of a contiguous value, Squeeze, Unsqueeze,
Transpose, Expand, Slice and Split cost nothing: the kernels read through the strides. What
needs a kernel gets a fresh contiguous buffer in the workspace (sized by polynomials, so a
[1, H, S, S] score matrix takes H*T^2 floats).

Which ops run at all: the values the llmir ops (and the logits) read, and, backwards, the
operands of the ops computing them, except the operands that only decide shapes or static
parameters (Reshape's shape, Slice's starts, Range's bounds, ...): those are evaluated at
compile time. An s-only value (it depends on the length alone) with a few elements that are
each affine in T (a shape vector, the length as a scalar) is written by one small kernel
from its polynomials; bigger ones (causal masks, position tables) are computed each step.

The ONNX inputs the ops still read are filled from the ABI's token_ids and positions
(`onnx:input_ids`, `onnx:position_ids`), ones (`onnx:attention_mask`) or nothing (`onnx:past`:
empty). llmir values enter ONNX through `llmir.unsqueeze_batch` (a view) and leave through
`llmir.squeeze_batch` (a view when the value is a row-major [1, T, C] f32 matrix, else a copy).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from xdsl.dialects.builtin import NoneType
from xdsl.ir import BlockArgument, Operation, SSAValue

from llmirc import dialect as L
from llmirc import dtypes
from llmirc.errors import CheckpointError, LlmircError
from llmirc.frontend import onnx_ops
from llmirc.frontend.onnx_analysis import DATA, PROBE_LENGTHS, SONLY
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp, numpy_dtype

MAX_RANK = 6
CHECK_LENGTHS = (1, 2, 20)  # lengths at which the fitted shapes and parameters are verified
MAX_FILL = 64                # s-only values up to this many elements are written from polynomials

# Operands whose values only decide shapes or static parameters: read at compile time.
PARAM_OPERANDS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "Slice": {1, 2, 3, 4},
    "Pad": {1, 2, 3}, "Split": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Trilu": {1}, "CumSum": {1},
    "TopK": {1}, "Shape": {0}, "Size": {0}, "Dropout": {1, 2}, "CastLike": {1},
    **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin", "ReduceL1",
                          "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")},
}
# element types of the generic kernels (llmirc.dtypes short names)
GENERIC_DTYPES = ("f32", "f64", "i64", "i32", "i8", "u8", "bool")

# --- polynomials in T: (c0, c1, c2) = c0 + c1*T + c2*T^2 ------------------------------------------

Poly = tuple[int, int, int]
ZERO, ONE, T_POLY = (0, 0, 0), (1, 0, 0), (0, 1, 0)


def const(c: int) -> Poly:
    return (int(c), 0, 0)


def padd(*ps: Poly) -> Poly:
    return tuple(sum(p[i] for p in ps) for i in range(3))


def psub(a: Poly, b: Poly) -> Poly:
    return tuple(x - y for x, y in zip(a, b))


def pmul(a: Poly, b: Poly) -> Poly:
    out = [0] * 5
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    if out[3] or out[4]:
        raise LlmircError("cpu target: a full-sequence tensor grows faster than T^2 (T = sequence length); "
                          "not supported")
    return tuple(out[:3])


def pprod(ps) -> Poly:
    out = ONE
    for p in ps:
        out = pmul(out, p)
    return out


def is_const(p: Poly) -> bool:
    return p[1] == 0 and p[2] == 0


def peval(p: Poly, S: int) -> int:
    return p[0] + p[1] * S + p[2] * S * S


def fit(ys: list[int], lengths: tuple[int, ...], quadratic: bool = False) -> Poly | None:
    """The polynomial (affine, or quadratic if allowed) through (lengths[i], ys[i]); None if none."""
    ys = [int(y) for y in ys]
    (s0, y0), (s1, y1), (s2, y2) = zip(lengths[:3], ys[:3])
    a, rem = divmod(y1 - y0, s1 - s0)
    cands = [(y0 - a * s0, a, 0)] if not rem else []
    if quadratic:  # Newton's divided differences, exact in integers when the fit is
        d1, d2 = (y1 - y0) / (s1 - s0), (y2 - y1) / (s2 - s1)
        c2 = (d2 - d1) / (s2 - s0)
        c1 = d1 - c2 * (s0 + s1)
        c0 = y0 - c1 * s0 - c2 * s0 * s0
        if all(float(x).is_integer() for x in (c0, c1, c2)):
            cands.append((int(c0), int(c1), int(c2)))
    for p in cands:
        if all(peval(p, s) == y for s, y in zip(lengths, ys)):
            return p
    return None


# --- run-time values: strided views ---------------------------------------------------------------

@dataclass(eq=False)
class Tensor:
    """A value at run time: element (i0, ..) is at base + offset + sum i_d * strides[d]."""

    ref: object               # plan.Ref: ws slot, weight, input, or null (no elements)
    dtype: str
    shape: tuple[Poly, ...]
    strides: tuple[Poly, ...]
    offset: Poly = ZERO
    slot: int | None = None   # the workspace slot holding the data (views share it)

    def view(self, shape, strides, offset=None) -> Tensor:
        return dataclasses.replace(self, shape=tuple(shape), strides=tuple(strides),
                                   offset=self.offset if offset is None else offset)

    @property
    def numel(self) -> Poly:
        return pprod(self.shape)

    def contiguous(self) -> bool:
        expect = ONE
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != ONE and s != expect:
                return False
            expect = pmul(expect, n)
        return True


def row_major(shape) -> tuple[Poly, ...]:
    out, acc = [], ONE
    for n in reversed(shape):
        out.append(acc)
        acc = pmul(acc, n)
    return tuple(reversed(out))


def json_safe(v):
    """Kernel params go into manifest.json (strict JSON): inf and nan as strings, which float() reads."""
    return repr(float(v)) if isinstance(v, float) and not math.isfinite(v) else v


def fail(op: OnnxOp, why: str) -> LlmircError:
    return LlmircError(f"cpu target: no generic kernel for onnx.{op.op_type} (node '{op.node.data}'): {why}")


class GenericLowering:
    """Lowers the ONNX ops (and batch squeezes) of one full-sequence forward for a _Planner."""

    def __init__(self, planner, f, read_weight):
        from llmirc.passes.func_args import arg_names
        from llmirc.passes.onnx_match import Oracle

        if read_weight is None:
            raise LlmircError("cpu target: a full-sequence model needs its weights to plan (build_plan(read_weight=))")
        self.p = planner
        self.f = f
        self.roles = dict(zip(f.args, arg_names(f)))
        self.oracle = Oracle(f.parent_op(), read_weight)
        self.lengths = PROBE_LENGTHS + CHECK_LENGTHS
        self.temps: list[Tensor] = []
        self.lowered, self.fills = self._analyse()

    # -- what runs ------------------------------------------------------------------------------
    def _analyse(self) -> tuple[set, set]:
        ops = list(self.f.body.block.ops)
        needed = {v for op in ops if not isinstance(op, (OnnxOp, NoneOp)) for v in op.operands}
        lowered, fills = set(), set()
        for op in reversed(ops):
            if not isinstance(op, OnnxOp):
                continue
            outs = [r for r in op.results if r in needed]
            if not outs:
                continue
            if all(self._fillable(r) for r in outs):
                fills.update(outs)
                continue
            lowered.add(op)
            params = PARAM_OPERANDS.get(op.op_type, set())
            needed.update(v for i, v in enumerate(op.operands) if i not in params and not isinstance(v.type, NoneType))
        return lowered, fills

    def _fillable(self, v: SSAValue) -> bool:
        if self.oracle.kind(v) != SONLY or self._dtype(v, None) is None:
            return False
        values = [self._value(v, S) for S in self.lengths]
        if len({a.shape for a in values}) != 1 or values[0].size > MAX_FILL:
            return False
        for i in range(values[0].size):
            ys = [a.reshape(-1)[i] for a in values]
            if values[0].dtype.kind == "f" and not all(float(y).is_integer() for y in ys):
                return False
            if fit([int(y) for y in ys], self.lengths, quadratic=True) is None:
                return False
        return True

    # -- compile-time facts ------------------------------------------------------------------------
    def _at(self, S: int) -> None:
        try:
            self.oracle.at(S)
        except CheckpointError as e:
            raise LlmircError(f"cpu target: the full-sequence graph cannot be evaluated for a sequence of {S} "
                              f"tokens: {e}") from None

    def _value(self, v: SSAValue, S: int) -> np.ndarray:
        self._at(S)
        return np.asarray(self.oracle.value(v, S))

    def shape(self, v: SSAValue) -> tuple[Poly, ...]:
        for S in self.lengths:
            self._at(S)
        shapes = [self.oracle.shape(v, S) for S in self.lengths]
        if len({len(s) for s in shapes}) != 1:
            raise LlmircError(f"cpu target: the rank of a value of {where(v)} changes with the sequence length")
        dims = []
        for i in range(len(shapes[0])):
            p = fit([s[i] for s in shapes], self.lengths)
            if p is None:
                raise LlmircError(f"cpu target: a dimension of a value of {where(v)} is not affine in the sequence "
                                  f"length: {[s[i] for s in shapes]} at lengths {list(self.lengths)}")
            dims.append(p)
        return tuple(dims)

    def param(self, op: OnnxOp, i: int) -> list | None:
        """Operand i's value at each length (None if omitted); it must not depend on the tokens."""
        if i >= len(op.operands) or isinstance(op.operands[i].type, NoneType):
            return None
        v = op.operands[i]
        if self.oracle.kind(v) == DATA:
            raise fail(op, f"operand {i} depends on the tokens but sets a shape or parameter")
        return [self._value(v, S) for S in self.lengths]

    def node(self, op: OnnxOp, S_index: int) -> onnx_ops._Node:
        """onnx_ops' view of `op` at one length (parameter values filled in), for its helpers."""
        vals = []
        for i, v in enumerate(op.operands):
            if isinstance(v.type, NoneType) or i not in PARAM_OPERANDS.get(op.op_type, ()):
                vals.append(None)
            else:
                vals.append(self._value(v, self.lengths[S_index]))
        present = [not isinstance(v.type, NoneType) for v in op.operands]
        return onnx_ops._Node(op.op_type, op.node.data, op.py_attrs(), vals, present, len(op.results))

    def fit_ints(self, op: OnnxOp, rows: list[list[int]], what: str) -> list[Poly]:
        """Per position, the affine polynomial through the values seen at each length."""
        out = []
        for ys in zip(*rows):
            p = fit(list(ys), self.lengths)
            if p is None:
                raise fail(op, f"its {what} {list(ys)} at lengths {list(self.lengths)} are not affine in the length")
            out.append(p)
        return out

    def _dtype(self, v: SSAValue, op: OnnxOp | None) -> str | None:
        dt = numpy_dtype(v.type.element_type)
        short = dtypes.dtype(dt).short if dt.name != "bfloat16" and dt != np.uint16 else None
        if short not in GENERIC_DTYPES:
            if op is None:
                return None
            raise fail(op, f"element type {dt} is not supported (float32, float64, int64, int32, int8, uint8, bool)")
        return short

    # -- run-time values ---------------------------------------------------------------------------
    def tensor(self, v: SSAValue) -> Tensor:
        val = self.p.values.get(v)
        if isinstance(val, Tensor):
            return val
        if val is not None:  # an llmir matrix read directly (onnx-glue cancelled a batch squeeze)
            return self.from_matrix(val)
        owner = v.owner
        if isinstance(owner, (L.WeightOp, L.ConstantOp, L.TransposeOp)):  # (a transposed initializer, as imported)
            t = self._weight(v)
        elif isinstance(v, BlockArgument) and (self.roles.get(v) or "").startswith("onnx:"):
            t = self._onnx_input(v, self.roles[v])
        else:
            raise LlmircError(f"cpu target: no kernel produces the value of {where(v)}")
        self.p.values[v] = t
        return t

    def _weight(self, v: SSAValue) -> Tensor:
        dt = self._dtype(v, None)
        if dt is None:
            raise LlmircError(f"cpu target: a constant of element type {numpy_dtype(v.type.element_type)} is read "
                              "by a generic kernel (not supported)")
        shape = tuple(const(n) for n in L.shape_of(v))
        return Tensor(self.p.weight(v, dt), dt, shape, row_major(shape))

    def _onnx_input(self, v: SSAValue, role: str) -> Tensor:
        from llmirc.targets.plan import Ref

        dt = self._dtype(v, None)
        shape = self.shape(v)
        if pprod(shape) == ZERO:  # past_key_values.* are read as empty
            return Tensor(Ref("null"), dt, shape, row_major(shape))
        out = self.new(shape, dt)
        if role in ("onnx:attention_mask", "onnx:past"):  # ones; zeros (a past of static size)
            self.map("Fill", out, [], {"value": int(role == "onnx:attention_mask")})
        elif role in ("onnx:input_ids", "onnx:position_ids"):
            src = "token_ids" if role == "onnx:input_ids" else "positions"
            self.map("Cast", out, [Tensor(Ref("input", src), "i32", shape, row_major(shape))])
        else:
            raise LlmircError(f"cpu target: no run-time value for the ONNX input role {role}")
        return out

    def new(self, shape, dtype: str, temp: bool = False) -> Tensor:
        """A fresh contiguous buffer in the workspace."""
        from llmirc.targets.plan import Ref

        shape = tuple(shape)
        numel = pprod(shape)
        if numel == ZERO:
            return Tensor(Ref("null"), dtype, shape, row_major(shape))
        size = [max(0, c * dtypes.dtype(dtype).itemsize) for c in numel]
        slot = self.p.alloc_slot(dtype, {"const": size[0], "T": size[1], "TT": size[2]})
        t = Tensor(Ref("ws", slot), dtype, shape, row_major(shape), ZERO, slot)
        if temp:
            self.temps.append(t)
        return t

    def copy(self, t: Tensor, temp: bool = False) -> Tensor:
        out = self.new(t.shape, t.dtype, temp)
        self.map("Identity", out, [t])
        return out

    def release_temps(self) -> None:
        for t in self.temps:
            if t.slot is not None and not any(v.slot == t.slot for v in self.p.values.values()):
                self.p.release(t.slot)
        self.temps = []

    # -- emitting calls ---------------------------------------------------------------------------
    def emit(self, kind: str, params: dict, meta: list[Poly], refs: list) -> None:
        from llmirc.targets.plan import Dim, Meta

        args = {"meta": Meta(tuple(tuple(int(c) for c in m) for m in meta)), "T": Dim("T")}
        self.p.emit(kind, params, {**args, **{f"p{i}": ref for i, ref in enumerate(refs)}})

    def strides_for(self, t: Tensor, shape) -> list[Poly]:
        """t's strides read as `shape` (numpy broadcasting: right-aligned, size-1 dims repeat)."""
        r, rt = len(shape), len(t.shape)
        if rt > r:
            raise LlmircError(f"cpu target: cannot broadcast a rank-{rt} value to rank {r}")
        out = []
        for i, n in enumerate(shape):
            k = i - (r - rt)
            if k < 0 or (t.shape[k] == ONE and n != ONE):
                out.append(ZERO)
            elif t.shape[k] == n:
                out.append(t.strides[k])
            else:
                raise LlmircError(f"cpu target: shapes {t.shape} and {shape} (as polynomials in T) do not broadcast")
        return out

    def map(self, op: str, out: Tensor, ins: list[Tensor], attrs: dict | None = None, extra=()) -> None:
        shape, ostr = (out.shape, out.strides) if out.shape else ((ONE,), (ZERO,))
        if len(shape) > MAX_RANK:
            raise LlmircError(f"cpu target: rank {len(shape)} exceeds the generic kernels' {MAX_RANK}")
        meta = [*shape, *extra, out.offset, *ostr]
        for t in ins:
            meta += [t.offset, *self.strides_for(t, shape)]
        params = {"op": op, "rank": len(shape), "dtypes": [out.dtype] + [t.dtype for t in ins],
                  "attrs": {k: json_safe(v) for k, v in sorted((attrs or {}).items())}, "n_extra": len(extra)}
        self.emit("g_map", params, meta, [out.ref] + [t.ref for t in ins])

    # -- the walk -------------------------------------------------------------------------------
    def lower(self, op: Operation) -> None:
        if isinstance(op, NoneOp):
            return
        if isinstance(op, L.SqueezeBatchOp):
            self._squeeze_batch(op)
        elif isinstance(op, L.UnsqueezeBatchOp):
            self._unsqueeze_batch(op)
        elif op in self.lowered:
            from .generic_rules import RULES

            rule = RULES.get(op.op_type)
            if rule is None:
                raise fail(op, "this operator is not supported in full-sequence models")
            rule(self, op)
        else:
            for r in op.results:
                if r in self.fills:
                    self._fill(r, op)
        self.release_temps()

    def _fill(self, v: SSAValue, op: OnnxOp) -> None:
        values = [self._value(v, S).reshape(-1) for S in self.lengths]
        polys = [fit([int(a[i]) for a in values], self.lengths, quadratic=True) for i in range(values[0].size)]
        out = self.new(self.shape(v), self._dtype(v, op))
        if polys:
            self.emit("g_affine", {"dtype": out.dtype, "n": len(polys)}, [out.offset, *polys], [out.ref])
        self.p.values[v] = out

    def result(self, op: OnnxOp, t: Tensor, i: int = 0) -> None:
        self.p.values[op.results[i]] = t

    def out(self, op: OnnxOp, i: int = 0, temp: bool = False) -> Tensor:
        r = op.results[i]
        return self.new(self.shape(r), self._dtype(r, op), temp)

    def ins(self, op: OnnxOp) -> list[Tensor | None]:
        """The run-time operands (None where omitted, or read at compile time)."""
        params = PARAM_OPERANDS.get(op.op_type, set())
        out = []
        for i, v in enumerate(op.operands):
            if isinstance(v.type, NoneType) or i in params:
                out.append(None)
            else:
                self._dtype(v, op)
                out.append(self.tensor(v))
        return out

    # -- batch squeezes ------------------------------------------------------------------------------
    def _squeeze_batch(self, op: L.SqueezeBatchOp) -> None:
        t = self.tensor(op.input)
        if len(t.shape) != 3 or t.shape[0] != ONE:
            raise LlmircError(f"cpu target: llmir.squeeze_batch of a value of shape {t.shape} (polynomials in T); "
                              "expected [1, T, C]")
        self.p.values[op.result] = self.to_matrix(t.view(t.shape[1:], t.strides[1:]))

    def _unsqueeze_batch(self, op: L.UnsqueezeBatchOp) -> None:
        t = self.from_matrix(self.p.act(op.input))
        self.p.values[op.result] = t.view((ONE, *t.shape), (ZERO, *t.strides))

    def to_matrix(self, t: Tensor):
        """An llmir matrix (_Value: T rows, static columns, row-major with a leading dimension) of a
        [T, C] f32 value; a view where the layout allows, else a copy."""
        from llmirc.targets.plan import Ref, _Value

        if len(t.shape) != 2 or t.shape[0] != T_POLY or not is_const(t.shape[1]) or t.dtype != "f32":
            raise LlmircError(f"cpu target: an llmir op reads a {t.dtype} value of shape {t.shape} (polynomials "
                              "in T); expected float32 [T, C]")
        cols = t.shape[1][0]
        rows_ok = is_const(t.strides[0]) and t.strides[0][0] >= cols
        if t.ref.space == "null" or not is_const(t.offset) or not rows_ok or \
                (cols > 1 and t.strides[1] != ONE):
            t = self.copy(t)
        return _Value(Ref(t.ref.space, t.ref.index, t.offset[0]), "T", t.strides[0][0], cols, t.slot)

    def from_matrix(self, m) -> Tensor:
        """An llmir matrix as a [T, C] view."""
        from llmirc.targets.plan import Ref

        if m.rows != "T":
            raise LlmircError("cpu target: an ONNX op reads llmir rows other than the sequence's")
        return Tensor(Ref(m.ref.space, m.ref.index), "f32", (T_POLY, const(m.cols)), (const(m.ld), ONE),
                      const(m.ref.col), m.slot)


def where(v: SSAValue) -> str:
    owner = v.owner
    if isinstance(owner, OnnxOp):
        return f"onnx.{owner.op_type} (node '{owner.node.data}')"
    return f"'{owner.name}'" if isinstance(owner, Operation) else "a function argument"
