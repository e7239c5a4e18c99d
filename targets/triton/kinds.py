"""The kernel kinds of the GPU targets: static params and the launch rule builder of each.

The kinds the CPU target has (targets/cpu/kernels.py: same static params plus storage dtypes,
same run-time arguments in the same order, so one plan drives both) and the GPU-only fusions:
add_rms_norm, add_layer_norm (norm.py), rope_kv_append (rope.py), argmax and sample
(sampling.py). Storage dtypes are static params: `w_dtype` (linear), `dtype` (embedding's
table), `kv_dtype` (kv_append, rope_kv_append, paged_attention's pool): float32, bfloat16 or
float16.

    rule = launch_rule("linear", {"n": 2048, "k": 2048, "w_dtype": "bfloat16"}, ARCHS["sm_90"])
    rule.kernels()    # {key: KernelSpec} to compile
    rule.to_json()    # what the loader evaluates (llmirc.runtime.launch_rules)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import attention, elementwise, linear, norm, rope, sampling
from .arch import Arch
from .spec import DTYPES, Rule


@dataclass(frozen=True)
class Kind:
    params: tuple[str, ...]          # required static params
    defaults: dict                   # optional static params and their defaults
    build: Callable[[dict, Arch], Rule]


_ROPE = ("num_heads", "head_dim", "inv_freq")
_ROPE_DEFAULTS = {"rotary_dim": None, "style": "neox", "scaling": 1.0}

KINDS: dict[str, Kind] = {
    "embedding": Kind(("dim",), {"dtype": "float32"}, elementwise.rule_embedding),
    "rms_norm": Kind(("dim", "eps"), {}, norm.rule_rms_norm),
    "layer_norm": Kind(("dim", "eps"), {"bias": True}, norm.rule_layer_norm),
    "linear": Kind(("n", "k"), {"bias": False, "residual": False, "w_dtype": "float32"}, linear.rule_linear),
    "rope": Kind(_ROPE, _ROPE_DEFAULTS, rope.rule_rope),
    "kv_append": Kind(("num_layers", "num_kv_heads", "head_dim", "block_size"), {"kv_dtype": "float32"},
                      rope.rule_kv_append),
    "paged_attention": Kind(("num_heads", "num_kv_heads", "head_dim", "block_size", "scale"),
                            {"sliding_window": 0, "kv_dtype": "float32"}, attention.rule_paged_attention),
    "act_mul": Kind(("dim", "act"), {}, elementwise.rule_act_mul),
    "act": Kind(("dim", "act"), {}, elementwise.rule_act),
    "gather_rows": Kind(("dim",), {}, elementwise.rule_gather_rows),
    "add": Kind(("dim",), {}, elementwise.rule_add),
    # GPU-only fusions
    "add_rms_norm": Kind(("dim", "eps"), {}, norm.rule_add_rms_norm),
    "add_layer_norm": Kind(("dim", "eps"), {"bias": True}, norm.rule_add_layer_norm),
    "rope_kv_append": Kind(_ROPE + ("num_kv_heads", "num_layers", "block_size"),
                           _ROPE_DEFAULTS | {"kv_dtype": "float32"}, rope.rule_rope_kv_append),
    "argmax": Kind(("vocab",), {}, sampling.rule_argmax),
    "sample": Kind(("vocab",), {}, sampling.rule_sample),
}


def launch_rule(kind: str, params: dict, arch: Arch, aligned=None) -> Rule:
    """The launch rule of one kernel call; ValueError for an unknown kind or bad static params.

    `aligned`: the run-time arguments the caller guarantees divisible by 16 (pointers: 16-byte
    aligned; ld_* and other ints: multiples of 16 elements), which lets Triton vectorize the
    accesses they address (16-byte loads and stores along rows). Default: every pointer, no int.
    The loader checks them at launch (Compiled.metadata["hints"])."""
    if kind not in KINDS:
        raise ValueError(f"no GPU kernel for kind {kind!r} (known: {', '.join(KINDS)})")
    spec = KINDS[kind]
    missing = [p for p in spec.params if p not in params]
    unknown = sorted(set(params) - set(spec.params) - set(spec.defaults))
    if missing or unknown:
        raise ValueError(f"{kind}: static params missing {missing}, unknown {unknown}")
    full = spec.defaults | dict(params)
    for p in ("dtype", "w_dtype", "kv_dtype"):
        if p in full and full[p] not in DTYPES:
            raise ValueError(f"{kind}: {p} {full[p]!r} is not one of {', '.join(DTYPES)}")
    rule = spec.build(full, arch)
    if aligned is not None:
        rule = rule.with_aligned(aligned)
    rule.check()
    return rule
