"""onnx-to-llmir: finishes the ONNX lowering once the fusions have run.

Cancels batch squeezes (squeeze_batch(unsqueeze_batch(x)) -> x), turns the remaining
elementwise glue between llmir values into llmir ops (residual Add, bias Add into the linear,
act(g) * u into act_mul), and gives the function the llmir signature: token_ids and positions
in, logits [T, vocab] out. The ONNX inputs, present-KV outputs and anything else left unused
go away.

If ONNX ops are still needed after that, the model was not fully recognized (an attention
variant the fusions do not know, say). It still compiles, as a *full-sequence* model: the
function is marked `llmir.full_sequence`, the ONNX ops stay (the cpu target compiles them with
generic kernels, targets/generic_plan.py) and so do the ONNX inputs they read (`onnx:input_ids`,
`onnx:attention_mask`, `onnx:position_ids`, `onnx:past`), which the forward fills from
token_ids and positions. Every generation step then recomputes the whole sequence: correct, but
slow. The report lists the op types left generic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr, UnitAttr
from xdsl.ir import SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    GreedyRewritePatternApplier,
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)
from xdsl.transforms.dead_code_elimination import region_dce

from llmirc import dialect as L
from llmirc.errors import LlmircError
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp

from .func_args import arg_names, forward_func
from .report import note


def _rows(v: SSAValue) -> SSAValue | None:
    """x when v = unsqueeze_batch(x)."""
    return v.owner.input if isinstance(v.owner, L.UnsqueezeBatchOp) else None


def _is_const(v: SSAValue) -> bool:
    return isinstance(v.owner, (L.WeightOp, L.ConstantOp))


class CancelBatch(RewritePattern):
    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: L.SqueezeBatchOp, rewriter: PatternRewriter) -> None:
        if (x := _rows(op.input)) is not None:
            rewriter.replace(op, [], [x])


class ReshapeBatch(RewritePattern):
    """Reshape between [S, C] rows and [1, S, C] is a batch squeeze (Gemm-based exports do this);
    a reshape to the same shape is the identity."""

    def match_and_rewrite(self, op, rewriter: PatternRewriter) -> None:
        if not isinstance(op, OnnxOp) or op.op_type not in ("Reshape", "Unsqueeze", "Squeeze"):
            return
        src, dst = L.shape_of(op.operands[0]), L.shape_of(op.results[0])
        x = op.operands[0]
        if src == dst and src.count(L.DYN) <= 1 and op.results[0].type == x.type:
            rewriter.replace(op, [], [x])  # same shape, one unknown dim at most: the identity
        elif len(src) == 2 and dst == (1, *src) and src[0] == L.DYN and not isinstance(x.owner, OnnxOp):
            rewriter.replace(op, L.UnsqueezeBatchOp(x))
        elif len(src) == 3 and src == (1, *dst) and dst[0] == L.DYN and (rows := _rows(x)) is not None:
            rewriter.replace(op, [], [rows])


class ElementwiseGlue(RewritePattern):
    def __init__(self, note=lambda what: None):
        self.note = note

    def match_and_rewrite(self, op, rewriter: PatternRewriter) -> None:
        if not isinstance(op, OnnxOp) or len(op.results) != 1:
            return
        kind, ins = op.op_type, list(op.operands)
        same_type = op.results[0].type == ins[0].type  # Cast/CastLike to the type it already has
        if (kind in ("Identity", "Dropout") or (kind in ("Cast", "CastLike") and same_type)) and \
                (x := _rows(ins[0])) is not None:
            rewriter.replace(op, L.UnsqueezeBatchOp(x))
            return
        if kind not in ("Add", "Mul") or len(ins) != 2:
            return
        a, b = (_rows(v) for v in ins)
        if kind == "Add" and a is not None and b is not None and L.shape_of(a) == L.shape_of(b):
            add = L.AddOp(a, b)
            rewriter.replace(op, [add, L.UnsqueezeBatchOp(add.result)])
            self.note("Add -> add")
            return
        for rows, other in ((a, ins[1]), (b, ins[0])):
            lin = rows.owner if rows is not None else None
            if kind == "Add" and isinstance(lin, L.LinearOp) and lin.bias is None and lin.residual is None \
                    and rows.has_one_use() and _is_const(other) and L.shape_of(other) == (L.shape_of(rows)[1],):
                new = L.LinearOp(lin.input, lin.weight, other)
                rewriter.replace(op, [new, L.UnsqueezeBatchOp(new.result)])
                self.note("bias Add -> linear bias")
                return
        for gate, up in ((a, b), (b, a)):
            act = gate.owner if gate is not None else None
            if kind == "Mul" and isinstance(act, L.ActOp) and up is not None and gate.has_one_use() \
                    and L.shape_of(gate) == L.shape_of(up):
                new = L.ActMulOp(act.input, up, act.act.data)
                rewriter.replace(op, [new, L.UnsqueezeBatchOp(new.result)])
                self.note(f"{act.act.data}(gate) * up -> act_mul")
                return


class SplitRows(RewritePattern):
    """Split of [1, S, C] rows along the columns (onnxruntime-genai's packed q/k/v projection) is
    llmir.split of the rows."""

    def match_and_rewrite(self, op, rewriter: PatternRewriter) -> None:
        if not isinstance(op, OnnxOp) or op.op_type != "Split" or (rows := _rows(op.operands[0])) is None:
            return
        if op.py_attrs().get("axis", 0) not in (-1, 2) or len(L.shape_of(op.operands[0])) != 3:
            return
        sizes = [L.shape_of(r)[-1] for r in op.results]
        if L.DYN in sizes or sum(sizes) != L.shape_of(rows)[1]:
            return
        split = L.SplitOp(rows, sizes)
        outs = [L.UnsqueezeBatchOp(r) for r in split.outputs]
        rewriter.replace(op, [split, *outs], [o.result for o in outs])


@dataclass(frozen=True)
class OnnxGlue(ModulePass):
    """onnx-glue: the elementwise glue between llmir values as llmir ops; batch squeezes cancelled."""

    name = "onnx-glue"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        glue = ElementwiseGlue(lambda what: note(ctx, f"{self.name}: {what}"))
        PatternRewriteWalker(GreedyRewritePatternApplier([CancelBatch(), ReshapeBatch(), SplitRows(), glue]),
                             post_walk_func=region_dce).rewrite_module(op)


def leftovers(module: ModuleOp) -> Counter:
    return Counter(op.op_type for op in module.walk() if isinstance(op, OnnxOp))


@dataclass(frozen=True)
class OnnxToLlmir(ModulePass):
    name = "onnx-to-llmir"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        ret = f.get_return_op()
        logits = ret.operands[0]
        shape = L.shape_of(logits)
        if len(shape) != 3 or shape[0] != 1 or shape[1] != L.DYN:
            dims = ", ".join("S" if d == L.DYN else str(d) for d in shape)
            pruned = " (onnxruntime-genai's builder writes the last row alone with prune_lm_head=true: build " \
                "without it)" if len(shape) == 3 and shape[1] == 1 else ""
            raise LlmircError(f"the ONNX graph's output has shape [{dims}]; llmirc expects logits [1, S, vocab] "
                              f"(batch 1, a row per token){pruned}")
        squeeze = L.SqueezeBatchOp(logits)
        f.body.block.insert_op_before(squeeze, ret)
        ret.operands = [squeeze.result]  # present-KV outputs: the paged cache replaces them
        OnnxGlue().apply(ctx, op)
        region_dce(f.body)
        for none in [o for o in f.body.block.ops if isinstance(o, NoneOp) and not o.result.uses]:
            f.body.block.erase_op(none)
        left = leftovers(op)
        if left:  # not fully recognized: a full-sequence model with generic kernels for these
            f.attributes[L.FULL_SEQUENCE] = UnitAttr()
            for kind, n in sorted(left.items()):
                note(ctx, f"{self.name}: left generic: {kind}", n)
        names = arg_names(f)
        kept = []
        for arg, name in reversed(list(zip(f.args, names))):
            if name and name.startswith("onnx:") and not arg.uses:
                f.body.block.erase_arg(arg)
            elif name and name.startswith("onnx:") and not left:
                raise LlmircError(f"the ONNX input {name[5:]} is still used after fusion")
            else:
                kept.insert(0, name)
        f.arg_attrs = ArrayAttr([DictionaryAttr({L.ARG_ATTR: StringAttr(n)}) for n in kept])
        f.update_function_type()
