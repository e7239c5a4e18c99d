"""onnx-fuse-embedding: table lookups of the tokens (and of the positions) become llmir.embedding.

Before:  %e = "onnx.Gather"(%table, %input_ids) {axis = 0}             // [1, S, C]
After:   %e = "llmir.unsqueeze_batch"("llmir.embedding"(%table, %token_ids))

onnxruntime's GatherBlockQuantized of the tokens (onnxruntime-genai's int4 embedding, tied to the
LM head's MatMulNBits codes) becomes an embedding of the same `llmir.packed_weight` the head reads.

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
from llmirc.errors import CheckpointError
from llmirc.frontend.onnx_contrib import packed_weight
from llmirc.frontend.onnx_dialect import NoneOp, OnnxOp, numpy_dtype

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
        gathers = [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type == "Gather"]
        rotary = self._rotary_tables(gathers, oracle)
        for gather in gathers:
            table, ids = gather.operands
            # a table computed from the sequence length (a rotary cache read at position_ids) is no weight
            if gather.py_attrs().get("axis", 0) != 0 or oracle.kind(table) != CONST or len(L.shape_of(table)) != 2:
                continue
            if table in rotary:  # (read at the positions, it stays an s-only value the attention fusion reads)
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
            self._replace(ctx, f, gather, [], table, index, what, oracle)
        for gather in [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type == "GatherBlockQuantized"]:
            self._quantized(ctx, f, gather, oracle, roles)

    @staticmethod
    def _rotary_tables(gathers: list[OnnxOp], oracle: Oracle) -> set:
        """Stored tables read by rows that are a rotary cos/sin pair (cos^2 + sin^2 = 1 at every entry, up to
        half precision), not embeddings: onnxruntime's RotaryEmbedding reads them at position_ids."""
        tables = list({g.operands[0] for g in gathers if g.py_attrs().get("axis", 0) == 0 and
                       oracle.kind(g.operands[0]) == CONST and len(L.shape_of(g.operands[0])) == 2})
        pairs = set()
        for i, t in enumerate(tables):  # (only tables of one shape are read: an embedding alone never is)
            for u in tables[i + 1:]:
                if tuple(L.shape_of(t)) != tuple(L.shape_of(u)):
                    continue
                c, s = (np.asarray(oracle.value(x), np.float64) for x in (t, u))
                if np.abs(c ** 2 + s ** 2 - 1).max() < 2e-2:  # (bfloat16 tables: 2^-8 each)
                    pairs |= {t, u}
        return pairs

    @staticmethod
    def _scale_of(gather: OnnxOp, oracle: Oracle) -> tuple[OnnxOp, float] | None:
        """(Mul, c) when the lookup's only use multiplies it by a float scalar constant c (the builder writes
        Gemma's input scaling so, after a float Gather or the int4 GatherBlockQuantized): llmir.embedding's scale."""
        uses = list(gather.results[0].uses)
        if len(uses) != 1 or not isinstance(mul := uses[0].operation, OnnxOp) or mul.op_type != "Mul" or \
                mul.results[0].type != gather.results[0].type:
            return None
        other = mul.operands[1 - uses[0].index]
        if oracle.kind(other) != CONST or int(np.prod(oracle.shape(other))) != 1:
            return None
        c = np.asarray(oracle.value(other)).reshape(-1)
        return (mul, float(np.float32(c[0]))) if c.dtype.kind == "f" and np.isfinite(c[0]) else None

    def _replace(self, ctx, f, gather: OnnxOp, new: list, table, index, what: str, oracle: Oracle) -> None:
        scale = 1.0
        if (scaled := self._scale_of(gather, oracle)) is not None:  # Gemma's embedding * sqrt(hidden)
            mul, scale = scaled
            what = f"{what}, scaled by {scale:g}"
            mul.results[0].replace_all_uses_with(gather.results[0])
            erase_dead([mul])
        emb = L.EmbeddingOp(table, index, scale)
        out = L.UnsqueezeBatchOp(emb.result)
        f.body.block.insert_ops_before([*new, emb, out], gather)
        gather.results[0].replace_all_uses_with(out.result)
        erase_dead([gather])
        note(ctx, f"{self.name}: {what}")

    def _quantized(self, ctx, f, gather: OnnxOp, oracle: Oracle, roles: dict) -> None:
        """GatherBlockQuantized(codes, input_ids, scales[, zero_points]): an embedding of the packed table
        (onnxruntime-genai's tied embedding, the LM head's codes)."""
        data, ids, scales, zp = [*gather.operands, None][:4]
        zp = None if zp is None or isinstance(zp.owner, NoneOp) else zp
        a = gather.py_attrs()
        bits, block = int(a.get("bits", 4)), int(a.get("block_size", 128))
        k = L.shape_of(gather.results[0])[-1]
        if not (roles.get(ids) == "onnx:input_ids" and isinstance(data.owner, L.WeightOp) and
                all(v is None or oracle.kind(v) == CONST for v in (scales, zp))):
            raise CheckpointError(f"ONNX GatherBlockQuantized node '{gather.node.data}': llmirc reads it as the token "
                                  "embedding, of codes and scales stored in the model")
        try:
            table = packed_weight(data.owner.weight.data, L.shape_of(data), numpy_dtype(data.type.element_type),
                                  scales, None if zp is None else oracle.value(zp), k, bits, block)
        except ValueError as e:
            raise CheckpointError(f"ONNX GatherBlockQuantized node '{gather.node.data}': {e}") from None
        self._replace(ctx, f, gather, [table], table.result, index_arg(f, "token_ids"),
                      f"embedding of tokens ({bits}-bit, groups of {block}, kept quantized)", oracle)
