"""linear {n, k, bias, residual, w_dtype}: out[t,j] = sum_i x[t,i] w[j,i] (+ bias[j]) (+ residual[t,j]).

Semantics and arguments as targets/signatures.py says (shared with the CPU target), plus one buffer:

    (out, ld_out, x, ld_x, w, bias, residual, ld_res, T, splitk_workspace)

w is [n, k] row-major in `w_dtype` (float32, bfloat16 or float16), bias f32; x, residual and out
f32; accumulation f32. bf16/f16 weights go through the tensor cores (the f32 x tile is
rounded to the weight's dtype in registers: what a bf16 model's activations are); f32 weights
use tl.dot with input_precision="ieee" (no TF32: exact as transformers' f32). `out` may be
`residual` (same ld); it never aliases x or w.

One @triton.jit kernel, three tile configurations chosen by T (the launch rule's variants;
`_config` says where they come from):

    T <= 16    decode: BLOCK_M 16, BLOCK_N 32, BLOCK_K 128 (64 for f32 weights), two warps:
               GEMV-shaped; the weight rows stream through a num_stages-deep pipeline
               (cp.async/TMA-free loads, 16-byte vectors along k), split-K so that
               cdiv(n, 32) * split_k >= 2 * SMs.
    T <= 128   BLOCK_M 32, BLOCK_N 128, BLOCK_K 64 (32 for f32), split-K likewise.
    T > 128    prefill: 128 x 256 x 64 tiles on sm_90 with bf16/f16 weights (wgmma), 128 x 128
               otherwise (sm_80: mma; gfx9: MFMA); grouped launch order (GROUP_M 8) for L2
               reuse, no split-K.

Split-K is deterministic and one launch (splitk.py: the last program of a tile sums the
partials in split order, then applies bias and residual); the workspace's size (bytes, a
constant per call) is the largest over the split variants, which share it.

With CompileOptions.gpu_pdl on sm_90 (pdl.py) the three variants are launched with programmatic
dependent launch: in the decode ones the first M tile's programs prefetch the first
PREFETCH_BYTES of their k split of each weight row into L2 while the kernel before them still
runs, then every program waits for it (the prefill's wait without prefetching). The fused
one-token GEMV (gpu_fusions) is not.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .elementwise import activation, act_mul_into_launch
from .norm import rms_scale, rms_norm_into_launch
from .pdl import pdl_wait
from .spec import Launch, Rule, Variant, cdiv, kernel, mul
from .splitk import splitk_arrive, splitk_total, workspace


@triton.jit
def _epilogue(out, ld_out, bias, residual, ld_res, acc, rm, rn, T, N: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr):
    mask = (rm[:, None] < T) & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0)[None, :]
    rows = rm.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(residual + rows * ld_res + rn[None, :], mask=mask, other=0.0)
    tl.store(out + rows * ld_out + rn[None, :], acc, mask=mask)


@triton.jit
def linear_kernel(out, ld_out, x, ld_x, w, bias, residual, ld_res, T, splitk_workspace,
                  N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  K_SPLIT: tl.constexpr, GROUP_M: tl.constexpr, MAX_TILES: tl.constexpr,
                  RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """One (m, n) tile's split of the linear."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(T, BLOCK_M).to(tl.int32)
    tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = split * K_SPLIT
    pdl_wait(w, rn, K, N, k0, K, pid_m == 0, PREFETCH, PDL)
    rk = k0 + tl.arange(0, BLOCK_K)
    x_ptrs = x + rm.to(tl.int64)[:, None] * ld_x + rk[None, :]
    w_ptrs = w + rn.to(tl.int64)[:, None] * K + rk[None, :]
    row_ok = rm[:, None] < T
    col_ok = rn[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):
        k_ok = (rk[None, :] + kk) < K
        a = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        b = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        if w.dtype.element_ty == tl.float32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(w.dtype.element_ty), tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        _epilogue(out, ld_out, bias, residual, ld_res, acc, rm, rn, T, N, HAS_BIAS, HAS_RESIDUAL)
    else:
        tile = pid_m * tiles_n + pid_n
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        arrived = splitk_arrive(splitk_workspace, acc, offs, tile, split, SPLIT_K, MAX_TILES, BLOCK_M * BLOCK_N,
                                RELEASE_ALL, THREADS)
        if arrived == SPLIT_K - 1:
            acc = splitk_total(splitk_workspace, acc, offs, tile, SPLIT_K, MAX_TILES, BLOCK_M * BLOCK_N)
            _epilogue(out, ld_out, bias, residual, ld_res, acc, rm, rn, T, N, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _prologue_gemv(out, ld_out, x, w, bias, residual, ld_res, splitk_workspace, aux, N: tl.constexpr,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, K_SPLIT: tl.constexpr, MAX_TILES: tl.constexpr,
                   RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr, PROLOGUE: tl.constexpr, EPS: tl.constexpr,
                   ACT: tl.constexpr):
    """Rows [pid0 BLOCK_N, +BLOCK_N) of the output of one token (row 0), split pid1 of k, its input
    computed as it is loaded: rms_norm(x) * aux ("rms_norm": aux the norm's weight; each program
    first sums the row's squares over all of K) or act(x) * aux ("act_mul": x the gate, aux the up
    row). A GEMV (no MMA tile: the prologue is computed for the one row there is), the input
    rounded to the weight's dtype as linear_kernel's tensor-core path rounds it."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = rn < N
    if PROLOGUE == "rms_norm":
        rstd = rms_scale(x, 0, x, 0, 0, K, EPS, BLOCK_K, False)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):
        rk = split * K_SPLIT + kk + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x + rk, mask=k_ok, other=0.0)
        if PROLOGUE == "rms_norm":
            a = (a * rstd) * tl.load(aux + rk, mask=k_ok, other=0.0)
        else:
            a = activation(a, ACT, tl.float32) * tl.load(aux + rk, mask=k_ok, other=0.0)
        a = a.to(w.dtype.element_ty).to(tl.float32)
        b = tl.load(w + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * a[None, :], 1)
    rm = tl.zeros([1], tl.int32)
    if SPLIT_K == 1:
        _epilogue(out, ld_out, bias, residual, ld_res, acc[None, :], rm, rn, 1, N, HAS_BIAS, HAS_RESIDUAL)
    else:
        offs = tl.arange(0, BLOCK_N)
        if splitk_arrive(splitk_workspace, acc, offs, tl.program_id(0), split, SPLIT_K, MAX_TILES, BLOCK_N,
                         RELEASE_ALL, THREADS) == SPLIT_K - 1:
            acc = splitk_total(splitk_workspace, acc, offs, tl.program_id(0), SPLIT_K, MAX_TILES, BLOCK_N)
            _epilogue(out, ld_out, bias, residual, ld_res, acc[None, :], rm, rn, 1, N, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def rms_norm_linear_kernel(out, ld_out, src, ld_src, norm_w, w, bias, residual, ld_res, T, splitk_workspace,
                           N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                           K_SPLIT: tl.constexpr, MAX_TILES: tl.constexpr, RELEASE_ALL: tl.constexpr,
                           THREADS: tl.constexpr, EPS: tl.constexpr):
    _prologue_gemv(out, ld_out, src, w, bias, residual, ld_res, splitk_workspace, norm_w, N, K, HAS_BIAS,
                   HAS_RESIDUAL, BLOCK_N, BLOCK_K, SPLIT_K, K_SPLIT, MAX_TILES, RELEASE_ALL, THREADS, "rms_norm", EPS,
                   "silu")


@triton.jit
def act_mul_linear_kernel(out, ld_out, gate, ld_gate, up, ld_up, w, bias, residual, ld_res, T, splitk_workspace,
                          N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          K_SPLIT: tl.constexpr, MAX_TILES: tl.constexpr, RELEASE_ALL: tl.constexpr,
                          THREADS: tl.constexpr, ACT: tl.constexpr):
    _prologue_gemv(out, ld_out, gate, w, bias, residual, ld_res, splitk_workspace, up, N, K, HAS_BIAS,
                   HAS_RESIDUAL, BLOCK_N, BLOCK_K, SPLIT_K, K_SPLIT, MAX_TILES, RELEASE_ALL, THREADS, "act_mul", 0.0,
                   ACT)


def _config(arch, w_dtype: str, t_max: int | None) -> dict:
    """Tile shape, warps and stages for one T range on one architecture. The decode ranges are the
    configurations of `medium`'s linears that took the least time summed over a layer's linears
    and the LM head on an H200 (benchmarks/gpu_sweep.py, BENCHMARKS.md 2026-12-04): at T = 1,
    16 x 32 tiles of two warps (6% less than four warps); at T = 32, 32 x 128 tiles (21% less
    than 64 x 64, which left half of each tile's rows empty). The prefill's on sm_90 likewise at
    T = 2047: 128 x 256 tiles, 24% less than 128 x 128 (still 1.7x cuBLAS's time)."""
    f32 = w_dtype == "float32"
    hip = arch.backend == "hip"
    if t_max is not None and t_max <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64 if f32 else 128, num_warps=2, num_stages=3)
    elif t_max is not None:
        cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32 if f32 else 64, num_warps=4, num_stages=4)
    elif hip or arch.arch == 80:  # 64 KB of LDS / 163 KB: the f32 x tile takes twice the weights' bytes
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    elif f32:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    else:  # sm_90: 192 KB of the 227 KB of shared memory
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    if hip:
        cfg["num_stages"] = 2
    return cfg


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k(n: int, k: int, block_n: int, block_k: int, tiles_m: int, num_sms: int,
            splits: int | None = None) -> tuple[int, int]:
    """(split_k, k_split): toward tiles * split_k >= 2 * SMs with >= 4 k-blocks per split (unless
    `splits` is given); k_split is a multiple of block_k and no split is empty."""
    k_blocks = _cdiv(k, block_k)
    if splits is None:
        splits = max(1, min(_cdiv(2 * num_sms, tiles_m * _cdiv(n, block_n)), k_blocks // 4))
    k_split = _cdiv(k_blocks, min(splits, k_blocks)) * block_k
    return _cdiv(k, k_split), k_split


T_RANGES = (16, 128, None)  # the variants' upper bounds on T (None: the rest)
PREFETCH_BYTES = 1024  # PDL: the bytes of each weight row a decode program prefetches before its wait


def _prefetch(k_split: int, w_dtype: str) -> int:
    """PDL's prefetch, in columns, of a decode program's rows (pdl.py): the first PREFETCH_BYTES
    of its k split, at least one 128-byte line, a power of two of lines. For `medium`'s decode
    layers 8-12 MB a linear (q/k/v's and o_proj's whole matrices: their splits are 512 columns;
    the LM head 33 MB), about what HBM delivers in the few microseconds of the norm, activation
    or attention kernel before it (BENCHMARKS.md, 2026-12-04: 1.9-3.4 us each)."""
    itemsize = 4 if w_dtype == "float32" else 2
    line = 128 // itemsize
    cols = min(max(k_split, line), PREFETCH_BYTES // itemsize)
    return line * (1 << ((cols // line).bit_length() - 1))


def rule_linear(params, arch, args, overrides: dict | None = None) -> Rule:
    """The launch rule of one linear. `overrides` {t_max (T_RANGES): {key: value}} replaces the
    tile configuration of a variant (BLOCK_M/N/K, num_warps, num_stages; `split_k` forces a split
    count): for tests and benchmarks/gpu_sweep.py."""
    n, k = int(params["n"]), int(params["k"])
    w_dtype = params["w_dtype"]
    kernel_args = args + (("splitk_workspace", "*fp32"),)
    plans = []  # (t_max, cfg, splits, k_split, tiles)
    for t_max in T_RANGES:
        cfg = _config(arch, w_dtype, t_max) | (overrides or {}).get(t_max, {})
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        if t_max is None:
            if cfg.get("split_k", 1) != 1:
                raise ValueError("linear: no split-K for T > 128 (its workspace is sized for 128 rows)")
            splits, k_split = split_k(n, k, bn, bk, 1, arch.num_sms, splits=1)
        else:
            splits, k_split = split_k(n, k, bn, bk, _cdiv(t_max, bm), arch.num_sms, cfg.get("split_k"))
        plans.append((t_max, cfg, splits, k_split, _cdiv(t_max, bm) * _cdiv(n, bn) if t_max else 0))
    max_tiles, buffer = workspace([(tiles, splits, cfg["BLOCK_M"] * cfg["BLOCK_N"])
                                   for _, cfg, splits, _, tiles in plans])
    variants = []
    for t_max, cfg, splits, k_split, _ in plans:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        spec = kernel(linear_kernel, {
            "N": n, "K": k, "HAS_BIAS": bool(params["bias"]), "HAS_RESIDUAL": bool(params["residual"]),
            "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "SPLIT_K": splits, "K_SPLIT": k_split, "GROUP_M": 8 if t_max is None else 1,
            "MAX_TILES": max_tiles if splits > 1 else 0,
            "RELEASE_ALL": arch.backend == "hip", "THREADS": cfg["num_warps"] * arch.warp_size,
            "PDL": "wait" if arch.pdl else "", "PREFETCH": _prefetch(k_split, w_dtype) if arch.pdl and t_max else 0},
            kernel_args, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        grid = (mul(cdiv("T", bm), _cdiv(n, bn)), splits, 1)
        variants.append(Variant(["<=", "T", t_max] if t_max else 1, (Launch(spec, grid),)))
    return Rule("linear", params, args, variants, [buffer])


LINEAR_PARAMS = ("n", "k", "bias", "residual", "w_dtype")
FUSED_KERNELS = {  # kind: (its one-token GEMV, the prologue's static param and constexpr, the prologue alone)
    "rms_norm_linear": (rms_norm_linear_kernel, "eps", "EPS", rms_norm_into_launch),
    "act_mul_linear": (act_mul_linear_kernel, "act", "ACT", act_mul_into_launch)}


def rule_rms_norm_linear(params, arch, args) -> Rule:
    return _prologue_rule("rms_norm_linear", params, arch, args)


def rule_act_mul_linear(params, arch, args) -> Rule:
    return _prologue_rule("act_mul_linear", params, arch, args)


def _prologue_rule(kind, params, arch, args, overrides: dict | None = None) -> Rule:
    """rms_norm_linear / act_mul_linear (kinds.py): for one token (T <= 1: batch-1 decode, a
    logits row) one GEMV kernel with the prologue in its loads; otherwise the prologue's own kernel
    (writing x) then the linear's variant. The GEMV takes the T <= 16 variant's columns per
    program, k split and workspace (its partials fit that variant's). `overrides` as rule_linear's."""
    fn, param, constexpr, alone = FUSED_KERNELS[kind]
    types = dict(args) | {"splitk_workspace": "*fp32"}
    linear_args = ("out", "ld_out", "x", "ld_x", "w", "bias", "residual", "ld_res", "T")
    base = rule_linear({p: params[p] for p in LINEAR_PARAMS}, arch, tuple((a, types[a]) for a in linear_args),
                       overrides)
    decode = base.variants[0].launches[0]
    c = dict(decode.kernel.constexprs)
    value = float(params[param]) if param == "eps" else params[param]
    warps = 4
    gemv = kernel(fn, {**{k: c[k] for k in ("N", "K", "HAS_BIAS", "HAS_RESIDUAL", "BLOCK_N", "BLOCK_K", "SPLIT_K",
                                            "K_SPLIT", "MAX_TILES", "RELEASE_ALL")},
                       "THREADS": warps * arch.warp_size, constexpr: value},
                  [(a, types[a]) for a in fn.arg_names if a in types], warps, decode.kernel.num_stages)
    pre = alone(int(params["k"]), value, types)
    variants = [Variant(["<=", "T", 1], (Launch(gemv, (-(-int(params["n"]) // c["BLOCK_N"]), c["SPLIT_K"], "T")),))]
    variants += [Variant(v.when, (pre, *v.launches)) for v in base.variants]
    return Rule(kind, params, args, variants, base.buffers)
