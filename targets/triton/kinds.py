"""The kernel kinds of the GPU targets: their signatures and launch rule builders.

Every kind of targets/signatures.py (static params, named typed arguments and semantics shared
with the CPU target, so one plan drives both), plus the GPU-only fusions declared here the same
way: add_rms_norm, add_layer_norm (norm.py), rms_norm_linear and act_mul_linear (linear.py; made
by fuse.py), argmax, sample and advance_step (sampling.py). Storage dtypes
(`w_dtype`, `dtype`, `kv_dtype`) may be float32, bfloat16 or float16; a KV pool (kv_append, paged_attention) may also be int8 or float8_e4m3fn (codes with a
float32 scale per block; FP8 on the architectures that have it).

    rule = launch_rule("linear", {"n": 2048, "k": 2048, "w_dtype": "bfloat16"}, ARCHS["sm_90"])
    rule.kernels()    # {key: KernelSpec} to compile
    rule.to_json()    # what the loader evaluates (llmirc.runtime.launch_rules)
"""

from __future__ import annotations

from llmirc import dtypes
from llmirc.targets.signatures import REQUIRED, SIGNATURES, Param, Signature

from . import attention, elementwise, linear, norm, quant, rope, sampling
from .arch import Arch
from .spec import Rule

STORAGE = ("float32", "bfloat16", "float16")  # what weights, tables and KV pools may be stored as
KV_STORAGE = STORAGE + dtypes.QUANTIZED_KV   # and KV pools (codes with a scale per block: rope.py)
_TRITON = {"f32": "fp32", "f16": "fp16", "f8E4M3FN": "fp8e4nv"}  # dtypes' short names Triton spells otherwise


def _ptr(name, dtype="float32", access="r", nullable=False):
    return Param(name, "ptr", dtype, access, nullable)


def _i64(name):
    return Param(name, "i64")


_OUT = (_ptr("out", access="w"), _i64("ld_out"))
_ADD = (_ptr("h", access="rw"), _i64("ld_h"), _ptr("x"), _i64("ld_x"))
_LOGITS = (_ptr("tokens", "int32", "w"), _ptr("logits"), _i64("ld_logits"))
_LINEAR_STATIC = SIGNATURES["linear"].static
_LINEAR_TAIL = tuple(p for p in SIGNATURES["linear"].params if p.name in ("w", "bias", "residual", "ld_res", "T"))

GPU_SIGNATURES: dict[str, Signature] = {s.kind: s for s in (
    # h[t] += x[t]; out[t] = norm(h[t])   (vLLM's fused_add_rms_norm); out may equal x
    Signature("add_rms_norm", {"dim": REQUIRED, "eps": REQUIRED}, (*_OUT, *_ADD, _ptr("w"), _i64("T"))),
    Signature("add_layer_norm", {"dim": REQUIRED, "eps": REQUIRED, "bias": True},
              (*_OUT, *_ADD, _ptr("w"), _ptr("b", nullable=True), _i64("T"))),
    # tokens[l] = argmax logits[l]; or drawn with per-row temperature, top_k, top_p, seed, offset
    Signature("argmax", {"vocab": REQUIRED}, (*_LOGITS, _i64("L"))),
    Signature("sample", {"vocab": REQUIRED},
              (*_LOGITS, _ptr("temperature"), _ptr("top_k", "int32"), _ptr("top_p"), _ptr("seeds", "int64"),
               _ptr("offsets", "int64"), _i64("L"))),
    # a plan's rms_norm / act_mul and the linear that reads its output, as one call (fuse.py): x = the
    # prologue's output (written only when T > 1: for one token the GEMV computes it as it loads)
    Signature("rms_norm_linear", {**_LINEAR_STATIC, "eps": REQUIRED},
              (*_OUT, _ptr("x", access="rw"), _i64("ld_x"), _ptr("src"), _i64("ld_src"), _ptr("norm_w"),
               *_LINEAR_TAIL)),
    Signature("act_mul_linear", {**_LINEAR_STATIC, "act": REQUIRED},
              (*_OUT, _ptr("x", access="rw"), _i64("ld_x"), _ptr("gate"), _i64("ld_gate"), _ptr("up"),
               _i64("ld_up"), *_LINEAR_TAIL)),
    # multi-step decode: the next step's inputs from this step's tokens (sampling.py)
    Signature("advance_step", {"block_size": REQUIRED},
              (_ptr("tokens", "int32"), *(_ptr(n, "int32", "rw") for n in ("token_ids", "positions", "slot_mapping")),
               _ptr("block_tables", "int32"), _ptr("seq_lens", "int32", "rw"), _ptr("out", "int32", "w"),
               _ptr("step", "int32", "rw"), _i64("B"), _i64("max_blocks"), _i64("token_rows"))),
)}

BUILDERS = {
    "embedding": elementwise.rule_embedding, "rms_norm": norm.rule_rms_norm, "layer_norm": norm.rule_layer_norm,
    "linear": linear.rule_linear, "rope": rope.rule_rope, "kv_append": rope.rule_kv_append,
    "paged_attention": attention.rule_paged_attention, "act_mul": elementwise.rule_act_mul,
    "act": elementwise.rule_act, "softcap": elementwise.rule_softcap, "gather_rows": elementwise.rule_gather_rows,
    "add": elementwise.rule_add,
    "add_rms_norm": norm.rule_add_rms_norm, "add_layer_norm": norm.rule_add_layer_norm,
    "rope_kv_append": rope.rule_rope_kv_append, "argmax": sampling.rule_argmax, "sample": sampling.rule_sample,
    "advance_step": sampling.rule_advance_step, "rms_norm_linear": linear.rule_rms_norm_linear,
    "act_mul_linear": linear.rule_act_mul_linear,
    "qlinear": quant.rule_qlinear, "qembedding": quant.rule_qembedding, "hadamard": elementwise.rule_hadamard,
}


def signature(kind: str) -> Signature:
    if kind in SIGNATURES:
        return SIGNATURES[kind]
    if kind in GPU_SIGNATURES:
        return GPU_SIGNATURES[kind]
    raise ValueError(f"no GPU kernel for kind {kind!r} (known: {', '.join(BUILDERS)})")


def triton_args(sig: Signature, static: dict) -> tuple:
    """((name, Triton type), ...) of a signature's arguments: `*bf16`, `*i32`, `i64`, `fp32`, ..."""
    out = []
    for p in sig.params:
        if p.type == "ptr":
            short = sig.pointee(p, static).short
            out.append((p.name, "*" + _TRITON.get(short, short)))
        else:
            out.append((p.name, _TRITON.get(p.type, p.type)))
    return tuple(out)


def launch_rule(kind: str, params: dict, arch: Arch, aligned=None) -> Rule:
    """The launch rule of one kernel call; ValueError for an unknown kind or bad static params.

    `aligned`: the run-time arguments the caller guarantees divisible by 16 (pointers: 16-byte
    aligned; ld_* and other ints: multiples of 16 elements), which lets Triton vectorize the
    accesses they address (16-byte loads and stores along rows). Default: every pointer, no int.
    The loader checks them at launch (llmirc.runtime.launch_rules.check_aligned)."""
    sig = signature(kind)
    static = sig.bind_static(params)
    for p in ("dtype", "w_dtype", "kv_dtype"):
        allowed = KV_STORAGE if p == "kv_dtype" else STORAGE
        if p in static and static[p] not in allowed:
            raise ValueError(f"{kind}: {p} {static[p]!r} is not one of {', '.join(allowed)}")
    rule = BUILDERS[kind](static, arch, triton_args(sig, static))
    if aligned is not None:
        rule = rule.with_aligned(aligned)
    rule.check()
    return rule
