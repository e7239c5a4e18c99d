"""Generic CPU kernels: the ONNX ops a full-sequence model leaves unfused, as runtime-shaped loops.

A model whose graph was not fully recognized keeps some `onnx.*` ops (targets/generic_plan.py
lowers them to calls of the kernels below). Their shapes are known at compile time only as
polynomials in T (the sequence length), so every size, stride and offset is read at run time
from a *meta table*: a constant int64 array in the library, three coefficients per entry,
entry = c0 + c1*T + c2*T*T. Static things (op, rank, dtypes) specialize the kernel.
Correctness first: plain loops in the element type, no tiling. Rows are split across the library's
threads when each thread gets enough work (GRAIN element-operations, judged at run time).
Every kernel but matmul is compiled `optsize`: O3 would version each run-time-strided loop
for the vectorizer, at ~45 ms of compile time per kernel, for little gain.

C signature of every kernel:

    void f(const int64_t *meta, int64_t T, void *p0, void *p1, ...)

Tensors are strided views: element (i0, .., ir-1) of operand k is at pk[off_k + sum_d i_d *
stride_k[d]] (element units; strides may be 0 for broadcast dims or negative). dtypes: f32,
f64, i64, i32, i8, u8, bool (one byte, 0/1). Loads and stores are unaligned (align 1).
Meta entries, in order (`[n]` = n entries):

g_map {op, rank r, dtypes [out, in...], attrs, n_extra}   p0 = out, p1.. = inputs
    dims[r], extra[n_extra], then for out and each input: off, strides[r]
    out[i] = op(in_0[i], in_1[i], ...)   (see OPS; `extra` holds runtime scalars such as Trilu's k)
g_reduce {op, rk, rr, din, dout, select_last}           p0 = out, p1 = in
    kept[rk], red[rr], in_off, in_kept[rk], in_red[rr], out_off, out_kept[rk]
    out[kept] = reduction over red of in[kept, red]; floats accumulate in f64, ints in i64.
    ArgMax/ArgMin (rr = 1) write the int64 index.
g_softmax {rk, log, dtype} / g_cumsum {rk, dtype, exclusive, reverse}   p0 = out, p1 = in
    kept[rk], n, in_off, in_kept[rk], in_axis, out_off, out_kept[rk], out_axis
    along one axis of length n (exp by libm; sums in f64; cumsum accumulates in the dtype,
    sequentially, as numpy and onnxruntime do)
g_matmul {rb, dtype}                                      p0 = out, p1 = a, p2 = b
    batch[rb], M, N, K, a_off, a_batch[rb], a_m, a_k, b_off, b_batch[rb], b_k, b_n,
    o_off, o_batch[rb], o_m, o_n
    out[b, m, n] = sum_k a[b, m, k] * b[b, k, n]   (f32 products and sums, k in order)
g_gather {r, k, dtype, itype, mode}       gather: p0 = out, p1 = data, p2 = indices
                                          scatter*: p0 = data (updated in place), p1 = indices, p2 = updates
    dims[r], d_off, d_str[r], i_off, i_str[r], i_comp, axis_str[k], axis_len[k], o_off, o_str[r]
    for each i in dims: addr = d_off + i.d_str + sum_j idx(i, j) * axis_str[j] with
    idx(i, j) = indices[i_off + i.i_str + j*i_comp] (+ axis_len[j] if negative, then clamped to
    the axis so a bad index never reads or writes out of bounds);
    gather: out[o_off + i.o_str] = data[addr]; scatter: data[addr] (op)= updates[o_off + i.o_str],
    sequentially (duplicate indices: the last one wins, as in onnx_ops).
g_contract {rk, rr, dtypes [out, in...]}                  p0 = out, p1.. = inputs (floats)
    kept[rk], red[rr], out_off, out_kept[rk], then per input: off, kept[rk], red[rr] strides
    out[kept] = sum over red of prod_i in_i[kept, red]   (Einsum; the sum in f64)
g_range {dtype, start, delta}                             p0 = out
    n, off:   out[off + i] = start + delta + ... (accumulated in the dtype, as the spec says)
g_affine {dtype, n}                                       p0 = out
    off, v[n]:   out[off + i] = v[i] (an int64 polynomial in T, converted to the dtype)

Every kernel is a no-op for empty tensors.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

from llvmlite import ir

from llmirc import dtypes

from . import irbuilder as irb
from .irbuilder import F32, F64, I1, I32, I64, PTR, for_range

I8 = ir.IntType(8)
# dtype (llmirc.dtypes short name) -> LLVM type; sizes and kinds come from llmirc.dtypes
LLVM_TYPES = {"f32": F32, "f64": F64, "i64": I64, "i32": I32, "i8": I8, "u8": I8, "bool": I8}


def pointer_count(kind: str, params: dict) -> int:
    """How many pointer arguments follow (meta, T)."""
    if kind in ("g_map", "g_contract"):
        return len(params["dtypes"])
    return {"g_reduce": 2, "g_softmax": 2, "g_cumsum": 2, "g_matmul": 3, "g_gather": 3,
            "g_range": 1, "g_affine": 1}[kind]


def emit_generic(module: ir.Module, kind: str, symbol: str, params: dict) -> ir.Function:
    """Adds generic kernel `kind` specialized for `params` as external function `symbol`."""
    if kind not in _EMITTERS:
        raise ValueError(f"unknown generic kernel kind {kind!r}")
    fn, b = irb.define(module, symbol, [("meta", PTR), ("T", I64)] +
                       [(f"p{i}", PTR) for i in range(pointer_count(kind, params))])
    before = set(module.globals)
    _EMITTERS[kind](module, fn, b, params)
    b.ret_void()
    if kind != "g_matmul":
        # Loops over run-time strides: O3's vectorizer versions each one (about 45 ms of compile
        # per kernel) for little gain; optsize keeps the scalar optimizations. Matmul, the heavy
        # one, is vectorized.
        for name in set(module.globals) - before | {symbol}:
            f = module.globals[name]
            if isinstance(f, ir.Function) and f.blocks:
                f.attributes.add("optsize")
    return fn


# --- helpers --------------------------------------------------------------------------------

class _Meta:
    """Reads the meta table's entries in order, each evaluated at T."""

    def __init__(self, b: ir.IRBuilder, fn: ir.Function):
        self.b, self.meta, self.T, self.i = b, fn.args[0], fn.args[1], 0

    def take(self, n: int = 1) -> list[ir.Value]:
        b, out = self.b, []
        for _ in range(n):
            c = [b.load(irb.gep(b, self.meta, 3 * self.i + j, I64), typ=I64) for j in range(3)]
            out.append(b.add(c[0], b.mul(self.T, b.add(c[1], b.mul(self.T, c[2])))))
            self.i += 1
        return out

    def one(self) -> ir.Value:
        return self.take(1)[0]


def _product(b, values) -> ir.Value:
    out = irb.i64(1)
    for v in values:
        out = b.mul(out, v)
    return out


def _dot(b, off, idx, strides) -> ir.Value:
    for i, s in zip(idx, strides):
        off = b.add(off, b.mul(i, s))
    return off


def _unflatten(b, index, dims) -> list[ir.Value]:
    """Row-major multi-index of a flat index (every dim > 0 when called)."""
    out = []
    for d in reversed(dims):
        out.append(b.srem(index, d))
        index = b.sdiv(index, d)
    return out[::-1]


@contextmanager
def _nest(b, dims, name="r"):
    """Nested loops over dims (static count); yields the indices."""
    with ExitStack() as stack:
        yield [stack.enter_context(for_range(b, 0, d, name=f"{name}{i}")) for i, d in enumerate(dims)]


GRAIN = 32768  # element-operations a thread should get at least before a call forks (as in kernels.py)


def _rows(module, b, n_rows, captures, body, work_per_row=None, parallel=True):
    """body(cb, row, values) for row < n_rows; `values` are `captures` as seen inside the body.
    Rows go to several threads only when each gets GRAIN work (`work_per_row`: a run-time i64)."""
    if parallel:
        work = irb.imax(b, work_per_row if work_per_row is not None else irb.i64(1), irb.i64(1))
        min_rows = irb.imax(b, b.sdiv(b.add(irb.i64(GRAIN - 1), work), work), irb.i64(1))
        irb.parallel_for(module, b, n_rows, body, min_items_per_thread=min_rows, captures=captures)
    else:
        with for_range(b, 0, n_rows, name="row") as row:
            body(b, row, list(captures))


def _split(vals, sizes) -> list[list]:
    out, i = [], 0
    for n in sizes:
        out.append(vals[i:i + n])
        i += n
    return out


def _load(b, ptr, index, dt):
    ty = LLVM_TYPES[dt]
    v = b.load(irb.gep(b, ptr, index, ty), typ=ty, align=1)
    return b.icmp_unsigned("!=", v, ir.Constant(I8, 0)) if dt == "bool" else v


def _store(b, v, ptr, index, dt):
    ty = LLVM_TYPES[dt]
    if dt == "bool":
        v = b.zext(v, I8)
    b.store(v, irb.gep(b, ptr, index, ty), align=1)


def _kind(dt):
    return dtypes.dtype(dt).kind


def _fc(ty, v) -> ir.Constant:
    return ir.Constant(ty, float(v))


def _zero(ty) -> ir.Constant:
    return ir.Constant(ty, 0.0 if isinstance(ty, (ir.FloatType, ir.DoubleType)) else 0)


def _libm(b, name, *xs):
    """libm's float (`expf`) or double (`exp`) function, by the type of the argument."""
    ty = xs[0].type
    fn = irb.declare(b.module, name + ("f" if ty == F32 else ""), ty, [ty] * len(xs))
    return b.call(fn, list(xs))


def _intr(b, name, x):
    return irb.intrinsic(b, name, [x])


def _isnan(b, x):
    return b.fcmp_unordered("uno", x, x)


def convert(b, x, src: str, dst: str):
    """numpy's astype from dtype src to dst (x in compute form: bool as i1)."""
    ks, kd = _kind(src), _kind(dst)
    ty = LLVM_TYPES[dst]
    if src == dst:
        return x
    if kd == "b":
        return b.fcmp_unordered("!=", x, _zero(x.type)) if ks == "f" else b.icmp_unsigned("!=", x, _zero(x.type))
    if ks == "b":
        return b.uitofp(x, ty) if kd == "f" else b.zext(x, ty)
    if ks == "f" and kd == "f":
        return b.fpext(x, ty) if dtypes.dtype(dst).itemsize > dtypes.dtype(src).itemsize else b.fptrunc(x, ty)
    if ks == "f":
        return b.fptoui(x, ty) if kd == "u" else b.fptosi(x, ty)
    if kd == "f":
        return b.uitofp(x, ty) if ks == "u" else b.sitofp(x, ty)
    wi, wo = x.type.width, ty.width
    if wo < wi:
        return b.trunc(x, ty)
    if wo > wi:
        return b.zext(x, ty) if ks == "u" else b.sext(x, ty)
    return x


# --- elementwise ops (g_map) -------------------------------------------------------------------

class _Op:
    """What an elementwise op sees: the builder, input values (compute form), their dtypes, the
    output dtype, static attrs, the element's multi-index and the runtime extras."""

    def __init__(self, b, xs, ins, out, attrs, index, extra):
        self.b, self.xs, self.ins, self.out, self.attrs, self.index, self.extra = (
            b, xs, ins, out, attrs, index, extra)

    @property
    def float(self) -> bool:
        return _kind(self.ins[0]) == "f"

    @property
    def signed(self) -> bool:
        return _kind(self.ins[0]) in "if"

    def c(self, v):
        """A constant of the first input's type."""
        ty = self.xs[0].type
        return _fc(ty, v) if self.float else ir.Constant(ty, int(v))

    def lt(self, x, y):
        b = self.b
        return b.fcmp_ordered("<", x, y) if self.float else (
            b.icmp_signed if self.signed else b.icmp_unsigned)("<", x, y)

    def gt(self, x, y):
        return self.lt(y, x)


def _unary_float(name):
    return lambda o: _libm(o.b, name, o.xs[0])


def _sigmoid(o):
    b, x = o.b, o.xs[0]
    e = _libm(b, "exp", b.fneg(_intr(b, "llvm.fabs", x)))
    one = o.c(1)
    return b.select(b.fcmp_ordered(">=", x, o.c(0)), b.fdiv(one, b.fadd(one, e)), b.fdiv(e, b.fadd(one, e)))


def _clamp01(o, v):
    b = o.b
    v = b.select(o.lt(v, o.c(0)), o.c(0), v)
    return b.select(o.gt(v, o.c(1)), o.c(1), v)


def _gelu(o):
    b, x = o.b, o.xs[0]
    x64 = b.fpext(x, F64) if x.type == F32 else x
    if o.attrs.get("approximate", "none") == "tanh":
        inner = b.fmul(_fc(F64, math.sqrt(2 / math.pi)),
                       b.fadd(x64, b.fmul(_fc(F64, 0.044715), b.fmul(x64, b.fmul(x64, x64)))))
        t = _libm(b, "tanh", inner)
    else:
        t = _libm(b, "erf", b.fmul(x64, _fc(F64, 1 / math.sqrt(2))))
    y = b.fmul(b.fmul(_fc(F64, 0.5), x64), b.fadd(_fc(F64, 1.0), t))
    return b.fptrunc(y, F32) if x.type == F32 else y


def _abs(o):
    b, x = o.b, o.xs[0]
    if o.float:
        return _intr(b, "llvm.fabs", x)
    return b.select(o.lt(x, o.c(0)), b.neg(x), x) if o.signed else x


def _sign(o):
    b, x = o.b, o.xs[0]
    if o.float:
        return b.select(o.gt(x, o.c(0)), o.c(1), b.select(o.lt(x, o.c(0)), o.c(-1), x))
    neg = b.select(o.lt(x, o.c(0)), o.c(-1), o.c(0)) if o.signed else o.c(0)
    return b.select(o.gt(x, o.c(0)), o.c(1), neg)


def _max_min(greater: bool):
    def f(o):
        b, (x, y) = o.b, o.xs[:2]
        pick = o.gt(x, y) if greater else o.lt(x, y)
        m = b.select(pick, x, y)
        return b.select(_isnan(b, x), x, m) if o.float else m  # numpy: NaN wins
    return f


def _div(o):
    b, (x, y) = o.b, o.xs
    if o.float:
        return b.fdiv(x, y)
    zero = b.icmp_unsigned("==", y, o.c(0))
    safe = b.select(zero, o.c(1), y)  # integer division by zero has no ONNX value: 0, not a trap
    q = b.sdiv(x, safe) if o.signed else b.udiv(x, safe)
    return b.select(zero, o.c(0), q)


def _mod(o):
    b, (x, y) = o.b, o.xs
    if o.float:
        return b.frem(x, y)  # fmod: the sign of the dividend
    zero = b.icmp_unsigned("==", y, o.c(0))
    safe = b.select(zero, o.c(1), y)
    if not o.signed:
        return b.select(zero, o.c(0), b.urem(x, safe))
    r = b.srem(x, safe)
    if not o.attrs.get("fmod", 0):  # Python's mod: the sign of the divisor
        fix = b.and_(b.icmp_signed("!=", r, o.c(0)), b.icmp_signed("<", b.xor(r, safe), o.c(0)))
        r = b.select(fix, b.add(r, safe), r)
    return b.select(zero, o.c(0), r)


def _pow(o):
    b, (x, y) = o.b, o.xs
    if o.float:
        return _libm(b, "pow", x, convert(b, y, o.ins[1], o.ins[0]))
    xf, yf = convert(b, x, o.ins[0], "f64"), convert(b, y, o.ins[1], "f64")
    return convert(b, _libm(b, "pow", xf, yf), "f64", o.ins[0])


def _compare(pred):
    def f(o):
        b, (x, y) = o.b, o.xs
        if o.float:
            return b.fcmp_ordered(pred, x, y)
        return (b.icmp_signed if o.signed else b.icmp_unsigned)(pred, x, y)
    return f


def _clip(o):
    b, x = o.b, o.xs[0]
    rest = iter(o.xs[1:])
    for bound, pick in (("min", o.lt), ("max", o.gt)):
        if o.attrs.get(f"has_{bound}"):
            v = next(rest)
            x = b.select(pick(x, v), v, x)
    return x


def _trilu(o):
    b, x = o.b, o.xs[0]
    i, j = o.index[-2], o.index[-1]
    diff = b.sub(j, i)
    keep = b.icmp_signed(">=" if o.attrs["upper"] else "<=", diff, o.extra[0])
    return b.select(keep, x, _zero(x.type) if _kind(o.ins[0]) != "b" else ir.Constant(I1, 0))


def _fill(o):
    ty = LLVM_TYPES[o.out]
    v = o.attrs["value"]
    if _kind(o.out) == "b":
        return ir.Constant(I1, int(bool(v)))
    return _fc(ty, v) if _kind(o.out) == "f" else ir.Constant(ty, int(v))


def _float_attr(o, key, default):
    return o.c(o.attrs.get(key, default))


def _bitshift(o):
    b, (x, y) = o.b, o.xs
    if o.attrs["direction"] == "LEFT":
        return b.shl(x, y)
    return b.ashr(x, y) if _kind(o.ins[0]) == "i" else b.lshr(x, y)


def _softplus(o):  # numpy's logaddexp(0, x) = max(x, 0) + log1p(exp(-|x|))
    b, x = o.b, o.xs[0]
    t = _libm(b, "log1p", _libm(b, "exp", b.fneg(_intr(b, "llvm.fabs", x))))
    return b.fadd(b.select(o.gt(x, o.c(0)), x, o.c(0)), t)


OPS = {
    "Identity": lambda o: o.xs[0],
    "Cast": lambda o: convert(o.b, o.xs[0], o.ins[0], o.out),
    "Fill": _fill,
    "Abs": _abs, "Sign": _sign,
    "Neg": lambda o: o.b.fneg(o.xs[0]) if o.float else o.b.neg(o.xs[0]),
    "Sqrt": lambda o: _intr(o.b, "llvm.sqrt", o.xs[0]),
    "Reciprocal": lambda o: o.b.fdiv(o.c(1), o.xs[0]),
    "Floor": lambda o: _intr(o.b, "llvm.floor", o.xs[0]),
    "Ceil": lambda o: _intr(o.b, "llvm.ceil", o.xs[0]),
    "Round": lambda o: _intr(o.b, "llvm.roundeven", o.xs[0]),
    "Sigmoid": _sigmoid,
    "Relu": lambda o: o.b.select(o.lt(o.xs[0], o.c(0)), o.c(0), o.xs[0]),
    "Softplus": _softplus,
    "Softsign": lambda o: o.b.fdiv(o.xs[0], o.b.fadd(o.c(1), _intr(o.b, "llvm.fabs", o.xs[0]))),
    "HardSigmoid": lambda o: _clamp01(o, o.b.fadd(o.b.fmul(_float_attr(o, "alpha", 0.2), o.xs[0]),
                                                  _float_attr(o, "beta", 0.5))),
    "HardSwish": lambda o: o.b.fmul(o.xs[0], _clamp01(o, o.b.fadd(o.b.fmul(o.c(1 / 6), o.xs[0]), o.c(0.5)))),
    "LeakyRelu": lambda o: o.b.select(o.lt(o.xs[0], o.c(0)), o.b.fmul(o.xs[0], _float_attr(o, "alpha", 0.01)),
                                      o.xs[0]),
    "Elu": lambda o: o.b.select(o.lt(o.xs[0], o.c(0)),
                                o.b.fmul(_float_attr(o, "alpha", 1.0), _libm(o.b, "expm1", o.xs[0])), o.xs[0]),
    "Selu": lambda o: o.b.fmul(_float_attr(o, "gamma", 1.05070102214813232421875), o.b.select(
        o.gt(o.xs[0], o.c(0)), o.xs[0],
        o.b.fmul(_float_attr(o, "alpha", 1.67326319217681884765625), _libm(o.b, "expm1", o.xs[0])))),
    "Gelu": _gelu,
    "IsNaN": lambda o: _isnan(o.b, o.xs[0]),
    "IsInf": lambda o: o.b.or_(
        o.b.and_(o.b.fcmp_ordered("==", o.xs[0], o.c(math.inf)), ir.Constant(I1, int(bool(o.attrs.get(
            "detect_positive", 1))))),
        o.b.and_(o.b.fcmp_ordered("==", o.xs[0], o.c(-math.inf)), ir.Constant(I1, int(bool(o.attrs.get(
            "detect_negative", 1)))))),
    "Not": lambda o: o.b.xor(o.xs[0], ir.Constant(I1, 1)),
    "BitwiseNot": lambda o: o.b.not_(o.xs[0]),
    "Add": lambda o: (o.b.fadd if o.float else o.b.add)(*o.xs),
    "Sub": lambda o: (o.b.fsub if o.float else o.b.sub)(*o.xs),
    "Mul": lambda o: (o.b.fmul if o.float else o.b.mul)(*o.xs),
    "Div": _div, "Mod": _mod, "Pow": _pow,
    "BitwiseAnd": lambda o: o.b.and_(*o.xs), "BitwiseOr": lambda o: o.b.or_(*o.xs),
    "BitwiseXor": lambda o: o.b.xor(*o.xs), "BitShift": _bitshift,
    "And": lambda o: o.b.and_(*o.xs), "Or": lambda o: o.b.or_(*o.xs), "Xor": lambda o: o.b.xor(*o.xs),
    "PRelu": lambda o: o.b.select(o.lt(o.xs[0], o.c(0)), o.b.fmul(*o.xs), o.xs[0]),
    "Equal": _compare("=="), "Less": _compare("<"), "LessOrEqual": _compare("<="), "Greater": _compare(">"),
    "GreaterOrEqual": _compare(">="),
    "Max": _max_min(True), "Min": _max_min(False),
    "Where": lambda o: o.b.select(*o.xs),
    "Clip": _clip,
    "Trilu": _trilu,
    # Pieces of decomposed ops (targets/generic_plan.py): Mean, Gemm, LayerNormalization.
    "DivN": lambda o: o.b.fdiv(o.xs[0], o.c(o.attrs["n"])),
    "Scale": lambda o: o.b.fmul(o.c(o.attrs["alpha"]), o.xs[0]),
    "GemmEpilogue": lambda o: o.b.fadd(o.b.fmul(o.c(o.attrs["alpha"]), o.xs[0]),
                                       o.b.fmul(o.c(o.attrs["beta"]), o.xs[1])),
    "RsqrtEps": lambda o: o.b.fdiv(o.c(1), _intr(o.b, "llvm.sqrt", o.b.fadd(o.xs[0], o.c(o.attrs["eps"])))),
    "LnOut": lambda o: (o.b.fadd(o.b.fmul(o.b.fmul(o.xs[0], o.xs[1]), o.xs[2]), o.xs[3]) if len(o.xs) == 4
                        else o.b.fmul(o.b.fmul(o.xs[0], o.xs[1]), o.xs[2])),
}
for _name in ("Exp", "Log", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Tanh", "Asinh",
              "Acosh", "Atanh", "Erf"):
    OPS[_name] = _unary_float(_name.lower())


def _emit_map(module, fn, b, p):
    r, dts = p["rank"], p["dtypes"]
    op = OPS[p["op"]]
    m = _Meta(b, fn)
    dims, extra = m.take(r), m.take(p.get("n_extra", 0))
    operands = [m.take(1 + r) for _ in dts]  # off, strides
    ptrs = list(fn.args[2:])
    caps = ptrs + dims + extra + [v for o in operands for v in o]

    def body(cb, row, vals):
        ps, ds, ex, flat = vals[:len(ptrs)], vals[len(ptrs):len(ptrs) + r], \
            vals[len(ptrs) + r:len(ptrs) + r + len(extra)], vals[len(ptrs) + r + len(extra):]
        ops = _split(flat, [1 + r] * len(dts))
        idx = _unflatten(cb, row, ds[:-1])
        bases = [_dot(cb, o[0], idx, o[1:r]) for o in ops]
        with for_range(cb, 0, ds[-1], name="j") as j:
            xs = [_load(cb, ps[k], cb.add(bases[k], cb.mul(j, ops[k][r])), dts[k]) for k in range(1, len(dts))]
            y = op(_Op(cb, xs, dts[1:] or [dts[0]], dts[0], p.get("attrs", {}), idx + [j], ex))
            _store(cb, y, ps[0], cb.add(bases[0], cb.mul(j, ops[0][r])), dts[0])
    _rows(module, b, _product(b, dims[:-1]), caps, body, b.mul(dims[-1], irb.i64(len(dts))))


# --- reductions ----------------------------------------------------------------------------------

_FLOAT_ONLY = {"ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "MeanSquare"}


def _emit_reduce(module, fn, b, p):
    op, rk, rr, din, dout = p["op"], p["rk"], p["rr"], p["din"], p["dout"]
    is_float = _kind(din) == "f"
    if op in _FLOAT_ONLY and not is_float:
        raise ValueError(f"{op} of {din} is not supported")
    acc_t = F64 if is_float else I64
    m = _Meta(b, fn)
    kept, red = m.take(rk), m.take(rr)
    in_off, in_kept, in_red = m.one(), m.take(rk), m.take(rr)
    out_off, out_kept = m.one(), m.take(rk)
    ptrs = list(fn.args[2:])
    caps = ptrs + kept + red + [in_off] + in_kept + in_red + [out_off] + out_kept

    def body(cb, row, vals):
        (out, x), ks, rs, (ioff,), iks, irs, (ooff,), oks = _split(vals, [2, rk, rr, 1, rk, rr, 1, rk])
        idx = _unflatten(cb, row, ks)
        base = _dot(cb, ioff, idx, iks)
        dst = _dot(cb, ooff, idx, oks)

        def each(f):
            with _nest(cb, rs) as ri:
                f(convert(cb, _load(cb, x, _dot(cb, base, ri, irs), din), din, "f64" if is_float else "i64"))

        if op in ("ArgMax", "ArgMin"):
            y = _arg_reduce(cb, x, base, rs[0], irs[0], din, op == "ArgMax", p.get("select_last", 0))
            _store(cb, y, out, dst, dout)
            return
        count = _product(cb, rs)
        acc = irb.var(cb, acc_t, _reduce_init(op, acc_t))
        if op == "ReduceLogSumExp":
            each(lambda v: cb.store(_fmax_nan(cb, cb.load(acc), v), acc))
            mx = cb.load(acc)
            finite = cb.fcmp_ordered("<", _intr(cb, "llvm.fabs", mx), _fc(F64, math.inf))
            mx = cb.select(finite, mx, _fc(F64, 0.0))
            cb.store(_fc(F64, 0.0), acc)
            each(lambda v: cb.store(cb.fadd(cb.load(acc), _libm(cb, "exp", cb.fsub(v, mx))), acc))
            y = cb.fadd(_libm(cb, "log", cb.load(acc)), mx)
        else:
            each(lambda v: cb.store(_reduce_step(cb, op, cb.load(acc), v, is_float), acc))
            y = _reduce_final(cb, op, cb.load(acc), count, is_float)
        _store(cb, convert(cb, y, "f64" if is_float else "i64", dout), out, dst, dout)
    _rows(module, b, _product(b, kept), caps, body, _product(b, red))


def _reduce_init(op, ty):
    if op in ("ReduceMax", "ReduceLogSumExp"):
        return _fc(ty, -math.inf) if ty == F64 else ir.Constant(ty, -2**63)
    if op == "ReduceMin":
        return _fc(ty, math.inf) if ty == F64 else ir.Constant(ty, 2**63 - 1)
    one = op == "ReduceProd"
    return _fc(ty, float(one)) if ty == F64 else ir.Constant(ty, int(one))


def _fmax_nan(b, acc, v, greater=True):
    pick = b.fcmp_ordered(">" if greater else "<", v, acc)
    return b.select(_isnan(b, v), v, b.select(pick, v, acc))


def _reduce_step(b, op, acc, v, is_float):
    add, mul = (b.fadd, b.fmul) if is_float else (b.add, b.mul)
    if op in ("ReduceMax", "ReduceMin"):
        if is_float:
            return _fmax_nan(b, acc, v, op == "ReduceMax")
        return b.select(b.icmp_signed(">" if op == "ReduceMax" else "<", v, acc), v, acc)
    if op == "ReduceProd":
        return mul(acc, v)
    if op == "ReduceL1":
        return add(acc, _intr(b, "llvm.fabs", v) if is_float else b.select(b.icmp_signed("<", v, irb.i64(0)),
                                                                               b.neg(v), v))
    if op in ("ReduceL2", "ReduceSumSquare", "MeanSquare"):
        return add(acc, mul(v, v))
    return add(acc, v)  # ReduceSum, ReduceMean, ReduceLogSum


def _reduce_final(b, op, acc, count, is_float):
    if op in ("ReduceMean", "MeanSquare"):
        if is_float:
            return b.fdiv(acc, b.sitofp(count, F64))
        return b.sdiv(acc, b.select(b.icmp_signed("==", count, irb.i64(0)), irb.i64(1), count))
    if op == "ReduceL2":
        return _intr(b, "llvm.sqrt", acc)
    if op == "ReduceLogSum":
        return _libm(b, "log", acc)
    return acc


def _arg_reduce(b, x, base, n, stride, dt, greater, select_last):
    """Index of the first (or last) largest / smallest element along one axis."""
    best = irb.var(b, LLVM_TYPES[dt], _load_raw(b, x, base, dt))
    best_i = irb.var(b, I64, irb.i64(0))
    with for_range(b, 1, n, name="a") as j:
        v = _load_raw(b, x, b.add(base, b.mul(j, stride)), dt)
        cur = b.load(best)
        if _kind(dt) == "f":
            pred = (">=" if select_last else ">") if greater else ("<=" if select_last else "<")
            better = b.fcmp_ordered(pred, v, cur)
        else:
            pred = (">=" if select_last else ">") if greater else ("<=" if select_last else "<")
            better = (b.icmp_signed if _kind(dt) == "i" else b.icmp_unsigned)(pred, v, cur)
        b.store(b.select(better, v, cur), best)
        b.store(b.select(better, j, b.load(best_i)), best_i)
    return b.load(best_i)


def _load_raw(b, ptr, index, dt):
    ty = LLVM_TYPES[dt]
    return b.load(irb.gep(b, ptr, index, ty), typ=ty, align=1)


def _emit_contract(module, fn, b, p):
    rk, rr, dts = p["rk"], p["rr"], p["dtypes"]
    if any(_kind(d) != "f" for d in dts):
        raise ValueError(f"Einsum of {dts} is not supported (floats only)")
    m = _Meta(b, fn)
    kept, red = m.take(rk), m.take(rr)
    out = m.take(1 + rk)
    ins = [m.take(1 + rk + rr) for _ in dts[1:]]
    ptrs = list(fn.args[2:])
    caps = ptrs + kept + red + out + [v for t in ins for v in t]

    def body(cb, row, vals):
        ps, ks, rs, vo, flat = _split(vals, [len(ptrs), rk, rr, 1 + rk, len(ins) * (1 + rk + rr)])
        idx = _unflatten(cb, row, ks)
        views = _split(flat, [1 + rk + rr] * len(ins))
        bases = [_dot(cb, v[0], idx, v[1:1 + rk]) for v in views]
        acc = irb.var(cb, F64, _fc(F64, 0.0))
        with _nest(cb, rs) as ri:
            prod = _fc(F64, 1.0)
            for k, (v, base) in enumerate(zip(views, bases)):
                x = _load(cb, ps[1 + k], _dot(cb, base, ri, v[1 + rk:]), dts[1 + k])
                prod = cb.fmul(prod, convert(cb, x, dts[1 + k], "f64"))
            cb.store(cb.fadd(cb.load(acc), prod), acc)
        _store(cb, convert(cb, cb.load(acc), "f64", dts[0]), ps[0], _dot(cb, vo[0], idx, vo[1:]), dts[0])
    _rows(module, b, _product(b, kept), caps, body, b.mul(_product(b, red), irb.i64(len(ins))))


# --- along one axis: softmax, cumsum ------------------------------------------------------------

def _axis_meta(b, fn, rk):
    m = _Meta(b, fn)
    kept, n = m.take(rk), m.one()
    in_off, in_kept, in_ax = m.one(), m.take(rk), m.one()
    out_off, out_kept, out_ax = m.one(), m.take(rk), m.one()
    ptrs = list(fn.args[2:])
    return kept, ptrs + kept + [n, in_off] + in_kept + [in_ax, out_off] + out_kept + [out_ax]


def _axis_row(cb, row, vals, rk):
    (out, x), ks, (n, ioff), iks, (iax, ooff), oks, (oax,) = _split(vals, [2, rk, 2, rk, 2, rk, 1])
    idx = _unflatten(cb, row, ks)
    return out, x, n, _dot(cb, ioff, idx, iks), iax, _dot(cb, ooff, idx, oks), oax


def _emit_softmax(module, fn, b, p):
    rk, dt, log = p["rk"], p["dtype"], p["log"]
    ty = LLVM_TYPES[dt]
    kept, caps = _axis_meta(b, fn, rk)

    def body(cb, row, vals):
        out, x, n, ib, iax, ob, oax = _axis_row(cb, row, vals, rk)

        def at(base, stride, j):
            return cb.add(base, cb.mul(j, stride))
        mx = irb.var(cb, ty, _fc(ty, -math.inf))
        with for_range(cb, 0, n, name="m") as j:
            cb.store(_fmax_nan(cb, cb.load(mx), _load(cb, x, at(ib, iax, j), dt)), mx)
        m = cb.load(mx)
        total = irb.var(cb, F64, _fc(F64, 0.0))
        with for_range(cb, 0, n, name="e") as j:
            s = cb.fsub(_load(cb, x, at(ib, iax, j), dt), m)
            e = _libm(cb, "exp", s)
            cb.store(cb.fadd(cb.load(total), convert(cb, e, dt, "f64")), total)
            _store(cb, s if log else e, out, at(ob, oax, j), dt)
        tot = cb.load(total)
        with for_range(cb, 0, n, name="w") as j:
            v = _load(cb, out, at(ob, oax, j), dt)
            y = cb.fsub(v, convert(cb, _libm(cb, "log", tot), "f64", dt)) if log else \
                cb.fdiv(v, convert(cb, tot, "f64", dt))
            _store(cb, y, out, at(ob, oax, j), dt)
    _rows(module, b, _product(b, kept), caps, body, b.mul(caps[2 + rk], irb.i64(8)))  # n, exp dominates


def _emit_cumsum(module, fn, b, p):
    rk, dt = p["rk"], p["dtype"]
    is_float = _kind(dt) == "f"
    kept, caps = _axis_meta(b, fn, rk)

    def body(cb, row, vals):
        out, x, n, ib, iax, ob, oax = _axis_row(cb, row, vals, rk)
        acc = irb.var(cb, LLVM_TYPES[dt], _zero(LLVM_TYPES[dt]))
        with for_range(cb, 0, n, name="c") as j:
            jj = cb.sub(cb.sub(n, irb.i64(1)), j) if p["reverse"] else j
            v = _load(cb, x, cb.add(ib, cb.mul(jj, iax)), dt)
            dst = cb.add(ob, cb.mul(jj, oax))
            if p["exclusive"]:
                _store(cb, cb.load(acc), out, dst, dt)
            cb.store((cb.fadd if is_float else cb.add)(cb.load(acc), v), acc)
            if not p["exclusive"]:
                _store(cb, cb.load(acc), out, dst, dt)
    _rows(module, b, _product(b, kept), caps, body, caps[2 + rk])


# --- matmul -----------------------------------------------------------------------------------------

def _emit_matmul(module, fn, b, p):
    rb, dt = p["rb"], p["dtype"]
    if _kind(dt) != "f":
        raise ValueError(f"MatMul of {dt} is not supported")
    m = _Meta(b, fn)
    batch, (M, N, K) = m.take(rb), m.take(3)
    a = m.take(1 + rb + 2)
    bb = m.take(1 + rb + 2)
    o = m.take(1 + rb + 2)
    caps = list(fn.args[2:]) + batch + [M, N, K] + a + bb + o

    def body(cb, row, vals):
        (out, pa, pb), bs, (M, N, K), va, vb, vo = _split(vals, [3, rb, 3, 3 + rb, 3 + rb, 3 + rb])
        idx = _unflatten(cb, row, bs + [M])
        bi, mi = idx[:-1], idx[-1]
        abase = cb.add(_dot(cb, va[0], bi, va[1:1 + rb]), cb.mul(mi, va[1 + rb]))
        bbase = _dot(cb, vb[0], bi, vb[1:1 + rb])
        obase = cb.add(_dot(cb, vo[0], bi, vo[1:1 + rb]), cb.mul(mi, vo[1 + rb]))
        on = vo[2 + rb]
        ty = LLVM_TYPES[dt]
        with for_range(cb, 0, N, name="z") as n:
            _store(cb, _fc(ty, 0.0), out, cb.add(obase, cb.mul(n, on)), dt)
        with for_range(cb, 0, K, name="k") as k:
            av = _load(cb, pa, cb.add(abase, cb.mul(k, va[2 + rb])), dt)
            brow = cb.add(bbase, cb.mul(k, vb[1 + rb]))
            with for_range(cb, 0, N, name="n") as n:
                dst = cb.add(obase, cb.mul(n, on))
                prod = cb.fmul(av, _load(cb, pb, cb.add(brow, cb.mul(n, vb[2 + rb])), dt))
                _store(cb, cb.fadd(_load(cb, out, dst, dt), prod), out, dst, dt)
    _rows(module, b, _product(b, batch + [M]), caps, body, b.mul(N, K))


# --- gather / scatter ---------------------------------------------------------------------------------

_SCATTER = {"scatter": None, "scatter_add": "Add", "scatter_mul": "Mul", "scatter_max": "Max",
            "scatter_min": "Min"}


def _emit_gather(module, fn, b, p):
    r, k, dt, it, mode = p["r"], p["k"], p["dtype"], p["itype"], p["mode"]
    m = _Meta(b, fn)
    dims = m.take(r)
    d = m.take(1 + r)
    i = m.take(1 + r + 1)
    ax = m.take(2 * k)
    o = m.take(1 + r)
    caps = list(fn.args[2:]) + dims + d + i + ax + o
    scatter = mode != "gather"
    if scatter and mode not in _SCATTER:
        raise ValueError(f"unknown gather mode {mode!r}")

    def body(cb, row, vals):
        ps, ds, vd, vi, vax, vo = _split(vals, [3, r, 1 + r, 2 + r, 2 * k, 1 + r])
        idx = _unflatten(cb, row, ds[:-1])
        dbase, ibase, obase = (_dot(cb, v[0], idx, v[1:r]) for v in (vd, vi, vo))
        with for_range(cb, 0, ds[-1], name="j") as j:
            addr = cb.add(dbase, cb.mul(j, vd[r]))
            ib = cb.add(ibase, cb.mul(j, vi[r]))
            for c in range(k):
                v = convert(cb, _load(cb, ps[1] if scatter else ps[2], cb.add(ib, cb.mul(irb.i64(c), vi[r + 1])),
                                      it), it, "i64")
                n = vax[k + c]
                v = cb.select(cb.icmp_signed("<", v, irb.i64(0)), cb.add(v, n), v)
                v = irb.imax(cb, irb.imin(cb, v, cb.sub(n, irb.i64(1))), irb.i64(0))
                addr = cb.add(addr, cb.mul(v, vax[c]))
            other = cb.add(obase, cb.mul(j, vo[r]))
            if not scatter:
                _store(cb, _load(cb, ps[1], addr, dt), ps[0], other, dt)
            else:
                u = _load(cb, ps[2], other, dt)
                if _SCATTER[mode]:
                    u = OPS[_SCATTER[mode]](_Op(cb, [_load(cb, ps[0], addr, dt), u], [dt, dt], dt, {}, [], []))
                _store(cb, u, ps[0], addr, dt)
    _rows(module, b, _product(b, dims[:-1]), caps, body, dims[-1], parallel=not scatter)


# --- sources: range, affine values ---------------------------------------------------------------------

def _emit_range(module, fn, b, p):
    dt = p["dtype"]
    ty = LLVM_TYPES[dt]
    is_float = _kind(dt) == "f"
    m = _Meta(b, fn)
    n, off = m.take(2)
    c = (lambda v: _fc(ty, v)) if is_float else (lambda v: ir.Constant(ty, int(v)))
    cur = irb.var(b, ty, c(p["start"]))
    with for_range(b, 0, n) as i:
        _store(b, b.load(cur), fn.args[2], b.add(off, i), dt)
        b.store((b.fadd if is_float else b.add)(b.load(cur), c(p["delta"])), cur)


def _emit_affine(module, fn, b, p):
    m = _Meta(b, fn)
    off = m.one()
    for i, v in enumerate(m.take(p["n"])):
        _store(b, convert(b, v, "i64", p["dtype"]), fn.args[2], b.add(off, irb.i64(i)), p["dtype"])


_EMITTERS = {"g_map": _emit_map, "g_reduce": _emit_reduce, "g_softmax": _emit_softmax, "g_cumsum": _emit_cumsum,
             "g_matmul": _emit_matmul, "g_gather": _emit_gather, "g_range": _emit_range, "g_affine": _emit_affine,
             "g_contract": _emit_contract}
