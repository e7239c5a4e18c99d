"""The scheduler against a fake numpy "model" that keeps its own paged KV store."""

import numpy as np
import pytest

from llmirc.errors import LlmircError, RuntimeLimitError
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
    assert T <= sched.max_batched_tokens
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
    slots = [s.blocks.slot(p) for s in sched.running for p in range(s.num_computed)]
    assert len(slots) == len(set(slots))
    used = sum(len(s.blocks.block_table) for s in sched.running)
    assert used + sched.allocator.num_free == sched.allocator.num_blocks


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
        sampled = model.forward(step).argmax(-1)
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
    sched, model = make(max_batched_tokens=4, max_num_seqs=2)
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
    sched, model = make(max_batched_tokens=6, max_num_seqs=4)
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
    assert not sched.has_work and sched.allocator.num_free == 8
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
        sched.add_request([1], 0)
    with pytest.raises(RuntimeLimitError, match="token id 23 is outside"):
        sched.add_request([1, 23], 1)
    sched.add_request([1], 1, request_id="x")
    with pytest.raises(LlmircError, match="already in use"):
        sched.add_request([1], 1, request_id="x")
    fresh, _ = make()
    fresh.add_request([1], 1, request_id=0)
    assert fresh.add_request([1], 1) == 1  # fresh ids skip the ones callers chose
    with pytest.raises(LlmircError, match="max_batched_tokens"):
        Scheduler(4, 4, 20, max_batched_tokens=8, max_num_seqs=16)


def test_admission_waits_until_blocks_are_free():
    sched, model = make(num_blocks=4, block_size=4)
    a = sched.add_request([1] * 6, 8, ignore_eos=True)  # 13 tokens -> 4 blocks worst case
    b = sched.add_request([2] * 3, 2, ignore_eos=True)
    step = sched.schedule()
    assert step.request_ids == [a] and len(sched.waiting) == 1  # b must wait although 2 blocks are free
    sched.commit(step, model.forward(step).argmax(-1))
    outputs, shapes = run(sched, model)  # a finishes, then b runs
    assert len(outputs[a]) == 7 and len(outputs[b]) == 2 and sched.allocator.num_free == 4
    assert max(nseq for _, nseq, _ in shapes) == 1


def test_max_num_seqs_caps_the_batch():
    sched, model = make(max_num_seqs=2, max_batched_tokens=64)
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
    sched, model = make(num_blocks=12, block_size=4, max_context=64, max_batched_tokens=7, max_num_seqs=4)
    for rid, prompt, n in requests[:25]:
        sched.add_request(prompt, n, request_id=rid)
    outputs, shapes = run(sched, model, add_later=requests[25:])
    assert outputs == {rid: reference(p, n) for rid, p, n in requests}
    assert sched.allocator.num_free == 12
    assert any(b > 1 for _, b, _ in shapes) and any(l == 0 for _, _, l in shapes)  # batching and chunking happened


def test_score_steps_give_logits_at_every_position_and_free_blocks():
    sched, model = make(num_blocks=8, block_size=4, max_batched_tokens=5, max_num_seqs=2)
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


def test_score_respects_blocks_promised_to_running_requests():
    sched, model = make(num_blocks=6, block_size=4)
    sched.add_request([1] * 4, 13, ignore_eos=True)  # 16 tokens -> 4 blocks promised
    step = sched.schedule()
    sched.commit(step, model.forward(step).argmax(-1))
    with pytest.raises(RuntimeLimitError, match="only 2"):
        sched.score_steps([1] * 9)
    steps = sched.score_steps([1] * 8)
    next(steps)
    steps.close()
    assert sched.allocator.num_free == 5
