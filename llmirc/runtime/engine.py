"""The engine: one loop owns the scheduler, the executor and the sampler.

Requests are added and aborted at any time, from any thread (`add_request`, `abort`): commands
go through a thread-safe queue that the loop drains between steps, and each request's outputs
go to the callback (`sink`) it was added with, called on the loop's thread. The loop runs
either on its own thread (`start()`: the server) or in the caller's (`step()`: `Model.generate`
drives it until its requests finish). Either way it is the same code path.

Each step: schedule (continuous batching, prefix cache, preemption: `scheduler.py`), one
`executor.forward(...)` (logits [L, vocab] float32), then per logits row either sample a token
with the request's own parameters and generator or, for prompt-logprob rows, compute the
logprob of the next prompt token. With a tokenizer, each request's text is detokenized as it
grows and cut at its stop strings (`TextStream`); a request that hits one finishes at once.
The executor is the only model-specific part: anything with
`forward(token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
logits_indices)` and `num_blocks`/`block_size`/`vocab_size` runs here. An executor with
`forward_tokens` (a GPU target) samples on the device in steps that need no logits (no
logprobs, penalties, logit bias or min-p asked for): only token ids come back.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from llmirc.errors import LlmircError, RequestError

from .sampling import (GREEDY_TEMPERATURE, bad_words_ids, ban_bad_words, bias_arrays, logprobs, penalize, sample,
                       validate_sampling)
from .scheduler import Scheduler
from .structured import Guide, guide_tokenizer
from .tokenizer import TextStream, Tokenizer

log = logging.getLogger("llmirc.engine")
MAX_LOGPROBS = 20  # top logprobs per position, as OpenAI allows


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for (vLLM's SamplingParams, the subset llmirc implements).

    `logprobs` n: the sampled token's logprob and the n most likely (None: no logprobs).
    `prompt_logprobs` n: the same for every prompt token from `prompt_logprobs_start` on
    (position 0 has none). Logprobs are of the model's raw distribution (log-softmax of the
    logits), as vLLM reports them by default. `stop`: strings that end the text (left out of
    it unless `include_stop_str_in_output`); they need the engine's tokenizer. The text of a
    `stop_token_ids` token that ends the request is left out the same way (vLLM's). `detokenize`:
    produce text (when the engine has a tokenizer). `min_p`, `repetition_penalty`, `presence_penalty`,
    `frequency_penalty` and `logit_bias` ((token id, bias) pairs) as vLLM's (sampling.penalize and
    sample): they change greedy decoding too (min_p aside), and a request that sets any of them is sampled
    from its logits on the host (no multi-step greedy runs, no sampling on a GPU). `min_tokens`: vLLM's;
    until that many tokens are out, the ids that would end the request (stop_token_ids, and the
    end-of-sequence ids unless ignore_eos) are never sampled and stop strings are not looked for (one
    that ends later counts, as vLLM's detokenizer finds it). `allowed_token_ids`: vLLM's; only these are
    sampled. `bad_words`: vLLM's; a token that would complete one of these words (sampling.bad_words_ids,
    ban_bad_words; they need the engine's tokenizer) is never sampled. `guided`: an llguidance grammar
    (structured.grammar: a JSON schema, a regex, choices) the text must follow; it needs the engine's
    tokenizer, and its requests are sampled on the host too."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    guided: str | None = None

    @property
    def penalties(self) -> bool:
        """Whether sampling.penalize changes the logits (a bias, a repetition, presence or frequency penalty)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)

    @property
    def penalized(self) -> bool:
        """Whether the logits change before sampling (the penalties, the allowed ids, the bad words)."""
        return self.penalties or self.allowed_token_ids is not None or bool(self.bad_words)

    def validate(self) -> None:
        """Raises RequestError naming the first invalid field (its `field` too)."""
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):  # (vLLM's and OpenAI's range)
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, Real) and -2 <= value <= 2):
                raise RequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not (isinstance(rp, Real) and 0 < rp < math.inf):
            raise RequestError(f"repetition_penalty must be a finite number > 0, got {rp!r}", "repetition_penalty")
        if not isinstance(self.logit_bias, (tuple, list)):
            raise RequestError(f"logit_bias must be (token id, bias) pairs, got {self.logit_bias!r}", "logit_bias")
        for pair in self.logit_bias:  # (the first bad one named: not all 10,000 of a long bias)
            if not isinstance(pair, tuple) or len(pair) != 2 or isinstance(pair[0], bool) \
                    or not isinstance(pair[0], (int, np.integer)) or pair[0] < 0 or isinstance(pair[1], bool) \
                    or not isinstance(pair[1], Real) or not math.isfinite(pair[1]):
                raise RequestError(f"logit_bias: {pair!r} is not a (token id >= 0, finite bias) pair", "logit_bias")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            # (before min_tokens, which is compared with it: -1 was "min_tokens must be ... to max_tokens (-1)")
            raise RequestError(f"max_new_tokens must be an integer >= 0, got {self.max_tokens!r}", "max_tokens")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, (int, np.integer)) or \
                not 0 <= self.min_tokens <= self.max_tokens:  # (vLLM's rule)
            raise RequestError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), "
                               f"got {self.min_tokens!r}", "min_tokens")
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, (tuple, list)) or not allowed or any(
                isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in allowed)):
            raise RequestError(f"allowed_token_ids must be a non-empty list of token ids, got {allowed!r}",
                               "allowed_token_ids")
        if not isinstance(self.bad_words, (tuple, list)) or not all(isinstance(w, str) and w.strip()
                                                                     for w in self.bad_words):
            raise RequestError(f"bad_words must be non-empty strings, got {self.bad_words!r}", "bad_words")
        if self.guided is not None and not isinstance(self.guided, str):
            raise RequestError(f"guided must be an llguidance grammar (structured.grammar), got {self.guided!r}",
                               "guided")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise RequestError(f"seed must be an integer >= 0 (or unset), got {self.seed!r}", "seed")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be integer token ids, got {self.stop_token_ids!r}",
                               "stop_token_ids")
        if any(not isinstance(s, str) for s in self.stop):
            raise RequestError(f"stop must be strings, got {self.stop!r}", "stop")
        if "" in self.stop:  # it would match everywhere; vLLM's SamplingParams refuses it too
            raise RequestError("stop cannot contain an empty string", "stop")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                          and 0 <= value <= MAX_LOGPROBS):  # (True would mean 1)
                raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}", name)
        if not isinstance(self.prompt_logprobs_start, int) or self.prompt_logprobs_start < 0:
            raise RequestError(f"prompt_logprobs_start must be an integer >= 0, got {self.prompt_logprobs_start!r}",
                               "prompt_logprobs_start")
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize"):  # "no" would act as True
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise RequestError(f"{name} must be True or False, got {getattr(self, name)!r}", name)


@dataclass
class TokenLogprob:
    """A token's logprob and the `top` most likely tokens at its position, as (token id, logprob); `rank`
    (prompt tokens' only): how many tokens are at least as likely, itself included (vLLM's, 1-based)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request: at most one new token, and the text it completes.

    `prompt_logprobs` (one entry per prompt position from the requested start, None for
    position 0) comes with the request's first output only. finish_reason: "stop" (an
    end-of-sequence token, or `stop_reason`: the stop token id or stop string hit; or no token left by
    allowed_token_ids, bad_words, min_tokens and its grammar together: a last output without one), "length",
    or "abort" (aborted, or the engine failed: `error`). An end-of-sequence id other than the tokenizer's
    eos_token is a stop token id to vLLM, so its id is the stop_reason (and its text left out) too; the
    tokenizer's eos_token is null even among the request's stop_token_ids (unless ignore_eos)."""

    request_id: Hashable
    token: int | None
    finished: bool
    finish_reason: str | None = None
    text: str = ""  # new text (empty without a tokenizer)
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    num_generated: int = 0
    error: str | None = None


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput], None]
    rng: np.random.Generator
    arrival: float
    first_token: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    text: TextStream | None = None
    output: list[int] = field(default_factory=list)  # the tokens generated so far
    penalty_inputs: tuple | None = None  # (prompt ids array, sampling.bias_arrays): made at its first penalized row
    held_ids: np.ndarray | None = None  # the ids min_tokens keeps from being sampled (None: none)
    guide: Guide | None = None  # the structured output's matcher
    bad_words: list[tuple[int, ...]] = field(default_factory=list)  # token sequences never completed
    disallowed: np.ndarray | None = None  # bool [V]: what allowed_token_ids leaves out (made at its first row)
    stuck: bool = False  # its constraints left no token at its last row: it ends there, the token drawn dropped

    @property
    def holds(self) -> bool:
        """Whether min_tokens still keeps the ids that would end the request from being sampled."""
        return self.held_ids is not None and self.num_generated < self.params.min_tokens

    @property
    def on_host(self) -> bool:
        """Whether its logits change before sampling, so that its row is sampled on the host (`Engine._constrain`)."""
        return self.params.penalized or self.holds or self.guide is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.output)


class Histogram:
    """Counts of observations at or below each bound, their sum and count (Prometheus' histogram)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


LATENCY_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


@dataclass
class EngineStats:
    """Counters for /metrics (Prometheus): requests, tokens, latencies."""

    requests_added: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the forward
    steps: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))  # time to first token
    e2e: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))  # arrival to finish


def _closed() -> LlmircError:
    return LlmircError("the model was closed")


class Engine:
    def __init__(self, executor, scheduler: Scheduler, tokenizer: Tokenizer | None = None,
                 num_scheduler_steps: int = 8):
        self.executor = executor
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.stats = EngineStats()
        self.failure: BaseException | None = None  # set when a step failed: the engine serves nothing more
        self.closed = False  # set by close(): the engine serves nothing more, its executor is closed
        self._requests: dict[int, _Request] = {}
        self._guide_tokenizer = None  # llguidance's, made at the first guided request (`_guides`)
        self._guide_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stepping = threading.Lock()
        # Decode steps run in one native call when every running request is greedy and plain (no
        # logprobs, no stop strings) and none waits to be admitted (vLLM's num_scheduler_steps; 1: off).
        # Their tokens then stream in bursts of up to this many.
        if isinstance(num_scheduler_steps, bool) or not isinstance(num_scheduler_steps, int) or num_scheduler_steps < 1:
            raise LlmircError(f"num_scheduler_steps must be an integer >= 1, got {num_scheduler_steps!r}")
        self.num_scheduler_steps = num_scheduler_steps

    def _stop_eos_ids(self) -> frozenset[int]:
        """The end-of-sequence ids vLLM reports as a stop_reason: those beside the tokenizer's eos_token
        (generation_config.json's list, as Gemma's <end_of_turn> or Llama 3's <|eom_id|>), which vLLM adds to
        each request's stop_token_ids (SamplingParams.update_from_generation_config); none without a tokenizer."""
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return self.scheduler.eos_token_ids - {eos} if eos is not None else frozenset()

    # -- called from any thread -------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """The failed step's exception as one line (None while the engine is healthy)."""
        return None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"

    def add_request(self, prompt: list[int], params: SamplingParams, sink: Callable[[RequestOutput], None],
                    guide: Guide | None = None) -> int:
        """Validate and queue a request; returns its id. Raises LlmircError (RuntimeLimitError
        for a request over the model's limits) before anything is queued. `guide`: the request's
        structured-output matcher when made beforehand (`make_guide`), else it is made here."""
        if self.error is not None:
            raise LlmircError(f"the engine stopped after an error: {self.error}")
        prompt = [int(t) for t in prompt]
        self.check(prompt, params)
        guide = guide or self.make_guide(params)
        if guide is not None and params.allowed_token_ids is not None and \
                not guide.allows_first(params.allowed_token_ids):
            raise RequestError("allowed_token_ids: the structured output allows none of these tokens at the start",
                               "allowed_token_ids")
        request_id = next(self._ids)
        rng = np.random.default_rng(params.seed)
        self._inbox.put(("add", request_id, prompt, params, sink, rng, time.perf_counter(), guide))
        return request_id

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise the error `add_request` would (thread-safe: reads only fixed settings)."""
        if self.closed:
            raise _closed()
        params.validate()
        vocab = self.scheduler.vocab_size
        if vocab is not None and (bad := [t for t in params.stop_token_ids if not 0 <= t < vocab]):
            raise RequestError(f"stop_token_ids: token id {bad[0]} is outside the model's vocabulary of {vocab}",
                               "stop_token_ids")
        if vocab is not None and (bad := [t for t, _ in params.logit_bias if not 0 <= t < vocab]):
            raise RequestError(f"logit_bias: token id {bad[0]} is outside the model's vocabulary of {vocab}",
                               "logit_bias")
        if vocab is not None and (bad := [t for t in params.allowed_token_ids or () if not 0 <= t < vocab]):
            raise RequestError(f"allowed_token_ids: token id {bad[0]} is outside the model's vocabulary of {vocab}",
                               "allowed_token_ids")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this bundle has none: use stop token ids", "stop")
        if vocab is not None and (bad := [t for ids in self._bad_words(params) for t in ids if not 0 <= t < vocab]):
            raise RequestError(f"bad_words: token id {bad[0]} is outside the model's vocabulary of {vocab}",
                               "bad_words")
        if params.guided is not None:
            self._guides()  # (LlmircError without a tokenizer, or where it does not fit the model)
        self.scheduler.check_request(prompt, params.max_tokens)

    def make_guide(self, params: SamplingParams) -> Guide | None:
        """The structured-output matcher of a request with these params (None without one): made off the
        engine's thread (a large schema's takes a tenth of a second; the first, llguidance's tokenizer too).
        RequestError (field guided) for a grammar that does not load or matches no text; LlmircError without
        a tokenizer."""
        if params.guided is None:
            return None
        guides = self._guides()
        try:
            return Guide(guides, params.guided)
        except LlmircError as e:
            raise RequestError(str(e), "guided") from None

    def _bad_words(self, params: SamplingParams) -> list[tuple[int, ...]]:
        """The request's bad words as token sequences (sampling.bad_words_ids); LlmircError without a tokenizer."""
        if not params.bad_words:
            return []
        if self.tokenizer is None:
            raise RequestError("bad_words need a tokenizer, and this bundle has none", "bad_words")
        return bad_words_ids(lambda text: self.tokenizer.encode(text, add_special_tokens=False), params.bad_words)

    def _guides(self):
        """llguidance's tokenizer of the bundle's (made once, from any thread); LlmircError when it does
        not fit the model (a tokenizer with more ids than the logits)."""
        if self.tokenizer is None:
            raise RequestError("structured outputs need a tokenizer, and this bundle has none", "guided")
        with self._guide_lock:
            if self._guide_tokenizer is None:
                try:
                    self._guide_tokenizer = guide_tokenizer(self.tokenizer, self.executor.vocab_size,
                                                            self.scheduler.eos_token_ids)
                except ValueError as e:
                    raise LlmircError(f"structured outputs: the bundle's tokenizer does not fit the model: {e}") \
                        from None
            return self._guide_tokenizer

    def abort(self, request_id: int) -> None:
        """Stop a request and free its KV blocks at the next step boundary (no-op if finished)."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """`abort` every request the engine has at the next step boundary (a server shutting down)."""
        self._inbox.put(("abort_all",))

    def call(self, fn: Callable[[], object]):
        """Run `fn` on the loop's thread between two steps (inline when no loop thread runs); returns its result.
        Raises LlmircError once the engine is closed."""
        if self.closed:
            raise _closed()
        if not self.running_in_thread:
            with self._stepping:
                if self.closed:
                    raise _closed()
                return fn()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("call", fn, done))
        while True:
            try:
                ok, value = done.get(timeout=0.05)
                break
            except queue.Empty:
                if not self.running_in_thread:  # the loop stopped (closed) before it took the call
                    with self._stepping:
                        self._drain(block=False)
        if not ok:
            raise value
        return value

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def start(self) -> None:
        """Run the loop on a daemon thread until `stop()`."""
        if self.closed:
            raise _closed()
        if self.running_in_thread:
            return
        self._thread = threading.Thread(target=self._loop, name="llmirc-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.running_in_thread:
            self._inbox.put(("stop",))
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Refuse new requests, end every request in flight (finish_reason "abort"), stop the
        loop thread and close the executor (`close()`, where it has one) once no step runs.
        Requests and calls that race with it end with LlmircError "the model was closed"."""
        self.closed = True
        self.abort_all()
        self.stop()
        with self._stepping:
            self._drain(block=False)  # what other threads queued: refused now that closed is set
            if hasattr(self.executor, "close"):
                self.executor.close()

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> bool:
        """Apply queued commands and run one step; returns True while requests remain."""
        if self.running_in_thread:
            raise RuntimeError("the engine runs on its own thread: do not step it from outside")
        with self._stepping:
            self._drain(block=False)
            self._step()
            return bool(self._requests)

    def _loop(self) -> None:
        while True:
            try:
                if not self._drain(block=not self._requests):
                    return
                self._step()
            except Exception as e:  # a bug past the forward (a scheduler's, a sink's): the thread must not die
                self._fail(e)  # with every client waiting on it; as a failed forward, every request fails

    def _fail(self, e: Exception) -> None:
        log.exception("engine loop failed")
        self.failure = e
        for request_id in list(self._requests):
            try:
                self._abort(request_id, "abort", self.error)
            except Exception:  # its sink raised too (it was taken out first): the others still get theirs
                log.exception("failing request %s", request_id)

    def _drain(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when `block`); False on stop."""
        try:
            command = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1], "abort")
            elif kind == "abort_all":
                for request_id in list(self._requests):
                    self._abort(request_id, "abort")
            elif kind == "call" and self.closed:
                command[2].put((False, _closed()))
            elif kind == "call":
                fn, done = command[1], command[2]
                try:
                    done.put((True, fn()))
                except BaseException as e:  # handed to the caller's thread
                    done.put((False, e))
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, request_id, prompt, params: SamplingParams, sink, rng, arrival, guide: Guide | None) -> None:
        if self.error is not None or self.closed:  # queued as the engine failed or closed: refused
            sink(RequestOutput(request_id, None, True, "abort", error=self.error or str(_closed())))
            return
        start = params.prompt_logprobs_start if params.prompt_logprobs is not None else None
        self.scheduler.add_request(prompt, params.max_tokens, request_id=request_id, ignore_eos=params.ignore_eos,
                                   stop_token_ids=params.stop_token_ids, prompt_logprobs_from=start)
        req = _Request(prompt, params, sink, rng, arrival, guide=guide, bad_words=self._bad_words(params))
        if self.tokenizer is not None and params.detokenize:
            req.text = TextStream(self.tokenizer, prompt, params.stop, params.include_stop_str_in_output,
                                  params.min_tokens)
        if params.min_tokens:  # (the scheduler's stop ids: scheduler.add_request)
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.scheduler.eos_token_ids))
            req.held_ids = np.array(sorted(ends), dtype=np.int64) if ends else None
        if start is not None:
            req.prompt_logprobs = [None] if start == 0 else []
        self._requests[request_id] = req
        self.stats.requests_added += 1
        self.stats.prompt_tokens += len(prompt)

    def _abort(self, request_id, reason: str, error: str | None = None) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        self.stats.finished[reason] += 1
        req.sink(RequestOutput(request_id, None, True, reason, prompt_tokens=req.prompt_len,
                               num_generated=req.num_generated, error=error))

    def _step(self) -> None:
        if not self._requests:
            return
        step = self.scheduler.schedule()
        if step is None:
            return
        try:
            ran = self._forward(step)
        except BaseException:  # Ctrl-C in the forward: the step is undone (its chunks run again), the engine usable
            self.scheduler.discard(step)
            raise
        if ran is None:  # the forward failed: so did the engine
            return
        try:
            self._record(step, *ran)
        except BaseException as e:  # past the forward (a commit, a sampler, a detokenizer, Ctrl-C)
            self._undo(step, e)
            raise

    def _forward(self, step) -> tuple[int, np.ndarray | None, np.ndarray] | None:
        """Run `step`: (the decode steps run, the logits or None, the tokens: [run, sequences] for a decode run,
        else one per sampling row where chosen on the device, else None: `_record` samples them). None when
        the forward failed: a bug or a broken library, every request failed, the engine serves nothing more."""
        run = self._decode_run(step)
        try:
            if run > 1:  # fewer rows come back when a token falls outside the embedding table
                return run, None, self.executor.forward_greedy(step.abi_inputs(), run)
            if hasattr(self.executor, "forward_tokens") and self._no_logits_needed(step):
                return run, None, self._sample_on_device(step)
            return run, self.executor.forward(*step.abi_inputs()), None
        except Exception as e:
            log.exception("engine step failed")
            self.failure = e
            self.scheduler.commit(step, np.zeros(len(step.sample_rows), dtype=np.int64))
            for request_id in list(self._requests):
                self._abort(request_id, "abort", self.error)
            return None

    def _undo(self, step, e: BaseException) -> None:
        """After `step` failed past its forward: forget it in the scheduler if it is still pending, and abort
        every request of the step still here with the error, their blocks freed (those with a logits row may
        be part committed, part not: a token the scheduler recorded and the request never got; those without,
        prefill chunks short of their prompt's end, are aborted too, the simpler rule). The engine serves on:
        in the caller's thread (`step()`) the error reaches that caller and the next generate runs as on a
        fresh engine; on the loop thread `_loop` fails the engine, as before."""
        self.scheduler.discard(step)
        if isinstance(e, Exception):
            log.exception("engine step failed after its forward: its requests are aborted")
        error = f"{type(e).__name__}: {e}"
        for request_id in dict.fromkeys(step.request_ids):
            try:
                self._abort(request_id, "abort", error)
            except Exception:  # its sink raised too (it was taken out first): the others still get theirs
                log.exception("aborting request %s", request_id)

    def _record(self, step, run: int, logits: np.ndarray | None, tokens: np.ndarray | None) -> None:
        """Sample (unless done), commit, and hand each request its output."""
        sampled = self._sample(step, logits) if tokens is None else tokens
        steps = len(sampled) if run > 1 else 1
        self.stats.steps += steps
        self.stats.computed_tokens += step.num_tokens * steps
        if logits is not None:
            self._prompt_logprobs(step, logits)
        rows = {step.request_ids[r]: r for r in step.sample_rows}
        now = time.perf_counter()
        events = self.scheduler.commit_run(step, sampled) if run > 1 else self.scheduler.commit(step, sampled)
        for event in events:
            req = self._requests[event.request_id]
            out = RequestOutput(event.request_id, event.token, event.finished, event.finish_reason,
                                prompt_tokens=req.prompt_len, cached_tokens=event.cached_tokens)
            if event.token is not None and req.stuck:  # (no token was allowed: it ends without the one drawn)
                if not event.finished:
                    self.scheduler.abort(event.request_id)
                out.token, out.finished, out.finish_reason = None, True, "stop"
            elif event.token is not None:
                req.output.append(event.token)
                if req.guide is not None and not event.finished:
                    req.guide.consume(event.token)
                    # (a complete grammar allows only the end-of-sequence ids: one sampled with ignore_eos
                    # ends the request here; a broken matcher too)
                    if req.guide.ended(event.token, self.scheduler.eos_token_ids):
                        self.scheduler.abort(event.request_id)
                        out.finished, out.finish_reason = True, "stop"
                self.stats.generation_tokens += 1
                if req.first_token is None:
                    req.first_token = now
                    self.stats.ttft.observe(now - req.arrival)
                if req.params.logprobs is not None:
                    out.logprob = self._token_logprob(logits[rows[event.request_id]], event.token,
                                                      req.params.logprobs)
                # (vLLM checks the tokenizer's eos_token before stop_token_ids: null for it, unless ignore_eos)
                eos = self.tokenizer.eos_token_id if self.tokenizer is not None and not req.params.ignore_eos else None
                stop_token = event.finish_reason == "stop" and event.token != eos and (
                    event.token in req.params.stop_token_ids or event.token in self._stop_eos_ids())
                if stop_token:
                    out.stop_reason = event.token
                # (vLLM: a stop token id's text is left out unless include_stop_str_in_output)
                if req.text is not None and not (stop_token and not req.params.include_stop_str_in_output):
                    out.text = req.text.add(event.token)
                    if req.text.stopped is not None and not event.finished:  # a stop string: finished now
                        self.scheduler.abort(event.request_id)  # (its blocks freed)
                        out.finished = True
            if out.finished and req.text is not None:
                out.text += req.text.finish()
                if req.text.stopped is not None:  # (a stop string met: "stop", even if the length was reached too)
                    out.finish_reason, out.stop_reason = "stop", req.text.stopped
            out.num_generated = req.num_generated
            if req.prompt_logprobs is not None:
                out.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
            if out.finished:
                del self._requests[event.request_id]
                self.stats.finished[out.finish_reason] += 1
                self.stats.e2e.observe(now - req.arrival)
            req.sink(out)

    def _decode_run(self, step) -> int:
        """How many greedy decode steps `step` may run in one native call (1: just this one)."""
        if self.num_scheduler_steps < 2 or self.scheduler.waiting or \
                not getattr(self.executor, "supports_greedy_runs", False) or not self._no_logits_needed(step):
            return 1
        params = [self._requests[step.request_ids[r]].params for r in step.sample_rows]
        if any(p.temperature > GREEDY_TEMPERATURE or p.stop for p in params):
            return 1
        return self.scheduler.reserve_decode_run(step, self.num_scheduler_steps)

    def _sample(self, step, logits: np.ndarray) -> np.ndarray:
        """One token per sampling row, each with its request's parameters (logits penalized first
        where they ask for it: `logits` itself stays raw, for logprobs) and generator."""
        rows = step.sample_rows
        reqs = [self._requests[step.request_ids[r]] for r in rows]
        scores = logits if len(rows) == len(logits) else logits[rows]
        if any(req.on_host for req in reqs):
            scores = scores.copy()
            for i, req in enumerate(reqs):
                if req.on_host:
                    self._constrain(req, scores[i])
        if all(req.params.temperature <= GREEDY_TEMPERATURE for req in reqs):  # one argmax (first max, as sample())
            return np.argmax(scores, axis=-1).astype(np.int64)
        out = np.zeros(len(rows), dtype=np.int64)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            p = req.params
            greedy = p.temperature <= GREEDY_TEMPERATURE
            key = (0.0, None, None, 0.0) if greedy else (p.temperature, p.top_k, p.top_p, p.min_p)
            groups.setdefault(key, []).append(i)
        for (temperature, top_k, top_p, min_p), members in groups.items():
            out[members] = sample(scores[members], temperature, top_k, top_p, [reqs[i].rng for i in members], min_p)
        return out

    @staticmethod
    def _constrain(req: _Request, row: np.ndarray) -> None:
        """A request's logits row [V], in place, as its constraints and penalties leave it: what its grammar,
        min_tokens, allowed_token_ids and bad_words rule out at -inf, then sampling.penalize. Where they
        leave no token between them the request ends (`stuck`): the row is made plain, a token is drawn from
        it and dropped (the argmax of the -inf row, id 0, which none of them allows, was added)."""
        p = req.params
        if req.guide is not None:
            # (putmask: 0.04 ms on a 49k row, boolean indexing 0.21 ms, each step of each guided row)
            np.putmask(row, ~req.guide.allowed(len(row)), -np.inf)
        if req.holds:
            held = row[req.held_ids]
            row[req.held_ids] = -np.inf
            if req.guide is not None and not np.isfinite(row).any():  # the grammar's end wins
                row[req.held_ids] = held
        if p.allowed_token_ids is not None:
            if req.disallowed is None:
                req.disallowed = np.ones(len(row), dtype=bool)
                req.disallowed[list(p.allowed_token_ids)] = False
            np.putmask(row, req.disallowed, -np.inf)
        ban_bad_words(row, req.output, req.bad_words)
        if p.penalties:
            if req.penalty_inputs is None:
                req.penalty_inputs = (np.asarray(req.prompt, dtype=np.int64), bias_arrays(p.logit_bias))
            prompt, bias = req.penalty_inputs
            row[:] = penalize(row, prompt, req.output, p.repetition_penalty, p.presence_penalty,
                              p.frequency_penalty, bias)
        req.stuck = bool(np.isneginf(row).all())
        if req.stuck:
            row[:] = 0.0

    def _no_logits_needed(self, step) -> bool:
        """Whether the step's tokens can be chosen without its logits on the host: no prompt logprobs,
        logprobs, penalties, min-p (min-p of a greedy request changes nothing: vLLM drops it) or
        min_tokens still holding asked for."""
        reqs = (self._requests[step.request_ids[r]] for r in step.sample_rows)
        return not (step.targets >= 0).any() and all(
            req.params.logprobs is None and not req.on_host
            and not (req.params.min_p and req.params.temperature > GREEDY_TEMPERATURE) for req in reqs)

    def _sample_on_device(self, step) -> np.ndarray:
        """Tokens of the sampling rows drawn by the executor on the device (a GPU target): each row
        with its request's temperature, top-k, top-p and a seed drawn from its generator."""
        inputs = step.abi_inputs()
        L = len(inputs[6])
        temperature, top_k = np.zeros(L, np.float32), np.zeros(L, np.int32)
        top_p, seeds = np.ones(L, np.float32), np.zeros(L, np.int64)
        for r in step.sample_rows:
            req = self._requests[step.request_ids[r]]
            p = req.params
            if p.temperature > GREEDY_TEMPERATURE:
                temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k or 0, p.top_p or 1.0
                seeds[r] = req.rng.integers(0, 2**62)
        tokens = self.executor.forward_tokens(inputs, temperature, top_k, top_p, seeds, np.zeros(L, np.int64))
        return tokens[step.sample_rows].astype(np.int64)

    def _prompt_logprobs(self, step, logits: np.ndarray) -> None:
        rows = np.flatnonzero(step.targets >= 0)
        if not len(rows):
            return
        for request_id in dict.fromkeys(step.request_ids[r] for r in rows):
            req = self._requests[request_id]
            mine = [r for r in rows if step.request_ids[r] == request_id]
            chosen, top_ids, top_lp = logprobs(logits[mine], step.targets[mine], req.params.prompt_logprobs)
            target = logits[mine, step.targets[mine]]
            ranks = (logits[mine] >= target[:, None]).sum(axis=-1)
            req.prompt_logprobs.extend(
                TokenLogprob(int(t), float(lp), list(zip(ids.tolist(), tlp.tolist())), int(rank))
                for t, lp, ids, tlp, rank in zip(step.targets[mine], chosen, top_ids, top_lp, ranks))

    @staticmethod
    def _token_logprob(row: np.ndarray, token: int, top_n: int) -> TokenLogprob:
        chosen, top_ids, top_lp = logprobs(row[None], [token], top_n)
        return TokenLogprob(token, float(chosen[0]), list(zip(top_ids[0].tolist(), top_lp[0].tolist())))

    # -- running a batch to completion (the Python API) --------------------------------------

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[RequestOutput]:
        """Run requests to completion, yielding their outputs as they come (request_id = index).

        All requests are validated here, at the call (LlmircError), and queued at the first
        `next`. Closing the generator early aborts what is left of them."""
        for prompt, p in zip(prompts, params):
            self.check([int(t) for t in prompt], p)
        return self._run(prompts, params)

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[RequestOutput]:
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        ids = {self.add_request(prompt, p, outputs.put): i for i, (prompt, p) in enumerate(zip(prompts, params))}
        remaining = set(ids)
        try:
            while remaining:
                if not self.running_in_thread and outputs.empty():
                    self.step()
                    continue
                out = outputs.get()
                if out.finished:
                    remaining.discard(out.request_id)
                if out.error:  # the step's own exception: a bug stays an internal error, a limit a user error
                    raise self.failure or (_closed() if self.closed else
                                           LlmircError(f"generation failed: {out.error}"))
                out.request_id = ids[out.request_id]
                yield out
        finally:
            for request_id in remaining:
                self.abort(request_id)
            if remaining and not self.running_in_thread:
                with self._stepping:
                    self._drain(block=False)
