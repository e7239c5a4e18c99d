"""Optimized llmir -> execution plan: kernel calls, typed buffers, and a memory plan. Target-independent.

The plan is the contract between the compiler and every backend (DESIGN.md, "the typed plan"):

* Weights (`WeightEntry`): a name, shape, dtype, byte size and alignment, and how to make the
  data from checkpoint tensors at compile time (`expr`: transpose, concat, cast are folded into
  the bundle). Linear and embedding weights keep the dtype the IR gives them (the checkpoint's,
  or `cast-weights`'); norm weights and biases are float32.
* Workspace slots (`Slot`): a dtype, a size in bytes (coefficients of T, L, T*T and a constant)
  and an alignment (64 bytes: every coefficient is a multiple of it). A slot is reused, for a
  value of the same dtype and size, once its last reader has run (liveness over the
  straight-line program), so the workspace holds a few layers' worth of activations, not all.
  `llmir.split` results are views (column offsets into the parent), so fused projections need
  no copies.
* The KV pool (`PoolSpec`): layers, kv heads, head dim, block size and dtype.
* Kernel calls (`KernelCall`): a kind, its static params and its run-time arguments *by name*,
  as the kind's signature (targets/signatures.py) declares them; `Plan.bind` checks that every
  argument is given and that each pointer points into a buffer of the dtype the signature wants.

Activations are 2-D float32 matrices whose row count is a run-time dimension (`T`, tokens in
the batch, or `L`, rows kept for logits) and whose column count is static.

A full-sequence forward (`llmir.full_sequence`: ONNX ops the fusions did not recognize) also
holds N-D values of several dtypes whose sizes are polynomials in T; targets/generic_plan.py
lowers those ops to generic kernels. Their buffers share the workspace and its liveness.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from xdsl.dialects import func
from xdsl.dialects.builtin import BFloat16Type, ModuleOp, f8E4M3FN
from xdsl.ir import Operation, SSAValue

from llmirc import dialect as L
from llmirc import dtypes, quant
from llmirc.errors import LlmircError
from llmirc.passes.func_args import arg_names, forward_func

from .signatures import qlinear_scratch_bytes, signature

ABI_VERSION = 2  # of the flat-batch inputs below and the typed memory plan (bytes, dtypes)
ABI_INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
              "logits_indices")
DIMS = ("T", "B", "L", "max_blocks", "num_blocks")
ALIGN = 64  # bytes: every workspace slot and every weight in the bundle starts at a multiple of this


@dataclass(frozen=True)
class Ref:
    """A pointer argument: `space` is ws (workspace slot), input, weight, logits, pool or null;
    `col` is an offset in elements of the buffer's dtype (views of a matrix's columns)."""

    space: str
    index: int | str = 0
    col: int = 0

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
    params: dict            # static parameters, defaults filled in
    args: dict[str, Arg]    # run-time arguments by name, in the signature's order
    symbol: str = ""

    def key(self) -> str:
        return repr((self.kind, sorted(self.params.items())))


@dataclass(frozen=True)
class WeightEntry:
    """A tensor of the bundle: a checkpoint tensor, or an expression of them folded at compile time.

    `expr` is ("tensor", name, stored dtype) | ("value", bytes, shape, dtype) (a folded
    constant) | ("transpose", expr) | ("concat", (expr, ...)) (along rows) | ("cast", expr, dtype)
    | ("scale", expr, scale expr, axis, inverse) (float32: expr times, or divided by, the scale
    along axis; llmir.scale) | ("offset", expr, value) (float32: expr plus value; llmir.offset)
    | ("hadamard", expr, block) (float32: each row's blocks rotated; llmir.hadamard)
    | ("quantize", expr, scheme, hessian, part) (one part of the float expr quantized: codes,
    scales, zeros or perm; llmirc/quant.py; round to nearest when `hessian` is None, else GPTQ
    with that float32 expr) | ("packed", format, name, scheme, k, part) (one part of a
    checkpoint's quantized weight, repacked: llmirc/frontend/packed.py).
    `dtype` is a llmirc.dtypes name: float32, bfloat16 or float16 for what llmir kernels read,
    uint8/int32 and the scale dtype for quantized parts; the generic kernels of full-sequence
    models also read int64, bool, ... constants."""

    name: str
    shape: tuple[int, ...]
    expr: tuple
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * dtypes.dtype(self.dtype).itemsize

    def sources(self) -> list[str]:
        def walk(e):
            if e[0] == "tensor":
                return [e[1]]
            if e[0] == "value":
                return []
            if e[0] == "concat":
                return [n for x in e[1] for n in walk(x)]
            if e[0] == "packed":
                from llmirc.frontend.packed import tensor_names

                return tensor_names(e[1], e[2], e[3])
            return walk(e[1])
        return walk(self.expr)

    def materialize(self, read, cache: dict | None = None) -> np.ndarray:
        """The tensor's data in its storage dtype (bf16 as uint16 bits), reading checkpoint tensors
        with `read(name)` (as stored: one entry at a time). `cache` (a dict the caller keeps
        while writing the weights in plan order) saves quantizing a weight once per part."""
        def ev(e) -> tuple[np.ndarray, dtypes.DType]:
            if e[0] == "tensor":
                return _as_stored(np.asarray(read(e[1])), dtypes.dtype(e[2])), dtypes.dtype(e[2])
            if e[0] == "value":
                d = dtypes.dtype(e[3])
                return np.frombuffer(e[1], d.numpy).reshape(e[2]), d
            if e[0] == "transpose":
                a, d = ev(e[1])
                return np.ascontiguousarray(a.T), d
            if e[0] == "quantize":
                def make():
                    w, stored = ev(e[1])  # (round to nearest widens it a block of rows at a time)
                    try:
                        return quant.quantize(w, e[2], stored) if e[3] is None else \
                            quant.gptq(dtypes.to_float32(w, stored), ev(e[3])[0], e[2])
                    except ValueError as err:
                        raise LlmircError(f"cannot quantize {', '.join(self.sources())}: {err}") from None
                parts = _parts(cache, e[:4], make)
                return parts[e[4]], dtypes.dtype(e[2].part_dtype(e[4]))
            if e[0] == "packed":
                from llmirc.frontend.packed import repack

                parts = _parts(cache, e[:5], lambda: repack(*e[1:5], read))
                return parts[e[5]], dtypes.dtype(e[3].part_dtype(e[5]))
            if e[0] == "scale":
                a, s = (dtypes.to_float32(*ev(x)) for x in e[1:3])
                shape = [1] * a.ndim
                shape[e[3]] = len(s)
                s = s.reshape(shape)
                return (a / s if e[4] else a * s).astype(np.float32), dtypes.dtype("float32")
            if e[0] == "offset":
                return (dtypes.to_float32(*ev(e[1])) + np.float32(e[2])).astype(np.float32), dtypes.dtype("float32")
            if e[0] == "hadamard":
                return quant.hadamard(dtypes.to_float32(*ev(e[1])), e[2]).astype(np.float32), dtypes.dtype("float32")
            if e[0] == "cast":
                a, d = ev(e[1])
                to = dtypes.dtype(e[2])
                if d == to:
                    return a, d
                if d.is_float and to.is_float:
                    return dtypes.from_float32(dtypes.to_float32(a, d), to), to
                return a.astype(to.storage), to
            parts = [ev(x) for x in e[1]]
            if len({d for _, d in parts}) != 1:
                raise LlmircError(f"weight {self.name}: concatenated tensors differ in dtype")
            return np.concatenate([a for a, _ in parts], axis=0), parts[0][1]
        a, d = ev(self.expr)
        if d.name != self.dtype:
            raise AssertionError(f"weight {self.name}: expression gives {d.name}, entry says {self.dtype}")
        return a


def _parts(cache: dict | None, key: tuple, make) -> dict[str, np.ndarray]:
    """The parts of one quantized weight, made once while its parts are written one after the
    other (`cache` keeps only the last weight's)."""
    if cache is None:
        return make()
    if key not in cache:
        cache.clear()
        cache[key] = make()
    return cache[key]


def _as_stored(a: np.ndarray, d: dtypes.DType) -> np.ndarray:
    """A checkpoint tensor as `d` is stored (bf16 as uint16 bits, from uint16 or ml_dtypes' bfloat16);
    a front end that reads floats as another float type gets them converted."""
    if a.dtype == d.numpy:
        return a
    if d.name == "bfloat16" and a.dtype.itemsize == 2 and a.dtype.kind != "f" or a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    if d.is_float:
        return dtypes.from_float32(a.astype(np.float32), d)
    return a.astype(d.storage)


@dataclass
class Slot:
    """A workspace buffer of one dtype: its size in bytes as coefficients of T, L, TT (T*T) and const,
    each a multiple of ALIGN."""

    dtype: str
    size: dict[str, int]

    def key(self) -> tuple:
        return (self.dtype, tuple(sorted((k, v) for k, v in self.size.items() if v)))


@dataclass(frozen=True)
class PoolSpec:
    """The paged KV cache: [layers, 2, num_blocks, kv_heads, block_size, head_dim] of `dtype`."""

    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers, K and V (with a quantized pool's scales)."""
        heads = self.layers * 2 * self.kv_heads
        scales = heads * 4 if self.dtype in dtypes.QUANTIZED_KV else 0
        return heads * self.block_size * self.head_dim * dtypes.dtype(self.dtype).itemsize + scales

    def to_json(self) -> dict:
        layout = "layer,kv,block,kv_head,slot,dim"
        if self.dtype in dtypes.QUANTIZED_KV:  # then one float32 scale per (layer, kv, block, kv_head)
            layout += "; float32 scales layer,kv,block,kv_head"
        return {"num_layers": self.layers, "num_kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "block_size": self.block_size, "dtype": self.dtype, "block_bytes": self.block_bytes,
                "layout": layout}


NO_POOL = PoolSpec(0, 1, 1, 16)  # a model without recognized attention


@dataclass
class Plan:
    calls: list[KernelCall] = field(default_factory=list)
    weights: list[WeightEntry] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    pool: PoolSpec = NO_POOL
    logits_cols: int = 0
    full_sequence: bool = False  # each step recomputes the whole sequence (generic ONNX ops kept)
    # Bounds of the indices the library reads (token_rows, position_rows: None when no table is
    # indexed so; max_context), checked by the loader before each call (llmirc/runtime/step_check.py).
    limits: dict = field(default_factory=dict)

    def slot_offset(self, index: int) -> dict[str, int]:
        """Byte offset of a slot in the workspace, as coefficients of T, L, TT and const."""
        coef = {"T": 0, "L": 0, "TT": 0, "const": 0}
        for s in self.slots[:index]:
            for k, v in s.size.items():
                coef[k] += v
        return coef

    def workspace(self) -> dict[str, int]:
        """The workspace's size in bytes: T * ws["T"] + L * ws["L"] + ws["const"] (+ T^2 * ws["TT"]
        when some buffer of a full-sequence model grows so)."""
        coef = self.slot_offset(len(self.slots))
        out = {"T": coef["T"], "L": coef["L"], "const": coef["const"]}
        if coef["TT"]:
            out["TT"] = coef["TT"]
        return out

    def kernels(self) -> dict[str, KernelCall]:
        """One specialization per distinct (kind, params), by symbol."""
        return {c.symbol: c for c in self.calls}

    def dtype_of(self, ref: Ref) -> str | None:
        """The element dtype of the buffer `ref` points into (None for null)."""
        if ref.space == "ws":
            return self.slots[ref.index].dtype
        if ref.space == "weight":
            return self.weights[ref.index].dtype
        if ref.space == "pool":
            return self.pool.dtype
        if ref.space == "input":
            return "int32"
        if ref.space == "logits":
            return "float32"
        return None

    def bind(self, kind: str, params: dict, args: dict[str, Arg]) -> KernelCall:
        """A call of `kind`: static params completed with defaults, arguments checked against the
        signature (names, and each pointer's dtype). A mismatch is a compiler bug: AssertionError."""
        sig = signature(kind, params)
        static = sig.bind_static(params)
        names = [p.name for p in sig.params]
        if set(args) != set(names):
            raise AssertionError(f"{kind} call: arguments {sorted(map(str, args))} but the signature has {names}")
        for p in sig.params:
            a = args[p.name]
            if p.type == "ptr":
                if isinstance(a, Meta):
                    continue
                if not isinstance(a, Ref):
                    raise AssertionError(f"{kind} call: {p.name} must be a pointer, got {a!r}")
                got = self.dtype_of(a)
                if got is None:
                    if not p.nullable:
                        raise AssertionError(f"{kind} call: {p.name} may not be null")
                elif got != sig.pointee(p, static).name:
                    raise AssertionError(f"{kind} call: {p.name} points to {got} data, the kernel reads "
                                         f"{sig.pointee(p, static).name}")
            elif isinstance(a, Ref):
                raise AssertionError(f"{kind} call: {p.name} is a {p.type}, got a pointer")
        return KernelCall(kind, static, {n: args[n] for n in names})

    def to_json(self) -> list[dict]:
        def arg(a):
            return a.to_json() if isinstance(a, (Ref, Dim, Meta)) else a
        return [{"kernel": c.symbol, "args": {n: arg(a) for n, a in c.args.items()}} for c in self.calls]

    def bytes_by_dtype(self) -> dict[str, int]:
        """Weight bytes per dtype (what a decode step reads, with the KV cache)."""
        out: dict[str, int] = {}
        for w in self.weights:
            out[w.dtype] = out.get(w.dtype, 0) + w.nbytes
        return out


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
        self.free: dict[tuple, list[int]] = {}  # slot key -> free slots of that dtype and size
        self.inputs: dict[str, SSAValue] = {}
        self.read_weight = read_weight
        self.generic = None  # GenericLowering of a full-sequence forward

    # -- values --------------------------------------------------------------------------
    def weight(self, v: SSAValue, dtype: str | None = None) -> Ref:
        """The bundle tensor holding weight value `v`, stored as `dtype` (default: v's IR type)."""
        expr, name = _weight_expr(v)
        stored = _ir_dtype(v)
        dtype = dtypes.dtype(dtype or stored).name
        if dtype != stored:
            expr = ("cast", expr, dtype)
        return self._bundle_tensor(expr, dtype, name, L.shape_of(v))

    def quant_weight(self, v: SSAValue) -> tuple[quant.Scheme, dict[str, Ref]]:
        """The bundle tensors (codes, scales, zeros, perm: llmirc/quant.py) of quantized weight `v`."""
        expr, name = _weight_expr(v)
        scheme = quant_scheme(v.type.element_type)
        n, k = L.shape_of(v)
        return scheme, {part: self._bundle_tensor(_part_expr(expr, part), scheme.part_dtype(part), f"{name}.{part}",
                                                  scheme.part_shape(part, n, k)) for part in scheme.parts()}

    def _bundle_tensor(self, expr: tuple, dtype: str, name: str, shape: tuple[int, ...]) -> Ref:
        if (expr, dtype) not in self.weights:
            names = {w.name for w in self.plan.weights}
            unique = name if name not in names else next(f"{name}.{i}" for i in range(1, len(names) + 2)
                                                          if f"{name}.{i}" not in names)
            self.weights[(expr, dtype)] = len(self.plan.weights)
            self.plan.weights.append(WeightEntry(unique, shape, expr, dtype))
        return Ref("weight", self.weights[(expr, dtype)])

    def act(self, v: SSAValue) -> _Value:
        val = self.values.get(v)
        if val is not None and not isinstance(val, _Value) and self.generic is not None:
            val = self.values[v] = self.generic.to_matrix(val)  # an ONNX [T, C] value read by an llmir op
        if not isinstance(val, _Value):
            raise LlmircError(f"cpu target: no kernel produces the value of {_describe(v.owner)}")
        return val

    def alloc_slot(self, dtype: str, size: dict[str, int]) -> int:
        """A workspace slot of `dtype` and `size` bytes (see Slot; rounded up to ALIGN): a free one of
        that dtype and size, or a new one."""
        slot = Slot(dtypes.dtype(dtype).name, {k: -(-v // ALIGN) * ALIGN for k, v in size.items() if v})
        if self.free.get(slot.key()):
            return self.free[slot.key()].pop()
        self.plan.slots.append(slot)
        return len(self.plan.slots) - 1

    def release(self, slot: int) -> None:
        free = self.free.setdefault(self.plan.slots[slot].key(), [])
        if slot in free:  # (two values would then be given one slot)
            raise LlmircError(f"internal error: workspace slot {slot} released twice")
        free.append(slot)

    def alloc(self, v: SSAValue, rows: str, index: int) -> _Value:
        cols = L.shape_of(v)[1]
        slot = self.alloc_slot("float32", {rows: 4 * cols})
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
                t = arg.type
                self.plan.pool = PoolSpec(t.layers.data, t.kv_heads.data, t.head_dim.data, t.block_size.data,
                                          _element_dtype(t.dtype))
        missing = [n for n in ABI_INPUTS if n not in self.inputs]
        if self.plan.full_sequence:  # inputs the graph does not read are simply not read
            from .generic_plan import GenericLowering

            self.generic = GenericLowering(self, self.f, self.read_weight)
        elif missing or self.plan.pool is NO_POOL:
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
            for operand in op.operands:
                val = self.values.get(operand)
                slot = val.slot if val is not None else None
                if slot is not None and self._slot_dead_after(slot, i, last_reader):
                    self.release(slot)
                    for other in self.values.values():
                        if other.slot == slot:  # (val among them: compare with the slot, not val.slot)
                            other.slot = None  # released; stale aliases (a split's other views) must not free it twice
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
        if L.is_weight_op(op) or isinstance(op, func.ReturnOp):
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
            self.emit("kv_append", self.pool_params(), dict(
                pool=Ref("pool"), num_blocks=Dim("num_blocks"), layer=op.layer.value.data, k=k.ref, ld_k=k.ld,
                v=v.ref, ld_v=v.ld, slot_mapping=Ref("input", "slot_mapping"), T=Dim("T")))
            return
        if isinstance(op, L.RopeKVAppendOp):
            q, k, v = self.act(op.q), self.act(op.k), self.act(op.v)
            out = self.alloc(op.q_result, q.rows, index)
            self.emit("rope_kv_append", _rope_params(op) | self.pool_params(), dict(
                out=out.ref, ld_out=out.ld, q=q.ref, ld_q=q.ld, k=k.ref, ld_k=k.ld, v=v.ref, ld_v=v.ld,
                positions=_input(self, op.positions), pool=Ref("pool"), num_blocks=Dim("num_blocks"),
                layer=op.layer.value.data, slot_mapping=Ref("input", "slot_mapping"), T=Dim("T")))
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
        count = signature(kind).params[-1].name  # the row count (T, or L for gather_rows)
        self.emit(kind, params, {"out": out.ref, "ld_out": out.ld, **args, count: Dim(rows)})

    def emit(self, kind: str, params: dict, args: dict[str, Arg]) -> None:
        self.plan.calls.append(self.plan.bind(kind, params, args))

    def pool_params(self) -> dict:
        p = self.plan.pool
        return {"num_layers": p.layers, "num_kv_heads": p.kv_heads, "head_dim": p.head_dim,
                "block_size": p.block_size, "kv_dtype": p.dtype}

    def mat(self, name: str, v: SSAValue | None, ld: str | None = None) -> dict[str, Arg]:
        """Matrix argument `name` and its leading dimension (`ld_<name>` unless given)."""
        ld = ld or f"ld_{name}"
        if v is None:
            return {name: Ref("null"), ld: 0}
        a = self.act(v)
        return {name: a.ref, ld: a.ld}


def _f(attr) -> float:
    return float(attr.value.data)


def _i(attr) -> int:
    return int(attr.value.data)


def _element_dtype(t) -> str:
    """The llmirc.dtypes name of an MLIR element type (f32, bf16, f16, i64, f8E4M3FN, ...)."""
    from llmirc.frontend.onnx_dialect import numpy_dtype

    if t == f8E4M3FN:  # no numpy type
        return dtypes.FP8_E4M3.name
    if isinstance(t, BFloat16Type):  # (numpy's would be ml_dtypes', which takes 0.7 s to import)
        return dtypes.BFLOAT16.name
    return dtypes.dtype(numpy_dtype(t)).name


def _ir_dtype(v: SSAValue) -> str:
    return _element_dtype(v.type.element_type)


def quant_scheme(t: L.QuantType) -> quant.Scheme:
    """The llmirc.quant scheme of a `!llmir.quant` element type."""
    return quant.Scheme(t.bits.data, t.group_size.data, _element_dtype(t.scale), t.zero.data, bool(t.act_order.data),
                        t.table, t.super_group.data)


def _part_expr(expr: tuple, part: str) -> tuple:
    """One part of a quantized weight's expression (concatenations concatenate the parts)."""
    if expr[0] == "concat":
        return ("concat", tuple(_part_expr(e, part) for e in expr[1]))
    return (*expr, part)


def _quant_params(scheme: quant.Scheme) -> dict:
    # (absent: the uniform grid, one level of scales; so older bundles read as before)
    table = {"values": list(scheme.values)} if scheme.values is not None else {}
    two_level = {"super_group": scheme.super_group} if scheme.super_group else {}
    return {"bits": scheme.bits, "group_size": scheme.group_size, "scale_dtype": scheme.scale_dtype,
            "zero": scheme.zero, "zero_dtype": scheme.zero_dtype, **table, **two_level}


def _quant_args(w: dict[str, Ref]) -> dict[str, Arg]:
    return {p: w.get(p, Ref("null")) for p in ("codes", "scales", "zeros", "super_scales", "super_mins")}


def _qlinear(p: _Planner, op: L.LinearOp):
    n, k = L.shape_of(op.weight)
    scheme, w = p.quant_weight(op.weight)
    params = {"n": n, "k": k, **_quant_params(scheme), "act_order": scheme.act_order,
              "bias": op.bias is not None, "residual": op.residual is not None}
    # the activations quantized on the fly: a scratch slot free again once the call returns
    scratch = p.alloc_slot("int8", {p.rows_of(op.input): qlinear_scratch_bytes(k, scheme.sub_group)})
    p.release(scratch)
    bias = p.weight(op.bias, "float32") if op.bias is not None else Ref("null")
    return "qlinear", params, {**p.mat("x", op.input), **_quant_args(w), "perm": w.get("perm", Ref("null")),
                               "bias": bias, **p.mat("residual", op.residual, "ld_res"), "xq": Ref("ws", scratch)}


def _linear(p: _Planner, op: L.LinearOp):
    if isinstance(op.weight.type.element_type, L.QuantType):
        return _qlinear(p, op)
    n, k = L.shape_of(op.weight)
    w = p.weight(op.weight)
    params = {"n": n, "k": k, "bias": op.bias is not None, "residual": op.residual is not None,
              "w_dtype": p.plan.weights[w.index].dtype}
    bias = p.weight(op.bias, "float32") if op.bias is not None else Ref("null")
    return "linear", params, {**p.mat("x", op.input), "w": w, "bias": bias, **p.mat("residual", op.residual, "ld_res")}


def _embedding(p: _Planner, op: L.EmbeddingOp):
    params = {"dim": L.shape_of(op.table)[1], "scale": op.factor}
    if isinstance(op.table.type.element_type, L.QuantType):
        scheme, w = p.quant_weight(op.table)
        return "qembedding", {**params, **_quant_params(scheme)}, {**_quant_args(w), "ids": _input(p, op.token_ids)}
    table = p.weight(op.table)
    return "embedding", {**params, "dtype": p.plan.weights[table.index].dtype}, \
        {"table": table, "ids": _input(p, op.token_ids)}


def _paged_attention(p: _Planner, op: L.PagedAttentionOp):
    params = {"num_heads": _i(op.num_heads), "num_kv_heads": _i(op.num_kv_heads), "head_dim": _i(op.head_dim),
              "block_size": p.plan.pool.block_size, "scale": _f(op.scale),
              "sliding_window": _i(op.sliding_window), "kv_dtype": p.plan.pool.dtype,
              "num_layers": p.plan.pool.layers if p.plan.pool.dtype in dtypes.QUANTIZED_KV else 0}
    if op.softcap is not None:
        params["softcap"] = _f(op.softcap)
    return "paged_attention", params, {
        **p.mat("q", op.q), "pool": Ref("pool"), "num_blocks": Dim("num_blocks"), "layer": _i(op.layer),
        "block_tables": Ref("input", "block_tables"), "max_blocks": Dim("max_blocks"),
        "seq_lens": Ref("input", "seq_lens"), "query_start_loc": Ref("input", "query_start_loc"), "B": Dim("B"),
        "positions": Ref("input", "positions")}


def _rope_params(op: L.RopeOp | L.RopeKVAppendOp) -> dict:
    inv_freq = [float(x) for x in op.inv_freq.get_values()]
    return {"num_heads": _i(op.num_heads), "head_dim": _i(op.head_dim), "rotary_dim": 2 * len(inv_freq),
            "style": op.style.data, "inv_freq": inv_freq, "scaling": _f(op.scaling)}


def _rope(p: _Planner, op: L.RopeOp):
    return "rope", _rope_params(op), {**p.mat("x", op.input), "positions": _input(p, op.positions)}


def _input(p: _Planner, v: SSAValue) -> Ref:
    for name, arg in p.inputs.items():
        if arg is v:
            return Ref("input", name)
    raise LlmircError(f"cpu target: expected a forward argument, got {_describe(v.owner)}")


def _norm_weights(p: _Planner, op) -> dict[str, Arg]:
    return {"w": p.weight(op.weight, "float32")}


_RULES = {
    L.EmbeddingOp: _embedding,
    L.RMSNormOp: lambda p, op: ("rms_norm", {"dim": L.shape_of(op.input)[1] // op.heads, "eps": _f(op.eps),
                                             "heads": op.heads},
                                {**p.mat("x", op.input), **_norm_weights(p, op)}),
    L.LayerNormOp: lambda p, op: ("layer_norm", {"dim": L.shape_of(op.input)[1], "eps": _f(op.eps),
                                                 "bias": op.bias is not None},
                                  {**p.mat("x", op.input), **_norm_weights(p, op),
                                   "b": p.weight(op.bias, "float32") if op.bias is not None else Ref("null")}),
    L.LinearOp: _linear,
    L.RopeOp: _rope,
    L.PagedAttentionOp: _paged_attention,
    L.ActMulOp: lambda p, op: ("act_mul", {"dim": L.shape_of(op.gate)[1], "act": op.act.data},
                               {**p.mat("gate", op.gate), **p.mat("up", op.up)}),
    L.ActOp: lambda p, op: ("act", {"dim": L.shape_of(op.input)[1], "act": op.act.data}, p.mat("x", op.input)),
    L.SoftcapOp: lambda p, op: ("softcap", {"dim": L.shape_of(op.input)[1], "cap": _f(op.cap)}, p.mat("x", op.input)),
    L.AddOp: lambda p, op: ("add", {"dim": L.shape_of(op.lhs)[1]}, {**p.mat("a", op.lhs), **p.mat("b", op.rhs)}),
    L.HadamardOp: lambda p, op: ("hadamard", {"dim": L.shape_of(op.input)[1], "block": op.block.value.data},
                                 p.mat("x", op.input)),
    L.GatherRowsOp: lambda p, op: ("gather_rows", {"dim": L.shape_of(op.input)[1]},
                                   {**p.mat("x", op.input), "idx": _input(p, op.indices)}),
}


def _describe(op) -> str:
    return f"'{op.name}'" if isinstance(op, Operation) else "a function argument"


def _weight_expr(v: SSAValue) -> tuple[tuple, str]:
    """The folding expression of a weight value (in its IR dtype) and a readable name for it."""
    op = v.owner
    if isinstance(op, L.WeightOp):
        return ("tensor", op.weight.data, _ir_dtype(v)), op.weight.data
    if isinstance(op, L.ConstantOp):  # a small constant folded by a front end
        from llmirc.frontend.onnx_dialect import constant_value

        value = constant_value(op.value)
        d = _ir_dtype(v)
        tag = "" if d == "float32" else f".{d}"
        return (("value", value.tobytes(), value.shape, d),
                f"constant{tag}.{hashlib.sha256(repr(value.shape).encode() + value.tobytes()).hexdigest()[:8]}")
    if isinstance(op, L.TransposeOp):
        expr, name = _weight_expr(op.input)
        return ("transpose", expr), name + ".T"
    if isinstance(op, L.CastOp):
        expr, name = _weight_expr(op.input)
        return ("cast", expr, _ir_dtype(v)), name
    if isinstance(op, L.ScaleOp):
        expr, name = _weight_expr(op.input)
        return ("scale", expr, _weight_expr(op.scale)[0], op.axis.value.data, bool(op.inverse.value.data)), name
    if isinstance(op, L.OffsetOp):
        expr, name = _weight_expr(op.input)
        return ("offset", expr, op.offset.value.data), name
    if isinstance(op, L.HadamardOp):
        expr, name = _weight_expr(op.input)
        return ("hadamard", expr, op.block.value.data), name
    if isinstance(op, L.QuantizeOp):
        expr, name = _weight_expr(op.input)
        hessian = _weight_expr(op.hessian)[0] if op.hessian is not None else None
        return ("quantize", expr, quant_scheme(v.type.element_type), hessian), name
    if isinstance(op, L.PackedWeightOp):
        name = op.weight.data
        return (("packed", op.format.data, name, quant_scheme(v.type.element_type), L.shape_of(v)[1]),
                name if op.format.data == "learned" else name + ".weight")
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
