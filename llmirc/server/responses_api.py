"""OpenAI's Responses API (POST /v1/responses), as vLLM serves it, over the chat completions route.

A request is made into a chat request (`chat_request`): `input` a string (one user message) or a list of
items (messages with text content, `function_call` items as an assistant's tool calls, `function_call_output`
items as tool messages; reasoning items left out, as a chat template drops earlier reasoning), with
`instructions` and every system or developer message merged into one system message first (as vLLM),
`tools` (function tools, flat as the Responses API writes them), `tool_choice`, `text.format` (text,
json_object, json_schema) as response_format, `max_output_tokens`, `temperature`, `top_p` and vLLM's
`top_k`. Its answer is made into a response (`response`): a reasoning
item (with --reasoning-parser), a message with its output_text, and a function_call item per tool call;
status "incomplete" (reason max_output_tokens) when the text was cut. Streamed, the chat chunks become the
Responses API's events (`ResponseEvents`): response.created, in_progress, output_item.added /
content_part.added / output_text.delta / ... / output_item.done per item, response.completed (or
incomplete), each with its sequence_number.

Stateless: nothing is stored, so `previous_response_id`, `background` and GET /v1/responses/{id} are
refused (400 / 404) rather than answered without their state; other inputs than text (images, files)
and built-in tools (web search, file search, ...) are 400s naming them.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from .app import APIError, Int, Server, json_text, refuse_not_implemented
from .openai_api import ChatRequest, chat_completions

# fields that change the answer and need what llmirc does not keep or do (truncation "auto", some agent
# frameworks' default, changes nothing while the input fits the context; past it the request is refused as with
# "disabled": dropping the earliest items is not built)
NOT_IMPLEMENTED = {"previous_response_id": (), "background": (False,), "conversation": (), "prompt": (),
                   "truncation": ("disabled", "auto"), "top_logprobs": (0,)}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # (metadata, user, store, include, ...: no effect;
    # but include's message.output_text.logprobs and top_logprobs ask for logprobs, which are not answered: 400s)
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # (effort: no effect on the models llmirc runs, as in vLLM)
    stream: bool | None = False


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content, where: str) -> str:
    """A message's content as text: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", "input")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or \
                not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}.content: only text parts are supported, got {kind!r}", "input")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(req: ResponsesRequest) -> list[dict]:
    """The chat messages of `instructions` and `input`: `instructions` and the system and developer messages
    (in their order) one system message first, their texts apart by a blank line, as vLLM's Responses API
    merges them (developer: OpenAI's newer name for system, which chat templates know; Qwen2.5's drops a role
    it does not know, Qwen3.5's raises, and Qwen3.5's also refuses a second system message or one after the
    first turn)."""
    system = [req.instructions] if req.instructions else []  # (vLLM: empty instructions add nothing)
    messages = []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        kind, where = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant", "input")
            text = _text(item.get("content"), where)
            if item["role"] in ("system", "developer"):
                system.append(text)
            else:
                messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(v, str) for v in (call["id"], *call["function"].values())):
                raise APIError(400, f"{where}: a function_call needs string call_id, name and arguments", "input")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # (calls made together: one assistant turn)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise APIError(400, f"{where}: a function_call_output needs a string call_id and output", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(output, where)})
        elif kind != "reasoning":
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported by llmirc (message, "
                                "function_call, function_call_output, reasoning)", "input")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not messages:
        raise APIError(400, "input is empty", "input")
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    """Function tools in the chat API's form; other tool types are 400s."""
    if req.tools is None:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise APIError(400, f"tools[{i}]: tools of type {tool.get('type')!r} are not supported by llmirc "
                                "(function tools only)", "tools")
        if not isinstance(tool.get("name"), str):  # (the chat route's error would show its nested form)
            raise APIError(400, f"tools[{i}]: a function tool is {{type: function, name, parameters}}; its name "
                                "must be a string", "tools")
        tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                       if k in tool}})
    return tools


def _response_format(req: ResponsesRequest) -> dict | None:
    fmt = (req.text or {}).get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise APIError(400, "text.format must be {type: text}, {type: json_object} or {type: json_schema, name, "
                            "schema}", "text")
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}


def chat_request(req: ResponsesRequest) -> ChatRequest:
    """The chat request that answers `req` (APIError 400 for what llmirc cannot take)."""
    refuse_not_implemented(req.model_extra or {}, NOT_IMPLEMENTED)
    include = (req.model_extra or {}).get("include")
    if isinstance(include, list) and "message.output_text.logprobs" in include:
        raise APIError(400, "include: message.output_text.logprobs is not supported by llmirc (the chat route "
                            "answers logprobs)", "include")
    choice = req.tool_choice
    if isinstance(choice, dict) and isinstance(choice.get("type"), str) and choice["type"] != "function":
        raise APIError(400, f"tool_choice of type {choice['type']!r} is not supported by llmirc (none, auto, "
                            "required or {type: function, name})", "tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        choice = {"type": "function", "function": {"name": choice["name"]}}  # ({type, name}: flat here)
    elif choice is not None and choice not in ("none", "auto", "required"):  # (the chat route's error: its form)
        raise APIError(400, "tool_choice must be none, auto, required or {type: function, name}", "tool_choice")
    body = {"model": req.model, "messages": _messages(req), "tools": _tools(req), "tool_choice": choice,
            "response_format": _response_format(req), "max_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "stream": bool(req.stream),
            "stream_options": {"include_usage": True} if req.stream else None}
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"input: {'.'.join(map(str, err['loc']))}: {err['msg']}", "input") from None


def _usage(chat_usage: dict, reasoning_tokens: int) -> dict:
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": chat_usage["total_tokens"]}


def _message(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning(text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def _function_call(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


class Responder:
    """The response object of one request: its fields echoed, its output, status and usage."""

    def __init__(self, server: Server, req: ResponsesRequest):
        self.server, self.req = server, req
        self.id, self.created = _id("resp"), int(time.time())

    def reasoning_tokens(self, output: list[dict]) -> int:
        """The reasoning's tokens, as the tokenizer encodes its text (the split is made on text)."""
        texts = [c["text"] for item in output if item["type"] == "reasoning" for c in item["content"]]
        tok = self.server.model.tokenizer
        return sum(len(tok.encode(t, add_special_tokens=False)) for t in texts if t)

    def response(self, output: list[dict], finish_reason: str | None, chat_usage: dict | None,
                 status: str | None = None) -> dict:
        req = self.req
        status = status or ("incomplete" if finish_reason == "length" else "completed")
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "model": self.server.options.served_model_name, "instructions": req.instructions,
                "output": output, "parallel_tool_calls": req.parallel_tool_calls,
                "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
                "tools": req.tools or [], "temperature": req.temperature, "top_p": req.top_p,
                "max_output_tokens": req.max_output_tokens, "previous_response_id": None,
                "reasoning": req.reasoning, "store": False, "text": req.text or {"format": {"type": "text"}},
                "truncation": (req.model_extra or {}).get("truncation") or "disabled", "metadata": (req.model_extra or {}).get("metadata") or {},
                "usage": None if chat_usage is None else _usage(chat_usage, self.reasoning_tokens(output))}

    def of_chat(self, chat: dict) -> dict:
        """The response of a (non-streamed) chat completion."""
        choice = chat["choices"][0]
        message, output = choice["message"], []
        if message.get("reasoning_content"):
            output.append(_reasoning(message["reasoning_content"]))
        if message.get("content"):
            output.append(_message(message["content"]))
        output += [_function_call(c) for c in message.get("tool_calls") or ()]
        cut = choice["finish_reason"] == "length"
        if cut and output:  # (the item max_output_tokens cut: OpenAI's status incomplete)
            output[-1]["status"] = "incomplete"
        if not any(item["type"] != "reasoning" for item in output):  # (no text nor call: an empty message)
            output.append(_message("", status="incomplete" if cut else "completed"))
        return self.response(output, choice["finish_reason"], chat["usage"])


class ResponseEvents:
    """A chat completion's stream (its chunks' bodies, `feed`) as the Responses API's events."""

    def __init__(self, responder: Responder):
        self.responder, self.sequence, self.output = responder, 0, []
        self.open: dict | None = None  # the item being written (reasoning, message or a function call)
        self.calls: dict[int, dict] = {}  # tool call index -> its function_call item
        self.finish_reason = None

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict]:
        created = self.responder.response([], None, None, status="in_progress")
        return [self.event("response.created", response=created), self.event("response.in_progress",
                                                                              response=created)]

    def _close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, events = self.output.index(item), []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=part["text"], logprobs=[]),
                       self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part)]
        elif item["type"] == "reasoning":
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=item["content"][0]["text"]))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, name=item["name"], arguments=item["arguments"]))
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"  # (the item cut)
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _open(self, item: dict) -> list[dict]:
        events = self._close()
        self.open = item
        self.output.append(item)
        index = len(self.output) - 1
        events.append(self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item)))
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                     content_index=0, part={**item["content"][0], "text": ""}))
        return events

    def feed(self, body: dict) -> list[dict]:
        """The events of one chat chunk body (an error body: the response failed)."""
        if "error" in body:  # (then the response failed, with what it had)
            error = {"code": str(body["error"].get("code")), "message": body["error"].get("message")}
            failed = {**self.responder.response(self.output, None, None, status="failed"), "error": error}
            return [self.event("error", **error, param=body["error"].get("param")),
                    self.event("response.failed", response=failed)]
        events = []
        for choice in body.get("choices", ()):
            delta = choice.get("delta") or {}
            if text := delta.get("reasoning_content"):
                if self.open is None or self.open["type"] != "reasoning":
                    events += self._open(_reasoning("", status="in_progress"))
                self.open["content"][0]["text"] += text
                events.append(self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                         output_index=len(self.output) - 1, content_index=0, delta=text))
            if text := delta.get("content"):
                if self.open is None or self.open["type"] != "message":
                    events += self._open(_message("", status="in_progress"))
                self.open["content"][0]["text"] += text
                events.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                         output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=[]))
            for call in delta.get("tool_calls") or ():
                if call.get("id"):
                    events += self._open(_function_call({**call, "function": {**call["function"], "arguments": ""}},
                                                        status="in_progress"))
                    self.calls[call["index"]] = self.open
                item = self.calls[call["index"]]
                if arguments := call.get("function", {}).get("arguments"):
                    item["arguments"] += arguments
                    events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                             output_index=self.output.index(item), delta=arguments))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                events += self._close()
        if body.get("usage") is not None and not body.get("choices"):  # (the last chunk: the usage)
            if not any(item["type"] != "reasoning" for item in self.output):  # (no text nor call: an empty
                # message, as the plain answer has, after the reasoning if any)
                events += self._open(_message("", status="in_progress")) + self._close()
            done = self.responder.response(self.output, self.finish_reason, body["usage"])
            events.append(self.event(f"response.{done['status']}", response=done))
        return events


async def responses(server: Server, req: ResponsesRequest, raw_request):
    responder = Responder(server, req)
    chat = await chat_completions(server, chat_request(req), raw_request)
    if not req.stream:
        return responder.of_chat(chat)
    events, chunks = ResponseEvents(responder), chat.body_iterator

    async def body():
        try:
            for event in events.start():
                yield _sse(event)
            async for chunk in chunks:
                data = chunk[len("data: "):].strip()
                if data != "[DONE]":
                    for event in events.feed(json.loads(data)):
                        yield _sse(event)
        finally:
            await chunks.aclose()

    chat.body_iterator = body()  # (the chat stream's response: it aborts what runs however the response ends)
    return chat


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json_text(event)}\n\n"


def add_routes(app, server: Server) -> None:
    @app.post("/v1/responses")
    async def _responses(req: ResponsesRequest, raw_request: Request):
        return await responses(server, req, raw_request)

    @app.get("/v1/responses/{response_id}")
    async def _stored(response_id: str):
        raise APIError(404, f"response {response_id!r} is not stored: llmirc keeps no responses (store is not "
                            "supported)", "response_id")
