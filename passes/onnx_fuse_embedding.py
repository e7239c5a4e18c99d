"""onnx-fuse-embedding: table lookups of the tokens (and of the positions) become llmir.embedding.

Before:  %e = "onnx.Gather"(%table, %input_ids) {axis = 0}             // [1, S, C]
After:   %e = "llmir.unsqueeze_batch"("llmir.embedding"(%table, %token_ids))

Learned absolute positions (GPT-2's wpe) are a Gather of the table by an s-only index that
equals 0..S-1; they become an embedding of the `positions` argument. The indices are checked
by value at several sequence lengths, whatever ops the exporter used to build them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, i32
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.frontend.onnx_analysis import CONST, PROBE_LENGTHS
from llmirc.frontend.onnx_dialect import OnnxOp

from .func_args import add_arg, arg_names, find_arg, forward_func
from .onnx_match import Oracle, erase_dead
from .report import note


def index_arg(f, name: str):
    return find_arg(f, name) or add_arg(f, name, L.tensor(L.DYN, dtype=i32))


@dataclass(frozen=True)
class FuseEmbedding(ModulePass):
    name = "onnx-fuse-embedding"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        roles = dict(zip(f.args, arg_names(f)))
        for gather in [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type == "Gather"]:
            table, ids = gather.operands
            # a table computed from the sequence length (a rotary cache read at position_ids) is no weight
            if gather.py_attrs().get("axis", 0) != 0 or oracle.kind(table) != CONST or len(L.shape_of(table)) != 2:
                continue
            src = ids  # through casts and reshapes that keep [1, S] (GPT-2 views the ids)
            while isinstance(src.owner, OnnxOp) and src.owner.op_type in ("Cast", "Reshape", "Identity") and \
                    oracle.shape(src.owner.operands[0]) == oracle.shape(ids):
                src = src.owner.operands[0]
            if roles.get(src) == "onnx:input_ids":
                index, what = index_arg(f, "token_ids"), "embedding of tokens"
            elif not oracle.is_data(ids) and all(
                    np.array_equal(oracle.value(ids, S), np.arange(S).reshape(oracle.shape(ids, S)))
                    for S in PROBE_LENGTHS) and len(oracle.shape(ids)) == 2:
                index, what = index_arg(f, "positions"), "embedding of positions"
            else:
                continue
            emb = L.EmbeddingOp(table, index)
            out = L.UnsqueezeBatchOp(emb.result)
            f.body.block.insert_ops_before([emb, out], gather)
            gather.results[0].replace_all_uses_with(out.result)
            erase_dead([gather])
            note(ctx, f"{self.name}: {what}")
