"""SGLang's native API: POST (or PUT) /generate, GET /get_model_info, GET /get_server_info (and their
newer names /model_info, /server_info), POST /abort_request, GET /health_generate and GET or POST
/flush_cache, as SGLang defines them (`GenerateReqInput` in sglang/srt/managers/io_struct.py,
http_server.py, the native API docs).

/generate takes `text` or `input_ids` (one prompt, or a list: a batch answered by a list),
`sampling_params` (max_new_tokens 128, temperature 1, top_p 1, top_k -1, but the model's
generation_config.json values for those it sets, as SGLang's --sampling-defaults model; stop, stop_token_ids,
ignore_eos, skip_special_tokens, no_stop_trim, sampling_seed; null for the default; one dict or
one per prompt), `return_logprob`,
`logprob_start_len` (-1: output tokens only), `top_logprobs_num`, `return_text_in_logprobs`
and `stream`. It answers `{"text", "output_ids", "meta_info": {"id", "finish_reason",
"prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", and with return_logprob
"input_token_logprobs", "output_token_logprobs", and with top_logprobs_num > 0 "input_top_logprobs",
"output_top_logprobs"}}`, logprobs as [logprob, token_id, text or null]. As SGLang's scheduler lists
them, input_token_logprobs are prompt[logprob_start_len:] (-1: the last prompt token alone), the
first with a null logprob and top list (SGLang's select relies on it), the others scored given the
tokens before them. A `rid` (one, or one per prompt; a batch's one rid r names its prompts r_0, r_1, ...)
must not be that of a request still in flight, nor repeat within the request: a 400, as SGLang refuses it
("Duplicate request IDs detected"; /abort_request names requests by it).
finish_reason is {"type": "length", "length": n}, {"type": "stop", "matched": id or string}
or {"type": "abort", ...}. A stream sends the cumulative text and output_ids in each
`data:` event, then `data: [DONE]`, as SGLang does by default. GenerateReqInput's fields for
what llmirc does not do (images, audio, video, embeddings, LoRA, sessions, custom logit
processors, hidden states) are refused unless null or neutral; unknown fields are ignored.

`max_new_tokens` 0 computes the prompt only (it enters the prefix cache; SGLang frontend
programs use this for `select` and to cache shared prefixes). As in SGLang, a max_new_tokens
given that would pass the context is a 400, and otherwise it is clipped to what one sequence can
hold (the context, or the KV cache when smaller; null: no limit but that), the finish_reason's
length saying how many. Sampling parameters llmirc does
not implement (n > 1, skip_special_tokens false) are refused; json_schema, regex, ebnf and
structural_tag hold the text to a JSON schema, a regular expression, a grammar or structural tags
(structured.py, llguidance);
stream_interval and custom_params (which only a custom logit processor reads) are taken and change
nothing. min_p, frequency_penalty and presence_penalty (the output's tokens only), logit_bias and
repetition_penalty are applied with their ranges in SGLang's SamplingParams.verify
(repetition_penalty in (0, 2]: 0, which SGLang takes, would divide by zero); repetition_penalty over
the prompt and the output as vLLM and transformers apply it (SGLang 0.4.10 checks it but its
penalizers no longer apply it). min_new_tokens keeps the stop token ids and the end-of-sequence ids
from being sampled until that many tokens are out, as SGLang's penalizer does, and (vLLM's
min_tokens, which the engine implements) stop strings from being looked for.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from llmirc.errors import LlmircError
from llmirc.runtime import structured
from llmirc.runtime.engine import MAX_LOGPROBS, SamplingParams

from .app import APIError, Generation, Int, Server, event_stream, logit_bias_pairs, refuse_not_implemented


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # (NOT_IMPLEMENTED's are refused, others ignored)
    text: str | list[str] | None = None
    input_ids: list[Int] | list[list[Int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    # (null: the default, as SGLang's GenerateReqInput.normalize_batch_and_arguments reads it)
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: Int | list[Int] | None = None
    top_logprobs_num: Int | list[Int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None


class _Params(BaseModel):
    """SGLang's SamplingParams fields llmirc reads (others: refused when not neutral)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_new_tokens: Int | None = 128  # None (null): no limit but what one sequence holds
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int = -1
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: Int | None = None
    n: Int = 1
    min_new_tokens: Int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None  # (read by custom_logit_processor alone, which is refused)
    stream_interval: Int | None = None  # (how often a stream sends: llmirc sends every step's tokens)


# GenerateReqInput's fields that would change the answer, refused unless `_neutral`
NOT_IMPLEMENTED = {name: () for name in ("image_data", "audio_data", "video_data", "input_embeds", "lora_path",
                                         "lora_id", "session_params", "custom_logit_processor", "token_ids_logprob",
                                         "return_hidden_states", "modalities")}


def _neutral(value) -> bool:
    """None, false or empty, or a batch's list of such (one per prompt, as SGLang's clients send)."""
    return value is None or value is False or value == [] or value == {} or \
        (isinstance(value, list) and all(map(_neutral, value)))

NEUTRAL = {"skip_special_tokens": True, "n": 1}
# the engine's fields its 400s name, as this API names them (Server.admit's `fields`): a structured output is one of
# sampling_params' json_schema / regex / ebnf / structural_tag
FIELDS = {"guided": "sampling_params"}


def _params(raw: dict | None) -> _Params:
    from pydantic import ValidationError

    # as SGLang's SamplingParams.__post_init__: null is the default (max_new_tokens: no limit)
    raw = {k: v for k, v in (raw or {}).items() if v is not None or k == "max_new_tokens"}
    if raw.get("logit_bias") == {}:  # (no bias)
        del raw["logit_bias"]
    try:
        p = _Params.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"sampling_params.{where}: {err['msg']}", "sampling_params") from None
    for name, value in NEUTRAL.items():
        if getattr(p, name) != value:
            raise APIError(400, f"sampling_params.{name} is not supported by llmirc (only {value!r})",
                           "sampling_params")
    if p.max_new_tokens is not None and p.max_new_tokens < 0:
        raise APIError(400, f"sampling_params.max_new_tokens must be at least 0, got {p.max_new_tokens}",
                       "sampling_params")
    if not p.temperature >= 0 or not 0 < p.top_p <= 1 or p.top_k < -1 or p.top_k == 0:  # (NaN too)
        raise APIError(400, "sampling_params: temperature must be >= 0, top_p in (0, 1], top_k -1 or >= 1",
                       "sampling_params")
    if not 0 <= p.min_p <= 1 or not 0 < p.repetition_penalty <= 2 or \
            not -2 <= p.frequency_penalty <= 2 or not -2 <= p.presence_penalty <= 2:  # (SGLang's ranges)
        raise APIError(400, "sampling_params: min_p must be in [0, 1], repetition_penalty in (0, 2], "
                            "frequency_penalty and presence_penalty in [-2, 2]", "sampling_params")
    if not 0 <= p.min_new_tokens <= (math.inf if p.max_new_tokens is None else p.max_new_tokens):  # (SGLang's)
        raise APIError(400, f"sampling_params.min_new_tokens must be in [0, max_new_tokens], got {p.min_new_tokens}",
                       "sampling_params")
    return p


def _guided(p: _Params) -> str | None:
    """The llguidance grammar of json_schema, regex, ebnf or structural_tag (SGLang refuses more than one);
    a 400 when not valid."""
    given = [(name, kind, spec) for name, kind, spec in (
        ("json_schema", "json", p.json_schema), ("regex", "regex", p.regex), ("ebnf", "grammar", p.ebnf),
        ("structural_tag", "structural_tag", p.structural_tag)) if spec is not None]
    if len(given) > 1:
        raise APIError(400, f"sampling_params: only one of {', '.join(n for n, _, _ in given)} may be given",
                       "sampling_params")
    if not given:
        return None
    (name, kind, spec), = given
    try:
        return structured.grammar(kind, spec)
    except LlmircError as e:
        raise APIError(400, f"sampling_params.{name}: {e}", "sampling_params") from None


def _check_stops(server: Server, p: _Params) -> None:
    """The engine's checks of stop strings and stop token ids, as 400s naming sampling_params."""
    if p.stop == "" or (isinstance(p.stop, list) and "" in p.stop):
        raise APIError(400, "sampling_params.stop cannot contain an empty string", "sampling_params")
    vocab = server.model.vocab_size
    bad = [t for t in p.stop_token_ids or () if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"sampling_params.stop_token_ids: token id {bad[0]} is outside the model's vocabulary "
                            f"of {vocab}", "sampling_params")


def _max_new_tokens(server: Server, prompt: list[int], p: _Params, prompt_param: str) -> int:
    """The tokens one prompt may generate, as SGLang decides: a max_new_tokens given that would
    pass the context is a 400 (its tokenizer manager's check); otherwise max_new_tokens (128 when
    not given, no limit when null) is clipped to what one sequence holds, the context or the KV
    cache when smaller (its scheduler clips to max_req_len). A prompt longer than the context, or
    that leaves no room for one token (none for max_new_tokens 0), is a 400 naming `prompt_param`
    (the prompt is checked first, as SGLang's _validate_one_request does)."""
    asked = p.max_new_tokens
    if len(prompt) > server.model.max_context:
        server.check_length(len(prompt), 0, "input", prompt_param)
    if asked is not None and "max_new_tokens" in p.model_fields_set and \
            len(prompt) + asked > server.model.max_context:
        server.check_length(len(prompt), asked, "input", "sampling_params")
    room, need = server.max_sequence_tokens - len(prompt), 0 if asked == 0 else 1
    if room < need:
        server.check_length(len(prompt), need, "input", prompt_param)
    return room if asked is None else min(asked, room)


def _per_item(value, count: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise APIError(400, f"{name} has {len(value)} entries for {count} prompts", name)
        return value
    return [value] * count


def _logprob_triples(server: Server, entries, with_text: bool) -> tuple[list, list]:
    tok = server.model.tokenizer
    text = (lambda t: tok.token_text(t)) if with_text and tok is not None else (lambda t: None)
    tokens, tops = [], []
    for e in entries:
        if isinstance(e, int):  # the first prompt token scored (SGLang's: no logprob, no top)
            tokens.append([None, e, text(e)])
            tops.append(None)
            continue
        tokens.append([e.logprob, e.token, text(e.token)])
        tops.append([[lp, t, text(t)] for t, lp in e.top] or None)
    return tokens, tops


class _Item(Generation):
    """One prompt of a /generate call, while it runs."""

    def __init__(self, prompt: list[int], max_new_tokens: int, rid: str, logprob: bool, logprob_start: int,
                 top: int):
        super().__init__()
        self.prompt, self.max_new_tokens, self.rid, self.logprob = prompt, max_new_tokens, rid, logprob
        self.logprob_start, self.top = logprob_start, top  # (the first prompt position listed; -1 taken as SGLang)
        self.arrival = time.perf_counter()

    def sglang_finish_reason(self) -> dict | None:
        if not self.done:
            return None
        if self.finish_reason == "stop":  # a stop string or token id, else the end-of-sequence token
            return {"type": "stop", "matched": self.stop_reason if self.stop_reason is not None else
                    (self.tokens[-1] if self.tokens else None)}
        if self.finish_reason == "length":
            return {"type": "length", "length": self.max_new_tokens}  # (as clipped, as SGLang reports it)
        return {"type": "abort", "message": self.error or "aborted"}

    def response(self, server: Server, with_text: bool) -> dict:
        meta = {"id": self.rid, "finish_reason": self.sglang_finish_reason(),
                "prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "cached_tokens": self.cached_tokens, "e2e_latency": time.perf_counter() - self.arrival}
        if self.logprob:
            # as SGLang's scheduler: prompt[start:], the first with no logprob (it pads with None),
            # the others scored by the engine (from start + 1); -1 (the default) is the last prompt token
            start = self.logprob_start if self.logprob_start >= 0 else len(self.prompt) - 1
            inputs, input_tops = _logprob_triples(server, [self.prompt[start], *(self.prompt_logprobs or ())],
                                                  with_text)
            outputs, output_tops = _logprob_triples(server, self.logprobs, with_text)
            meta["input_token_logprobs"], meta["output_token_logprobs"] = inputs, outputs
            if self.top > 0:  # (SGLang leaves the top lists out without top_logprobs_num)
                meta["input_top_logprobs"], meta["output_top_logprobs"] = input_tops, output_tops
        return {"text": self.text, "output_ids": list(self.tokens), "meta_info": meta}


async def generate(server: Server, req: GenerateRequest, raw_request):
    refuse_not_implemented({k: v for k, v in (req.model_extra or {}).items() if not _neutral(v)}, NOT_IMPLEMENTED)
    if (req.text is None) == (req.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", "text")
    batched = isinstance(req.text, list) or (req.input_ids is not None and bool(req.input_ids)
                                             and isinstance(req.input_ids[0], list))
    if req.text is not None:
        texts = req.text if batched else [req.text]
        server.check_sequences(len(texts))  # (before tokenizing thousands of texts for nothing)
        for t in texts:  # every text checked before any is tokenized
            server.check_text(t, "text")
        prompts = [await server.encode(t, "text") for t in texts]
    else:
        prompts = [list(p) for p in (req.input_ids if batched else [req.input_ids])]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "empty prompt", "text" if req.text is not None else "input_ids")
    n = len(prompts)
    params = [_params(p) for p in _per_item(req.sampling_params, n, "sampling_params")]
    grammars = {}  # (each distinct structured output's grammar once, off the event loop)
    for p in params:
        if (key := (p.json_schema, p.regex, p.ebnf, p.structural_tag)) not in grammars:
            grammars[key] = await asyncio.to_thread(_guided, p)
    logprob = _per_item(False if req.return_logprob is None else req.return_logprob, n, "return_logprob")
    starts = _per_item(-1 if req.logprob_start_len is None else req.logprob_start_len, n, "logprob_start_len")
    tops = _per_item(0 if req.top_logprobs_num is None else req.top_logprobs_num, n, "top_logprobs_num")
    rids = _per_item(req.rid, n, "rid") if isinstance(req.rid, list) else \
        [f"{req.rid}_{i}" if batched and req.rid else req.rid or uuid.uuid4().hex for i in range(n)]
    if len(set(rids)) < n:  # (SGLang's GenerateReqInput._validate_rid_uniqueness; in flight: Server.admit)
        duplicates = [rid for rid in dict.fromkeys(rids) if rids.count(rid) > 1]
        raise APIError(400, f"Duplicate request IDs detected within the request: {duplicates}", "rid")
    requests, items = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if not 0 <= tops[i] <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs_num must be between 0 and {MAX_LOGPROBS}", "top_logprobs_num")
        if not -1 <= starts[i] < len(prompt):
            raise APIError(400, f"logprob_start_len must be -1 or a prompt position (0 to {len(prompt) - 1}), got "
                                f"{starts[i]}", "logprob_start_len")
        prompt_param = "text" if req.text is not None else "input_ids"
        _check_stops(server, p)
        max_new_tokens = _max_new_tokens(server, prompt, p, prompt_param)
        server.check_prompt_ids(prompt, prompt_param)
        # the prompt tokens scored: SGLang's logprob_start_len + 1 on (-1: the last prompt token, so none)
        scored_from = (starts[i] if starts[i] >= 0 else len(prompt) - 1) + 1
        want_prompt = logprob[i] and scored_from < len(prompt)
        # fields the request leaves out: the model's generation config first (SGLang's --sampling-defaults model)
        temperature, top_k, top_p, min_p, repetition_penalty = (
            getattr(p, k) if k in p.model_fields_set else server.options.sampling_defaults.get(k, getattr(p, k))
            for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"))
        requests.append((prompt, SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_k=top_k if top_k > 0 else None,
            top_p=top_p if top_p < 1 else None,
            seed=None if p.sampling_seed is None else p.sampling_seed % 2**64,
            stop_token_ids=tuple(p.stop_token_ids or ()),
            ignore_eos=p.ignore_eos, logprobs=tops[i] if logprob[i] else None,
            prompt_logprobs=tops[i] if want_prompt else None, prompt_logprobs_start=scored_from,
            stop=tuple([p.stop] if isinstance(p.stop, str) else p.stop or ()),
            include_stop_str_in_output=p.no_stop_trim, min_p=min_p, repetition_penalty=repetition_penalty,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            logit_bias=logit_bias_pairs(p.logit_bias, server.model.vocab_size,
                                        "sampling_params.logit_bias"),
            min_tokens=min(p.min_new_tokens, max_new_tokens),  # (max_new_tokens as clipped to the context)
            guided=grammars[p.json_schema, p.regex, p.ebnf, p.structural_tag])))
        items.append(_Item(prompt, max_new_tokens, rids[i], logprob[i], starts[i], tops[i]))
    with_text = req.return_text_in_logprobs

    if req.stream:
        async def bodies(outputs):
            async for i, out in outputs:
                items[i].update(out)
                yield _indexed(items[i].response(server, with_text), i, batched)

        return await event_stream(server, requests, raw_request, bodies, names=rids, fields=FIELDS)

    async for i, out in server.generate(requests, raw_request, names=rids, fields=FIELDS):
        items[i].update(out)
    results = [item.response(server, with_text) for item in items]
    return results if batched else results[0]


def _indexed(response: dict, index: int, batched: bool) -> dict:
    if batched:
        response["index"] = index  # SGLang tags batch items in a stream with their index
    return response


class AbortRequest(BaseModel):
    """SGLang's AbortReq (finished_reason: taken, and unused, as its HTTP route does)."""

    model_config = ConfigDict(strict=True)
    rid: str = ""
    abort_all: bool = False
    finished_reason: dict[str, Any] | None = None


def server_info(server: Server) -> dict:
    """SGLang's /get_server_info for llmirc: the ServerArgs fields llmirc has, under SGLang's names
    (with llmirc's values: kv_cache_dtype is the bundle's, device its executor's), the scheduler's
    info, one internal state and the version (llmirc's). The API key is not echoed (SGLang's is)."""
    from llmirc import __version__

    model, sched = server.model, server.model.scheduler
    capacity = model.num_blocks * model.block_size
    return {"model_path": str(model.bundle.root),
            "tokenizer_path": str(model.tokenizer.folder) if model.tokenizer is not None else None,
            "skip_tokenizer_init": model.tokenizer is None, "is_embedding": False,
            "served_model_name": server.options.served_model_name, "context_length": model.max_context,
            "kv_cache_dtype": (model.bundle.manifest.get("kv_cache") or {}).get("dtype", "float32"),
            "device": model.executor.kind, "page_size": model.block_size, "max_total_tokens": capacity,
            "max_running_requests": sched.max_num_seqs, "max_queued_requests": server.options.max_queued_requests,
            "chunked_prefill_size": sched.max_num_batched_tokens, "disable_radix_cache": sched.prefix_cache is None,
            "tp_size": 1, "dp_size": 1, "pp_size": 1,
            # the scheduler's info (SGLang's scheduler_info): a prompt must leave room for one token
            "status": "ready", "max_total_num_tokens": capacity, "max_req_input_len": server.max_sequence_tokens - 1,
            "internal_states": [{"memory_usage": {"token_capacity": capacity}}], "version": __version__}


HEALTH_GENERATE_TIMEOUT_S = 20  # (SGLang's SGLANG_HEALTH_CHECK_TIMEOUT)


def add_routes(app, server: Server) -> None:
    from fastapi.responses import PlainTextResponse, Response

    @app.api_route("/generate", methods=["POST", "PUT"])  # (SGLang takes both)
    async def _generate(req: GenerateRequest, raw_request: Request):
        return await generate(server, req, raw_request)

    @app.post("/abort_request")
    async def _abort_request(req: AbortRequest):
        """SGLang's: abort the running /generate request whose rid is `rid` (and, as SGLang's scheduler
        does, the others whose rid starts with it), or with abort_all every request of the server
        (either API's); an unknown rid aborts nothing. 200 with no body, as SGLang answers. The
        requests end at the engine's next step, with finish_reason {"type": "abort"}."""
        if req.abort_all:
            server.engine.abort_all()
        else:
            server.abort_named(req.rid)
        return Response(status_code=200)

    @app.get("/get_server_info")
    @app.get("/server_info")  # (newer SGLang's name, as /model_info)
    async def _get_server_info():
        return server_info(server)

    @app.get("/health_generate")
    async def _health_generate():
        """SGLang's deep health check: 200 once the engine's loop has taken a command between two
        steps (it is not stuck in a step), 503 after an engine error or 20 s without an answer."""
        engine = server.engine
        if engine.error is None:
            try:
                await asyncio.wait_for(asyncio.to_thread(engine.call, lambda: None), HEALTH_GENERATE_TIMEOUT_S)
            except (asyncio.TimeoutError, LlmircError):
                pass
            else:
                if engine.error is None:
                    return PlainTextResponse("")
        raise APIError(503, f"engine failed: {engine.error}" if engine.error is not None else
                       f"the engine did not answer within {HEALTH_GENERATE_TIMEOUT_S} s")

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def _flush_cache():
        """SGLang's: empty the prefix cache (its KV blocks back to the free list), only while no
        request runs or waits (else 400, nothing flushed)."""
        def flush() -> bool:
            if server.engine.num_requests:
                return False
            cache = server.model.scheduler.prefix_cache
            if cache is not None:
                cache.evict(cache.num_cached)
            return True

        try:
            flushed = await asyncio.to_thread(server.engine.call, flush)
        except LlmircError as e:
            raise APIError(503, str(e)) from None
        if not flushed:
            return PlainTextResponse("Cache not flushed: requests are running or waiting.\n", status_code=400)
        return PlainTextResponse("Cache flushed.\n")

    model_type, architectures = _hf_model_type(server.model)

    @app.get("/get_model_info")
    @app.get("/model_info")  # (newer SGLang's name; /get_model_info is its deprecated alias)
    async def _model_info():
        model = server.model
        return {"model_path": server.options.served_model_name,
                "tokenizer_path": str(model.tokenizer.folder) if model.tokenizer is not None else None,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
                "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": model_type, "architectures": architectures}


def _hf_model_type(model) -> tuple[str | None, list[str]]:
    """SGLang's model_type and architectures: the checkpoint's config.json values ("llama",
    ["LlamaForCausalLM"]) as the bundle keeps that file; without it (or without model_type there),
    None and the architecture llmirc compiled."""
    from llmirc.small_files import parse_json, read_small_text

    config = {}
    if "config.json" in model.bundle.files:
        try:
            config = parse_json(read_small_text(model.bundle.file("config.json"), LlmircError))
        except (ValueError, LlmircError):
            pass
    config = config if isinstance(config, dict) else {}
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        architectures = [model.config.get("architecture")]
    return model_type if isinstance(model_type, str) else None, architectures
