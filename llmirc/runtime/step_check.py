"""Every index a forward step passes to compiled code, checked against the sizes the library was
compiled for (its `llmir_model_info`, never manifest.json) before the native call.

The kernels trust their inputs (targets/cpu/kernels.py): a token id past the embedding table, a
position past a position table, a slot past the KV pool or a block-table entry past the block
count would read or write out of bounds. The scheduler never builds such a step; this is what
holds for any caller of `CpuExecutor.forward`. Cost: a few microseconds per decode step (Python
lists, builtin min/max), linear in the step's tokens and block-table entries.

Limits (RuntimeLimitError, naming the limit):
- token_ids in [0, token_rows) (the embedding table's rows; the vocabulary when no table);
- positions in [0, min(max_context, position_rows)), and below their sequence's seq_lens;
- seq_lens in [query length, max_context] and within the block table's max_blocks * block_size;
- slot_mapping below num_blocks * block_size (a negative slot is padding: kv_append skips it);
- the block-table entries a sequence uses (the first ceil(seq_lens / block_size)) in [0, num_blocks);
- logits_indices in [0, T).
Inconsistent shapes (query_start_loc not 0 .. T nondecreasing, lengths that disagree) are
LlmircErrors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmirc.errors import BundleError, LlmircError, RuntimeLimitError

INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
          "logits_indices")
_I32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class StepLimits:
    token_rows: int      # token ids index this many rows
    token_what: str      # what they are, for messages
    max_position: int    # positions are below this
    position_what: str
    max_context: int     # tokens per sequence
    num_blocks: int      # KV pool blocks
    block_size: int

    @classmethod
    def from_info(cls, info: dict, num_blocks: int, block_size: int, bundle: str) -> StepLimits:
        """The limits of a library's model info (see targets/cpu/forward.py model_info)."""
        try:
            context, vocab = int(info["max_context"]), int(info["logits_cols"])
            tokens, positions = info.get("token_rows"), info.get("position_rows")
            tokens, positions = (None if x is None else int(x) for x in (tokens, positions))
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"bundle {bundle}: the compiled library states no index limits (max_context, "
                              "token_rows, position_rows): it was built by an older llmirc; recompile it") from None
        if context < 1 or vocab < 1:
            raise BundleError(f"bundle {bundle}: the compiled library states a context of {context} and a "
                              f"vocabulary of {vocab}")
        token_what = f"the embedding table's {tokens} rows" if tokens is not None else f"the vocabulary of {vocab}"
        if positions is not None and positions < context:
            max_position, position_what = positions, f"the position table's {positions} rows"
        else:
            max_position, position_what = context, f"the model's context of {context} tokens"
        return cls(tokens if tokens is not None else vocab, token_what, max_position, position_what, context,
                   num_blocks, block_size)


def checked_inputs(limits: StepLimits, *arrays) -> list[np.ndarray]:
    """The seven ABI inputs (INPUTS order) as contiguous int32 arrays, once every index is within
    `limits`; raises RuntimeLimitError (a limit) or LlmircError (inconsistent inputs)."""
    if len(arrays) != len(INPUTS):
        raise LlmircError(f"a forward step takes {len(INPUTS)} inputs ({', '.join(INPUTS)}), got {len(arrays)}")
    out = [_int32(name, a, ndim) for name, a, ndim in zip(INPUTS, arrays, (1, 1, 1, 2, 1, 1, 1))]
    ids, pos, slots, tables, seq_lens, qsl, logits_idx = out
    T, B = len(ids), len(seq_lens)
    if len(pos) != T or len(slots) != T:
        raise LlmircError(f"forward step: token_ids, positions and slot_mapping must have one entry per token "
                          f"(got {T}, {len(pos)}, {len(slots)})")
    if tables.shape[0] != B or len(qsl) != B + 1:
        raise LlmircError(f"forward step: block_tables must have a row and query_start_loc B + 1 entries for the "
                          f"B = {B} sequences of seq_lens (got {tables.shape[0]} rows, {len(qsl)} entries)")
    # The checks below run on Python lists: a step's arrays are short, and builtin min/max over a
    # list or slice beat a NumPy call per check (this runs before every forward).
    q, lens, positions = qsl.tolist(), seq_lens.tolist(), pos.tolist()
    if q[0] != 0 or q[-1] != T or any(a > b for a, b in zip(q, q[1:])):
        raise LlmircError(f"forward step: query_start_loc must rise from 0 to the {T} tokens, got {q}")
    _below("token id", ids.tolist(), limits.token_rows, limits.token_what)
    _below("position", positions, limits.max_position, limits.position_what)
    _below("sequence length (seq_lens)", lens, limits.max_context + 1,
           f"the model's context of {limits.max_context} tokens")
    for b, n in enumerate(lens):
        if n < q[b + 1] - q[b]:
            raise LlmircError(f"forward step: sequence {b} has {q[b + 1] - q[b]} new tokens but seq_lens {n}")
        if q[b + 1] > q[b] and max(positions[q[b]:q[b + 1]]) >= n:
            t = next(t for t in range(q[b], q[b + 1]) if positions[t] >= n)
            raise RuntimeLimitError(f"position {positions[t]} of token {t} is not below its sequence's length "
                                    f"(seq_lens {n})")
    pool = limits.num_blocks * limits.block_size
    if T and max(slot_list := slots.tolist()) >= pool:
        raise RuntimeLimitError(f"slot {max(slot_list)} in slot_mapping is outside the KV cache's {pool} slots "
                                f"({limits.num_blocks} blocks of {limits.block_size})")
    rows = tables.tolist()
    for b, n in enumerate(lens):
        used = -(-n // limits.block_size)
        if used > tables.shape[1]:
            raise RuntimeLimitError(f"sequence {b} of {n} tokens needs {used} blocks but its "
                                    f"block table has {tables.shape[1]}")
        _below("block_tables entry", rows[b][:used], limits.num_blocks, f"the KV cache's {limits.num_blocks} blocks")
    _below("logits index", logits_idx.tolist(), T, f"the step's {T} tokens")
    return out


def checked_decode_run(limits: StepLimits, inputs, steps: int) -> list[np.ndarray]:
    """The checked inputs of the first of `steps` greedy decode steps (forward_greedy): one token, one
    logits row and a KV slot per sequence (LlmircError otherwise); the last step's positions and
    lengths, and the block-table entries they use, are checked too (the steps between lie between
    them; the slots of each step are those entries' slots, so within the pool once the entries are)."""
    first = checked_inputs(limits, *inputs)
    ids, pos, slots, tables, seq_lens, qsl, logits_idx = first
    B = len(seq_lens)
    if not (len(ids) == B == len(logits_idx)) or qsl.tolist() != list(range(B + 1)) or \
            logits_idx.tolist() != list(range(B)):
        raise LlmircError("forward_greedy: every sequence must have exactly one token and one logits row")
    if (slots < 0).any():  # (a GPU run keeps such rows as padding, which a CPU run would advance)
        raise LlmircError("forward_greedy: every sequence's token needs a KV slot (slot_mapping >= 0)")
    checked_inputs(limits, ids, pos + (steps - 1), slots, tables, seq_lens + (steps - 1), qsl, logits_idx)
    return first


def _int32(name: str, a, ndim: int) -> np.ndarray:
    """`a` as a contiguous int32 array of `ndim` dimensions (its values within int32)."""
    try:
        a = np.asarray(a)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise LlmircError(f"forward step: {name} is not an array of integers ({e})") from None
    if a.ndim != ndim:  # checked before ascontiguousarray, which makes a scalar 1-D
        raise LlmircError(f"forward step: {name} must be {ndim}-D, got shape {list(a.shape)}")
    if a.dtype == np.int32:  # the scheduler's steps: nothing to convert or range-check
        return np.ascontiguousarray(a)
    if a.size and a.dtype.kind not in "iu":
        raise LlmircError(f"forward step: {name} must be integers, got {a.dtype}")
    if a.size and (a.min() < _I32.min or a.max() > _I32.max):
        raise RuntimeLimitError(f"forward step: {name} holds {a.max() if a.max() > _I32.max else a.min()}, "
                                "outside the int32 range of the kernels")
    return np.ascontiguousarray(a, dtype=np.int32)


def _below(what: str, a: list[int], limit: int, limit_what: str) -> None:
    """a in [0, limit)."""
    if not a:
        return
    low, high = min(a), max(a)
    if low < 0:
        raise RuntimeLimitError(f"{what} {low} is negative")
    if high >= limit:
        raise RuntimeLimitError(f"{what} {high} is outside {limit_what}")
