"""Chat templates rendered and tokenized as transformers' apply_chat_template does, on templates
written like the ones real checkpoints ship (Llama 3.1, Qwen2/ChatML, Qwen3, SmolLM2, and one using
the less common features: generation blocks, loop controls, namespaces, tojson)."""

from __future__ import annotations

import json
import sys

import pytest
from transformers import PreTrainedTokenizerFast

from helpers import CHATML, make_tokenizer
from llmirc.errors import LlmircError
from llmirc.runtime import template_worker
from llmirc.runtime.chat_template import ChatTemplate, render_here
from llmirc.runtime.tokenizer import Tokenizer

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2 = """{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful assistant.<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""

SMOLLM2 = """{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""

# Qwen3's (without its tool parts): a reversed slice, a namespace, string methods, reasoning_content
# and the enable_thinking variable (vLLM's chat_template_kwargs)
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

FEATURES = """{%- set ns = namespace(turns=0) -%}
{%- for message in messages -%}
  {%- if message.role == 'stop' %}{% break %}{% endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {%- if message.role == 'assistant' -%}
    {{ '<a>' }}{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
  {%- else -%}
    {{ '<' + message.role + '>' + (message.meta | tojson if message.meta is defined else '') + message.content }}
  {%- endif %}
{% endfor -%}
{{ 'turns=' ~ ns.turns }}{% if add_generation_prompt %}<a>{% endif %}"""

TEMPLATES = {"llama3.1": LLAMA31, "qwen2": QWEN2, "qwen3": QWEN3, "smollm2": SMOLLM2, "chatml": CHATML,
             "features": FEATURES}

CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "hello there"}],
    "system-multi-turn": [{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "héllo ✓"},
                          {"role": "assistant", "content": "hi! <s> not special"}, {"role": "user", "content": "more"}],
    "none-values": [{"role": "user", "content": "quick", "name": None}],
    "extra-fields": [{"role": "user", "content": "a", "meta": {"k": "<b>é</b>", "n": [1, 2]}},
                     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                     {"role": "stop", "content": "-"}, {"role": "user", "content": "never"}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path, 384)
    return path


def with_template(folder, tmp_path, template, as_file: bool):
    dst = tmp_path / "tok"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if as_file:
        (dst / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def ours(path):
    tok = Tokenizer.from_bundle_dir(path)
    return tok, ChatTemplate.from_folder(path, tok.special_tokens_map)


@pytest.mark.parametrize("as_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_and_tokenizes_as_transformers(folder, tmp_path, name, conversation, as_file):
    path = with_template(folder, tmp_path, TEMPLATES[name], as_file)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok, template = ours(path)
    messages = CONVERSATIONS[conversation]
    if name == "llama3.1" and conversation == "extra-fields":
        messages = messages[:3]  # roles must alternate
    for add_generation_prompt in (True, False):
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert tok.encode(text, add_special_tokens=False) == ids


def test_template_variables_tools_and_continue_final_message(folder, tmp_path):
    path = with_template(folder, tmp_path, LLAMA31, as_file=False)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    _, template = ours(path)
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "It is"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<b>now</b> é",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in (dict(date_string="01 Jan 2025"), dict(tools=tools), dict()):
        assert template.render(messages[:1], **kwargs) == hf.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True, **kwargs)
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True) == \
        hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    # transformers' add_generation_prompt is false by default; here (and in vLLM) it is true: the error says so
    with pytest.raises(LlmircError, match="add_generation_prompt is true by default .*: set it to false"):
        template.render(messages, continue_final_message=True)


def test_qwen3_thinking_switch_and_reasoning(folder, tmp_path):
    """enable_thinking (vLLM's chat_template_kwargs) and an assistant turn's <think> part, as transformers."""
    path = with_template(folder, tmp_path, QWEN3, as_file=True)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    _, template = ours(path)
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                {"role": "user", "content": "and 3+3?"}]
    for kwargs in (dict(enable_thinking=False), dict(enable_thinking=True), dict()):
        text = template.render(messages, **kwargs)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert text.endswith("assistant\n<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)
    assert "add them" not in template.render(messages)  # an earlier turn's reasoning is left out


@pytest.mark.parametrize("name", ["smollm2", "qwen2"])
def test_a_message_without_content_reads_as_empty_text(folder, tmp_path, name):
    """As the server takes a null content (vLLM's rule); transformers' templates fail on it."""
    path = with_template(folder, tmp_path, TEMPLATES[name], as_file=False)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    _, template = ours(path)
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}]
    expected = hf.apply_chat_template(empty, tokenize=False, add_generation_prompt=True)
    assert template.render([{"role": "user"}, {"role": "assistant", "content": None}, empty[-1]]) == expected


def test_named_templates_pick_default_or_tool_use(folder, tmp_path):
    dst = with_template(folder, tmp_path, CHATML, as_file=False)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": CHATML},
                               {"name": "tool_use", "template": "{{ tools | length }} tools{{ messages[0].content }}"}]
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    hf = PreTrainedTokenizerFast.from_pretrained(str(dst))
    _, template = ours(dst)
    messages = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert template.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(messages, tools=tools) == "1 toolsx" == \
        hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_template_errors_are_one_line_naming_the_template(folder, tmp_path):
    path = with_template(folder, tmp_path, LLAMA31, as_file=True)
    _, template = ours(path)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(LlmircError, match=r"chat_template.jinja: TemplateError: Conversation roles must alternate"):
        template.render(bad)
    with pytest.raises(LlmircError, match="empty"):
        template.render([])
    with pytest.raises(LlmircError, match="'messages' cannot be a template variable"):
        template.render(bad[:1], messages=[])
    with pytest.raises(LlmircError, match="SecurityError|unsafe|access"):
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render(
            [{"role": "user", "content": "x"}])
    # the template's own failures are the bundle's errors, not llmirc's (they were internal errors)
    for source, error in [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{% for i in range(10**12) %}{% endfor %}",
                                                                 "OverflowError"),
                          ("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", "RecursionError"),
                          ("{{ 'x' * 10**10 }}", "SecurityError"), ("{{ [0] * 10**9 }}", "SecurityError")]:
        with pytest.raises(LlmircError, match=f"T: .*{error}"):
            ChatTemplate(source, name="T").render([{"role": "user", "content": "x"}])
    assert ChatTemplate("{{ 'ab' * 2 }}{{ [1] * 2 }}{{ 2 ** 10 }}{{ 7 * 6 }}{{ '%5.1f|' % 2.25 }}"
                        "{{ '{:>4}'.format(1) }}"
                        "{{ 'a b' | replace(' ', '--') }}{{ 'x' | center(3) }}|{{ [1, 2] | join(', ') }}{{ 'a' ~ 'b' }}"
                        ).render([{"role": "user"}]) == "abab[1, 1]102442  2.2|   1a--b x |1, 2ab"


def test_sandbox_bounds_loops_and_output(monkeypatch):
    """Loops are what jinja's sandbox leaves unbounded (each range() is bounded, nested ones
    multiply): a rendering's iterations, time and output are, and loops still behave. The
    sandbox's bounds are checked in this process, the child's time and memory through ChatTemplate."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for source, text in [
            ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.content }}{% if loop.last %}!"
             "{% endif %}{% endfor %}", "1/2 hi2/2 yo!"),
            ("{% for m in messages if m.role == 'tool' %}x{% else %}none{% endfor %}", "none"),
            ("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}{% for c in 'bc' %}{{ c }}{% endfor %}",
             "a=1bc"),
            ("{% for i in range(2) recursive %}{% if loop.depth < 3 %}[{{ loop(range(2)) }}]{% endif %}{{ i }}"
             "{% endfor %}", "[[01]0[01]1]0[[01]0[01]1]1")]:
        assert ChatTemplate(source).render(chat) == text
    for source, error in [("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                           "loops ran more than the sandbox allows"),
                          ("{% for i in range(40) recursive %}{% if loop.depth < 6 %}{{ loop(range(40)) }}{% endif %}"
                           "{% endfor %}", "loops ran more"),
                          ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "output would make"),
                          # one operation making a huge value from small ones (a fresh user's tryout:
                          # each froze the server, or took gigabytes)
                          ("{{ ((9 ** 1024) ** 1024) ** 1024 }}", "an integer of about"),
                          ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                           "{% endfor %}", "an integer of about"),
                          ("{{ 'a' | center(2000000000) }}", "the center filter would make"),
                          ("{{ '%0999999999d' % 1 }}", "the format '%0999999999'"),
                          ("{{ '%*d' % (999999999, 1) }}", "with 999999999"),
                          ("{{ '{:>999999999}'.format(1) }}", "the format"),
                          ("{{ '{:>{}}'.format(1, 999999999) }}", "with 999999999"),
                          ("{{ 'a%s' | format(1) }}{{ '%0999999999d' | format(1) }}", "the format"),
                          ("{% set s = 'x' * 100000 %}{{ s | replace('x', s) }}", "the replace filter"),
                          ("{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}", "str.replace"),
                          ("{{ ('a ' * 8000000) | wordwrap(1) }}", "the wordwrap filter"),
                          ("{{ range(99999) | join('x' * 100000) }}", "the join filter"),
                          ("{{ 'a'.ljust(10 ** 9) }}", "str.ljust"),
                          ("{{ [1] | batch(10 ** 9, 0) | list }}", "the batch filter"),
                          ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(20) %}{% set ns.s = ns.s ~ ns.s %}"
                           "{% endfor %}", "~ would make"),
                          ("{% set ns = namespace(s=['x'] * 1000) %}{% for i in range(20) %}"
                           "{% set ns.s = ns.s + ns.s %}{% endfor %}", "\\+ would make")]:
        # (in this process: the sandbox's own bounds, not the child's time limit, which a loaded host
        # can make the first to end a recursive loop's 2^20 iterations, 2.7 s when idle)
        with pytest.raises(LlmircError, match=f"^SecurityError: .*{error}"):
            render_here(source, {"messages": chat})
    # what the sandbox's checks miss, the renderer's child process bounds (template_worker.py): a
    # template taking too long is stopped, one taking too much memory fails, and the next renders
    monkeypatch.setattr(template_worker, "TIMEOUT", 1.0)
    for source, error in [("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                           "rendering took more than 1 s, so it was stopped"),
                          ("{{ lipsum(10 ** 6) }}", "rendering took more than 1 s"),
                          ("{{ (['x' * 10000000] * 150) | join | length }}", "rendering failed: it needed more than"),
                          ("{% for m in messages %}" * 21 + "{% endfor %}" * 21,
                           "rendering failed: SyntaxError: too many")]:
        with pytest.raises(LlmircError, match=f"T: {error}"):
            ChatTemplate(source, name="T").render(chat)
        assert ChatTemplate("{{ messages[0].content }}").render(chat) == "hi"
    with pytest.raises(LlmircError, match="T: cannot compile it: SyntaxError"):
        ChatTemplate("{% for m in messages %}" * 21 + "{% endfor %}" * 21, name="T").check()
    with pytest.raises(LlmircError, match="template variables must be JSON values"):
        ChatTemplate("{{ when }}").render(chat, when=object())


def test_a_forked_process_renders_through_its_own_child():
    """The renderer's pipes belong to the process that started it: a process forked after a
    rendering starts its own (sharing them mixed the two processes' messages)."""
    import os

    template = ChatTemplate("{{ messages[0].content }}!")
    assert template.render([{"role": "user", "content": "parent"}]) == "parent!"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked process: its answer through the pipe, then out at once (no pytest teardown)
        try:
            fresh = template_worker._child is None  # (not the parent's pipes)
            os.write(write, template.render([{"role": "user", "content": "child" if fresh else "shared"}]).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 100) == b"child!"
    assert template.render([{"role": "user", "content": "parent again"}]) == "parent again!"


def test_ctrl_c_while_rendering_leaves_no_reply_behind(monkeypatch):
    """Ctrl-C while the child renders ends the child: its reply answered the next request (every
    rendering after it came one behind)."""
    template = ChatTemplate("[{{ messages[0].content }}]")
    assert template.render([{"role": "user", "content": "first"}]) == "[first]"  # the child runs
    receive = template_worker._receive

    def interrupted(fd, deadline):
        monkeypatch.setattr(template_worker, "_receive", receive)
        raise KeyboardInterrupt
    monkeypatch.setattr(template_worker, "_receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        template.render([{"role": "user", "content": "interrupted"}])
    assert template.render([{"role": "user", "content": "next"}]) == "[next]"


def test_the_renderer_ends_itself_and_keeps_the_users_memory_limit():
    """Its time limit holds without its parent (a killed server left it rendering at 100% CPU),
    and its memory limit stays under the user's `ulimit -v` (raising it failed: no chat at all)."""
    import signal
    import struct
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, "-m", "llmirc.runtime.template_worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    assert child.stdout.read(6) == struct.pack(">I", 2) + b"{}"
    request = json.dumps({"source": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}"
                                    "{{ f(40) }}", "variables": {}}).encode()
    child.stdin.write(struct.pack(">I", len(request)) + request)
    child.stdin.flush()  # and its reply never read
    started = time.monotonic()
    assert child.wait(timeout=60) == -signal.SIGALRM
    assert time.monotonic() - started < template_worker.TIMEOUT + 10
    limited = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1032 << 20, 1032 << 20))\n"
    code = limited + ("from llmirc.runtime.chat_template import ChatTemplate\n"
                      "print(ChatTemplate('{{ messages[0].content }}').render([{'role': 'user', 'content': 'ok'}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_no_template_and_bad_template_field(folder, tmp_path):
    assert ChatTemplate.from_folder(folder) is None  # make_tokenizer writes none
    dst = with_template(folder, tmp_path, CHATML, as_file=False)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = 42
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LlmircError, match="tokenizer_config.json chat_template: expected a string"):
        ChatTemplate.from_folder(dst)


def test_without_jinja2_chat_templates_say_what_to_install(monkeypatch):
    """jinja2 is the serve extra's: a loader installed without it says so (was a raw ImportError,
    an internal error in `llmirc run --chat`)."""
    for name in ("jinja2", "jinja2.ext", "jinja2.sandbox"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    template = ChatTemplate(CHATML, {}, "tokenizer_config.json")
    for call in (template.check, lambda: template.render([{"role": "user", "content": "hi"}])):
        with pytest.raises(LlmircError, match=r"chat templates need jinja2: pip install 'llmirc\[serve\]'"):
            call()
