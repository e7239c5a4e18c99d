"""Launch rules of GPU kernels: which kernels one kernel call launches, on what grid.

A GPU target's kernel call (one `kind` with static params, for one architecture) carries a
JSON rule that the loader evaluates here, with no compiler installed:

    {"kind": "linear",
     "args": [["out", "*fp32"], ["ld_out", "i64"], ...],      # the call's arguments, in order
     "buffers": [{"name": "splitk_workspace", "bytes": EXPR, "zero_init": true}],
     "variants": [{"when": EXPR,
                   "launches": [{"kernel": KEY, "grid": [EXPR, EXPR, EXPR],
                                 "args": ["out", "ld_out", ...],          # the kernel's, in order
                                 "aligned": ["out", "x", ...],  # compiled assuming % 16 == 0
                                 "scalars": {"num_splits": EXPR}}]}]}

`args` are what the plan passes (the kind's signature, targets/signatures.py, then the
`buffers`, which the executor allocates: `bytes` as a function of the call's integers,
zero-filled once at allocation when `zero_init`, and not touched by the host afterwards).
Expressions are evaluated over the call's i64 arguments (`env`: T, or L for the rows of a
logits-sized call, B, max_blocks, ...: whatever the kind's signature names). The first variant
whose `when` is non-zero runs; its launches run in order, each with its kernel's arguments
taken by name from the call's arguments and the launch's `scalars` (i64 values computed from
the same integers), then the two hidden trailing pointers every Triton 3.9 kernel takes (see
`llmirc.targets.triton.compile`). The kernel was compiled assuming that its `aligned` arguments
are multiples of 16 (pointers: byte addresses; ints: element counts such as ld_*): the
launcher must check that (`check_aligned`), as a violation is a misaligned vector access.

An EXPR is an int, the name of an i64 argument of the call, or a list [op, a, b, ...] with op
one of + - * cdiv min max (integers) and < <= == and (0 or 1). Rules come from bundles, so
they are untrusted: anything else, deep nesting, values beyond +-2^62 or a grid outside the
hardware limits raises BundleError.
"""

from __future__ import annotations

from llmirc.errors import BundleError

MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA and HIP grid limits in x, y, z
_LIMIT = 2**62
_MAX_DEPTH = 32


def _cdiv(a: int, b: int) -> int:
    if b <= 0:
        raise BundleError(f"launch rule divides by {b}")
    return -(-a // b)


_OPS = {
    "+": lambda *a: sum(a),
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "cdiv": _cdiv,
    "min": min,
    "max": max,
    "<": lambda a, b: int(a < b),
    "<=": lambda a, b: int(a <= b),
    "==": lambda a, b: int(a == b),
    "and": lambda *a: int(all(a)),
}


def env_of(rule: dict, values: dict) -> dict[str, int]:
    """The call's i64 arguments {name: int} from its argument values (a plan's resolved call)."""
    return {name: int(values[name]) for name, t in rule["args"] if t == "i64" and name in values}


def evaluate(expr, env: dict[str, int], _depth: int = 0) -> int:
    """The integer value of `expr` (see the module docstring) with the call's integers `env`."""
    if _depth > _MAX_DEPTH:
        raise BundleError("launch rule expression nested too deeply")
    kind = type(expr)  # (exact types: a bool is not an int here; JSON gives no subclasses)
    if kind is int:
        value = expr
    elif kind is str:
        if expr not in env:
            raise BundleError(f"launch rule names {expr!r}, not an integer argument of the call "
                              f"({', '.join(env) or 'none'})")
        value = int(env[expr])
    elif kind is list and expr and type(expr[0]) is str and expr[0] in _OPS and len(expr) >= 3:
        op = expr[0]
        if op in ("-", "*", "cdiv", "<", "<=", "==") and len(expr) != 3:
            raise BundleError(f"launch rule op {op!r} takes 2 operands, got {len(expr) - 1}")
        value = _OPS[op](*(evaluate(e, env, _depth + 1) for e in expr[1:]))
    elif expr is None or kind is bool:
        raise BundleError(f"launch rule expression has a non-integer value {expr!r}")
    else:
        raise BundleError(f"launch rule expression is malformed: {expr!r:.80}")
    if not -_LIMIT <= value <= _LIMIT:
        raise BundleError(f"launch rule value {value} out of range")
    return value


def select(rule: dict, env: dict[str, int]) -> list[dict]:
    """The launches of the first variant of `rule` whose `when` holds for the call's integers."""
    for variant in rule["variants"]:
        if evaluate(variant["when"], env):
            return variant["launches"]
    raise BundleError(f"no launch variant of kernel kind {rule.get('kind')!r} applies to {env}")


def grid(launch: dict, env: dict[str, int]) -> tuple[int, int, int]:
    """The (x, y, z) grid of one launch; a 0 in it means nothing to launch (no rows)."""
    g = tuple(evaluate(e, env) for e in launch["grid"])
    if len(g) != 3 or any(v < 0 or v > m for v, m in zip(g, MAX_GRID)):
        raise BundleError(f"launch grid {g} of kernel {launch.get('kernel')!r} is outside the limits {MAX_GRID}")
    return g


def scalars(launch: dict, env: dict[str, int]) -> dict[str, int]:
    """The i64 arguments a launch computes from the call's integers (e.g. a split count)."""
    return {name: evaluate(e, env) for name, e in launch.get("scalars", {}).items()}


def check_aligned(launch: dict, values: dict) -> None:
    """BundleError unless every `aligned` argument of the launch (pointer address or int) is a
    multiple of 16."""
    for name in launch.get("aligned", []):
        v = values[name]
        if int(v) % 16:
            raise BundleError(f"kernel {launch.get('kernel')!r} was compiled for {name} % 16 == 0, got {v}")


def buffer_bytes(rule: dict, env: dict[str, int]) -> dict[str, int]:
    """Bytes of each extra buffer the call needs (allocate for the largest integers it runs with;
    the sizes grow with them)."""
    out = {}
    for buf in rule.get("buffers", []):
        n = evaluate(buf["bytes"], env)
        if n < 0:
            raise BundleError(f"buffer {buf['name']!r} of kernel kind {rule.get('kind')!r} has {n} bytes")
        out[buf["name"]] = n
    return out
