"""Kernel specializations and launch rules: what a kernel kind gives the AOT compiler and the loader.

A `KernelSpec` is one Triton kernel specialized for static params: the @triton.jit function,
its constexpr values, its run-time arguments (name, Triton type) in order, the arguments the
compiler may assume 16-divisible, and the launch configuration (num_warps, num_stages). A
`Rule` is what one kernel call (kind + static params, for one architecture) launches: variants
chosen by the call's integer arguments (T, B, ...), each a sequence of `Launch`es (a KernelSpec,
a grid expression, computed scalar arguments). `Rule.to_json()` is the form `llmirc.runtime.launch_rules` evaluates.

Argument types are Triton's: `*fp32`, `*bf16`, `*fp16`, `*i32`, `*i8` (pointers), `i64`, `fp32`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- grid expressions (see llmirc.runtime.launch_rules), folded when constant

def _fold(op, *args):
    if all(isinstance(a, int) for a in args):
        from llmirc.runtime.launch_rules import evaluate
        return evaluate([op, *args], {})
    return [op, *args]


def cdiv(a, b):
    return _fold("cdiv", a, b)


def add(*a):
    return _fold("+", *a)


def mul(a, b):
    return _fold("*", a, b)


def min_(*a):
    return _fold("min", *a)


def max_(*a):
    return _fold("max", *a)


def le(a, b):
    return _fold("<=", a, b)


def eq(a, b):
    return _fold("==", a, b)


@dataclass(frozen=True)
class KernelSpec:
    fn: object                       # the @triton.jit function
    constexprs: tuple                # ((name, value), ...) in the function's order
    args: tuple                      # ((name, type), ...) run-time arguments in the function's order
    num_warps: int
    num_stages: int
    aligned: frozenset = frozenset()  # argument names assumed divisible by 16 (pointers: bytes)

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def launch_pdl(self) -> bool:
        """Launched with programmatic dependent launch: its constexpr PDL is "wait" (pdl.py)."""
        return dict(self.constexprs).get("PDL") == "wait"

    def signature(self) -> dict[str, str]:
        """ASTSource's signature: every parameter of fn, run-time types or 'constexpr'."""
        sig = dict(self.args) | {name: "constexpr" for name, _ in self.constexprs}
        return {name: sig[name] for name in self.fn.arg_names}

    def hints(self) -> list[str]:
        """Run-time arguments as Triton AOT signature strings: `*fp32:16` when 16-divisible."""
        return [f"{t}:16" if name in self.aligned else t for name, t in self.args]

    def to_json(self) -> dict:
        return {"function": self.name, "constexprs": dict(self.constexprs), "args": [list(a) for a in self.args],
                "aligned": sorted(self.aligned), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def key(self) -> str:
        """Content key: the function's source (with its callees'), constexprs, signature, config."""
        source = getattr(self.fn, "cache_key", None) or self.fn.__name__  # (the interpreter's have no cache_key)
        text = json.dumps([source, self.to_json()], sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def kernel(fn, constexprs: dict, args, num_warps: int, num_stages: int = 1, aligned=None) -> KernelSpec:
    """A KernelSpec; `aligned` defaults to every pointer argument (16-byte aligned buffers)."""
    names = set(fn.arg_names)
    missing = names - set(constexprs) - {a for a, _ in args}
    extra = (set(constexprs) | {a for a, _ in args}) - names
    if missing or extra:
        raise ValueError(f"{fn.__name__}: parameters not covered {sorted(missing)}, unknown {sorted(extra)}")
    order = {n: i for i, n in enumerate(fn.arg_names)}
    if max((order[a] for a, _ in args), default=-1) > min((order[c] for c in constexprs), default=len(order)):
        raise ValueError(f"{fn.__name__}: run-time parameters must come before the constexprs")
    args = tuple(sorted(((a, t) for a, t in args), key=lambda a: order[a[0]]))
    if aligned is None:
        aligned = {a for a, t in args if t.startswith("*")}
    return KernelSpec(fn, tuple(sorted(constexprs.items(), key=lambda c: order[c[0]])), args, num_warps,
                      num_stages, frozenset(aligned) & {a for a, _ in args})


@dataclass(frozen=True)
class Launch:
    kernel: KernelSpec
    grid: tuple                      # three expressions over the call's i64 arguments
    scalars: tuple = ()              # ((name, expression), ...): i64 arguments computed from those

    def to_json(self) -> dict:
        return {"kernel": self.kernel.key(), "grid": list(self.grid), "args": [a for a, _ in self.kernel.args],
                "aligned": sorted(self.kernel.aligned), "scalars": dict(self.scalars)}


@dataclass(frozen=True)
class Variant:
    when: object                     # expression: this variant runs if non-zero (the first that holds)
    launches: tuple


@dataclass
class Rule:
    kind: str
    params: dict
    args: tuple                      # ((name, type), ...): the call's arguments (its signature's, in order)
    variants: list[Variant]
    buffers: list[dict] = field(default_factory=list)  # extra buffers {name, type, bytes, zero_init}

    def all_args(self) -> tuple:
        return self.args + tuple((b["name"], b["type"]) for b in self.buffers)

    def kernels(self) -> dict[str, KernelSpec]:
        """Every distinct kernel the rule may launch, by content key."""
        return {ln.kernel.key(): ln.kernel for v in self.variants for ln in v.launches}

    def to_json(self) -> dict:
        return {"kind": self.kind, "args": [list(a) for a in self.all_args()], "buffers": self.buffers,
                "variants": [{"when": v.when, "launches": [ln.to_json() for ln in v.launches]}
                             for v in self.variants]}

    def with_aligned(self, names) -> "Rule":
        """The rule with `names` (run-time arguments: ld_* and offsets the caller knows are multiples
        of 16 elements, pointers it knows are 16-byte aligned) as the compiler's divisibility hints,
        in place of the default (every pointer). The loader must check them at launch."""
        names = frozenset(names)
        variants = [Variant(v.when, tuple(
            Launch(replace(ln.kernel, aligned=names & {a for a, _ in ln.kernel.args}), ln.grid, ln.scalars)
            for ln in v.launches)) for v in self.variants]
        return Rule(self.kind, self.params, self.args, variants, self.buffers)

    def check(self) -> None:
        """Every launch's arguments are the call's arguments or its own scalars; grids are 3-D;
        expressions name only the call's i64 arguments."""
        from llmirc.runtime.launch_rules import evaluate
        known = {a for a, _ in self.all_args()}
        env = {a: 1 for a, t in self.args if t == "i64"}
        for expr in [v.when for v in self.variants] + [b["bytes"] for b in self.buffers]:
            evaluate(expr, env)
        for v in self.variants:
            for ln in v.launches:
                scalars = {s for s, _ in ln.scalars}
                for a, _ in ln.kernel.args:
                    if a not in known and a not in scalars:
                        raise ValueError(f"{self.kind}: kernel {ln.kernel.name} takes {a!r}, which the call lacks")
                if len(ln.grid) != 3:
                    raise ValueError(f"{self.kind}: grid {ln.grid} is not 3-D")
                for expr in list(ln.grid) + [e for _, e in ln.scalars]:
                    evaluate(expr, env)

