"""fuse-rope-kv-append: the rotary embedding of q and k and the KV cache write of one attention
layer become one op, `llmir.rope_kv_append` (one kernel call instead of three).

Before:  %q2 = "llmir.rope"(%q, %pos)     %k2 = "llmir.rope"(%k, %pos)
         %p1 = "llmir.kv_append"(%k2, %v, %slots, %p0)
         %o = "llmir.paged_attention"(%q2, %p1, ...)
After:   %q2, %p1 = "llmir.rope_kv_append"(%q, %k, %v, %pos, %slots, %p0)
         %o = "llmir.paged_attention"(%q2, %p1, ...)

Saves writing the rotated k, reading it back, and computing each token's cos/sin twice.
Applies when both ropes have the same positions, rotary dimension, frequencies, scaling and
style, their results are read only by the kv_append and the paged_attention of one layer, and
the pool is a float one (an int8 or FP8 pool keeps the separate ops: its kv_append quantizes a
block's new tokens together). Runs after paged-kv and kv-cache-dtype (passes/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern, op_type_rewrite_pattern
from xdsl.rewriter import InsertPoint

from llmirc import dialect as L

from .report import note

_ROPE_PROPS = ("head_dim", "inv_freq", "scaling", "style")


class FuseRopeKVAppendPattern(RewritePattern):
    def __init__(self, note=lambda: None):
        self.note = note

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: L.PagedAttentionOp, rewriter: PatternRewriter) -> None:
        q_rope, kv = op.q.owner, op.pool.owner
        if not (isinstance(q_rope, L.RopeOp) and op.q.has_one_use() and isinstance(kv, L.KVAppendOp)):
            return
        k_rope = kv.k.owner
        if not (isinstance(k_rope, L.RopeOp) and kv.k.has_one_use() and L.is_float(kv.pool.type.dtype)):
            return
        if (kv.layer.value.data != op.layer.value.data or k_rope.positions is not q_rope.positions or
                any(q_rope.properties[n] != k_rope.properties[n] for n in _ROPE_PROPS)):
            return
        fused = L.RopeKVAppendOp(q_rope.input, k_rope.input, kv.v, q_rope.positions, kv.slot_mapping, kv.pool,
                                 q_rope, kv.layer.value.data)
        rewriter.insert(fused, InsertPoint.before(op))  # every operand is defined by then
        rewriter.replace_all_uses_with(kv.result, fused.pool_result)
        rewriter.replace_all_uses_with(q_rope.result, fused.q_result)
        for dead in (kv, k_rope, q_rope):
            rewriter.erase(dead)
        self.note()


@dataclass(frozen=True)
class FuseRopeKVAppend(ModulePass):
    name = "fuse-rope-kv-append"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        pattern = FuseRopeKVAppendPattern(lambda: note(ctx, f"{self.name}: rope(q), rope(k), kv_append -> "
                                                            "rope_kv_append"))
        PatternRewriteWalker(pattern, apply_recursively=False).rewrite_module(op)
