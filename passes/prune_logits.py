"""prune-logits: compute logits only for the rows asked for (`logits_indices`).

The front end's graph returns logits for every token; generation needs them for the last
token of each sequence only. The pass adds the `logits_indices` argument, gathers those rows
at the output, and moves the gather up through row-wise ops so that the final norm, the LM
head and, where it can, the last layer's MLP run on the kept rows only.

Before:  %n = "llmir.rms_norm"(%h, %w)   %l = "llmir.linear"(%n, %head)   return %l
After:   %g = "llmir.gather_rows"(%h, %logits_indices)
         %n = "llmir.rms_norm"(%g, %w)   %l = "llmir.linear"(%n, %head)   return %l

A gather moves above an op only when every use of that op's result is the same gather, so no
work is duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, i32
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern, op_type_rewrite_pattern

from llmirc import dialect as L

from .func_args import add_arg, find_arg, forward_func
from .report import note

# Row-wise ops and which of their operands carry rows (the others are weights or attributes).
ROW_OPERANDS = {
    L.LinearOp: ("input", "residual"),
    L.RMSNormOp: ("input",),
    L.LayerNormOp: ("input",),
    L.ActMulOp: ("gate", "up"),
    L.ActOp: ("input",),
    L.SoftcapOp: ("input",),
    L.AddOp: ("lhs", "rhs"),
    L.HadamardOp: ("input",),
}


class HoistGatherRows(RewritePattern):
    def __init__(self, note=lambda kind: None):
        self.note = note

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: L.GatherRowsOp, rewriter: PatternRewriter) -> None:
        producer = op.input.owner
        if not isinstance(producer, Operation) or type(producer) not in ROW_OPERANDS:
            return
        gathers = [use.operation for use in op.input.uses]
        if not all(isinstance(g, L.GatherRowsOp) and g.input is op.input and g.indices is op.indices
                   for g in gathers):
            return
        row_operands = {id(getattr(producer, name)) for name in ROW_OPERANDS[type(producer)]
                        if getattr(producer, name) is not None}
        new_operands: list[SSAValue] = []
        for operand in producer.operands:
            if id(operand) in row_operands:
                gathered = L.GatherRowsOp(operand, op.indices)
                rewriter.insert(gathered, InsertPoint.before(producer))
                operand = gathered.result
            new_operands.append(operand)
        clone = producer.clone()
        for i, operand in enumerate(new_operands):
            clone.operands[i] = operand
        rewriter.insert(clone, InsertPoint.before(producer))
        for g in gathers:
            rewriter.replace(g, [], [clone.results[0]])
        rewriter.erase(producer)
        self.note(producer.name)


@dataclass(frozen=True)
class PruneLogits(ModulePass):
    name = "prune-logits"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        if find_arg(f, "logits_indices") is not None:
            return
        indices = add_arg(f, "logits_indices", L.tensor(L.DYN, dtype=i32))
        ret = f.get_return_op()
        gather = L.GatherRowsOp(ret.operands[0], indices)
        f.body.block.insert_op_before(gather, ret)
        ret.operands[0] = gather.result
        hoist = HoistGatherRows(lambda kind: note(ctx, f"{self.name}: {kind} runs on logits rows only"))
        PatternRewriteWalker(hoist, walk_reverse=True).rewrite_module(op)
