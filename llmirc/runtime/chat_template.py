"""Chat templates: a conversation -> the prompt text, rendered as transformers renders it.

The template is the tokenizer's: `chat_template.jinja` beside tokenizer.json, else the
`chat_template` field of tokenizer_config.json (a string, or a list of named templates of which
"default" is used, "tool_use" when tools are given and it exists). It is rendered with jinja2's
sandbox exactly as transformers 5's `apply_chat_template(..., tokenize=False)` does:
ImmutableSandboxedEnvironment (bounded: jinja_sandbox.py) with trim_blocks and lstrip_blocks, the
loopcontrols extension,
`{% generation %}` blocks (transformers marks assistant tokens with them; here they render
their body), a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and the variables
`messages`, `tools`, `documents`, `add_generation_prompt` and the named special tokens
(bos_token, eos_token, ...) as strings. Keys whose value is None are dropped from messages
first. The rendered text holds its special tokens, so it is encoded without adding any more.

jinja2 is an optional dependency (the `serve` extra): imported only when a template is rendered.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from llmirc.errors import LlmircError
from llmirc.runtime import jinja_sandbox, template_worker
from llmirc.runtime.tokenizer import readable
from llmirc.small_files import parse_json, read_small_text

JINJA_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "chat template",
                 tool_source: str | None = None):
        """`source`: the jinja text; `special_tokens`: bos_token, eos_token, ... as strings; `name`
        names the template in errors (its file)."""
        self.source, self.tool_source = source, tool_source
        self.special_tokens = dict(special_tokens or {})
        self.name = name

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
            template = parse_json(read_small_text(config_file)).get("chat_template")
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
        LlmircError for an empty conversation, a variable named `messages`, variables that are not
        JSON values, a template error or limit (its message names the template; the rendering runs
        in template_worker's child process), and when jinja2 is not installed."""
        _jinja2()
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
            raise LlmircError("continue_final_message and add_generation_prompt cannot both be true, and "
                              "add_generation_prompt is true by default (as in vLLM): set it to false")
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
        variables = {**self.special_tokens, **kwargs, "messages": chat, "tools": tools, "documents": documents,
                     "add_generation_prompt": add_generation_prompt}
        try:
            text = template_worker.render(source, variables)
        except LlmircError as e:
            raise LlmircError(f"{self.name}: {e}") from None
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
                _compiled(source)
            except jinja2.TemplateSyntaxError as e:
                raise LlmircError(f"{self.name}: line {e.lineno}: {e.message}") from None
            except (SyntaxError, RecursionError, MemoryError) as e:  # Python's own limits (21 nested loops)
                raise LlmircError(f"{self.name}: cannot compile it: {type(e).__name__}: {e}") from None


def render_here(source: str, variables: dict) -> str:
    """`source` rendered with `variables` in this process, in the bounded sandbox (template_worker's
    child calls it). Raises LlmircError with the template's failure; MemoryError passes."""
    jinja2 = _jinja2()
    try:
        # one dict, not keywords: a variable may be named like jinja's own parameters ('self')
        return jinja_sandbox.render(_compiled(source), variables)
    except jinja2.TemplateSyntaxError as e:
        raise LlmircError(f"line {e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise LlmircError(f"{type(e).__name__}: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError, SyntaxError) as e:
        # the template is the bundle's code: its own errors (1 / 0, endless recursion, 21 nested loops)
        raise LlmircError(f"rendering failed: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    return _environment().from_string(source)


def _jinja2():
    """The jinja2 module (an optional dependency: the `serve` extra), or LlmircError saying so."""
    try:
        import jinja2
        import jinja2.ext
    except ImportError:
        raise LlmircError("chat templates need jinja2: pip install 'llmirc[serve]' (or jinja2)") from None
    return jinja2


def _environment():
    jinja2 = _jinja2()

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

    env = jinja_sandbox.environment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
