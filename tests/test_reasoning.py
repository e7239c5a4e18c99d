"""Reasoning outputs (llmirc/server/reasoning.py): a thinking model's <think> text apart from its
content, whole and streamed in any pieces (the two agree)."""

from __future__ import annotations

import random

import pytest

from llmirc.server.reasoning import Reasoning

CHATML_THINKING = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # (DeepSeek-R1's, Qwen3.5's)
CHATML_NO_THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # (Qwen3 with enable_thinking false)
CHATML = "<|im_start|>assistant\n"

CASES = [  # parser, prompt, generated text, (reasoning, content)
    ("qwen3", CHATML, "<think>\nlet me see</think>\n\nYes.", ("\nlet me see", "\n\nYes.")),
    ("qwen3", CHATML, "Yes.", (None, "Yes.")),
    ("qwen3", CHATML, "<think>still thinking", ("still thinking", None)),
    ("qwen3", CHATML, "<thin", (None, "<thin")),
    ("qwen3", CHATML_THINKING, "hmm</think>Yes.", ("hmm", "Yes.")),
    ("qwen3", CHATML_NO_THINKING, "Yes. <think>", (None, "Yes. <think>")),
    ("qwen3", CHATML, "<think></think>", ("", "")),
    ("deepseek_r1", CHATML, "no tag at all</think>ok", ("no tag at all", "ok")),
    ("deepseek_r1", CHATML, "<think>a</thi", ("a</thi", None)),
    ("deepseek_r1", CHATML_NO_THINKING, "thinking anyway", ("thinking anyway", None)),
]


@pytest.mark.parametrize("parser,prompt,text,want", CASES)
def test_reasoning_apart_from_content_whole_and_streamed(parser, prompt, text, want):
    split = Reasoning.of(parser, prompt)
    assert split.split(text) == want
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream, got = split.stream(), ["", ""]
        for k, piece in enumerate(pieces):
            for j, new in enumerate(stream.feed(piece, k == len(pieces) - 1)):
                got[j] += new
        assert got == [part or "" for part in want], pieces


def test_no_parser_no_split():
    assert Reasoning.of(None, CHATML_THINKING) is None


def test_a_stream_says_whether_the_content_has_begun():
    """ReasoningStream.answering: false while the text thinks (a stream's named tool call then waits for it, and a
    text still thinking at its end has no call, as its plain answer has none), true from </think> on."""
    stream = Reasoning.of("qwen3", CHATML_THINKING).stream()
    assert stream.feed("hmm", False) == ("hmm", "") and not stream.answering
    assert stream.feed("</thi", True) == ("</thi", "") and not stream.answering
    stream = Reasoning.of("qwen3", CHATML_THINKING).stream()
    assert stream.feed("hmm</think>", False) == ("hmm", "") and stream.answering
    assert Reasoning.of("qwen3", CHATML).stream().feed("Yes", True) == ("", "Yes")
