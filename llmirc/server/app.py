"""The FastAPI app of `llmirc serve`: the engine seen from asyncio, auth, errors, health, metrics.

The engine runs on its own thread (`Engine.start`); a request handler adds its requests with a
callback that hands each output to an asyncio queue (`loop.call_soon_threadsafe`), so the event
loop never waits on the model. A client that disconnects (streaming or not) is noticed within
`DISCONNECT_POLL_S`: its requests are aborted and their KV blocks freed at the engine's next
step boundary.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with the status
in `code`: 400 for a bad or over-long request (validation errors included, as vLLM does, not
FastAPI's 422), 401 without the API key, 404 for an unknown model or route, 413 for a body over
`max_body_bytes`, 503 (with Retry-After) when more than `max_queued_requests` requests wait, or
the engine has failed, or the server is shutting down. A stream answers 200 as soon as its
requests are admitted; an error after that is an event with the error body (`event_stream`).
Besides the APIs' routes: GET (and HEAD) /health and /ping, /version, /metrics, /v1/models and
/v1/models/{id} (SGLang's /health_generate and /flush_cache are in sglang_api.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from llmirc import __version__
from llmirc.errors import LlmircError, RuntimeLimitError
from llmirc.runtime import template_worker
from llmirc.runtime.engine import RequestOutput, SamplingParams, TokenLogprob
from llmirc.runtime.model import Model

log = logging.getLogger("llmirc.server")
DISCONNECT_POLL_S = 0.1


class APIError(Exception):
    """An error answered to the client: status, message, OpenAI error type and the parameter at fault."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status) or HTTPStatus(self.status).phrase.title().replace(" ", "") + "Error"
        message = self.message.encode("utf-8", "backslashreplace").decode()  # (a lone surrogate the client sent)
        return {"error": {"message": message, "type": kind,
                          "param": self.param, "code": self.status}}


def _integral(value):
    # JSON has one number type: 5.0 is the integer 5, as vLLM's (lax) request models take it; a
    # fraction is refused in pydantic's own words, a string or a boolean by the strict int check.
    # A number beyond 64 bits (1e300, or 10**19 written out) is refused in every integer field, in
    # a few words, rather than accepted by some fields and echoed digit by digit in others' errors.
    if isinstance(value, float) and math.isfinite(value):
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "Input should be a valid integer, got a number with a "
                                                        "fractional part")
    elif not isinstance(value, int) or isinstance(value, bool):
        return value
    if not -2**63 <= value < 2**63:
        got = f"{value:.3g}" if isinstance(value, float) else f"an integer of {len(str(abs(value)))} digits"
        raise PydanticCustomError("int_too_large", f"Input should be a 64-bit integer, got {got}")
    return int(value)


Int = Annotated[int, BeforeValidator(_integral)]
"""An integer request field: an int, or a float with an integral value (5.0, not 5.5)."""


def refuse_not_implemented(fields: dict, table: dict[str, tuple]) -> None:
    """A 400 (APIError) naming the first field of `fields` that `table` lists whose value is not
    None nor one of its neutral values there (`{name: (neutral, ...)}`): parameters llmirc does not
    implement are refused, never silently ignored."""
    for name, neutral in table.items():
        if (value := fields.get(name)) is not None and value not in neutral:
            only = f" (only {' or '.join(map(repr, neutral))})" if neutral else ""
            raise APIError(400, f"{name} is not supported by llmirc{only}", name)


class APIKeyCheck:
    """ASGI middleware: an HTTP request for anything but /health, /ping (vLLM's health check, which
    it answers without the key), /health_generate (SGLang's, which SGLang answers without one) and
    /metrics needs the header `Authorization: Bearer KEY`, or gets a 401. Plain ASGI on purpose:
    behind Starlette's `@app.middleware("http")` a route never sees its client disconnect
    (`Request.is_disconnected` stays False), so a non-streaming request would run on to max_tokens."""

    OPEN = ("/health", "/ping", "/health_generate", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.expected = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # (the scheme's name is case-insensitive: RFC 9110, 11.1)
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given, self.expected):
                from fastapi.responses import JSONResponse

                error = APIError(401, "Unauthorized: a valid API key is needed (Authorization: Bearer KEY)")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestBody:
    """ASGI middleware for reading request bodies: one over `limit` bytes is answered 413 before it
    is parsed, by its Content-Length or, sent in chunks, once the chunks received pass the limit,
    so no client makes the server hold more than `limit` bytes of one body; and once `closing` is
    set (the server's shutdown grace is over), a body still arriving is answered 503, so that a
    client that stalls mid-body does not hold the shutdown. Both as HTTPException from the
    route's read, which FastAPI's body reading passes on. Plain ASGI for APIKeyCheck's reason."""

    def __init__(self, app, limit: int, closing: asyncio.Event):
        self.app, self.limit, self.closing = app, limit, closing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        error = (f"the request body is over this server's limit of {self.limit} bytes "
                 "(llmirc serve --max-body-bytes)")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            from fastapi.responses import JSONResponse

            return await JSONResponse(APIError(413, error).body(), status_code=413)(scope, receive, send)
        received, whole = 0, False

        async def receive_body():
            nonlocal received, whole
            if whole:  # (later calls wait for a disconnect: passed on as they are)
                return await receive()
            message, stop = asyncio.ensure_future(receive()), asyncio.ensure_future(self.closing.wait())
            try:
                await asyncio.wait((message, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                message.cancel()  # (a no-op once it is done)
            if not message.done():
                raise HTTPException(503, "the server is shutting down")
            message = message.result()
            received += len(message.get("body", b""))
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.limit:
                raise HTTPException(413, error)
            return message

        await self.app(scope, receive_body, send)


@dataclass
class ServerOptions:
    served_model_name: str
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS: web origins whose pages may call the server ("*": any)
    max_queued_requests: int = 1024  # waiting requests beyond the running batch; then 503
    max_body_bytes: int = 64 << 20  # a larger request body is answered 413
    default_chat_template_kwargs: dict = field(default_factory=dict)  # under each request's chat_template_kwargs
    tool_call_parser: str | None = None  # tool_choice auto's (tool_calls.PARSERS); None: auto is refused
    reasoning_parser: str | None = None  # reasoning.PARSERS: a thinking model's reasoning answered apart
    # what a request that leaves temperature, top_p, top_k (or a chat request max_tokens) out gets
    # (sampling_defaults: the model's)
    sampling_defaults: dict = field(default_factory=dict)


# generation_config.json fields vLLM's --generation-config auto applies, with transformers' defaults
# (a field at its default is left out, as GenerationConfig.to_diff_dict leaves it)
GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "max_new_tokens": None,
                       "repetition_penalty": 1.0, "min_p": None}
WHOLE = ("top_k", "max_new_tokens")


def sampling_defaults(config: dict, source: str) -> dict:
    """{temperature, top_p, top_k, max_new_tokens, repetition_penalty, min_p} as the model's generation
    config sets them, as vLLM's --generation-config auto reads them (max_new_tokens: the max_tokens of
    chat requests that leave it out, capped by the context). LlmircError naming `source` for a value of
    the wrong type or range."""
    defaults = {}
    for name, default in GENERATION_DEFAULTS.items():
        value = config.get(name)
        if value is None or value == default:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value < 0 or \
                (name in ("top_p", "min_p") and not value <= 1) or (name in WHOLE and value != int(value)) or \
                (name in ("max_new_tokens", "top_p", "repetition_penalty") and not value > 0):
            raise LlmircError(f"{source}: {name} {value!r} is not a valid value")
        defaults[name] = int(value) if name in WHOLE else float(value)
    return defaults


def _finite(value: int | float) -> bool:
    """math.isfinite, False for an integer past float's range (JSON's 1000...0 of 400 digits), where
    math.isfinite raises OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def logit_bias_pairs(bias: dict[str, float] | None, vocab: int, param: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (JSON: token id strings to biases) as SamplingParams' (id, bias) pairs, each
    bias clamped to [-100, 100] as vLLM clamps it; a 400 naming `param` for a key that is not a token id
    of the model's `vocab`. Two keys of one id ("5" and "05") give it the last one's bias, as vLLM's
    {int(key): bias} dict does (not both added: past the clamp)."""
    pairs = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"{param}: {key!r} is not a token id", param) from None
        if not 0 <= token < vocab:
            raise APIError(400, f"{param}: token id {token} is outside the model's vocabulary of {vocab}", param)
        if not math.isfinite(value):
            raise APIError(400, f"{param}: the bias of token {key} is not a finite number", param)
        pairs[token] = min(100.0, max(-100.0, float(value)))
    return tuple(pairs.items())


class Server:
    """What the routes share: the model, its engine, the options, and in-flight bookkeeping."""

    def __init__(self, model: Model, options: ServerOptions):
        self.model, self.options = model, options
        self.engine = model.engine
        self.in_flight = 0  # engine requests added and not finished (event-loop thread only)
        self.named: dict[int, str] = {}  # engine request id -> the client's id (SGLang's rid) while it runs
        self.started = time.time()
        # chat templates render one at a time (template_worker's child): their queue waits on its
        # own thread, not in the pool that tokenizes every request
        self.renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-template")
        self.closing = asyncio.Event()  # set when the shutdown's grace is over: bodies still arriving get 503

    async def render_chat(self, messages: list[dict], /, **options) -> str:
        """The chat template's text of `messages` (ChatTemplate.render's errors)."""
        render = functools.partial(self.model.chat_template.render, messages, **options)
        return await asyncio.get_running_loop().run_in_executor(self.renderer, render)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a request's text (`Tokenizer.encode`), tokenized in a worker thread that
        releases the GIL, so that a long text does not hold up the other requests. APIError 400
        naming `param` for a bundle without a tokenizer, for text that is not Unicode (a lone
        surrogate), and for text with more characters than the context's tokens can stand for
        (checked first: Model.check_text_length)."""
        self.check_text(text, param)
        try:
            return await asyncio.to_thread(self.model.tokenizer.encode, text, add_special_tokens, True)
        except LlmircError as e:
            raise APIError(400, f"{param}: {e}", param) from None

    def check_text(self, text: str, param: str) -> None:
        """`encode`'s checks before tokenizing (a request with several texts checks them all first)."""
        if self.model.tokenizer is None:
            raise APIError(400, "this bundle has no tokenizer: give prompts as token ids", param)
        try:
            self.model.check_text_length(text)
        except LlmircError as e:
            raise APIError(400, f"{param}: {e}", param) from None

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens one sequence can have: the context, or the KV cache when it is smaller."""
        return min(self.model.max_context, self.model.num_blocks * self.model.block_size)

    def check_length(self, prompt_len: int, max_tokens: int, what: str = "messages",
                     param: str = "max_tokens") -> None:
        """vLLM's error for a request over the context (named limit, prompt and completion), and
        the like for one over the KV cache, where that holds fewer tokens (--kv-cache-tokens)."""
        context, limit = self.model.max_context, self.max_sequence_tokens
        asked = f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the " \
                f"completion). Please reduce the length of the {what} or completion."
        if prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, {asked}", param)
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"This server's KV cache holds {limit} tokens (--kv-cache-tokens). However, {asked}",
                           param)

    def check_prompt_ids(self, prompt: list[int], param: str) -> None:
        """400 naming `param` for a token id outside the model's vocabulary (the logits' width)."""
        vocab = self.model.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the model's vocabulary of {vocab}", param)

    def check_sequences(self, count: int) -> None:
        """400 for a request of `count` sequences (prompts times n), more than the server takes at
        once: it would never fit, not a reason to retry (checked before any text is tokenized)."""
        limit = self.model.scheduler.max_num_seqs + self.options.max_queued_requests
        if count > limit:
            raise APIError(400, f"the request asks for {count} sequences (prompts times n); this server "
                                f"takes at most {limit} at once (running + --max-queued-requests)")

    async def guides(self, requests: list[tuple[list[int], SamplingParams]],
                     fields: dict[str, str] | None = None) -> list | None:
        """The structured-output matchers of the requests (Engine.make_guide), made in a worker thread so
        that a large schema's does not pause the event loop; None when no request has one. A 400 for a
        grammar that does not load or matches no text, naming the field `fields` (`refused`) gives it."""
        if all(params.guided is None for _, params in requests):
            return None
        try:
            return await asyncio.to_thread(lambda: [self.engine.make_guide(params) for _, params in requests])
        except LlmircError as e:
            raise refused(e, fields) from None

    def admit(self, requests: list[tuple[list[int], SamplingParams]], names: list[str] | None = None,
              guides: list | None = None, fields: dict[str, str] | None = None) -> Admitted:
        """Add engine requests, all or none; returns them running (call from the event loop).
        `names`: the client's id of each (SGLang's rid), kept in `named` while it runs (`abort_named`);
        `guides`: their structured-output matchers made beforehand (`guides`); `fields`: the request's
        names of the engine's fields, for the 400s it gives (`refused`).

        Raises APIError 503 when overloaded, the engine has failed or the shutdown's grace is over, 400
        for a request that could never fit, that the engine refuses, or with the name of one in flight."""
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped after an error: {self.engine.error}")
        if self.closing.is_set():  # (the shutdown aborted what ran: one admitted now would hold up the exit)
            raise APIError(503, "the server is shutting down")
        # (SGLang's TokenizerManager._validate_rid_not_in_flight: one abort ended both. Checked here, where the
        # names are taken with no await in between: two requests racing with one rid cannot both pass.)
        if names is not None and (taken := sorted(set(names) & set(self.named.values()))):
            raise APIError(400, f"Duplicate request IDs detected: {taken} (a request with this rid is still "
                                "running)", "rid")
        self.check_sequences(len(requests))
        limit = self.model.scheduler.max_num_seqs + self.options.max_queued_requests
        if self.in_flight + len(requests) > limit:
            raise APIError(503, f"server overloaded: {self.in_flight} requests in flight, at most {limit} "
                                "(running + --max-queued-requests); retry later")
        for prompt, params in requests:  # all or nothing: check every request before adding any
            try:
                self.engine.check(prompt, params)
            except LlmircError as e:
                raise refused(e, fields) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        index: dict[int, int] = {}
        for i, (prompt, params) in enumerate(requests):
            try:
                rid = self.engine.add_request(prompt, params,
                                              lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                                              guides[i] if guides else None)
            except LlmircError as e:
                for running in index:
                    self.engine.abort(running)
                    self.named.pop(running, None)
                if self.engine.error:
                    raise APIError(503, _without_request_id(str(e))) from None
                raise refused(e, fields) from None
            index[rid] = i
            if names is not None:
                self.named[rid] = names[i]
            self.in_flight += 1
        return Admitted(self, index, queue)

    def abort_named(self, name: str) -> int:
        """SGLang's abort of a request by its rid (TokenizerManager.abort_request, then the
        scheduler's): nothing unless `name` is the id of a running request; then that request and
        every other whose id starts with `name`. Returns how many (aborted at the engine's next step)."""
        if name not in self.named.values():
            return 0
        chosen = [rid for rid, given in self.named.items() if given.startswith(name)]
        for rid in chosen:
            self.engine.abort(rid)
        return len(chosen)

    async def generate(self, requests: list[tuple[list[int], SamplingParams]], raw_request=None,
                       names: list[str] | None = None,
                       fields: dict[str, str] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`admit` the requests (its errors; their matchers made first, `guides`) and yield their
        `Admitted.outputs`; leaving the iteration early aborts what is still running."""
        admitted = self.admit(requests, names, await self.guides(requests, fields), fields)
        try:
            async for item in admitted.outputs(raw_request):
                yield item
        finally:
            admitted.close()


class Admitted:
    """Engine requests that `Server.admit` added, until they finish or are aborted."""

    def __init__(self, server: Server, index: dict[int, int], queue: asyncio.Queue):
        self.server, self.index, self.queue = server, index, queue
        self.remaining = set(index)

    async def outputs(self, raw_request=None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yields (index in the admitted list, output) as outputs arrive, until all finish. Raises
        APIError 503 when generation fails (the engine's error); a disconnect of `raw_request` (a
        Starlette Request) ends it. However it ends, what still runs is aborted (`close`)."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while self.remaining:
                # Whether tokens flow or not, look for a disconnect every DISCONNECT_POLL_S (the
                # server does not fail writes to a closed connection: it drops them).
                if raw_request is not None and loop.time() >= next_check:
                    if await raw_request.is_disconnected():
                        log.info("client disconnected: aborting %d request(s)", len(self.remaining))
                        return
                    next_check = loop.time() + DISCONNECT_POLL_S
                try:
                    out = await asyncio.wait_for(self.queue.get(), max(next_check - loop.time(), 0.001)) \
                        if raw_request is not None else await self.queue.get()
                except asyncio.TimeoutError:
                    continue
                if out.finished:
                    self.remaining.discard(out.request_id)
                    self.server.named.pop(out.request_id, None)
                    self.server.in_flight -= 1
                if out.error:
                    raise APIError(503, f"generation failed: {out.error}")
                yield self.index[out.request_id], out
        finally:
            self.close()

    def close(self) -> None:
        """Abort the requests still running (their KV blocks freed at the engine's next step); idempotent."""
        for rid in self.remaining:
            self.server.engine.abort(rid)
            self.server.named.pop(rid, None)
        self.server.in_flight -= len(self.remaining)
        self.remaining.clear()


class Generation:
    """One engine request's outputs so far: text, token ids, logprobs and how it finished."""

    def __init__(self):
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.cached_tokens = 0
        self.done = False

    def update(self, out: RequestOutput) -> str:
        """Apply one engine output; returns its new text."""
        self.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.token is not None:
            self.tokens.append(out.token)
            if out.logprob is not None:
                self.logprobs.append(out.logprob)
        self.text += out.text
        if out.finished:
            self.done = True
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
        return out.text


def json_text(data) -> str:
    """`data` as JSON text that encodes to UTF-8: non-ASCII as it is, but a lone surrogate that a
    client sent (JSON's "\\ud800", in an SGLang rid) escaped, as `ensure_ascii` writes it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, separators=(",", ":"))
    return text


def sse(data) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json_text(data)}\n\n"


async def event_stream(server: Server, requests: list[tuple[list[int], SamplingParams]], raw_request, bodies,
                       final=None, names: list[str] | None = None, fields: dict[str, str] | None = None):
    """A streaming response: `bodies(outputs)` turns the engine outputs ((index, output) pairs)
    into event bodies, then `final()` (when given) adds one, and `data: [DONE]` ends it. The
    requests are admitted here, so that refusals keep their status (400, 503); then the response
    (status 200 and headers) starts at once, not after the prefill, and an error after that (the
    engine failed) is an event with an error body, as vLLM sends it. However the response ends (a
    disconnect, even before its first byte), what still runs is aborted. `names`, `fields`: as
    `Server.admit`'s."""
    from fastapi.responses import StreamingResponse

    admitted = server.admit(requests, names, await server.guides(requests, fields), fields)

    async def events():
        try:
            async for body in bodies(admitted.outputs(raw_request)):
                yield sse(body)
            if final is not None:
                yield sse(final())
        except APIError as e:
            yield sse(e.body())
        finally:
            admitted.close()
        yield "data: [DONE]\n\n"

    class Stream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:  # (the body's own finally never runs when it never started)
                admitted.close()

    return Stream(events(), media_type="text/event-stream")


def _without_request_id(message: str) -> str:
    # Engine messages name the internal request id ("request 7: ..."): meaningless to a client.
    return message.split(": ", 1)[1] if message.startswith("request ") and ": " in message else message


def refused(e: LlmircError, fields: dict[str, str] | None = None) -> APIError:
    """The 400 of a request the engine refuses: for a RequestError, its param the request's name of the engine's
    field (`fields`: e.g. guided -> the structured output's field, as the API layer knows it; a field left out is
    the engine's own name), and the message starting with it."""
    message = _without_request_id(str(e))
    field = getattr(e, "field", None)
    param = (fields or {}).get(field, field)
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return APIError(400, message, param)


def create_app(model: Model, options: ServerOptions):
    """The FastAPI application serving `model` (its engine starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    from . import openai_api, responses_api, sglang_api

    server = Server(model, options)
    if model.chat_template is not None:  # its errors reach clients: named so, not by the server's file path
        model.chat_template.name = "chat template"

    @asynccontextmanager
    async def lifespan(app):
        # One token through the model before the first request: the weights are paged in and
        # the kernels' threads started now, not in the first client's time to first token.
        model.score([0])
        model.engine.start()
        try:
            yield
        finally:
            server.renderer.shutdown(wait=False, cancel_futures=True)
            template_worker.stop()  # (a rendering under way fails at once)
            model.engine.stop()

    class JSON(JSONResponse):
        def render(self, content) -> bytes:
            return json_text(content).encode("utf-8")

    app = FastAPI(title="llmirc", lifespan=lifespan, docs_url=None, redoc_url=None, default_response_class=JSON)
    app.state.server = server

    app.add_middleware(RequestBody, limit=options.max_body_bytes, closing=server.closing)
    if options.api_key:
        app.add_middleware(APIKeyCheck, key=options.api_key)
    if options.allowed_origins:  # added last, so outermost: a browser's preflight needs no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(APIError(400, _validation_message(e), _validation_param(e)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = str(e.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for bytes that are not UTF-8 JSON
            message = "the request body is not valid JSON (or not UTF-8, or nested too deeply)"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(RuntimeLimitError)
    async def limit_error(request, e: RuntimeLimitError):
        return JSONResponse(APIError(400, _without_request_id(str(e))).body(), status_code=400)

    @app.api_route("/health", methods=["GET", "HEAD"])
    @app.api_route("/ping", methods=["GET", "HEAD", "POST"])  # (vLLM's, for SageMaker)
    async def health():
        if model.engine.error is not None:
            return JSONResponse(APIError(503, f"engine failed: {model.engine.error}").body(), status_code=503)
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(server), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/version", methods=["GET", "HEAD"])
    async def version():
        return {"version": __version__}

    card = {"id": options.served_model_name, "object": "model", "created": int(server.started),
            "owned_by": "llmirc", "root": str(model.bundle.root), "parent": None, "max_model_len": model.max_context}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        server.check_model(name)
        return card

    openai_api.add_routes(app, server)
    responses_api.add_routes(app, server)
    sglang_api.add_routes(app, server)
    return app


def _validation_message(e) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif not loc and err.get("type") == "missing":  # (FastAPI's "body: Field required")
            parts.append("the request body is empty: a JSON object is expected")
        elif not loc and err.get("type") in ("dict_type", "model_attributes_type"):
            parts.append("the request body must be a JSON object (with Content-Type: application/json)")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _validation_param(e) -> str | None:
    """The request field the first error names (None for a body that is not JSON, whose location
    is a character offset)."""
    errors = e.errors()
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
    return loc[0] if loc else None


def prometheus_text(server: Server) -> str:
    """The metrics in Prometheus' text format, named as vLLM names them (prefix llmirc:)."""
    model, stats = server.model, server.engine.stats
    sched, label = model.scheduler, f'model_name="{server.options.served_model_name}"'
    cache = sched.prefix_cache
    allocator = sched.allocator
    used = allocator.num_blocks - allocator.num_available
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP llmirc:{name} {help_text}", f"# TYPE llmirc:{name} {kind}"])
        for extra, value in samples:
            labels = label + (f",{extra}" if extra else "")
            lines.append(f"llmirc:{name}{{{labels}}} {value}")

    metric("num_requests_running", "gauge", "Requests in the running batch.", [("", len(sched.running))])
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", [("", len(sched.waiting))])
    metric("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).",
           [("", used / allocator.num_blocks)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of the requests received.", [("", stats.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats.generation_tokens)])
    metric("computed_tokens_total", "counter", "Tokens run through the model (prefill, recompute and decode; "
           "prompt tokens found in the prefix cache are not).", [("", stats.computed_tokens)])
    metric("request_success_total", "counter", "Requests finished, by reason.",
           [(f'finished_reason="{k}"', v) for k, v in stats.finished.items()])
    metric("num_preemptions_total", "counter", "Running requests preempted (to be recomputed).",
           [("", sched.num_preemptions)])
    queried, hits = (cache.queried_tokens, cache.hit_tokens) if cache else (0, 0)
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", [("", queried)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", [("", hits)])
    metric("prefix_cache_hit_rate", "gauge", "prefix_cache_hits_total / prefix_cache_queries_total.",
           [("", hits / queried if queried else 0.0)])
    for name, hist, help_text in (("time_to_first_token_seconds", stats.ttft, "Time to first token."),
                                  ("e2e_request_latency_seconds", stats.e2e, "Arrival to finish of a request.")):
        lines.extend([f"# HELP llmirc:{name} {help_text}", f"# TYPE llmirc:{name} histogram"])
        for bound, count in zip(hist.bounds, hist.counts):
            lines.append(f'llmirc:{name}_bucket{{{label},le="{bound}"}} {count}')
        lines.append(f'llmirc:{name}_bucket{{{label},le="+Inf"}} {hist.count}')
        lines.append(f"llmirc:{name}_sum{{{label}}} {hist.sum}")
        lines.append(f"llmirc:{name}_count{{{label}}} {hist.count}")
    return "\n".join(lines) + "\n"
