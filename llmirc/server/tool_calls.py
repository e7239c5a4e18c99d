"""Tool calls (function calling) in chat completions, as vLLM serves them.

A request's `tool_choice` (OpenAI's; "auto" when it gives tools and leaves tool_choice out):
- "none": the tools are shown to the chat template; the text is the answer.
- a named function ({"type": "function", "function": {"name": ...}}): the text is held to that
  function's parameters schema (structured outputs) and answered as one call of it, with
  finish_reason "stop" (as vLLM).
- "required": the text is held to a JSON array of one or more {"name", "parameters"} objects, each
  naming a tool and holding its parameters (vLLM's schema); each is a call, and finish_reason is
  "tool_calls" when the array was complete.
- "auto": the model chooses; the calls in its text are found by the parser for its family's format,
  which the server names (`serve --enable-auto-tool-choice --tool-call-parser NAME`, vLLM's flags;
  without them "auto" is a 400, as in vLLM): `PARSERS`. A text with calls answers them with the text
  before the first as content (null when empty) and finish_reason "tool_calls"; a text whose calls
  do not parse is the answer as it is, with no call (vLLM's rule).

Streamed, a named call's arguments go out as they are written; otherwise the text is content until the
format's start (hermes: `<tool_call>`; llama3_json: a text that begins with `{`), and what follows is
held until the request ends and then answered as above, so a stream and a plain answer always agree.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from llmirc.runtime import structured
from llmirc.runtime.tokenizer import held_tail

from .app import APIError

# --tool-call-parser NAME: the start of a call in the text ("" : the text's first character, "{")
PARSERS = {
    "hermes": "<tool_call>",  # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, each: Qwen2.5/3, Hermes 2/3
    "llama3_json": "",  # {"name": ..., "parameters": {...}} as the whole answer, calls split by ";": Llama 3.1-3.3
}
HERMES_END = "</tool_call>"


def call(name: str, arguments: str) -> dict:
    """OpenAI's tool call object; `arguments` a JSON object's text. The id as vLLM makes it."""
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _arguments(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _hermes(text: str) -> list[dict] | None:
    """The calls of a text holding `<tool_call>` (each block closed, the last one maybe not), None when one
    is not a JSON object with a string name and object arguments."""
    calls = []
    for block in text.split(PARSERS["hermes"])[1:]:
        body = block.split(HERMES_END, 1)[0]
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                and isinstance(value.get("arguments", {}), dict)):
            return None
        calls.append(call(value["name"], _arguments(value.get("arguments", {}))))
    return calls


def _llama3_json(text: str) -> list[dict] | None:
    """The calls of a text of JSON objects {"name", "parameters" (or "arguments")} split by ";", None else."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("parameters", value.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(call(value["name"], _arguments(arguments)))
        rest = text[i:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        i = len(text) - len(rest) + 1


def _required(text: str) -> list[dict] | None:
    """The calls of tool_choice required's JSON array (None when max_tokens cut it)."""
    try:
        return [call(c["name"], _arguments(c["parameters"])) for c in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return None


def template_tool_calls(message: dict, i: int) -> None:
    """An assistant message's tool_calls as chat templates take them (vLLM's, after transformers'): each
    function's arguments a dict (its JSON text parsed; not JSON or not an object: {}, as vLLM, so that a
    conversation with a broken call goes on), an empty list dropped. A 400 for a call that is not a function."""
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not isinstance(calls, list):
        return
    if not calls:
        del message["tool_calls"]
    for item in calls:
        function = item.get("function") if isinstance(item, dict) and item.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict):
            raise APIError(400, f"messages[{i}].tool_calls: each must be {{type: function, function: {{name, "
                                "arguments}}}", "messages")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments else {}
            except ValueError:
                arguments = {}
        function["arguments"] = arguments if isinstance(arguments, dict) else {}


def _required_schema(functions: dict[str, dict]) -> dict:
    """vLLM's schema of tool_choice required: an array of one or more {"name", "parameters"}, each naming a
    function and holding its parameters schema (the wrapper takes no other key: helper-95 saw a small model
    write invented keys into it to max_tokens). Each schema's own $defs (and draft-07's definitions), which
    its $refs ("#/$defs/X") point into from the document's root, are moved to the array schema's root, as
    vLLM does; a name two tools define differently is a 400 (vLLM's ValueError)."""
    items, defs = [], {}
    for name, schema in functions.items():
        schema = dict(schema)
        for key in ("$defs", "definitions"):
            given = schema.pop(key, None)
            if given is None:
                continue
            if not isinstance(given, dict):
                raise APIError(400, f"tool {name!r}: its parameters' {key} must be an object", "tools")
            for def_name, value in given.items():
                if defs.setdefault(key, {}).setdefault(def_name, value) != value:
                    raise APIError(400, f"tool {name!r}: its parameters' {key} {def_name!r} differs from another "
                                        "tool's of that name (tool_choice required needs them alike)", "tools")
        items.append({"properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                      "required": ["name", "parameters"], "additionalProperties": False})  # (ours: closed)
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}, **defs}


@dataclass
class ToolChoice:
    """A chat request's tool choice (`of`): kind "none", "named", "required" or "auto"; `schema` the JSON
    schema the text is held to (named, required), `name` the named function, `parser` auto's."""

    kind: str
    schema: dict | None = None
    name: str | None = None
    parser: str | None = None

    @staticmethod
    def of(tools: list | None, tool_choice, parser: str | None) -> ToolChoice:
        """vLLM's checks of tools and tool_choice, each a 400 naming the field."""
        if tool_choice is None:
            tool_choice = "auto" if tools else "none"
        if tool_choice == "none":
            return ToolChoice("none")
        if not tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        functions = {}
        for i, tool in enumerate(tools):
            function = tool.get("function") if tool.get("type") == "function" else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("parameters", {}), (dict, type(None)))):
                raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", "tools")
            functions[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
        if tool_choice == "auto":
            if parser is None:
                raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                    "to be set", "tool_choice")
            return ToolChoice("auto", parser=parser)
        if tool_choice == "required":
            return ToolChoice("required", _required_schema(functions))
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, "tool_choice must be none, auto, required or {type: function, function: {name}}",
                           "tool_choice")
        if name not in functions:
            raise APIError(400, f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return ToolChoice("named", functions[name], name)

    def grammar(self) -> str:
        """The llguidance grammar of `schema` (named, required). Its objects take no property they do not list
        (as vLLM's default backend, XGrammar, and OpenAI's strict function calling read a tool's parameters;
        open, a small model wrote invented keys to max_tokens: helper-96, with LangChain's and instructor's
        schemas, which leave additionalProperties out). LlmircError for a schema llguidance does not take."""
        return structured.grammar("json", self.schema, structured.JsonOptions(closed=True))

    def calls(self, text: str) -> list[dict] | None:
        """The calls in a whole text (None: none, the text is the answer)."""
        if self.kind == "named":
            return [call(self.name, text)]
        if self.kind == "required":
            return _required(text)
        if self.kind != "auto":
            return None
        if self.parser == "llama3_json":
            return _llama3_json(text) if text.lstrip().startswith("{") else None
        return _hermes(text) if PARSERS["hermes"] in text else None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The answer's message fields (content, tool_calls) and its finish_reason."""
        calls = self.calls(text)
        if calls is None:
            return {"content": text}, finish_reason
        if self.kind != "auto":
            content = ""  # (vLLM's)
        else:  # (the text before the first call)
            content = text[:text.find(PARSERS["hermes"])] if self.parser == "hermes" else ""
            content = content or None
        reason = "tool_calls" if self.kind == "auto" or (self.kind == "required" and finish_reason == "stop") \
            else finish_reason
        return {"content": content, "tool_calls": calls}, reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice's text as chat deltas: `feed` each new piece."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.text, self.sent = choice, "", 0  # (sent: the text's characters sent as content)
        self.named = False  # (whether the named call's first delta, with its id and name, is out)

    def _held_from(self) -> int:
        """Where the text stops going out as content: at the format's start, or a prefix of it at the end."""
        if self.choice.kind in ("named", "required"):
            return 0
        if self.choice.kind == "none":
            return len(self.text)
        start = PARSERS[self.choice.parser]
        if not start:  # (llama3_json: a text whose first character is "{" holds from there)
            stripped = self.text.lstrip()
            return len(self.text) if stripped and not stripped.startswith("{") else 0
        if (at := self.text.find(start)) >= 0:
            return at
        return len(self.text) - held_tail(self.text, (start,))

    def feed(self, piece: str, done: bool = False, finish_reason: str | None = None) -> tuple[dict, str | None]:
        """The delta for a new piece of text ({}: nothing goes out yet) and the finish_reason; `done` (the
        request's last output) adds what was held, and the finish_reason `ToolChoice.message` gives."""
        self.text += piece
        if self.choice.kind == "named":  # (its arguments as they come)
            if self.named:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
                return delta, finish_reason
            if not piece and not done:
                return {}, finish_reason
            self.named = True
            return {"tool_calls": [{"index": 0, **call(self.choice.name, piece)}]}, finish_reason
        if not done:
            out = self.text[self.sent:max(self.sent, self._held_from())]
            self.sent += len(out)
            return ({"content": out} if out else {}), finish_reason
        message, reason = self.choice.message(self.text, finish_reason)
        delta = {}
        if rest := (message["content"] or "")[self.sent:]:
            delta["content"] = rest
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
        return delta, reason
