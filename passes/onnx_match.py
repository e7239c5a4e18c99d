"""What the ONNX fusion passes share: the s-only oracle, regions, and numeric verification.

A fusion is found in two steps. Structure proposes a candidate: an anchor op (a Softmax, a
ReduceMean, an Erf...) and the region of ops between its data sources and its output. Numbers
decide: the region is evaluated (with onnx_ops, on random inputs, at a few sequence lengths)
and compared with the llmir op it would become. Exporters differ in how they spell a norm or
an attention; they do not differ in what it computes, so a fusion that passes the check is
right whatever the spelling, and a near miss (a softmax over the wrong axis, an epsilon in
the wrong place) is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, NoneType, TensorType
from xdsl.ir import Operation, SSAValue

from llmirc import dialect as L
from llmirc.frontend import onnx_ops
from llmirc.frontend.onnx_analysis import CONST, DATA, PROBE_LENGTHS, AV, Node, interpret
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp, constant_value, numpy_dtype

from .func_args import arg_names, forward_func

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
    "Relu", "Cast", "CastLike", "Identity", "Abs", "Max", "Min", "Where", "IsNaN", "Softplus", "Gelu", "Clip",
    "Dropout"})
LAYOUT = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Concat", "Split",
                    "Flatten", "Identity", "Cast"})


class Oracle:
    """Abstract values of the forward function at any sequence length S (memoized per S).

    Weight values are read with `read_weight(name)` only when an s-only computation needs one."""

    def __init__(self, module: ModuleOp, read_weight: Callable[[str], np.ndarray]):
        self.func = forward_func(module)
        self.read_weight = read_weight
        self._envs: dict[int, dict] = {}
        self._cache: dict = {}
        self._nodes = [n for op in self.func.body.block.ops if (n := _node(op)) is not None]
        self._roots = {}
        for arg, role in zip(self.func.args, arg_names(self.func)):
            self._roots[arg] = _root(arg, role)

    def at(self, S: int) -> dict:
        if S not in self._envs:
            self._envs[S] = interpret(self._nodes, self._roots, S, self.read_weight, _opaque_shape, self._cache)
        return self._envs[S]

    def _av(self, v: SSAValue, S: int) -> AV:
        env = self.at(S)
        if v not in env:  # made by a rewrite after the oracle ran: llmir ops only
            node = _node(v.owner) if isinstance(v.owner, Operation) else None
            if node is not None and node.op_type in ("constant", "weight"):
                env.update(interpret([node], {}, S, self.read_weight))
            else:
                shape, dtype = _opaque_shape(Node("opaque", [], [v]), S)[0]
                env[v] = AV(DATA, shape, dtype)
        return env[v]

    def kind(self, v: SSAValue) -> str:
        if isinstance(v.type, NoneType):
            return CONST
        return self._av(v, PROBE_LENGTHS[0]).kind

    def value(self, v: SSAValue, S: int = PROBE_LENGTHS[0]) -> np.ndarray:
        av = self._av(v, S)
        if av.kind == DATA:
            raise ValueError("a data value has no compile-time value")
        if av.value is None and av.load is not None:
            av.value = av.load()
        return av.value

    def shape(self, v: SSAValue, S: int = PROBE_LENGTHS[0]) -> tuple[int, ...]:
        return self._av(v, S).shape

    def table_rows(self) -> int | None:
        """The fewest rows among the position tables the graph reads at positions 0..S-1 (a rotary cache, learned
        position embeddings): past that length it cannot be evaluated. None without such tables."""
        from llmirc.frontend.onnx_import import position_tables

        tables = position_tables(self._nodes, [self.at(S) for S in PROBE_LENGTHS])
        return min((t.tokens for t in tables), default=None)

    def is_data(self, v: SSAValue) -> bool:
        return self.kind(v) == DATA

    def has_value(self, v: SSAValue) -> bool:
        """Whether `value(v)` is known at compile time: const or s-only, not an omitted optional input."""
        return not isinstance(v.type, NoneType) and not self.is_data(v)


def _node(op: Operation) -> Node | None:
    if isinstance(op, OnnxOp):
        ins = [None if isinstance(v.type, NoneType) else v for v in op.operands]
        return Node(op.op_type, ins, list(op.results), op.py_attrs(), op.node.data)
    if isinstance(op, L.ConstantOp):
        return Node("constant", [], [op.result], {"value": constant_value(op.value)})
    if isinstance(op, L.WeightOp):  # (read_weight gives floats as float32: a packed weight's float16 scales too)
        t = op.result.type
        dtype = np.dtype(np.float32) if L.is_float(t.element_type) else numpy_dtype(t.element_type)
        return Node("weight", [], [op.result], {"name": op.weight.data, "shape": tuple(t.get_shape()), "dtype": dtype})
    if isinstance(op, L.TransposeOp):  # (of a weight: the importer's view of a transposed initializer)
        return Node("Transpose", [op.input], [op.result], {"perm": [1, 0]})
    if isinstance(op, (NoneOp, func.ReturnOp)):
        return None
    return Node("opaque", list(op.operands), list(op.results))


def _opaque_shape(node: Node, S: int):
    out = []
    for r in node.outputs:
        t = r.type
        if not isinstance(t, TensorType):  # the KV pool threaded through kv_append
            out.append(((), np.dtype(np.float32)))
            continue
        quantized = isinstance(t.element_type, L.QuantType)  # (packed weights: MatMulNBits' codes)
        out.append((tuple(S if d == L.DYN else d for d in t.get_shape()),
                    np.dtype(np.uint8) if quantized else numpy_dtype(t.element_type)))
    return out


def _root(arg: SSAValue, role: str | None):
    t = arg.type
    if not isinstance(t, TensorType):
        return lambda S: AV(DATA, (), np.dtype(np.float32))
    dtype = numpy_dtype(t.element_type)

    def shape(S):
        return tuple(S if d == L.DYN else d for d in t.get_shape())

    if role == "onnx:attention_mask":
        return lambda S: AV("s-only", shape(S), dtype, np.ones(shape(S), dtype))
    if role == "onnx:position_ids":
        return lambda S: AV("s-only", shape(S), dtype, np.arange(S, dtype=dtype).reshape(shape(S)))
    if role == "onnx:past":
        return lambda S: AV("s-only", shape(0), dtype, np.zeros(shape(0), dtype))
    return lambda S: AV(DATA, shape(S), dtype)


# -- regions -----------------------------------------------------------------------------------

@dataclass
class Region:
    ops: list[OnnxOp]             # in block order
    sources: list[SSAValue]       # data inputs from outside the region
    output: SSAValue

    def params(self, oracle: Oracle) -> list[SSAValue]:
        """The const / s-only values the region reads."""
        seen = []
        for op in self.ops:
            for v in op.operands:
                if v not in seen and not oracle.is_data(v) and not _produced_in(v, self.ops):
                    seen.append(v)
        return seen


def _produced_in(v: SSAValue, ops: list[Operation]) -> bool:
    return isinstance(v.owner, Operation) and v.owner in ops


def region_up(output: SSAValue, oracle: Oracle, is_source: Callable[[SSAValue], bool]) -> Region | None:
    """The ops between `output` and the data values `is_source` accepts (or that are not onnx ops).

    None when the region is not closed: an intermediate value is also used outside it."""
    ops: set[Operation] = set()
    sources: list[SSAValue] = []
    stack = [output]
    while stack:
        v = stack.pop()
        if not oracle.is_data(v):
            continue
        op = v.owner
        if (v is not output and is_source(v)) or not isinstance(op, OnnxOp):
            if v not in sources:
                sources.append(v)
            continue
        if op not in ops:
            ops.add(op)
            stack.extend(op.operands)
    block = forward_func_of(output).body.block
    ordered = sorted(ops, key=block.get_operation_index)
    for op in ordered:
        for r in op.results:
            # Uses by Shape/Size read only the shape, which the rewrite keeps: they die with the region.
            if r is not output and any(u.operation not in ops and not shape_only(u.operation) for u in r.uses):
                return None
    return Region(ordered, sources, output)


def shape_only(op: Operation) -> bool:
    """Shape/Size read only the shape of their input, which fusions keep."""
    return isinstance(op, OnnxOp) and op.op_type in ("Shape", "Size")


def forward_func_of(v: SSAValue) -> func.FuncOp:
    op = v.owner if isinstance(v.owner, Operation) else v.owner.parent_op()
    while not isinstance(op, func.FuncOp):
        op = op.parent_op()
    return op


def closure_down(source: SSAValue, oracle: Oracle, allowed: Iterable[str] = ELEMENTWISE | {"ReduceMean"}) -> \
        tuple[list[OnnxOp], list[SSAValue]]:
    """Ops computing only from `source` (and constants) through `allowed` op types, and the
    values of that set used outside it."""
    allowed = frozenset(allowed)
    inside: set[SSAValue] = {source}
    ops: list[OnnxOp] = []
    changed = True
    while changed:
        changed = False
        for v in list(inside):
            for use in v.uses:
                op = use.operation
                if not isinstance(op, OnnxOp) or op in ops or op.op_type not in allowed:
                    continue
                if all(x in inside or not oracle.is_data(x) for x in op.operands):
                    ops.append(op)
                    inside.update(op.results)
                    changed = True
    outs = [v for v in inside if v is not source and any(u.operation not in ops for u in v.uses)]
    return ops, outs


def evaluate(ops: list[OnnxOp], feeds: dict[SSAValue, np.ndarray], oracle: Oracle, S: int) -> dict:
    """Runs the region's ops with onnx_ops on `feeds`; const and s-only inputs from the oracle."""
    env = dict(feeds)
    for op in ops:
        ins = []
        for v in op.operands:
            if isinstance(v.type, NoneType):
                ins.append(None)
            elif v in env:
                ins.append(env[v])
            else:
                ins.append(oracle.value(v, S))
        for r, value in zip(op.results, onnx_ops.evaluate(op.op_type, ins, op.py_attrs(), op.node.data,
                                                          n_outputs=len(op.results))):
            env[r] = value
    return env


def softcap_candidates(scalars: Iterable[float]) -> list[float]:
    """Gemma 2's soft-cap candidates of a region whose float scalar constants are `scalars`: 1 (x / 1 and
    x * 1 are dropped by exporters), their magnitudes in float32's normal range (cap * tanh(x / cap) is
    -cap's too; a cap below 1, as a config may set, is a cap), and the inverses of those in (0, 1) (x / cap
    may be spelled x * (1 / cap)); ascending."""
    f32 = np.finfo(np.float32)
    caps = {abs(s) for s in scalars if f32.tiny <= abs(s) < f32.max}
    return sorted({1.0} | caps | {1 / c for c in caps if c < 1})


def close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a) == np.isfinite(b)):
        return False
    fin = np.isfinite(b)
    scale = max(1.0, float(np.abs(b[fin]).max())) if fin.any() else 1.0
    return bool(np.all(np.abs(a[fin] - b[fin]) <= tol * scale))


def erase_dead(ops: Iterable[Operation]) -> None:
    """Erases ops (last first) once nothing uses their results."""
    for op in sorted(ops, key=lambda o: o.parent_block().get_operation_index(o), reverse=True):
        if all(not r.uses for r in op.results):
            op.parent_block().erase_op(op)


