"""Structured outputs (guided decoding): a request's text held to a JSON schema, a regular expression,
a list of choices, a context-free grammar or structural tags, with llguidance (the grammar engine vLLM
and SGLang offer as a backend).

The API layers turn a request's format into an llguidance grammar (`grammar`); the engine gives each
such request a matcher (`Guide`) over the bundle's tokenizer: before each sampling, the tokens the
grammar allows from the text so far (`Guide.allowed`: a bool mask over the logits' width; the
others are set to -inf, greedy decoding included); after it, the token consumed. Once the grammar
is complete only the end-of-sequence ids are allowed, and the request ends there (`Guide.ended`).
llguidance is optional (the `serve` extra): a guided request without it is an LlmircError.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import numpy as np

from llmirc.errors import LlmircError

KINDS = ("json", "regex", "choice", "grammar", "structural_tag")
JSON_OBJECT = {"type": "object"}  # the schema of OpenAI's json_object (vLLM's structured_outputs json_object)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LlmircError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class JsonOptions:
    """How a JSON format is written, as vLLM's StructuredOutputsParams options. `compact`
    (disable_any_whitespace): no whitespace between JSON's tokens, where by default any is allowed;
    `whitespace` (whitespace_pattern): a regular expression for the whitespace allowed there instead;
    `closed` (disable_additional_properties): an object schema with properties or patternProperties
    and no additionalProperties takes no other properties (JSON Schema's default takes any)."""

    compact: bool = False
    whitespace: str | None = None
    closed: bool = False


def _closed(schema):
    """The schema with additionalProperties false wherever (properties or patternProperties) leave it out."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_schema(spec, options: JsonOptions) -> dict:
    """A JSON schema (a dict, true, or their text) as llguidance takes it: a dict, with the options as its
    x-guidance defaults (the schema's own x-guidance wins, as llguidance's defaults do)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise LlmircError(f"the JSON schema is not JSON: {e}") from None
    if not isinstance(spec, (dict, bool)):
        raise LlmircError(f"a JSON schema must be an object, got {type(spec).__name__}")
    if spec is False:
        raise LlmircError("the JSON schema false matches no value")
    try:  # (a set or bytes raised llguidance's TypeError or ValueError; a dict that holds itself crashed it)
        json.dumps(spec)
    except (TypeError, ValueError) as e:
        raise LlmircError(f"the JSON schema is not JSON: {e}") from None
    schema = {} if spec is True else (_closed(spec) if options.closed else copy.deepcopy(spec))  # (true: any value)
    given = schema.get("x-guidance", {})
    if not isinstance(given, dict):
        raise LlmircError("the JSON schema's x-guidance must be an object")
    defaults = {"whitespace_flexible": not options.compact}
    if options.whitespace is not None:
        if not isinstance(options.whitespace, str):
            raise LlmircError(f"whitespace_pattern must be a string, got {type(options.whitespace).__name__}")
        defaults["whitespace_pattern"] = options.whitespace
    schema["x-guidance"] = {**defaults, **given}
    return schema


def _structural_tags(spec, options: JsonOptions) -> str:
    """The Lark grammar of vLLM's and SGLang's structural tags ({"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}, as an object or its text): free text, in which a trigger starts the structure whose
    begin it prefixes, its JSON and its end, then free text again."""
    llg = _llguidance()
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise LlmircError(f"the structural tag is not JSON: {e}") from None
    structures, triggers = (spec.get("structures"), spec.get("triggers")) if isinstance(spec, dict) else (None, None)
    if not (isinstance(structures, list) and structures and isinstance(triggers, list) and triggers
            and all(isinstance(t, str) and t for t in triggers)
            and all(isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                    and "schema" in s for s in structures)):
        raise LlmircError('a structural tag must be {"structures": [{"begin": str, "schema": JSON schema, '
                          '"end": str}, ...], "triggers": [non-empty str, ...]} (the "format" form is not supported)')
    tags = []
    for s in structures:
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise LlmircError(f"the structural tag's begin {s['begin']!r} starts with none of its triggers")
        tags.append(llg.StructTag(trigger=trigger, begin=s["begin"], grammar=_json_schema(s["schema"], options),
                                  end=s["end"]))
    return llg.StructTag.to_grammar(tags, assume_special=False)  # (triggers are text, as XGrammar reads them)


def grammar(kind: str, spec, options: JsonOptions = JsonOptions()) -> str:
    """The llguidance grammar of one format: kind "json" (a JSON schema, as a dict, true, or their text;
    JSON_OBJECT for OpenAI's json_object; written as `options` say), "regex" (the whole text matches it),
    "choice" (the text is one of a list of strings), "grammar" (a context-free grammar in EBNF, as
    llama.cpp's GBNF and XGrammar's `root ::= ...`, or in llguidance's Lark, `start: ...`; vLLM's
    guided_grammar, SGLang's ebnf; XGrammar's lookahead assertions are not read) or "structural_tag"
    (`_structural_tags`). LlmircError for a spec of the wrong type or not valid."""
    llg = _llguidance()
    if kind == "json":
        text = llg.LLMatcher.grammar_from_json_schema(_json_schema(spec, options))
    elif kind in ("regex", "grammar"):
        if not isinstance(spec, str):
            raise LlmircError(f"a {'regular expression' if kind == 'regex' else kind} must be a string, "
                              f"got {type(spec).__name__}")
        try:
            text = llg.grammar_from(kind, spec)
        except ValueError as e:  # (the EBNF reader's)
            raise LlmircError(f"the {kind} format is not valid: {' '.join(str(e).split())[:300]}") from None
    elif kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise LlmircError("choices must be a non-empty list of strings")
        text = llg.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in spec))
    elif kind == "structural_tag":
        text = _structural_tags(spec, options)
    else:
        raise LlmircError(f"unknown structured output kind {kind!r} (known: {', '.join(KINDS)})")
    if problem := llg.LLMatcher.validate_grammar(text):
        raise LlmircError(f"the {kind} format is not valid: {' '.join(problem.split())[:300]}")
    return text


def after_reasoning(grammar_text: str, end: str = "</think>") -> str:
    """`grammar_text` (an llguidance grammar) held from after the first `end` on, any text before it: a
    thinking model's reasoning is free and its answer follows the format, as vLLM applies a structured
    output once the reasoning has ended."""
    spec = json.loads(grammar_text) if grammar_text.lstrip().startswith("{") else \
        {"grammars": [{"lark_grammar": grammar_text}]}
    name = spec["grammars"][0].setdefault("name", "answer")
    lark = (f"%llguidance {{}}\nstart: thought @{name}\nthought[lazy]: THOUGHT {json.dumps(end)}\n"
            "THOUGHT: /(.|\\n)*/\n")  # (lazy: the thought ends at the first `end`)
    return json.dumps({**spec, "grammars": [{"name": "after_reasoning", "lark_grammar": lark}, *spec["grammars"]]})


OPTIONS = {"disable_any_whitespace": "compact", "whitespace_pattern": "whitespace",
           "disable_additional_properties": "closed"}


def structured_outputs(spec: dict | None) -> str | None:
    """The grammar of vLLM's `structured_outputs` object: one of {"json": schema}, {"regex": text},
    {"choice": [strings]}, {"grammar": EBNF or Lark}, {"structural_tag": tags}, {"json_object": true}
    (any JSON object), with `OPTIONS` (JsonOptions') and disable_fallback (no effect: llguidance is the one
    backend); None for none. LlmircError otherwise, naming an unknown key."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise LlmircError("structured_outputs must be an object")
    if unknown := set(spec) - {*KINDS, "json_object", *OPTIONS, "disable_fallback"}:
        raise LlmircError(f"structured_outputs has no field {sorted(unknown)[0]!r}")
    for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
        if not isinstance(spec.get(name, False), bool):
            raise LlmircError(f"structured_outputs.{name} must be true or false")
    options = JsonOptions(**{field: spec[name] for name, field in OPTIONS.items() if spec.get(name) is not None})
    given = {k: v for k, v in spec.items() if k in (*KINDS, "json_object") and v is not None and v is not False}
    if len(given) != 1:
        raise LlmircError(f"structured_outputs takes exactly one of {', '.join(KINDS)}, json_object")
    (kind, value), = given.items()
    if kind == "json_object":
        return grammar("json", JSON_OBJECT, options)
    return grammar(kind, value, options)


class Guide:
    """One request's matcher: which tokens its grammar allows next, and the tokens it has taken."""

    def __init__(self, tokenizer, grammar_text: str):
        """`tokenizer`: `guide_tokenizer`'s; LlmircError when the grammar does not load (llguidance's first
        line of why), or matches no text at all (a regex such as [^\\s\\S], an EBNF `root ::= root`: its first
        mask puts the matcher in error, with a dump of llguidance's parser state that says nothing to a client)."""
        self.matcher = _llguidance().LLMatcher(tokenizer, grammar_text, log_level=0)
        if self.matcher.is_error():
            problem = (self.matcher.get_error().strip().splitlines() or ["?"])[0][:200]
            raise LlmircError(f"the grammar does not load: {problem}")
        self._first = self.matcher.compute_bitmask()  # (the first step's)
        if self.matcher.is_error():
            raise LlmircError("the grammar matches no text (no token can start it)")
        self.vocab = tokenizer.vocab_size

    def _bits(self, mask: bytes) -> np.ndarray:
        """bool [at most the tokenizer's ids]: an llguidance bitmask's bits."""
        return np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:self.vocab].astype(bool)

    def allowed(self, width: int) -> np.ndarray:
        """bool [width]: the tokens the grammar allows next (ids past the tokenizer's are not)."""
        mask, self._first = self._first or self.matcher.compute_bitmask(), None
        bits, out = self._bits(mask), np.zeros(width, dtype=bool)
        out[:min(width, len(bits))] = bits[:width]
        return out

    def allows_first(self, ids) -> bool:
        """Whether the grammar allows any of `ids` as the text's first token (before `allowed` is asked)."""
        bits = self._bits(self._first)
        return any(0 <= t < len(bits) and bits[t] for t in ids)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))

    def ended(self, token: int, eos_ids) -> bool:
        """Whether the request ends at `token`, just consumed, though the scheduler did not end it: the
        matcher broke, or the grammar was complete and `token` is an end-of-sequence id (ignore_eos)."""
        return self.matcher.is_error() or (self.matcher.is_stopped() and token in eos_ids)


def guide_tokenizer(tokenizer, vocab_size: int, eos_ids) -> object:
    """llguidance's tokenizer over a llmirc Tokenizer's tokenizer.json: `vocab_size` the logits' width,
    `eos_ids` the ids that end a sequence (what a complete grammar allows). About 0.3 s for a 49k
    vocabulary: made once per engine."""
    return _llguidance().LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids))
