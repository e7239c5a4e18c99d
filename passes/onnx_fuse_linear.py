"""onnx-fuse-linear: MatMul or Gemm by a constant matrix (+ a constant bias) becomes llmir.linear.

Before:  %y = "onnx.MatMul"(%x, %W)            // x [1, S, K] data, W [K, N] constant
         %z = "onnx.Add"(%y, %b)               // b [N] constant (optional)
After:   %z = "llmir.unsqueeze_batch"("llmir.linear"("llmir.squeeze_batch"(%x), "llmir.transpose"(%W), %b))

Gemm (alpha = beta = 1, A not transposed) on 2-D rows [S, K] maps to llmir.linear directly
(rows are llmir's form). The transpose of W is folded into the bundle ([N, K] is the layout
the kernels read). onnx-glue cancels the batch squeezes.

onnxruntime's MatMulNBits (x [1, S, K] times quantized weights B, scales, zero points, + bias)
becomes llmir.linear of an `llmir.packed_weight` (format matmul_nbits, named after B): the codes
stay quantized, repacked losslessly when the bundle is written (frontend/packed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.errors import CheckpointError
from llmirc.frontend.onnx_contrib import packed_weight
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp, numpy_dtype

from .func_args import forward_func
from .onnx_match import Oracle, erase_dead
from .report import note


@dataclass(frozen=True)
class FuseLinear(ModulePass):
    name = "onnx-fuse-linear"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        block = f.body.block
        for mm in [o for o in block.ops if isinstance(o, OnnxOp) and o.op_type == "MatMulNBits"]:
            self._nbits(ctx, mm, oracle, block)
        for mm in [o for o in block.ops if isinstance(o, OnnxOp) and o.op_type in ("MatMul", "Gemm")]:
            x, w = mm.operands[:2]
            if not oracle.is_data(x) or not _const(w) or len(L.shape_of(w)) != 2:
                continue
            if mm.op_type == "Gemm":
                a = mm.py_attrs()
                bias = mm.operands[2] if len(mm.operands) > 2 and _const(mm.operands[2]) else None
                if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0) or \
                        len(L.shape_of(x)) != 2 or (len(mm.operands) > 2 and bias is None) or \
                        (bias is not None and len(L.shape_of(bias)) != 1):
                    continue
                new, weight = ([], w) if a.get("transB", 0) else _transposed(w)
                lin = L.LinearOp(x, weight, bias)
                block.insert_ops_before([*new, lin], mm)
                mm.results[0].replace_all_uses_with(lin.result)
            else:
                shape = L.shape_of(x)
                if len(shape) != 3 or shape[0] != 1:
                    continue
                rows, (new, wt) = L.SqueezeBatchOp(x), _transposed(w)
                lin = L.LinearOp(rows.result, wt)
                out = L.UnsqueezeBatchOp(lin.result)
                block.insert_ops_before([rows, *new, lin, out], mm)
                mm.results[0].replace_all_uses_with(out.result)
            erase_dead([mm])
            note(ctx, f"{self.name}: {mm.op_type} -> linear")

    def _nbits(self, ctx: Context, mm: OnnxOp, oracle: Oracle, block) -> None:
        x, b, scales, zp, _, bias = [*mm.operands, *[None] * 6][:6]  # (g_idx: refused by the importer)
        zp, bias = (None if v is None or isinstance(v.owner, NoneOp) else v for v in (zp, bias))
        shape = L.shape_of(x)
        a = mm.py_attrs()
        k, n, bits, g = (int(a.get(key, d)) for key, d in (("K", 0), ("N", 0), ("bits", 4), ("block_size", 0)))
        if not (oracle.is_data(x) and len(shape) == 3 and shape[0] == 1 and isinstance(b.owner, L.WeightOp) and
                all(v is None or _const(v) for v in (scales, zp, bias))):
            raise CheckpointError(f"ONNX MatMulNBits node '{mm.node.data}': llmirc reads it on [1, S, K] activations, "
                                  "with B, scales, zero_points and bias stored in the model")
        try:
            if L.shape_of(b)[0] != n:
                raise ValueError(f"N={n}, where B has {L.shape_of(b)[0]} rows")
            w = packed_weight(b.owner.weight.data, L.shape_of(b), numpy_dtype(b.type.element_type), scales,
                              None if zp is None else oracle.value(zp), k, bits, g)
        except ValueError as e:
            raise CheckpointError(f"ONNX MatMulNBits node '{mm.node.data}': {e}") from None
        rows = L.SqueezeBatchOp(x)
        lin = L.LinearOp(rows.result, w.result, bias)
        out = L.UnsqueezeBatchOp(lin.result)
        block.insert_ops_before([w, rows, lin, out], mm)
        mm.results[0].replace_all_uses_with(out.result)
        erase_dead([mm])
        note(ctx, f"{self.name}: MatMulNBits -> linear ({bits}-bit, groups of {g}, kept quantized)")


def _const(v) -> bool:
    """A stored value: a weight, a constant, or a weight's transpose (the importer's view of a transposed
    initializer)."""
    return isinstance(v.owner, (L.WeightOp, L.ConstantOp)) or \
        isinstance(v.owner, L.TransposeOp) and isinstance(v.owner.input.owner, L.WeightOp)


def _transposed(w: SSAValue) -> tuple[list, SSAValue]:
    """(new ops, w's transpose): the weight itself when w is a transpose of it."""
    if isinstance(w.owner, L.TransposeOp):
        return [], w.owner.input
    t = L.TransposeOp(w)
    return [t], t.result
