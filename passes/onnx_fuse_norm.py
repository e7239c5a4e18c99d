"""onnx-fuse-norm: RMSNorm and LayerNorm, however they were spelled, become llmir norms.

Before (one spelling of RMSNorm, as torch.onnx's dynamo exporter writes it):
    %p = "onnx.Pow"(%x, 2)  %m = "onnx.ReduceMean"(%p, [-1])  %e = "onnx.Add"(%m, 1e-6)
    %s = "onnx.Sqrt"(%e)  %r = "onnx.Reciprocal"(%s)  %n = "onnx.Mul"(%x, %r)  %y = "onnx.Mul"(%w, %n)
After:
    %y = "llmir.unsqueeze_batch"("llmir.rms_norm"("llmir.squeeze_batch"(%x), %w) {eps = 1e-6})

Candidates: every ReduceMean over the last axis of an activation, with the elementwise ops
computed from the same input around it; `onnx.LayerNormalization` directly. The candidate's
weight ([C] constants), bias and epsilon (scalar constants) are read off the region, and the
region must compute rms_norm / layer_norm on random inputs to be fused.

Per-head RMSNorm (Qwen3's q_norm / k_norm): the input is a projection's heads, x [1, S, H, D] =
Reshape(y [1, S, H*D]) (or [1, S*H, D], as onnxruntime-genai's builder writes it), normalized over D.
It becomes rms_norm{num_heads = H} of y's rows, and a
copy of the Reshape gives the region's users the [1, S, H, D] they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.frontend.onnx_analysis import PROBE_LENGTHS
from llmirc.frontend.onnx_dialect import OnnxOp

from .func_args import forward_func
from .onnx_match import ELEMENTWISE, Oracle, close, closure_down, erase_dead, evaluate
from .report import note


def rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + (0 if b is None else b)


def sources_above(v: SSAValue, oracle: Oracle, limit: int = 4) -> list[SSAValue]:
    """Data values above `v` through elementwise ops, nearest first (the norm's input is one)."""
    out, frontier = [], [v]
    for _ in range(limit):
        nxt = []
        for x in frontier:
            if x not in out:
                out.append(x)
            op = x.owner
            if isinstance(op, OnnxOp) and op.op_type in ELEMENTWISE:
                nxt.extend(o for o in op.operands if oracle.is_data(o))
        frontier = nxt
    return out


def _feeding(out: SSAValue, ops: list[OnnxOp]) -> list[OnnxOp]:
    """The ops of `ops` that `out` is computed from, in block order."""
    need, stack = set(), [out]
    while stack:
        op = stack.pop().owner
        if op in ops and op not in need:
            need.add(op)
            stack.extend(op.operands)
    return [op for op in ops if op in need]


def _heads_of(x: SSAValue, oracle: Oracle) -> int | None:
    """H where x [1, S, H, D] = Reshape(y [1, S, H*D]) of data y (a projection's heads) at every probed
    length S, else None (a split seen at one length only, [1, 3, 4, -1] at S = 3, is no heads)."""
    op, shape = x.owner, oracle.shape(x)
    if not (isinstance(op, OnnxOp) and op.op_type == "Reshape" and len(shape) in (3, 4) and
            oracle.is_data(op.operands[0])):
        return None
    if len(shape) == 3:  # onnxruntime-genai's builder: x [1, S*H, D] = Reshape(y [1, S, H*D], [0, -1, D])
        heads = oracle.shape(op.operands[0])[-1] // shape[2]
        return heads if heads > 1 and all(oracle.shape(x, S) == (1, S * heads, shape[2]) and
                                          oracle.shape(op.operands[0], S) == (1, S, heads * shape[2])
                                          for S in PROBE_LENGTHS) else None
    return shape[2] if all(oracle.shape(x, S) == (1, S) + shape[2:] and
                           oracle.shape(op.operands[0], S) == (1, S, shape[2] * shape[3])
                           for S in PROBE_LENGTHS) else None


def _closed(ops: list[OnnxOp], out: SSAValue) -> bool:
    return all(u.operation in ops for op in ops for r in op.results if r is not out for u in r.uses)


@dataclass(frozen=True)
class FuseNorm(ModulePass):
    name = "onnx-fuse-norm"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        for anchor in [o for o in f.body.block.ops if isinstance(o, OnnxOp)]:
            if anchor.parent is None:
                continue  # erased by an earlier fusion
            if anchor.op_type == "LayerNormalization":
                if self._layer_norm_op(anchor, oracle):
                    note(ctx, f"{self.name}: LayerNormalization -> layer_norm")
            elif anchor.op_type == "ReduceMean" and oracle.is_data(anchor.operands[0]):
                for x in sources_above(anchor.operands[0], oracle):
                    if kind := self._decomposed(anchor, x, oracle, ctx):
                        note(ctx, f"{self.name}: {kind}")
                        break

    def _layer_norm_op(self, op: OnnxOp, oracle: Oracle) -> bool:
        x, w, b = (list(op.operands) + [None])[:3]
        attrs = op.py_attrs()
        rank = len(L.shape_of(x))
        if attrs.get("axis", -1) not in (-1, rank - 1) or rank != 3 or oracle.is_data(w) or \
                (b is not None and not isinstance(b.owner, (L.WeightOp, L.ConstantOp))):
            return False
        if any(v is not None and L.shape_of(v) != L.shape_of(x)[-1:] for v in (w, b)):
            return False  # scale or bias broadcast along the row: not llmir.layer_norm's
        self._replace(op.results[0], x, lambda rows: L.LayerNormOp(rows, w, b, attrs.get("epsilon", 1e-5)), [op])
        return True

    def _decomposed(self, anchor: OnnxOp, x: SSAValue, oracle: Oracle, ctx) -> str | None:
        """The kind of norm fused ("rms_norm", "layer_norm (decomposed)", "rms_norm per head") or None."""
        shape, heads = oracle.shape(x), _heads_of(x, oracle)
        if shape[:1] != (1,) or (heads is None and (len(shape) != 3 or
                                                    any(oracle.shape(x, S)[1] != S for S in PROBE_LENGTHS))):
            return None  # rows are the tokens' (llmir's [T, C]), or a projection's heads
        if any(oracle.shape(x, S)[-1] != shape[-1] for S in PROBE_LENGTHS):
            return None  # the normalized axis grows with S (a [C] weight cannot scale it)
        closure, outs = closure_down(x, oracle)
        for out in outs:  # several norms of one x (parallel residual) share a closure: one at a time
            ops = _feeding(out, closure)
            if anchor in ops and _closed(ops, out) and (kind := self._fit(anchor, x, ops, out, oracle, ctx)):
                return kind
        return None

    def _fit(self, anchor, x, ops, out, oracle, ctx) -> str | None:
        cols, heads = oracle.shape(x)[-1], _heads_of(x, oracle)
        consts = [v for o in ops for v in o.operands if oracle.has_value(v)]
        vectors = [v for v in consts if oracle.shape(v) == (cols,) and isinstance(v.owner, (L.WeightOp, L.ConstantOp))]
        scalars = sorted({float(np.asarray(oracle.value(v)).reshape(-1)[0]) for v in consts
                          if int(np.prod(oracle.shape(v))) == 1 and np.asarray(oracle.value(v)).dtype.kind == "f"})
        eps_candidates = [e for e in scalars if 0 < e < 1e-2] or [1e-5, 1e-6]
        rng = np.random.default_rng(0)
        S = 7
        xs = rng.standard_normal((1, S) + oracle.shape(x)[2:]).astype(np.float32) * 3 + 1
        # Rows of tiny magnitude, where eps decides the result: sqrt(mean) + eps is not rms_norm.
        xs[0, :3] *= np.array([1e-3, 1e-4, 0], np.float32).reshape((3,) + (1,) * (xs.ndim - 2))
        got = evaluate(ops, {x: xs}, oracle, S)[out]
        value = {id(v): np.asarray(oracle.value(v), np.float64) for v in vectors}
        ones = [None]
        for eps in eps_candidates:
            for w in vectors + ones:
                wv = value[id(w)] if w is not None else 1.0
                if close(got, rms_norm(xs, wv, eps), 1e-5):
                    if heads is not None:
                        self._replace(out, x.owner.operands[0], lambda rows: L.RMSNormOp(
                            rows, self._weight(w, cols, ctx), eps, heads), ops, heads_of=x.owner)
                        return "rms_norm per head"
                    self._replace(out, x, lambda rows: L.RMSNormOp(rows, self._weight(w, cols, ctx), eps), ops)
                    return "rms_norm"
                if heads is not None:
                    continue  # llmir.layer_norm has no heads
                for b in vectors + ones:
                    if b is w and b is not None:
                        continue
                    bv = value[id(b)] if b is not None else None
                    if close(got, layer_norm(xs, wv, bv, eps), 1e-5):
                        self._replace(out, x, lambda rows: L.LayerNormOp(rows, self._weight(w, cols, ctx), b, eps),
                                      ops)
                        return "layer_norm (decomposed)"
        return None

    @staticmethod
    def _weight(w: SSAValue | None, cols: int, ctx) -> SSAValue:
        if w is not None:
            return w
        name = f"llmir.ones[{cols}]"
        ctx.add_weight(name, np.ones(cols, np.float32))
        return L.WeightOp(name, (cols,)).result  # inserted by _replace's caller below

    @staticmethod
    def _replace(out: SSAValue, x: SSAValue, make, ops, heads_of: OnnxOp | None = None) -> None:
        """out (computed by `ops` from x) becomes unsqueeze_batch(make(squeeze_batch(x))). Per head,
        x is the input of the Reshape `heads_of`, and a copy of that Reshape follows."""
        anchor = out.owner
        block = anchor.parent_block()
        rows = L.SqueezeBatchOp(x)
        block.insert_op_before(rows, anchor)
        norm = make(rows.result)
        for operand in norm.operands:  # a synthesized weight op is not in the block yet
            if isinstance(operand.owner, L.WeightOp) and operand.owner.parent is None:
                block.insert_op_before(operand.owner, anchor)
        new = [norm, L.UnsqueezeBatchOp(norm.result)]
        if heads_of is not None:
            new.append(heads_of.clone(value_mapper={heads_of.operands[0]: new[-1].results[0]}))
        block.insert_ops_before(new, anchor)
        out.replace_all_uses_with(new[-1].results[0])
        erase_dead(ops + ([heads_of] if heads_of is not None else []))
