"""Structured outputs (llmirc/runtime/structured.py, llguidance): a random model's text held to a
JSON schema, a regular expression or a list of choices through the loader, and bad formats named."""

from __future__ import annotations

import json
import re

import pytest

from helpers import make_checkpoint, make_tokenizer
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import LlmircError, RequestError
from llmirc.runtime import load, structured

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    make_checkpoint(root / "ckpt", "llama", tokenizer=True)
    compile_model(root / "ckpt", root / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    with load(root / "m.llmir", kv_cache_tokens=2048) as m:
        yield m


def _texts(model, spec, **kw):
    prompts = ["the quick brown", "hello", "a small test"]
    outs = {}
    for event in model.generate_stream(prompts, 80, structured_outputs=spec, **kw):
        text, reason = outs.get(event.request_id, ("", None))
        outs[event.request_id] = (text + event.text, event.finish_reason or reason)
    return [outs[i] for i in range(len(prompts))]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=3)])
def test_the_text_follows_the_format(model, sampling):
    """Every output, greedy and sampled, is one of the choices / matches the regex whole / is a JSON
    object of the schema; each ends at the grammar's end (finish_reason stop: the end-of-sequence id is
    then the one token allowed), none cut by length, though the random model alone writes no such text."""
    free = [t for t, _ in _texts(model, None, ignore_eos=True)]
    assert not any(t in ("yes", "no") for t in free)
    for text, reason in _texts(model, {"choice": ["yes", "no", "maybe not"]}, **sampling):
        assert text in ("yes", "no", "maybe not") and reason == "stop"
    for text, reason in _texts(model, {"regex": r"[a-c]{2,4}-[0-9]{3}"}, **sampling):
        assert re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", text) and reason == "stop", text
    # (JSON without whitespace: a random model would write spaces to max_tokens, as the grammar allows)
    for text, reason in _texts(model, {"json": SCHEMA, "disable_any_whitespace": True}, **sampling):
        assert reason == "stop" and not re.search(r"\s", text), text
        value = json.loads(text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 22, 333)
    for text, reason in _texts(model, {"json_object": True}, **sampling):
        assert reason in ("stop", "length") and text.lstrip().startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_ignore_eos_still_ends_at_the_grammars_end(model):
    for text, reason in _texts(model, {"choice": ["yes", "no"]}, ignore_eos=True):
        assert text in ("yes", "no") and reason == "stop"


def test_the_grammars_end_wins_over_min_tokens(model):
    """min_tokens past the grammar's end: the end-of-sequence ids, the only ones the grammar then allows,
    were held too, and a token neither allowed (id 0 of a row all -inf) ended the request."""
    eos = set(model.engine.scheduler.eos_token_ids)
    for sampling in (dict(), dict(temperature=1.0, seed=3)):
        events = list(model.generate_stream(["the quick brown", "hello"], 20, min_tokens=10,
                                            structured_outputs={"choice": ["yes", "no"]}, **sampling))
        for i in range(2):
            mine = [e for e in events if e.request_id == i]
            assert "".join(e.text for e in mine) in ("yes", "no") and mine[-1].finish_reason == "stop"
            assert mine[-1].token in eos and len(mine) < 10


@pytest.mark.parametrize("spec,needle", [
    ({"regex": "(yes|no"}, "regex format is not valid"),
    ({"regex": r"[^\s\S]"}, "the grammar matches no text"),  # (valid, none matches it: a 400, not an empty answer)
    ({"json": "{not json"}, "JSON schema is not JSON"),
    ({"json": [1, 2]}, "JSON schema must be an object"),
    ({"json": {"enum": {1, 2}}}, "JSON schema is not JSON: Object of type set"),  # (llguidance's ValueError)
    ({"structural_tag": {"structures": [{"begin": "<f>", "schema": {"enum": {1}}, "end": "</f>"}], "triggers": ["<f"]}},
     "JSON schema is not JSON: Object of type set"),  # (its TypeError)
    ({"json": "false"}, "the JSON schema false matches no value"),
    ({"choice": []}, "non-empty list of strings"),
    ({"choice": ["a", 3]}, "non-empty list of strings"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({"grammar": "start: x"}, 'grammar format is not valid: at 1(8): unknown name: "x"'),
    ({"grammar": "root ::= ("}, "grammar format is not valid: Failed to convert the grammar from GBNF"),
    ({"grammar": ["root ::= 'a'"]}, "a grammar must be a string, got list"),
    ({"structural_tag": '{"structures": [], "triggers": ["<f"]}'}, "a structural tag must be"),
    ({"structural_tag": {"structures": [{"begin": "<g>", "schema": {}, "end": ""}], "triggers": ["<f"]}},
     "begin '<g>' starts with none of its triggers"),
    ({"json": {}, "whitespace_pattern": "[ ]("}, "json format is not valid: regex parse error"),
    ({"json": {}, "whitespace_pattern": 3}, "whitespace_pattern must be a string"),
    ({"json": {}, "disable_any_whitespace": "yes"}, "disable_any_whitespace must be true or false"),
    ({"json": {}, "backend": "xgrammar"}, "structured_outputs has no field 'backend'"),
    ({}, "exactly one of"),
])
def test_bad_formats_are_named(model, spec, needle):
    with pytest.raises(LlmircError, match=re.escape(needle)):
        list(model.generate_stream(["hi"], 4, structured_outputs=spec))


@pytest.mark.parametrize("closed", [False, True])
def test_a_schema_that_holds_itself_is_named(model, closed):
    """A Python dict that holds itself (JSON has no such value): llguidance's reader crashed the process."""
    schema = {"type": "object"}
    schema["properties"] = {"child": schema}
    with pytest.raises(LlmircError, match="JSON schema is not JSON: Circular reference detected"):
        model.generate_stream(["hi"], 4, structured_outputs={"json": schema, "disable_additional_properties": closed})


def _accepts(model, grammar, text: str) -> bool:
    """Whether the grammar's matcher takes the text's tokens, each allowed in turn, and is then complete."""
    guide = structured.Guide(model.engine._guides(), grammar)
    for token in model.encode(text)[1:]:  # (the tokenizer's BOS left out)
        if not guide.allowed(model.vocab_size)[token]:
            return False
        guide.consume(token)
    return guide.matcher.is_accepting()


def test_grammars_in_ebnf_and_lark(model):
    """vLLM's structured_outputs grammar / guided_grammar and SGLang's ebnf: EBNF (GBNF's and XGrammar's
    `root ::=`, character classes, repetition counts, comments) or Lark; the text is one the grammar makes."""
    ebnf = 'root ::= word "-" [0-9]{2,3} # a comment\nword ::= "ab" | "cd" [xy]?'
    for spec in ({"grammar": ebnf}, {"grammar": 'start: ("ab" | "cdx") "-" /[0-9]{2,3}/'}):
        for sampling in (dict(), dict(temperature=1.0, seed=5)):
            for text, reason in _texts(model, spec, **sampling):
                assert re.fullmatch(r"(ab|cd[xy]?)-[0-9]{2,3}", text) and reason == "stop", (spec, text)
    g = structured.grammar("grammar", ebnf)
    assert _accepts(model, g, "cdy-123") and not _accepts(model, g, "cdy-1234") and not _accepts(model, g, "ef-12")


def test_json_options(model):
    """whitespace_pattern (the whitespace between JSON's tokens), disable_additional_properties (objects
    with properties take no others: vLLM's walk of the schema) and disable_any_whitespace."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {}}}}
    spec = {"json": schema, "whitespace_pattern": " ?", "disable_additional_properties": True}
    for text, reason in _texts(model, spec, temperature=1.0, seed=2):
        assert reason == "stop" and not re.search(r"[^ \S]|  ", text), text  # (single spaces only)
        value = json.loads(text)
        assert set(value) <= {"a", "b"} and (not isinstance(value.get("b"), dict) or value["b"] == {}), text
    closed = structured.grammar("json", schema, structured.JsonOptions(closed=True))
    assert not _accepts(model, closed, '{"c": 1}') and _accepts(model, closed, '{"a": 1, "b": {}}')
    assert _accepts(model, structured.grammar("json", schema), '{"c": 1}')  # (JSON Schema's default: open)
    assert not _accepts(model, structured.grammar("json", schema, structured.JsonOptions(compact=True)), '{"a": 1 }')
    assert not _accepts(model, structured.grammar("json", schema, structured.JsonOptions(whitespace="")), '{ }')
    assert structured._closed({"anyOf": [{"properties": {}}, {"properties": {}, "additionalProperties": True}]}) == \
        {"anyOf": [{"properties": {}, "additionalProperties": False}, {"properties": {}, "additionalProperties": True}]}


def test_structural_tags(model):
    """vLLM's and SGLang's structural tags: free text, but once a trigger is written, one of its structures:
    begin, a JSON value of the schema, end."""
    tag = {"structures": [{"begin": "<fn=add>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                          "required": ["x"], "additionalProperties": False},
                           "end": "</fn>"}],
           "triggers": ["<fn="]}
    g = structured.structured_outputs({"structural_tag": json.dumps(tag), "disable_any_whitespace": True})
    assert _accepts(model, g, 'sum: <fn=add>{"x":12}</fn> done')
    assert _accepts(model, g, "no call at all")
    assert not _accepts(model, g, "<fn=mul>") and not _accepts(model, g, '<fn=add>{"y":1}</fn>')
    assert not _accepts(model, g, '<fn=add>{"x": 1}</fn>')  # (compact)
    # a trigger <...>: text, as XGrammar reads it (llguidance's own default takes it for a special token)
    g = structured.grammar("structural_tag", {"structures": [{"begin": "<f>", "schema": {"enum": [1]}, "end": ""}],
                                              "triggers": ["<f>"]})
    assert _accepts(model, g, "a <f>1 b") and not _accepts(model, g, "a <f>2")


def test_a_format_after_the_reasoning(model):
    """structured.after_reasoning: any text up to the first </think>, then the format (the reasoning
    parser's requests on a thinking prompt, as vLLM applies the format once reasoning has ended)."""
    for inner, answer in ((structured.grammar("regex", "yes|no"), "yes"),
                          (structured.grammar("grammar", 'root ::= "x" [0-9]'), "x1"),
                          (structured.grammar("json", {"enum": [1]}), "1")):
        g = structured.after_reasoning(inner)
        assert _accepts(model, g, "<think>{any: thing}</think>" + answer) and _accepts(model, g, "</think>" + answer)
        assert not _accepts(model, g, answer) and not _accepts(model, g, "a</think>b</think>" + answer)


def test_the_schemas_true_and_empty_are_any_json_value(model):
    """The JSON schema true (a 500 on the server: llguidance's ValueError) and {} take any JSON value, as
    in JSON Schema and vLLM; json_object an object (false was taken as json_object: a 400 now)."""
    assert structured.grammar("json", True) == structured.grammar("json", "true") == structured.grammar("json", {})
    assert structured.grammar("json", {}) != structured.structured_outputs({"json_object": True})
    for text, reason in _texts(model, {"json": True, "disable_any_whitespace": True}):
        assert reason in ("stop", "length")
        if reason == "stop":
            json.loads(text)


def test_a_grammar_needs_the_tokenizer(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "llama")
    compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    with load(tmp_path / "m.llmir") as m, pytest.raises(LlmircError, match="need a tokenizer"):
        list(m.generate_stream([[1, 2]], 4, structured_outputs={"choice": ["a"]}))
    assert structured.structured_outputs(None) is None


def test_a_tokenizer_larger_than_the_vocabulary_is_named(tmp_path):
    """A tokenizer with more ids than the model's logits: llguidance's tokenizer cannot be made; that was
    a ValueError on the engine's thread, which ended it (the server's requests all hung after it)."""
    make_checkpoint(tmp_path / "ckpt", "llama", vocab_size=256)
    make_tokenizer(tmp_path / "ckpt", 384)
    compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    with load(tmp_path / "m.llmir") as m:
        m.engine.start()
        with pytest.raises(LlmircError, match="tokenizer does not fit the model: vocab size too small"):
            list(m.generate_stream([[0, 5, 6]], 4, structured_outputs={"choice": ["a"]}))
        assert [e.token for e in m.generate_stream([[0, 5, 6]], 3, ignore_eos=True)][-1] is not None


def test_allowed_token_ids_that_the_grammar_does_not_allow(model):
    """allowed_token_ids beside a grammar: none that it allows at the start is an LlmircError (a 400; it was an
    empty answer of id 0, a token neither allows); the grammar left with none of them later ends the request
    (finish_reason stop) with the tokens it had, all allowed by both."""
    yes = model.encode("yes")[1:]  # (the tokenizer's BOS left out)
    with pytest.raises(RequestError, match="allowed_token_ids: the structured output allows none of these tokens") \
            as e:
        list(model.generate_stream(["hi"], 4, structured_outputs={"choice": ["yes", "no"]},
                                   allowed_token_ids=model.encode("zzz")[1:]))
    assert e.value.field == "allowed_token_ids"
    for sampling in (dict(), dict(temperature=1.0, seed=2)):
        (text, reason), *_ = _texts(model, {"choice": ["yes", "no"]}, allowed_token_ids=yes[:1], **sampling)
        assert reason == "stop" and text == model.tokenizer.decode(yes[:1]), (text, reason)


@pytest.mark.parametrize("spec", [{"grammar": "root ::= root"}, {"grammar": "start: start"}, {"regex": r"[^\s\S]"}])
def test_a_grammar_that_matches_nothing_is_one_line_naming_the_field(model, spec):
    """A grammar that loads but matches no text: a RequestError of field guided (the server's param is the request's
    field) in one line; it was llguidance's dump of its parser state (NoExtensionBias <state> Tokens: ...)."""
    with pytest.raises(RequestError) as e:
        list(model.generate_stream(["hi"], 4, structured_outputs=spec))
    assert e.value.field == "guided" and str(e.value) == "the grammar matches no text (no token can start it)"
