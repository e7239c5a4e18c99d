"""The engine loop against a fake executor: threads adding and aborting requests, per-request
sampling streams, logprobs, failures. The fake executor keeps its own paged KV store (tokens by
slot) and returns logits that are a fixed function of each sequence's history, so any mix-up of
blocks, rows or requests changes the output."""

from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import pytest

from llmirc.errors import LlmircError, RequestError
from llmirc.runtime.engine import Engine, SamplingParams
from llmirc.runtime.scheduler import Scheduler

VOCAB = 50


def history_logits(history) -> np.ndarray:
    h = 0
    for t in history:
        h = (h * 1_000_003 + int(t) + 1) % (2**61 - 1)
    return np.random.default_rng(h).standard_normal(VOCAB).astype(np.float32) * 2


class FakeExecutor:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size, self.vocab_size = num_blocks, block_size, VOCAB
        self.pool = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.fail = False

    def forward(self, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices):
        if self.fail:
            raise RuntimeError("kernel exploded")
        self.pool[slot_mapping] = token_ids
        out = np.empty((len(logits_indices), VOCAB), dtype=np.float32)
        for r, row in enumerate(logits_indices):
            b = np.searchsorted(query_start_loc, row, side="right") - 1
            last = positions[row]
            slots = [block_tables[b, p // self.block_size] * self.block_size + p % self.block_size
                     for p in range(last + 1)]
            out[r] = history_logits(self.pool[slots])
        return out


class FakeRunExecutor(FakeExecutor):
    """Also runs greedy decode steps in one call, as CpuExecutor.forward_greedy does natively."""

    supports_greedy_runs = True

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self.runs = []

    def forward_greedy(self, inputs, steps):
        ids, pos, slots, tables, seq_lens, qsl, logits_idx = (np.array(a) for a in inputs)
        self.runs.append(steps)
        out = []
        for i in range(steps):
            out.append(self.forward(ids, pos, slots, tables, seq_lens, qsl, logits_idx).argmax(-1))
            if i + 1 < steps:
                ids, pos, seq_lens = out[-1], pos + 1, seq_lens + 1
                slots = tables[np.arange(len(ids)), pos // self.block_size] * self.block_size + pos % self.block_size
        return np.array(out, dtype=np.int32)


def make(num_blocks=64, block_size=4, executor_class=FakeExecutor, **kw):
    executor = executor_class(num_blocks, block_size)
    scheduler = Scheduler(num_blocks, block_size, 256, eos_token_ids=[0], vocab_size=VOCAB, **kw)
    return Engine(executor, scheduler), executor


def greedy_reference(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(history_logits(tokens))))
    return tokens[len(prompt):]


def collect(engine, prompts, params):
    out = {}
    for o in engine.generate(prompts, params):
        out.setdefault(o.request_id, []).append(o)
    return out


def test_greedy_batch_matches_reference_and_frees_everything():
    engine, _ = make(max_num_seqs=3, max_num_batched_tokens=8)
    prompts = [[1, 2, 3], [4] * 11, [5, 6], [1, 2, 3, 7]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 4
    out = collect(engine, prompts, params)
    for i, prompt in enumerate(prompts):
        assert [o.token for o in out[i]] == greedy_reference(prompt, 6)
        assert out[i][-1].finished and out[i][-1].finish_reason == "length"
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 64


def test_greedy_decode_runs_match_single_steps():
    """Multi-step decode (num_scheduler_steps): runs of up to 8 greedy steps in one executor call give
    the tokens single steps give, across block boundaries, requests finishing mid-run (length, stop
    token), and a batch whose sequences reach decode at different steps; blocks are all freed."""
    prompts = [[1, 2, 3], [4] * 11, [5, 6], [1, 2, 3, 7], [9] * 6]
    reference = [greedy_reference(p, 13) for p in prompts]
    stop = reference[3][4]  # the fourth request stops at its fifth token (or earlier, at an equal one)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (13, 5, 11, 13, 2)]
    params[3] = SamplingParams(max_tokens=13, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
    engine, executor = make(executor_class=FakeRunExecutor, max_num_seqs=5, max_num_batched_tokens=8)
    out = collect(engine, prompts, params)
    assert max(executor.runs) >= 4 and engine.scheduler.allocator.num_available == 64
    for i, p in enumerate(params):
        want = reference[i][:p.max_tokens]
        if p.stop_token_ids:
            want = want[:want.index(stop) + 1]
        assert [o.token for o in out[i]] == want, i
        assert out[i][-1].finished and sum(o.finished for o in out[i]) == 1


def test_decode_runs_only_for_plain_greedy_requests_with_nothing_waiting():
    engine, executor = make(executor_class=FakeRunExecutor, max_num_seqs=1)
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
    with_logprobs = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    collect(engine, [[1, 2], [3, 4]], [sampled, with_logprobs])
    assert executor.runs == []
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    collect(engine, [[1, 2], [3, 4]], [greedy, greedy])  # max_num_seqs 1: the second waits, then runs
    assert executor.runs == [5]


def test_min_p_of_a_greedy_request_keeps_decode_runs():
    """min_p changes nothing with temperature 0 (vLLM zeroes it for greedy requests; run warns that it has
    no effect), so such a request still takes multi-step greedy runs (it took one step at a time, and
    on a GPU target the host's logits) and gets the greedy tokens; sampled with min_p: no runs."""
    engine, executor = make(executor_class=FakeRunExecutor)
    out = collect(engine, [[1, 2]], [SamplingParams(max_tokens=6, temperature=0, min_p=0.5, ignore_eos=True)])
    assert executor.runs == [5] and [o.token for o in out[0]] == greedy_reference([1, 2], 6)
    collect(engine, [[1, 2]], [SamplingParams(max_tokens=6, temperature=0.7, seed=1, min_p=0.5, ignore_eos=True)])
    assert executor.runs == [5]


def test_penalties_and_bias_apply_per_request_on_the_hosts_logits():
    """Penalties and logit_bias change greedy decoding (the tokens of argmax over sampling.penalize's row
    at each step), each request its own beside a plain one in the batch; such requests take no
    multi-step greedy runs; logprobs stay the raw distribution's; a bias of 100 on one token picks it
    every step; an id outside the vocabulary is refused before anything runs."""
    from llmirc.runtime.sampling import logprobs, penalize

    def reference(prompt, n, **kw):
        tokens = list(prompt)
        for _ in range(n):
            row = penalize(history_logits(tokens), prompt, tokens[len(prompt):], **kw)
            tokens.append(int(np.argmax(row)))
        return tokens[len(prompt):]

    engine, executor = make(executor_class=FakeRunExecutor)
    kinds = [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=0.7),
             dict(logit_bias=((3, 1.5), (7, -2.0))), {}]
    prompts = [[1, 2, 3, 1], [4, 5], [6, 7, 8], [9, 1]]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0 if i == 1 else None, **kw)
              for i, kw in enumerate(kinds)]
    out = collect(engine, prompts, params)
    for i, (prompt, kw) in enumerate(zip(prompts, kinds)):
        assert [o.token for o in out[i]] == reference(prompt, 12, **kw), i
    assert reference(prompts[0], 12, **kinds[0]) != greedy_reference(prompts[0], 12)
    history = prompts[1] + [o.token for o in out[1]]
    for j, o in enumerate(out[1]):
        raw = logprobs(history_logits(history[:len(prompts[1]) + j])[None], [o.token])[0][0]
        assert o.logprob.logprob == pytest.approx(float(raw), abs=1e-6)
    assert executor.runs == []  # (with the plain request alone, runs: test_decode_runs_only_for_plain_...)
    forced = collect(engine, [[1, 2]], [SamplingParams(max_tokens=5, temperature=0.9, seed=3, ignore_eos=True,
                                                       min_p=0.5, logit_bias=((11, 100.0),))])
    assert [o.token for o in forced[0]] == [11] * 5
    with pytest.raises(LlmircError, match="logit_bias: token id 50 is outside the model's vocabulary of 50"):
        engine.add_request([1], SamplingParams(logit_bias=((50, 1.0),)), lambda out: None)
    for bad, name in ((dict(repetition_penalty=0.0), "repetition_penalty"),
                      (dict(presence_penalty=3), "presence_penalty"),
                      (dict(frequency_penalty=float("nan")), "frequency_penalty"),
                      (dict(logit_bias=((1, "x"),)), "logit_bias"), (dict(min_p=-0.1), "min_p"),
                      (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(seed=-1), "seed"),
                      (dict(stop=("",)), "stop"), (dict(stop_token_ids=(50,)), "stop_token_ids"),
                      (dict(min_tokens=17), "min_tokens"), (dict(logprobs=21), "logprobs"),
                      (dict(ignore_eos="no"), "ignore_eos")):
        with pytest.raises(RequestError, match=name) as refused:  # (a server names the field: its `param`)
            engine.add_request([1], SamplingParams(**bad), lambda out: None)
        assert refused.value.field == name
    # the first bad pair named, not the whole bias (10,000 pairs were all printed); None: no traceback
    long_bias = tuple((t, 0.5) for t in range(10_000)) + ((-3, 1.0),)
    with pytest.raises(LlmircError, match=r"^logit_bias: \(-3, 1.0\) is not a \(token id >= 0, finite bias\) pair$"):
        SamplingParams(logit_bias=long_bias).validate()
    with pytest.raises(LlmircError, match="logit_bias must be"):
        SamplingParams(logit_bias=None).validate()


class DigitTokenizer:
    """Token id t is the character chr(48 + t); spaces are not tokens (so a word's spaced form is the same)."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 48 for c in text if c != " "]


def test_allowed_token_ids_and_bad_words():
    """vLLM's allowed_token_ids (only these are sampled) and bad_words (a one-token word never sampled, a
    two-token word's last token never right after its first): the tokens of argmax over the masked rows,
    beside a plain request; no multi-step runs; ids outside the vocabulary and bad words without a
    tokenizer refused."""
    prompt = [1, 2, 3]
    free = greedy_reference(prompt, 12)
    allowed = tuple(sorted(set(free[3:6])) + [7])
    first, second, single = free[0], free[1], free[3]
    words = (chr(48 + first) + chr(48 + second), " " + chr(48 + single))

    def masked(n, keep=None):
        tokens = list(prompt)
        for _ in range(n):
            row = history_logits(tokens)
            if keep is not None:
                row[[t for t in range(VOCAB) if t not in keep]] = -np.inf
            else:
                row[single] = -np.inf
                if tokens[-1] == first and len(tokens) > len(prompt):
                    row[second] = -np.inf
            tokens.append(int(np.argmax(row)))
        return tokens[len(prompt):]

    engine, executor = make(executor_class=FakeRunExecutor)
    engine.tokenizer = DigitTokenizer()
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, detokenize=False, **kw)
              for kw in (dict(allowed_token_ids=allowed), dict(bad_words=words), {})]
    out = collect(engine, [prompt] * 3, params)
    assert [o.token for o in out[0]] == masked(12, set(allowed)) and set(o.token for o in out[0]) <= set(allowed)
    banned = [o.token for o in out[1]]
    assert banned == masked(12) and single not in banned and banned[:2] != [first, second]
    assert [o.token for o in out[2]] == free and executor.runs == []
    with pytest.raises(LlmircError, match="allowed_token_ids: token id 50 is outside the model's vocabulary of 50"):
        engine.add_request([1], SamplingParams(allowed_token_ids=(1, 50)), lambda out: None)
    with pytest.raises(LlmircError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=()).validate()
    with pytest.raises(LlmircError, match="bad_words must be non-empty strings"):
        SamplingParams(bad_words=(" ",)).validate()
    with pytest.raises(LlmircError, match="bad_words: token id 74 is outside"):
        engine.add_request([1], SamplingParams(bad_words=("z",)), lambda out: None)
    plain, _ = make()
    with pytest.raises(LlmircError, match="bad_words need a tokenizer"):
        plain.add_request([1], SamplingParams(bad_words=("ab",)), lambda out: None)


def test_a_request_whose_constraints_leave_no_token_ends_without_one():
    """allowed_token_ids, bad_words and min_tokens that leave no token between them at a step: the request ends
    there (finish_reason stop) with the tokens it had; the argmax of the all -inf row, id 0, which none of them
    allows (Llama 3's "!"), was added, and the next step's too until max_tokens."""
    engine, _ = make(executor_class=FakeRunExecutor)
    engine.tokenizer = DigitTokenizer()
    params = [SamplingParams(max_tokens=4, temperature=t, seed=1, detokenize=False, **kw)
              for t in (0, 0.8) for kw in (dict(allowed_token_ids=(5,), bad_words=("5",), ignore_eos=True),  # none
                                           dict(allowed_token_ids=(5,), bad_words=("55",), ignore_eos=True),  # 5, none
                                           dict(allowed_token_ids=(5, 0), min_tokens=2, bad_words=("5",)))]  # 0 held
    out = collect(engine, [[1, 2, 3]] * len(params), params)
    for i in range(len(params)):
        assert [o.token for o in out[i][:-1]] == ([5] if i % 3 == 1 else []), (i, out[i])
        last = out[i][-1]
        assert last.token is None and last.finished and last.finish_reason == "stop", (i, last)
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 64


def test_bad_words_ids_as_vllm_tokenizes_them():
    """Each word alone and after a space; the spaced form kept when it starts with another token and is as
    long (a word-start token), as vLLM's SamplingParams.update_from_tokenizer."""
    from llmirc.runtime.sampling import bad_words_ids

    vocab = {"hello": 1, " hello": 2, "wor": 3, "ld": 4, " ": 5, "x": 6}

    def encode(text):  # (longest match first)
        ids = []
        while text:
            piece = max((p for p in vocab if text.startswith(p)), key=len)
            ids.append(vocab[piece])
            text = text[len(piece):]
        return ids

    assert bad_words_ids(encode, ["hello", "  world", "x"]) == [(1,), (2,), (3, 4), (6,)]  # (" world": 5, 3, 4)


def test_a_requests_bias_and_prompt_are_prepared_once(monkeypatch):
    """A penalized request's logit bias is made into arrays (sorted, summed) and its prompt into an
    array once, not at every step (a 10,000-entry bias cost 2 ms of host work per step on SmolLM2's
    49152 tokens, an 8,000-token prompt 1.2 ms: np.unique of both each step); the tokens are those of
    the pairs given to penalize at each step."""
    import llmirc.runtime.engine as engine_module
    from llmirc.runtime.sampling import bias_arrays, penalize

    made = []
    monkeypatch.setattr(engine_module, "bias_arrays", lambda pairs: made.append(pairs) or bias_arrays(pairs))
    bias = tuple((t, -0.5 * (t % 3)) for t in range(VOCAB)) + ((9, 1.0),)
    engine, _ = make()
    prompt = [1, 2, 3, 1]
    out = collect(engine, [prompt], [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    repetition_penalty=1.4, logit_bias=bias)])
    assert len(made) == 1
    tokens = list(prompt)
    for _ in range(8):
        tokens.append(int(np.argmax(penalize(history_logits(tokens), prompt, tokens[4:], 1.4, logit_bias=bias))))
    assert [o.token for o in out[0]] == tokens[4:]

def test_min_tokens_holds_the_ids_that_would_end_the_request():
    """min_tokens (vLLM's): until that many tokens are out, the stop token ids and the end-of-sequence id
    are never sampled (the tokens of argmax over the rest), greedy and sampled alike, and no multi-step
    run starts; then they end the request as usual; ignore_eos leaves the eos id alone; min_tokens past
    max_tokens is refused."""
    prompt = [1, 2, 3]
    free = greedy_reference(prompt, 12)
    stop = free[1]  # a stop id the plain request meets at its second token

    def held(n, banned):
        tokens = list(prompt)
        for i in range(n):
            row = history_logits(tokens)
            if i < 6:
                row[list(banned)] = -np.inf
            tokens.append(int(np.argmax(row)))
        return tokens[len(prompt):]

    engine, executor = make(executor_class=FakeRunExecutor)
    out = collect(engine, [prompt], [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,))])
    assert [o.token for o in out[0]] == free[:2]
    executor.runs.clear()
    out = collect(engine, [prompt], [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,),
                                                    min_tokens=6)])
    assert sum(executor.runs) <= 12 - 6  # (runs only once the 6 tokens are out)
    want = held(12, {stop, 0})
    end = next((i for i, t in enumerate(want) if i >= 6 and t in (stop, 0)), 11)
    assert [o.token for o in out[0]] == want[:end + 1] and len(out[0]) >= 6
    assert stop not in want[:6] and 0 not in want[:6] and want[:6] != free[:6]
    out = collect(engine, [prompt], [SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True,
                                                    stop_token_ids=(stop,), min_tokens=8)])
    assert len(out[0]) == 8 and stop not in [o.token for o in out[0]]
    with pytest.raises(LlmircError, match="min_tokens must be an integer from 0 to max_tokens"):
        engine.add_request([1], SamplingParams(max_tokens=4, min_tokens=5), lambda out: None)


def test_a_run_cut_short_commits_the_steps_it_made():
    """forward_greedy may return fewer steps (a token past the embedding table): those are committed."""
    engine, executor = make(executor_class=FakeRunExecutor)
    greedy = executor.forward_greedy
    executor.forward_greedy = lambda inputs, steps: greedy(inputs, steps)[:1]
    out = collect(engine, [[1, 2, 3]], [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)])
    assert [o.token for o in out[0]] == greedy_reference([1, 2, 3], 6) and executor.runs == [5, 4, 3, 2]
    assert engine.scheduler.allocator.num_available == 64


def test_num_scheduler_steps_is_checked():
    with pytest.raises(LlmircError, match="num_scheduler_steps"):
        Engine(FakeRunExecutor(8, 4), Scheduler(8, 4, 64), num_scheduler_steps=0)


def test_each_request_keeps_its_own_seeded_stream():
    prompt = [3, 1, 4]
    p = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=1234, ignore_eos=True)
    alone = [o.token for o in collect(make()[0], [prompt], [p])[0]]
    crowd = collect(make()[0], [[9, 9], prompt, [8]], [SamplingParams(max_tokens=8, temperature=0.7, seed=1),
                                                       p, SamplingParams(max_tokens=3, temperature=0)])
    assert [o.token for o in crowd[1]] == alone  # same seed, other requests around: same tokens
    other = collect(make()[0], [prompt], [SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9,
                                                         seed=99, ignore_eos=True)])
    assert [o.token for o in other[0]] != alone


def test_a_fraction_temperature_samples_and_leaves_the_engine_serving():
    """A temperature of any real number type (here a Fraction, which validate() takes) samples as its float;
    it raised in the step, which failed every request and the engine."""
    engine, _ = make()
    prompt, p = [3, 1, 4], dict(max_tokens=6, seed=5, ignore_eos=True)
    exact = collect(engine, [prompt], [SamplingParams(temperature=Fraction(1, 2), **p)])
    assert engine.error is None
    assert [o.token for o in exact[0]] == [o.token for o in collect(engine, [prompt],
                                                                    [SamplingParams(temperature=0.5, **p)])[0]]


def test_logprobs_and_prompt_logprobs_are_log_softmax_of_the_logits():
    engine, _ = make()
    prompt = [7, 8, 9, 10, 11, 12]
    out = collect(engine, [prompt], [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2,
                                                    prompt_logprobs=1, prompt_logprobs_start=0)])[0]
    tokens = [o.token for o in out]

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    first = out[0].prompt_logprobs
    assert first[0] is None and [e.token for e in first[1:]] == prompt[1:]
    for p, entry in enumerate(first[1:], start=1):
        ref = log_softmax(history_logits(prompt[:p]))
        assert entry.logprob == pytest.approx(ref[prompt[p]], abs=1e-5)
        assert entry.top[0] == (int(np.argmax(ref)), pytest.approx(ref.max(), abs=1e-5))
    for i, o in enumerate(out):
        ref = log_softmax(history_logits(prompt + tokens[:i]))
        assert o.logprob.logprob == pytest.approx(ref[tokens[i]], abs=1e-5)
        assert [t for t, _ in o.logprob.top] == list(np.argsort(-ref)[:2])
    assert all(o.prompt_logprobs is None for o in out[1:])


def test_threads_add_and_abort_while_the_loop_runs():
    engine, _ = make(num_blocks=24, max_num_seqs=4, max_num_batched_tokens=16)
    engine.start()
    results, errors = {}, []
    done = threading.Event()

    def client(k):
        try:
            outs = list(engine.generate([[k + 1, k + 2, k + 3]], [SamplingParams(max_tokens=10, temperature=0,
                                                                               ignore_eos=True)]))
            results[k] = [o.token for o in outs]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    # Meanwhile: a long request that is aborted while it runs. Its first output holds the loop until
    # the abort is queued (the fake steps are so fast that a loaded host could run all 60 first).
    got, queued = [], threading.Event()

    def sink(o):
        got.append(o)
        if o.finished:
            done.set()
        elif len(got) == 1:
            queued.wait(60)

    rid = engine.add_request([1] * 30, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), sink)
    while not got:
        threading.Event().wait(0.001)
    engine.abort(rid)
    queued.set()
    assert done.wait(120)  # generous: CI runners are shared
    for t in threads:
        t.join(120)
    engine.stop()
    assert not errors, errors
    assert results == {k: greedy_reference([k + 1, k + 2, k + 3], 10) for k in range(12)}
    assert got[-1].finish_reason == "abort" and len(got) < 60
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 24
    assert engine.stats.finished["abort"] == 1 and engine.stats.finished["length"] == 12


def test_closing_a_generation_early_aborts_it():
    engine, _ = make(num_blocks=16)
    stream = engine.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)] * 2)
    next(stream)
    stream.close()
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 16


def test_abort_all_ends_every_request():
    """What `llmirc serve` does when Ctrl-C's grace period ends: every request ends with "abort"."""
    engine, _ = make(num_blocks=16)
    got: dict[int, list] = {}
    for prompt in ([1, 2], [3, 4, 5]):
        engine.add_request(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                           lambda o: got.setdefault(o.request_id, []).append(o))
    engine.step()
    engine.abort_all()
    engine.step()
    assert len(got) == 2 and all(outs[-1].finish_reason == "abort" and len(outs) < 50 for outs in got.values())
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 16



@pytest.mark.parametrize("threaded", [False, True])
def test_close_ends_requests_and_refuses_more(threaded):
    engine, _ = make(num_blocks=16)
    if threaded:
        engine.start()
    stream = engine.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)] * 2)
    next(stream)
    engine.call(lambda: None)  # queued after both requests: the loop thread has admitted them
    engine.close()
    rest = list(stream)
    ends = [o.finish_reason for o in rest if o.finished]
    assert ends == ["abort"] * 2 and len(rest) < 99 or threaded and set(ends) <= {"abort", "length"} and \
        len(ends) == 2  # the loop thread may finish them first
    assert not engine.running_in_thread and engine.num_requests == 0
    assert engine.scheduler.allocator.num_available == 16
    for call in (lambda: engine.generate([[1]], [SamplingParams(max_tokens=2)]), lambda: engine.call(lambda: 1)):
        with pytest.raises(LlmircError, match="the model was closed"):
            call()
    engine.close()  # twice: nothing


class ClosingExecutor(FakeExecutor):
    """Its pool gone after close(), as CpuExecutor's KV cache is: a step after it fails."""

    def close(self):
        self.pool = None


@pytest.mark.parametrize("threaded", [False, True])
def test_close_from_another_thread_races_safely(threaded):
    """close() from another thread while generate and score run: every call ends normally or
    with LlmircError "the model was closed", never a step on the closed executor, never a hang."""
    for _ in range(40):
        engine, executor = make(executor_class=ClosingExecutor)
        if threaded:
            engine.start()
        timer = threading.Timer(np.random.default_rng().random() * 0.004, engine.close)
        timer.start()
        try:
            for i in range(10**6):
                if i % 2:
                    engine.call(lambda: executor.pool.sum())
                else:
                    list(engine.generate([[1, 2]], [SamplingParams(max_tokens=5, temperature=0)]))
        except LlmircError as e:
            assert str(e) == "the model was closed"
        timer.join()
        assert executor.pool is None and not engine.running_in_thread

def test_a_failing_step_fails_every_request_and_the_engine():
    engine, executor = make()
    stream = engine.generate([[1, 2], [3]], [SamplingParams(max_tokens=5, temperature=0)] * 2)
    next(stream)
    executor.fail = True
    with pytest.raises(RuntimeError, match="kernel exploded"):  # the step's own exception (a bug: exit 3 in the CLI)
        list(stream)
    assert engine.error and engine.num_requests == 0
    with pytest.raises(LlmircError, match="stopped after an error"):
        engine.add_request([1], SamplingParams(), lambda o: None)


@pytest.mark.parametrize("executor_class", [FakeExecutor, FakeRunExecutor])
def test_ctrl_c_in_a_step_leaves_the_engine_usable(executor_class):
    """KeyboardInterrupt in the forward (Ctrl-C in a notebook) undoes the step: it reaches the
    caller, the interrupted generation is aborted, and later ones run as if it never happened (they
    raised "commit() the previous step" forever)."""
    engine, executor = make(executor_class=executor_class)
    forward = executor.forward
    calls = 0

    def interrupted(*args):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return forward(*args)
    executor.forward = interrupted
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 2
    with pytest.raises(KeyboardInterrupt):
        collect(engine, [[1, 2, 3], [4, 5]], params)
    assert engine.error is None and engine.num_requests == 0 and engine.scheduler.allocator.num_available == 64
    out = collect(engine, [[1, 2, 3], [4, 5]], params)
    assert [[o.token for o in out[i]] for i in (0, 1)] == [greedy_reference(p, 6) for p in ([1, 2, 3], [4, 5])]



@pytest.mark.parametrize("where", ["commit", "commit_run", "sample", "logprob", "prompt_logprobs"])
def test_a_failure_after_the_forward_in_the_callers_thread_leaves_the_engine_usable(monkeypatch, where):
    """generate stepping the engine in its own thread, a step that fails after its forward (the scheduler's
    commit, sampling, a logprob) raises its own error from that generate, aborts the step's requests and frees
    their blocks; the next generate gives a fresh engine's tokens (it raised "commit() the previous step"
    forever, or, for sampling, "the engine stopped after an error")."""
    engine, executor = make(executor_class=FakeRunExecutor if where == "commit_run" else FakeExecutor)
    target = {"commit": engine.scheduler, "commit_run": engine.scheduler, "sample": engine,
              "logprob": engine, "prompt_logprobs": engine}[where]
    name = {"sample": "_sample", "logprob": "_token_logprob", "prompt_logprobs": "_prompt_logprobs"}.get(where, where)
    calls, fail_at = [], 1 if where == "commit_run" else 2  # (the decode run: the second step)

    def broken(original):
        def call(*args):
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyError(f"{where} bug")
            return original(*args)
        return call
    monkeypatch.setattr(target, name, broken(getattr(target, name)))
    asks = dict(logprobs=2) if where == "logprob" else dict(prompt_logprobs=1) if where == "prompt_logprobs" else {}
    prompts = [[1, 2, 3], [4, 5]] if where != "prompt_logprobs" else [[1, 2, 3], [4] * 9]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **asks)] * 2
    with pytest.raises(KeyError, match=f"{where} bug"):
        collect(engine, prompts, params)
    assert len(calls) == fail_at and engine.error is None and engine.num_requests == 0
    assert engine.scheduler.allocator.num_available == 64 and not engine.scheduler.has_work
    monkeypatch.undo()
    out = collect(engine, prompts, params)
    assert [[o.token for o in out[i]] for i in (0, 1)] == [greedy_reference(p, 6) for p in prompts]
    assert engine.scheduler.allocator.num_available == 64


def test_a_failed_step_aborts_the_other_generations_of_the_step_with_its_error(monkeypatch):
    """Two generations stepped in one thread: the one whose step fails raises the step's error, the other's
    requests (in that step, their state half committed) end with LlmircError naming it; the engine serves on."""
    engine, _ = make()
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    first, second = engine.generate([[1, 2, 3]], params), engine.generate([[4, 5]], params)
    next(first)
    next(second)  # both in the engine, both in the next step
    monkeypatch.setattr(engine.scheduler, "commit", lambda step, sampled: {}["scheduler bug"])
    with pytest.raises(KeyError, match="scheduler bug"):
        list(first)
    monkeypatch.undo()
    with pytest.raises(LlmircError, match="generation failed: KeyError: 'scheduler bug'"):
        list(second)
    assert engine.error is None and engine.num_requests == 0 and engine.scheduler.allocator.num_available == 64
    assert [o.token for o in collect(engine, [[4, 5]], params)[0]] == greedy_reference([4, 5], 6)


def test_a_generation_left_early_frees_its_blocks():
    """Leaving a generate loop (break, or the consumer's own exception) aborts its requests and frees their
    blocks at once."""
    engine, _ = make(num_blocks=16)
    params = [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)] * 2
    for _ in engine.generate([[1, 2], [3, 4]], params):
        break
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 16
    with pytest.raises(ValueError, match="consumer"):
        for _ in engine.generate([[1, 2], [3, 4]], params):
            raise ValueError("consumer")
    assert engine.num_requests == 0 and engine.scheduler.allocator.num_available == 16
    out = collect(engine, [[1, 2]], [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)])
    assert [o.token for o in out[0]] == greedy_reference([1, 2], 6)


def test_requests_are_checked_before_anything_runs():
    engine, _ = make(num_blocks=8)
    with pytest.raises(LlmircError, match="context of 256"):
        list(engine.generate([[1], [1] * 300], [SamplingParams(max_tokens=4)] * 2))
    with pytest.raises(LlmircError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0.0), lambda o: None)
    with pytest.raises(LlmircError, match="stop strings need a tokenizer"):
        engine.add_request([1], SamplingParams(stop=("x",)), lambda o: None)
    with pytest.raises(LlmircError, match="logprobs"):
        engine.add_request([1], SamplingParams(logprobs=21), lambda o: None)
    assert engine.num_requests == 0 and engine.scheduler.waiting == type(engine.scheduler.waiting)()


@pytest.mark.parametrize("where", ["commit", "sink"])
def test_a_failure_outside_the_forward_fails_every_request_not_the_loop_thread(where):
    """A step that raises after its forward (a scheduler bug, a request's callback) fails every request and
    the engine, as a failing forward does: the loop thread died instead, and every client waited forever."""
    engine, _ = make()
    if where == "commit":
        commit = engine.scheduler.commit

        def broken(step, sampled):
            if engine.stats.steps == 2:
                raise KeyError("scheduler bug")
            return commit(step, sampled)
        engine.scheduler.commit = broken
    else:
        def sink(o):
            raise RuntimeError("callback bug")
        engine.add_request([7, 8], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), sink)
    engine.start()
    errors = []

    def client():
        try:
            list(engine.generate([[1, 2], [3]], [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)] * 2))
        except Exception as e:  # noqa: BLE001 - checked below
            errors.append(e)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    thread.join(30)
    alive = thread.is_alive()
    engine.abort_all()
    engine.stop()
    assert not alive, "the client still waits"
    assert len(errors) == 1 and engine.error and engine.num_requests == 0, errors
    with pytest.raises(LlmircError, match="stopped after an error"):
        engine.add_request([1], SamplingParams(), lambda o: None)
