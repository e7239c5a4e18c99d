"""Tool calls in chat answers (llmirc/server/tool_calls.py): tool_choice's checks, the hermes and
llama3_json parsers, and streamed deltas that add up to the plain answer for any split of the text."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from llmirc.server.app import APIError  # noqa: E402
from llmirc.server.tool_calls import ToolChoice, template_tool_calls  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
         {"type": "function", "function": {"name": "now"}}]


def _calls(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


@pytest.mark.parametrize("tools,choice,parser,needle", [
    (None, "auto", "hermes", "tool_choice needs tools"),
    (TOOLS, "auto", None, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'),
    (TOOLS, None, None, '"auto" tool choice requires'),  # (auto: the default with tools, as OpenAI's)
    (TOOLS, {"type": "function", "function": {"name": "mul"}}, None, "names 'mul', which is not one of the tools"),
    (TOOLS, {"type": "function"}, None, "tool_choice must be none, auto, required or"),
    (TOOLS, "always", None, "tool_choice must be none, auto, required or"),
    ([{"type": "function", "function": {"parameters": {}}}], "required", None, "tools[0] must be"),
    ([{"type": "code_interpreter"}], "required", None, "tools[0] must be"),
])
def test_bad_tool_choices_are_named(tools, choice, parser, needle):
    with pytest.raises(APIError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ToolChoice.of(tools, choice, parser)


def test_none_named_and_required():
    assert ToolChoice.of(TOOLS, "none", None).kind == ToolChoice.of(None, None, None).kind == "none"
    named = ToolChoice.of(TOOLS, {"type": "function", "function": {"name": "add"}}, None)
    assert named.schema == TOOLS[0]["function"]["parameters"]
    message, reason = named.message('{"x": 3}', "stop")
    assert message["content"] == "" and _calls(message) == [("add", {"x": 3})] and reason == "stop"
    first = message["tool_calls"][0]
    assert first["id"].startswith("chatcmpl-tool-") and first["type"] == "function"
    required = ToolChoice.of(TOOLS, "required", None)
    assert [item["properties"]["name"]["enum"] for item in required.schema["items"]["anyOf"]] == [["add"], ["now"]]
    assert required.schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert all(item["additionalProperties"] is False for item in required.schema["items"]["anyOf"])  # (ours)
    message, reason = required.message('[{"name": "add", "parameters": {"x": 1}}, {"name": "now", "parameters": {}}]',
                                       "stop")
    assert _calls(message) == [("add", {"x": 1}), ("now", {})] and reason == "tool_calls"
    assert required.message('[{"name": "add", "para', "length") == ({"content": '[{"name": "add", "para'}, "length")


HERMES = [
    ("plain answer, no call", "plain answer, no call", [], "stop"),
    ('<tool_call>\n{"name": "add", "arguments": {"x": 2}}\n</tool_call>', None, [("add", {"x": 2})], "tool_calls"),
    ('Let me add. <tool_call>{"name": "add", "arguments": {"x": 2}}</tool_call>\n<tool_call>{"name": "now", '
     '"arguments": {}}</tool_call>', "Let me add. ", [("add", {"x": 2}), ("now", {})], "tool_calls"),
    ('<tool_call>{"name": "now"}', None, [("now", {})], "tool_calls"),  # (unclosed at the end: still a call)
    ('x <tool_call>{"name": "add", "arguments": {"x": 2}</tool_call>', 'x <tool_call>{"name": "add", "arguments": '
     '{"x": 2}</tool_call>', [], "stop"),  # (not JSON: the text is the answer, as vLLM's)
    ("a <tool_ca", "a <tool_ca", [], "stop"),
]
LLAMA3 = [
    ('{"name": "add", "parameters": {"x": 5}}', None, [("add", {"x": 5})], "tool_calls"),
    ('{"name": "add", "parameters": {"x": 5}}; {"name": "now", "arguments": {}}', None,
     [("add", {"x": 5}), ("now", {})], "tool_calls"),
    ("The answer is 5.", "The answer is 5.", [], "stop"),
    ('{"name": "add", "parameters": {"x": 5}} and more', '{"name": "add", "parameters": {"x": 5}} and more', [],
     "stop"),
    ('{"nam', '{"nam', [], "stop"),
]


@pytest.mark.parametrize("parser,text,content,calls,reason",
                         [("hermes", *case) for case in HERMES] + [("llama3_json", *case) for case in LLAMA3])
def test_auto_parsers_and_their_streams(parser, text, content, calls, reason):
    """The plain answer, and the deltas of the same text streamed in random pieces: the content adds up to
    the answer's (None as nothing), the calls are the answer's, the finish_reason too."""
    choice = ToolChoice.of(TOOLS, "auto", parser)
    message, got = choice.message(text, "stop")
    assert (message["content"], _calls(message), got) == (content, calls, reason)
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream, streamed, deltas = choice.stream(), "", []
        for k, piece in enumerate(pieces):
            delta, got = stream.feed(piece, k == len(pieces) - 1, "stop")
            streamed += delta.get("content", "")
            deltas.append(delta)
        assert streamed == (content or "") and got == reason
        tool_deltas = [t for d in deltas for t in d.get("tool_calls", [])]
        assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in tool_deltas] == calls
        assert [t["index"] for t in tool_deltas] == list(range(len(calls)))


def test_a_named_calls_arguments_stream_as_written():
    choice = ToolChoice.of(TOOLS, {"type": "function", "function": {"name": "add"}}, None)
    stream = choice.stream()
    deltas = [stream.feed(piece, done, "stop")[0] for piece, done in (("", False), ('{"x"', False), ("", False),
                                                                       (": 4}", True))]
    assert deltas[0] == {} and deltas[2] == {}
    first, last = deltas[1]["tool_calls"][0], deltas[3]["tool_calls"][0]
    assert first["function"] == {"name": "add", "arguments": '{"x"'} and first["id"].startswith("chatcmpl-tool-")
    assert last == {"index": 0, "function": {"arguments": ": 4}"}}
    assert choice.stream().feed("", True, "length")[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}


def test_an_assistants_tool_calls_reach_the_template_with_dict_arguments():
    """As vLLM (and transformers' templates) take them: arguments parsed; not JSON or not an object -> {}."""
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "add", "arguments": '{"x": 3}'}},
        {"id": "b", "type": "function", "function": {"name": "add", "arguments": "{broken"}},
        {"id": "c", "function": {"name": "now", "arguments": "[1]"}},
        {"id": "d", "type": "function", "function": {"name": "now", "arguments": ""}}]}
    template_tool_calls(message, 1)
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == [{"x": 3}, {}, {}, {}]
    empty = {"role": "assistant", "content": "hi", "tool_calls": []}
    template_tool_calls(empty, 0)
    assert empty == {"role": "assistant", "content": "hi"}
    with pytest.raises(APIError, match=r"messages\[2\].tool_calls: each must be"):
        template_tool_calls({"role": "assistant", "tool_calls": [{"type": "code"}]}, 2)


def test_a_tools_objects_are_closed():
    """A forced call's grammar (named, required) takes no property a tool's parameters do not list, nested
    objects too, as vLLM's default XGrammar backend reads them; additionalProperties given is kept."""
    pytest.importorskip("llguidance")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}}, "c": {"type": "object", "properties": {},
                                                                                  "additionalProperties": True}}}}}]
    named = json.loads(ToolChoice.of(tools, {"type": "function", "function": {"name": "f"}}, None).grammar())
    schema = named["grammars"][0]["json_schema"]
    assert schema["additionalProperties"] is False and schema["properties"]["a"]["additionalProperties"] is False
    assert schema["properties"]["c"]["additionalProperties"] is True
    required = json.loads(ToolChoice.of(tools, "required", None).grammar())["grammars"][0]["json_schema"]
    assert required["items"]["anyOf"][0]["properties"]["parameters"]["additionalProperties"] is False
    assert "additionalProperties" not in tools[0]["function"]["parameters"]  # (the request's own tools unchanged)


def test_serves_flags_list_the_parsers():
    """`serve --tool-call-parser` / `--reasoning-parser` choices (written out: the CLI loads without the serve
    extra) are the parsers the server has."""
    from llmirc.cli import serve
    from llmirc.server import reasoning, tool_calls

    choices = {p.name: list(p.type.choices) for p in serve.params if p.name in ("tool_call_parser", "reasoning_parser")}
    assert choices == {"tool_call_parser": list(tool_calls.PARSERS), "reasoning_parser": list(reasoning.PARSERS)}


def test_required_moves_each_tools_defs_to_the_schemas_root():
    """A tool's parameters with $defs (pydantic's, openai.pydantic_function_tool's) point their $refs at the
    document's root: tool_choice required's array schema holds them there, as vLLM's, and compiles (its
    grammar was an LlmircError, a 500: "Pointer '/$defs/Addr' does not exist"); two tools' different
    definitions of one name are a 400."""
    structured = pytest.importorskip("llmirc.runtime.structured")
    pytest.importorskip("llguidance")
    addr = {"type": "object", "properties": {"zip": {"type": "integer"}}, "required": ["zip"]}
    order = {"type": "function", "function": {"name": "order", "parameters": {
        "$defs": {"Addr": addr}, "type": "object", "properties": {"to": {"$ref": "#/$defs/Addr"}}, "required": ["to"]}}}
    ship = {"type": "function", "function": {"name": "ship", "parameters": {
        "definitions": {"Addr": addr}, "type": "object", "properties": {"a": {"$ref": "#/definitions/Addr"}}}}}
    required = ToolChoice.of([order, ship, TOOLS[1]], "required", None)
    assert required.schema["$defs"] == required.schema["definitions"] == {"Addr": addr}
    assert "$defs" not in required.schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert "$defs" in order["function"]["parameters"]  # (the request's own tools are left as they were)
    structured.grammar("json", required.schema)
    other = {"type": "function", "function": {"name": "other", "parameters": {
        "$defs": {"Addr": {"type": "string"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/Addr"}}}}}
    with pytest.raises(APIError, match="tool 'other': its parameters' \\$defs 'Addr' differs from another tool's"):
        ToolChoice.of([order, other], "required", None)
