"""OpenAI-compatible routes, with vLLM's request fields and response shapes.

POST /v1/completions and /v1/chat/completions take OpenAI's parameters (model, prompt or messages,
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, n, logprobs / top_logprobs,
echo, stream, stream_options.include_usage, presence_penalty, frequency_penalty, logit_bias; chat's
tools and tool_choice: tool_calls.py) and vLLM's extensions (top_k, min_p, repetition_penalty,
min_tokens, allowed_token_ids, bad_words, stop_token_ids, ignore_eos, include_stop_str_in_output,
skip_special_tokens, add_generation_prompt, continue_final_message, chat_template_kwargs, documents,
return_token_ids) and structured outputs (response_format json_object / json_schema / structural_tag,
structured_outputs, guided_json / guided_regex / guided_choice / guided_grammar / structural_tag:
`_guided`), and SGLang's names for some (regex, ebnf, json_schema, no_stop_trim). Parameters that
would change the output and that llmirc does not implement (`NOT_IMPLEMENTED`: beam search,
prompt_embeds, LoRA, priority scheduling; best_of != n, suffix,
skip_special_tokens false, non-text content) are refused with a 400 naming them, never silently
ignored, as are an empty stop string, stop token ids outside the vocabulary (vLLM's SamplingParams
checks) and stream_options without stream;
unknown fields are ignored, as vLLM does, with its warning naming them in the log (a misspelt
parameter shows there). Integer fields take an integral number written as a float (5.0), as
vLLM's models do, not a fraction, a string or a boolean. max_tokens (or max_completion_tokens)
must be at least 1, as vLLM's SamplingParams say, except completions' max_tokens 0 with echo
(the prompt alone); seed -1 is no seed. POST /tokenize and /detokenize are vLLM's (a prompt or
chat messages to token ids, token ids to text, special tokens included).

Defaults follow vLLM: temperature, top_p, top_k, min_p and repetition_penalty from the model's
generation_config.json (vLLM's --generation-config auto; else temperature 1, no top-p, top-k, min-p or
penalty), max_tokens 16 for completions and "up to the context"
(or the KV cache, where it holds fewer tokens) for chat and for a max_tokens of null, at most generation_config.json's
max_new_tokens as in vLLM;
`usage.prompt_tokens_details.cached_tokens` is the prompt tokens found in the prefix cache
(each prompt counted once, as its first choice found them; streamed: in the final usage only,
the continuous usage of stream_options being, as vLLM's, each chunk's own choice's);
`finish_reason` is "stop" or "length" (`stop_reason`: the stop string or token id hit, null for
the tokenizer's eos_token; generation_config.json's other end-of-sequence ids, as Gemma's <end_of_turn>,
are stop token ids to vLLM, and so their id); a response's `id` is cmpl- / chatcmpl- and the request's X-Request-Id header, or
its `request_id` field, or a random id. A stream is server-sent events ending in `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from llmirc.errors import LlmircError
from llmirc.runtime import structured
from llmirc.runtime.engine import MAX_LOGPROBS, SamplingParams, TokenLogprob

from .app import APIError, Generation, Int, Server, event_stream, log, logit_bias_pairs, refuse_not_implemented
from .reasoning import Reasoning
from .tool_calls import ToolChoice, template_tool_calls

MAX_N = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


# vLLM request fields that change the output and that llmirc does not implement: a 400 naming
# them unless absent, null or at a value that changes nothing (listed).
NOT_IMPLEMENTED = {
    "logits_processors": ([],),
    "use_beam_search": (False,), "length_penalty": (1.0,),
    "detokenize": (True,),
    "functions": ([],), "function_call": ("none",), "chat_template": (), "modalities": (["text"],), "audio": (),
    # SGLang's extra fields of its OpenAI API
    "stop_regex": (), "lora_path": (), "session_params": (), "custom_logit_processor": (),
    "return_hidden_states": (False,),
    # vLLM's completion prompt_embeds, and a priority other than 0, which vLLM refuses too without
    # --scheduling-policy priority
    "prompt_embeds": (), "priority": (0,),
}
# the request fields that hold a structured output, and their kind (structured.grammar): older vLLM's
# structural_tag beside guided_*, and SGLang's OpenAI API's regex, ebnf and json_schema
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
          "structural_tag": "structural_tag", "regex": "regex", "ebnf": "grammar", "json_schema": "json"}


class _Common(BaseModel):
    """Fields both endpoints share (others are kept in `model_extra`: see NOT_IMPLEMENTED)."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    min_tokens: Int | None = 0
    allowed_token_ids: list[Int] | None = None
    bad_words: list[str] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: dict[str, Any] | str | None = None  # (older vLLM's)
    regex: str | None = None  # (SGLang's)
    ebnf: str | None = None  # (SGLang's)
    json_schema: dict[str, Any] | str | None = None  # (SGLang's)
    no_stop_trim: bool = False  # (SGLang's include_stop_str_in_output)
    prompt_logprobs: Int | None = None  # vLLM's: each prompt position's logprobs (`_prompt_logprobs`)
    truncate_prompt_tokens: Int | None = None  # vLLM's: only the prompt's last k tokens (-1: the context's)
    return_tokens_as_token_ids: bool | None = False  # vLLM's: logprobs' tokens as "token_id:ID"
    _grammar: str | None = PrivateAttr(None)  # the structured output's grammar (`_guided`), made once
    _grammar_field: str | None = PrivateAttr(None)  # the field it came from: the engine's 400s name it (`_fields`)
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    n: Int | None = 1
    stream: bool | None = False  # (None: as vLLM, the default; so for echo, logprobs, return_token_ids)
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    echo: bool | None = False
    return_token_ids: bool | None = False  # vLLM: the generated ids in each choice and chunk, prompt_token_ids
    user: str | None = None
    request_id: str | None = None  # vLLM's: the response's id when there is no X-Request-Id header
    best_of: Int | None = None  # not implemented unless equal to n


class CompletionRequest(_Common):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    add_special_tokens: bool = True
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, name, ...: passed to the template
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = None
    add_special_tokens: bool = False  # (vLLM's default: the template writes them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None  # vLLM's: the template's `documents` (RAG templates read them)


async def _refuse_unsupported(req: _Common) -> None:
    refuse_not_implemented(req.model_extra or {}, NOT_IMPLEMENTED)
    if ignored := sorted((req.model_extra or {}).keys() - NOT_IMPLEMENTED.keys()):  # (vLLM's warning: a typo shows)
        log.warning("The following fields were present in the request but ignored: %s", ", ".join(ignored))
    # (once for all n choices, off the event loop: a large schema's grammar takes a tenth of a second)
    req._grammar_field, req._grammar = await asyncio.to_thread(_guided, req)
    if req.n is None:  # (vLLM: null is the default)
        req.n = 1
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be given with stream: true", "stream_options")
    if req.prompt_logprobs is not None:  # (vLLM's checks; -1, the whole vocabulary, is past its max_logprobs 20)
        if req.stream:
            raise APIError(400, "prompt_logprobs are not available with stream: true", "prompt_logprobs")
        if not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.prompt_logprobs}",
                           "prompt_logprobs")
    if req.truncate_prompt_tokens is not None and not (req.truncate_prompt_tokens == -1 or
                                                       req.truncate_prompt_tokens >= 1):
        raise APIError(400, f"truncate_prompt_tokens must be -1 (the context) or >= 1, got "
                            f"{req.truncate_prompt_tokens}", "truncate_prompt_tokens")
    if req.seed == -1:  # (vLLM: -1 is no seed)
        req.seed = None
    if not req.skip_special_tokens:
        raise APIError(400, "skip_special_tokens false is not supported by llmirc (special tokens are always "
                            "left out of the text)", "skip_special_tokens")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported by llmirc (only best_of == n)", "best_of")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    if req.temperature is not None and not 0 <= req.temperature < math.inf:  # (NaN too)
        raise APIError(400, f"temperature must be a finite number >= 0, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (disabled) or >= 1, got {req.top_k}", "top_k")
    if req.min_p is not None and not 0 <= req.min_p <= 1:
        raise APIError(400, f"min_p must be in [0, 1], got {req.min_p}", "min_p")
    if req.repetition_penalty is not None and not 0 < req.repetition_penalty < math.inf:
        raise APIError(400, f"repetition_penalty must be a finite number > 0, got {req.repetition_penalty}",
                       "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if (value := getattr(req, name)) is not None and not -2 <= value <= 2:
            raise APIError(400, f"{name} must be in [-2, 2], got {value}", name)


def _sampling(server: Server, req: _Common, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
              index: int) -> SamplingParams:
    seed = None if req.seed is None else (req.seed + index) % 2**64  # vLLM: choice i of n uses seed + i
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    vocab = server.model.vocab_size
    model = server.options.sampling_defaults  # (the model's generation config, as vLLM's --generation-config auto)
    temperature, top_k, top_p, min_p, repetition_penalty = (model.get(k, d) if v is None else v for k, v, d in (
        ("temperature", req.temperature, 1.0), ("top_k", req.top_k, None), ("top_p", req.top_p, None),
        ("min_p", req.min_p, 0.0), ("repetition_penalty", req.repetition_penalty, 1.0)))
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k if top_k and top_k > 0 else None,
        top_p=top_p if top_p is not None and top_p < 1 else None, seed=seed,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, prompt_logprobs_start=0, stop=tuple(stop),
        include_stop_str_in_output=req.include_stop_str_in_output or req.no_stop_trim, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias_pairs(req.logit_bias, vocab, "logit_bias"), min_tokens=req.min_tokens or 0,
        allowed_token_ids=None if req.allowed_token_ids is None else tuple(req.allowed_token_ids),
        bad_words=tuple(req.bad_words or ()), guided=req._grammar)


def _fields(req: _Common) -> dict[str, str]:
    """The request's names of the engine's fields that its 400s name (Server.admit's `fields`)."""
    fields = {"logprobs": "top_logprobs"} if isinstance(req, ChatRequest) else {}
    return fields | ({"guided": req._grammar_field} if req._grammar_field else {})


def _guided(req: _Common) -> tuple[str | None, str | None]:
    """The field and the llguidance grammar of the request's structured output (structured.py): vLLM's
    structured_outputs or guided_json / guided_regex / guided_choice / guided_grammar (with
    guided_whitespace_pattern for JSON), SGLang's regex / ebnf / json_schema, or OpenAI's response_format
    (json_object, json_schema, and vLLM's structural_tag); (None, None) for none; a 400 naming the field for
    more than one, or one that is not valid."""
    given = [(name, value) for name in ("structured_outputs", *GUIDED, "response_format")
             if (value := getattr(req, name)) is not None]
    given = [(name, value) for name, value in given if not (name == "response_format" and value == {"type": "text"})]
    if len(given) > 1:
        raise APIError(400, f"only one structured output may be given, got {' and '.join(n for n, _ in given)}",
                       given[1][0])
    if not given:
        return None, None
    (name, value), = given
    return name, _grammar(req, name, value)


def _grammar(req: _Common, name: str, value) -> str:
    """The grammar of the structured output `value` given as field `name` (`_guided`)."""
    options = structured.JsonOptions(whitespace=req.guided_whitespace_pattern)
    try:
        if name == "structured_outputs":
            if req.guided_whitespace_pattern is not None and isinstance(value, dict):
                value = {"whitespace_pattern": req.guided_whitespace_pattern, **value}
            return structured.structured_outputs(value)
        if name != "response_format":
            return structured.grammar(GUIDED[name], value, options)
        kind = value.get("type")
        if kind == "json_object":
            return structured.grammar("json", structured.JSON_OBJECT, options)
        if kind == "structural_tag":
            return structured.grammar("structural_tag", value, options)
        schema = value.get("json_schema")
        if kind != "json_schema" or not isinstance(schema, dict) or "schema" not in schema:
            raise LlmircError("response_format must be {type: text}, {type: json_object}, {type: json_schema, "
                              "json_schema: {name, schema}} or {type: structural_tag, structures, triggers}")
        return structured.grammar("json", schema["schema"], options)
    except LlmircError as e:
        raise APIError(400, f"{name}: {e}", name) from None


def _rest_of_sequence(server: Server, prompt_len: int, what: str) -> int:
    """vLLM's max_tokens for a request that leaves it out (chat) or gives null (both APIs): the rest
    of the context (here: of what one sequence can hold, the KV cache being smaller), at most the
    generation config's max_new_tokens. A 400 naming `what` when not one token fits."""
    rest = server.max_sequence_tokens - prompt_len
    if rest < 1:
        server.check_length(prompt_len, 1, what, what)
    return min(rest, server.options.sampling_defaults.get("max_new_tokens", rest))


def _finish(c: Generation) -> dict:
    return {"finish_reason": c.finish_reason if c.done else None, "stop_reason": c.stop_reason if c.done else None}


def _request_id(prefix: str, req: _Common, raw_request) -> str:
    """The response's id: PREFIX-ID for the client's X-Request-Id header (vLLM's, so that a client or
    proxy can trace its request), else for the body's `request_id` (vLLM's field, the header winning
    as in vLLM's _base_request_id), else PREFIX- and a random hex id."""
    return f"{prefix}-{raw_request.headers.get('x-request-id') or req.request_id or uuid.uuid4().hex}"


def _chunks(req: _Common, kind: str, request_id: str, created: int, model: str):
    """The function making this request's stream chunks: chunk(choices, usage) -> body."""
    def chunk(choices: list, usage: dict | None = None) -> dict:
        body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
        if req.stream_options and req.stream_options.include_usage:
            body["usage"] = usage
        return body
    return chunk


def _usage_chunk(req: _Common, chunk, usage):
    """The final stream chunk with the usage, when stream_options.include_usage asks for it."""
    return (lambda: chunk([], usage())) if req.stream_options and req.stream_options.include_usage else None


def _usage(prompt_tokens: int, choices: list[Generation], cached: int | None = None) -> dict:
    """OpenAI's usage of `choices` (their tokens so far) over `prompt_tokens`; with `cached`, the
    prompt_tokens_details of a whole response. A stream's continuous usage is, as vLLM's, its
    chunk's choice alone, without details: the cached tokens are known only after the prefill, and
    chunks go out before it (the response starts when its requests are admitted)."""
    completion = sum(len(c.tokens) for c in choices)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


# -- /v1/completions ---------------------------------------------------------------------------

async def _completion_prompts(server: Server, req: CompletionRequest) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    server.check_sequences(len(prompt) * req.n)  # (before tokenizing thousands of texts for nothing)
    for p in prompt:  # every text checked before any is tokenized
        if isinstance(p, str):
            server.check_text(p, "prompt")
    return [await server.encode(p, "prompt", req.add_special_tokens) if isinstance(p, str) else list(p)
            for p in prompt]


def _position_logprobs(entry: TokenLogprob) -> list[tuple[int, float]]:
    """vLLM's logprobs of one position, as (token id, logprob): the sampled (or prompt) token first,
    then the top ones without it; top + 1 entries when the token is not among the top. (vLLM's
    sampler puts the sampled token in front of the top-k: vllm/logprobs.py,
    append_logprobs_for_next_position.)"""
    return [(entry.token, entry.logprob), *((t, lp) for t, lp in entry.top if t != entry.token)]


def _token_text(server: Server, req: _Common):
    """A logprobs token's text: the vocabulary's, or vLLM's "token_id:ID" with return_tokens_as_token_ids."""
    tok = server.model.tokenizer
    if req.return_tokens_as_token_ids or tok is None:
        return lambda t: f"token_id:{t}"
    return tok.token_text


def _truncate(server: Server, req: _Common, prompt: list[int]) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: as many as the context holds)."""
    k = req.truncate_prompt_tokens
    if k is None:
        return prompt
    if k > server.model.max_context:
        raise APIError(400, f"truncate_prompt_tokens ({k}) is greater than the context ({server.model.max_context})",
                       "truncate_prompt_tokens")
    return prompt[-(server.model.max_context if k == -1 else k):]


def _prompt_logprobs(server: Server, req: _Common, entries: list[TokenLogprob | None]) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt position (null for the first) {token id: {logprob, rank,
    decoded_token}}, the prompt's token first, then the `prompt_logprobs` most likely (ranks 1, 2, ...)."""
    text, out = _token_text(server, req), []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        position = {e.token: {"logprob": e.logprob, "rank": e.rank, "decoded_token": text(e.token)}}
        for rank, (t, lp) in enumerate(e.top[:req.prompt_logprobs], 1):
            position.setdefault(t, {"logprob": lp, "rank": rank, "decoded_token": text(t)})
        out.append(position)
    return out


def _completion_logprobs(server: Server, req: _Common, entries: list[TokenLogprob | None], offset: int,
                         prompt: list[int]) -> dict:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset. A
    None entry is the first prompt token (echo): listed with null logprobs, as vLLM and OpenAI do.
    top_logprobs holds the token itself and the `logprobs` most likely ("up to logprobs + 1
    elements", as OpenAI documents and vLLM answers)."""
    text = _token_text(server, req)
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for entry in entries:
        if entry is None:
            entry = TokenLogprob(prompt[0], None)
        out["tokens"].append(text(entry.token))
        out["token_logprobs"].append(entry.logprob)
        out["top_logprobs"].append(None if entry.logprob is None else
                                   {text(t): lp for t, lp in _position_logprobs(entry)})
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1])
    return out


async def completions(server: Server, req: CompletionRequest, raw_request):
    server.check_model(req.model)
    await _refuse_unsupported(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported by llmirc", "suffix")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
    if req.max_tokens is not None and req.max_tokens < 1 and not (req.echo and req.max_tokens == 0):
        # (vLLM's SamplingParams; echo with max_tokens 0 answers the prompt alone, as OpenAI and vLLM do)
        raise APIError(400, f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    prompts = [_truncate(server, req, p) for p in await _completion_prompts(server, req)]
    limits = []  # each prompt's max_tokens (null: vLLM's default, the rest of the sequence, as chat's)
    for prompt in prompts:
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        limits.append(_rest_of_sequence(server, len(prompt), "prompt") if req.max_tokens is None else req.max_tokens)
        server.check_length(len(prompt), limits[-1], "prompt",
                            "max_tokens" if req.max_tokens is not None and "max_tokens" in req.model_fields_set
                            else "prompt")
        server.check_prompt_ids(prompt, "prompt")
    echoed = req.logprobs if req.echo else None  # (the echo's logprobs are the prompt's)
    prompt_logprobs = max((k for k in (echoed, req.prompt_logprobs) if k is not None), default=None)
    requests = [(p, _sampling(server, req, limit, req.logprobs, prompt_logprobs, j))
                for p, limit in zip(prompts, limits) for j in range(req.n)]
    choices = [Generation() for _ in requests]
    request_id, created = _request_id("cmpl", req, raw_request), int(time.time())
    prompt_tokens = sum(map(len, prompts))

    given = [req.prompt] if isinstance(req.prompt, str) else req.prompt

    def echo_text(i: int) -> str:  # (vLLM: a text prompt as given, special tokens and all; token ids decoded)
        if not req.echo:
            return ""
        if isinstance(text := given[i // req.n], str) and req.truncate_prompt_tokens is None:
            return text
        tok = server.model.tokenizer
        return tok.decode(requests[i][0]) if tok is not None else ""

    def logprobs_of(i: int, entries: list, offset: int) -> dict | None:
        return None if req.logprobs is None else _completion_logprobs(server, req, entries, offset, requests[i][0])

    def echoed_logprobs(c: Generation) -> list:  # (with prompt_logprobs past logprobs, cut to logprobs)
        return [None if e is None else TokenLogprob(e.token, e.logprob, e.top[:req.logprobs])
                for e in c.prompt_logprobs or []] if req.echo else []

    def usage():  # each prompt once, as its first choice found it (the other n - 1 reuse what that one computed)
        cached = sum(choices[i * req.n].cached_tokens for i in range(len(prompts)))
        return _usage(prompt_tokens, choices, cached)

    chunk = _chunks(req, "text_completion", request_id, created, server.options.served_model_name)

    if req.stream:
        continuous = req.stream_options and req.stream_options.continuous_usage_stats

        async def bodies(outputs):
            offsets, sent, sent_ids, started = [0] * len(choices), [0] * len(choices), [0] * len(choices), \
                [False] * len(choices)
            async for i, out in outputs:
                c = choices[i]
                if c.done:
                    continue
                text, entries = c.update(out), []
                if not started[i]:
                    text = echo_text(i) + text
                    entries += c.prompt_logprobs or []
                entries += c.logprobs[sent[i]:]
                sent[i] = len(c.logprobs)
                new_ids = req.return_token_ids and len(c.tokens) > sent_ids[i]  # ids stream even without text
                if not text and not c.done and not entries and not new_ids:
                    continue
                body = {"index": i, "text": text, "logprobs": logprobs_of(i, entries, offsets[i]), **_finish(c)}
                if req.return_token_ids:  # (vLLM: the prompt's ids in each choice's first chunk)
                    body["token_ids"], sent_ids[i] = c.tokens[sent_ids[i]:], len(c.tokens)
                    if not started[i]:
                        body["prompt_token_ids"] = requests[i][0]
                started[i] = True
                yield chunk([body], _usage(len(requests[i][0]), [c]) if continuous else None)
                offsets[i] += len(text)

        return await event_stream(server, requests, raw_request, bodies, _usage_chunk(req, chunk, usage),
                                  fields=_fields(req))

    async for i, out in server.generate(requests, raw_request, fields=_fields(req)):
        choices[i].update(out)
    return {"id": request_id, "object": "text_completion", "created": created,
            "model": server.options.served_model_name,
            "choices": [{"index": i, "text": echo_text(i) + c.text,
                         "logprobs": logprobs_of(i, echoed_logprobs(c) + c.logprobs, 0),
                         **_finish(c),
                         **({"prompt_logprobs": _prompt_logprobs(server, req, c.prompt_logprobs)}
                            if req.prompt_logprobs is not None else {}),
                         **({"token_ids": c.tokens, "prompt_token_ids": requests[i][0]} if req.return_token_ids
                            else {})}
                        for i, c in enumerate(choices)],
            "usage": usage()}


# -- /v1/chat/completions ----------------------------------------------------------------------

async def _chat_prompt(server: Server, req: ChatRequest, add_special_tokens: bool = False
                       ) -> tuple[list[int], list[dict], str]:
    """The prompt's token ids (the template writes the special tokens: none added, as vLLM), the
    messages as the template saw them (text content), and the rendered text."""
    model = server.model
    if model.chat_template is None:
        raise APIError(400, "this bundle has no chat template (its tokenizer_config.json has no chat_template and "
                            "there is no chat_template.jinja); use /v1/completions")
    messages = []
    for i, m in enumerate(req.messages):
        message = m.model_dump(exclude_none=False)
        if m.content is None:  # (vLLM renders null content as empty text)
            message["content"] = ""
        elif isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text":
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got "
                                        f"{part.get('type')!r}", "messages")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: a text part needs a string 'text', got "
                                        f"{part.get('text')!r}", "messages")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        template_tool_calls(message, i)
        messages.append(message)
    # chat_template_kwargs (over serve's defaults) override the request's own fields, as in vLLM
    options = {"add_generation_prompt": req.add_generation_prompt, "tools": req.tools, "documents": req.documents,
               "continue_final_message": req.continue_final_message,
               **server.options.default_chat_template_kwargs, **(req.chat_template_kwargs or {})}
    try:
        text = await server.render_chat(messages, **options)
    except LlmircError as e:
        raise APIError(400, str(e), "chat_template_kwargs" if "messages" in options else "messages") from None
    return await server.encode(text, "messages", add_special_tokens), messages, text


def _chat_logprobs(server: Server, req: ChatRequest, entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat logprobs. Each position's top_logprobs are, as vLLM gives them, the first
    `top_logprobs` of `_position_logprobs`: the sampled token first, then the most likely others."""
    text = _token_text(server, req)

    def item(t, lp):
        s = text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in _position_logprobs(e)[:len(e.top)]]}
                        for e in entries]}


def _chat_choice(server: Server, req: ChatRequest, i: int, c: Generation, tools: ToolChoice,
                 thinking: Reasoning | None, echo: str) -> dict:
    """One choice of a chat answer: its message (content, or the tool calls found in it; the reasoning
    apart with a reasoning parser) and finish."""
    finish = _finish(c)
    reasoning, text = thinking.split(c.text) if thinking else (None, c.text)
    message = {"content": None}
    if text is not None:
        message, finish["finish_reason"] = tools.message(text, finish["finish_reason"])
    if thinking:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if echo:
        message["content"] = echo + (message["content"] or "")
    return {"index": i, "message": {"role": "assistant", **message},
            "logprobs": _chat_logprobs(server, req, c.logprobs) if req.logprobs else None, **finish,
            **({"token_ids": c.tokens} if req.return_token_ids else {})}


def _replaced_by_the_call(req: ChatRequest) -> None:
    """A forced tool call (tools with a named tool choice or "required") holds the text to the call's schema in
    place of the request's structured output, as vLLM's tool parsers' adjust_request replaces structured_outputs
    and drops response_format (the answer is the call; instructor's RESPONSES_TOOLS mode and the OpenAI Agents
    SDK send both). Beside a named tool, a json, regex or choice constraint is a 400 naming its field, as vLLM's
    check_structured_outputs_count refuses those kinds of structured_outputs there (guided_json / guided_regex /
    guided_choice and SGLang's regex / json_schema read as the structured_outputs kind they stand for)."""
    if not req.tools or not (req.tool_choice == "required" or isinstance(req.tool_choice, dict)):
        return
    so = req.structured_outputs if isinstance(req.structured_outputs, dict) else None  # (else _guided's 400)
    if isinstance(req.tool_choice, dict):
        given = [(name, GUIDED[name]) for name in GUIDED if getattr(req, name) is not None]
        given += [("structured_outputs", kind) for kind in ("json", "regex", "choice") if (so or {}).get(kind)
                  is not None]
        for name, kind in given:
            if kind in ("json", "regex", "choice"):
                raise APIError(400, f"{name}: a {kind} structured output cannot be given with a named tool_choice "
                                    "(as in vLLM; the call's schema replaces a grammar or structural tag, and any "
                                    "structured output with tool_choice required)", name)
    req.response_format = None
    if so is not None:
        req.structured_outputs = None
    for name in GUIDED:
        setattr(req, name, None)


async def chat_completions(server: Server, req: ChatRequest, raw_request):
    server.check_model(req.model)
    _replaced_by_the_call(req)
    await _refuse_unsupported(req)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}",
                       "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    given = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, given)
    if max_tokens is not None and max_tokens < 1:  # (vLLM's SamplingParams)
        raise APIError(400, f"{given} must be at least 1, got {max_tokens}", given)
    tools = ToolChoice.of(req.tools, req.tool_choice, server.options.tool_call_parser)
    if tools.schema is not None:  # (the request's own structured output, if any, was replaced)
        try:
            req._grammar_field, req._grammar = "tools", await asyncio.to_thread(tools.grammar)
        except LlmircError as e:
            raise APIError(400, f"tools: {e}", "tools") from None
    prompt, messages, rendered = await _chat_prompt(server, req, req.add_special_tokens)
    prompt = _truncate(server, req, prompt)
    thinking = Reasoning.of(server.options.reasoning_parser, rendered)
    if thinking and req._grammar is not None and not thinking.ended:
        req._grammar = structured.after_reasoning(req._grammar)
    if max_tokens is None:
        max_tokens = _rest_of_sequence(server, len(prompt), "messages")
    server.check_length(len(prompt), max_tokens, param=given)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    requests = [(prompt, _sampling(server, req, max_tokens, logprobs, req.prompt_logprobs, j)) for j in range(req.n)]
    choices = [Generation() for _ in requests]
    request_id, created = _request_id("chatcmpl", req, raw_request), int(time.time())
    name = server.options.served_model_name
    # vLLM's echo: the last message's content when it is the assistant's (the one being continued)
    echo = (messages[-1]["content"] or "") if req.echo and messages[-1]["role"] == "assistant" else ""

    def usage():  # (the prompt once, as the first choice found it: see completions)
        return _usage(len(prompt), choices, choices[0].cached_tokens)

    chunk = _chunks(req, "chat.completion.chunk", request_id, created, name)

    if req.stream:
        continuous = req.stream_options and req.stream_options.continuous_usage_stats

        async def bodies(outputs):
            for i in range(len(choices)):
                role = {"role": "assistant", "content": echo}
                first = chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}],
                              _usage(len(prompt), [choices[i]]) if continuous else None)
                if req.return_token_ids:  # (vLLM: in each choice's first chunk)
                    first["prompt_token_ids"] = requests[0][0]
                yield first
            sent_ids = [0] * len(choices)
            streams = [(tools.stream(), thinking and thinking.stream()) for _ in choices]
            async for i, out in outputs:
                c = choices[i]
                if c.done:
                    continue
                piece, (calls, thoughts) = c.update(out), streams[i]
                reasoning, piece = thoughts.feed(piece, c.done) if thoughts else ("", piece)
                finish = _finish(c)
                if thoughts and c.done and not thoughts.answering:  # (no content: no call, as in the plain answer)
                    delta = {}
                else:
                    delta, finish["finish_reason"] = calls.feed(piece, c.done, finish["finish_reason"])
                if reasoning:
                    delta = {"reasoning_content": reasoning, "reasoning": reasoning, **delta}
                new = [c.logprobs[-1]] if out.logprob is not None and req.logprobs and c.logprobs else []
                new_ids = req.return_token_ids and len(c.tokens) > sent_ids[i]  # ids stream even without text
                if not delta and not c.done and not new and not new_ids:
                    continue
                body = {"index": i, "delta": delta,
                        "logprobs": _chat_logprobs(server, req, new) if req.logprobs else None, **finish}
                if req.return_token_ids:
                    body["token_ids"], sent_ids[i] = c.tokens[sent_ids[i]:], len(c.tokens)
                yield chunk([body], _usage(len(prompt), [c]) if continuous else None)

        return await event_stream(server, requests, raw_request, bodies, _usage_chunk(req, chunk, usage),
                                  fields=_fields(req))

    async for i, out in server.generate(requests, raw_request, fields=_fields(req)):
        choices[i].update(out)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": name,
            "choices": [_chat_choice(server, req, i, c, tools, thinking, echo) for i, c in enumerate(choices)],
            **({"prompt_token_ids": requests[0][0]} if req.return_token_ids else {}),
            **({"prompt_logprobs": _prompt_logprobs(server, req, choices[0].prompt_logprobs)}
               if req.prompt_logprobs is not None else {}),
            "usage": usage()}


# -- /tokenize and /detokenize (vLLM's) -----------------------------------------------------------

class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # shown to the template, as with tool_choice "none"
    chat_template: str | None = None  # refused, as in chat requests
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[Int]


async def tokenize(server: Server, req: TokenizeRequest) -> dict:
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if req.prompt is not None:
        ids = await server.encode(req.prompt, "prompt", req.add_special_tokens is not False)
    else:
        if req.chat_template is not None:
            raise APIError(400, "chat_template is not supported by llmirc (the bundle's, or serve --chat-template)",
                           "chat_template")
        chat = ChatRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message,
                           chat_template_kwargs=req.chat_template_kwargs, tools=req.tools)
        ids, _, _ = await _chat_prompt(server, chat, bool(req.add_special_tokens))
    backend = server.model.tokenizer.backend  # vLLM's token_strs: the vocabulary's entries (convert_ids_to_tokens)
    strs = await asyncio.to_thread(lambda: [backend.id_to_token(t) for t in ids]) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": server.model.max_context, "tokens": ids, "token_strs": strs}


async def detokenize(server: Server, req: DetokenizeRequest) -> dict:
    server.check_model(req.model)
    tok = server.model.tokenizer
    if tok is None:
        raise APIError(400, "this bundle has no tokenizer", "tokens")
    # ids the model can generate (its logits are often padded past the tokenizer's vocabulary:
    # those decode to nothing, as in vLLM), or the tokenizer knows
    vocab = max(tok.vocab_size, server.model.vocab_size)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary of {vocab}", "tokens")
    # special tokens kept, as vLLM's /detokenize (tokenizer.decode(ids)): the text of /tokenize's ids, <s> and all
    return {"prompt": await asyncio.to_thread(tok.decode, req.tokens, True, False)}


def add_routes(app, server: Server) -> None:
    @app.post("/tokenize")
    async def _tokenize(req: TokenizeRequest):
        return await tokenize(server, req)

    @app.post("/detokenize")
    async def _detokenize(req: DetokenizeRequest):
        return await detokenize(server, req)

    @app.post("/v1/completions")
    async def _completions(req: CompletionRequest, raw_request: Request):
        return await completions(server, req, raw_request)

    @app.post("/v1/chat/completions")
    async def _chat(req: ChatRequest, raw_request: Request):
        return await chat_completions(server, req, raw_request)

