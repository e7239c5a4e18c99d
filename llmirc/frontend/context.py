"""The context a bundle states, and the index limits its compiled library checks.

A bundle's context (`max_position_embeddings` in its manifest and `max_context` in its library)
is never larger than what its weights support: a learned position table (GPT-2's wpe), a
precomputed rotary cache or causal mask of an ONNX export has a fixed number of rows, and a
position past them would read past the table. The rules, in order:

1. `--max-model-len N` (vLLM's name) sets it, and is refused above what the source supports
   (its config's max_position_embeddings / n_positions, or its tables' rows);
2. else what the source's config states, capped at its tables' rows;
3. else its tables' rows (an ONNX export without config.json);
4. else DEFAULT_CONTEXT, said so by `compile` and `inspect`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmirc import dialect as L
from llmirc.errors import LlmircError
from llmirc.passes.func_args import arg_names, forward_func

DEFAULT_CONTEXT = 2048  # tokens, when neither the config nor the weights say


@dataclass(frozen=True)
class Limit:
    """A bound in tokens and what sets it, for messages: "config.json max_position_embeddings"."""

    tokens: int
    why: str


def table_rows(module, index: str) -> int | None:
    """Fewest rows of the llmir.embedding tables indexed by the forward's argument `index`
    (token_ids or positions), or None when none is."""
    f = forward_func(module)
    arg = next((a for a, n in zip(f.args, arg_names(f)) if n == index), None)
    rows = [L.shape_of(op.table)[0] for op in f.walk() if isinstance(op, L.EmbeddingOp) and op.token_ids is arg]
    return min(rows) if rows else None


def bundle_context(stated: Limit | None, tables: list[Limit], max_model_len: int | None) -> Limit:
    """The context of the bundle (see the module docstring). `stated` is the config's word,
    `tables` the position tables' rows."""
    table = min(tables, key=lambda t: t.tokens, default=None)
    cap = min((x for x in (stated, table) if x is not None), key=lambda t: t.tokens, default=None)
    if max_model_len is not None:
        if max_model_len < 1:
            raise LlmircError(f"--max-model-len {max_model_len}: must be at least 1")
        if cap is not None and max_model_len > cap.tokens:
            raise LlmircError(f"--max-model-len {max_model_len} exceeds the {cap.tokens} tokens the model supports "
                              f"({cap.why})")
        return Limit(max_model_len, "--max-model-len")
    if stated is not None and table is not None and table.tokens < stated.tokens:
        return Limit(table.tokens, f"{table.why}; {stated.why} says {stated.tokens}")
    if cap is not None:
        return cap
    return Limit(DEFAULT_CONTEXT, "default: the model states none; set it with --max-model-len")


def resolve_context(info: dict, module, max_model_len: int | None) -> Limit:
    """The bundle's context for a source whose model_info() is `info` (its `context`, what its config
    states, and `position_tables`, what its graph's tables allow) and whose optimized IR is `module`."""
    rows = table_rows(module, "positions")
    tables = info["position_tables"] + ([Limit(rows, f"the position table has {rows} rows")] if rows else [])
    return bundle_context(info["context"], tables, max_model_len)


def index_limits(module, context: Limit) -> dict:
    """What the compiled library states about the indices it reads (targets/plan.py Plan.limits)."""
    return {"token_rows": table_rows(module, "token_ids"), "position_rows": table_rows(module, "positions"),
            "max_context": context.tokens}
