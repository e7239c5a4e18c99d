"""fuse-residual-add: a residual add of a linear's output becomes the linear's epilogue.

Before:  %o = "llmir.linear"(%a, %w)         %h2 = "llmir.add"(%h, %o)
After:   %h2 = "llmir.linear"(%a, %w, %h)    (residual operand: out = a @ w^T + h)

Saves writing and re-reading %o. Applies when the linear has no residual yet and its result
is used only by the add.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern, op_type_rewrite_pattern

from llmirc.dialect import AddOp, LinearOp

from .report import note


class FuseResidualIntoLinear(RewritePattern):
    def __init__(self, note=lambda: None):
        self.note = note

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: AddOp, rewriter: PatternRewriter) -> None:
        for lin_value, residual in ((op.rhs, op.lhs), (op.lhs, op.rhs)):
            lin = lin_value.owner
            if isinstance(lin, LinearOp) and lin.residual is None and lin_value.has_one_use():
                rewriter.replace(op, LinearOp(lin.input, lin.weight, lin.bias, residual))
                rewriter.erase(lin)
                self.note()
                return


@dataclass(frozen=True)
class FuseResidualAdd(ModulePass):
    name = "fuse-residual-add"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        pattern = FuseResidualIntoLinear(lambda: note(ctx, f"{self.name}: add(h, linear) -> linear(residual=h)"))
        PatternRewriteWalker(pattern, apply_recursively=False).rewrite_module(op)
