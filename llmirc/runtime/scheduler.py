"""Continuous batching: which tokens of which sequences go into each forward step.

Each `schedule()` returns a `Step` holding the ABI inputs of one forward (DESIGN.md, "The ABI
every compiled model exposes"); the caller runs the model, samples one token per sampling row
and hands them to `commit()`, which returns stream events. Policy, in order, per step (vLLM's):

1. every running sequence in decode contributes its 1 new token;
2. running sequences still in prefill continue, as far as the token budget allows;
3. waiting requests are admitted first come first served while the budget and `max_num_seqs`
   allow and the KV cache has blocks for their first chunk; a prompt longer than the budget
   left is chunked over several steps. Only the chunk that reaches the end of a sequence has a
   sampling row (plus, for requests that ask for prompt logprobs, a row per prompt position).

Prefix caching (on by default): at admission a request takes the longest run of full blocks of
its prompt already in the prefix cache (`prefix_cache.py`) and its prefill starts after them
(`cached_tokens`); the last prompt token is always computed, for its logits. Every block a
sequence completes joins the cache at `commit()`. A request whose next uncached block is being
prefilled by a running sequence right now waits until that block is cached (SGLang's in-batch
prefix caching), so requests that arrive together with a shared system prompt compute it once.

Preemption by recompute (vLLM's policy): blocks are allocated as sequences grow, not reserved
for the worst case. When a running sequence cannot grow, the most recently admitted running
sequence is preempted: its blocks are released (the full ones stay in the prefix cache while
nothing needs them) and it goes back to the front of the waiting queue with its generated
tokens as part of its prompt, to be recomputed when it is admitted again. Requests that could
never fit (longer than the model's context, or needing more blocks than the whole cache) are
refused by `add_request`.

A full-sequence model (`full_sequence=True`) recomputes its whole sequence every step: one
sequence per step, no prefix caching, the step's tokens always start at position 0.
"""

from __future__ import annotations

import functools
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

    Row `i` of the logits (`logits_indices[i]`) belongs to request `request_ids[i]`. Its
    `targets[i]` is the prompt token that follows it (a prompt-logprob or scoring row), or -1
    for a row to sample from. `max_blocks` is the longest block table in this step, so it
    varies from step to step.
    """

    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    block_tables: np.ndarray  # [B, max_blocks], padded with 0
    seq_lens: np.ndarray  # [B]
    query_start_loc: np.ndarray  # [B + 1]
    logits_indices: np.ndarray  # [L]
    request_ids: list = field(default_factory=list)  # [L]
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [L]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @functools.cached_property
    def sample_rows(self) -> np.ndarray:
        """Indices of the logits rows to sample a token from."""
        return np.flatnonzero(self.targets < 0)

    def abi_inputs(self) -> tuple[np.ndarray, ...]:
        """The seven inputs in the ABI's pointer order."""
        return (self.token_ids, self.positions, self.slot_mapping, self.block_tables,
                self.seq_lens, self.query_start_loc, self.logits_indices)


@dataclass
class Event:
    """One generated token of one request (token None: finished without one, max_new_tokens 0)."""

    request_id: Hashable
    token: int | None
    finished: bool
    finish_reason: str | None = None  # "stop" (a stop id) or "length" (max_new_tokens)
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass(eq=False)  # identity: list.remove() must find this sequence, not an equal one
class Sequence:
    request_id: Hashable
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    blocks: SequenceBlocks
    logprobs_next: int  # next prompt position whose logprob is still to be reported (prompt_len: none)
    num_computed: int = 0  # tokens whose K/V is in the cache
    cached_tokens: int = 0  # found in the prefix cache at first admission
    admitted: bool = False
    finished: bool = False

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass
class _Chunk:
    """`tokens[start:start+n]` of one sequence in a step, and its logits rows (positions, targets)."""

    request_id: Hashable
    blocks: SequenceBlocks
    tokens: list[int]
    start: int
    rows: list[int]
    targets: list[int]
    seq: Sequence | None = None


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_context: int, *,
                 eos_token_ids: Iterable[int] = (), max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, vocab_size: int | None = None, enable_prefix_caching: bool = True,
                 full_sequence: bool = False):
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise the decode tokens alone could exceed one step's budget.
            raise LlmircError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({max_num_seqs})")
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("max_context", max_context)):
            if value < 1:
                raise LlmircError(f"{name} must be >= 1, got {value}")
        self.full_sequence = full_sequence
        if full_sequence:  # the whole sequence every step: one at a time, never chunked, nothing to reuse
            max_num_seqs, max_num_batched_tokens = 1, max(max_num_batched_tokens, max_context)
            enable_prefix_caching = False
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        # Admission keeps this many blocks spare while others run, so that admitting one
        # request does not force a preemption at once (vLLM's watermark, 1%).
        self.watermark = num_blocks // 100
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._pending: tuple[Step, list[_Chunk]] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def prefix_cache(self):
        return self.allocator.cache

    # -- requests ---------------------------------------------------------------------------

    def check_request(self, prompt: list[int], max_new_tokens: int, request_id: Hashable = None) -> None:
        """Raise the error `add_request` would for this request (reads only fixed settings: thread-safe)."""
        if not prompt:
            raise LlmircError(f"{_request(request_id)}the prompt is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise LlmircError(f"{_request(request_id)}max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self._check_tokens(prompt, request_id)
        total = len(prompt) + max_new_tokens
        if total > self.max_context:
            raise RuntimeLimitError(
                f"{_request(request_id)}prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"= {total} exceeds the model's context of {self.max_context} tokens")
        # The last sampled token is never fed back, so the cache holds at most total - 1 tokens.
        needed = blocks_for(max(len(prompt), total - 1), self.block_size)
        if needed > self.allocator.num_blocks:
            raise RuntimeLimitError(
                f"{_request(request_id)}prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"needs {needed} KV blocks of {self.block_size} tokens but the cache has only "
                f"{self.allocator.num_blocks}; load the model with a larger KV cache (--kv-cache-tokens, "
                f"load(kv_cache_tokens=...)) or lower max_new_tokens")

    def add_request(self, prompt: list[int], max_new_tokens: int, *, request_id: Hashable = None,
                    ignore_eos: bool = False, stop_token_ids: Iterable[int] = (),
                    prompt_logprobs_from: int | None = None) -> Hashable:
        """Queue a request; returns its id (a fresh integer unless `request_id` is given).

        `max_new_tokens` 0 only computes the prompt (to fill the prefix cache, or for prompt
        logprobs). `prompt_logprobs_from` p asks for a logits row at every prompt position
        p-1 .. len-2 (the distribution of prompt tokens p .. len-1)."""
        if request_id is None:
            request_id = next(i for i in self._ids if self._find(i) is None)
        if self._find(request_id) is not None:
            raise LlmircError(f"request id {request_id!r} is already in use")
        self.check_request(prompt, max_new_tokens, request_id)
        stop_ids = frozenset(int(t) for t in stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        logprobs_next = len(prompt) if prompt_logprobs_from is None else min(max(1, prompt_logprobs_from), len(prompt))
        self.waiting.append(Sequence(request_id, [int(t) for t in prompt], len(prompt), max_new_tokens, stop_ids,
                                     SequenceBlocks(self.allocator, self.block_size), logprobs_next))
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
        budget = self.max_num_batched_tokens
        chunks: list[_Chunk] = []
        preempted = False
        # Decodes first (one token each, always fit: running <= max_num_seqs <= budget), then
        # unfinished prefills, so a long prompt never stalls the sequences already generating.
        in_decode = [s for s in self.running if s.remaining == 1]
        for seq in in_decode + [s for s in self.running if s.remaining > 1]:
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.remaining, budget)
            while not seq.blocks.allocator.can_allocate(seq.blocks.blocks_needed(seq.num_computed + n)):
                victim = self.running[-1]
                budget += self._preempt(victim, chunks)
                preempted = True
                if victim is seq:
                    break
            if seq in self.running:
                budget -= self._schedule_chunk(seq, n, chunks)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            nodes = self._cached_prefix(seq)
            start = len(nodes) * self.block_size
            if self._being_prefilled(seq, start):
                break  # its next block will be cached within a step or two: wait for it
            n = min(len(seq.tokens) - start, budget)
            blocks = blocks_for(start + n, self.block_size) - len(nodes)
            reserve = self.watermark if self.running else 0
            available = self.allocator.num_available - sum(1 for node in nodes if node.ref == 0)
            if blocks + reserve > available:
                break  # first come first served: later requests wait behind this one
            self.waiting.popleft()
            if self.prefix_cache is not None:
                seq.blocks.adopt(nodes)
                if not seq.admitted:
                    self.prefix_cache.record_lookup(seq.prompt_len, start)
            if not seq.admitted:
                seq.cached_tokens, seq.admitted = start, True
            seq.num_computed = start
            self.running.append(seq)
            budget -= self._schedule_chunk(seq, n, chunks)
        if not chunks:
            return None
        step = _build_step(chunks)
        self._pending = (step, chunks)
        return step

    def commit(self, step: Step, sampled_tokens) -> list[Event]:
        """Record the token sampled for each sampling row of `step` (`step.sample_rows`, in order).

        Returns one event per sampled token, and one (token None) per request that finished
        without sampling (max_new_tokens 0)."""
        if self._pending is None or self._pending[0] is not step:
            raise RuntimeError("commit() must get the step returned by the last schedule()")
        sampled = [int(t) for t in np.asarray(sampled_tokens).reshape(-1)]
        if len(sampled) != len(step.sample_rows):
            raise ValueError(f"expected {len(step.sample_rows)} sampled tokens, got {len(sampled)}")
        chunks = self._pending[1]
        self._pending = None
        return self._commit_chunks(chunks, sampled)

    def reserve_decode_run(self, step: Step, n: int) -> int:
        """How many decode steps `step` (pending, every sequence decoding one token) may run at once
        (multi-step decode, vLLM's `num_scheduler_steps`): at most n, no more than any of its
        sequences may still generate, and only with the KV blocks for all of them allocated here
        (released as usual when a sequence finishes). 1 when the step is not such a step."""
        if self._pending is None or self._pending[0] is not step or self.full_sequence:
            return 1
        chunks = self._pending[1]
        if any(len(c.tokens) != 1 or c.targets != [-1] for c in chunks):
            return 1
        n = min([n] + [c.seq.max_new_tokens - c.seq.num_generated for c in chunks])
        need = sum(c.blocks.blocks_needed(c.seq.num_computed + n) for c in chunks)
        if n < 2 or need > self.allocator.num_available:
            return 1
        for c in chunks:
            c.blocks.ensure_capacity(c.seq.num_computed + n)
        step.block_tables = _block_tables(chunks)  # with the blocks just allocated
        return n

    def commit_run(self, step: Step, tokens) -> list[Event]:
        """commit() for a run of decode steps (reserve_decode_run): `tokens` [n, sequences] holds
        step i's token of each sequence; a sequence that finishes at step i ignores the rest."""
        if self._pending is None or self._pending[0] is not step:
            raise RuntimeError("commit_run() must get the step returned by the last schedule()")
        chunks = self._pending[1]
        self._pending = None
        return [e for row in np.asarray(tokens).tolist() for e in self._commit_chunks(chunks, row)]

    def discard(self, step: Step) -> None:
        """Forget the pending `step` unrecorded (it was interrupted): its sequences compute the same
        chunks in the next step, writing the same KV slots again (only a commit caches blocks)."""
        if self._pending is not None and self._pending[0] is step:
            self._pending = None

    def _commit_chunks(self, chunks: list[_Chunk], sampled: list[int]) -> list[Event]:
        events = []
        tokens = iter(sampled)
        for chunk in chunks:
            seq = chunk.seq
            token = next(tokens) if chunk.targets and chunk.targets[-1] < 0 else None
            if seq.finished:  # aborted while the step ran
                continue
            seq.num_computed += len(chunk.tokens)
            prompt_rows = [p for p, t in zip(chunk.rows, chunk.targets) if t >= 0]
            if prompt_rows:  # reported now, never again (not after a preemption either)
                seq.logprobs_next = max(seq.logprobs_next, prompt_rows[-1] + 2)
            seq.blocks.cache_full_blocks(seq.tokens, seq.num_computed)
            prompt_only_done = seq.max_new_tokens == 0 and seq.num_computed == len(seq.tokens)
            if self.full_sequence:
                seq.num_computed = 0  # the next step recomputes everything
            if token is not None:
                seq.tokens.append(token)
                reason = "stop" if token in seq.stop_ids else \
                    "length" if seq.num_generated >= seq.max_new_tokens else None
            elif prompt_only_done:
                reason = "length"
            else:
                continue
            if reason:
                self.running.remove(seq)
                self._finish(seq)
            events.append(Event(seq.request_id, token, reason is not None, reason, seq.cached_tokens))
        return events

    # -- scoring ------------------------------------------------------------------------------

    def score_steps(self, token_ids: list[int], request_id: Hashable = "score") -> Iterator[Step]:
        """Steps that compute logits at every position of one sequence, chunked by the token budget.

        Run each yielded step's forward before asking for the next one; the blocks are freed when
        the generator ends or is closed. Blocks used by running requests are not touched, so
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
        available = self.allocator.num_available
        if needed > available:
            raise RuntimeLimitError(
                f"scoring {len(token_ids)} tokens needs {needed} KV blocks but only {available} of the cache's "
                f"{self.allocator.num_blocks} are available; load the model with a larger KV cache "
                f"(--kv-cache-tokens, load(kv_cache_tokens=...)) or score fewer tokens")
        return self._score_steps([int(t) for t in token_ids], request_id)

    def _score_steps(self, tokens: list[int], request_id: Hashable) -> Iterator[Step]:
        # A separate generator so that score_steps() validates when called, not at first next().
        blocks = SequenceBlocks(self.allocator, self.block_size)
        try:
            for start in range(0, len(tokens), self.max_num_batched_tokens):
                chunk = tokens[start:start + self.max_num_batched_tokens]
                blocks.ensure_capacity(start + len(chunk))
                rows = list(range(start, start + len(chunk)))
                targets = [tokens[p + 1] if p + 1 < len(tokens) else -1 for p in rows]
                yield _build_step([_Chunk(request_id, blocks, chunk, start, rows, targets)])
        finally:
            blocks.release()

    # -- helpers ------------------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list:
        """Prefix-cache nodes `seq` can start from: never its last token (its logits are needed),
        nor a prompt position whose logits are still to be reported."""
        if self.prefix_cache is None:
            return []
        return self.prefix_cache.match(seq.tokens, self._prefix_limit(seq))

    @staticmethod
    def _prefix_limit(seq: Sequence) -> int:
        """The most tokens of `seq` that may come from the prefix cache (see `_cached_prefix`)."""
        limit = len(seq.tokens) - 1
        if seq.logprobs_next < seq.prompt_len:
            limit = min(limit, seq.logprobs_next - 1)
        return limit

    def _being_prefilled(self, seq: Sequence, start: int) -> bool:
        """Whether a running sequence is computing the block of `seq`'s prompt after its `start` cached tokens
        (one `seq` could take from the cache: a block holding its last token, or a prompt position whose
        logprob it reports, is computed anyway, so waiting for it would only hold up the queue)."""
        end = start + self.block_size
        if self.prefix_cache is None or end > min(seq.prompt_len, self._prefix_limit(seq)):
            return False
        return any(s.num_computed < end <= s.prompt_len and s.tokens[:end] == seq.tokens[:end] for s in self.running)

    def _schedule_chunk(self, seq: Sequence, n: int, chunks: list[_Chunk]) -> int:
        """Allocate blocks for the next `n` tokens of `seq` and add them to `chunks`; returns n."""
        start, end = seq.num_computed, seq.num_computed + n
        seq.blocks.ensure_capacity(end)
        # Prompt-logprob rows: positions p whose next prompt token p+1 is still to be reported.
        rows = list(range(max(start, seq.logprobs_next - 1), min(end, seq.prompt_len - 1)))
        targets = [seq.tokens[p + 1] for p in rows]
        if end == len(seq.tokens) and seq.max_new_tokens > 0:
            rows.append(end - 1)
            targets.append(-1)
        chunks.append(_Chunk(seq.request_id, seq.blocks, seq.tokens[start:end], start, rows, targets, seq))
        return n

    def _preempt(self, seq: Sequence, chunks: list[_Chunk]) -> int:
        """Send a running sequence back to the front of the queue; returns the budget its chunk held."""
        refund = 0
        for chunk in [c for c in chunks if c.seq is seq]:
            chunks.remove(chunk)
            refund += len(chunk.tokens)
        self.running.remove(seq)
        seq.blocks.release()
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return refund

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
                f"{_request(request_id)}token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}")


def _build_step(chunks: list[_Chunk]) -> Step:
    # Plain lists, one array per input at the end: a decode step has a handful of entries, and
    # each NumPy call on them costs more than the Python work it replaces.
    token_ids, positions, slots, seq_lens, query_start_loc = [], [], [], [], [0]
    logits_indices, request_ids, targets = [], [], []
    for c in chunks:
        n, q0 = len(c.tokens), query_start_loc[-1]
        token_ids += c.tokens
        positions += range(c.start, c.start + n)
        slots += c.blocks.slots(c.start, n)
        seq_lens.append(c.start + n)
        query_start_loc.append(q0 + n)
        logits_indices += [q0 + p - c.start for p in c.rows]
        request_ids += [c.request_id] * len(c.rows)
        targets += c.targets
    i32 = lambda a: np.array(a, dtype=np.int32)  # noqa: E731
    return Step(token_ids=i32(token_ids), positions=i32(positions), slot_mapping=i32(slots),
                block_tables=_block_tables(chunks), seq_lens=i32(seq_lens), query_start_loc=i32(query_start_loc),
                logits_indices=i32(logits_indices), request_ids=request_ids,
                targets=np.array(targets, dtype=np.int64))


def _block_tables(chunks: list[_Chunk]) -> np.ndarray:
    """int32 [sequences, longest table], padded with 0."""
    tables = np.zeros((len(chunks), max(len(c.blocks.block_table) for c in chunks)), dtype=np.int32)
    for i, c in enumerate(chunks):
        tables[i, :len(c.blocks.block_table)] = c.blocks.block_table
    return tables


def _request(request_id: Hashable) -> str:
    """The prefix naming a request in an error ("" when checked before it has an id)."""
    return "" if request_id is None else f"request {request_id!r}: "
