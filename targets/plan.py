"""Optimized llmir -> execution plan: kernel calls, weights, and a memory plan. Target-independent.

Every activation is a 2-D f32 matrix whose row count is a run-time dimension (`T`, tokens in
the batch, or `L`, rows kept for logits) and whose column count is static. Buffers live in
one workspace; a buffer's slot is reused once its last reader has run (liveness over the
straight-line program), so the workspace holds a few layers' worth of activations, not all.
`llmir.split` results are views (column offsets into the parent), so fused projections need
no copies.

Each kernel call lists its arguments in the kernel's C order (see targets/cpu/kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from llmirc import dialect as L
from llmirc.errors import LlmircError
from llmirc.passes.func_args import arg_names, forward_func

ABI_INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
              "logits_indices")
DIMS = ("T", "B", "L", "max_blocks", "num_blocks")


@dataclass(frozen=True)
class Ref:
    """A pointer argument: `space` is ws (workspace slot), input, weight, logits, pool or null."""

    space: str
    index: int | str = 0
    col: int = 0  # column offset into the matrix (views)

    def to_json(self):
        return {"ptr": self.space, "index": self.index, "col": self.col}


@dataclass(frozen=True)
class Dim:
    name: str

    def to_json(self):
        return {"dim": self.name}


Arg = Ref | Dim | int | float


@dataclass
class KernelCall:
    kind: str
    params: dict
    args: list[Arg]
    symbol: str = ""

    def key(self) -> str:
        return repr((self.kind, sorted(self.params.items())))


@dataclass(frozen=True)
class WeightEntry:
    """A tensor of the bundle: a checkpoint tensor, or an expression of them folded at compile time.

    `expr` is ("tensor", name) | ("value", bytes, shape) (a folded constant) | ("transpose", expr)
    | ("concat", (expr, ...)) (along rows)."""

    name: str
    shape: tuple[int, ...]
    expr: tuple

    def sources(self) -> list[str]:
        def walk(e):
            return [e[1]] if e[0] == "tensor" else [] if e[0] == "value" else walk(e[1]) \
                if e[0] == "transpose" else [n for x in e[1] for n in walk(x)]
        return walk(self.expr)

    def materialize(self, read) -> np.ndarray:
        """The tensor's data, reading checkpoint tensors with `read(name)` (one entry at a time)."""
        def ev(e):
            if e[0] == "tensor":
                return read(e[1])
            if e[0] == "value":
                return np.frombuffer(e[1], np.float32).reshape(e[2])
            if e[0] == "transpose":
                return np.ascontiguousarray(ev(e[1]).T)
            return np.concatenate([ev(x) for x in e[1]], axis=0)
        return ev(self.expr)


@dataclass
class Slot:
    rows: str
    cols: int


@dataclass
class Plan:
    calls: list[KernelCall] = field(default_factory=list)
    weights: list[WeightEntry] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    pool: L.KVPoolType | None = None
    logits_cols: int = 0

    def slot_offset(self, index: int) -> dict[str, int]:
        """Element offset of a slot in the workspace, as coefficients of the dims."""
        coef = {"T": 0, "L": 0}
        for s in self.slots[:index]:
            coef[s.rows] += s.cols
        return coef

    def workspace(self) -> dict[str, int]:
        coef = self.slot_offset(len(self.slots))
        return {"T": coef["T"], "L": coef["L"], "const": 0}

    def kernels(self) -> dict[str, KernelCall]:
        """One specialization per distinct (kind, params), by symbol."""
        return {c.symbol: c for c in self.calls}

    def to_json(self) -> list[dict]:
        def arg(a):
            return a.to_json() if isinstance(a, (Ref, Dim)) else a
        return [{"kernel": c.symbol, "args": [arg(a) for a in c.args]} for c in self.calls]


@dataclass
class _Value:
    ref: Ref
    rows: str        # 'T' or 'L'
    ld: int          # leading dimension (elements)
    cols: int
    slot: int | None = None  # workspace slot owning the storage (views share their parent's)


class _Planner:
    def __init__(self, f: func.FuncOp):
        self.f = f
        self.plan = Plan()
        self.values: dict[SSAValue, _Value] = {}
        self.weights: dict[tuple, int] = {}  # folding expression -> index
        self.free: dict[tuple[str, int], list[int]] = {}
        self.last_use: dict[int, int] = {}  # slot -> index of the last op reading it
        self.inputs: dict[str, SSAValue] = {}

    # -- values --------------------------------------------------------------------------
    def weight(self, v: SSAValue) -> Ref:
        expr, name = _weight_expr(v)
        if expr not in self.weights:
            self.weights[expr] = len(self.plan.weights)
            self.plan.weights.append(WeightEntry(name, L.shape_of(v), expr))
        return Ref("weight", self.weights[expr])

    def act(self, v: SSAValue) -> _Value:
        if v not in self.values:
            raise LlmircError(f"cpu target: no kernel produces the value of {_describe(v.owner)}")
        return self.values[v]

    def alloc(self, v: SSAValue, rows: str, index: int) -> _Value:
        cols = L.shape_of(v)[1]
        key = (rows, cols)
        if self.free.get(key):
            slot = self.free[key].pop()
        else:
            slot = len(self.plan.slots)
            self.plan.slots.append(Slot(rows, cols))
        val = _Value(Ref("ws", slot), rows, cols, cols, slot)
        self.values[v] = val
        return val

    # -- the walk -----------------------------------------------------------------------
    def run(self) -> Plan:
        for arg, name in zip(self.f.args, arg_names(self.f)):
            if name is None:
                raise LlmircError("cpu target: forward has an unnamed argument")
            self.inputs[name] = arg
            if isinstance(arg.type, L.KVPoolType):
                self.plan.pool = arg.type
        missing = [n for n in ABI_INPUTS if n not in self.inputs]
        if missing or self.plan.pool is None:
            raise LlmircError(f"cpu target: the optimized IR lacks ABI inputs {missing or ['kv_pool']} "
                              "(the pipeline must include prune-logits and paged-kv)")
        ops = list(self.f.body.block.ops)
        ret = self.f.get_return_op()
        logits = ret.operands[0]
        self.plan.logits_cols = L.shape_of(logits)[1]
        # The last op that reads each value decides when its slot is free again.
        last_reader: dict[SSAValue, int] = {}
        for i, op in enumerate(ops):
            for operand in op.operands:
                last_reader[operand] = i
        for i, op in enumerate(ops):
            self.lower(op, i, logits)
            # Free slots whose values (and views of them) are not read after this op.
            for operand in set(op.operands):
                val = self.values.get(operand)
                if val is not None and val.slot is not None and self._slot_dead_after(val.slot, i, last_reader):
                    self.free.setdefault((self.plan.slots[val.slot].rows, self.plan.slots[val.slot].cols),
                                         []).append(val.slot)
                    for other in self.values.values():
                        if other.slot == val.slot:
                            other.slot = None  # released; stale aliases must not free it twice
        return self.plan

    def _slot_dead_after(self, slot: int, i: int, last_reader: dict[SSAValue, int]) -> bool:
        return all(last_reader.get(v, -1) <= i for v, val in self.values.items() if val.slot == slot)

    def rows_of(self, v: SSAValue) -> str:
        if v is self.inputs["token_ids"] or v is self.inputs["positions"]:
            return "T"
        if v is self.inputs["logits_indices"]:
            return "L"
        return self.act(v).rows

    def lower(self, op: Operation, index: int, logits: SSAValue) -> None:
        if isinstance(op, (L.WeightOp, L.ConstantOp, L.ConcatOp, L.TransposeOp, func.ReturnOp)):
            return  # weights are materialized by the bundle writer
        if isinstance(op, L.SplitOp):
            src = self.act(op.input)
            col = 0
            for r, n in zip(op.outputs, op.sizes.get_values()):
                self.values[r] = _Value(Ref(src.ref.space, src.ref.index, src.ref.col + col), src.rows, src.ld, n,
                                        src.slot)
                col += n
            return
        if isinstance(op, L.KVAppendOp):
            k, v = self.act(op.k), self.act(op.v)
            self.emit("kv_append", self.pool_params(), [
                Ref("pool"), Dim("num_blocks"), op.layer.value.data, k.ref, k.ld, v.ref, v.ld,
                Ref("input", "slot_mapping"), Dim("T")])
            return
        rule = _RULES.get(type(op))
        if rule is None:
            raise LlmircError(f"cpu target: no kernel for {_describe(op)}")
        rows = self.rows_of(op.operands[1] if isinstance(op, (L.EmbeddingOp, L.GatherRowsOp)) else op.operands[0])
        if op.results[0] is logits:
            out = _Value(Ref("logits"), rows, L.shape_of(logits)[1], L.shape_of(logits)[1])
            self.values[logits] = out
        else:
            out = self.alloc(op.results[0], rows, index)
        kind, params, args = rule(self, op)
        self.emit(kind, params, [out.ref, out.ld, *args, Dim(rows)])

    def emit(self, kind: str, params: dict, args: list[Arg]) -> None:
        self.plan.calls.append(KernelCall(kind, params, args))

    def pool_params(self) -> dict:
        p = self.plan.pool
        return {"num_layers": p.layers.data, "num_kv_heads": p.kv_heads.data, "head_dim": p.head_dim.data,
                "block_size": p.block_size.data}

    def mat(self, v: SSAValue | None) -> list[Arg]:
        if v is None:
            return [Ref("null"), 0]
        a = self.act(v)
        return [a.ref, a.ld]


def _f(attr) -> float:
    return float(attr.value.data)


def _i(attr) -> int:
    return int(attr.value.data)


def _linear(p: _Planner, op: L.LinearOp):
    n, k = L.shape_of(op.weight)
    params = {"n": n, "k": k, "bias": op.bias is not None, "residual": op.residual is not None}
    bias = p.weight(op.bias) if op.bias is not None else Ref("null")
    return "linear", params, [*p.mat(op.input), p.weight(op.weight), bias, *p.mat(op.residual)]


def _paged_attention(p: _Planner, op: L.PagedAttentionOp):
    params = {"num_heads": _i(op.num_heads), "num_kv_heads": _i(op.num_kv_heads), "head_dim": _i(op.head_dim),
              "block_size": p.plan.pool.block_size.data, "scale": _f(op.scale),
              "sliding_window": _i(op.sliding_window)}
    return "paged_attention", params, [
        *p.mat(op.q), Ref("pool"), Dim("num_blocks"), _i(op.layer), Ref("input", "block_tables"),
        Dim("max_blocks"), Ref("input", "seq_lens"), Ref("input", "query_start_loc"), Dim("B"),
        Ref("input", "positions")]


def _rope(p: _Planner, op: L.RopeOp):
    inv_freq = [float(x) for x in op.inv_freq.get_values()]
    params = {"num_heads": _i(op.num_heads), "head_dim": _i(op.head_dim), "rotary_dim": 2 * len(inv_freq),
              "style": op.style.data, "inv_freq": inv_freq, "scaling": _f(op.scaling)}
    return "rope", params, [*p.mat(op.input), _input(p, op.positions)]


def _input(p: _Planner, v: SSAValue) -> Ref:
    for name, arg in p.inputs.items():
        if arg is v:
            return Ref("input", name)
    raise LlmircError(f"cpu target: expected a forward argument, got {_describe(v.owner)}")


_RULES = {
    L.EmbeddingOp: lambda p, op: ("embedding", {"dim": L.shape_of(op.table)[1]},
                                  [p.weight(op.table), _input(p, op.token_ids)]),
    L.RMSNormOp: lambda p, op: ("rms_norm", {"dim": L.shape_of(op.input)[1], "eps": _f(op.eps)},
                                [*p.mat(op.input), p.weight(op.weight)]),
    L.LayerNormOp: lambda p, op: ("layer_norm", {"dim": L.shape_of(op.input)[1], "eps": _f(op.eps),
                                                 "bias": op.bias is not None},
                                  [*p.mat(op.input), p.weight(op.weight),
                                   p.weight(op.bias) if op.bias is not None else Ref("null")]),
    L.LinearOp: _linear,
    L.RopeOp: _rope,
    L.PagedAttentionOp: _paged_attention,
    L.ActMulOp: lambda p, op: ("act_mul", {"dim": L.shape_of(op.gate)[1], "act": op.act.data},
                               [*p.mat(op.gate), *p.mat(op.up)]),
    L.ActOp: lambda p, op: ("act", {"dim": L.shape_of(op.input)[1], "act": op.act.data}, p.mat(op.input)),
    L.AddOp: lambda p, op: ("add", {"dim": L.shape_of(op.lhs)[1]}, [*p.mat(op.lhs), *p.mat(op.rhs)]),
    L.GatherRowsOp: lambda p, op: ("gather_rows", {"dim": L.shape_of(op.input)[1]},
                                   [*p.mat(op.input), _input(p, op.indices)]),
}


def _describe(op) -> str:
    return f"'{op.name}'" if isinstance(op, Operation) else "a function argument"


def _weight_expr(v: SSAValue) -> tuple[tuple, str]:
    """The folding expression of a weight value and a readable name for it."""
    op = v.owner
    if isinstance(op, L.WeightOp):
        return ("tensor", op.weight.data), op.weight.data
    if isinstance(op, L.ConstantOp):  # a small constant folded by a front end
        from llmirc.frontend.onnx_dialect import constant_value

        value = constant_value(op.value).astype(np.float32)
        return ("value", value.tobytes(), value.shape), f"constant.{hash(value.tobytes()) & 0xffffffff:08x}"
    if isinstance(op, L.TransposeOp):
        expr, name = _weight_expr(op.input)
        return ("transpose", expr), name + ".T"
    if isinstance(op, L.ConcatOp) and op.axis.value.data == 0:
        parts = [_weight_expr(i) for i in op.inputs]
        return ("concat", tuple(e for e, _ in parts)), _fused_name(tuple(n for _, n in parts))
    raise LlmircError(f"cpu target: operand produced by {_describe(op)} must be a weight")


def _fused_name(names: tuple[str, ...]) -> str:
    """model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"""
    split = [n.split(".") for n in names]
    head = 0
    while all(len(s) > head + 1 and s[head] == split[0][head] for s in split):
        head += 1
    tail = 0
    while all(len(s) - tail > head + 1 and s[-1 - tail] == split[0][-1 - tail] for s in split):
        tail += 1
    middles = [".".join(s[head:len(s) - tail]) for s in split]
    parts = split[0][:head] + ["{" + ",".join(middles) + "}"] + (split[0][len(split[0]) - tail:] if tail else [])
    return ".".join(parts)


def build_plan(module: ModuleOp) -> Plan:
    plan = _Planner(forward_func(module)).run()
    symbols: dict[str, str] = {}
    for call in plan.calls:
        call.symbol = symbols.setdefault(call.key(), f"llmir_{call.kind}_{len(symbols)}")
    return plan
