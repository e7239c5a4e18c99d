"""fuse-linears: sibling linear ops that read the same input become one wider linear.

This is q/k/v projection fusion and gate/up fusion: one pass over the weights instead of
several, and one kernel launch. The weight concatenation is folded into the bundle.

Before:
    %q = "llmir.linear"(%x, %wq, %bq)   %k = "llmir.linear"(%x, %wk, %bk)   %v = "llmir.linear"(%x, %wv, %bv)
After:
    %w = "llmir.concat"(%wq, %wk, %wv) {axis = 0}    %b = "llmir.concat"(%bq, %bk, %bv) {axis = 0}
    %qkv = "llmir.linear"(%x, %w, %b)
    %q, %k, %v = "llmir.split"(%qkv) {sizes = [Nq, Nk, Nv]}

Only linears without a residual operand, whose weights (and biases) are weights (or
transposes/concatenations/casts/scales of weights), and that agree on having a bias and on the weights'
element type, are fused; quantized weights with act-order (each with its own order of inputs)
are not.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass

from .report import note

from llmirc.dialect import (CastOp, ConcatOp, HadamardOp, LinearOp, PackedWeightOp, QuantType, ScaleOp, SplitOp,
                            TransposeOp, WeightOp, shape_of)


def is_weight(v: SSAValue) -> bool:
    """A weight, or a transpose/concatenation/cast/scale/hadamard of weights (folded at compile time)."""
    op = v.owner
    return isinstance(op, (WeightOp, PackedWeightOp)) or (isinstance(op, (TransposeOp, ConcatOp, CastOp, ScaleOp, HadamardOp))
                                                          and all(is_weight(i) for i in op.operands))


def _fusible(op: Operation, x: SSAValue) -> bool:
    element = op.weight.type.element_type if isinstance(op, LinearOp) else None
    act_order = isinstance(element, QuantType) and element.act_order.data  # each has its own input order
    return (isinstance(op, LinearOp) and op.input is x and op.residual is None and is_weight(op.weight)
            and (op.bias is None or is_weight(op.bias)) and not act_order)


def _clone_weight(v: SSAValue, before: Operation) -> SSAValue:
    """Re-creates a weight expression at `before`, so that it dominates the fused op (CSE dedupes)."""
    src = v.owner
    operands = [_clone_weight(i, before) for i in src.operands]
    op = src.clone()
    for i, operand in enumerate(operands):
        op.operands[i] = operand
    before.parent_block().insert_op_before(op, before)
    return op.results[0]


def _concat(values: list[SSAValue], before: Operation) -> SSAValue:
    concat = ConcatOp([_clone_weight(v, before) for v in values], axis=0)
    before.parent_block().insert_op_before(concat, before)
    return concat.result


def fuse_siblings(x: SSAValue) -> list[int]:
    """Fuses the linear users of x; returns how many linears each fused group had."""
    users = []
    for use in x.uses:
        if _fusible(use.operation, x) and use.operation not in users:
            users.append(use.operation)
    fused = []
    kinds = {(op.bias is not None, op.weight.type.element_type) for op in users}
    for with_bias, element in sorted(kinds, key=str):
        group = [op for op in users if (op.bias is not None, op.weight.type.element_type) == (with_bias, element)]
        if len(group) < 2:
            continue
        block = group[0].parent_block()
        group.sort(key=block.get_operation_index)
        first = group[0]
        w = _concat([op.weight for op in group], first)
        b = _concat([op.bias for op in group], first) if with_bias else None
        linear = LinearOp(x, w, b)
        split = SplitOp(linear.result, [shape_of(op.weight)[0] for op in group])
        block.insert_op_before(linear, first)
        block.insert_op_before(split, first)
        for op, part in zip(group, split.outputs):
            op.result.replace_all_uses_with(part)
            block.erase_op(op)
        fused.append(len(group))
    return fused


@dataclass(frozen=True)
class FuseLinears(ModulePass):
    name = "fuse-linears"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        values: list[SSAValue] = []
        for inner in op.walk():
            values.extend(inner.results)
            for region in inner.regions:
                for block in region.blocks:
                    values.extend(block.args)
        for x in values:
            for n in fuse_siblings(x):
                note(ctx, f"{self.name}: {n} sibling linears -> 1")
