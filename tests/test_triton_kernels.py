"""Triton kernels on Triton's interpreter (TRITON_INTERPRET=1, torch CPU tensors) against float64.

Each test builds the kind's launch rule for an architecture, evaluates it for the call's integer arguments as
the loader would (llmirc.runtime.launch_rules) and launches its kernels through Triton's own
launcher (targets/triton/run.py). Outputs are poisoned with NaN; padded buffers (ld larger than
the row) check that nothing outside the output rows/columns is written. Numpy buffers are
shared with torch (torch.from_numpy), so results land in them.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import triton_interpreter  # noqa: F401  (bf16 fixes to Triton's interpreter)

from helpers import (QMAX, buf, check_guard, code_values, int8_pool, ld, make_batch, ref_attention,
                     ref_kv_append_quantized, to_codes)
from llmirc import quant
from llmirc.passes.onnx_fuse_norm import layer_norm as ref_layer_norm
from llmirc.passes.onnx_fuse_norm import rms_norm as ref_rms_norm
from llmirc.targets.triton.arch import ARCHS
from llmirc.targets.signatures import SIGNATURES
from llmirc.targets.triton.kinds import launch_rule, triton_args
from llmirc.targets.triton.linear import rule_linear
from llmirc.targets.triton.run import run

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# the interpreter computes masked-off lanes too (NaN * 0 and the like)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def call(kind_or_rule, params=None, arch="sm_90", **args):
    rule = kind_or_rule if params is None else launch_rule(kind_or_rule, params, ARCHS[arch])
    args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    run(rule, args)
    return rule


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """a rounded to `dtype`, as float64."""
    if dtype == "float32":
        return a.astype(np.float32).astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(HALF[dtype]).double().numpy()


def stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(HALF.get(dtype, torch.float32))


# --- row-wise kinds

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T", [0, 1, 7])
def test_embedding(rng, dtype, T):
    vocab, dim = 50, 37
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    ids = rng.integers(0, vocab, max(T, 1)).astype(np.int32)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("embedding", {"dim": dim, "dtype": dtype}, out=ob, ld_out=ld(ob),
         table=stored(table, dtype), ids=ids, T=T)
    np.testing.assert_array_equal(out, rounded(table, dtype)[ids[:T]])
    check_guard(ob, T, dim)
    scale = np.float32(1152 ** 0.5)  # Gemma's: one float32 multiply
    call("embedding", {"dim": dim, "dtype": dtype, "scale": float(scale)}, out=ob, ld_out=ld(ob),
         table=stored(table, dtype), ids=ids, T=T)
    np.testing.assert_array_equal(out, rounded(table, dtype)[ids[:T]].astype(np.float32) * scale)


def test_gather_rows_and_add(rng):
    L, T, dim = 4, 9, 1100  # two column blocks
    xb, x = buf(rng, T, dim)
    idx = np.array([8, 0, 3, 3], np.int32)
    ob, out = buf(rng, L, dim, fill=np.nan)
    call("gather_rows", {"dim": dim}, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), idx=idx, L=L)
    np.testing.assert_array_equal(out, x[idx])
    check_guard(ob, L, dim)
    bb, b = buf(rng, T, dim, pad=1)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("add", {"dim": dim}, out=ob, ld_out=ld(ob), a=xb, ld_a=ld(xb), b=bb, ld_b=ld(bb), T=T)
    np.testing.assert_array_equal(out, x + b)
    check_guard(ob, T, dim)


def ref_act(act, x):
    """float64; act(-inf) = 0 (the limit), NaN stays NaN."""
    x = x.astype(np.float64)
    t = torch.from_numpy(x)
    if act == "silu":
        y = t * torch.sigmoid(t)
    elif act == "gelu":
        y = 0.5 * t * torch.special.erfc(-t / math.sqrt(2))
    elif act == "gelu_tanh":  # x sigmoid(2 y): no cancellation in the reference either
        y = t * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))
    else:
        y = torch.where(t < 0, 0.0, t)
    return np.where(x == -np.inf, 0.0, y.numpy())


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_act_and_act_mul(rng, act):
    T, dim = 6, 300
    gb, gate = buf(rng, T, dim)
    gate *= 8.0
    gate[0, :8] = [-np.inf, np.inf, -100.0, -30.0, -9.0, 1e-30, -0.0, 88.0]
    gate[1, :4] = [np.nan, -7.5, 7.5, -3e4]
    ub, up = buf(rng, T, dim, pad=2)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("act", {"dim": dim, "act": act}, out=ob, ld_out=ld(ob), x=gb, ld_x=ld(gb), T=T)
    ref = ref_act(act, gate)
    with np.errstate(invalid="ignore"):
        close = np.abs(out - ref) <= 1e-6 * np.abs(ref) + 1e-37
    assert (close | (np.isnan(out) & np.isnan(ref)) | (out == ref)).all(), (gate[~close], out[~close])
    check_guard(ob, T, dim)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("act_mul", {"dim": dim, "act": act}, out=ob, ld_out=ld(ob), gate=gb, ld_gate=ld(gb),
         up=ub, ld_up=ld(ub), T=T)
    ref = ref.astype(np.float32) * up  # act rounded to f32, then one f32 multiply
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=2e-6, atol=1e-37)
    check_guard(ob, T, dim)


def test_softcap(rng):
    """Gemma 2's final logits 30 tanh(x / 30) against float64, the tails and specials included."""
    T, dim = 5, 300
    xb, x = buf(rng, T, dim)
    x[...] = rng.standard_normal((T, dim)) * np.exp(rng.uniform(-12, 6, (T, dim)))
    x[0, :6] = [np.inf, -np.inf, 0.0, -0.0, 400.0, -1e-30]
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("softcap", {"dim": dim, "cap": 30.0}, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), T=T)
    np.testing.assert_allclose(out, 30.0 * np.tanh(x.astype(np.float64) / 30.0), rtol=1e-6, atol=1e-37)
    assert np.signbit(out[0, 3]) and not np.signbit(out[0, 2])
    check_guard(ob, T, dim)


@pytest.mark.parametrize("dim,block,T", [(48, 16, 5), (64, 64, 1), (384, 128, 5), (256, 128, 70)])
def test_hadamard(rng, dim, block, T):
    xb, x = buf(rng, T, dim, pad=2)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("hadamard", {"dim": dim, "block": block}, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), T=T)
    np.testing.assert_allclose(out, quant.hadamard(x, block), rtol=0, atol=1e-5)
    check_guard(ob, T, dim)
    call("hadamard", {"dim": dim, "block": block}, out=ob, ld_out=ld(ob), x=ob, ld_x=ld(ob), T=T)  # in place
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-5)
    for bad in (8, 256):
        with pytest.raises(ValueError, match="power of two from 16 to 128"):
            launch_rule("hadamard", {"dim": 1024, "block": bad}, ARCHS["sm_90"])


# --- norms (float64 references: the ONNX fusion's)


@pytest.mark.parametrize("dim", [7, 1000, 5000])  # 5000: two column blocks
def test_rms_norm(rng, dim):
    T = 5
    xb, x = buf(rng, T, dim)
    x += 3.0
    w = rng.standard_normal(dim).astype(np.float32)
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("rms_norm", {"dim": dim, "eps": 1e-6}, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), w=w, T=T)
    np.testing.assert_allclose(out, ref_rms_norm(x, w, 1e-6), rtol=2e-5, atol=1e-6)
    check_guard(ob, T, dim)
    # fused with the residual add: h += x; out = rms_norm(h)
    hb, h = buf(rng, T, dim, pad=2)
    h0 = h.copy()
    ob, out = buf(rng, T, dim, fill=np.nan)
    call("add_rms_norm", {"dim": dim, "eps": 1e-6}, out=ob, ld_out=ld(ob), h=hb, ld_h=ld(hb),
         x=xb, ld_x=ld(xb), w=w, T=T)
    np.testing.assert_array_equal(h, h0 + x)
    np.testing.assert_allclose(out, ref_rms_norm(h0 + x, w, 1e-6), rtol=2e-5, atol=1e-6)
    check_guard(ob, T, dim)


@pytest.mark.parametrize("dim, heads", [(16, 3), (128, 8)])
def test_rms_norm_per_head(rng, dim, heads):
    """Qwen3's q_norm / k_norm: each head of a row normalized on its own, one weight [dim]."""
    T = 5
    xb, x = buf(rng, T, dim * heads)
    x += 3.0 * rng.standard_normal(heads).repeat(dim)  # heads of different scales
    w = rng.standard_normal(dim).astype(np.float32)
    ob, out = buf(rng, T, dim * heads, fill=np.nan)
    call("rms_norm", {"dim": dim, "eps": 1e-6, "heads": heads}, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), w=w, T=T)
    want = ref_rms_norm(x.reshape(T, heads, dim), w, 1e-6).reshape(T, dim * heads)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-6)
    check_guard(ob, T, dim * heads)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dim", [7, 5000])
def test_layer_norm(rng, bias, dim):
    T = 4
    xb, x = buf(rng, T, dim)
    x += 5.0  # a large mean: the variance must not cancel
    w = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32) if bias else None
    bias_arg = b if bias else np.zeros(1, np.float32)
    ob, out = buf(rng, T, dim, fill=np.nan)
    params = {"dim": dim, "eps": 1e-5, "bias": bias}
    call("layer_norm", params, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), w=w, b=bias_arg, T=T)
    np.testing.assert_allclose(out, ref_layer_norm(x, w, b, 1e-5), rtol=5e-5, atol=5e-5)
    check_guard(ob, T, dim)
    hb, h = buf(rng, T, dim, pad=1)
    h0, x0 = h.copy(), x.copy()
    call("add_layer_norm", params, out=xb, ld_out=ld(xb), h=hb, ld_h=ld(hb), x=xb, ld_x=ld(xb),
         w=w, b=bias_arg, T=T)  # out is x
    np.testing.assert_array_equal(h, h0 + x0)
    np.testing.assert_allclose(x, ref_layer_norm(h0 + x0, w, b, 1e-5), rtol=5e-5, atol=5e-5)


# --- linear

LINEAR_T = [0, 1, 3, 16, 17, 70, 129, 200, 70, 3, 1]  # every variant (decode (<= 16), <= 128, prefill), then the
# split ones again: a rule's variants share one split-K workspace, as in the loader (gpu_program.buffers)


def shared_workspace(rule) -> dict:
    """The rule's zero-filled buffers, for every call of a test (splitk.py: they stay valid)."""
    from llmirc.targets.triton.run import allocate_buffers
    return allocate_buffers(rule, {"T": 256}, "cpu")


@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["sm_90", "gfx942"])
def test_linear(rng, w_dtype, arch):
    """Every T range (variant), with bias and residual (out is residual), n and k not multiples
    of the tiles, and split-K (forced on: 3 splits; and the rule's own choice)."""
    n, k = 70, 300
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wq = rounded(w, w_dtype)
    params = {"n": n, "k": k, "bias": True, "residual": True, "w_dtype": w_dtype}
    for split in (3, None):
        rule = rule_linear(params, ARCHS[arch], triton_args(SIGNATURES["linear"], params),
                           {16: {"split_k": split}, 128: {"split_k": split}})
        ws = shared_workspace(rule)
        for T in LINEAR_T:
            xb, x = buf(rng, T, k, pad=3)
            rb, res = buf(rng, T, n, pad=2)
            res0 = res.copy()
            call(rule, out=rb, ld_out=ld(rb), x=xb, ld_x=ld(xb), w=stored(w, w_dtype), bias=bias,
                 residual=rb, ld_res=ld(rb), T=T, **ws)
            ref = rounded(x, w_dtype) @ wq.T + bias + res0  # x rounded to the weights' dtype (tensor cores)
            np.testing.assert_allclose(res, ref, rtol=1e-5, atol=3e-5, err_msg=f"T={T} split={split}")


def test_linear_flags_off_and_big_k(rng):
    """No bias, no residual (their pointers unused); k spans several 128-blocks per split."""
    n, k, T = 33, 1100, 5
    w = rng.standard_normal((n, k)).astype(np.float32)
    xb, x = buf(rng, T, k)
    ob, out = buf(rng, T, n, fill=np.nan)
    rule = call("linear", {"n": n, "k": k, "w_dtype": "bfloat16"}, out=ob, ld_out=ld(ob), x=xb,
                ld_x=ld(xb), w=stored(w, "bfloat16"), bias=np.zeros(1, np.float32), residual=np.zeros(1, np.float32),
                ld_res=0, T=T)
    np.testing.assert_allclose(out, rounded(x, "bfloat16") @ rounded(w, "bfloat16").T, rtol=1e-5, atol=3e-5)
    check_guard(ob, T, n)
    assert rule.kernels() and rule.buffers[0]["zero_init"]


@pytest.mark.parametrize("kind", ["rms_norm_linear", "act_mul_linear"])
@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16"])
def test_prologue_linear(rng, kind, w_dtype):
    """rms_norm / act_mul fused into a GEMV's loads (one token), or launched first into x (the
    linear's variants), against float64 at every T range: with f32 weights the linear is exact to
    f32, so the fused prologue must be too; with bf16 ones the input is rounded to bf16 first
    (as the tensor cores take it), and the fused norm's sum order may flip that rounding of an
    element."""
    n, k = 70, 300
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq = rounded(w, w_dtype)
    params = {"n": n, "k": k, "residual": True, "w_dtype": w_dtype}
    params |= {"eps": 1e-5} if kind == "rms_norm_linear" else {"act": "silu"}
    for split in (3, None):
        rule = launch_rule(kind, params, ARCHS["sm_90"])
        if split:
            from llmirc.targets.triton.linear import _prologue_rule
            tile = {16: {"split_k": split}, 128: {"split_k": split}}
            rule = _prologue_rule(kind, rule.params, ARCHS["sm_90"], rule.args, tile)
        ws = shared_workspace(rule)
        for T in LINEAR_T:
            sb, src = buf(rng, T, k, pad=3)
            ub, up = buf(rng, T, k, pad=1)
            norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
            xb, x = buf(rng, T, k, fill=np.nan, pad=2)
            rb, res = buf(rng, T, n, pad=2)
            res0 = res.copy()
            if kind == "rms_norm_linear":
                ref_x = ref_rms_norm(src, norm_w, 1e-5)
                inputs = {"src": sb, "ld_src": ld(sb), "norm_w": norm_w}
            else:
                ref_x = ref_act("silu", src) * up
                inputs = {"gate": sb, "ld_gate": ld(sb), "up": ub, "ld_up": ld(ub)}
            call(rule, out=rb, ld_out=ld(rb), x=xb, ld_x=ld(xb), w=stored(w, w_dtype), bias=np.zeros(1, np.float32),
                 residual=rb, ld_res=ld(rb), T=T, **inputs, **ws)
            if T > 1:  # the prologue's own kernel wrote x
                np.testing.assert_allclose(x, ref_x, rtol=2e-5, atol=1e-6)
            else:  # x untouched (NaN): the fused loads computed it
                assert np.isnan(x).all()
            ref = rounded(ref_x, w_dtype) @ wq.T + res0
            scale = np.abs(ref_x).max(initial=0) * np.abs(wq).sum(1).max() if w_dtype != "float32" else 0
            np.testing.assert_allclose(res, ref, rtol=1e-5, atol=3e-5 + 2 ** -8 * scale / 16,
                                       err_msg=f"T={T} split={split}")


# --- rope and the KV pool

def inv_freq(rot, base=10000.0):
    return [float(np.float32(1.0 / base ** (2 * i / rot))) for i in range(rot // 2)]


ROPE = {  # num_heads, head_dim, rotary_dim, style, base, scaling
    "neox": (3, 16, 16, "neox", 10000.0, 1.0),
    "interleaved": (2, 64, 64, "interleaved", 10000.0, 1.0),
    "partial": (2, 20, 10, "neox", 10000.0, 0.75),
    "partial_inter": (4, 6, 4, "interleaved", 500.0, 1.25),
}


def ref_rope(x, positions, H, hd, rot, style, freqs, scaling):
    out = x.astype(np.float64).copy()
    half = rot // 2
    a = (positions.astype(np.float32)[:, None] * np.asarray(freqs, np.float32)[None, :]).astype(np.float64)
    c, s = np.cos(a) * scaling, np.sin(a) * scaling
    for h in range(H):
        base = h * hd
        i1 = base + (np.arange(half) * 2 if style == "interleaved" else np.arange(half))
        i2 = i1 + 1 if style == "interleaved" else i1 + half
        x1, x2 = x[:, i1].astype(np.float64), x[:, i2].astype(np.float64)
        out[:, i1], out[:, i2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def rope_params(name):
    H, hd, rot, style, base, scaling = ROPE[name]
    return H, {"num_heads": H, "head_dim": hd, "rotary_dim": rot, "style": style, "inv_freq": inv_freq(rot, base),
               "scaling": scaling}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope(rng, name):
    H, p = rope_params(name)
    T, hd = 7, p["head_dim"]
    positions = np.array([0, 1, 5, 130, 4095, 100000, 7], np.int32)
    xb, x = buf(rng, T, H * hd, pad=3)
    ob, out = buf(rng, T, H * hd, fill=np.nan)
    call("rope", p, out=ob, ld_out=ld(ob), x=xb, ld_x=ld(xb), positions=positions, T=T)
    ref = ref_rope(x, positions, H, hd, p["rotary_dim"], p["style"], p["inv_freq"], p["scaling"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    check_guard(ob, T, H * hd)
    call("rope", p, out=xb, ld_out=ld(xb), x=xb, ld_x=ld(xb), positions=positions, T=T)  # in place
    np.testing.assert_array_equal(x, out)


def ref_kv_append(pool, layer, k, v, slots, G, hd, bs):
    pool = pool.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            for g in range(G):
                pool[layer, 0, s // bs, g, s % bs] = k[t, g * hd:(g + 1) * hd]
                pool[layer, 1, s // bs, g, s % bs] = v[t, g * hd:(g + 1) * hd]
    return pool


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "float16"])
def test_kv_append(rng, kv_dtype):
    L, G, hd, bs, nb, T = 2, 2, 12, 4, 7, 17
    pool = rounded(rng.standard_normal((L, 2, nb, G, bs, hd)), kv_dtype)
    kb, k = buf(rng, T, G * hd, pad=5)
    vb, v = buf(rng, T, G * hd, pad=1)
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    slots[[2, 9]] = -1
    dev = stored(pool, kv_dtype)
    call("kv_append", {"num_layers": L, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "kv_dtype": kv_dtype},
         pool=dev, num_blocks=nb, layer=1, k=kb, ld_k=ld(kb), v=vb, ld_v=ld(vb), slot_mapping=slots,
         T=T)
    expect = ref_kv_append(pool, 1, rounded(k, kv_dtype), rounded(v, kv_dtype), slots, G, hd, bs)
    np.testing.assert_array_equal(dev.double().numpy(), expect)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["neox", "partial_inter"])
def test_rope_kv_append(rng, name, kv_dtype):
    """Fused: q rotated into out, k rotated into the pool, v into the pool, by slot."""
    H, p = rope_params(name)
    G, hd, bs, nb, T = 1 if H == 3 else 2, p["head_dim"], 4, 6, 9
    p |= {"num_kv_heads": G, "num_layers": 2, "block_size": bs, "kv_dtype": kv_dtype}
    positions = rng.integers(0, 5000, T).astype(np.int32)
    qb, q = buf(rng, T, H * hd, pad=2)
    kb, k = buf(rng, T, G * hd, pad=1)
    vb, v = buf(rng, T, G * hd, pad=3)
    ob, out = buf(rng, T, H * hd, fill=np.nan)
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    slots[4] = -1
    pool = rounded(rng.standard_normal((2, 2, nb, G, bs, hd)), kv_dtype)
    dev = stored(pool, kv_dtype)
    call("rope_kv_append", p, out=ob, ld_out=ld(ob), q=qb, ld_q=ld(qb), k=kb, ld_k=ld(kb), v=vb,
         ld_v=ld(vb), positions=positions, pool=dev, num_blocks=nb, layer=1, slot_mapping=slots, T=T)
    rope = dict(rot=p["rotary_dim"], style=p["style"], freqs=p["inv_freq"], scaling=p["scaling"])
    np.testing.assert_allclose(out, ref_rope(q, positions, H, hd, **rope), rtol=1e-5, atol=1e-5)
    check_guard(ob, T, H * hd)
    k_rot = ref_rope(k, positions, G, hd, **rope)
    expect = ref_kv_append(pool, 1, k_rot, rounded(v, kv_dtype), slots, G, hd, bs)
    got = dev.double().numpy()
    if kv_dtype == "float32":
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    else:  # the rotated k is rounded once, after an f32 rotation: within one bf16 ulp
        np.testing.assert_allclose(got, expect, rtol=2 ** -8, atol=1e-6)


def quantized_pool(L, G, hd, bs, nb, kv_dtype):
    """int8_pool with the codes viewed as uint8 for FP8, and the device tensor of its bytes."""
    raw, codes, scales = int8_pool(L, G, hd, bs, nb)
    if kv_dtype == "int8":
        return raw, codes, scales, torch.from_numpy(raw.view(np.int8))
    return raw, codes.view(np.uint8), scales, torch.from_numpy(raw).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_kv_append_quantized(rng, kv_dtype):
    """Three sequences in shuffled blocks appended in steps of 1..block_size tokens (runs that start
    blocks, continue them and end them), padding slots, stale bytes in the pool: codes and scales
    bit for bit as the run arithmetic gives them, every value within a rounding per
    requantization, and nothing else in the pool touched."""
    L, G, hd, bs, nb = 2, 2, 12, 4, 11
    raw, codes, scales, dev = quantized_pool(L, G, hd, bs, nb, kv_dtype)
    raw[:] = rng.integers(0, 255, raw.size)
    if kv_dtype != "int8":
        codes[(codes & 0x7F) == 0x7F] = 0  # NaN bytes
    scales[...] = rng.uniform(0.01, 0.1, scales.shape)  # stale, finite
    layer0 = raw.copy()
    blocks = rng.permutation(nb)[:9].reshape(3, 3)
    total = 2 * bs + 3
    k_all = (rng.standard_normal((3, total, G * hd)) * rng.uniform(0.1, 4, (3, total, 1))).astype(np.float32)
    v_all = rng.standard_normal((3, total, G * hd)).astype(np.float32)
    params = {"num_layers": L, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "kv_dtype": kv_dtype}
    pos = 0
    while pos < total:
        step = min(int(rng.integers(1, bs + 1)), total - pos)
        slots = [blocks[s, t // bs] * bs + t % bs for s in range(3) for t in range(pos, pos + step)]
        slots = np.array(slots[:step] + [-1] + slots[step:], np.int32)  # a padding token after the first sequence
        kb = np.concatenate([k_all[0, pos:pos + step], np.full((1, G * hd), np.nan, np.float32)]
                            + [k_all[s, pos:pos + step] for s in (1, 2)])
        vb = np.concatenate([v_all[0, pos:pos + step], np.full((1, G * hd), np.nan, np.float32)]
                            + [v_all[s, pos:pos + step] for s in (1, 2)])
        want_codes, want_scales = ref_kv_append_quantized(codes, scales, 1, kb, vb, slots, G, hd, bs, kv_dtype)
        call("kv_append", params, pool=dev, num_blocks=nb, layer=1, k=kb, ld_k=G * hd, v=vb, ld_v=G * hd,
             slot_mapping=slots, T=len(slots))
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(scales, want_scales)
        pos += step
    step = 0.5 if kv_dtype == "int8" else 2 ** -4  # half a step: absolute (int8), relative (FP8)
    for s in range(3):
        for t in range(total):
            blk, off = blocks[s, t // bs], t % bs
            for kv, src in ((0, k_all), (1, v_all)):
                sc = scales[1, kv, blk]
                first = (t // bs) * bs
                np.testing.assert_allclose(sc, np.abs(src[s, first:first + bs]).reshape(-1, G, hd).max(axis=(0, 2))
                                           / QMAX[kv_dtype], rtol=1e-6)
                got = code_values(codes[1, kv, blk, :, off], kv_dtype) * sc[:, None]
                want = src[s, t].reshape(G, hd)
                err = step * (sc[:, None] if kv_dtype == "int8" else np.abs(want) + sc[:, None] * 2 ** -5)
                assert np.all(np.abs(got - want) <= err * bs + 1e-7)
    untouched = np.ones(raw.size, bool)
    untouched[codes[1].ctypes.data - raw.ctypes.data:][:codes[1].nbytes] = False
    untouched[scales[1].ctypes.data - raw.ctypes.data:][:scales[1].nbytes] = False
    np.testing.assert_array_equal(raw[untouched], layer0[untouched])  # layer 0's codes and scales


def test_quantized_pool_checks():
    params = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 5, "block_size": 3, "kv_dtype": "int8"}
    with pytest.raises(ValueError, match="must be even"):
        launch_rule("kv_append", params, ARCHS["sm_90"])
    with pytest.raises(ValueError, match="no quantized pool"):
        launch_rule("rope_kv_append", {**params, "head_dim": 8, "num_heads": 2, "inv_freq": [1.0] * 4},
                    ARCHS["sm_90"])
    fp8 = {**params, "head_dim": 8, "kv_dtype": "float8_e4m3fn"}
    for arch in ("sm_80", "gfx90a", "gfx942"):
        for kind, extra in (("kv_append", {}), ("paged_attention", {"num_heads": 2, "scale": 0.5})):
            with pytest.raises(ValueError, match=f"{arch} has no float8_e4m3fn conversions"):
                launch_rule(kind, {**fp8, **extra}, ARCHS[arch])


# --- paged attention

ATTN = {  # H, G, head_dim, block_size, sliding_window
    "mha": (4, 4, 16, 4, 0),
    "gqa4_d80": (8, 2, 80, 4, 0),     # head_dim padded to 128
    "mqa_d6_bs3": (4, 1, 6, 3, 0),    # head_dim padded to 16, block size not a power of two
    "swa": (4, 2, 32, 4, 5),
    "gqa7_swa": (14, 2, 64, 16, 40),  # 7 heads per kv head (Qwen2-0.5B), window longer than a block
}
BATCHES = {
    "prefill": [(0, 11)],
    "decode": [(20, 1), (3, 1), (0, 1), (47, 1)],
    "mixed": [(0, 9), (13, 1), (6, 5), (0, 1), (30, 3)],
    "empty_seqs": [(5, 0), (3, 2), (0, 0), (17, 1), (9, 0)],
    "long_decode": [(1500, 1), (300, 1)],  # flash-decoding splits + reduce
    "long_chunk": [(700, 37)],            # chunked prefill over a long cache
}


def attention(rng, name, seqs, kv_dtype, arch="sm_90", in_place=False, softcap=0.0):
    H, G, hd, bs, win = ATTN[name]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 2, G, hd)
    pool = rounded(pool, kv_dtype)
    T, B = len(positions), len(seqs)
    qb, q = buf(rng, T, H * hd, pad=5)
    q *= 2.0  # peaky softmax
    ob, out = (qb, q) if in_place else buf(rng, T, H * hd, pad=3, fill=np.nan)
    ref = ref_attention(rounded(q, kv_dtype), pool, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), win,
                        softcap)
    params = {"num_heads": H, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "scale": 1 / math.sqrt(hd),
              "sliding_window": win, "softcap": softcap, "kv_dtype": kv_dtype}
    rule = launch_rule("paged_attention", params, ARCHS[arch])
    buffers = shared_workspace(rule)  # twice over the same buffers: the split counters are zero again after a call
    tol = 2e-5 if kv_dtype == "float32" else 1e-2  # half pools: q and P rounded to the pool's dtype
    q0 = q.copy()
    for _ in range(2):
        q[...] = q0
        call(rule, out=ob, ld_out=ld(ob), q=qb, ld_q=ld(qb), pool=stored(pool, kv_dtype), num_blocks=nb, layer=1,
             block_tables=bt, max_blocks=mb, seq_lens=lens, query_start_loc=qsl, B=B, positions=positions, T=T,
             **buffers)
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
        if not in_place:
            out[...] = np.nan
    if not in_place:
        check_guard(ob, T, H * hd)
    return rule


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", list(ATTN))
def test_paged_attention(rng, name, batch):
    attention(rng, name, BATCHES[batch], "float32")


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch", ["mixed", "long_decode"])
def test_paged_attention_half_pool(rng, kv_dtype, batch):
    attention(rng, "gqa4_d80", BATCHES[batch], kv_dtype)


@pytest.mark.parametrize("batch", ["mixed", "decode", "long_decode"])
def test_paged_attention_in_place_and_hip(rng, batch):
    """out is q (same pointer and ld); gfx942's rule (more SMs: other split counts)."""
    attention(rng, "swa", BATCHES[batch], "float32", in_place=True)
    attention(rng, "gqa7_swa", BATCHES[batch], "bfloat16", arch="gfx942")


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", ["mixed", "long_decode"])
def test_paged_attention_softcap(rng, batch, kv_dtype):
    """Gemma 2's soft-capped scores (a cap that bends the test's peaky scores), prefill and split decode."""
    attention(rng, "gqa7_swa", BATCHES[batch], kv_dtype, softcap=1.5)
    attention(rng, "mqa_d6_bs3", BATCHES[batch], kv_dtype, softcap=2.0)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("batch", ["mixed", "decode", "long_decode", "long_chunk"])
@pytest.mark.parametrize("name", ["gqa4_d80", "mqa_d6_bs3", "gqa7_swa"])
def test_paged_attention_quantized_pool(rng, name, batch, kv_dtype):
    """Over an int8 or FP8 pool: attention over the values its codes and scales stand for (layer 1
    of 2: the scales sit after both layers' codes), q rounded to bf16 as the kernel rounds it."""
    H, G, hd, bs, win = ATTN[name]
    if hd * bs % 2:
        bs += 1
    _, nb, bt, mb, lens, qsl, positions = make_batch(rng, BATCHES[batch], bs, 2, G, hd)
    _, codes, scales, dev = quantized_pool(2, G, hd, bs, nb, kv_dtype)
    codes[...] = to_codes(rng.uniform(-QMAX[kv_dtype], QMAX[kv_dtype], codes.shape), kv_dtype)
    scales[...] = rng.uniform(0.1, 2.5, scales.shape) / QMAX[kv_dtype]
    values = code_values(codes, kv_dtype) * scales[..., None, None]
    T, B = len(positions), len(bt)
    qb, q = buf(rng, T, H * hd, pad=5)
    q *= 2.0  # peaky softmax
    ob, out = buf(rng, T, H * hd, pad=3, fill=np.nan)
    ref = ref_attention(rounded(q, "bfloat16"), values, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), win)
    params = {"num_heads": H, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "scale": 1 / math.sqrt(hd),
              "sliding_window": win, "kv_dtype": kv_dtype, "num_layers": 2}
    call("paged_attention", params, out=ob, ld_out=ld(ob), q=qb, ld_q=ld(qb), pool=dev, num_blocks=nb, layer=1,
         block_tables=bt, max_blocks=mb, seq_lens=lens, query_start_loc=qsl, B=B, positions=positions, T=T)
    # P times a value scale is rounded to bf16 before P.V: 2^-8 of each term
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(values).max())
    check_guard(ob, T, H * hd)


def test_paged_attention_reads_only_its_layer_and_blocks(rng):
    """NaN in other layers, unused blocks and future slots must not leak into the output."""
    H, G, hd, bs, _ = ATTN["swa"]
    seqs = [(5, 3), (0, 2)]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 2, G, hd)
    clean = pool.copy()
    pool[0] = np.nan
    used = np.zeros(nb, bool)
    used[bt[bt >= 0]] = True
    pool[1, :, ~used] = np.nan
    for b, (c, n) in enumerate(seqs):
        s = c + n
        pool[1, :, bt[b, s // bs], :, s % bs:] = np.nan  # slots after the sequence's last key
    T = len(positions)
    q = rng.standard_normal((T, H * hd)).astype(np.float32)
    out = np.full((T, H * hd), np.nan, np.float32)
    params = {"num_heads": H, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "scale": 0.25}
    for rows in (T, 2):  # prefill kernel; decode kernel on the first two tokens
        call("paged_attention", params, out=out,
             ld_out=H * hd, q=q, ld_q=H * hd, pool=pool, num_blocks=nb, layer=1, block_tables=bt, max_blocks=mb,
             seq_lens=lens, query_start_loc=qsl, B=2, positions=positions, T=rows)
        ref = ref_attention(q, clean, 1, bt, qsl, positions, H, G, hd, bs, 0.25, 0)
        np.testing.assert_allclose(out[:rows], ref[:rows], rtol=2e-5, atol=2e-5)


def test_paged_attention_no_keys_gives_zeros(rng):
    H, G, hd, bs, _ = ATTN["mha"]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, [(3, 1), (0, 2)], bs, 1, G, hd)
    lens[0] = 0  # a sequence with no keys in the cache
    T = len(positions)
    q = rng.standard_normal((T, H * hd)).astype(np.float32)
    out = np.full((T, H * hd), np.nan, np.float32)
    params = {"num_heads": H, "num_kv_heads": G, "head_dim": hd, "block_size": bs, "scale": 0.25}
    call("paged_attention", params, out=out,
         ld_out=H * hd, q=q, ld_q=H * hd, pool=pool, num_blocks=nb, layer=0, block_tables=bt, max_blocks=mb,
         seq_lens=lens, query_start_loc=qsl, B=2, positions=positions, T=T)
    assert (out[0] == 0).all() and np.isfinite(out).all()


# --- argmax and sampling on the device

def test_argmax(rng):
    L, vocab = 9, 5000  # two column blocks of 4096
    lb, logits = buf(rng, L, vocab)
    logits[1, [10, 4500]] = 50.0         # tie across blocks: the first wins
    logits[2, [4097, 4098]] = 60.0       # tie inside a block
    logits[3] = -np.inf                  # all -inf: index 0
    logits[4, 0] = 70.0
    logits[5, [7, 4103]] = 80.0          # tie in one lane (4103 = 4096 + 7)
    logits[6, [300, 4101]] = 90.0        # tie where the later block's lane is the lower one
    logits[7, [4200, 4300]] = np.nan     # NaN counts as the largest: the first one
    logits[8, [5, 4097]] = [np.nan, 1e9]  # a lane's first value NaN, a larger one later in another
    tokens = np.full(L + 1, -7, np.int32)
    call("argmax", {"vocab": vocab}, tokens=tokens, logits=lb, ld_logits=ld(lb), L=L)
    np.testing.assert_array_equal(tokens[:L], np.argmax(logits, axis=1))
    assert tokens[L] == -7


def sample(logits, temperature, top_k, top_p, seeds, offsets):
    L, vocab = logits.shape
    tokens = np.full(L, -1, np.int32)
    lb = np.ascontiguousarray(logits, np.float32)
    call("sample", {"vocab": vocab}, tokens=tokens, logits=lb, ld_logits=vocab,
         temperature=np.asarray(temperature, np.float32), top_k=np.asarray(top_k, np.int32),
         top_p=np.asarray(top_p, np.float32), seeds=np.asarray(seeds, np.int64),
         offsets=np.asarray(offsets, np.int64), L=L)
    return tokens


def test_sample_greedy_rows_and_reproducible(rng):
    logits = rng.standard_normal((4, 3000)).astype(np.float32)
    args = ([0.0, 1e-6, 0.8, 1.3], [0, 5, 50, 0], [1.0, 0.5, 0.9, 0.7], [1, 2, 3, 4], [0, 0, 9, 2**40])
    tokens = sample(logits, *args)
    np.testing.assert_array_equal(tokens[:2], np.argmax(logits[:2], axis=1))  # temperature <= 1e-5: argmax
    np.testing.assert_array_equal(sample(logits, *args), tokens)  # same seeds and offsets: same tokens
    assert (0 <= tokens).all() and (tokens < 3000).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 7, 1.0), (1.5, 0, 0.6), (0.9, 40, 0.8)])
def test_sample_keeps_hf_warped_set(rng, temperature, top_k, top_p):
    """Every drawn token is one Hugging Face's warpers keep (llmirc.runtime.sampling.warp, float64).
    (Few draws: the interpreter takes ~0.3 s per sampled row.)"""
    from llmirc.runtime.sampling import warp
    vocab, L = 1500, 10
    logits = np.repeat((rng.standard_normal((1, vocab)) * 3).astype(np.float32), L, axis=0)
    tokens = sample(logits, [temperature] * L, [top_k] * L, [top_p] * L, [11] * L, np.arange(L))
    kept = np.isfinite(warp(logits[:1], temperature, top_k or None, top_p if top_p < 1 else None))[0]
    assert kept[tokens].all(), sorted(set(tokens[~kept[tokens]]))
    assert len(set(tokens.tolist())) > 1


def test_sample_top_p_ties_and_distribution():
    """Ties at the top-p boundary go lowest index first (HF's stable sort): probabilities
    [.4, .2, .2, .2] with top_p .5 keep tokens 0 and 3; draws follow [.4, .2] renormalized
    (within 4 sigma)."""
    logits = np.log(np.array([[0.4, 0.2, 0.2, 0.2]], np.float32))
    L = 64
    tokens = sample(np.repeat(logits, L, 0), [1.0] * L, [0] * L, [0.5] * L, [5] * L, np.arange(L))
    counts = np.bincount(tokens, minlength=4)
    assert counts[1] == counts[2] == 0, counts
    assert abs(counts[0] / L - 2 / 3) < 4 * math.sqrt(2 / 9 / L), counts
    # top-k ties: k = 2 keeps every score >= the 2nd largest (all three 0.2s with the 0.4)
    tokens = sample(logits.repeat(40, 0), [1.0] * 40, [2] * 40, [1.0] * 40, [9] * 40, np.arange(40))
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_advance_step(rng):
    """advance_step against its definition (sampling.py): step s's tokens land in row s of `out`;
    live rows move to their next position (row 1 into its next block), the padding row (slot -1)
    stays, a token past the embedding's rows feeds 0, and a table entry past max_blocks reads as
    block 0 (row 4: only after a run's last step)."""
    B, bs, max_blocks, token_rows = 5, 4, 3, 100
    tables = rng.permutation(64)[:B * max_blocks].reshape(B, max_blocks).astype(np.int32)
    pos = np.array([2, 3, 7, 0, 11], np.int32)
    slots = (tables[np.arange(B), pos // bs] * bs + pos % bs).astype(np.int32)
    slots[3] = -1
    ids, lens = rng.integers(0, token_rows, B).astype(np.int32), pos + 1
    tokens = np.array([7, 150, 9, 4, 3], np.int32)
    state = {"token_ids": ids.copy(), "positions": pos.copy(), "slot_mapping": slots.copy(), "seq_lens": lens.copy()}
    out, step = np.full((3, B), -9, np.int32), np.array([1], np.int32)
    call("advance_step", {"block_size": bs}, tokens=tokens, block_tables=tables, out=out, step=step, B=B,
         max_blocks=max_blocks, token_rows=token_rows, **state)
    np.testing.assert_array_equal(out, [[-9] * B, tokens, [-9] * B])
    assert step.tolist() == [2]
    live, p = slots >= 0, pos + 1
    entry = tables[np.arange(B), np.minimum(p // bs, max_blocks - 1)] * (p // bs < max_blocks)
    np.testing.assert_array_equal(state["token_ids"], np.where(live, np.where(tokens < token_rows, tokens, 0), ids))
    np.testing.assert_array_equal(state["positions"], np.where(live, p, pos))
    np.testing.assert_array_equal(state["seq_lens"], np.where(live, lens + 1, lens))
    np.testing.assert_array_equal(state["slot_mapping"], np.where(live, entry * bs + p % bs, slots))
    assert state["slot_mapping"][1] == tables[1, 1] * bs and state["slot_mapping"][4] == 0
