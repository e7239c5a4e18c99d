"""onnx-fuse-linear: MatMul by a constant matrix (+ Add of a constant bias) becomes llmir.linear.

Before:  %y = "onnx.MatMul"(%x, %W)            // x [1, S, K] data, W [K, N] constant
         %z = "onnx.Add"(%y, %b)               // b [N] constant (optional)
After:   %z = "llmir.unsqueeze_batch"("llmir.linear"("llmir.squeeze_batch"(%x), "llmir.transpose"(%W), %b))

The transpose of W is folded into the bundle ([N, K] is the layout the kernels read). The
bias is absorbed by the onnx-to-llmir pass, which also cancels the batch squeezes.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.frontend.onnx_dialect import OnnxOp

from .func_args import forward_func
from .onnx_match import Oracle, erase_dead


@dataclass(frozen=True)
class FuseLinear(ModulePass):
    name = "onnx-fuse-linear"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        for mm in [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type == "MatMul"]:
            x, w = mm.operands
            if not oracle.is_data(x) or oracle.is_data(w) or len(L.shape_of(w)) != 2 or len(L.shape_of(x)) != 3 \
                    or L.shape_of(x)[0] != 1 or not isinstance(w.owner, (L.WeightOp, L.ConstantOp)):
                continue
            rows = L.SqueezeBatchOp(x)
            wt = L.TransposeOp(w)
            lin = L.LinearOp(rows.result, wt.result)
            out = L.UnsqueezeBatchOp(lin.result)
            f.body.block.insert_ops_before([rows, wt, lin, out], mm)
            mm.results[0].replace_all_uses_with(out.result)
            erase_dead([mm])
