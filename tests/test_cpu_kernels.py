"""CPU kernels against float64 NumPy references.

All kernels below go into one LLVM module, compiled once per test module for the host
('native') and for the portable baseline variant (which also runs here), and are called
through ctypes. Outputs are poisoned with NaN before each call; strided buffers (ld larger
than the row) check that padding columns and rows past T are never written.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os

import numpy as np
import pytest
from llvmlite import ir

from llmirc import dtypes, quant
from llmirc.targets.cpu import irbuilder as irb
from llmirc.targets.cpu import kernels as K
from llmirc.targets.cpu import toolchain as tc
from llmirc.targets.cpu.target import compile_module
from llmirc.targets.signatures import SIGNATURES, signature

from helpers import (INVARIANCE_TARGETS, buf, check_attention_batch_invariance, check_guard, ld, make_batch,
                     one_worker_each, ref_attention)

ROWS = [0, 1, 3, 17, 130]
# (dim, block): blocks narrower than, as wide as and wider than the vector registers, one or many
HADAMARD = [(16, 2), (16, 4), (64, 8), (48, 16), (128, 128), (384, 128), (192, 64)]


def _inv_freq(rot, base=10000.0):
    return [float(np.float32(1.0 / base ** (2 * i / rot))) for i in range(rot // 2)]


# (n, k): n % 4 != 0, k % 16 != 0, k split into slices (513, 2050, 1024), and with k = 1024
# T = 130 crosses a token slice (128 tokens)
LINEAR_SHAPES = [(1, 1), (5, 3), (30, 77), (64, 64), (33, 100), (130, 513), (10, 2050),
                 (6, 1024)]
# Every flag combination (bias, residual: the store's) for a tail, an unaligned k and k slices; none
# and both for the rest (the other two add nothing there: each linear kernel takes about a second to compile).
LINEAR_CASES = [(n, k, bias, res) for n, k in LINEAR_SHAPES
                for bias, res in ((False, False), (True, False), (False, True), (True, True))
                if (n, k) in ((5, 3), (30, 77), (130, 513)) or bias == res]
ROPE = {
    "rope_neox": dict(num_heads=3, head_dim=16, rotary_dim=16, style="neox",
                      inv_freq=_inv_freq(16), scaling=1.0),
    "rope_inter": dict(num_heads=2, head_dim=64, rotary_dim=64, style="interleaved",
                       inv_freq=_inv_freq(64), scaling=1.0),
    "rope_partial": dict(num_heads=2, head_dim=20, rotary_dim=10, style="neox",
                         inv_freq=_inv_freq(10), scaling=0.75),
    "rope_partial_inter": dict(num_heads=4, head_dim=6, rotary_dim=4, style="interleaved",
                               inv_freq=_inv_freq(4, 500.0), scaling=1.25),
    "rope_big": dict(num_heads=2, head_dim=128, rotary_dim=128, style="neox",
                     inv_freq=_inv_freq(128, 1e6), scaling=1.0),
}
# rope_kv_append: a rope of ROPE's (q heads), its kv heads, the pool's block size and dtype
RKV = {
    "rkv_neox": ("rope_neox", 1, 4, "float32"),
    "rkv_partial_inter": ("rope_partial_inter", 2, 4, "bfloat16"),
    "rkv_big": ("rope_big", 1, 16, "float16"),
}
ATTN = {  # H, G, head_dim, block_size, sliding_window
    "attn_mha": (4, 4, 16, 4, 0),
    "attn_gqa2": (4, 2, 8, 16, 0),
    "attn_gqa4": (8, 2, 80, 4, 0),
    "attn_mqa": (4, 1, 6, 3, 0),
    "attn_swa": (4, 2, 32, 4, 5),
    "attn_swa1": (2, 1, 16, 8, 1),
    "attn_d128": (2, 2, 128, 16, 0),
    "attn_gqa8": (8, 1, 16, 4, 0),   # 8 heads per kv head
    "attn_gqa6": (12, 2, 8, 16, 3),  # prefill units take 2 of a kv head's 6 heads, window
    "attn_swa_long": (4, 2, 32, 16, 700),  # a window much longer than a block (and split-K)
    "attn_gqa8x8": (64, 8, 8, 4, 0),  # 8 heads per kv head, 8 kv heads: a decode unit
                                      # takes some of the kv heads
}
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
HALF = ["bfloat16", "float16"]  # storage types of weights and KV caches besides float32
# (shapes of the half-precision linear tests: the decode path with k slices, prefill, tails)
# (and on hosts with AMX-BF16, bf16 weights with k % 32 == 0 and n % 16 == 0 at T = 130 take the
# AMX path: whole and half 32-row pairs, token tails)
HALF_LINEAR_SHAPES = [(5, 3), (33, 100), (130, 513), (10, 2050), (48, 96), (64, 256)]
# bf16 weights with neither flag and with both; f16 (read by the same code but for the widening) with both
HALF_LINEAR_CASES = [(n, k, flags, dt) for n, k in HALF_LINEAR_SHAPES for dt in HALF for flags in ("00", "11")
                     if dt == "bfloat16" or flags == "11"]
HALF_ATTN = ["attn_gqa2", "attn_gqa4", "attn_d128", "attn_swa"]
# Gemma 2's soft-capped scores (a cap small enough to bend the test's peaky scores): rows in lanes and in tiles
ATTN_SOFTCAP = {"attn_cap_gqa2": ("attn_gqa2", 2.0), "attn_cap_swa": ("attn_swa", 1.5),
                "attn_cap_d128": ("attn_d128", 3.0)}
SOFTCAP_DIMS = (13, 300)
EMBED_SCALE = float(np.float32(1152 ** 0.5))  # Gemma 3 1B's embedding scale
HEAD_NORMS = [(16, 3), (64, 2), (128, 8), (7, 5)]  # rms_norm per head (dim, heads): Qwen3's q_norm, k_norm


def _specs():
    s = []
    for d in (37, 64):
        s.append((f"embedding_{d}", "embedding", dict(dim=d)))
        for dt in HALF:
            s.append((f"embedding_{d}_{dt}", "embedding", dict(dim=d, dtype=dt)))
    for dt in ("float32", "bfloat16"):  # Gemma's sqrt(hidden_size)
        s.append((f"embedding_scaled_{dt}", "embedding", dict(dim=37, dtype=dt, scale=EMBED_SCALE)))
    for d in (1, 7, 64, 100, 1000):
        s.append((f"rms_{d}", "rms_norm", dict(dim=d, eps=1e-6)))
    for d, h in HEAD_NORMS:
        s.append((f"rms_{d}x{h}", "rms_norm", dict(dim=d, eps=1e-6, heads=h)))
    for d in (7, 100, 1000):
        for bias in (True, False):
            s.append((f"ln_{d}_{int(bias)}", "layer_norm", dict(dim=d, eps=1e-5, bias=bias)))
    for n, k, bias, res in LINEAR_CASES:
        s.append((f"lin_{n}_{k}_{int(bias)}{int(res)}", "linear", dict(n=n, k=k, bias=bias, residual=res)))
    for n, k, flags, dt in HALF_LINEAR_CASES:
        s.append((f"lin_{n}_{k}_{flags}_{dt}", "linear",
                  dict(n=n, k=k, bias=flags == "11", residual=flags == "11", w_dtype=dt)))
    for name, p in ROPE.items():
        s.append((name, "rope", p))
    for name, (rope, G, bs, dt) in RKV.items():
        s.append((name, "rope_kv_append", dict(ROPE[rope], num_kv_heads=G, num_layers=2, block_size=bs, kv_dtype=dt)))
    s.append(("kv_app", "kv_append", dict(num_layers=2, num_kv_heads=2, head_dim=12,
                                           block_size=4)))
    s.append(("kv_app1", "kv_append", dict(num_layers=1, num_kv_heads=1, head_dim=64,
                                            block_size=16)))
    for dt in HALF:
        s.append((f"kv_app_{dt}", "kv_append", dict(num_layers=2, num_kv_heads=2, head_dim=12,
                                                     block_size=4, kv_dtype=dt)))
    for name, (h, g, hd, bs, win) in ATTN.items():
        s.append((name, "paged_attention", dict(num_heads=h, num_kv_heads=g, head_dim=hd,
                                                block_size=bs, scale=1 / math.sqrt(hd),
                                                sliding_window=win)))
        for dt in HALF if name in HALF_ATTN else ():
            s.append((f"{name}_{dt}", "paged_attention", dict(
                num_heads=h, num_kv_heads=g, head_dim=hd, block_size=bs, scale=1 / math.sqrt(hd),
                sliding_window=win, kv_dtype=dt)))
    for name, (base, cap) in ATTN_SOFTCAP.items():
        h, g, hd, bs, win = ATTN[base]
        s.append((name, "paged_attention", dict(num_heads=h, num_kv_heads=g, head_dim=hd, block_size=bs,
                                                scale=1 / math.sqrt(hd), sliding_window=win, softcap=cap)))
    for d in SOFTCAP_DIMS:
        s.append((f"softcap_{d}", "softcap", dict(dim=d, cap=30.0)))
    for act in ACTS:
        for d in (1, 13, 64, 300):
            s.append((f"actmul_{act}_{d}", "act_mul", dict(dim=d, act=act)))
            s.append((f"act_{act}_{d}", "act", dict(dim=d, act=act)))
    for d in (5, 64):
        s.append((f"gather_{d}", "gather_rows", dict(dim=d)))
        s.append((f"add_{d}", "add", dict(dim=d)))
    for d, bs in HADAMARD:
        s.append((f"hadamard_{d}_{bs}", "hadamard", dict(dim=d, block=bs)))
    return s


class Lib:
    def __init__(self, path, variant):
        self.dll = ctypes.CDLL(str(path))
        self.variant = variant
        self.kinds = {sym: kind for sym, kind, _ in _specs()}

    def __getattr__(self, sym):
        f = getattr(self.dll, sym)
        f.restype = None
        argt = [ctypes.c_void_p if p.type == "ptr" else ctypes.c_int64
                for p in signature(self.kinds[sym]).params]
        f.argtypes = argt

        def call(*args):
            assert len(args) == len(argt)
            conv = []
            for a in args:
                if isinstance(a, np.ndarray):
                    conv.append(a.__array_interface__["data"][0])
                else:
                    conv.append(a)
            f(*conv)
        return call


def _variant(name):
    """native, the portable baseline, and (where this host can run it and its native code is not
    already 8-lane AVX2) x86-64-v3, so 16-, 4- and 8-lane code paths all run. The baseline reads
    decode's weights the other way from native (one row at a time or in row blocks,
    CpuVariant.one_row_decode), so that both run on every host."""
    if name == "native":
        return tc.host_variant()
    if name == "baseline":
        return dataclasses.replace(tc.baseline_variant(), one_row_decode=not tc.host_variant().one_row_decode)
    host = tc.host_variant()
    if not {"avx2", "fma", "f16c", "bmi2", "movbe"} <= set(host.required_flags):
        pytest.skip(f"this host cannot run {name}")
    if host.vector_width == 8 and not any(f.startswith("avx512") for f in host.required_flags):
        pytest.skip(f"{name}: this host's native library is already 8-lane AVX2 code")
    return tc.variants_for([name])[0]


@pytest.fixture(scope="module", params=one_worker_each("cpu-kernels", ["native", "baseline", "x86-64-v3"]))
def lib(request, tmp_path_factory):
    variant = _variant(request.param)
    module = ir.Module(name="test_kernels")
    for sym, kind, params in _specs():
        K.emit_kernel(module, kind, sym, params, variant)
    obj = compile_module(module, variant)
    path = tmp_path_factory.mktemp(request.param) / "libtest.so"
    tc.link_shared([obj], path)
    return Lib(path, variant)


@pytest.fixture
def rng():
    """Fresh inputs each run; the seed is printed (shown on failure) and LLMIRC_TEST_SEED
    replays it."""
    seed = int(os.environ.get("LLMIRC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"LLMIRC_TEST_SEED={seed}")
    return np.random.default_rng(seed)


# --- embedding / gather / add

def stored(rng, shape, dtype):
    """Random data stored as `dtype` (bf16 as uint16 bits) and its exact float64 value."""
    x = rng.standard_normal(shape).astype(np.float32)
    data = dtypes.from_float32(x, dtype)
    return data, dtypes.to_float32(data, dtype).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", *HALF])
@pytest.mark.parametrize("dim", [37, 64])
@pytest.mark.parametrize("T", ROWS)
def test_embedding(lib, rng, dim, T, dtype):
    vocab = 50
    table, exact = stored(rng, (vocab, dim), dtype)
    ids = rng.integers(0, vocab, T if T else 1).astype(np.int32)
    ob, out = buf(rng, T, dim, fill=np.nan)
    getattr(lib, f"embedding_{dim}" + ("" if dtype == "float32" else f"_{dtype}"))(ob, ld(ob), table, ids, T)
    np.testing.assert_array_equal(out, exact[ids[:T]])
    check_guard(ob, T, dim)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [0, 3, 130])
def test_embedding_scaled(lib, rng, T, dtype):
    """Rows times the scale: one float32 multiply each."""
    table, exact = stored(rng, (50, 37), dtype)
    ids = rng.integers(0, 50, max(T, 1)).astype(np.int32)
    ob, out = buf(rng, T, 37, fill=np.nan)
    getattr(lib, f"embedding_scaled_{dtype}")(ob, ld(ob), table, ids, T)
    np.testing.assert_array_equal(out, exact[ids[:T]].astype(np.float32) * np.float32(EMBED_SCALE))
    check_guard(ob, T, 37)


@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("L", [0, 1, 5, 130])
def test_gather_rows(lib, rng, dim, L):
    xb, x = buf(rng, 40, dim, pad=7)
    idx = rng.integers(0, 40, max(L, 1)).astype(np.int32)
    ob, out = buf(rng, L, dim, fill=np.nan)
    getattr(lib, f"gather_{dim}")(ob, ld(ob), xb, ld(xb), idx, L)
    np.testing.assert_array_equal(out, x[idx[:L]])
    check_guard(ob, L, dim)


@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("T", ROWS)
def test_add(lib, rng, dim, T):
    ab, a = buf(rng, T, dim, pad=1)
    bb, b = buf(rng, T, dim, pad=5)
    ob, out = buf(rng, T, dim, fill=np.nan)
    f = getattr(lib, f"add_{dim}")
    f(ob, ld(ob), ab, ld(ab), bb, ld(bb), T)
    np.testing.assert_array_equal(out, a + b)
    check_guard(ob, T, dim)
    a0, b0 = a.copy(), b.copy()
    f(ab, ld(ab), ab, ld(ab), bb, ld(bb), T)  # in place: out == a
    np.testing.assert_array_equal(a, a0 + b0)
    a[...] = a0
    f(bb, ld(bb), ab, ld(ab), bb, ld(bb), T)  # out == b
    np.testing.assert_array_equal(b, a0 + b0)


@pytest.mark.parametrize("dim,block", HADAMARD)
@pytest.mark.parametrize("T", ROWS)
def test_hadamard(lib, rng, dim, block, T):
    xb, x = buf(rng, T, dim, pad=2)
    ob, out = buf(rng, T, dim, fill=np.nan)
    f = getattr(lib, f"hadamard_{dim}_{block}")
    f(ob, ld(ob), xb, ld(xb), T)
    h = np.array([[(-1) ** bin(i & j).count("1") for j in range(block)] for i in range(block)]) / math.sqrt(block)
    ref = (x.astype(np.float64).reshape(T, dim // block, block) @ h).reshape(T, dim)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * (1 + np.abs(x).max(initial=0)) * math.log2(block))
    np.testing.assert_allclose(ref, quant.hadamard(x, block), rtol=0, atol=1e-12)
    check_guard(ob, T, dim)
    f(ob, ld(ob), ob, ld(ob), T)  # in place, and its own inverse
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-6 * (1 + np.abs(x).max(initial=0)) * math.log2(block))
    check_guard(ob, T, dim)


# --- norms

def ref_rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("dim", [1, 7, 64, 100, 1000])
@pytest.mark.parametrize("T", ROWS)
def test_rms_norm(lib, rng, dim, T):
    xb, x = buf(rng, T, dim, pad=9)
    x *= 3.0
    w = rng.standard_normal(dim).astype(np.float32)
    ob, out = buf(rng, T, dim, fill=np.nan)
    f = getattr(lib, f"rms_{dim}")
    f(ob, ld(ob), xb, ld(xb), w, T)
    np.testing.assert_allclose(out, ref_rms(x, w, 1e-6), rtol=2e-5, atol=1e-6)
    check_guard(ob, T, dim)
    ref = ref_rms(x, w, 1e-6)
    f(xb, ld(xb), xb, ld(xb), w, T)  # in place
    np.testing.assert_allclose(x, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dim, heads", HEAD_NORMS)
@pytest.mark.parametrize("T", ROWS)
def test_rms_norm_per_head(lib, rng, dim, heads, T):
    """Each of a row's heads normalized on its own, with the one weight [dim]."""
    xb, x = buf(rng, T, dim * heads, pad=5)
    x *= 3.0
    w = rng.standard_normal(dim).astype(np.float32)
    ref = ref_rms(x.reshape(T, heads, dim), w, 1e-6).reshape(T, dim * heads)
    ob, out = buf(rng, T, dim * heads, fill=np.nan)
    f = getattr(lib, f"rms_{dim}x{heads}")
    f(ob, ld(ob), xb, ld(xb), w, T)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)
    check_guard(ob, T, dim * heads)
    f(xb, ld(xb), xb, ld(xb), w, T)  # in place
    np.testing.assert_allclose(x, ref, rtol=2e-5, atol=1e-6)


def test_rms_norm_eps_and_zero_row(lib, rng):
    x = np.zeros((2, 7), np.float32)
    x[1] = 1e-4
    w = np.ones(7, np.float32)
    out = np.full((2, 7), np.nan, np.float32)
    lib.rms_7(out, 7, x, 7, w, 2)
    np.testing.assert_allclose(out, ref_rms(x, w, 1e-6), rtol=2e-5)


def ref_ln(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y + b if b is not None else y


@pytest.mark.parametrize("dim", [7, 100, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", ROWS)
def test_layer_norm(lib, rng, dim, bias, T):
    xb, x = buf(rng, T, dim, pad=2)
    x += 5.0  # a large mean: the variance must not cancel
    w = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32) if bias else None
    ob, out = buf(rng, T, dim, fill=np.nan)
    getattr(lib, f"ln_{dim}_{int(bias)}")(ob, ld(ob), xb, ld(xb), w, b, T)
    np.testing.assert_allclose(out, ref_ln(x, w, b, 1e-5), rtol=5e-5, atol=5e-5)
    check_guard(ob, T, dim)


# --- linear


@pytest.mark.parametrize("n,k,bias,res", LINEAR_CASES)
@pytest.mark.parametrize("T", [0, 1, 2, 3, 4, 5, 17, 130])
def test_linear(lib, rng, n, k, bias, res, T):
    xb, x = buf(rng, T, k, pad=3)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bv = rng.standard_normal(n).astype(np.float32) if bias else None
    rb, r = buf(rng, T, n, pad=6) if res else (None, None)
    ob, out = buf(rng, T, n, pad=2, fill=np.nan)
    f = getattr(lib, f"lin_{n}_{k}_{int(bias)}{int(res)}")
    f(ob, ld(ob), xb, ld(xb), w, bv, rb, ld(rb) if res else 0, T)

    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    scale = math.sqrt(k) * (np.abs(x64) @ np.abs(w64).T)  # error scale of each dot product
    if bias:
        ref += bv
        scale += np.abs(bv)
    if res:
        ref += r
        scale += np.abs(r)
    tol = 1e-6 * (scale + np.abs(ref)) + 1e-30
    assert np.all(np.abs(out - ref) <= tol), np.abs(out - ref).max()
    check_guard(ob, T, n)

    if res:  # in place: out is the residual buffer
        f(rb, ld(rb), xb, ld(xb), w, bv, rb, ld(rb), T)
        assert np.all(np.abs(r - ref) <= tol)


@pytest.mark.parametrize("n,k", [(33, 100), (130, 513), (10, 2050)])
def test_linear_token_counts(lib, rng, n, k):
    """Every token count from 1 to 70 (balanced token groups of every size, the decode path
    with its k slices) and around the switch to the prefill path (k = 513: 128 tokens,
    k = 2050: 63 tokens); each token's outputs bit for bit those it gets alone (batch
    invariance, README)."""
    counts = list(range(1, 71)) + ([127, 128, 129] if k == 513 else [])
    xb, x = buf(rng, max(counts), k, pad=3)
    rb, r_all = buf(rng, max(counts), n, pad=6)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bv = rng.standard_normal(n).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    f = getattr(lib, f"lin_{n}_{k}_11")
    alone = np.empty((max(counts), n), np.float32)
    for t in range(max(counts)):
        f(alone[t:], n, xb[t:], ld(xb), w, bv, rb[t:], ld(rb), 1)
    for T in counts:
        r = r_all[:T]
        ob, out = buf(rng, T, n, pad=2, fill=np.nan)
        f(ob, ld(ob), xb, ld(xb), w, bv, rb, ld(rb), T)
        ref = x64[:T] @ w64.T + bv + r
        scale = math.sqrt(k) * (np.abs(x64[:T]) @ np.abs(w64).T) + np.abs(bv) + np.abs(r)
        tol = 1e-6 * (scale + np.abs(ref)) + 1e-30
        assert np.all(np.abs(out - ref) <= tol), (T, np.abs(out - ref).max())
        check_guard(ob, T, n)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{T} tokens: not what each token gets alone")


@pytest.mark.parametrize("n,k,flags,dtype", HALF_LINEAR_CASES)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 130, 300])
def test_linear_half_weights(lib, rng, n, k, flags, T, dtype):
    """bf16/f16 weights, read as stored and widened exactly: f32 accuracy on their values."""
    xb, x = buf(rng, T, k, pad=3)
    w, w64 = stored(rng, (n, k), dtype)
    both = flags == "11"
    bv = rng.standard_normal(n).astype(np.float32) if both else None
    rb, r = buf(rng, T, n, pad=6) if both else (None, None)
    ob, out = buf(rng, T, n, pad=2, fill=np.nan)
    getattr(lib, f"lin_{n}_{k}_{flags}_{dtype}")(ob, ld(ob), xb, ld(xb), w, bv, rb, ld(rb) if both else 0, T)
    x64 = x.astype(np.float64)
    ref = x64 @ w64.T + (bv + r if both else 0)
    scale = math.sqrt(k) * (np.abs(x64) @ np.abs(w64).T) + (np.abs(bv) + np.abs(r) if both else 0)
    tol = 1e-6 * (scale + np.abs(ref)) + 1e-30
    assert np.all(np.abs(out - ref) <= tol), np.abs(out - ref).max()
    check_guard(ob, T, n)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,k", [(33, 100), (130, 513), (10, 2050), (64, 256)])
def test_linear_half_weights_token_counts(lib, rng, n, k, dtype):
    """bf16/f16 weights at every token count from 1 to 70 and around the switch to the prefill
    path (k = 513): each token's outputs bit for bit those it gets alone, as with f32 weights
    (batch invariance, README). (64, 256) takes AMX tiles from 32 tokens on a host that has them,
    which sum in their own order: checked below that only."""
    counts = list(range(1, 71)) + ([127, 128, 129] if k == 513 else [])
    if (n, k) == (64, 256) and dtype == "bfloat16" and lib.variant.has("amx-bf16"):
        counts = [c for c in counts if c < 32]
    xb, x = buf(rng, max(counts), k, pad=3)
    rb, _ = buf(rng, max(counts), n, pad=6)
    w, w64 = stored(rng, (n, k), dtype)
    bv = rng.standard_normal(n).astype(np.float32)
    f = getattr(lib, f"lin_{n}_{k}_11_{dtype}")
    alone = np.empty((max(counts), n), np.float32)
    for t in range(max(counts)):
        f(alone[t:], n, xb[t:], ld(xb), w, bv, rb[t:], ld(rb), 1)
    for T in counts:
        ob, out = buf(rng, T, n, pad=2, fill=np.nan)
        f(ob, ld(ob), xb, ld(xb), w, bv, rb, ld(rb), T)
        check_guard(ob, T, n)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{T} tokens: not what each token gets alone")


def test_linear_special_values(lib, rng):
    """inf and NaN in x propagate to exactly the outputs of the affected rows."""
    x = rng.standard_normal((5, 77)).astype(np.float32)
    x[1, 3] = np.nan
    x[3, 70] = np.inf
    w = np.abs(rng.standard_normal((30, 77)).astype(np.float32)) + 0.1
    out = np.zeros((5, 30), np.float32)
    lib.lin_30_77_00(out, 30, x, 77, w, None, None, 0, 5)
    assert np.isnan(out[1]).all() and np.isposinf(out[3]).all()
    assert np.isfinite(out[[0, 2, 4]]).all()


# --- rope

def ref_rope(x, pos, p):
    H, hd = p["num_heads"], p["head_dim"]
    rot = p["rotary_dim"]
    half = rot // 2
    inv = np.asarray(p["inv_freq"], np.float32)
    ang = (pos.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)  # f32 product
    c, s = np.cos(ang) * p["scaling"], np.sin(ang) * p["scaling"]
    x = x.astype(np.float64).reshape(len(pos), H, hd)
    out = x.copy()
    if p["style"] == "neox":
        x1, x2 = x[:, :, :half], x[:, :, half:rot]
        out[:, :, :half] = x1 * c[:, None] - x2 * s[:, None]
        out[:, :, half:rot] = x2 * c[:, None] + x1 * s[:, None]
    else:
        x1, x2 = x[:, :, 0:rot:2], x[:, :, 1:rot:2]
        out[:, :, 0:rot:2] = x1 * c[:, None] - x2 * s[:, None]
        out[:, :, 1:rot:2] = x2 * c[:, None] + x1 * s[:, None]
    return out.reshape(len(pos), H * hd)


@pytest.mark.parametrize("name", list(ROPE))
@pytest.mark.parametrize("T", ROWS)
def test_rope(lib, rng, name, T):
    p = ROPE[name]
    width = p["num_heads"] * p["head_dim"]
    xb, x = buf(rng, T, width, pad=4)
    pos = rng.integers(0, 100_000 if T % 2 else 2048, max(T, 1)).astype(np.int32)
    ob, out = buf(rng, T, width, fill=np.nan)
    f = getattr(lib, name)
    f(ob, ld(ob), xb, ld(xb), pos, T)
    ref = ref_rope(x, pos[:T], p)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6 * p["scaling"] * 4)
    check_guard(ob, T, width)
    f(xb, ld(xb), xb, ld(xb), pos, T)  # in place (q/k slices of a fused qkv buffer)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


# --- KV cache and attention

def test_kv_append(lib, rng):
    L, G, hd, bs, nb = 2, 2, 12, 4, 7
    pool = rng.standard_normal((L, 2, nb, G, bs, hd)).astype(np.float32)
    T = 17
    kb, k = buf(rng, T, G * hd, pad=5)
    vb, v = buf(rng, T, G * hd, pad=1)
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    slots[[2, 9]] = -1
    expect = pool.copy()
    for t in range(T):
        s = slots[t]
        if s < 0:
            continue
        for g in range(G):
            expect[1, 0, s // bs, g, s % bs] = k[t, g * hd:(g + 1) * hd]
            expect[1, 1, s // bs, g, s % bs] = v[t, g * hd:(g + 1) * hd]
    lib.kv_app(pool, nb, 1, kb, ld(kb), vb, ld(vb), slots, T)
    np.testing.assert_array_equal(pool, expect)
    lib.kv_app(pool, nb, 1, kb, ld(kb), vb, ld(vb), slots, 0)
    np.testing.assert_array_equal(pool, expect)


def test_kv_append_many_tokens(lib, rng):
    nb, bs, hd = 40, 16, 64
    pool = np.zeros((1, 2, nb, 1, bs, hd), np.float32)
    T = 600
    k = rng.standard_normal((T, hd)).astype(np.float32)
    v = rng.standard_normal((T, hd)).astype(np.float32)
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    lib.kv_app1(pool, nb, 0, k, hd, v, hd, slots, T)
    flat = pool.reshape(2, nb * bs, hd)
    np.testing.assert_array_equal(flat[0, slots], k)
    np.testing.assert_array_equal(flat[1, slots], v)


@pytest.mark.parametrize("dtype", HALF)
def test_kv_append_half(lib, rng, dtype):
    """f32 K/V rounded to nearest even into a bf16/f16 pool, as torch rounds them."""
    L, G, hd, bs, nb = 2, 2, 12, 4, 7
    pool, _ = stored(rng, (L, 2, nb, G, bs, hd), dtype)
    T = 17
    kb, k = buf(rng, T, G * hd, pad=5)
    vb, v = buf(rng, T, G * hd, pad=1)
    k[0, :4] = [np.inf, -np.inf, 3.4e38, -1e-40]
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    slots[[2, 9]] = -1
    expect = pool.copy()
    for t in range(T):
        s = slots[t]
        if s >= 0:
            for g in range(G):
                expect[1, 0, s // bs, g, s % bs] = dtypes.from_float32(k[t, g * hd:(g + 1) * hd], dtype)
                expect[1, 1, s // bs, g, s % bs] = dtypes.from_float32(v[t, g * hd:(g + 1) * hd], dtype)
    getattr(lib, f"kv_app_{dtype}")(pool, nb, 1, kb, ld(kb), vb, ld(vb), slots, T)
    np.testing.assert_array_equal(pool, expect)


@pytest.mark.parametrize("name", list(RKV))
@pytest.mark.parametrize("T", ROWS)
def test_rope_kv_append(lib, rng, name, T):
    """rope of q into out, rope of k and v into the pool by slot (rounded once to its dtype), in
    one kernel: as rope then kv_append give them; q, k and v untouched, other slots too."""
    rope, G, bs, dt = RKV[name]
    p = ROPE[rope]
    H, hd = p["num_heads"], p["head_dim"]
    nb = 40
    pool, _ = stored(rng, (2, 2, nb, G, bs, hd), dt)
    qb, q = buf(rng, T, H * hd, pad=3)
    kb, k = buf(rng, T, G * hd, pad=2)
    vb, v = buf(rng, T, G * hd, pad=5)
    inputs = [a.copy() for a in (qb, kb, vb)]
    pos = rng.integers(0, 100_000, max(T, 1)).astype(np.int32)
    slots = rng.permutation(nb * bs)[:max(T, 1)].astype(np.int32)
    slots[::4] = -1
    ob, out = buf(rng, T, H * hd, fill=np.nan)
    before = pool.copy()
    getattr(lib, name)(ob, ld(ob), qb, ld(qb), kb, ld(kb), vb, ld(vb), pos, pool, nb, 1, slots, T)
    np.testing.assert_allclose(out, ref_rope(q, pos[:T], p), rtol=1e-5, atol=1e-5)
    check_guard(ob, T, H * hd)
    for a, b in zip((qb, kb, vb), inputs):
        np.testing.assert_array_equal(a, b)
    k_rot = ref_rope(k, pos[:T], dict(p, num_heads=G))
    got = dtypes.to_float32(pool, dt).astype(np.float64)
    expect = dtypes.to_float32(before, dt).astype(np.float64)
    for t in range(T):
        if slots[t] >= 0:
            blk, off = divmod(int(slots[t]), bs)
            expect[1, 0, blk, :, off] = k_rot[t].reshape(G, hd)
            expect[1, 1, blk, :, off] = dtypes.to_float32(dtypes.from_float32(v[t], dt), dt).reshape(G, hd)
    tol = {"float32": 1e-5, "bfloat16": 2 ** -8, "float16": 2 ** -10}[dt]  # k rounded once, after an f32 rope
    np.testing.assert_allclose(got, expect, rtol=tol, atol=1e-5)


BATCHES = {
    "prefill": [(0, 11)],
    "decode": [(20, 1), (3, 1), (0, 1), (47, 1)],
    "mixed": [(0, 9), (13, 1), (6, 5), (0, 1), (30, 3)],
    "long_prefill": [(0, 70), (5, 40)],
    # decode of many sequences of different lengths (block boundaries, empty caches)
    "many_decode": [(c, 1) for c in (0, 1, 5, 15, 16, 17, 31, 33, 64, 100, 127, 200, 255,
                                     256, 300, 2, 9, 48, 80)],
    "long_decode": [(3000, 1)],               # one long context: split-K
    "long_decode2": [(2500, 1), (40, 1)],
    "long_chunk": [(1500, 37)],               # chunked prefill over a long cache
    "mixed_long": [(1200, 1), (0, 33), (700, 5), (3, 2), (0, 1)],
    "empty_seqs": [(5, 0), (3, 2), (0, 0), (17, 1), (9, 0)],  # sequences without new tokens
}


@pytest.mark.parametrize("name", list(ATTN))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention(lib, rng, name, batch):
    H, G, hd, bs, win = ATTN[name]
    seqs = BATCHES[batch]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 2, G, hd)
    T, B = len(positions), len(seqs)
    qb, q = buf(rng, T, H * hd, pad=5)
    q *= 2.0  # peaky softmax
    ob, out = buf(rng, T, H * hd, pad=3, fill=np.nan)
    scale = 1 / math.sqrt(hd)
    getattr(lib, name)(ob, ld(ob), qb, ld(qb), pool, nb, 1, bt, mb, lens, qsl, B, positions, T)
    ref = ref_attention(q, pool, 1, bt, qsl, positions, H, G, hd, bs, scale, win)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
    check_guard(ob, T, H * hd)
    # in place: out is q (same pointer and ld)
    getattr(lib, name)(qb, ld(qb), qb, ld(qb), pool, nb, 1, bt, mb, lens, qsl, B, positions, T)
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", list(ATTN_SOFTCAP))
@pytest.mark.parametrize("batch", ["prefill", "decode", "mixed", "long_decode", "long_chunk"])
def test_paged_attention_softcap(lib, rng, name, batch):
    """Gemma 2's scores softcap * tanh(s / softcap), in both score layouts and across split-K."""
    base, cap = ATTN_SOFTCAP[name]
    H, G, hd, bs, win = ATTN[base]
    seqs = BATCHES[batch]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 2, G, hd)
    T, B = len(positions), len(seqs)
    qb, q = buf(rng, T, H * hd, pad=5)
    q *= 3.0  # scores well past the cap
    ob, out = buf(rng, T, H * hd, pad=3, fill=np.nan)
    getattr(lib, name)(ob, ld(ob), qb, ld(qb), pool, nb, 1, bt, mb, lens, qsl, B, positions, T)
    ref = ref_attention(q, pool, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), win, softcap=cap)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
    plain = ref_attention(q, pool, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), win)
    assert T == 0 or np.abs(plain - ref).max() > 1e-2  # (the cap changed the result)
    check_guard(ob, T, H * hd)


@pytest.mark.parametrize("name", ["attn_mha", "attn_gqa2", "attn_gqa8", "attn_swa"])
def test_paged_attention_query_counts(lib, rng, name):
    """Chunks of 2..70 new tokens (full and partial query blocks) over cached contexts,
    next to a decode sequence."""
    H, G, hd, bs, win = ATTN[name]
    scale = 1 / math.sqrt(hd)
    for n in range(2, 71):
        seqs = [(int(rng.integers(0, 100)), n), (int(rng.integers(0, 50)), 1)]
        pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 1, G, hd)
        T = len(positions)
        q = rng.standard_normal((T, H * hd)).astype(np.float32)
        out = np.full((T, H * hd), np.nan, np.float32)
        getattr(lib, name)(out, H * hd, q, H * hd, pool, nb, 0, bt, mb, lens, qsl, 2,
                           positions, T)
        ref = ref_attention(q, pool, 0, bt, qsl, positions, H, G, hd, bs, scale, win)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5, err_msg=f"n={n}")


def test_paged_attention_many_sequences(lib, rng, monkeypatch, tmp_path):
    """More sequences than fit the query-block prefix array: one token per work unit."""
    monkeypatch.setattr(K, "_ATTN_SEQ_CAP", 3)
    H, G, hd, bs, win = ATTN["attn_gqa2"]
    m = ir.Module()
    K.emit_kernel(m, "paged_attention", "attn_cap", dict(
        num_heads=H, num_kv_heads=G, head_dim=hd, block_size=bs, scale=1 / math.sqrt(hd),
        sliding_window=win), lib.variant)
    tc.link_shared([compile_module(m, lib.variant)], tmp_path / "cap.so")
    f = ctypes.CDLL(str(tmp_path / "cap.so")).attn_cap
    f.restype = None
    seqs = [(0, 20), (7, 3), (30, 1), (0, 9), (2, 2)]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 1, G, hd)
    T = len(positions)
    q = rng.standard_normal((T, H * hd)).astype(np.float32)
    out = np.full((T, H * hd), np.nan, np.float32)
    P, L = ctypes.c_void_p, ctypes.c_int64
    f(*[P(a.ctypes.data) if isinstance(a, np.ndarray) else L(a) for a in
        (out, H * hd, q, H * hd, pool, nb, 0, bt, mb, lens, qsl, len(seqs), positions, T)])
    ref = ref_attention(q, pool, 0, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), win)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", HALF_ATTN)
@pytest.mark.parametrize("batch", ["prefill", "decode", "mixed", "long_decode", "long_chunk"])
def test_paged_attention_half_cache(lib, rng, name, batch, dtype):
    """A bf16/f16 KV pool, widened exactly: f32 accuracy on the stored values."""
    H, G, hd, bs, win = ATTN[name]
    seqs = BATCHES[batch]
    pool32, nb, bt, mb, lens, qsl, positions = make_batch(rng, seqs, bs, 2, G, hd)
    pool = dtypes.from_float32(pool32, dtype)
    T, B = len(positions), len(seqs)
    qb, q = buf(rng, T, H * hd, pad=5)
    ob, out = buf(rng, T, H * hd, pad=3, fill=np.nan)
    getattr(lib, f"{name}_{dtype}")(ob, ld(ob), qb, ld(qb), pool, nb, 1, bt, mb, lens, qsl, B, positions, T)
    ref = ref_attention(q, dtypes.to_float32(pool, dtype), 1, bt, qsl, positions, H, G, hd, bs,
                        1 / math.sqrt(hd), win)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
    check_guard(ob, T, H * hd)


def test_paged_attention_zero_tokens(lib, rng):
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, [(3, 1)], 4, 2, 4, 16)
    out = np.full((1, 64), np.nan, np.float32)
    q = np.ones((1, 64), np.float32)
    lib.attn_mha(out, 64, q, 64, pool, nb, 0, bt, mb, lens, qsl, 1, positions, 0)
    assert np.isnan(out).all()


def test_paged_attention_reads_only_its_layer_and_blocks(lib, rng):
    """NaN in other layers, unused blocks and future slots must not leak into the output."""
    H, G, hd, bs, _ = ATTN["attn_gqa2"]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, [(5, 3), (0, 2)], bs, 2, G, hd)
    clean = pool.copy()
    pool[0] = np.nan
    used = np.zeros(nb, bool)
    used[bt[bt >= 0]] = True
    pool[1, :, ~used] = np.nan
    for b, (c, n) in enumerate([(5, 3), (0, 2)]):
        s = c + n
        blk = bt[b, s // bs]
        pool[1, :, blk, :, s % bs:] = np.nan  # slots after the sequence's last key
    T = len(positions)
    q = rng.standard_normal((T, H * hd)).astype(np.float32)
    out = np.full((T, H * hd), np.nan, np.float32)
    lib.attn_gqa2(out, H * hd, q, H * hd, pool, nb, 1, bt, mb, lens, qsl, 2, positions, T)
    ref = ref_attention(q, clean, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name,dtype", [(n, "float32") for n in ("attn_gqa2", "attn_gqa8", "attn_gqa8x8", "attn_gqa6",
                                                                 "attn_mqa", "attn_swa_long", "attn_d128")]
                         + [("attn_gqa4", "bfloat16"), ("attn_d128", "float16")])
def test_paged_attention_batch_invariance(lib, rng, name, dtype):
    """Each token's outputs, bit for bit, whatever it is batched with, however many threads run
    the step and however its sequence's new tokens are cut into steps (batch invariance,
    README; helpers.check_attention_batch_invariance); and right, alone. Half-precision pools on the
    native library only: the summation order is the same code for every pool type (the baseline's
    emulated float16 conversions made one case 16 s)."""
    if dtype != "float32" and lib.variant.name != "native":
        pytest.skip("half-precision pools: the native library's run checks the same summation order")
    H, G, hd, bs, win = ATTN[name]
    seqs = INVARIANCE_TARGETS + [(int(rng.integers(0, 3500)), 1) for _ in range(6)] + [(40, 30)]
    pool32, nb, bt, mb, lens, _, positions = make_batch(rng, seqs, bs, 1, G, hd)
    pool = dtypes.from_float32(pool32, dtype)
    q = rng.standard_normal((len(positions), H * hd)).astype(np.float32)
    f = getattr(lib, name if dtype == "float32" else f"{name}_{dtype}")

    def step(out, sq, sbt, slens, sqsl, spos):
        f(out, H * hd, sq, H * hd, pool, nb, 0, sbt, mb, slens, sqsl, len(slens), spos, len(spos))
        return out
    for alone, (sbt, slens, sqsl, spos, sq) in check_attention_batch_invariance(
            step, seqs, bt, positions, q, lib.dll.llmir_set_num_threads, rng):
        ref = ref_attention(sq, dtypes.to_float32(pool, dtype), 0, sbt, sqsl, spos, H, G, hd, bs,
                            1 / math.sqrt(hd), win)
        np.testing.assert_allclose(alone, ref, rtol=1e-4, atol=2e-5)


def test_paged_attention_large_scores(lib, rng):
    """Scores in the hundreds (exp would overflow f32): the softmax must subtract the
    running max. (The tolerance covers the f32 rounding of scores that large.)"""
    H, G, hd, bs, _ = ATTN["attn_mha"]
    pool, nb, bt, mb, lens, qsl, positions = make_batch(rng, [(0, 30)], bs, 2, G, hd)
    pool *= 10
    T = len(positions)
    q = (rng.standard_normal((T, H * hd)) * 10).astype(np.float32)
    out = np.full((T, H * hd), np.nan, np.float32)
    lib.attn_mha(out, H * hd, q, H * hd, pool, nb, 1, bt, mb, lens, qsl, 1, positions, T)
    ref = ref_attention(q, pool, 1, bt, qsl, positions, H, G, hd, bs, 1 / math.sqrt(hd), 0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-2)


# --- activations

def ref_act(act, x):
    x = x.astype(np.float64)
    if act == "silu":
        with np.errstate(over="ignore"):
            return x / (1 + np.exp(-x))
    if act == "gelu":
        return 0.5 * x * np.vectorize(math.erfc, otypes=[np.float64])(-x / math.sqrt(2))
    if act == "gelu_tanh":  # 0.5 x (1 + tanh(y)) without cancellation: x sigmoid(2y)
        y = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        with np.errstate(over="ignore"):
            return x / (1 + np.exp(-2 * y))
    return np.maximum(x, 0)


def act_inputs(rng, T, dim):
    x = (rng.standard_normal((T, dim)) * 3).astype(np.float32)
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 100.0, -100.0, 20.0, -20.0,
                        1e-3, -1e-3, 0.5, -0.5, 88.0, -87.0], np.float32)
    flat = x.reshape(-1)
    flat[:min(len(special), flat.size)] = special[:flat.size]
    return x


def check_act(act, out, ref):
    # 1e-6 relative everywhere (also in the far negative tails, where the kernels avoid the
    # cancellation of 1 + erf / 1 + tanh); absolute floor for results below f32's normal range
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dim", [1, 13, 64, 300])
@pytest.mark.parametrize("T", [0, 1, 3, 130])
def test_act_mul(lib, rng, act, dim, T):
    gb, g = buf(rng, T, dim, pad=3)
    g[...] = act_inputs(rng, T, dim)
    ub, u = buf(rng, T, dim, pad=1)
    ob, out = buf(rng, T, dim, fill=np.nan)
    getattr(lib, f"actmul_{act}_{dim}")(ob, ld(ob), gb, ld(gb), ub, ld(ub), T)
    check_act(act, out, ref_act(act, g) * u)
    check_guard(ob, T, dim)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dim", [1, 13, 64, 300])
@pytest.mark.parametrize("T", [0, 1, 3, 130])
def test_act(lib, rng, act, dim, T):
    xb, x = buf(rng, T, dim, pad=2)
    x[...] = act_inputs(rng, T, dim)
    ob, out = buf(rng, T, dim, fill=np.nan)
    f = getattr(lib, f"act_{act}_{dim}")
    f(ob, ld(ob), xb, ld(xb), T)
    ref = ref_act(act, x)
    check_act(act, out, ref)
    check_guard(ob, T, dim)
    f(xb, ld(xb), xb, ld(xb), T)  # in place
    check_act(act, x, ref)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_act_dense_range(lib, act):
    """The inline exp / erfc over the whole f32 range that matters, densely."""
    x = np.linspace(-105, 95, 300 * 400).astype(np.float32).reshape(-1, 300)
    out = np.full_like(x, np.nan)
    getattr(lib, f"act_{act}_300")(out, 300, x, 300, len(x))
    ref = ref_act(act, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("dim", SOFTCAP_DIMS)
@pytest.mark.parametrize("T", [0, 1, 130])
def test_softcap(lib, rng, dim, T):
    """30 tanh(x / 30) (Gemma 2's final logits) over the range where tanh bends and its tails,
    against float64; in place too."""
    xb, x = buf(rng, T, dim, pad=2)
    x[...] = rng.standard_normal((T, dim)) * np.exp(rng.uniform(-12, 6, (T, dim)))
    ob, out = buf(rng, T, dim, fill=np.nan)
    f = getattr(lib, f"softcap_{dim}")
    f(ob, ld(ob), xb, ld(xb), T)
    ref = 30.0 * np.tanh(x.astype(np.float64) / 30.0)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    check_guard(ob, T, dim)
    f(xb, ld(xb), xb, ld(xb), T)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=0)


def test_softcap_dense_range_and_specials(lib):
    x = np.concatenate([np.linspace(-400, 400, 300 * 399), [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-38, -1e-30] +
                        [0.0] * 293]).astype(np.float32).reshape(-1, 300)
    out = np.full_like(x, np.nan)
    getattr(lib, "softcap_300")(out, 300, x, 300, len(x))
    ref = 30.0 * np.tanh(x.astype(np.float64) / 30.0)
    np.testing.assert_allclose(out, ref, rtol=6e-7, atol=1e-37)  # (absolute where x / 30 is subnormal)
    assert np.signbit(out[-1, 4]) and out[-1, 5] > 0


def test_act_nan_propagates(lib):
    x = np.array([[np.nan, np.inf, -np.inf] + [0.0] * 10], np.float32)
    for act in ACTS:
        out = np.zeros_like(x)
        getattr(lib, f"act_{act}_13")(out, 13, x, 13, 1)
        assert np.isnan(out[0, 0]) and out[0, 1] == np.inf and out[0, 2] == 0, (act, out[0, :3])


# --- emit_kernel contract

def test_every_signature_has_a_cpu_kernel():
    from llmirc.targets.cpu.quant_kernels import KINDS as QUANT_KINDS

    assert set(SIGNATURES) == set(K._EMITTERS) | set(QUANT_KINDS)
    for sym, kind, params in _specs():
        assert set(params) <= set(SIGNATURES[kind].static)


def test_emit_kernel_signature_and_errors():
    v = tc.baseline_variant()
    m = ir.Module()
    fn = K.emit_kernel(m, "linear", "my_linear", dict(n=4, k=8), v)
    assert fn.name == "my_linear" and len(fn.args) == 9
    assert [a.name for a in fn.args] == [p.name for p in SIGNATURES["linear"].params]
    with pytest.raises(ValueError):
        K.emit_kernel(m, "conv2d", "c", {}, v)
    with pytest.raises(ValueError):
        K.emit_kernel(m, "rms_norm", "r", dict(dim=8), v)  # eps missing
    with pytest.raises(ValueError):
        K.emit_kernel(m, "act", "a", dict(dim=8, act="swish"), v)
    with pytest.raises(ValueError):
        K.emit_kernel(m, "paged_attention", "p", dict(num_heads=6, num_kv_heads=4, head_dim=8,
                                                      block_size=4, scale=1.0), v)
    with pytest.raises(ValueError):
        K.emit_kernel(m, "rope", "r", dict(num_heads=1, head_dim=8, rotary_dim=8,
                                           inv_freq=[1.0]), v)


# --- irbuilder helpers: parallel_for, hsum_many, exp

HSUM_CASES = [(1, 1), (3, 1), (1, 4), (3, 4), (4, 4), (5, 4), (16, 4), (2, 16), (12, 16),
              (16, 16), (7, 8), (32, 8)]


def _helpers_module(variant):
    m = ir.Module(name="helpers")
    for name, min_items, dyn in (("par", 1, 0), ("par_serial", 1000, 0), ("par_dyn", 1, 3)):
        fn, b = irb.define(m, name, [("out", irb.PTR), ("n", irb.I64)])

        def body(cb, i, vals):  # out[2i] += 1 (runs), out[2i + 1] = the thread (pthread_self)
            p = irb.gep(cb, vals[0], cb.mul(i, irb.i64(2)), irb.I64)
            cb.store(cb.add(cb.load(p, typ=irb.I64), irb.i64(1)), p)
            tid = cb.call(irb.declare(m, "pthread_self", irb.I64, []), [])
            cb.store(tid, irb.gep(cb, p, 1, irb.I64))
        irb.parallel_for(m, b, fn.args[1], body, min_items, dynamic=dyn)
        b.ret_void()
    for c, w in HSUM_CASES:
        fn, b = irb.define(m, f"hsum_{c}_{w}", [("out", irb.PTR), ("x", irb.PTR)])
        v = irb.hsum_many(b, [irb.load_vec(b, fn.args[1], i * w, w) for i in range(c)])
        irb.store_vec(b, v, fn.args[0], 0)
        b.ret_void()
    for name, ty in (("exp32", irb.F32), ("exp64", irb.F64)):
        fn, b = irb.define(m, name, [("out", irb.PTR), ("x", irb.PTR), ("n", irb.I64)])
        w = variant.vector_width
        with irb.for_range(b, 0, fn.args[2], w) as i:
            x = irb.load_vec(b, fn.args[1], i, w)
            if ty is irb.F64:
                x = b.fpext(x, irb.vty(w, irb.F64))
            irb.store_vec(b, irb.exp(b, x), fn.args[0], i)
        b.ret_void()
    return str(m)


@pytest.fixture(scope="module", params=one_worker_each("cpu-helpers", ["native", "baseline", "x86-64-v3"]))
def hlib(request, tmp_path_factory):
    v = _variant(request.param)
    path = tmp_path_factory.mktemp("helpers") / "libhelpers.so"
    tc.link_shared([tc.compile_object(_helpers_module(v), v)], path)
    lib = ctypes.CDLL(str(path))
    for name in ("par", "par_serial", "par_dyn", "exp32", "exp64"):
        getattr(lib, name).restype = None
    lib.exp32.argtypes = lib.exp64.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib, v


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 100_000])
def test_parallel_for_covers_every_item_once(hlib, n):
    """Every item exactly once, whichever threads join (the pool never waits for a late one);
    a run of `dynamic` items on one thread; a serial loop on the caller's thread."""
    lib, _ = hlib
    caller = ctypes.CDLL(None).pthread_self
    caller.restype = ctypes.c_uint64
    for name in ("par", "par_serial", "par_dyn"):
        out = np.zeros((n + 1, 2), np.uint64)
        getattr(lib, name)(ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(n))
        assert (out[:n, 0] == 1).all(), name
        assert (out[n] == 0).all()
        tids = out[:n, 1]
        if name == "par_serial" and n < 2000 or n < 2:  # (par_serial: 1000 items a thread at least)
            assert set(tids.tolist()) <= {caller()}
        elif name == "par_dyn":  # runs of 3 items claimed by one thread each
            assert all(len(set(tids[i:i + 3].tolist())) == 1 for i in range(0, n, 3))


@pytest.mark.parametrize("c,w", HSUM_CASES)
def test_hsum_many(hlib, rng, c, w):
    lib, _ = hlib
    x = rng.standard_normal((c, w)).astype(np.float32)
    p = 1 << max(0, (c - 1).bit_length())
    out = np.full(p, np.nan, np.float32)
    f = getattr(lib, f"hsum_{c}_{w}")
    f.restype = None
    f(ctypes.c_void_p(out.ctypes.data), ctypes.c_void_p(x.ctypes.data))
    np.testing.assert_allclose(out[:c], x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-6)
    assert (out[c:] == 0).all()


@pytest.mark.parametrize("name", ["exp32", "exp64"])
def test_inline_exp_accuracy(hlib, name):
    lib, v = hlib
    x = np.linspace(-110, 95, 64 * 20000).astype(np.float32)
    x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.7228, 88.7229, -103.9]
    out = np.full_like(x, np.nan)
    getattr(lib, name)(x.ctypes.data, 0, 0)  # n = 0: nothing
    getattr(lib, name)(out.ctypes.data, x.ctypes.data, len(x))
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0 and out[3] == out[4] == 1
    normal = (ref > 1.2e-38) & (ref < 3.4e38)
    ulp = np.abs(out[normal] - ref[normal]) / np.spacing(ref[normal].astype(np.float32))
    assert ulp.max() <= 1.5, ulp.max()
    assert np.abs(out[~normal & (ref < 1)] - ref[~normal & (ref < 1)]).max() <= 1.5e-45
    assert np.isinf(out[ref > 3.41e38]).all()
