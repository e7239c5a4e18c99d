"""Structured outputs (guided decoding): a request's text held to a JSON schema, a regular expression
or a list of choices, with llguidance (the grammar engine vLLM and SGLang offer as a backend).

The API layers turn a request's format into an llguidance grammar (`grammar`); the engine gives each
such request a matcher (`Guide`) over the bundle's tokenizer: before each sampling, the tokens the
grammar allows from the text so far (`Guide.allowed`: a bool mask over the logits' width; the
others are set to -inf, greedy decoding included); after it, the token consumed. Once the grammar
is complete only the end-of-sequence ids are allowed, and the request ends there (`Guide.ended`).
llguidance is optional (the `serve` extra): a guided request without it is an LlmircError.
"""

from __future__ import annotations

import json
import re

import numpy as np

from llmirc.errors import LlmircError

KINDS = ("json", "regex", "choice")
JSON_OBJECT = {"type": "object"}  # the schema of OpenAI's json_object (vLLM's structured_outputs json_object)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LlmircError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


def grammar(kind: str, spec, compact: bool = False) -> str:
    """The llguidance grammar of one format: kind "json" (a JSON schema, as a dict or its text; JSON_OBJECT
    for OpenAI's json_object; whitespace between tokens allowed, as vLLM's default,
    unless `compact`: vLLM's disable_any_whitespace), "regex" (the whole text matches it) or "choice"
    (the text is one of a list of strings). LlmircError for a spec of the wrong type or not valid."""
    llg = _llguidance()
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise LlmircError(f"the JSON schema is not JSON: {e}") from None
        if not isinstance(spec, (dict, bool)):
            raise LlmircError(f"a JSON schema must be an object, got {type(spec).__name__}")
        if spec is False:
            raise LlmircError("the JSON schema false matches no value")
        try:  # (the schema true is {}: any JSON value; llguidance takes only an object with its options)
            text = llg.LLMatcher.grammar_from_json_schema({} if spec is True else spec,
                                                          defaults={"whitespace_flexible": not compact})
        except (ValueError, TypeError) as e:
            raise LlmircError(f"the json format is not valid: {' '.join(str(e).split())[:300]}") from None
    elif kind == "regex":
        if not isinstance(spec, str):
            raise LlmircError(f"a regular expression must be a string, got {type(spec).__name__}")
        text = llg.LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise LlmircError("choices must be a non-empty list of strings")
        text = llg.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in spec))
    else:
        raise LlmircError(f"unknown structured output kind {kind!r} (known: {', '.join(KINDS)})")
    if problem := llg.LLMatcher.validate_grammar(text):
        raise LlmircError(f"the {kind} format is not valid: {' '.join(problem.split())[:300]}")
    return text


def structured_outputs(spec: dict | None) -> str | None:
    """The grammar of vLLM's `structured_outputs` object: one of {"json": schema}, {"regex": text},
    {"choice": [strings]}, {"json_object": true} (any JSON object), and optionally
    "disable_any_whitespace": true (JSON without whitespace between tokens); None for none.
    LlmircError otherwise."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise LlmircError("structured_outputs must be an object")
    compact = spec.get("disable_any_whitespace", False)
    given = {k: v for k, v in spec.items() if v is not None and v is not False and k != "disable_any_whitespace"}
    if len(given) != 1 or not set(given) <= {*KINDS, "json_object"} or not isinstance(compact, bool):
        raise LlmircError("structured_outputs takes exactly one of json, regex, choice, json_object (and "
                          "disable_any_whitespace: true or false)")
    (kind, value), = given.items()
    if kind in ("json", "json_object"):
        return grammar("json", JSON_OBJECT if kind == "json_object" else value, compact)
    return grammar(kind, value)


class Guide:
    """One request's matcher: which tokens its grammar allows next, and the tokens it has taken."""

    def __init__(self, tokenizer, grammar_text: str):
        """`tokenizer`: `guide_tokenizer`'s; LlmircError when the grammar does not load, or admits no
        text at all (a regex such as [^\\s\\S]: its first mask puts the matcher in error)."""
        self.matcher = _llguidance().LLMatcher(tokenizer, grammar_text, log_level=0)
        self._first = None if self.matcher.is_error() else self.matcher.compute_bitmask()  # (the first step's)
        if self.matcher.is_error():
            problem = " ".join(self.matcher.get_error().split())[:300]
            raise LlmircError(f"the structured output's grammar does not load or admits no text: {problem}")
        self.vocab = tokenizer.vocab_size

    def allowed(self, width: int) -> np.ndarray:
        """bool [width]: the tokens the grammar allows next (ids past the tokenizer's are not)."""
        mask, self._first = self._first or self.matcher.compute_bitmask(), None
        bits = np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")
        out = np.zeros(width, dtype=bool)
        n = min(width, self.vocab, len(bits))
        out[:n] = bits[:n].astype(bool)
        return out

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
