"""Quantized CPU kernels (qlinear, qembedding, the int8 KV cache) against float64 references.

Every instruction path runs where this host can run it: AVX512-VNNI, AVX-VNNI (8 lanes,
x86-64-v3 + avxvnni) and vpmaddubsw at 16, 8 and 4 lanes (x86-64-v4, -v3 and the baseline);
AArch64's sdot (the dot product extension) and the generic path on NEON under qemu-user where it
and a cross compiler are installed (tests/aarch64_emulator.py). The code of each is checked for
its instruction everywhere. On hosts with AMX-INT8 the native library takes the
tiles for T >= 32 (test_qlinear at 130 tokens, token counts 32 to 40 and a long prefill;
test_qlinear_amx_against_vector_path). The reference dequantizes the weight (llmirc.quant.dequantize) and
multiplies in float64 with the activations quantized exactly as the kernels quantize them
(llmirc.quant.activation_block); the kernels then differ by f32 rounding only. A second check
holds the result against the exact float product within the activation quantization's own
bound (half a step d/2 per value).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from llvmlite import ir

import aarch64_emulator
from helpers import (INVARIANCE_TARGETS, check_attention_batch_invariance, int8_pool, make_batch, one_worker_each,
                     ref_attention, ref_kv_append_quantized)
from llmirc import dtypes, quant
from llmirc.quant import Scheme
from llmirc.targets.cpu import amx
from llmirc.targets.cpu import kernels as K
from llmirc.targets.cpu import quant_kernels as QK
from llmirc.targets.cpu import toolchain as tc
from llmirc.targets.cpu.target import compile_module, extra_modules
from llmirc.targets.signatures import qlinear_scratch_bytes, signature

IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
SCHEMES = {  # name -> (scheme factory of k)
    "i8_row": lambda k: Scheme(8, k, "float32"),                  # int8 per output row
    "i8_g32": lambda k: Scheme(8, 32, "float16"),                 # Q8_0-like
    "i8_g32_int_bf16": lambda k: Scheme(8, 32, "bfloat16", "int"),
    "i8_g16_f32": lambda k: Scheme(8, 16, "float32"),             # Q6_K repacked
    "i4_g32": lambda k: Scheme(4, 32, "float16"),                 # Q4_0-like
    "i4_g32_min": lambda k: Scheme(4, 32, "float16", "min"),      # Q4_1-like
    "i4_g128_int": lambda k: Scheme(4, 128, "float16", "int"),    # GPTQ/AWQ-like
    "i4_g64_act": lambda k: Scheme(4, 64, "float16", "int", act_order=True),
    "i4_g16_min_f32": lambda k: Scheme(4, 16, "float32", "min"),  # Q2_K repacked
    "i4_g16_f32": lambda k: Scheme(4, 16, "float32"),             # Q3_K repacked
    "i8_g256_min": lambda k: Scheme(8, 256, "float16", "min"),
    "i5_g32": lambda k: Scheme(5, 32, "float16"),                 # Q5_0
    "i5_g32_min_f32": lambda k: Scheme(5, 32, "float32", "min"),  # Q5_1 / Q5_K
    "i6_g16_f32": lambda k: Scheme(6, 16, "float32"),             # Q6_K
    "i6_g64_int": lambda k: Scheme(6, 64, "bfloat16", "int"),
    "i4_g32_tbl": lambda k: Scheme(4, 32, "float16", values=IQ4),       # IQ4_NL: a value table
    # IQ4_XS's f32 scales, with a table reaching both ends of int8 (the largest vpmaddubsw pairs)
    "i4_g32_tbl_f32": lambda k: Scheme(4, 32, "float32", values=(-128, *IQ4[1:-1], 127)),
    # two-level scales (int8 sub-scales under a float16 per 256), as GGUF's files store them
    "i4_g32_min_2l": lambda k: Scheme(4, 32, "int8", "min", super_group=256),         # Q4_K
    "i5_g32_min_2l": lambda k: Scheme(5, 32, "int8", "min", super_group=256),         # Q5_K
    "i6_g16_2l": lambda k: Scheme(6, 16, "int8", super_group=256),                    # Q6_K
    "i4_g32_tbl_2l": lambda k: Scheme(4, 32, "int8", values=IQ4, super_group=256),    # IQ4_XS
}
# (n, k): n not a multiple of the rows of a block; 576 = 18 x 32 (a full super-block and a tail of 2
# lanes), 640 for groups of 128, 1536 for 256; 512 without a tail, 2048 with groups wider than a vector, 64 only a tail
MAIN = {name: (37, next(k for k in (576, 640, 1536) if make(k).check(k) is None)) for name, make in SCHEMES.items()}
# two-level scales: 1280 = 5 super-groups of 256, 40 sub-groups of 32 (a tail of 8 lanes); 768 in 48 sub-groups of 16
MAIN |= {"i4_g32_min_2l": (37, 1280), "i5_g32_min_2l": (37, 1280), "i6_g16_2l": (37, 768), "i4_g32_tbl_2l": (37, 1280)}
EXTRA = [("i8_g32", 64, 512), ("i4_g32", 64, 512), ("i8_row", 9, 2048), ("i8_g256_min", 9, 2048),
         ("i4_g128_int", 9, 2048), ("i4_g32_min", 5, 64), ("i8_g16_f32", 5, 64),
         ("i5_g32", 5, 32), ("i5_g32_min_f32", 7, 96), ("i6_g16_f32", 3, 48),  # 5/6 bits: tails of 1 to 3 lanes
         ("i4_g32", 11, 704), ("i6_g16_f32", 5, 352), ("i4_g128_int", 3, 2816),  # tails of 6 and 8 lanes (8-lane vectors)
         ("i4_g32_tbl", 3, 64),  # a value table in one super-block's tail
         ("i8_row", 7, 24),  # a sub-group of 24 (a row of 24 inputs): activation scales over 24 values, not 16 or 32
         ("i4_g32_min_2l", 5, 256), ("i6_g16_2l", 3, 256),  # one super-group (in a super-block's tail for 32)
         ("i5_g32_min_f32", 37, 1280), ("i6_g16_f32", 37, 768)]  # one-level twins of two-level cases (bit for bit)
CASES = [(name, *MAIN[name]) for name in SCHEMES] + EXTRA
# The other instruction paths share the per-format code; they run the formats that exercise
# their dot products and unpacking differently (int8 and int4 codes, zero kinds, 16-wide blocks).
PATH_SCHEMES = ("i8_row", "i4_g32_min", "i4_g64_act", "i6_g16_f32", "i4_g128_int", "i5_g32_min_f32", "i4_g32_tbl_f32",
                "i4_g32_min_2l", "i6_g16_2l", "i4_g32_tbl_2l")
BIAS_RESIDUAL = ("i8_row", "i4_g32_min", "i4_g64_act")
# 1-4: decode, one token group, read one weight row at a time; 5, 8: two groups (row blocks)
ROWS = [0, 1, 2, 3, 4, 5, 8, 17, 130]
QE_DIMS = {"i8_g32": 576, "i4_g32_min": 576, "i4_g128_int": 640, "i8_g16_f32": 80, "i5_g32_min_f32": 576,
           "i6_g16_f32": 80, "i5_g32": 32, "i4_g32_tbl": 576, "i4_g32_min_2l": 1280, "i6_g16_2l": 256,
           "i4_g32_tbl_2l": 512}  # embedding widths
QE_SCALED, QE_SCALE = ("i8_g32", "i4_g128_int"), float(np.float32(640 ** 0.5))  # Gemma's embedding scale


def _specs(full: bool = True):
    specs = []
    for name, n, k in CASES:
        if not full and (name not in PATH_SCHEMES or (name, n, k) in EXTRA):
            continue  # (Lib.cases: the same choice)
        s = SCHEMES[name](k)
        base = dict(n=n, k=k, bits=s.bits, group_size=s.group_size, scale_dtype=s.scale_dtype, zero=s.zero,
                    zero_dtype=s.zero_dtype, act_order=s.act_order, values=s.values, super_group=s.super_group)
        specs.append((f"q_{name}_{n}_{k}", "qlinear", base))
        if (n, k) == MAIN[name] and name in BIAS_RESIDUAL:
            specs.append((f"q_{name}_{n}_{k}_br", "qlinear", dict(base, bias=True, residual=True)))
    for name, dim in QE_DIMS.items():
        s = SCHEMES[name](dim)
        qe = dict(dim=dim, bits=s.bits, group_size=s.group_size, scale_dtype=s.scale_dtype, zero=s.zero,
                  zero_dtype=s.zero_dtype, values=s.values, super_group=s.super_group)
        specs.append((f"qe_{name}", "qembedding", qe))
        if name in QE_SCALED:
            specs.append((f"qe_{name}_scaled", "qembedding", dict(qe, scale=QE_SCALE)))
    for G, hd, bs in ((2, 16, 4), (1, 64, 16)):
        specs.append((f"kv8_{G}_{hd}_{bs}", "kv_append", dict(num_layers=2, num_kv_heads=G, head_dim=hd,
                                                              block_size=bs, kv_dtype="int8")))
    specs.append(("attn8", "paged_attention", dict(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                                                   scale=0.25, kv_dtype="int8", num_layers=1)))
    specs.append(("attn8_d64", "paged_attention", dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                                                       scale=0.125, kv_dtype="int8", num_layers=1)))
    return specs


AARCH64 = {v.name: v for v in tc.variants_for(["aarch64-dotprod", "aarch64-generic"])}  # run under qemu-aarch64


def _variant(name):
    host = tc.host_variant()
    flags = set(host.required_flags)
    if name == "native":
        if QK.int_dot(host)[0] == "generic":
            pytest.skip("this host's integer dot products are the generic path's (the baseline runs it)")
        return host
    if name == "avxvnni":
        v3 = tc.variants_for(["x86-64-v3"])[0]
        if not ({"avx2", "fma", "f16c", "bmi2", "movbe", "avx_vnni"} <= flags):
            pytest.skip("this host cannot run AVX-VNNI code")
        return tc.CpuVariant("x86-64-v3-avxvnni", v3.triple, v3.cpu, "+avxvnni", 8,
                             v3.required_flags + ("avx_vnni",))
    if name == "baseline":  # decode's weights read the other way from native (as in test_cpu_kernels)
        return dataclasses.replace(tc.baseline_variant(), one_row_decode=not host.one_row_decode)
    if name == "portable":  # the baseline claiming no CPU flags: the 16-bit products and a table's select chain,
        if host.arch != "x86_64":  # the paths of architectures other than x86 and AArch64, run on x86
            pytest.skip("an x86-64 host")
        return dataclasses.replace(tc.baseline_variant(), required_flags=())
    level = tc.variants_for([name])[0]
    if not set(level.required_flags) <= flags:
        pytest.skip(f"this host cannot run {name}")
    if QK.int_dot(level) == QK.int_dot(host) and level.vector_width == host.vector_width:
        pytest.skip(f"{name}: the native library takes the same code paths on this host")
    return level


class Lib:
    def __init__(self, dll, variant, specs, full):
        self.dll = dll  # a ctypes.CDLL, or an aarch64_emulator.Emulated
        self.variant = variant
        self.kinds = {sym: kind for sym, kind, _ in specs}
        self.cases = [c for c in CASES if full or (c[0] in PATH_SCHEMES and c not in EXTRA)]

    def __getattr__(self, sym):
        if sym not in self.kinds:
            pytest.skip(f"{sym} runs on the native library only")
        if isinstance(self.dll, aarch64_emulator.Emulated):
            return getattr(self.dll, sym)
        f = getattr(self.dll, sym)
        f.restype = None
        f.argtypes = [ctypes.c_void_p if p.type == "ptr" else ctypes.c_int64
                      for p in signature(self.kinds[sym]).params]

        def call(*args):
            f(*[a.ctypes.data if isinstance(a, np.ndarray) else a for a in args])
        return call


@pytest.fixture(scope="module", params=one_worker_each(
    "quant-kernels", ["native", "avxvnni", "x86-64-v4", "x86-64-v3", "baseline", "portable", *AARCH64]))
def lib(request, tmp_path_factory):
    if request.param in AARCH64 and aarch64_emulator.missing():
        pytest.skip(aarch64_emulator.missing())
    variant = AARCH64.get(request.param) or _variant(request.param)
    full = request.param in ("native", "aarch64-dotprod")
    specs = _specs(full)
    module = ir.Module(name="test_quant_kernels")
    for sym, kind, params in specs:
        K.emit_kernel(module, kind, sym, params, variant)
    path = tmp_path_factory.mktemp(request.param) / "libq.so"
    if request.param in AARCH64:
        return Lib(aarch64_emulator.build(module, variant, path.with_name("q"), [sym for sym, _, _ in specs]),
                   variant, specs, full)
    tc.link_shared([compile_module(module, variant)], path)
    return Lib(ctypes.CDLL(str(path)), variant, specs, full)


@pytest.fixture
def rng():
    seed = int(os.environ.get("LLMIRC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"LLMIRC_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def quantized_weight(rng, scheme: Scheme, n: int, k: int):
    """Random quantized parts (random codes, scales, zeros, perm) and the float64 weight they
    stand for, its columns in stored order."""
    parts = {"codes": quant.pack(rng.integers(0, 1 << scheme.bits, (n, k)).astype(np.uint8), scheme.bits,
                                 scheme.sub_group)}
    ng = k // scheme.group_size
    nsup = k // scheme.super_group if scheme.super_group else 0
    if nsup:  # int8 sub-scales (sub-mins) over the int8 range, float16 super-scales (super-mins)
        parts["scales"] = rng.integers(-128, 128, (n, ng)).astype(np.int8)
        parts["super_scales"] = (rng.standard_normal((n, nsup)) * 0.05 / 64).astype(np.float16)
    else:
        parts["scales"] = dtypes.from_float32((rng.standard_normal((n, ng)) * 0.05).astype(np.float32),
                                              scheme.scale_dtype)
    if nsup and scheme.zero == "min":
        parts["zeros"] = rng.integers(-128, 128, (n, ng)).astype(np.int8)
        parts["super_mins"] = (rng.standard_normal((n, nsup)) * 0.3 / 64).astype(np.float16)
    elif scheme.zero == "int":
        parts["zeros"] = rng.integers(0, 1 << scheme.bits, (n, ng)).astype(np.uint8)
    elif scheme.zero == "min":
        parts["zeros"] = dtypes.from_float32((rng.standard_normal((n, ng)) * 0.3).astype(np.float32),
                                             scheme.scale_dtype)
    if scheme.act_order:
        parts["perm"] = rng.permutation(k).astype(np.int32)
    w = quant.dequantize(parts, scheme, k)
    stored_order = w[:, parts["perm"]] if scheme.act_order else w
    return parts, stored_order


@pytest.mark.parametrize("bits", quant.BITS)
def test_pack_round_trip(rng, bits):
    """pack / unpack on random shapes: every lane count of a tail super-block (1 .. 16 sub-groups
    past the full ones), sub-groups of 16 and 32 (per-row widths too), a row of bits / 8 bytes per code."""
    for sg in (16, 32, 24):
        if bits in (5, 6) and sg * (bits - 4) % 32:
            continue
        for nsub in [*range(1, 18), 31, 32, 33, 47]:
            n, k = int(rng.integers(1, 4)), nsub * sg
            u = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
            codes = quant.pack(u, bits, sg)
            assert codes.shape == (n, k * bits // 8), (bits, sg, k)
            np.testing.assert_array_equal(quant.unpack(codes, bits, sg, k), u, err_msg=f"{bits} bits, sg {sg}, k {k}")


@pytest.mark.parametrize("scheme", [Scheme(4, 32), Scheme(6, 32), Scheme(8, 64, "float32"), Scheme(4, 32, zero="int"),
                                    Scheme(5, 32, zero="min")])
def test_quantize_in_row_blocks_is_quantize_whole(rng, monkeypatch, scheme):
    """quantize rounds a large weight a block of rows at a time, widening a bf16 one block by block (its
    float64 temporaries and float32 copy: 2.5 GB and 0.7 GB for Gemma's 262144 x 640 table whole); the
    parts are those of the whole weight's, bit for bit."""
    w = (rng.standard_normal((37, 64)) * np.exp(rng.uniform(-3, 3, (37, 1)))).astype(np.float32)
    bits = dtypes.from_float32(w, "bfloat16")
    whole, whole_bf16 = quant.quantize(w, scheme), quant.quantize(dtypes.to_float32(bits, "bfloat16"), scheme)
    monkeypatch.setattr(quant, "QUANTIZE_BLOCK", 5 * 64)  # blocks of 5 rows, the last of 2
    for want, got in ((whole, quant.quantize(w, scheme)), (whole_bf16, quant.quantize(bits, scheme, "bfloat16"))):
        assert got.keys() == want.keys()
        for part in want:
            np.testing.assert_array_equal(got[part], want[part], err_msg=part)


@pytest.mark.parametrize("scheme,k,message", [
    (Scheme(5, 16), 64, "5-bit codes in sub-groups of 16 (5 bits take groups of 32 or more)"),
    (Scheme(5, 16, "float32", "min"), 16, "5-bit codes in sub-groups of 16"),
    (Scheme(7, 32), 64, "7-bit codes (llmirc stores 4, 5, 6 or 8)"),
    (Scheme(5, 32), 48, "48 inputs, not a multiple of the group size 32"),
    (Scheme(8, 8, "float32"), 8, "group size 8 (at least 16)"),  # per output row of 8 inputs
    (Scheme(8, 18, "float32"), 18, "sub-groups of 18 inputs (a multiple of 4)"),  # the kernels read 4 at a time
])
def test_quantize_refuses_schemes_without_a_layout(rng, scheme, k, message):
    """quantize, gptq and pack name what is impossible (Scheme.check's words) instead of failing in
    a NumPy reshape."""
    w = rng.standard_normal((3, k)).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape(f"quantize: cannot store {message}")):
        quant.quantize(w, scheme)
    with pytest.raises(ValueError, match=re.escape(f"gptq: cannot store {message}")):
        quant.gptq(w, np.eye(k), scheme)
    if scheme.bits == 5 and scheme.sub_group == 16:
        with pytest.raises(ValueError, match="5 bits take groups of 32 or more"):
            quant.pack(np.zeros((3, k), np.uint8), 5, 16)


def test_value_table_scheme(rng):
    """A value table: code u stands for s * values[u]; only 4-bit symmetric codes take one, and round to
    nearest does not make one (they come from GGUF files)."""
    s = SCHEMES["i4_g32_tbl"](64)
    u = rng.integers(0, 16, (3, 64)).astype(np.uint8)
    scales = rng.standard_normal((3, 2)).astype(np.float16)
    w = quant.dequantize({"codes": quant.pack(u, 4, 32), "scales": scales}, s, 64)
    np.testing.assert_array_equal(w, np.repeat(scales.astype(np.float64), 32, 1) * np.array(IQ4, np.float64)[u])
    assert "4-bit symmetric codes only" in Scheme(8, 32, values=IQ4).check(64)
    assert "4-bit symmetric codes only" in Scheme(4, 32, zero="int", values=IQ4).check(64)
    assert "16 ints in [-128, 127]" in Scheme(4, 32, values=(200,) * 16).check(64)
    with pytest.raises(ValueError, match="value tables come only from GGUF"):
        quant.quantize(np.ones((2, 64), np.float32), s)


def test_two_level_scheme(rng):
    """Two-level scales: group g's scale is super_scales[g G / S] * scales[g] (and its min
    super_mins[g G / S] * zeros[g]), exact in float32; int8 scales take a super-group and the other way
    round, zero points take none, and round to nearest does not make them (they come from GGUF files)."""
    s = SCHEMES["i4_g32_min_2l"](512)
    sc, mn = (rng.integers(0, 64, (3, 16)).astype(np.int8) for _ in range(2))
    d, dmin = (rng.standard_normal((3, 2)).astype(np.float16) for _ in range(2))
    u = rng.integers(0, 16, (3, 512)).astype(np.uint8)
    w = quant.dequantize({"codes": quant.pack(u, 4, 32), "scales": sc, "zeros": mn, "super_scales": d,
                          "super_mins": dmin}, s, 512)
    s32 = np.repeat(d.astype(np.float32), 8, 1) * sc.astype(np.float32)  # the file's d * sc in float32
    m32 = np.repeat(dmin.astype(np.float32), 8, 1) * mn.astype(np.float32)
    np.testing.assert_array_equal(w, np.repeat(s32.astype(np.float64), 32, 1) * u + np.repeat(m32, 32, 1))
    assert s.parts() == ("codes", "scales", "zeros", "super_scales", "super_mins")
    assert s.part_shape("super_mins", 3, 512) == (3, 2) and s.part_dtype("super_scales") == "float16"
    assert "int8 sub-scales take one" in Scheme(4, 32, "int8", "min").check(512)
    assert "int8 sub-scales take one" in Scheme(4, 32, "float16", "min", super_group=256).check(512)
    assert "uint8 zero points" in Scheme(4, 32, "int8", "int", super_group=256).check(512)
    assert "not a multiple of the super-group 256" in s.check(576)
    assert "a multiple of the group size" in Scheme(4, 32, "int8", super_group=16).check(512)
    with pytest.raises(ValueError, match="two-level scales come only from GGUF files"):
        quant.quantize(rng.standard_normal((3, 512)).astype(np.float32), s)


def call_qlinear(lib, sym, scheme, parts, x, bias=None, res=None, ld_out=None):
    T, k = x.shape
    n = parts["codes"].shape[0]
    ld_out = ld_out or n
    out = np.full((max(T, 1), ld_out), np.nan, np.float32)
    xq = np.zeros(max(T, 1) * qlinear_scratch_bytes(k, scheme.sub_group), np.int8)
    getattr(lib, sym)(out, ld_out, x, k, *weight_args(parts), parts.get("perm"), bias, res,
                      ld_out if res is not None else 0, xq, T)
    return out


def weight_args(parts):
    """A quantized weight's arguments (the signatures' codes, scales, zeros, super_scales, super_mins)."""
    return [parts["codes"], parts["scales"], *(parts.get(p) for p in ("zeros", "super_scales", "super_mins"))]


def quantized_activations(x, scheme, perm):
    """(x in stored column order, x quantized per block as the kernels do and read back, each
    element's quantization step), the last two float64."""
    xp = x[:, perm] if perm is not None else x
    q, d = quant.activation_block(xp, scheme.sub_group)
    step = np.repeat(d.astype(np.float64), scheme.sub_group, axis=1)
    return xp, q.astype(np.float64) * step, step


def reference(x, scheme, w_stored, perm):
    """(activation-quantized reference, its error scale, the bound to the exact product)."""
    xp, xhat, step = quantized_activations(x, scheme, perm)
    ref = xhat @ w_stored.T
    scale = np.abs(xhat) @ np.abs(w_stored).T
    step_bound = step / 2 @ np.abs(w_stored).T
    exact = xp.astype(np.float64) @ w_stored.T
    return ref, scale, step_bound, exact


def offset_scale(x, scheme, parts):
    """[T, n]: sum over groups g of |o_g| * sum |x^_i| (i in g), o_g the group's offset term
    (s_g z_g for zero points, m_g for mins, s_g 2^(bits-1) symmetric). The kernels add that term
    apart from the codes' sum, so their rounding is relative to it too: a group whose codes all
    equal its zero point holds weights of 0, which `reference`'s scale leaves out (seed
    3603220229 found it in test_qlinear_extreme_codes, all codes 15 against zero points near 15)."""
    xhat = np.abs(quantized_activations(x, scheme, parts.get("perm"))[1])
    group_sums = xhat.reshape(len(x), -1, scheme.group_size).sum(-1)  # [T, groups]
    s, m = quant.group_scales(parts, scheme)
    s = np.abs(s.astype(np.float64))
    if scheme.zero == "int":
        offset = s * parts["zeros"].astype(np.float64)
    elif scheme.zero == "min":
        offset = np.abs(m.astype(np.float64))
    else:
        offset = s * (128 if scheme.values else scheme.center)  # (a table's bytes: centered at 128)
    return group_sums @ offset.T


@pytest.mark.parametrize("T", ROWS)
def test_qlinear(lib, rng, T):
    for name, n, k in lib.cases:
        scheme = SCHEMES[name](k)
        parts, w = quantized_weight(rng, scheme, n, k)
        x = (rng.standard_normal((max(T, 1), k)) * rng.uniform(0.1, 3, (max(T, 1), 1))).astype(np.float32)
        x[:, : k // 7] *= 8  # blocks of different magnitudes
        out = call_qlinear(lib, f"q_{name}_{n}_{k}", scheme, parts, x[:T] if T else x[:0].copy())
        if T == 0:
            assert np.isnan(out).all()
            continue
        ref, scale, bound, exact = reference(x, scheme, w, parts.get("perm"))
        err = np.abs(out - ref)
        assert np.all(err <= 2e-6 * scale + 1e-30), (name, n, k, (err / (scale + 1e-30)).max())
        assert np.all(np.abs(out - exact) <= bound * 1.0001 + 2e-6 * scale + 1e-30), (name, n, k)


@pytest.mark.parametrize("name", BIAS_RESIDUAL)
def test_qlinear_bias_residual(lib, rng, name):
    n, k = MAIN[name]
    scheme = SCHEMES[name](k)
    parts, w = quantized_weight(rng, scheme, n, k)
    for T in (1, 4, 9, 40):  # (40: AMX tiles where the host has AMX-INT8)
        x = rng.standard_normal((T, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        res = rng.standard_normal((T, n + 3)).astype(np.float32)
        out = call_qlinear(lib, f"q_{name}_{n}_{k}_br", scheme, parts, x, bias, res.copy(), ld_out=n + 3)
        ref, scale, _, _ = reference(x, scheme, w, parts.get("perm"))
        ref = ref + bias + res[:, :n]
        assert np.all(np.abs(out[:, :n] - ref) <= 2e-6 * (scale + np.abs(bias) + np.abs(res[:, :n])) + 1e-30)
        assert np.isnan(out[:, n:]).all(), "wrote past its columns"
        # in place: out is the residual buffer
        rb = res.copy()
        xq = np.zeros(T * qlinear_scratch_bytes(k, scheme.sub_group), np.int8)
        getattr(lib, f"q_{name}_{n}_{k}_br")(rb, n + 3, x, k, *weight_args(parts), parts.get("perm"), bias, rb,
                                            n + 3, xq, T)
        np.testing.assert_allclose(rb[:, :n], out[:, :n], rtol=1e-6, atol=1e-6)


def test_qlinear_token_counts(lib, rng):
    """Every token count from 1 to 40 (token groups of every size) and a prefill long enough to
    run in several token slices; below the AMX threshold each token's outputs are bit for bit
    those it gets alone (README: outputs do not depend on the batch)."""
    n, k = MAIN["i4_g32_min"]
    scheme = SCHEMES["i4_g32_min"](k)
    parts, w = quantized_weight(rng, scheme, n, k)
    slice_tokens = QK._XQ_BYTES // qlinear_scratch_bytes(k, 32)
    x = rng.standard_normal((slice_tokens + 50, k)).astype(np.float32)
    alone = np.concatenate([call_qlinear(lib, f"q_i4_g32_min_{n}_{k}", scheme, parts, x[t:t + 1])
                            for t in range(40)])
    for T in list(range(1, 41)) + [slice_tokens + 50]:
        out = call_qlinear(lib, f"q_i4_g32_min_{n}_{k}", scheme, parts, x[:T])
        ref, scale, _, _ = reference(x[:T], scheme, w, None)
        assert np.all(np.abs(out - ref) <= 2e-6 * scale + 1e-30), T
        if T < QK.AMX_MIN_TOKENS:  # batch invariance: a token's outputs do not depend on the others (vector path)
            np.testing.assert_array_equal(out, alone[:T], err_msg=f"{T} tokens")


@pytest.mark.parametrize("T", [1, 3, 8])
def test_qlinear_extreme_codes(lib, rng, T):
    """The largest sums an inner product can meet: every code at its largest (and, for 8 bits,
    also 0, which the maddubs path takes as -128) against activations at +-127, all of one sign
    or alternating. Where products first add in 16-bit lanes (SSSE3/AVX2/AVX-512BW's
    vpmaddubsw, and the 16-bit sums over several steps of _maddubs_chunk), one lane too many
    would saturate or wrap and show here as a wrong sum."""
    for name, n, k in lib.cases:
        scheme = SCHEMES[name](k)
        parts, _ = quantized_weight(rng, scheme, n, k)
        top = (1 << scheme.bits) - 1
        for code in (top, 0) if scheme.bits == 8 or scheme.values else (top,):
            parts["codes"] = quant.pack(np.full((n, k), code, np.uint8), scheme.bits, scheme.sub_group)
            w = quant.dequantize(parts, scheme, k)
            w = w[:, parts["perm"]] if scheme.act_order else w
            for sign in (np.ones(k), np.where(np.arange(k) % 2, -1.0, 1.0)):
                x = np.tile(sign * rng.uniform(0.5, 2), (T, 1)).astype(np.float32)
                out = call_qlinear(lib, f"q_{name}_{n}_{k}", scheme, parts, x)
                ref, scale, _, _ = reference(x, scheme, w, parts.get("perm"))
                scale += offset_scale(x, scheme, parts)
                assert np.all(np.abs(out - ref) <= 2e-6 * scale + 1e-30), (name, n, k, code, T)


@pytest.mark.parametrize("T", [1, 5, 40])
def test_two_level_scales_are_their_products(lib, rng, T):
    """Two-level scales give, bit for bit, what one-level float32 scales of their products D sc (and
    mins M mn) give: the kernels form the products exactly in f32 (on the native library and
    aarch64-dotprod, where the one-level twins are built; 40 tokens: AMX tiles where the host has them)."""
    for name, twin in (("i5_g32_min_2l", "i5_g32_min_f32"), ("i6_g16_2l", "i6_g16_f32")):
        n, k = MAIN[name]
        scheme, flat = SCHEMES[name](k), SCHEMES[twin](k)
        parts, _ = quantized_weight(rng, scheme, n, k)
        s, m = quant.group_scales(parts, scheme)
        flat_parts = {"codes": parts["codes"], "scales": s, **({"zeros": m} if m is not None else {})}
        x = rng.standard_normal((T, k)).astype(np.float32)
        np.testing.assert_array_equal(call_qlinear(lib, f"q_{name}_{n}_{k}", scheme, parts, x),
                                      call_qlinear(lib, f"q_{twin}_{n}_{k}", flat, flat_parts, x), err_msg=name)


def test_quantize_then_qlinear_matches_float(lib, rng):
    """quant.quantize's round to nearest, through the kernel: close to the float weight."""
    n, k = 37, 576
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    x = rng.standard_normal((3, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for name, tol in (("i8_row", 0.02), ("i4_g32_min", 0.15), ("i8_g16_f32", 0.02)):
        scheme = SCHEMES[name](k)
        out = call_qlinear(lib, f"q_{name}_{n}_{k}", scheme, quant.quantize(w, scheme), x)
        rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        assert rel < tol, (name, rel)


@pytest.mark.parametrize("name", list(QE_DIMS))
@pytest.mark.parametrize("T", [0, 1, 7])
def test_qembedding(lib, rng, name, T):
    dim = QE_DIMS[name]
    parts, w = quantized_weight(rng, SCHEMES[name](dim), 40, dim)
    ids = rng.integers(0, 40, max(T, 1)).astype(np.int32)
    out = np.full((max(T, 1) + 1, dim + 3), np.nan, np.float32)
    getattr(lib, f"qe_{name}")(out, dim + 3, *weight_args(parts), ids, T)
    np.testing.assert_allclose(out[:T, :dim], w[ids[:T]], rtol=1e-6, atol=1e-7)
    assert np.isnan(out[T:]).all() and np.isnan(out[:, dim:]).all()
    if name in QE_SCALED:  # the dequantized rows times the scale
        getattr(lib, f"qe_{name}_scaled")(out, dim + 3, *weight_args(parts), ids, T)
        np.testing.assert_allclose(out[:T, :dim], w[ids[:T]] * QE_SCALE, rtol=1e-6, atol=1e-7 * QE_SCALE)


# --- the int8 KV cache

@pytest.mark.parametrize("G,hd,bs", [(2, 16, 4), (1, 64, 16)])
def test_kv_append_int8(lib, rng, G, hd, bs):
    """Tokens written in order into blocks: codes and scales bit for bit as the run arithmetic the
    GPU targets share gives them (tests/helpers.py), each (block, head)'s values within half a
    step of its final scale per requantization, and the scale max|value| / 127."""
    L, nb = 2, 9
    raw, codes, scales = int8_pool(L, G, hd, bs, nb)
    raw[:] = rng.integers(0, 255, raw.size)  # stale data: offset 0 starts a block afresh
    # three sequences of 2 * bs + 1 tokens in shuffled blocks, appended in steps of 1..bs tokens
    blocks = rng.permutation(nb)[:9].reshape(3, 3)
    total = 2 * bs + 1
    k_all = (rng.standard_normal((3, total, G * hd)) * rng.uniform(0.1, 4, (3, total, 1))).astype(np.float32)
    v_all = (rng.standard_normal((3, total, G * hd))).astype(np.float32)
    pos = 0
    while pos < total:
        step = min(int(rng.integers(1, bs + 1)), total - pos)
        ts = range(pos, pos + step)
        slots = np.array([blocks[s, t // bs] * bs + t % bs for s in range(3) for t in ts], np.int32)
        kb = np.concatenate([k_all[s, pos:pos + step] for s in range(3)])
        vb = np.concatenate([v_all[s, pos:pos + step] for s in range(3)])
        want = ref_kv_append_quantized(codes, scales, 1, kb, vb, slots, G, hd, bs, "int8")
        getattr(lib, f"kv8_{G}_{hd}_{bs}")(raw, nb, 1, kb, G * hd, vb, G * hd, slots, len(slots))
        np.testing.assert_array_equal(codes, want[0])
        np.testing.assert_array_equal(scales, want[1])
        pos += step
    for s in range(3):
        for t in range(total):
            blk, off = blocks[s, t // bs], t % bs
            n_in_block = min(bs, total - (t // bs) * bs)
            for kv, src in ((0, k_all), (1, v_all)):
                want = src[s, (t // bs) * bs:(t // bs) * bs + n_in_block].reshape(n_in_block, G, hd)
                sc = scales[1, kv, blk]
                np.testing.assert_allclose(sc, np.abs(want).max(axis=(0, 2)) / 127, rtol=1e-6)
                got = codes[1, kv, blk, :, off].astype(np.float64) * sc[:, None]
                # each requantization may add half a step: at most bs - 1 of them
                assert np.all(np.abs(got - src[s, t].reshape(G, hd)) <= sc[:, None] * (0.5 * bs) + 1e-7)
    assert np.all(codes[0] == codes[0])  # layer 0 untouched: no exception reading it


def test_paged_attention_int8(lib, rng):
    """Attention over an int8 pool equals attention over the values its codes and scales stand for."""
    for sym, (H, G, hd, bs) in (("attn8", (4, 2, 16, 4)), ("attn8_d64", (8, 2, 64, 16))):
        seqs = [(0, 7), (13, 1), (40, 3), (3, 1)]
        B = len(seqs)
        lens = np.array([c + n for c, n in seqs], np.int32)
        need = [-(-int(s) // bs) for s in lens]
        nb, mb = sum(need) + 2, max(need)
        raw, codes, scales = int8_pool(1, G, hd, bs, nb)
        codes[...] = rng.integers(-127, 128, codes.shape)
        scales[...] = rng.uniform(0.001, 0.05, scales.shape)
        phys = rng.permutation(nb)
        bt = np.zeros((B, mb), np.int32)
        i = 0
        for b, n in enumerate(need):
            bt[b, :n] = phys[i:i + n]
            i += n
        qsl = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
        positions = np.concatenate([np.arange(c, c + n) for c, n in seqs]).astype(np.int32)
        T = len(positions)
        q = rng.standard_normal((T, H * hd)).astype(np.float32) * 3
        out = np.full((T, H * hd), np.nan, np.float32)
        getattr(lib, sym)(out, H * hd, q, H * hd, raw, nb, 0, bt, mb, lens, qsl, B, positions, T)
        values = codes.astype(np.float64) * scales[..., None, None]
        scale = 0.25 if sym == "attn8" else 0.125
        ref = np.zeros((T, H * hd))
        for t in range(T):
            b = np.searchsorted(qsl, t, side="right") - 1
            js = np.arange(0, positions[t] + 1)
            K_ = values[0, 0, bt[b, js // bs], :, js % bs]
            V_ = values[0, 1, bt[b, js // bs], :, js % bs]
            qt = q[t].astype(np.float64).reshape(G, H // G, hd)
            sc = scale * np.einsum("grd,jgd->grj", qt, K_)
            e = np.exp(sc - sc.max(-1, keepdims=True))
            ref[t] = np.einsum("grj,jgd->grd", e / e.sum(-1, keepdims=True), V_).reshape(-1)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("sym,shape", [("attn8", (4, 2, 16, 4)), ("attn8_d64", (8, 2, 64, 16))])
def test_paged_attention_int8_batch_invariance(lib, rng, sym, shape):
    """Over an int8 pool too, each token's outputs bit for bit whatever its batch, threads and
    steps (helpers.check_attention_batch_invariance), and right alone."""
    if isinstance(lib.dll, aarch64_emulator.Emulated):
        pytest.skip("thousands of calls: on libraries that run natively")
    H, G, hd, bs = shape
    seqs = INVARIANCE_TARGETS + [(int(rng.integers(0, 3500)), 1) for _ in range(6)] + [(40, 30)]
    _, nb, bt, mb, _, _, positions = make_batch(rng, seqs, bs, 1, G, hd)
    raw, codes, scales = int8_pool(1, G, hd, bs, nb)
    codes[...] = rng.integers(-127, 128, codes.shape)
    scales[...] = rng.uniform(0.001, 0.05, scales.shape)
    q = rng.standard_normal((len(positions), H * hd)).astype(np.float32) * 3

    def step(out, sq, sbt, slens, sqsl, spos):
        getattr(lib, sym)(out, H * hd, sq, H * hd, raw, nb, 0, sbt, mb, slens, sqsl, len(slens), spos, len(spos))
        return out
    values = codes.astype(np.float64) * scales[..., None, None]
    for alone, (sbt, slens, sqsl, spos, sq) in check_attention_batch_invariance(
            step, seqs, bt, positions, q, lib.dll.llmir_set_num_threads, rng):
        ref = ref_attention(sq, values, 0, sbt, sqsl, spos, H, G, hd, bs, 1 / math.sqrt(hd), 0)
        np.testing.assert_allclose(alone, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_aarch64_dot_product_code(bits):
    """On AArch64 with the dot product extension, qlinear's inner product is sdot (and without it,
    none): checked on the assembly, so also where no emulator runs the code."""
    for name, want in (("aarch64-dotprod", True), ("aarch64-generic", False)):
        variant = AARCH64[name]
        module = ir.Module(name="q")
        scheme = SCHEMES["i8_row" if bits == 8 else "i4_g32_min"](576)
        K.emit_kernel(module, "qlinear", "q", dict(n=37, k=576, bits=bits, group_size=scheme.group_size,
                                                   scale_dtype=scheme.scale_dtype, zero=scheme.zero,
                                                   zero_dtype=scheme.zero_dtype, act_order=False), variant)
        assert QK.int_dot(variant)[0] == ("sdot" if want else "generic")
        assert ("sdot\tv" in tc.emit_assembly(str(module), variant)) == want, name


@pytest.mark.parametrize("name,want", [("x86-64-v4", "vpmaddubsw\t%zmm"), ("x86-64-v3", "vpmaddubsw\t%ymm"),
                                       ("baseline", "pmaddubsw\t%xmm")])
def test_x86_maddubs_code(name, want):
    """x86 without VNNI: qlinear's inner product is pmaddubsw at the variant's width (the 16-lane one
    compiles on any host; hosts without AVX-512 cannot run it)."""
    if tc.host_variant().arch != "x86_64":
        pytest.skip("x86 variants need an x86_64 build host")
    variant = tc.baseline_variant() if name == "baseline" else tc.variants_for([name])[0]
    module = ir.Module(name="q")
    scheme = SCHEMES["i4_g32_min"](576)
    K.emit_kernel(module, "qlinear", "q", dict(n=37, k=576, bits=4, group_size=scheme.group_size,
                                               scale_dtype=scheme.scale_dtype, zero=scheme.zero,
                                               zero_dtype=scheme.zero_dtype, act_order=False), variant)
    assert QK.int_dot(variant) == ("maddubs", variant.vector_width)
    assert want in tc.emit_assembly(str(module), variant)


@pytest.mark.parametrize("name,want", [("x86-64-v4", "vpshufb\t%zmm"), ("x86-64-v3", "vpshufb\t%ymm"),
                                       ("baseline", "pshufb\t%xmm"), ("aarch64-dotprod", "tbl\tv"),
                                       ("aarch64-generic", "tbl\tv")])
def test_value_table_lookup_code(name, want):
    """A value table (IQ4) is looked up by a byte shuffle after the nibbles are unpacked: pshufb at the
    variant's width on x86, tbl on AArch64 (checked on the assembly, so also where no emulator runs it)."""
    if name in AARCH64:
        variant = AARCH64[name]
    elif tc.host_variant().arch != "x86_64":
        pytest.skip("x86 variants need an x86_64 build host")
    else:
        variant = tc.baseline_variant() if name == "baseline" else tc.variants_for([name])[0]
    s = SCHEMES["i4_g32_tbl"](576)
    for kind, params in (("qlinear", dict(n=37, k=576, act_order=False)), ("qembedding", dict(dim=576))):
        module = ir.Module(name="q")
        K.emit_kernel(module, kind, "q", dict(params, bits=4, group_size=32, scale_dtype=s.scale_dtype, zero="none",
                                              zero_dtype="uint8", values=s.values), variant)
        # (qembedding looks up 4 codes at a time: the 128-bit instruction)
        expected = want if kind == "qlinear" else "tbl\tv" if name in AARCH64 else "pshufb\t%xmm"
        assert expected in tc.emit_assembly(str(module), variant), (kind, name)


def test_qlinear_amx_against_vector_path(rng, tmp_path):
    """AMX-INT8 tiles (T >= AMX_MIN_TOKENS) against the same kernel compiled without AMX-INT8, for
    every micro-kernel mode (row, group none / int / min), 8, 4, 5 and 6-bit codes, a tail super-block
    and n not a multiple of 16: the same integer sums, so they differ by f32 rounding only, and do
    differ (the tiles ran)."""
    host = tc.host_variant()
    if not host.has("amx-int8"):
        pytest.skip("this host has no AMX-INT8")
    names = ("i8_row", "i4_g32", "i8_g32_int_bf16", "i4_g32_min", "i4_g64_act", "i5_g32", "i5_g32_min_f32",
             "i6_g64_int", "i4_g32_tbl_f32", "i4_g32_min_2l", "i4_g32_tbl_2l")
    specs = []
    for name in names:
        n, k = MAIN[name]
        s = SCHEMES[name](k)
        specs.append((f"q_{name}", dict(n=n, k=k, bits=s.bits, group_size=s.group_size, scale_dtype=s.scale_dtype,
                                        zero=s.zero, zero_dtype=s.zero_dtype, act_order=s.act_order, values=s.values,
                                        super_group=s.super_group)))
    no_amx = dataclasses.replace(host, features=host.features.replace("+amx-int8", "-amx-int8"))
    libs = []
    for variant, tag in ((host, "amx"), (no_amx, "vector")):
        module = ir.Module(name=tag)
        module.triple = variant.triple
        for sym, params in specs:
            QK.emit_quant_kernel(module, "qlinear", sym, params, variant)
        assert amx.int8_used_by(str(module)) == (tag == "amx")
        tc.link_shared([compile_module(module, variant)], tmp_path / f"{tag}.so")
        libs.append(Lib(ctypes.CDLL(str(tmp_path / f"{tag}.so")), variant, [(sym, "qlinear", p) for sym, p in specs], True))
    if not libs[0].dll.llmir_amx_ready():
        pytest.skip("the OS does not grant this process the AMX tile state")
    for name in names:
        n, k = MAIN[name]
        scheme = SCHEMES[name](k)
        parts, w = quantized_weight(rng, scheme, n, k)
        for T in (QK.AMX_MIN_TOKENS, 47, 600):
            x = rng.standard_normal((T, k)).astype(np.float32)
            amx_out, vec_out = (call_qlinear(lib, f"q_{name}", scheme, parts, x) for lib in libs)
            _, scale, _, _ = reference(x, scheme, w, parts.get("perm"))
            assert np.all(np.abs(amx_out - vec_out) <= 4e-6 * scale + 1e-30), (name, T)
            assert not np.array_equal(amx_out, vec_out), (name, T)


def test_qlinear_amx_compiles_for_sapphire_rapids():
    """On any host: the AMX-INT8 qlinear compiles for a Sapphire Rapids variant (schemes with 32-input
    sub-groups covering 8, 4, 5 and 6-bit codes, each zero kind, each scale type, act-order, a value
    table, two-level scales; all eleven took 35 s to compile), and its code holds the tile products
    (tdpbssd for symmetric codes, tdpbusd for zero points and mins). Their numerics are
    test_qlinear_amx_against_vector_path's
    (every scheme), on hosts with AMX-INT8."""
    host = tc.host_variant()
    if host.arch != "x86_64":
        pytest.skip("an x86-64 host")
    spr = tc.CpuVariant("spr", host.triple, "sapphirerapids", "+amx-tile,+amx-int8,+amx-bf16,+avx512f,+avx512bw,"
                        "+avx512vl,+avx512dq,+avx512vnni,+avx512bf16,+avx2,+fma,+f16c", 16, ())
    module = ir.Module(name="spr")
    module.triple = spr.triple
    for name in ("i8_row", "i4_g32_min", "i4_g128_int", "i4_g64_act", "i5_g32", "i6_g64_int", "i4_g32_tbl",
                 "i4_g32_min_2l"):
        n, k = MAIN[name]
        s = SCHEMES[name](k)
        assert s.sub_group == 32 and QK.amx_applies(s, k, spr), name
        QK.emit_quant_kernel(module, "qlinear", f"q_{name}", dict(
            n=n, k=k, bits=s.bits, group_size=s.group_size, scale_dtype=s.scale_dtype, zero=s.zero,
            zero_dtype=s.zero_dtype, act_order=s.act_order, values=s.values, super_group=s.super_group), spr)
    asm = tc.emit_assembly(str(module), spr, extra=extra_modules([str(module)], spr))
    assert "tdpbssd" in asm and "tdpbusd" in asm and "vpshufb\t%zmm" in asm


def test_qlinear_amx_callers_on_two_threads(rng, tmp_path):
    """Two callers of one library at once (two models of one bundle on two threads: ctypes lets
    go of the GIL) each get their own result: the AMX path packs its operands into a scratch
    buffer of the calling thread, not one shared by the library."""
    host = tc.host_variant()
    if not host.has("amx-int8"):
        pytest.skip("this host has no AMX-INT8")
    n, k = 64, 1024
    scheme = SCHEMES["i8_g32"](k)
    module = ir.Module(name="two_callers")
    module.triple = host.triple
    QK.emit_quant_kernel(module, "qlinear", "q", dict(n=n, k=k, bits=8, group_size=32, scale_dtype="float16",
                                                      zero="none", zero_dtype="uint8", act_order=False), host)
    tc.link_shared([compile_module(module, host)], tmp_path / "q.so")
    lib = Lib(ctypes.CDLL(str(tmp_path / "q.so")), host, [("q", "qlinear", {})], True)
    if not lib.dll.llmir_amx_ready():
        pytest.skip("the OS does not grant this process the AMX tile state")
    lib.dll.llmir_set_num_threads(1)
    parts, _ = quantized_weight(rng, scheme, n, k)
    xs = [rng.standard_normal((512, k)).astype(np.float32) for _ in range(2)]
    alone = [call_qlinear(lib, "q", scheme, parts, x) for x in xs]
    for _ in range(20):
        outs = [None, None]

        def caller(i):
            outs[i] = call_qlinear(lib, "q", scheme, parts, xs[i])
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(out, ref) for out, ref in zip(outs, alone))


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "int4-g128-zp"], "--schemes int4-g128-zp on 960x576: 576 inputs, not a multiple of the group size"),
    (["--schemes", "int5"], "--schemes: unknown 'int5'"),
    (["--shapes", "960"], "--shapes: NxK pairs"),
    (["--tokens", "0,32"], "must be >= 1"),
])
def test_qlinear_benchmark_refuses_bad_arguments(capsys, argv, message):
    """benchmarks/qlinear.py: a one-line usage error before compiling anything, not a traceback."""
    path = Path(__file__).parents[1] / "benchmarks" / "qlinear.py"
    spec = importlib.util.spec_from_file_location("qlinear_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
