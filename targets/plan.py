"""Optimized llmir -> execution plan: kernel calls, weights, and a memory plan. Target-independent.

Every activation is a 2-D f32 matrix whose row count is a run-time dimension (`T`, tokens in
the batch, or `L`, rows kept for logits) and whose column count is static. Buffers live in
one workspace; a buffer's slot is reused once its last reader has run (liveness over the
straight-line program), so the workspace holds a few layers' worth of activations, not all.
`llmir.split` results are views (column offsets into the parent), so fused projections need
no copies.

A full-sequence forward (`llmir.full_sequence`: ONNX ops the fusions did not recognize) also
holds N-D values of several dtypes whose sizes are polynomials in T; targets/generic_plan.py
lowers those ops to generic kernels. Their buffers share the workspace and its liveness, so a
slot's size is a polynomial too (coefficients of T, T*T, L and 1), and so is the workspace.

Each kernel call lists its arguments in the kernel's C order (see targets/cpu/kernels.py and,
for the generic kernels, targets/cpu/generic.py).
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


@dataclass(frozen=True)
class Meta:
    """A generic kernel's table of run-time sizes: polynomials in T, (c0, c1, c2) each."""

    entries: tuple[tuple[int, int, int], ...]

    def to_json(self):
        return {"meta": [list(e) for e in self.entries]}


Arg = Ref | Dim | Meta | int | float


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

    `expr` is ("tensor", name) | ("value", bytes, shape, numpy dtype str) (a folded constant) |
    ("transpose", expr) | ("concat", (expr, ...)) (along rows). `dtype` is the safetensors dtype
    (F32, but the generic kernels of full-sequence models also read I64, BOOL, ... constants)."""

    name: str
    shape: tuple[int, ...]
    expr: tuple
    dtype: str = "F32"

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
                return np.frombuffer(e[1], np.dtype(e[3])).reshape(e[2])
            if e[0] == "transpose":
                return np.ascontiguousarray(ev(e[1]).T)
            return np.concatenate([ev(x) for x in e[1]], axis=0)
        return ev(self.expr)


@dataclass
class Slot:
    """A workspace buffer: its size in floats, as coefficients of T, L, TT (T*T) and const."""

    size: dict[str, int]

    def key(self) -> tuple:
        return tuple(sorted((k, v) for k, v in self.size.items() if v))


@dataclass
class Plan:
    calls: list[KernelCall] = field(default_factory=list)
    weights: list[WeightEntry] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    pool: L.KVPoolType | None = None
    logits_cols: int = 0
    full_sequence: bool = False  # each step recomputes the whole sequence (generic ONNX ops kept)
    # Bounds of the indices the library reads (token_rows, position_rows: None when no table is
    # indexed so; max_context), checked by the loader before each call (llmirc/runtime/step_check.py).
    limits: dict = field(default_factory=dict)

    def slot_offset(self, index: int) -> dict[str, int]:
        """Element offset of a slot in the workspace, as coefficients of T, L, TT and const."""
        coef = {"T": 0, "L": 0, "TT": 0, "const": 0}
        for s in self.slots[:index]:
            for k, v in s.size.items():
                coef[k] += v
        return coef

    def workspace(self) -> dict[str, int]:
        """The workspace's size in floats: T * ws["T"] + L * ws["L"] + ws["const"] (+ T^2 * ws["TT"] when
        some buffer of a full-sequence model grows so)."""
        coef = self.slot_offset(len(self.slots))
        out = {"T": coef["T"], "L": coef["L"], "const": coef["const"]}
        if coef["TT"]:
            out["TT"] = coef["TT"]
        return out

    def pool_dims(self) -> tuple[int, int, int, int]:
        """KV pool (layers, kv heads, block size, head dim); no layers when no attention was recognized."""
        p = self.pool
        if p is None:
            return 0, 1, 16, 1
        return p.layers.data, p.kv_heads.data, p.block_size.data, p.head_dim.data

    def kernels(self) -> dict[str, KernelCall]:
        """One specialization per distinct (kind, params), by symbol."""
        return {c.symbol: c for c in self.calls}

    def to_json(self) -> list[dict]:
        def arg(a):
            return a.to_json() if isinstance(a, (Ref, Dim, Meta)) else a
        return [{"kernel": c.symbol, "args": [arg(a) for a in c.args]} for c in self.calls]


@dataclass
class _Value:
    ref: Ref
    rows: str        # 'T' or 'L'
    ld: int          # leading dimension (elements)
    cols: int
    slot: int | None = None  # workspace slot owning the storage (views share their parent's)


class _Planner:
    def __init__(self, f: func.FuncOp, read_weight=None):
        self.f = f
        self.plan = Plan(full_sequence=L.FULL_SEQUENCE in f.attributes)
        self.values: dict[SSAValue, object] = {}  # _Value (llmir matrices) or generic_plan.Tensor
        self.weights: dict[tuple, int] = {}  # (folding expression, dtype) -> index
        self.free: dict[tuple, list[int]] = {}  # slot size -> free slots of that size
        self.inputs: dict[str, SSAValue] = {}
        self.read_weight = read_weight
        self.generic = None  # GenericLowering of a full-sequence forward

    # -- values --------------------------------------------------------------------------
    def weight(self, v: SSAValue, dtype: str = "F32") -> Ref:
        expr, name = _weight_expr(v, dtype != "F32")
        if (expr, dtype) not in self.weights:
            names = {w.name for w in self.plan.weights}
            unique = name if name not in names else next(f"{name}.{i}" for i in range(1, len(names) + 2)
                                                          if f"{name}.{i}" not in names)
            self.weights[(expr, dtype)] = len(self.plan.weights)
            self.plan.weights.append(WeightEntry(unique, L.shape_of(v), expr, dtype))
        return Ref("weight", self.weights[(expr, dtype)])

    def act(self, v: SSAValue) -> _Value:
        val = self.values.get(v)
        if val is not None and not isinstance(val, _Value) and self.generic is not None:
            val = self.values[v] = self.generic.to_matrix(val)  # an ONNX [T, C] value read by an llmir op
        if not isinstance(val, _Value):
            raise LlmircError(f"cpu target: no kernel produces the value of {_describe(v.owner)}")
        return val

    def alloc_slot(self, size: dict[str, int]) -> int:
        """A workspace slot of `size` floats (see Slot): a free one of that size, or a new one."""
        key = Slot(size).key()
        if self.free.get(key):
            return self.free[key].pop()
        self.plan.slots.append(Slot(dict(size)))
        return len(self.plan.slots) - 1

    def release(self, slot: int) -> None:
        self.free.setdefault(self.plan.slots[slot].key(), []).append(slot)

    def alloc(self, v: SSAValue, rows: str, index: int) -> _Value:
        cols = L.shape_of(v)[1]
        # Full-sequence workspaces also hold int64 data: every slot starts 64-byte aligned.
        size = -(-cols // 16) * 16 if self.plan.full_sequence else cols
        slot = self.alloc_slot({rows: size})
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
        if self.plan.full_sequence:  # inputs the graph does not read are simply not read
            from .generic_plan import GenericLowering

            self.generic = GenericLowering(self, self.f, self.read_weight)
        elif missing or self.plan.pool is None:
            raise LlmircError(f"cpu target: the optimized IR lacks ABI inputs {missing or ['kv_pool']} "
                              "(the pipeline must include prune-logits and paged-kv)")
        if "logits_indices" in missing:
            raise LlmircError("cpu target: the optimized IR lacks the logits_indices input (run prune-logits)")
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
                    self.release(val.slot)
                    for other in self.values.values():
                        if other.slot == val.slot:
                            other.slot = None  # released; stale aliases must not free it twice
        return self.plan

    def _slot_dead_after(self, slot: int, i: int, last_reader: dict[SSAValue, int]) -> bool:
        return all(last_reader.get(v, -1) <= i for v, val in self.values.items() if val.slot == slot)

    def rows_of(self, v: SSAValue) -> str:
        if v is self.inputs.get("token_ids") or v is self.inputs.get("positions"):
            return "T"
        if v is self.inputs.get("logits_indices"):
            return "L"
        return self.act(v).rows

    def lower(self, op: Operation, index: int, logits: SSAValue) -> None:
        if isinstance(op, (L.WeightOp, L.ConstantOp, L.ConcatOp, L.TransposeOp, func.ReturnOp)):
            return  # weights are materialized by the bundle writer
        if self.generic is not None and (isinstance(op, (L.SqueezeBatchOp, L.UnsqueezeBatchOp)) or
                                         op.name.startswith("onnx.")):
            self.generic.lower(op)
            return
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


def _weight_expr(v: SSAValue, keep_dtype: bool = False) -> tuple[tuple, str]:
    """The folding expression of a weight value and a readable name for it."""
    op = v.owner
    if isinstance(op, L.WeightOp):
        return ("tensor", op.weight.data), op.weight.data
    if isinstance(op, L.ConstantOp):  # a small constant folded by a front end
        from llmirc.frontend.onnx_dialect import constant_value

        value = constant_value(op.value)
        value = value if keep_dtype else value.astype(np.float32)
        tag = "" if value.dtype == np.float32 else f".{value.dtype.name}"
        return (("value", value.tobytes(), value.shape, value.dtype.str),
                f"constant{tag}.{hash((value.tobytes(), value.shape)) & 0xffffffff:08x}")
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


def build_plan(module: ModuleOp, read_weight=None) -> Plan:
    """The plan of the module's forward. `read_weight(name)` (the checkpoint's tensors, any dtype)
    is needed for full-sequence forwards, whose shape arithmetic may read constants."""
    plan = _Planner(forward_func(module), read_weight).run()
    symbols: dict[str, str] = {}
    for call in plan.calls:
        call.symbol = symbols.setdefault(call.key(), f"llmir_{call.kind}_{len(symbols)}")
    return plan
