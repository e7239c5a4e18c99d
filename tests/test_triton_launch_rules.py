"""Launch rules: the loader-side evaluator (untrusted JSON), variant choice by the dims, grids and
buffer sizes as intended, and run-time arguments that match the CPU kernels' (one plan, both
targets)."""

from __future__ import annotations

import json
import re

import pytest

from llmirc.errors import BundleError
from llmirc.runtime import launch_rules as lr
from llmirc.targets.signatures import REQUIRED, SIGNATURES
from llmirc.targets.triton.arch import ARCHS
from llmirc.targets.triton.kinds import BUILDERS, GPU_SIGNATURES, launch_rule

ENV = {"T": 5, "B": 2, "L": 2, "max_blocks": 8, "num_blocks": 100}  # a call's integer arguments
ATTN = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 64, "block_size": 16, "scale": 0.125,
        "kv_dtype": "bfloat16"}


def test_evaluate():
    assert lr.evaluate(["cdiv", "T", 4], ENV) == 2
    assert lr.evaluate(["+", ["*", "B", 3], ["-", "max_blocks", 1], 1], ENV) == 14
    assert lr.evaluate(["max", 1, ["min", "T", 3]], ENV) == 3
    assert lr.evaluate(["and", ["<=", "T", "B"], ["==", 1, 1]], ENV) == 0
    assert lr.evaluate(["<", "B", "T"], ENV) == 1


@pytest.mark.parametrize("expr,msg", [
    (["pow", 2, 3], "malformed"),
    (["cdiv", "T"], "malformed"),
    (["cdiv", "T", 0], "divides by 0"),
    (["-", 1, 2, 3], "takes 2 operands"),
    ("seq_len", "names 'seq_len', not an integer argument of the call"),
    (True, "non-integer"),
    (1.5, "malformed"),
    ({"op": "+"}, "malformed"),
    (["*", 2**40, 2**40], "out of range"),
    (["+"] * 1 + [["+", 1, ["+", 1, ["+", 1, 1]]]] * 2, None),
])
def test_evaluate_rejects_bad_rules(expr, msg):
    if msg is None:
        assert lr.evaluate(expr, ENV) == 8
        return
    with pytest.raises(BundleError, match=msg):
        lr.evaluate(expr, ENV)


def test_evaluate_rejects_deep_nesting():
    expr = 1
    for _ in range(40):
        expr = ["+", expr, 1]
    with pytest.raises(BundleError, match="nested too deeply"):
        lr.evaluate(expr, ENV)


def test_grid_limits():
    with pytest.raises(BundleError, match="outside the limits"):
        lr.grid({"kernel": "k", "grid": [1, 70000, 1]}, ENV)
    with pytest.raises(BundleError, match="outside the limits"):
        lr.grid({"kernel": "k", "grid": [["-", 0, 1], 1, 1]}, ENV)
    assert lr.grid({"kernel": "k", "grid": ["T", ["cdiv", "T", 2], 1]}, ENV) == (5, 3, 1)


def test_select_needs_a_variant():
    with pytest.raises(BundleError, match="no launch variant"):
        lr.select({"kind": "x", "variants": [{"when": 0, "launches": []}]}, ENV)


def _kernels(rule, values):
    """[(kernel function, grid, scalars)] the loader would launch, from the rule's JSON."""
    rj = json.loads(json.dumps(rule.to_json()))  # what a bundle stores
    env = lr.env_of(rj, values)
    specs = rule.kernels()
    return [(specs[ln["kernel"]].name, lr.grid(ln, env), lr.scalars(ln, env)) for ln in lr.select(rj, env)]


def test_linear_variants_by_t():
    rule = launch_rule("linear", {"n": 2048, "k": 2048, "w_dtype": "bfloat16"}, ARCHS["sm_90"])
    specs = rule.kernels()
    rj = rule.to_json()
    for T, block_m in ((1, 16), (16, 16), (17, 32), (128, 32), (129, 128), (2048, 128)):
        (launch,) = lr.select(rj, ENV | {"T": T})
        cx = dict(specs[launch["kernel"]].constexprs)
        assert cx["BLOCK_M"] == block_m
        tiles = -(-T // block_m) * -(-2048 // cx["BLOCK_N"])
        assert lr.grid(launch, ENV | {"T": T}) == (tiles, cx["SPLIT_K"], 1)
    # decode: split-K toward 2 programs per SM (132 on sm_90) for 2048 rows in 32-row tiles, each split
    # >= 4 k-blocks of 128 (a pipeline to fill): min(cdiv(264, 64), 16 // 4) = 4 splits of 512; prefill: none
    decode = dict(specs[lr.select(rj, ENV | {"T": 1})[0]["kernel"]].constexprs)
    assert (decode["SPLIT_K"], decode["K_SPLIT"]) == (4, 512)
    small = launch_rule("linear", {"n": 896, "k": 4864, "w_dtype": "bfloat16"}, ARCHS["sm_90"])  # Qwen2-0.5B down
    cx = dict(small.kernels()[lr.select(small.to_json(), ENV | {"T": 1})[0]["kernel"]].constexprs)
    assert 28 * cx["SPLIT_K"] >= 132 and cx["K_SPLIT"] >= 4 * 128 and cx["SPLIT_K"] * cx["K_SPLIT"] >= 4864
    assert dict(specs[lr.select(rj, ENV | {"T": 4096})[0]["kernel"]].constexprs)["SPLIT_K"] == 1
    # the workspace holds one counter per tile of the largest split variant (the T <= 128 one: 4 x 16
    # tiles), padded to 64, then the largest variant's partial tiles; its kernels all know the counters
    (ws,) = rj["buffers"]
    assert ws["name"] == "splitk_workspace" and ws["zero_init"]
    split = [dict(s.constexprs) for s in specs.values() if dict(s.constexprs)["SPLIT_K"] > 1]
    assert {cx["MAX_TILES"] for cx in split} == {4 * 16}
    tiles = {16: 64, 32: 4 * 16}  # per BLOCK_M: the T <= 16 variant's (1 x 64) and the T <= 128 one's
    need = 64 + max(tiles[cx["BLOCK_M"]] * cx["SPLIT_K"] * cx["BLOCK_M"] * cx["BLOCK_N"] for cx in split)
    assert lr.buffer_bytes(rj, ENV) == {"splitk_workspace": 4 * need}


def test_paged_attention_variants():
    rule = launch_rule("paged_attention", ATTN, ARCHS["sm_90"])
    short = ENV | {"T": 2, "B": 2, "max_blocks": 16}  # 256 keys at most: one split, writing out directly
    assert _kernels(rule, short) == [("paged_attention_decode_kernel", (2, 8, 1), {"num_splits": 1})]
    long = ENV | {"T": 2, "B": 2, "max_blocks": 256}  # 4096 keys: min(16, cdiv(528, 16)) = 16 splits, the last
    assert _kernels(rule, long) == [("paged_attention_decode_kernel", (2, 8, 16), {"num_splits": 16})]  # merging
    direct = [dict(s.constexprs).get("DIRECT") for s in rule.kernels().values()]  # (and the prefill kernel)
    assert sorted(map(str, direct)) == ["False", "None", "True"]
    batch = ENV | {"T": 64, "B": 64, "max_blocks": 256}  # 64 x 8 programs already fill the GPU
    assert _kernels(rule, batch)[0][1] == (64, 8, 2)
    prefill = ENV | {"T": 100, "B": 3}  # BLOCK_Q = 64 / 4 tokens: 100 // 16 + 3 tile programs
    assert _kernels(rule, prefill) == [("paged_attention_prefill_kernel", (9, 8, 1), {})]
    # the workspace bounds T * splits rows of every decode launch
    rj = rule.to_json()
    for T in (1, 2, 3, 7, 64, 300):
        env = ENV | {"T": T, "B": T, "max_blocks": 4096}
        splits = lr.scalars(lr.select(rj, env)[0], env)["num_splits"]
        sizes = lr.buffer_bytes(rj, env)
        assert T * splits * 32 * (64 + 2) * 4 <= sizes["attn_workspace"] and sizes["attn_counters"] == 4 * T * 8
    assert [(b["name"], b["zero_init"]) for b in rj["buffers"]] == [("attn_workspace", False), ("attn_counters", True)]


def test_alignment_hints():
    rule = launch_rule("rms_norm", {"dim": 64, "eps": 1e-5}, ARCHS["sm_90"])
    (launch,) = lr.select(rule.to_json(), ENV)
    assert launch["aligned"] == ["out", "w", "x"]  # default: every pointer
    lr.check_aligned(launch, {"out": 4096, "w": 0, "x": 64, "ld_x": 7})
    with pytest.raises(BundleError, match=r"compiled for x % 16 == 0, got 4100"):
        lr.check_aligned(launch, {"out": 4096, "w": 0, "x": 4100})
    hinted = launch_rule("rms_norm", {"dim": 64, "eps": 1e-5}, ARCHS["sm_90"], aligned={"x", "ld_x", "nothing"})
    (launch,) = lr.select(hinted.to_json(), ENV)
    assert launch["aligned"] == ["ld_x", "x"]
    assert next(iter(hinted.kernels().values())).hints() == ["*fp32", "i64", "*fp32:16", "i64:16", "*fp32", "i64"]


def test_logits_sized_calls_use_their_own_rows():
    """gather_rows and sample count L rows; a linear over logits rows gets L as its T argument."""
    assert _kernels(launch_rule("gather_rows", {"dim": 64}, ARCHS["sm_90"]), {"L": 3}) == [
        ("gather_rows_kernel", (3, 1, 1), {})]
    assert _kernels(launch_rule("sample", {"vocab": 1000}, ARCHS["sm_90"]), {"L": 7})[0][1] == (7, 1, 1)
    with pytest.raises(BundleError, match="names 'L', not an integer argument"):
        lr.grid({"kernel": "k", "grid": ["L", 1, 1]}, lr.env_of(launch_rule("add", {"dim": 8}, ARCHS["sm_90"])
                                                                    .to_json(), {"T": 4}))


def test_zero_rows_launch_nothing():
    for kind, params in (("rms_norm", {"dim": 64, "eps": 1e-5}), ("linear", {"n": 64, "k": 64}),
                         ("paged_attention", ATTN)):
        rule = launch_rule(kind, params, ARCHS["gfx942"])
        assert all(0 in grid for _, grid, _ in _kernels(rule, ENV | {"T": 0, "B": 0}))


SMALL = {"dim": 64, "eps": 1e-5, "act": "silu", "n": 32, "k": 64, "bits": 4, "group_size": 32, "num_heads": 4,
         "num_kv_heads": 2, "head_dim": 16, "inv_freq": [1.0] * 8, "num_layers": 2, "block_size": 16, "scale": 0.25,
         "vocab": 100, "block": 16, "cap": 30.0}


@pytest.mark.parametrize("kind", sorted(set(SIGNATURES | GPU_SIGNATURES)))
def test_every_signature_has_a_rule_with_its_arguments(kind):
    """The call's arguments are the signature's (targets/signatures.py, shared with the CPU target),
    in order and with their element types, then the rule's buffers."""
    sig = (SIGNATURES | GPU_SIGNATURES)[kind]
    static = {p: SMALL[p] for p, d in sig.static.items() if d is REQUIRED} | {
        p: "bfloat16" for p in ("w_dtype", "dtype", "kv_dtype") if p in sig.static}
    rule = launch_rule(kind, static, ARCHS["sm_80"])
    assert [a for a, _ in rule.args] == [p.name for p in sig.params]
    assert [a for a, _ in rule.all_args()][len(sig.params):] == [b["name"] for b in rule.buffers]
    triton = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int32": "*i32", "int64": "*i64",
              "uint8": "*u8", "int8": "*i8"}
    for (name, t), p in zip(rule.args, sig.params):
        assert t == (triton[sig.pointee(p, sig.bind_static(static)).name] if p.type == "ptr" else p.type), name
    assert set(BUILDERS) == set(SIGNATURES) | set(GPU_SIGNATURES)


def test_bad_static_params():
    with pytest.raises(ValueError, match="no GPU kernel for kind 'conv'"):
        launch_rule("conv", {}, ARCHS["sm_90"])
    with pytest.raises(ValueError, match="quantized kernel: unsupported group size 48"):
        launch_rule("qlinear", {"n": 8, "k": 96, "bits": 4, "group_size": 48}, ARCHS["sm_90"])
    with pytest.raises(ValueError, match="quantized kernel: unsupported 3-bit codes"):
        launch_rule("qembedding", {"dim": 64, "bits": 3, "group_size": 32}, ARCHS["sm_90"])
    with pytest.raises(ValueError, match=r"rms_norm kernel: unknown static params \[\], missing \['eps'\]"):
        launch_rule("rms_norm", {"dim": 8}, ARCHS["sm_90"])
    with pytest.raises(ValueError, match="w_dtype 'int4'"):
        launch_rule("linear", {"n": 8, "k": 8, "w_dtype": "int4"}, ARCHS["sm_90"])
    with pytest.raises(ValueError, match="head_dim 512 > 256"):
        launch_rule("paged_attention", ATTN | {"head_dim": 512}, ARCHS["sm_90"])


@pytest.mark.parametrize("kind,params,message", [
    ("softcap", {"dim": 64, "cap": 0.0}, "softcap: cap must be finite and > 0, got 0.0"),
    ("paged_attention", dict(ATTN, softcap=float("inf")), "paged_attention: softcap must be finite and >= 0, got inf"),
])
def test_softcap_parameters_refused_alike_by_both_targets(kind, params, message):
    """One check (signatures.softcap_param) for the cpu kernels and the Triton rules."""
    from llvmlite import ir

    from llmirc.targets.cpu import kernels, toolchain

    with pytest.raises(ValueError, match=re.escape(message)):
        launch_rule(kind, params, ARCHS["sm_90"])
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.emit_kernel(ir.Module(), kind, "k", params, toolchain.baseline_variant())
