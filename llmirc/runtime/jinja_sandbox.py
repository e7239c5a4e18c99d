"""The jinja environment chat templates render in: jinja's ImmutableSandboxedEnvironment, bounded.

A chat template is the bundle's code, so untrusted. jinja's sandbox keeps it from internals
(attributes starting with `_`, unsafe callables, mutating lists and dicts) and bounds each
`range()` to 100,000 items; it leaves a template's time and memory unbounded: nested loops
multiply (`{% for i in range(99999) %}{% for j in range(99999) %}`), and one operation can make
a huge value from small ones (`'x' * 10**10`, `((9 ** 1024) ** 1024) ** 1024`,
`'%0999999999d' % 1`, `'a' | center(2**31)`). Here a rendering runs at most MAX_ITERATIONS loop
iterations (every `for`, recursive loops too) and writes at most MAX_TEXT characters; an
operation that would make a string or list longer than MAX_TEXT, or an integer of more than
MAX_INT_BITS bits, is refused before it runs (`+` and `~`, which at most double what exists,
just after). Each limit raises jinja's SecurityError with a message saying which. These catch
the common bombs; they are not complete (recursive macros, `lipsum(10**6)`, sorting a list of
millions...): the hard bound is template_worker's, a child process with a time and memory limit.

jinja2 is imported only when an environment is made (an optional dependency: the `serve` extra).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

MAX_TEXT = 1 << 24  # characters a rendering may write; characters or items one operation may make
MAX_INT_BITS = 1 << 16  # the largest integer an operation may make (about 20,000 digits)
MAX_ITERATIONS = 1 << 20  # loop iterations a rendering may run (nested loops multiply)


def render(template, variables: dict) -> str:
    """`template` (made by `environment()`) rendered with `variables`, within the limits above.
    Raises jinja's SecurityError past one, and whatever the template raises."""
    token = _BUDGET.set(_Budget())
    try:
        written, chunks = 0, []
        for chunk in template.generate(variables):
            written += len(chunk)
            _check_size(written, "the template's output")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _BUDGET.reset(token)


def environment(**options):
    """A bounded ImmutableSandboxedEnvironment (`options`: jinja's Environment arguments)."""
    import jinja2.compiler
    import jinja2.runtime
    import jinja2.sandbox
    import jinja2.visitor
    from jinja2 import nodes

    class Bounded(jinja2.visitor.NodeTransformer):
        """Every for loop iterates `_Counted(iterable)`; every `~` result is checked."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "llmirc_counted", [], [], None, None)
            return node

        def visit_Concat(self, node):
            return nodes.Filter(self.generic_visit(node), "llmirc_text", [], [], None, None)

    class CodeGenerator(jinja2.compiler.CodeGenerator):
        def visit_Template(self, node, frame=None):
            super().visit_Template(Bounded().visit(node), frame)

    class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+"])
        code_generator_class = CodeGenerator

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            if operator == "+":
                _check_size(_length(result), "+")
            return result

        def call(self, context, obj, *args, **kwargs):
            if isinstance(obj, jinja2.runtime.LoopContext) and args:  # a recursive loop's loop(children)
                args = (_Counted(args[0]), *args[1:])
            _check_method(obj, args, kwargs)
            return super().call(context, obj, *args, **kwargs)

    env = Sandbox(**options)
    for name, size in _FILTER_SIZES.items():
        env.filters[name] = _sized(env.filters[name], name, size)
    env.filters["llmirc_counted"] = _Counted
    env.filters["llmirc_text"] = _checked_text
    return env


def _security_error(message: str) -> Exception:
    from jinja2.exceptions import SecurityError

    return SecurityError(message)


class _Budget:
    """What one rendering may still spend on loops."""

    def __init__(self):
        self.iterations = MAX_ITERATIONS

    def spend(self) -> None:
        self.iterations -= 1
        if self.iterations < 0:
            raise _security_error(f"the template's loops ran more than the sandbox allows ({MAX_ITERATIONS} "
                                  "iterations)")


_BUDGET: ContextVar[_Budget] = ContextVar("llmirc_template_budget")


class _Counted:
    """A for loop's iterable, each item charged to the rendering's budget (len() kept, for
    loop.length and loop.last)."""

    def __init__(self, items: Iterable):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        budget = _BUDGET.get()
        for item in self.items:
            budget.spend()
            yield item


def _check_size(size, what: str) -> None:
    if isinstance(size, int) and size > MAX_TEXT:  # (a size read from arguments of another type: their error)
        raise _security_error(f"{what} would make {size} characters or items, more than the sandbox allows "
                              f"({MAX_TEXT})")


def _checked_text(text):
    _check_size(len(text), "~")
    return text


def _length(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _check_binop(operator: str, left, right) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*" and ints:
        bits = left.bit_length() + right.bit_length()
    elif operator == "**" and ints and right > 0 and abs(left) > 1:
        bits = (abs(left).bit_length() - 1) * right + 1
    else:
        bits = 0
    if bits > MAX_INT_BITS:
        raise _security_error(f"{operator} would make an integer of about {bits} bits, more than the sandbox "
                              f"allows ({MAX_INT_BITS})")
    if operator == "*":
        for a, b in ((left, right), (right, left)):
            if _length(a) and isinstance(b, int):
                _check_size(_length(a) * b, "*")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,), {})


_WIDTHS = re.compile(r"%[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?|\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """printf-style (`%`, the `format` filter) or str.format text: its widths and precisions, and
    those taken from the arguments (`*`, `{:{}}`), at most MAX_TEXT."""
    for spec in _WIDTHS.findall(fmt):
        for number in re.findall(r"\d+", spec):
            _check_size(int(number), f"the format {spec!r}")
        if "*" in spec or spec.count("{") > 1:
            for value in (*args, *kwargs.values()):
                if isinstance(value, int):
                    _check_size(value, f"the format {spec!r} with {value}")


def _replaced(s, old, new, count=None) -> int:
    """The length of s.replace(old, new, count)."""
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _indented(s, width=4, *args, **kwargs) -> int:
    return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(width))


_FILTER_SIZES = {  # filter -> the size of what it makes, from its arguments
    "center": lambda value, width=80: width,
    "indent": _indented,
    "replace": _replaced,
    "join": lambda value, d="", attribute=None: len(d) * len(value),
    "batch": lambda value, linecount, fill_with=None: linecount,
    "slice": lambda value, slices, fill_with=None: slices,
    "wordwrap": lambda s, *args, **kwargs: 16 * len(s),  # textwrap's time: about a second per MiB
    "format": lambda value, *args, **kwargs: _check_format(value, args, kwargs) or 0,
}


def _sized(filter_, name: str, size):
    """`filter_` refusing arguments that would make more than MAX_TEXT (checked when `size` can
    read them: other arguments fail in the filter itself)."""
    context_first = hasattr(filter_, "jinja_pass_arg")  # jinja passes its eval context or environment first

    @functools.wraps(filter_)
    def checked(*args, **kwargs):
        try:
            made = size(*args[context_first:], **kwargs)
        except (TypeError, ValueError, AttributeError):
            made = 0
        _check_size(made, f"the {name} filter")
        return filter_(*args, **kwargs)
    return checked


_STR_METHOD_SIZES = {
    "center": lambda s, width, *args: width, "ljust": lambda s, width, *args: width,
    "rjust": lambda s, width, *args: width, "zfill": lambda s, width: width,
    "expandtabs": lambda s, tabsize=8: len(s) * tabsize, "replace": _replaced,
    "join": lambda s, items: len(s) * len(items),
}


def _check_method(obj, args: tuple, kwargs: dict) -> None:
    """A str method making a long string from short arguments (str.format is jinja's wrapper)."""
    method = getattr(obj, "__wrapped__", obj)
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return
    if name == "format":
        _check_format(owner, args, kwargs)
    elif name == "format_map" and args and isinstance(args[0], dict):
        _check_format(owner, (), args[0])
    elif name in _STR_METHOD_SIZES:
        try:
            made = _STR_METHOD_SIZES[name](owner, *args, **kwargs)
        except (TypeError, ValueError, AttributeError):
            return
        _check_size(made, f"str.{name}")
