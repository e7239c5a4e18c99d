"""Generic lowering rules: one per ONNX op type a full-sequence model may keep.

Each rule reads its run-time operands as strided views (`g.ins`), its compile-time operands
and attributes through onnx_ops' own helpers (so the semantics are the reference's), and emits
generic kernel calls (targets/cpu/generic.py) through `g.map` / `g.emit`. Layout ops are views
wherever they can be. The tensor-level helpers (`gather`, `scatter`, `matmul`, `reduce_call`,
`axis_call`) take views only, so the kernel tests drive them directly.
"""

from __future__ import annotations

import math

import numpy as np

from llmirc.errors import LlmircError
from llmirc.frontend import onnx_ops
from llmirc.frontend.onnx_dialect import OnnxOp

from .generic_plan import (MAX_RANK, ONE, ZERO, GenericLowering, Tensor, const, fail, is_const, json_safe, padd,
                           pmul, pprod, psub, row_major)

ELEMENTWISE = {
    "Abs", "Neg", "Sign", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh",
    "Cosh", "Tanh", "Asinh", "Acosh", "Atanh", "Erf", "Floor", "Ceil", "Round", "Sigmoid", "Relu", "Softplus",
    "Softsign", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Gelu", "IsNaN", "IsInf", "Not",
    "BitwiseNot", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    "And", "Or", "Xor", "PRelu", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "Clip"}
FLOAT_ONLY = {"Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
              "Tanh", "Asinh", "Acosh", "Atanh", "Erf", "Floor", "Ceil", "Round", "Sigmoid", "Softplus",
              "Softsign", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Gelu", "IsNaN", "IsInf",
              "PRelu"}
ATTRS = ("alpha", "beta", "gamma", "fmod", "direction", "approximate", "detect_positive", "detect_negative")


def _elementwise(g: GenericLowering, op: OnnxOp) -> None:
    ins = g.ins(op)
    if op.op_type in FLOAT_ONLY and ins[0].dtype not in ("f32", "f64"):
        raise fail(op, f"{ins[0].dtype} inputs are not supported")
    attrs = {k: v for k, v in op.py_attrs().items() if k in ATTRS}
    if op.op_type == "Clip":
        attrs.update(has_min=ins[1] is not None if len(ins) > 1 else False,
                     has_max=ins[2] is not None if len(ins) > 2 else False)
    out = g.out(op)
    g.map(op.op_type, out, [t for t in ins if t is not None], attrs)
    g.result(op, out)


def _variadic(g: GenericLowering, op: OnnxOp) -> None:
    ins = [t for t in g.ins(op) if t is not None]
    kind = {"Sum": "Add", "Mean": "Add", "Max": "Max", "Min": "Min"}[op.op_type]
    out = g.out(op)
    if len(ins) == 1:
        g.map("Identity", out, ins)
    else:
        g.map(kind, out, ins[:2])
        for t in ins[2:]:
            g.map(kind, out, [out, t])
    if op.op_type == "Mean":
        g.map("DivN", out, [out], {"n": float(len(ins))})
    g.result(op, out)


def _view_of_input(g: GenericLowering, op: OnnxOp) -> None:
    """Identity, Dropout (inference), a Cast to the same type: the input itself."""
    (x, *_) = g.ins(op)
    if op.op_type in ("Cast", "CastLike") and g._dtype(op.results[0], op) != x.dtype:
        out = g.out(op)
        g.map("Cast", out, [x])
        g.result(op, out)
    else:
        g.result(op, x)
    if op.op_type == "Dropout" and len(op.results) > 1 and op.results[1].uses:
        mask = g.out(op, 1)
        g.map("Fill", mask, [], {"value": 1})
        g.result(op, mask, 1)


def _reshape(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    if not x.contiguous():
        x = g.copy(x)
    shape = g.shape(op.results[0])
    if pprod(shape) != x.numel:
        raise fail(op, f"element counts differ: {x.shape} -> {shape}")
    g.result(op, x.view(shape, row_major(shape)))


def _squeeze_unsqueeze(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    shape = g.shape(op.results[0])
    axes = g.node(op, 0).ints(1, "axes", "axes")
    if op.op_type == "Squeeze":  # no axes: every dim of size 1 (a dim that is 1 only at some T changes rank)
        axes = {a % len(x.shape) for a in axes} if axes else {i for i, n in enumerate(x.shape) if n == ONE}
        keep = [i for i in range(len(x.shape)) if i not in axes]
        g.result(op, x.view([x.shape[i] for i in keep], [x.strides[i] for i in keep]))
        return
    axes = {a % len(shape) for a in axes}
    strides = iter(x.strides)
    g.result(op, x.view(shape, [ZERO if i in axes else next(strides) for i in range(len(shape))]))


def _transpose(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    perm = onnx_ops._perm(g.node(op, 0), len(x.shape))
    g.result(op, x.view([x.shape[p] for p in perm], [x.strides[p] for p in perm]))


def _expand(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    shape = g.shape(op.results[0])
    g.result(op, x.view(shape, g.strides_for(x, shape)))


def _slice(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    starts, steps = [], []
    for k, S in enumerate(g.lengths):
        sls = onnx_ops._slices(g.node(op, k), g.oracle.shape(op.operands[0], S))
        n = g.oracle.shape(op.operands[0], S)
        idx = [sl.indices(d) for sl, d in zip(sls, n)]
        starts.append([i[0] for i in idx])
        steps.append([i[2] for i in idx])
    if any(s != steps[0] for s in steps):
        raise fail(op, "its steps depend on the sequence length")
    begin = g.fit_ints(op, starts, "starts")
    shape = g.shape(op.results[0])
    offset = padd(x.offset, *[pmul(b, s) for b, s in zip(begin, x.strides)])
    g.result(op, x.view(shape, [pmul(s, const(st)) for s, st in zip(x.strides, steps[0])], offset))


def _split(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    axis = g.node(op, 0).axis(op.py_attrs().get("axis", 0), len(x.shape))
    at = ZERO
    for i, r in enumerate(op.results):
        shape = g.shape(r)
        g.result(op, x.view(shape, x.strides, padd(x.offset, pmul(at, x.strides[axis]))), i)
        at = padd(at, shape[axis])


def _concat(g: GenericLowering, op: OnnxOp) -> None:
    parts = [t for t in g.ins(op) if t is not None]
    out = g.out(op)
    axis = g.node(op, 0).axis(op.py_attrs()["axis"], len(out.shape))
    at = ZERO
    for t in parts:
        dst = out.view(t.shape, out.strides, padd(out.offset, pmul(at, out.strides[axis])))
        if t.numel != ZERO:
            g.map("Identity", dst, [t])
        at = padd(at, t.shape[axis])
    g.result(op, out)


def _pad(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    attrs = op.py_attrs()
    if attrs.get("mode", "constant") != "constant":
        raise fail(op, f"mode={attrs.get('mode')!r} is not supported (constant only)")
    widths = [onnx_ops._pad_widths(g.node(op, k), g.oracle.shape(op.operands[0], S))
              for k, S in enumerate(g.lengths)]
    if any(w != widths[0] for w in widths):
        raise fail(op, "its pads depend on the sequence length")
    value = g.param(op, 2)
    out = g.out(op)
    fill = (value[0].reshape(-1)[0] if value is not None else attrs.get("value", 0))
    g.map("Fill", out, [], {"value": fill.item() if hasattr(fill, "item") else fill})
    src_off, dst_off, shape = x.offset, out.offset, []
    for d, (b, e) in enumerate(widths[0]):
        src_off = padd(src_off, pmul(const(max(-b, 0)), x.strides[d]))
        dst_off = padd(dst_off, pmul(const(max(b, 0)), out.strides[d]))
        shape.append(psub(x.shape[d], const(max(-b, 0) + max(-e, 0))))
    if all(is_const(n) and n[0] > 0 or not is_const(n) for n in shape):
        g.map("Identity", out.view(shape, out.strides, dst_off), [x.view(shape, x.strides, src_off)])
    g.result(op, out)


def _tile(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    reps = [onnx_ops._tile_repeats(g.node(op, k), g.oracle.shape(op.operands[0], S)) for k, S in enumerate(g.lengths)]
    if any(r != reps[0] for r in reps) or math.prod(reps[0]) > 256:
        raise fail(op, "its repeats must be constant (and at most 256 copies)")
    out = g.out(op)
    for index in np.ndindex(*reps[0]):
        off = padd(out.offset, *[pmul(pmul(const(i), n), s) for i, n, s in zip(index, x.shape, out.strides)])
        g.map("Identity", out.view(x.shape, out.strides, off), [x])
    g.result(op, out)


def _trilu(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    k = g.param(op, 1)
    kp = ZERO if k is None else g.fit_ints(op, [[int(np.asarray(v).reshape(()))] for v in k], "k")[0]
    out = g.out(op)
    if len(out.shape) < 2:
        raise fail(op, "the input must have rank 2 or more")
    g.map("Trilu", out, [x], {"upper": int(op.py_attrs().get("upper", 1))}, extra=[kp])
    g.result(op, out)


def _constant_of_shape(g: GenericLowering, op: OnnxOp) -> None:
    out = g.out(op)
    value = onnx_ops._fill_value(g.node(op, 0))
    g.map("Fill", out, [], {"value": value.item()})
    g.result(op, out)


def _range(g: GenericLowering, op: OnnxOp) -> None:
    start, _, delta = (g.param(op, i) for i in range(3))
    if any(np.asarray(v).reshape(()) != np.asarray(start[0]).reshape(()) for v in start) or \
            any(np.asarray(v).reshape(()) != np.asarray(delta[0]).reshape(()) for v in delta):
        raise fail(op, "its start and delta must not depend on the sequence length")
    out = g.out(op)
    s, d = (np.asarray(v[0]).reshape(()).item() for v in (start, delta))
    g.emit("g_range", {"dtype": out.dtype, "start": json_safe(s), "delta": json_safe(d)}, [out.shape[0], out.offset],
           [out.ref])
    g.result(op, out)


def _axis(kind: str, attrs: dict, rank: int, default: int = 0) -> int:
    return onnx_ops._Node(kind, "", attrs, [], [], None).axis(attrs.get("axis", default), rank)


def _gather(g: GenericLowering, op: OnnxOp) -> None:
    data, idx = g.ins(op)
    out = g.out(op)
    gather(g, op.op_type, op.py_attrs(), data, idx, out)
    g.result(op, out)


def gather(g, kind: str, attrs: dict, data: Tensor, idx: Tensor, out: Tensor) -> None:
    """Gather, GatherElements or GatherND of data by idx into out (shapes as onnx_ops infers them)."""
    if kind == "Gather":
        a = _axis(kind, attrs, len(data.shape))
        ni, rest = len(idx.shape), len(data.shape) - a - 1
        d_str = list(data.strides[:a]) + [ZERO] * ni + list(data.strides[a + 1:])
        i_str = [ZERO] * a + list(idx.strides) + [ZERO] * rest
        _gather_call(g, "gather", out.shape, data, d_str, idx, i_str, ZERO, [data.strides[a]], [data.shape[a]],
                     out, out.strides)
    elif kind == "GatherElements":
        a = _axis(kind, attrs, len(data.shape))
        d_str = [ZERO if i == a else s for i, s in enumerate(data.strides)]
        _gather_call(g, "gather", idx.shape, data, d_str, idx, idx.strides, ZERO, [data.strides[a]],
                     [data.shape[a]], out, out.strides)
    else:  # GatherND: idx [..., k] picks data[b.., i0, .., ik-1, ...] after batch_dims b
        b, k = attrs.get("batch_dims", 0), idx.shape[-1][0]
        ni, tail = len(idx.shape) - 1, data.shape[b + k:]
        d_str = list(data.strides[:b]) + [ZERO] * (ni - b) + list(data.strides[b + k:])
        i_str = list(idx.strides[:-1]) + [ZERO] * len(tail)
        _gather_call(g, "gather", out.shape, data, d_str, idx, i_str, idx.strides[-1], data.strides[b:b + k],
                     data.shape[b:b + k], out, out.strides)


def _scatter(g: GenericLowering, op: OnnxOp) -> None:
    data, idx, upd = g.ins(op)
    out = g.out(op)
    scatter(g, op.op_type, op.py_attrs(), data, idx, upd, out)
    g.result(op, out)


def scatter(g, kind: str, attrs: dict, data: Tensor, idx: Tensor, upd: Tensor, out: Tensor) -> None:
    """ScatterElements or ScatterND: out = data with updates written (or combined) at idx."""
    red = attrs.get("reduction", "none")
    if red not in ("none", "add", "mul", "max", "min"):
        raise LlmircError(f"cpu target: {kind} with reduction={red!r} has no generic kernel")
    mode = "scatter" if red == "none" else f"scatter_{red}"
    g.map("Identity", out, [data])
    if kind == "ScatterElements":
        a = _axis(kind, attrs, len(data.shape))
        d_str = [ZERO if i == a else s for i, s in enumerate(out.strides)]
        _gather_call(g, mode, idx.shape, out, d_str, idx, idx.strides, ZERO, [out.strides[a]], [out.shape[a]],
                     upd, g.strides_for(upd, idx.shape))
    else:
        k = idx.shape[-1][0]
        ni, tail = len(idx.shape) - 1, out.shape[k:]
        dims = tuple(idx.shape[:-1]) + tuple(tail)
        d_str = [ZERO] * ni + list(out.strides[k:])
        i_str = list(idx.strides[:-1]) + [ZERO] * len(tail)
        _gather_call(g, mode, dims, out, d_str, idx, i_str, idx.strides[-1], out.strides[:k], out.shape[:k],
                     upd, g.strides_for(upd, dims))


def _gather_call(g, mode, dims, data, d_str, idx, i_str, i_comp, axis_str, axis_len, other, o_str) -> None:
    dims, d_str, i_str, o_str = list(dims), list(d_str), list(i_str), list(o_str)
    if not dims:  # rank 0: one element
        dims, d_str, i_str, o_str = [ONE], [ZERO], [ZERO], [ZERO]
    if len(dims) > MAX_RANK:
        raise LlmircError(f"cpu target: rank {len(dims)} exceeds the generic kernels' {MAX_RANK}")
    if idx.dtype not in ("i64", "i32"):
        raise LlmircError(f"cpu target: {idx.dtype} indices are not supported (int64, int32)")
    meta = [*dims, data.offset, *d_str, idx.offset, *i_str, i_comp, *axis_str, *axis_len, other.offset, *o_str]
    params = {"r": len(dims), "k": len(axis_str), "dtype": data.dtype, "itype": idx.dtype, "mode": mode}
    refs = [other.ref, data.ref, idx.ref] if mode == "gather" else [data.ref, idx.ref, other.ref]
    g.emit("g_gather", params, meta, refs)


def _matmul(g: GenericLowering, op: OnnxOp) -> None:
    a, b = g.ins(op)
    if a.dtype not in ("f32", "f64") or b.dtype != a.dtype:
        raise fail(op, f"{a.dtype} x {b.dtype} is not supported (float32 or float64)")
    out = g.out(op)
    matmul(g, a, b, out)
    g.result(op, out)


def matmul(g, a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b with numpy's batch broadcasting and 1-D promotion."""
    o = out
    if len(a.shape) == 1:
        a = a.view((ONE, *a.shape), (ZERO, *a.strides))
        o = o.view(o.shape[:-1] + (ONE,) + o.shape[-1:], o.strides[:-1] + (ZERO,) + o.strides[-1:]) \
            if len(b.shape) > 1 else o.view((ONE, *o.shape), (ZERO, *o.strides))
    if len(b.shape) == 1:
        b = b.view((*b.shape, ONE), (*b.strides, ZERO))
        o = o.view((*o.shape, ONE), (*o.strides, ZERO))
    batch = o.shape[:-2]
    rb = len(batch)
    if rb + 2 > MAX_RANK:
        raise LlmircError(f"cpu target: MatMul of rank {rb + 2} exceeds the generic kernels' {MAX_RANK}")

    def operand(t):
        strides = g.strides_for(t.view(t.shape[:-2], t.strides[:-2]), batch) if len(t.shape) > 2 else [ZERO] * rb
        return [t.offset, *strides, *t.strides[-2:]]
    M, N, K = a.shape[-2], b.shape[-1], a.shape[-1]
    meta = [*batch, M, N, K, *operand(a), *operand(b), o.offset, *o.strides]
    g.emit("g_matmul", {"rb": rb, "dtype": a.dtype}, meta, [o.ref, a.ref, b.ref])


def _gemm(g: GenericLowering, op: OnnxOp) -> None:
    ins = g.ins(op)
    a, b, c = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    attrs = op.py_attrs()
    if a.dtype not in ("f32", "f64") or b.dtype != a.dtype:
        raise fail(op, f"{a.dtype} x {b.dtype} is not supported (float32 or float64)")
    if attrs.get("transA", 0):
        a = a.view(a.shape[::-1], a.strides[::-1])
    if attrs.get("transB", 0):
        b = b.view(b.shape[::-1], b.strides[::-1])
    out = g.out(op)
    matmul(g, a, b, out)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if c is not None:
        g.map("GemmEpilogue", out, [out, c], {"alpha": alpha, "beta": beta})
    elif alpha != 1.0:
        g.map("Scale", out, [out], {"alpha": alpha})
    g.result(op, out)


def _einsum(g: GenericLowering, op: OnnxOp) -> None:
    ins = [t for t in g.ins(op) if t is not None]
    out = g.out(op)
    if any(t.dtype not in ("f32", "f64") for t in ins):
        raise fail(op, "only float inputs are supported")
    einsum(g, op.py_attrs().get("equation", ""), ins, out)
    g.result(op, out)


def einsum(g, equation: str, ins: list[Tensor], out: Tensor) -> None:
    """out = Einsum(equation) of ins: a sum over the labels the output lacks of the product of
    the inputs, each read through strides per label (a label repeated in one term: a diagonal)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    n_ell = max([len(t.shape) - len(term.replace("...", "")) for t, term in zip(ins, terms) if "..." in term],
                default=0)
    ellipsis = [chr(0x100 + i) for i in range(n_ell)]  # a label per broadcast dim, right-aligned

    def labels(term: str, rank: int) -> list[str]:
        pre, _, post = term.partition("...")
        return list(pre) + ellipsis[n_ell - (rank - len(pre) - len(post)):] + list(post)
    if not arrow:  # implicit output: the ellipsis dims, then the labels used once, sorted
        letters = lhs.replace("...", "").replace(",", "")
        rhs = ("..." if n_ell else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    dims: dict[str, tuple] = {}
    per_input = []
    for t, term in zip(ins, terms):
        names = labels(term, len(t.shape))
        per_input.append(names)
        for name, n in zip(names, t.shape):
            if n != ONE or name not in dims:
                dims[name] = n
    kept = labels(rhs, len(out.shape))
    red = [name for name in dims if name not in kept]

    def strides(t: Tensor, names: list[str], which: list[str]) -> list:
        out_ = []
        for label in which:
            s = ZERO
            for name, n, st in zip(names, t.shape, t.strides):
                if name == label and not (n == ONE and dims[label] != ONE):  # a size-1 dim broadcasts
                    s = padd(s, st)
            out_.append(s)
        return out_
    meta = [*[dims[k] for k in kept], *[dims[r] for r in red], out.offset, *out.strides]
    for t, names in zip(ins, per_input):
        meta += [t.offset, *strides(t, names, kept), *strides(t, names, red)]
    if len(kept) > MAX_RANK or len(red) > MAX_RANK:
        raise LlmircError(f"cpu target: Einsum {equation!r} has more than {MAX_RANK} kept or summed labels")
    g.emit("g_contract", {"rk": len(kept), "rr": len(red), "dtypes": [out.dtype] + [t.dtype for t in ins]},
           meta, [out.ref] + [t.ref for t in ins])


def _reduce(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    out = g.out(op)
    keep = op.py_attrs().get("keepdims", 1)
    if op.op_type in ("ArgMax", "ArgMin"):
        axes = (g.node(op, 0).axis(op.py_attrs().get("axis", 0), len(x.shape)),)
    else:
        axes = g.node(op, 0).reduce_axes(len(x.shape))
    reduce_call(g, op.op_type, x, out, axes, keep, op.py_attrs().get("select_last_index", 0))
    g.result(op, out)


def reduce_call(g, kind, x: Tensor, out: Tensor, axes, keepdims, select_last=0) -> None:
    kept = [i for i in range(len(x.shape)) if i not in axes]
    out_kept = [out.strides[i] for i in kept] if keepdims else list(out.strides)
    meta = [*[x.shape[i] for i in kept], *[x.shape[i] for i in axes], x.offset, *[x.strides[i] for i in kept],
            *[x.strides[i] for i in axes], out.offset, *out_kept]
    if len(kept) > MAX_RANK or len(axes) > MAX_RANK:
        raise LlmircError(f"cpu target: rank {len(x.shape)} exceeds the generic kernels' {MAX_RANK}")
    params = {"op": kind, "rk": len(kept), "rr": len(axes), "din": x.dtype, "dout": out.dtype,
              "select_last": int(select_last)}
    g.emit("g_reduce", params, meta, [out.ref, x.ref])


def axis_call(g, kind, params, x: Tensor, out: Tensor, axis: int) -> None:
    kept = [i for i in range(len(x.shape)) if i != axis]
    meta = [*[x.shape[i] for i in kept], x.shape[axis], x.offset, *[x.strides[i] for i in kept], x.strides[axis],
            out.offset, *[out.strides[i] for i in kept], out.strides[axis]]
    g.emit(kind, {"rk": len(kept), **params}, meta, [out.ref, x.ref])


def _softmax(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    if x.dtype not in ("f32", "f64"):
        raise fail(op, f"{x.dtype} inputs are not supported")
    out = g.out(op)
    axis = g.node(op, 0).axis(op.py_attrs().get("axis", -1), len(x.shape))
    axis_call(g, "g_softmax", {"log": int(op.op_type == "LogSoftmax"), "dtype": x.dtype}, x, out, axis)
    g.result(op, out)


def _cumsum(g: GenericLowering, op: OnnxOp) -> None:
    x = g.ins(op)[0]
    out = g.out(op)
    axis_v = g.param(op, 1)
    if any(int(np.ravel(v)[0]) != int(np.ravel(axis_v[0])[0]) for v in axis_v):
        raise fail(op, "its axis depends on the sequence length")
    axis = g.node(op, 0).axis(int(np.ravel(axis_v[0])[0]), len(x.shape))
    attrs = op.py_attrs()
    axis_call(g, "g_cumsum", {"dtype": x.dtype, "exclusive": int(attrs.get("exclusive", 0)),
                               "reverse": int(attrs.get("reverse", 0))}, x, out, axis)
    g.result(op, out)


def _layer_norm(g: GenericLowering, op: OnnxOp) -> None:
    ins = g.ins(op)
    x, scale, bias = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    attrs = op.py_attrs()
    if x.dtype != "f32" or attrs.get("stash_type", 1) != 1:
        raise fail(op, "only float32 with float32 statistics is supported")
    axis = g.node(op, 0).axis(attrs.get("axis", -1), len(x.shape))
    axes = tuple(range(axis, len(x.shape)))
    stats = tuple(x.shape[:axis]) + (ONE,) * len(axes)
    used = [len(op.results) > i and bool(op.results[i].uses) for i in range(3)]
    mean = g.new(stats, "f32", temp=not used[1])
    reduce_call(g, "ReduceMean", x, mean, axes, True)
    d = g.new(x.shape, "f32", temp=True)
    g.map("Sub", d, [x, mean])
    var = g.new(stats, "f32", temp=True)
    reduce_call(g, "MeanSquare", d, var, axes, True)
    inv = g.new(stats, "f32", temp=not used[2])
    g.map("RsqrtEps", inv, [var], {"eps": float(attrs.get("epsilon", 1e-5))})
    y = g.out(op)
    g.map("LnOut", y, [d, inv, scale] + ([bias] if bias is not None else []))
    g.result(op, y)
    if used[1]:
        g.result(op, mean, 1)
    if used[2]:
        g.result(op, inv, 2)


RULES = {op: _elementwise for op in ELEMENTWISE}
RULES.update({
    "Sum": _variadic, "Mean": _variadic, "Max": _variadic, "Min": _variadic,
    "Identity": _view_of_input, "Dropout": _view_of_input, "Cast": _view_of_input, "CastLike": _view_of_input,
    "Reshape": _reshape, "Flatten": _reshape, "Squeeze": _squeeze_unsqueeze, "Unsqueeze": _squeeze_unsqueeze,
    "Transpose": _transpose, "Expand": _expand, "Slice": _slice, "Split": _split, "Concat": _concat, "Pad": _pad,
    "Tile": _tile, "Trilu": _trilu, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Gather": _gather, "GatherElements": _gather, "GatherND": _gather,
    "ScatterElements": _scatter, "ScatterND": _scatter,
    "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum,
    "ArgMax": _reduce, "ArgMin": _reduce, "Softmax": _softmax, "LogSoftmax": _softmax, "CumSum": _cumsum,
    "LayerNormalization": _layer_norm,
    **{op: _reduce for op in ("ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin", "ReduceL1",
                              "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")},
})
