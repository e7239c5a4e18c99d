"""paged-kv: full-sequence attention -> a paged KV cache (kv_append + paged_attention).

This is what turns the front end's whole-sequence forward into an incremental decoder: each
step writes the new tokens' K/V into a pool of fixed-size blocks and attends over the cache
through per-sequence block tables (vLLM's PagedAttention).

Before:  %a = "llmir.attention"(%q, %k, %v) {num_heads, num_kv_heads, head_dim, scale, sliding_window}
After:   %pool1 = "llmir.kv_append"(%k, %v, %slot_mapping, %pool0) {layer = i}
         %a = "llmir.paged_attention"(%q, %pool1, %block_tables, %seq_lens, %query_start_loc, %positions)
              {layer = i, ...}

The function gains the arguments slot_mapping, block_tables, seq_lens, query_start_loc and the
pool (`!llmir.kv_pool`), and returns the updated pool after the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, i32
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.errors import LlmircError, UsageError

from .func_args import add_arg, find_arg, forward_func
from .report import note


MAX_BLOCK_SIZE = 256  # tokens; vLLM's CUDA blocks go to 128. The kernels unroll over a block: 4096 took
                     # 55 s and 3 GB of code generation, 1M exhausted the machine's memory


def block_size_problem(block_size: int) -> str | None:
    """Why `block_size` (tokens per KV cache block) cannot be used, or None."""
    if not 1 <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        return f"must be a power of two from 1 to {MAX_BLOCK_SIZE}"
    return None


@dataclass(frozen=True)
class PagedKV(ModulePass):
    name = "paged-kv"

    block_size: int = 16

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if why := block_size_problem(self.block_size):
            raise UsageError(f"paged-kv: block-size {self.block_size}: {why}")
        f = forward_func(op)
        attentions = [o for o in f.walk() if isinstance(o, L.AttentionOp)]
        if not attentions:
            return
        shapes = {(a.num_kv_heads.value.data, a.head_dim.value.data) for a in attentions}
        if len(shapes) != 1:
            raise LlmircError(f"paged-kv: layers differ in kv heads/head dim {sorted(shapes)}; not supported")
        (kv_heads, head_dim), = shapes
        vec = L.tensor(L.DYN, dtype=i32)

        def arg(name, type):
            return find_arg(f, name) or add_arg(f, name, type)

        positions = arg("positions", vec)  # new for a model without position encodings (NoPE)

        slots, tables = arg("slot_mapping", vec), arg("block_tables", L.tensor(L.DYN, L.DYN, dtype=i32))
        seq_lens, starts = arg("seq_lens", vec), arg("query_start_loc", vec)
        pool = add_arg(f, "kv_pool", L.KVPoolType(len(attentions), kv_heads, head_dim, self.block_size))
        block = f.body.block
        for layer, att in enumerate(attentions):
            append = L.KVAppendOp(att.k, att.v, slots, pool, layer)
            paged = L.PagedAttentionOp(
                att.q, append.result, tables, seq_lens, starts, positions, layer=layer,
                num_heads=att.num_heads.value.data, num_kv_heads=kv_heads, head_dim=head_dim,
                scale=att.scale.value.data, sliding_window=att.sliding_window.value.data, softcap=att.softcap_value())
            block.insert_op_before(append, att)
            block.insert_op_before(paged, att)
            att.result.replace_all_uses_with(paged.result)
            block.erase_op(att)
            pool = append.result
        note(ctx, f"{self.name}: attention -> kv_append + paged_attention", len(attentions))
        ret = f.get_return_op()
        ret.operands = [*ret.operands, pool]
        f.update_function_type()
