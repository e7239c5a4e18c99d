"""Reasoning outputs: a thinking model's `<think>...</think>` text answered apart from its content, as
vLLM's `--reasoning-parser` does (message.reasoning_content and its newer name message.reasoning;
delta.reasoning_content / reasoning when streamed).

The generated text is reasoning from its start when the rendered prompt ends inside a think block (the
template wrote `<think>` last: DeepSeek-R1's templates, Qwen3.5's), when the text itself starts with
`<think>` (left out of the reasoning), or always with the deepseek_r1 parser (its models may leave the
tag out); it is reasoning up to `</think>` and content after it. A text still thinking when it ends has
no content (null); qwen3's text that does not start thinking is all content (Qwen3 with
enable_thinking false: the template writes an empty think block into the prompt). A structured output
(or a named or required tool choice) holds from after the text's first `</think>` unless the prompt
shows the reasoning over (structured.after_reasoning), as vLLM applies it once reasoning has ended.
"""

from __future__ import annotations

from llmirc.runtime.tokenizer import held_tail

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


class Reasoning:
    """One request's reasoning split (`of`); `split` a whole text, `stream` for streamed pieces."""

    def __init__(self, parser: str, prompt: str):
        self.thinking = parser == "deepseek_r1" or prompt.rfind(START) > prompt.rfind(END)
        # whether the prompt shows the reasoning over (a think block closed last: Qwen3 without thinking);
        # else a structured output holds only after the text's </think> (vLLM: once reasoning has ended)
        self.ended = prompt.rfind(END) > prompt.rfind(START)

    @staticmethod
    def of(parser: str | None, prompt: str) -> Reasoning | None:
        return None if parser is None else Reasoning(parser, prompt)

    def split(self, text: str, final: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole text: None for a part it has not. Not `final`: of a text that
        goes on, only what is sure (a possible start of a tag held back)."""
        if not final and len(text) < len(START) and START.startswith(text):
            return None, None  # (maybe the start of <think>)
        if not (self.thinking or text.startswith(START)):
            return None, text
        reasoning, end, content = text.removeprefix(START).partition(END)
        if not end:
            return (reasoning if final else reasoning[:len(reasoning) - held_tail(reasoning, (END,))]), None
        return reasoning, content

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """A streamed text's new reasoning and content at each piece (`feed`)."""

    def __init__(self, reasoning: Reasoning):
        self.reasoning, self.text, self.sent = reasoning, "", [0, 0]
        self.answering = False  # (whether the content has begun: a text still thinking at its end has none)

    def feed(self, piece: str, done: bool = False) -> tuple[str, str]:
        """(new reasoning, new content) once `piece` is added; `done`: the text's end."""
        self.text += piece
        parts = self.reasoning.split(self.text, final=done)
        self.answering = parts[1] is not None
        parts = [p or "" for p in parts]
        new = [part[sent:] for part, sent in zip(parts, self.sent)]
        self.sent = [max(sent, len(part)) for part, sent in zip(parts, self.sent)]
        return new[0], new[1]
