"""Continuous batching: which tokens of which sequences go into each forward step.

Each `schedule()` returns a `Step` holding the ABI inputs of one forward (DESIGN.md, "The ABI
every compiled model exposes"); the caller runs the model, samples one token per logits row and
hands them to `commit()`, which returns stream events. Policy, in order, per step:

1. every running sequence in decode contributes its 1 new token;
2. running sequences still in prefill continue their prompt, as far as the token budget allows;
3. waiting requests are admitted first come first served while the budget and `max_num_seqs`
   allow and the KV cache can hold them (see below); a prompt longer than the budget left is
   chunked over several steps. Only the chunk that reaches the end of a prompt has a logits row.

KV blocks: a request is admitted only if its worst case (prompt + max_new_tokens - 1 tokens in
cache: the last sampled token is never fed back) fits in the free blocks left after what the
running sequences may still claim. Blocks are then allocated lazily as a sequence grows, so a
running sequence never runs out of blocks mid-way, and finished sequences free theirs at once.
There is no preemption or recompute (out of scope): should a running sequence still fail to
grow (the admission rule rules it out), `RuntimeLimitError` is raised rather than evicting
anything. Requests that could never fit (longer than the model's context, or needing more blocks
than the whole cache) are refused by `add_request`.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator

import numpy as np

from llmirc.errors import LlmircError, RuntimeLimitError
from llmirc.runtime.kv_cache import BlockAllocator, SequenceBlocks, blocks_for


@dataclass
class Step:
    """The inputs of one forward, as int32 arrays in the ABI's shapes.

    `request_ids[i]` is the request whose token `logits_indices[i]` is. `max_blocks` is the
    longest block table in this step, so it varies from step to step.
    """

    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    block_tables: np.ndarray  # [B, max_blocks], padded with 0
    seq_lens: np.ndarray  # [B]
    query_start_loc: np.ndarray  # [B + 1]
    logits_indices: np.ndarray  # [L]
    request_ids: list = field(default_factory=list)  # [L]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def abi_inputs(self) -> tuple[np.ndarray, ...]:
        """The seven inputs in the ABI's pointer order."""
        return (self.token_ids, self.positions, self.slot_mapping, self.block_tables,
                self.seq_lens, self.query_start_loc, self.logits_indices)


@dataclass
class Event:
    """One generated token of one request, for streaming."""

    request_id: Hashable
    token: int
    finished: bool
    finish_reason: str | None = None  # "stop" (a stop id) or "length" (max_new_tokens)


@dataclass(eq=False)  # identity: list.remove() must find this sequence, not an equal one
class Sequence:
    request_id: Hashable
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    blocks: SequenceBlocks
    num_computed: int = 0  # tokens whose K/V is in the cache
    finished: bool = False

    @property
    def max_cached_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens - 1

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class _Chunk:
    """`tokens[start:start+n]` of one sequence in a step; `logits` says which rows get logits."""

    request_id: Hashable
    blocks: SequenceBlocks
    tokens: list[int]
    start: int
    logits: str | None  # None, "last" or "all"
    seq: Sequence | None = None


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_context: int, *,
                 eos_token_ids: Iterable[int] = (), max_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, vocab_size: int | None = None):
        if max_batched_tokens < max_num_seqs:
            # Otherwise the decode tokens alone could exceed one step's budget.
            raise LlmircError(f"max_batched_tokens ({max_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})")
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("max_context", max_context)):
            if value < 1:
                raise LlmircError(f"{name} must be >= 1, got {value}")
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batched_tokens = max_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._pending: tuple[Step, list[_Chunk]] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, prompt: list[int], max_new_tokens: int, *, request_id: Hashable = None,
                    ignore_eos: bool = False, stop_token_ids: Iterable[int] = ()) -> Hashable:
        """Queue a request; returns its id (a fresh integer unless `request_id` is given)."""
        if request_id is None:
            request_id = next(i for i in self._ids if self._find(i) is None)
        if self._find(request_id) is not None:
            raise LlmircError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise LlmircError(f"request {request_id!r}: the prompt is empty")
        if max_new_tokens < 1:
            raise LlmircError(f"request {request_id!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_tokens(prompt, request_id)
        total = len(prompt) + max_new_tokens
        if total > self.max_context:
            raise RuntimeLimitError(
                f"request {request_id!r}: prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"= {total} exceeds the model's context of {self.max_context} tokens")
        stop_ids = frozenset(int(t) for t in stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        seq = Sequence(request_id, [int(t) for t in prompt], len(prompt), max_new_tokens, stop_ids,
                       SequenceBlocks(self.allocator, self.block_size))
        needed = blocks_for(seq.max_cached_tokens, self.block_size)
        if needed > self.allocator.num_blocks:
            raise RuntimeLimitError(
                f"request {request_id!r}: prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"needs {needed} KV blocks of {self.block_size} tokens but the cache has only "
                f"{self.allocator.num_blocks}; load the model with a larger KV cache or lower max_new_tokens")
        self.waiting.append(seq)
        return request_id

    def abort(self, request_id: Hashable) -> bool:
        """Drop a request (waiting or running) and free its blocks; False if unknown."""
        seq = self._find(request_id)
        if seq is None:
            return False
        (self.waiting if seq in self.waiting else self.running).remove(seq)
        self._finish(seq)
        return True

    # -- generation steps -------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """Build the next step; None when nothing can run now (no work, or a score pass holds the blocks)."""
        if self._pending is not None:
            raise RuntimeError("commit() the previous step before scheduling the next")
        budget = self.max_batched_tokens
        chunks: list[_Chunk] = []
        # Decodes first (one token each, always fit: running <= max_num_seqs <= budget), then
        # unfinished prefills, so a long prompt never stalls the sequences already generating.
        in_decode = [s for s in self.running if s.num_computed >= s.prompt_len]
        in_prefill = [s for s in self.running if s.num_computed < s.prompt_len]
        for seq in in_decode + in_prefill:
            if budget == 0:
                break
            budget -= self._schedule_chunk(seq, budget, chunks)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if blocks_for(seq.max_cached_tokens, self.block_size) > self.allocator.num_free - self._reserved_blocks():
                break  # first come first served: later requests wait behind this one
            self.running.append(self.waiting.popleft())
            budget -= self._schedule_chunk(seq, budget, chunks)
        if not chunks:
            return None
        step = _build_step(chunks)
        self._pending = (step, chunks)
        return step

    def commit(self, step: Step, sampled_tokens) -> list[Event]:
        """Record the token sampled for each logits row of `step`; returns one event per row."""
        if self._pending is None or self._pending[0] is not step:
            raise RuntimeError("commit() must get the step returned by the last schedule()")
        sampled = [int(t) for t in np.asarray(sampled_tokens).reshape(-1)]
        if len(sampled) != len(step.logits_indices):
            raise ValueError(f"expected {len(step.logits_indices)} sampled tokens, got {len(sampled)}")
        chunks = self._pending[1]
        self._pending = None
        events = []
        rows = iter(sampled)
        for chunk in chunks:
            seq = chunk.seq
            token = next(rows) if chunk.logits else None
            if seq.finished:  # aborted while the step ran
                continue
            seq.num_computed += len(chunk.tokens)
            if token is None:
                continue
            seq.tokens.append(token)
            reason = "stop" if token in seq.stop_ids else "length" if seq.num_generated >= seq.max_new_tokens else None
            if reason:
                self.running.remove(seq)
                self._finish(seq)
            events.append(Event(seq.request_id, token, reason is not None, reason))
        return events

    # -- scoring ------------------------------------------------------------------------------

    def score_steps(self, token_ids: list[int], request_id: Hashable = "score") -> Iterator[Step]:
        """Steps that compute logits at every position of one sequence, chunked by the token budget.

        Run each yielded step's forward before asking for the next one; the blocks are freed when
        the generator ends or is closed. Blocks promised to running requests are not touched, so
        this can run between generation steps (not inside one: commit() pending steps first).
        """
        if self._pending is not None:
            raise RuntimeError("commit() the pending step before scoring")
        if not token_ids:
            raise LlmircError("nothing to score: the token list is empty")
        self._check_tokens(token_ids, request_id)
        if len(token_ids) > self.max_context:
            raise RuntimeLimitError(
                f"scoring {len(token_ids)} tokens exceeds the model's context of {self.max_context} tokens")
        needed = blocks_for(len(token_ids), self.block_size)
        available = self.allocator.num_free - self._reserved_blocks()
        if needed > available:
            raise RuntimeLimitError(
                f"scoring {len(token_ids)} tokens needs {needed} KV blocks but only {available} of the cache's "
                f"{self.allocator.num_blocks} are available; load the model with a larger KV cache "
                f"or score fewer tokens")
        return self._score_steps([int(t) for t in token_ids], request_id)

    def _score_steps(self, tokens: list[int], request_id: Hashable) -> Iterator[Step]:
        # A separate generator so that score_steps() validates when called, not at first next().
        blocks = SequenceBlocks(self.allocator, self.block_size)
        try:
            for start in range(0, len(tokens), self.max_batched_tokens):
                chunk = tokens[start:start + self.max_batched_tokens]
                blocks.ensure_capacity(start + len(chunk))
                yield _build_step([_Chunk(request_id, blocks, chunk, start, "all")])
        finally:
            blocks.release()

    # -- helpers ------------------------------------------------------------------------------

    def _schedule_chunk(self, seq: Sequence, budget: int, chunks: list[_Chunk]) -> int:
        """Reserve blocks for the next tokens of `seq` and add them to `chunks`; returns how many."""
        n = min(len(seq.tokens) - seq.num_computed, budget)
        end = seq.num_computed + n
        seq.blocks.ensure_capacity(end)  # raises RuntimeLimitError if the cache is full
        logits = "last" if end == len(seq.tokens) else None
        tokens = seq.tokens[seq.num_computed:end]
        chunks.append(_Chunk(seq.request_id, seq.blocks, tokens, seq.num_computed, logits, seq))
        return n

    def _reserved_blocks(self) -> int:
        """Blocks running sequences may still allocate before they finish."""
        return sum(blocks_for(s.max_cached_tokens, self.block_size) - len(s.blocks.block_table) for s in self.running)

    def _find(self, request_id: Hashable) -> Sequence | None:
        return next((s for s in itertools.chain(self.waiting, self.running) if s.request_id == request_id), None)

    def _finish(self, seq: Sequence) -> None:
        seq.finished = True
        seq.blocks.release()

    def _check_tokens(self, tokens: list[int], request_id: Hashable) -> None:
        if self.vocab_size is None:
            return
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise RuntimeLimitError(
                f"request {request_id!r}: token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}")


def _build_step(chunks: list[_Chunk]) -> Step:
    lengths = [len(c.tokens) for c in chunks]
    positions = [np.arange(c.start, c.start + n) for c, n in zip(chunks, lengths)]
    query_start_loc = np.concatenate([[0], np.cumsum(lengths)])
    block_tables = np.zeros((len(chunks), max(len(c.blocks.block_table) for c in chunks)), dtype=np.int32)
    logits_indices, request_ids = [], []
    for i, c in enumerate(chunks):
        block_tables[i, :len(c.blocks.block_table)] = c.blocks.block_table
        first, end = query_start_loc[i], query_start_loc[i + 1]
        rows = range(end - 1, end) if c.logits == "last" else range(first, end) if c.logits == "all" else ()
        logits_indices.extend(rows)
        request_ids.extend([c.request_id] * len(rows))
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    return Step(
        token_ids=i32([t for c in chunks for t in c.tokens]),
        positions=i32(np.concatenate(positions)),
        slot_mapping=i32(np.concatenate([c.blocks.slots(p) for c, p in zip(chunks, positions)])),
        block_tables=block_tables,
        seq_lens=i32([c.start + n for c, n in zip(chunks, lengths)]),
        query_start_loc=i32(query_start_loc),
        logits_indices=i32(logits_indices),
        request_ids=request_ids,
    )
