"""Chat templates: a conversation -> the prompt text, rendered as transformers renders it.

The template is the tokenizer's: `chat_template.jinja` beside tokenizer.json, else the
`chat_template` field of tokenizer_config.json (a string, or a list of named templates of which
"default" is used, "tool_use" when tools are given and it exists). It is rendered with jinja2's
sandbox exactly as transformers 5's `apply_chat_template(..., tokenize=False)` does:
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension,
`{% generation %}` blocks (transformers marks assistant tokens with them; here they render
their body), a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and the variables
`messages`, `tools`, `documents`, `add_generation_prompt` and the named special tokens
(bos_token, eos_token, ...) as strings. Keys whose value is None are dropped from messages
first. The rendered text holds its special tokens, so it is encoded without adding any more.

jinja2 is an optional dependency (the `serve` extra): imported only when a template is rendered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

from llmirc.errors import LlmircError
from llmirc.runtime.tokenizer import readable
from llmirc.small_files import read_small_text

JINJA_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "chat template",
                 tool_source: str | None = None):
        """`source`: the jinja text; `special_tokens`: bos_token, eos_token, ... as strings; `name`
        names the template in errors (its file)."""
        self.source, self.tool_source = source, tool_source
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._compiled: dict[str, object] = {}

    @classmethod
    def from_folder(cls, folder: Path, special_tokens: dict[str, str] | None = None,
                    listed: Collection[str] | None = None) -> ChatTemplate | None:
        """The template of the tokenizer files in `folder`, or None when it has none. `listed`: the
        only file names there that may be read (`Tokenizer.from_bundle_dir`'s); None: any."""
        jinja = readable(folder, JINJA_FILE, listed)
        if jinja is not None:
            return cls(read_small_text(jinja), special_tokens, str(jinja))
        config_file = readable(folder, "tokenizer_config.json", listed)
        if config_file is None:
            return None
        try:
            template = json.loads(read_small_text(config_file)).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise LlmircError(f"{config_file}: cannot read it: {e}") from None
        where = f"{config_file} chat_template"
        if template is None:
            return None
        if isinstance(template, list):  # named templates, as transformers saves several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not isinstance(named.get("default"), str):
                raise LlmircError(f"{where}: a list of named templates needs a 'default' one")
            return cls(named["default"], special_tokens, where, named.get("tool_use"))
        if not isinstance(template, str):
            raise LlmircError(f"{where}: expected a string or a list of named templates")
        return cls(template, special_tokens, where)

    def render(self, messages: list[dict], /, *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, continue_final_message: bool = False, **kwargs) -> str:
        """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]).

        `continue_final_message` leaves the last (assistant) message open, for the model to
        continue it (transformers' semantics). Extra keyword arguments are template variables
        (transformers' `**kwargs`, vLLM's chat_template_kwargs; any name, `self` included). Raises
        LlmircError for an empty conversation, a variable named `messages`, or a template error (its
        message names the template), and when jinja2 is not installed."""
        jinja2 = _jinja2()
        if not isinstance(messages, list):
            raise LlmircError(f"the conversation must be a list of messages ({{'role': ..., 'content': ...}}), "
                              f"got {type(messages).__name__}")
        if not messages:
            raise LlmircError("the conversation is empty: give at least one message")
        if any(not isinstance(m, dict) for m in messages):
            raise LlmircError("each message must be an object with a role and content")
        if "messages" in kwargs:
            raise LlmircError("'messages' cannot be a template variable: the conversation is given as messages")
        if continue_final_message and add_generation_prompt:
            raise LlmircError("continue_final_message and add_generation_prompt cannot both be set")
        # null values left out (templates test `is defined`); a message without content and without
        # tool calls reads as empty text, as vLLM renders a null content (and the server sends it)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        chat = [m if "content" in m or "tool_calls" in m else {**m, "content": ""} for m in chat]
        source = self.tool_source if tools and self.tool_source else self.source
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise LlmircError("continue_final_message needs a final message with text content")
            chat[-1] = {**chat[-1], "content": final + tag}
        variables = {**self.special_tokens, **kwargs}
        budget = _BUDGET.set(_Budget())
        try:
            # one dict, not keywords: a variable may be named like jinja's own parameters ('self')
            chunks = self._template(source).generate({**variables, "messages": chat, "tools": tools,
                                                      "documents": documents,
                                                      "add_generation_prompt": add_generation_prompt})
            text = "".join(_bounded(chunks, jinja2))
        except jinja2.TemplateError as e:
            raise LlmircError(f"{self.name}: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError) as e:
            # the template is the bundle's code: its own errors (1 / 0, range(10**12), endless recursion)
            raise LlmircError(f"{self.name}: rendering failed: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(budget)
        if continue_final_message:
            at = text.rfind(tag.strip())
            if at < 0:
                raise LlmircError(f"{self.name}: the final message does not appear in the rendered chat, so it "
                                  "cannot be continued")
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return text

    def check(self) -> None:
        """Compiles the template(s): LlmircError naming the template and the line of a syntax error
        (or saying jinja2 is not installed)."""
        jinja2 = _jinja2()
        for source in filter(None, (self.source, self.tool_source)):
            try:
                self._template(source)
            except jinja2.TemplateSyntaxError as e:
                raise LlmircError(f"{self.name}: line {e.lineno}: {e.message}") from None

    def _template(self, source: str):
        if source not in self._compiled:
            self._compiled[source] = _environment().from_string(source)
        return self._compiled[source]


def _jinja2():
    """The jinja2 module (an optional dependency: the `serve` extra), or LlmircError saying so."""
    try:
        import jinja2
        import jinja2.compiler
        import jinja2.ext
        import jinja2.runtime
        import jinja2.sandbox
    except ImportError:
        raise LlmircError("chat templates need jinja2: pip install 'llmirc[serve]' (or jinja2)") from None
    return jinja2


MAX_RENDERED = 1 << 24  # characters a rendering may write, items or characters one * may make
MAX_ITERATIONS = 1 << 20  # loop iterations a rendering may run (nested loops multiply)
MAX_SECONDS = 2.0  # a rendering's time (the server renders on its event loop): its loops stop past it


class _Budget:
    """What one rendering may still spend: jinja's sandbox bounds each range() and (here) each *,
    not the loops around them ({% for i in range(99999) %}{% for j in range(99999) %} runs 10^10
    times)."""

    def __init__(self):
        self.iterations, self.deadline = MAX_ITERATIONS, time.monotonic() + MAX_SECONDS

    def spend(self, jinja2) -> None:
        self.iterations -= 1
        if self.iterations < 0 or time.monotonic() > self.deadline:
            raise jinja2.exceptions.SecurityError(f"the template's loops ran more than the sandbox allows "
                                                  f"({MAX_ITERATIONS} iterations, {MAX_SECONDS:g} s)")


_BUDGET: ContextVar[_Budget] = ContextVar("llmirc_chat_template_budget")


def _bounded(chunks, jinja2):
    """`chunks` (a template's output), refused past MAX_RENDERED characters."""
    written = 0
    for chunk in chunks:
        written += len(chunk)
        if written > MAX_RENDERED:
            raise jinja2.exceptions.SecurityError(f"the template wrote more than the sandbox allows "
                                                  f"({MAX_RENDERED} characters)")
        yield chunk


class _Counted:
    """A for loop's iterable, each item charged to the rendering's budget (len() kept, for
    loop.length and loop.last)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        jinja2, budget = _jinja2(), _BUDGET.get()
        for item in self.items:
            budget.spend(jinja2)
            yield item


def _environment():
    jinja2 = _jinja2()
    ImmutableSandboxedEnvironment = jinja2.sandbox.ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class CountedLoops(jinja2.compiler.CodeGenerator):
        """Compiles every {% for %} over `_Counted(iterable)`."""

        def visit_Template(self, node, frame=None):
            for loop in node.find_all(jinja2.nodes.For):
                loop.iter = jinja2.nodes.Filter(loop.iter, "llmirc_counted", [], [], None, None)
            super().visit_Template(node, frame)

    class Sandbox(ImmutableSandboxedEnvironment):
        """jinja's sandbox bounds range() (MAX_RANGE items); this bounds what * and ** make too
        ('x' * 10**10 would take 10 GB, x ** 1000000000 minutes), and the loops (_Budget)."""
        intercepted_binops = frozenset(["*", "**"])
        code_generator_class = CountedLoops

        def call(self, context, obj, *args, **kwargs):
            if isinstance(obj, jinja2.runtime.LoopContext) and args:  # a recursive loop's loop(children)
                args = (_Counted(args[0]), *args[1:])
            return super().call(context, obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 or operator == "*" and any(
                    isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_RENDERED
                    for a, b in ((left, right), (right, left))):
                raise jinja2.exceptions.SecurityError(f"{operator} making more than the sandbox allows")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters["llmirc_counted"] = _Counted
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
