"""The Responses API's adapter over chat completions (llmirc/server/responses_api.py): a chat answer with
reasoning, text and tool calls as output items, and the same answer's chat chunks as the API's events."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from llmirc.server.responses_api import Responder, ResponseEvents, ResponsesRequest  # noqa: E402


class FakeServer:
    class options:
        served_model_name = "m"

    class model:
        class tokenizer:
            @staticmethod
            def encode(text, add_special_tokens=False):
                return text.split()


USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 2}}
CALL = {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "add", "arguments": '{"x": 1}'}}


def chunk(delta=None, finish=None, usage=None):
    return {"choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": usage}


def without_ids(output):
    return [{k: v for k, v in item.items() if k != "id"} for item in output]


@pytest.mark.parametrize("chunks,message,finish", [
    ([{"role": "assistant", "content": ""}, {"reasoning_content": "let me ", "reasoning": "let me "},
      {"reasoning_content": "think", "reasoning": "think"}, {"content": "Sure."},
      {"tool_calls": [{"index": 0, **CALL}]}],
     {"content": "Sure.", "reasoning_content": "let me think", "tool_calls": [CALL]}, "tool_calls"),
    ([{"role": "assistant", "content": ""}, {"content": "one "}, {"content": "two"}],
     {"content": "one two"}, "length"),
    ([{"role": "assistant", "content": ""}, {"tool_calls": [{"index": 0, **{**CALL, "function": {
        "name": "add", "arguments": '{"x"'}}}]}, {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}],
     {"content": "", "tool_calls": [CALL]}, "stop"),  # (a named call: its arguments in pieces)
    ([{"role": "assistant", "content": ""}], {"content": ""}, "stop"),
    # (still thinking at its end: the plain answer's empty message, streamed too)
    ([{"role": "assistant", "content": ""}, {"reasoning_content": "hmm", "reasoning": "hmm"}],
     {"content": None, "reasoning_content": "hmm"}, "length"),
])
def test_streamed_events_add_up_to_the_plain_response(chunks, message, finish):
    req = ResponsesRequest.model_validate({"input": "hi", "stream": True})
    plain = Responder(FakeServer, req).of_chat({"choices": [{"message": message, "finish_reason": finish}],
                                                "usage": USAGE})
    events = ResponseEvents(Responder(FakeServer, req))
    out = events.start()
    for i, delta in enumerate(chunks):
        out += events.feed(chunk(delta, finish if i == len(chunks) - 1 else None))
    out += events.feed(chunk(usage=USAGE))
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    final = out[-1]["response"]
    assert out[-1]["type"] == f"response.{plain['status']}" and final["status"] == plain["status"]
    assert without_ids(final["output"]) == without_ids(plain["output"]) and final["usage"] == plain["usage"]
    # (the item max_output_tokens cut is incomplete, as OpenAI marks it; the others completed)
    assert [item["status"] for item in plain["output"]][-1] == ("incomplete" if finish == "length" else "completed")
    kinds = [e["type"] for e in out]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == len(plain["output"])
    texts = "".join(e["delta"] for e in out if e["type"] == "response.output_text.delta")
    assert texts == (message["content"] or "")
    reasoning_tokens = len(message.get("reasoning_content", "").split())  # (FakeServer's tokenizer: words)
    assert plain["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 9,
                              "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                              "total_tokens": 14}
    calls = [item for item in plain["output"] if item["type"] == "function_call"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == \
        [(CALL["id"], "add", '{"x": 1}')] * ("tool_calls" in message)


def test_an_error_in_the_stream_is_an_error_event_and_a_failed_response():
    events = ResponseEvents(Responder(FakeServer, ResponsesRequest.model_validate({"input": "hi"})))
    error, failed = events.feed({"error": {"message": "engine failed", "code": 503, "param": None}})
    assert error == {"type": "error", "sequence_number": 0, "code": "503", "message": "engine failed", "param": None}
    assert failed["type"] == "response.failed" and failed["sequence_number"] == 1
    assert failed["response"]["status"] == "failed" and failed["response"]["error"] == {"code": "503",
                                                                                       "message": "engine failed"}


@pytest.mark.parametrize("body,message", [
    ({"tools": [{"type": "function", "parameters": {"type": "object"}}]},
     "tools[0]: a function tool is {type: function, name, parameters}"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "f"}]}},
     "tool_choice of type 'allowed_tools' is not supported by llmirc"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}},  # (the chat API's form)
     "tool_choice must be none, auto, required or {type: function, name}"),
    ({"tool_choice": "any"}, "tool_choice must be none, auto, required or {type: function, name}"),
    # (logprobs are asked for, and were answered as [] rather than refused)
    ({"top_logprobs": 2}, "top_logprobs is not supported by llmirc"),
    ({"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]},
     "include: message.output_text.logprobs is not supported by llmirc"),
])
def test_what_llmirc_cannot_answer_is_refused(body, message):
    """A bad tool or tool choice is a 400 that shows the Responses API's (flat) form, not the chat route's; a
    request for logprobs is a 400."""
    from llmirc.server.app import APIError
    from llmirc.server.responses_api import chat_request

    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with pytest.raises(APIError) as e:
        chat_request(ResponsesRequest.model_validate({"input": "hi", "tools": tools, **body}))
    assert e.value.status == 400 and message in e.value.message, e.value.message


def test_truncation_auto_is_taken():
    """truncation "auto" (some agent frameworks' default) is taken, and echoed: it changes nothing while the
    input fits; past the context the request is refused as with "disabled" (the chat route's 400)."""
    from llmirc.server.app import APIError
    from llmirc.server.responses_api import chat_request

    for truncation in ("auto", "disabled"):
        req = ResponsesRequest.model_validate({"input": "hi", "truncation": truncation})
        assert chat_request(req).messages[0].content == "hi"
        assert Responder(FakeServer, req).response([], "stop", None)["truncation"] == truncation
    with pytest.raises(APIError, match="truncation is not supported by llmirc"):
        chat_request(ResponsesRequest.model_validate({"input": "hi", "truncation": "middle"}))


def test_a_named_tool_choice_is_the_chat_routes():
    from llmirc.server.responses_api import chat_request

    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    chat = chat_request(ResponsesRequest.model_validate({"input": "hi", "tools": tools,
                                                         "tool_choice": {"type": "function", "name": "f"}}))
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}


def test_a_developer_message_is_a_system_message():
    """(chat templates know system, not developer: Qwen2.5's dropped the message, SmolLM2's wrote a role its model
    never saw)"""
    from llmirc.server.responses_api import chat_request

    chat = chat_request(ResponsesRequest.model_validate({"input": [
        {"role": "developer", "content": "be brief"}, {"type": "message", "role": "user", "content": "hi"}]}))
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"), ("user", "hi")]


def test_instructions_and_system_messages_are_one_system_message_first():
    """instructions and every system or developer item are merged into one system message ahead of the rest, as
    vLLM's Responses API does (they were two system messages, or one after the first turn: Qwen3.5's template
    refuses both); empty instructions add nothing, as in vLLM."""
    from llmirc.server.responses_api import chat_request

    chat = chat_request(ResponsesRequest.model_validate({"instructions": "be brief", "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "answer in French"}]},
        {"type": "message", "role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"},
        {"role": "system", "content": "no emoji"}, {"role": "user", "content": "again"}]}))
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "be brief\n\nanswer in French\n\nno emoji"), ("user", "hi"), ("assistant", "salut"),
        ("user", "again")]
    chat = chat_request(ResponsesRequest.model_validate({"instructions": "", "input": "hi"}))
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hi")]
