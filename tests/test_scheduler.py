"""The scheduler against a fake numpy "model" that keeps its own paged KV store.

The fake model reads each sequence's history back through its block table and checks every
slot holds the token of that position: a block shared through the prefix cache, evicted, or
reused after a preemption with the wrong contents fails the test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmirc.errors import LlmircError, RuntimeLimitError
from llmirc.runtime.kv_cache import blocks_for
from llmirc.runtime.scheduler import Scheduler

VOCAB = 23
EOS = 0


def next_token(history) -> int:
    """The fake model: the next token is a hash of the whole history."""
    h = 0
    for t in history:
        h = (h * 31 + int(t) + 7) % 1_000_003
    return h % VOCAB


class FakeModel:
    """Writes (token, position) into its pool by slot, reads each sequence back through its block table."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.pool = np.full((num_blocks * block_size, 2), -1, dtype=np.int64)  # stale data is never cleared

    def forward(self, step):
        for tok, pos, slot in zip(step.token_ids, step.positions, step.slot_mapping):
            if slot >= 0:
                self.pool[slot] = (tok, pos)
        logits = np.zeros((len(step.logits_indices), VOCAB), dtype=np.float32)
        for r, row in enumerate(step.logits_indices):
            b = np.searchsorted(step.query_start_loc, row, side="right") - 1
            last = step.positions[row]
            slots = [step.block_tables[b, p // self.bs] * self.bs + p % self.bs for p in range(last + 1)]
            history = self.pool[slots]
            assert (history[:, 1] == np.arange(last + 1)).all(), "read a slot written for another position"
            logits[r, next_token(history[:, 0])] = 1.0
        return logits


def reference(prompt, max_new_tokens, stop_ids=(EOS,)):
    tokens, out = list(prompt), []
    while len(out) < max_new_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


def check_step(step, sched, scoring=False):
    i32 = [step.token_ids, step.positions, step.slot_mapping, step.block_tables, step.seq_lens,
           step.query_start_loc, step.logits_indices]
    assert all(a.dtype == np.int32 for a in i32)
    T, B = step.num_tokens, step.num_seqs
    qsl = step.query_start_loc
    assert step.positions.shape == step.slot_mapping.shape == (T,) and qsl.shape == (B + 1,)
    assert step.block_tables.shape[0] == B and len(step.request_ids) == len(step.logits_indices)
    assert qsl[0] == 0 and qsl[-1] == T and (np.diff(qsl) > 0).all()
    assert T <= sched.max_num_batched_tokens
    bs = sched.block_size
    for b in range(B):
        pos = step.positions[qsl[b]:qsl[b + 1]]
        np.testing.assert_array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))
        assert step.seq_lens[b] == pos[-1] + 1
        expect = step.block_tables[b, pos // bs] * bs + pos % bs
        np.testing.assert_array_equal(step.slot_mapping[qsl[b]:qsl[b + 1]], expect)
    assert len(set(step.slot_mapping.tolist())) == T
    if not scoring:  # generation: logits only at the end of a chunk
        assert set(step.logits_indices.tolist()) <= set((qsl[1:] - 1).tolist())


def check_live_slots_unique(sched):
    """Private blocks belong to one sequence; shared ones are prefix-cache nodes; nothing is lost."""
    private = [b for s in sched.running for b in s.blocks.block_table[len(s.blocks.nodes):]]
    assert len(private) == len(set(private))
    cache = sched.prefix_cache
    cached = cached_blocks(cache) if cache else set()
    assert not set(private) & cached
    assert len(private) + len(cached) + sched.allocator.num_free == sched.allocator.num_blocks
    for s in sched.running:
        assert [n.block for n in s.blocks.nodes] == s.blocks.block_table[:len(s.blocks.nodes)]


def cached_blocks(cache) -> set[int]:
    out, todo = set(), [cache.root]
    while todo:
        node = todo.pop()
        for child in node.children.values():
            out.add(child.block)
            todo.append(child)
    assert len(out) == cache.num_cached
    return out


def run(sched, model, add_later=(), check=True):
    """Drive the scheduler to completion; returns {request_id: tokens} and the steps' shapes."""
    outputs, shapes, later = {}, [], list(add_later)
    while sched.has_work or later:
        if later:  # continuous batching: a new request arrives every step
            rid, prompt, n = later.pop(0)
            sched.add_request(prompt, n, request_id=rid)
        step = sched.schedule()
        if step is None:
            assert later, "the scheduler stalled"
            continue
        if check:
            check_step(step, sched)
        shapes.append((step.num_tokens, step.num_seqs, len(step.logits_indices)))
        sampled = model.forward(step)[step.sample_rows].argmax(-1)
        for ev in sched.commit(step, sampled):
            outputs.setdefault(ev.request_id, []).append(ev.token)
        if check:
            check_live_slots_unique(sched)
    return outputs, shapes


def make(num_blocks=32, block_size=4, max_context=64, **kw):
    return Scheduler(num_blocks, block_size, max_context, eos_token_ids=[EOS], **kw), FakeModel(num_blocks, block_size)


def test_single_request_arrays():
    sched, _ = make(block_size=4)
    rid = sched.add_request([5, 6, 7, 8, 9], 3, ignore_eos=True)
    step = sched.schedule()
    np.testing.assert_array_equal(step.token_ids, [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(step.positions, range(5))
    np.testing.assert_array_equal(step.query_start_loc, [0, 5])
    np.testing.assert_array_equal(step.seq_lens, [5])
    np.testing.assert_array_equal(step.logits_indices, [4])
    assert step.block_tables.shape == (1, 2) and step.request_ids == [rid]
    events = sched.commit(step, [11])
    assert [(e.request_id, e.token, e.finished) for e in events] == [(rid, 11, False)]
    step = sched.schedule()
    np.testing.assert_array_equal(step.token_ids, [11])
    np.testing.assert_array_equal(step.positions, [5])
    np.testing.assert_array_equal(step.seq_lens, [6])
    np.testing.assert_array_equal(step.logits_indices, [0])
    assert len(step.abi_inputs()) == 7


def test_chunked_prefill_only_last_chunk_has_logits():
    sched, model = make(max_num_batched_tokens=4, max_num_seqs=2)
    sched.add_request(list(range(1, 11)), 2, ignore_eos=True)
    steps = []
    for _ in range(3):
        steps.append(sched.schedule())
        check_step(steps[-1], sched)
        sched.commit(steps[-1], model.forward(steps[-1]).argmax(-1))
    assert [s.num_tokens for s in steps] == [4, 4, 2]
    assert [s.seq_lens.tolist() for s in steps] == [[4], [8], [10]]
    assert [s.logits_indices.tolist() for s in steps] == [[], [], [1]]
    np.testing.assert_array_equal(steps[1].positions, [4, 5, 6, 7])


def test_decode_and_prefill_mix_in_one_step():
    sched, model = make(max_num_batched_tokens=6, max_num_seqs=4)
    a = sched.add_request([1, 2, 3], 5, ignore_eos=True)
    step = sched.schedule()
    sched.commit(step, model.forward(step).argmax(-1))
    b = sched.add_request([4] * 9, 5, ignore_eos=True)
    step = sched.schedule()  # a decodes 1 token, b gets the remaining 5 of the budget
    check_step(step, sched)
    np.testing.assert_array_equal(step.query_start_loc, [0, 1, 6])
    assert step.request_ids == [a]  # b's chunk does not end its prompt
    sched.commit(step, model.forward(step).argmax(-1))
    step = sched.schedule()
    np.testing.assert_array_equal(step.query_start_loc, [0, 1, 5])
    assert step.request_ids == [a, b]


def test_stop_ids_and_length_finish_and_free_blocks():
    sched, _ = make(num_blocks=8)
    a = sched.add_request([1, 2], 10)
    b = sched.add_request([3], 2, ignore_eos=True, stop_token_ids=[7])
    c = sched.add_request([4], 2, ignore_eos=True)
    step = sched.schedule()
    events = sched.commit(step, [5, 6, 0])  # c ignores eos
    assert [e.finished for e in events] == [False, False, False]
    step = sched.schedule()
    events = sched.commit(step, [EOS, 7, 9])
    assert [(e.request_id, e.token, e.finished, e.finish_reason) for e in events] == [
        (a, EOS, True, "stop"), (b, 7, True, "stop"), (c, 9, True, "length")]
    assert not sched.has_work and sched.allocator.num_available == 8
    assert sched.schedule() is None


def test_add_time_rejections():
    sched, _ = make(num_blocks=4, block_size=4, max_context=20, vocab_size=VOCAB)
    with pytest.raises(RuntimeLimitError, match=r"= 21 exceeds the model's context of 20"):
        sched.add_request([1] * 11, 10)
    with pytest.raises(RuntimeLimitError, match=r"needs 5 KV blocks.*only 4.*larger KV cache"):
        sched.add_request([1] * 10, 8)  # 17 tokens in cache at most -> 5 blocks
    sched.add_request([1] * 9, 8)  # 16 tokens in cache -> exactly 4 blocks
    with pytest.raises(LlmircError, match="prompt is empty"):
        sched.add_request([], 4)
    with pytest.raises(LlmircError, match="max_new_tokens"):
        sched.add_request([1], -1)
    with pytest.raises(RuntimeLimitError, match="token id 23 is outside"):
        sched.add_request([1, 23], 1)
    sched.add_request([1], 1, request_id="x")
    with pytest.raises(LlmircError, match="already in use"):
        sched.add_request([1], 1, request_id="x")
    fresh, _ = make()
    fresh.add_request([1], 1, request_id=0)
    assert fresh.add_request([1], 1) == 1  # fresh ids skip the ones callers chose
    with pytest.raises(LlmircError, match="max_num_batched_tokens"):
        Scheduler(4, 4, 20, max_num_batched_tokens=8, max_num_seqs=16)


@pytest.mark.parametrize("caching", [False, True])
def test_admission_takes_the_first_chunk_and_full_cache_preempts_the_newest(caching):
    # Each request may grow to 4 blocks; the cache has 4. Both are admitted at once (no worst-case
    # reservation); when they no longer fit, the newest is preempted, recomputed later, and both
    # end with exactly the unbatched outputs.
    sched, model = make(num_blocks=4, block_size=4, enable_prefix_caching=caching)
    a = sched.add_request([1, 2, 3, 4], 12, ignore_eos=True)
    b = sched.add_request([5, 6, 7, 8], 12, ignore_eos=True)
    step = sched.schedule()
    assert step.request_ids == [a, b] and not sched.waiting
    first = sched.commit(step, model.forward(step).argmax(-1))
    outputs, shapes = run(sched, model)
    for event in first:
        outputs[event.request_id].insert(0, event.token)
    assert outputs == {a: reference([1, 2, 3, 4], 12, ()), b: reference([5, 6, 7, 8], 12, ())}
    assert sched.num_preemptions >= 1 and sched.allocator.num_available == 4
    assert max(nseq for _, nseq, _ in shapes) == 2


def test_preempted_request_resumes_from_its_cached_blocks():
    def work(caching):
        sched, model = make(num_blocks=5, block_size=4, enable_prefix_caching=caching)
        a = sched.add_request([1] * 8, 5, ignore_eos=True)  # grows to 3 blocks
        b = sched.add_request([2] * 8, 3, ignore_eos=True)  # preempted when it needs its 3rd
        outputs, shapes = run(sched, model)
        assert outputs == {a: reference([1] * 8, 5, ()), b: reference([2] * 8, 3, ())}
        assert sched.num_preemptions == 1
        return sum(t for t, _, _ in shapes)

    # Readmitted, b finds its two full blocks in the cache: 8 tokens fewer to recompute.
    assert work(caching=True) == work(caching=False) - 8


def test_max_num_seqs_caps_the_batch():
    sched, model = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        sched.add_request([i + 1, 2], 3, ignore_eos=True)
    _, shapes = run(sched, model)
    assert max(b for _, b, _ in shapes) == 2


def test_abort_frees_blocks_and_skips_pending_rows():
    sched, model = make(num_blocks=8)
    a = sched.add_request([1, 2, 3], 5, ignore_eos=True)
    b = sched.add_request([4, 5], 5, ignore_eos=True)
    step = sched.schedule()
    assert sched.abort(a) and not sched.abort("nope")
    events = sched.commit(step, model.forward(step).argmax(-1))
    assert [e.request_id for e in events] == [b]
    assert len(sched.running) == 1 and sched.allocator.num_free == 8 - 1


def test_commit_protocol():
    sched, _ = make()
    sched.add_request([1, 2], 3)
    step = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError):
        sched.commit(step, [1, 2])
    sched.commit(step, [3])
    with pytest.raises(RuntimeError):
        sched.commit(step, [3])


def test_end_to_end_matches_unbatched_reference():
    rng = np.random.default_rng(0)
    requests = [(i, rng.integers(1, VOCAB, rng.integers(1, 20)).tolist(), int(rng.integers(1, 12))) for i in range(40)]
    sched, model = make(num_blocks=12, block_size=4, max_context=64, max_num_batched_tokens=7, max_num_seqs=4)
    for rid, prompt, n in requests[:25]:
        sched.add_request(prompt, n, request_id=rid)
    outputs, shapes = run(sched, model, add_later=requests[25:])
    assert outputs == {rid: reference(p, n) for rid, p, n in requests}
    assert sched.allocator.num_available == 12
    assert any(b > 1 for _, b, _ in shapes) and any(l == 0 for _, _, l in shapes)  # batching and chunking happened


def test_score_steps_give_logits_at_every_position_and_free_blocks():
    sched, model = make(num_blocks=8, block_size=4, max_num_batched_tokens=5, max_num_seqs=2)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    rows = []
    for step in sched.score_steps(tokens):
        check_step(step, sched, scoring=True)
        assert step.num_seqs == 1 and len(step.logits_indices) == step.num_tokens
        assert step.logits_indices.tolist() == list(range(step.num_tokens))
        rows.append(model.forward(step).argmax(-1))
    assert [len(r) for r in rows] == [5, 5, 1]
    assert np.concatenate(rows).tolist() == [next_token(tokens[:p + 1]) for p in range(len(tokens))]
    assert sched.allocator.num_free == 8
    with pytest.raises(RuntimeLimitError, match="needs 9 KV blocks"):
        sched.score_steps([1] * 33)


def test_score_uses_only_blocks_no_running_request_holds():
    sched, model = make(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched.add_request([1] * 9, 4, ignore_eos=True)  # 3 blocks in use after the first step
    step = sched.schedule()
    sched.commit(step, model.forward(step).argmax(-1))
    with pytest.raises(RuntimeLimitError, match="only 3"):
        sched.score_steps([1] * 13)
    steps = sched.score_steps([1] * 12)
    next(steps)
    steps.close()
    assert sched.allocator.num_free == 3


# -- prefix caching, prompt logprobs, full-sequence models, a random workload --------------------

def drive(sched, model):
    """Run to completion; returns ({request: tokens}, [(request, first position, tokens) per chunk])."""
    outputs, chunks = {}, []
    while sched.has_work:
        step = sched.schedule()
        check_step(step, sched)
        qsl = step.query_start_loc
        for b in range(step.num_seqs):
            chunks.append((step.positions[qsl[b]], qsl[b + 1] - qsl[b]))
        for ev in sched.commit(step, model.forward(step)[step.sample_rows].argmax(-1)):
            outputs.setdefault(ev.request_id, []).append(ev)
        check_live_slots_unique(sched)
    return outputs, chunks


def test_shared_prefix_is_computed_once():
    sched, model = make(num_blocks=16, block_size=4)
    system = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # 2 full blocks + 1 token
    a = sched.add_request(system + [7, 7], 3, ignore_eos=True)
    out_a, chunks_a = drive(sched, model)
    assert chunks_a[0] == (0, 11) and out_a[a][0].cached_tokens == 0
    b = sched.add_request(system + [8], 3, ignore_eos=True)
    out_b, chunks_b = drive(sched, model)
    assert chunks_b[0] == (8, 2)  # prefill starts after the 2 cached blocks
    assert all(ev.cached_tokens == 8 for ev in out_b[b])
    assert [e.token for e in out_b[b]] == reference(system + [8], 3, ())
    assert sched.prefix_cache.queried_tokens == 21 and sched.prefix_cache.hit_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token():
    sched, model = make(num_blocks=16, block_size=4)
    prompt = list(range(1, 9))  # exactly 2 blocks
    drive(sched, model) if sched.add_request(prompt, 2, ignore_eos=True) is None else drive(sched, model)
    rid = sched.add_request(prompt, 2, ignore_eos=True)
    out, chunks = drive(sched, model)
    assert chunks[0] == (4, 4)  # block 2 holds the last token: recomputed, block 1 reused
    assert out[rid][0].cached_tokens == 4 and [e.token for e in out[rid]] == reference(prompt, 2, ())


def test_requests_sharing_a_prefix_being_prefilled_wait_for_it_and_equal_blocks_are_shared():
    sched, model = make(num_blocks=16, block_size=4)
    ids = [sched.add_request([5] * 9, 8, ignore_eos=True) for _ in range(3)]
    outputs = {}
    step = sched.schedule()
    assert step.request_ids == [ids[0]] and len(sched.waiting) == 2  # the others wait for its blocks
    for ev in sched.commit(step, model.forward(step).argmax(-1)):
        outputs.setdefault(ev.request_id, []).append(ev.token)
    step = sched.schedule()
    assert step.query_start_loc.tolist() == [0, 1, 2, 3]  # 1 decode + 2 prefills of the one uncached token
    assert step.positions.tolist() == [9, 8, 8]
    for ev in sched.commit(step, model.forward(step).argmax(-1)):
        outputs.setdefault(ev.request_id, []).append(ev.token)
    rest, _ = run(sched, model)
    assert all(outputs[i] + rest[i] == reference([5] * 9, 8, ()) for i in ids)
    assert sched.allocator.num_available == 16


def test_no_wait_for_a_block_the_request_could_not_take_from_the_cache():
    """A block-aligned prompt recomputes its last block (its last token's logits), and a prompt-logprob
    request the blocks it reports on: waiting for another request to cache them held up the whole queue."""
    sched, model = make(num_blocks=16, block_size=4)
    a = sched.add_request([5] * 4, 3, ignore_eos=True)
    b = sched.add_request([5] * 4, 3, ignore_eos=True)
    c = sched.add_request([5] * 9, 0, prompt_logprobs_from=1)
    d = sched.add_request([6] * 3, 3, ignore_eos=True)
    step = sched.schedule()
    assert step.request_ids[-1] == d and {a, b, c} <= set(step.request_ids) and not sched.waiting
    out = {}
    for ev in sched.commit(step, model.forward(step)[step.sample_rows].argmax(-1)):
        out.setdefault(ev.request_id, []).append(ev.token)
    rest, _ = run(sched, model)
    assert out[a] + rest[a] == out[b] + rest[b] == reference([5] * 4, 3, ())
    assert sched.allocator.num_available == 16


def test_identical_generated_blocks_are_deduplicated():
    sched, model = make(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = sched.add_request([1, 2, 3], 9, ignore_eos=True)
    b = sched.add_request([1, 2, 3], 9, ignore_eos=True)  # under one block: nothing to wait for
    step = sched.schedule()
    assert step.request_ids == [a, b]
    sched.commit(step, model.forward(step).argmax(-1))
    for _ in range(5):  # both reach 8 computed tokens: two identical full blocks each
        step = sched.schedule()
        sched.commit(step, model.forward(step).argmax(-1))
    ta, tb = (s.blocks.block_table for s in sched.running)
    assert ta[:2] == tb[:2] and sched.prefix_cache.num_cached == 2


def test_eviction_takes_least_recently_used_blocks():
    sched, model = make(num_blocks=6, block_size=4)
    old, new = [1] * 8, [2] * 8
    for prompt in (old, new):
        sched.add_request(prompt + [9], 1, ignore_eos=True)
        drive(sched, model)
    assert sched.prefix_cache.num_cached == 4
    sched.add_request(new + [9], 1, ignore_eos=True)  # touches `new` again
    drive(sched, model)
    sched.add_request([3] * 13, 1, ignore_eos=True)  # needs 4 blocks: evicts 2, the `old` ones
    drive(sched, model)
    hits = sched.prefix_cache.hit_tokens
    sched.add_request(new + [9], 1, ignore_eos=True)
    sched.add_request(old + [9], 1, ignore_eos=True)
    out, _ = drive(sched, model)
    assert sched.prefix_cache.hit_tokens - hits == 8  # `new` still cached, `old` evicted
    assert [ev.cached_tokens for evs in out.values() for ev in evs] == [8, 0]


def test_prompt_logprob_rows_and_prompt_only_requests():
    sched, model = make(num_blocks=16, block_size=4)
    prompt = [4, 8, 15, 16, 23, 42 % VOCAB, 7]
    rid = sched.add_request(prompt, 0, prompt_logprobs_from=2)
    step = sched.schedule()
    assert step.logits_indices.tolist() == [1, 2, 3, 4, 5]  # positions 1..5 give tokens 2..6
    assert step.targets.tolist() == prompt[2:] and step.sample_rows.size == 0
    events = sched.commit(step, [])
    assert [(e.request_id, e.token, e.finished, e.finish_reason) for e in events] == [(rid, None, True, "length")]
    # The prompt's blocks were cached; a logprob request starting at 6 may reuse only the first.
    rid = sched.add_request(prompt, 1, prompt_logprobs_from=6, ignore_eos=True)
    step = sched.schedule()
    assert step.positions[0] == 4 and step.logits_indices.tolist() == [1, 2]
    assert step.targets.tolist() == [prompt[6], -1]
    assert [e.token for e in sched.commit(step, [11])] == [11]


def test_logprob_rows_are_not_repeated_after_a_preemption():
    sched, model = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = sched.add_request([1] * 4, 11, ignore_eos=True)
    b = sched.add_request([2] * 6, 6, ignore_eos=True, prompt_logprobs_from=1)
    rows = []
    while sched.has_work:
        step = sched.schedule()
        rows += [(r, t) for r, t in zip(step.request_ids, step.targets.tolist()) if t >= 0]
        sched.commit(step, model.forward(step)[step.sample_rows].argmax(-1))
    assert sched.num_preemptions >= 1
    assert rows == [(b, 2)] * 5 and a is not None


def test_full_sequence_mode_recomputes_one_sequence_at_a_time():
    sched = Scheduler(8, 4, 64, eos_token_ids=[EOS], max_num_seqs=4, max_num_batched_tokens=8, full_sequence=True)
    model = FakeModel(8, 4)
    a = sched.add_request([1, 2, 3], 3, ignore_eos=True)
    b = sched.add_request([4, 5], 2, ignore_eos=True)
    outputs, chunks = drive(sched, model)
    assert [c for c in chunks] == [(0, 3), (0, 4), (0, 5), (0, 2), (0, 3)]
    assert [e.token for e in outputs[a]] == reference([1, 2, 3], 3, ())
    assert [e.token for e in outputs[b]] == reference([4, 5], 2, ())
    assert sched.prefix_cache is None and sched.allocator.num_free == 8


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_random_workloads_match_the_unbatched_reference(data):
    """Shared prefixes, a cache too small for the load, chunking, arrivals over time and aborts."""
    num_blocks = data.draw(st.integers(6, 14), "num_blocks")
    sched, model = make(num_blocks=num_blocks, block_size=4, max_context=40, max_num_batched_tokens=9, max_num_seqs=4,
                        enable_prefix_caching=data.draw(st.booleans(), "caching"))
    stems = [[1 + i] * 8 for i in range(3)]
    pending = []
    for rid in range(data.draw(st.integers(1, 10), "count")):
        prompt = data.draw(st.sampled_from(stems)) + data.draw(st.lists(st.integers(1, VOCAB - 1), max_size=6))
        n = data.draw(st.integers(1, 8))
        if blocks_for(len(prompt) + n - 1, 4) <= num_blocks:
            pending.append((rid, prompt, n))
    requests = list(pending)
    arrivals = sorted(data.draw(st.lists(st.integers(0, 12), min_size=len(pending), max_size=len(pending))))
    to_abort = data.draw(st.lists(st.sampled_from([r for r, _, _ in requests] or [None]), max_size=2, unique=True))
    outputs, aborted = {}, set()
    for step_no in range(500):
        while pending and arrivals[len(requests) - len(pending)] <= step_no:
            rid, prompt, n = pending.pop(0)
            sched.add_request(prompt, n, request_id=rid)
        if to_abort and step_no % 3 == 2 and sched.abort(to_abort[0]):
            aborted.add(to_abort.pop(0))
        if not sched.has_work:
            if not pending:
                break
            continue
        step = sched.schedule()
        check_step(step, sched)
        for ev in sched.commit(step, model.forward(step)[step.sample_rows].argmax(-1)):
            outputs.setdefault(ev.request_id, []).append(ev.token)
        check_live_slots_unique(sched)
    assert not sched.has_work and not pending
    for rid, prompt, n in requests:
        ref, got = reference(prompt, n), outputs.get(rid, [])
        assert got == (ref[:len(got)] if rid in aborted else ref)
    assert sched.allocator.num_available == num_blocks
