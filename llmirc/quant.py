"""Quantized weights: the schemes llmirc stores, its code layout, round-to-nearest quantization.

A quantized [n, k] weight (n output rows, k inputs) is stored as up to four bundle tensors:

* `codes`: uint8 [n, k * bits / 8]: one unsigned code u per weight (bits = 4, 5, 6 or 8), in
  the *super-block layout* below.
* `scales`: [n, k / group_size] of `scale_dtype` (float16, bfloat16 or float32).
* `zeros` (zero = "int" or "min"): [n, k / group_size], uint8 zero points or `scale_dtype` mins.
* `perm` (act_order): int32 [k]: stored column i holds input column perm[i] (GPTQ act-order).
* `super_scales`, `super_mins` (super_group S > 0): float16 [n, k / S] (see two-level scales below).

A weight of group g is, by `zero`:
    none: w = s_g * (u - 2^(bits-1))      (symmetric; llama.cpp's Q4_0 / Q5_0 / Q6_K / Q8_0)
    int:  w = s_g * (u - z_g)             (uint8 zero points; GPTQ, AWQ, MatMulNBits)
    min:  w = s_g * u + m_g               (llama.cpp's Q4_1 / Q5_1 / K-quant mins)
and with a value table (`values`: 2^bits ints in [-128, 127], zero none, 4-bit codes only):
    w = s_g * values[u]                   (a non-uniform grid: llama.cpp's IQ4_NL / IQ4_XS, kvalues_iq4nl)
The kernels look the table up after unpacking a code (x86 pshufb, AArch64 tbl) and go on with the
byte values[u] + 128 as an 8-bit code of center 128 (targets/cpu/quant_kernels.py).

Two-level scales (`super_group` S > 0, scale_dtype int8; zero none or min): llama.cpp's K-quants
and IQ4_XS, as the file stores them. `scales` (and with zero min `zeros`) hold int8 sub-scales sc_g
(sub-mins mn_g) per group, `super_scales` (`super_mins`) a float16 D (M) per S weights, and
    s_g = D * sc_g,   m_g = M * mn_g       (one float32 multiply each, exact: 11 + 8 significant bits)
so the kernels finish a group as with one-level scales of those values, bit for bit.

The super-block layout serves the integer dot-product instructions (x86 vpdpbusd, and its
emulation elsewhere): a 32-bit lane multiplies 4 consecutive bytes. A row is cut into
sub-groups of SG = min(32, group_size) weights, and 16 consecutive sub-groups form a
super-block (the last may have fewer, r). Within a super-block, step t (of SG/4) holds, for
each lane l < r, the 4 weights 4t..4t+3 of sub-group l: byte 4l + b of step t is weight
(16 s + l) * SG + 4t + b. So after the SG/4 steps of one super-block, 32-bit lane l holds the
whole dot product of sub-group l, and one vector of scales (a sub-group lies in one group)
finishes it. The kernels quantize activations per sub-group into the same order (int8 layout).
By bits, a super-block's bytes (r SG bits / 8 of them) are:
    8:    the SG/4 steps, 4 r bytes each;
    4:    SG/8 units of 4 r bytes: unit c holds step 2c in its low nibbles, step 2c+1 in its high;
    5, 6: the low 4 bits of each code as for 4 bits, then a *high plane* of the top h = bits - 4
          bits: SG h / 32 units of 4 r bytes, where bits h i .. h i + h - 1 of byte 4l + b of unit
          c hold the top bits of step c 8/h + i's byte 4l + b (5 bits: a unit per 8 steps, so
          SG = 32; 6 bits: per 4 steps, SG = 16 or 32: llama.cpp's Q5 and Q6_K codes in their
          own bits per weight).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from llmirc import dtypes

LANES = 16   # sub-groups per super-block
BITS = (4, 5, 6, 8)
ZEROS = ("none", "int", "min")


@dataclass(frozen=True)
class Scheme:
    bits: int            # storage bits per code: 4, 5, 6 or 8
    group_size: int      # weights per scale along k: a power of two in [16, 512], or k (per output channel)
    scale_dtype: str = "float16"
    zero: str = "none"   # none | int | min (see the module docstring)
    act_order: bool = False
    values: tuple[int, ...] | None = None  # code u stands for values[u] (None: the uniform grid, see above)
    super_group: int = 0  # two-level scales: int8 sub-scales times a float16 per super_group weights (0: one level)

    @property
    def zero_dtype(self) -> str:
        """The dtype of the zeros tensor (uint8 zero points, or mins in the scale dtype)."""
        return "uint8" if self.zero != "min" else self.scale_dtype

    @property
    def sub_group(self) -> int:
        return min(32, self.group_size)

    @property
    def center(self) -> int:
        """The code of zero for symmetric schemes: 2^(bits-1)."""
        return 1 << (self.bits - 1)

    def check(self, k: int) -> str | None:
        """Why a row of k weights cannot use this scheme (None when it can)."""
        g = self.group_size
        if self.zero not in ZEROS:
            return f"zero points {self.zero!r} (known: {', '.join(ZEROS)})"
        if self.scale_dtype not in ("float16", "bfloat16", "float32", "int8"):
            return f"scale dtype {self.scale_dtype}"
        if (self.scale_dtype == "int8") != (self.super_group > 0):
            return f"{self.scale_dtype} scales with super-group {self.super_group} (int8 sub-scales take one)"
        if g < 16:
            return f"group size {g} (at least 16)"
        if g != k and not (16 <= g <= 512 and g & (g - 1) == 0):
            return f"group size {g} (a power of two from 16 to 512, or the whole row)"
        if k % g:
            return f"{k} inputs, not a multiple of the group size {g}"
        if self.values is not None and (why := table_problem(self.values, self.bits, self.zero)):
            return why
        if self.super_group and (why := super_group_problem(self.super_group, g, self.zero, k)):
            return why
        return layout_problem(self.bits, self.sub_group, k)

    @property
    def high_bits(self) -> int:
        """Bits of each code in the high plane (5 and 6-bit codes; see the module docstring)."""
        return high_bits(self.bits)

    def parts(self) -> tuple[str, ...]:
        supers = ("super_scales",) + (("super_mins",) if self.zero == "min" else ()) if self.super_group else ()
        return ("codes", "scales") + (("zeros",) if self.zero != "none" else ()) + supers + (
            ("perm",) if self.act_order else ())

    def part_shape(self, part: str, n: int, k: int) -> tuple[int, ...]:
        if part in ("super_scales", "super_mins"):
            return (n, k // self.super_group)
        return {"codes": (n, k * self.bits // 8), "scales": (n, k // self.group_size),
                "zeros": (n, k // self.group_size), "perm": (k,)}[part]

    def part_dtype(self, part: str) -> str:
        return {"codes": "uint8", "scales": self.scale_dtype, "zeros": self.zero_dtype, "perm": "int32",
                "super_scales": "float16", "super_mins": "float16"}[part]


@functools.lru_cache(maxsize=64)
def layout_order(k: int, sg: int) -> np.ndarray:
    """order[p] = the column stored at position p of a row in the super-block layout (int8)."""
    j = np.arange(k // sg)
    s, lane = j // LANES, j % LANES
    r = np.minimum(LANES, k // sg - LANES * s)  # lanes of each sub-group's super-block
    e = np.arange(sg)
    t, b = e // 4, e % 4
    pos = (LANES * s * sg)[:, None] + (t * 4)[None, :] * r[:, None] + (4 * lane)[:, None] + b[None, :]
    order = np.empty(k, np.int64)
    order[pos.ravel()] = (j[:, None] * sg + e[None, :]).ravel()
    return order


def table_problem(values, bits: int, zero: str) -> str | None:
    """Why `values` cannot be the value table of `bits`-bit codes with zero points `zero` (None when
    it can): 16 ints in [-128, 127] for 4-bit symmetric codes (what the kernels look up)."""
    if bits != 4 or zero != "none":
        return f"a value table with {bits}-bit codes and zero {zero} (4-bit symmetric codes only)"
    if len(values) != 16 or not all(isinstance(v, int) and -128 <= v <= 127 for v in values):
        return f"value table {list(values)} (16 ints in [-128, 127])"
    return None


def super_group_problem(sg: int, g: int, zero: str, k: int | None = None) -> str | None:
    """Why two-level scales of super-group sg over groups of g cannot hold rows of k weights (any
    rows: k None) with zero points `zero` (None when they can): sg a power of two and a multiple of
    g, dividing k; zero none or min (zero points are codes, not scales)."""
    if zero == "int":
        return "two-level scales with uint8 zero points (zero none or min)"
    if sg <= 0 or sg & (sg - 1) or sg % g:
        return f"super-group {sg} over groups of {g} (a power of two, a multiple of the group size)"
    if k is not None and k % sg:
        return f"{k} inputs, not a multiple of the super-group {sg}"
    return None


def high_bits(bits: int) -> int:
    """Bits of a `bits`-bit code in the high plane: 1 or 2 for 5 and 6-bit codes, else 0."""
    return bits - 4 if bits in (5, 6) else 0


def pack(u: np.ndarray, bits: int, sg: int) -> np.ndarray:
    """Codes u (uint8 [n, k], < 2^bits) in the super-block layout: uint8 [n, k * bits / 8].
    Raises ValueError for a layout that does not exist (see `_check_layout`)."""
    n, k = u.shape
    _check_layout(bits, sg, k)
    laid = np.ascontiguousarray(u[:, layout_order(k, sg)], dtype=np.uint8)
    if bits == 8:
        return laid
    out = np.empty((n, k * bits // 8), np.uint8)
    h = high_bits(bits)
    for start, r in _super_blocks(k, sg):
        step = 4 * r
        blk = laid[:, start:start + sg * r].reshape(n, sg // 4, step)
        lo = (blk[:, 0::2] & 15) | ((blk[:, 1::2] & 15) << 4)  # steps 2c (low nibble) and 2c+1 (high)
        parts = [lo.reshape(n, -1)]
        if h:
            per = 8 // h
            top = (blk >> 4).reshape(n, sg // 4 // per, per, step)
            plane = sum((top[:, :, i] << (h * i)) for i in range(per)).astype(np.uint8)
            parts.append(plane.reshape(n, -1))
        first = start * bits // 8
        out[:, first:first + sg * r * bits // 8] = np.concatenate(parts, axis=1)
    return out


def unpack(codes: np.ndarray, bits: int, sg: int, k: int) -> np.ndarray:
    """The inverse of `pack`: codes uint8 [n, k] in column order."""
    n = codes.shape[0]
    _check_layout(bits, sg, k)
    if bits == 8:
        laid = codes
    else:
        laid = np.empty((n, k), np.uint8)
        h = high_bits(bits)
        for start, r in _super_blocks(k, sg):
            step = 4 * r
            first = start * bits // 8
            lo = codes[:, first:first + sg * r // 2].reshape(n, sg // 8, 1, step)
            u = np.concatenate([lo & 15, lo >> 4], axis=2).reshape(n, sg // 4, step)
            if h:
                per = 8 // h
                plane = codes[:, first + sg * r // 2:first + sg * r * bits // 8].reshape(n, sg // 4 // per, 1, step)
                top = (plane >> (h * np.arange(per, dtype=np.uint8))[None, None, :, None]) & ((1 << h) - 1)
                u = u | (top.reshape(n, sg // 4, step) << 4)
            laid[:, start:start + sg * r] = u.reshape(n, -1)
    out = np.empty((n, k), np.uint8)
    out[:, layout_order(k, sg)] = laid
    return out


def layout_problem(bits: int, sg: int, k: int) -> str | None:
    """Why rows of k codes of `bits` bits in sub-groups of sg have no super-block layout (None
    when they have one)."""
    if bits not in BITS:
        return f"{bits}-bit codes (llmirc stores 4, 5, 6 or 8)"
    if k % sg:
        return f"{k} inputs, not a multiple of the sub-group {sg}"
    if sg % 4:  # a step of the layout (and a dot product's lane) takes 4 inputs
        return f"sub-groups of {sg} inputs (a multiple of 4)"
    if sg * high_bits(bits) % 32:
        return f"{bits}-bit codes in sub-groups of {sg} (5 bits take groups of 32 or more)"
    return None


def _check_layout(bits: int, sg: int, k: int) -> None:
    if (why := layout_problem(bits, sg, k)) is not None:
        raise ValueError(why)


def _super_blocks(k: int, sg: int):
    """(first position, lanes) of each super-block of a row."""
    nsub = k // sg
    return [(s * LANES * sg, min(LANES, nsub - s * LANES)) for s in range(-(-nsub // LANES))]


QUANTIZE_BLOCK = 1 << 21  # weights quantize rounds at a time (a block of rows)


def quantize(w: np.ndarray, scheme: Scheme, stored: str | dtypes.DType = "float32") -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of w ([n, k], stored as `stored`: bf16 as uint16 bits; widened to
    float32 a block of rows at a time) into the scheme's parts.

    none: the group's value of largest magnitude m maps to code 0 (s = m / -2^(bits-1)), as
    llama.cpp's Q4_0/Q8_0 reference quantizers do. int: s = (max - min) / (2^bits - 1) over the
    group with 0 included, z = round(-min / s) (GPTQ's and MatMulNBits' RTN). min: s as for int
    without 0 forced in, m = min (Q4_1). Codes are computed with the stored (rounded) scale.
    (A least-squares scale search, llama.cpp's make_qx_quants unweighted, was tried: it raised
    SmolLM2's int8 perplexity from +0.5% to +1.5% over bf16 by clipping the largest weights.)

    Raises ValueError when the scheme cannot hold a row of w (Scheme.check), w holds NaN or
    infinities, or a scale overflows the scale dtype."""
    n, k = w.shape
    _check_scheme(scheme, k, "quantize")
    if scheme.act_order:
        raise ValueError("quantize: act-order comes only from GPTQ checkpoints")
    rows = max(1, QUANTIZE_BLOCK // k)  # rows are independent: blocks keep the float64 temporaries small
    if n > rows:  # (Gemma's 262144 x 640 table whole: 2.5 GB of them)
        blocks = [quantize(w[i:i + rows], scheme, stored) for i in range(0, n, rows)]
        return {p: np.concatenate([b[p] for b in blocks]) for p in blocks[0]}
    x = dtypes.to_float32(w, stored).reshape(n, k // scheme.group_size, scheme.group_size)
    s, off = _group_params(x, scheme)
    return _parts_of(_encode(x, s[..., None], off[..., None], scheme).reshape(n, k), s, off, scheme)


def gptq(w: np.ndarray, h: np.ndarray, scheme: Scheme, damp: float = 0.01, block: int = 32) -> dict[str, np.ndarray]:
    """GPTQ quantization of w (float32 [n, k]) into the scheme's parts, given h (float [k, k]),
    the Hessian of the layer's squared output error: X^T X over calibration inputs X [N, k]
    (any positive scale).

    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers" (ICLR 2023), Algorithm 1: columns are quantized one by one, each one's
    rounding error spread over the columns not yet quantized through the upper Cholesky factor
    U of H^-1 (lazy updates in blocks of `block` columns: the paper's 128 gives the same codes,
    25% slower in NumPy); H gets `damp` times its mean diagonal
    added (the paper's 1%); inputs never seen (zero diagonal) get weight 0. Columns go in
    decreasing order of H's diagonal ("act-order"), and each group's scale (and zero point) is
    fixed before, from the weights as they were (AutoGPTQ's desc_act with static_groups), so the
    stored layout is the plain one: round to nearest's scale times the factor of 1, 0.975, ...,
    0.7 whose rounding error, weighted by H's diagonal, is least (as GPTQ's `mse` grid search and
    llama.cpp's importance-weighted scale search do). Measured on SmolLM2-135M (DESIGN.md,
    "GPTQ"): the plain column order with each group's scale taken when its first column comes
    gave perplexity 14.84, act-order with static groups 14.01, and with the scale search 13.06.
    With h = I no error is spread, and each group's squared error is at most round to
    nearest's (its scale is among those searched). float64 throughout; O(n k^2 + k^3).

    Raises ValueError when h is not [k, k] or not positive definite after damping ten-fold, and
    as `quantize` does."""
    n, k = w.shape
    _check_scheme(scheme, k, "gptq")
    if scheme.act_order:
        raise ValueError("gptq: a stored act-order permutation is not supported (the order is internal)")
    if h.shape != (k, k):
        raise ValueError(f"gptq: Hessian of shape {h.shape} for a weight of {k} inputs")
    W = np.array(w, np.float64)
    H = np.array(h, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = scheme.group_size
    s, off = _searched_params(W.reshape(n, k // g, g), np.diag(H).reshape(k // g, g), scheme)
    order = np.argsort(-np.diag(H), kind="stable")
    W, U = W[:, order], _inverse_cholesky(H[order][:, order], damp)
    u = np.empty((n, k), np.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1 = W[:, i1:i2].copy(), np.empty((n, i2 - i1))
        for i in range(i2 - i1):
            c, col = i1 + i, order[i1 + i]
            sc, oc = s[:, col // g], off[:, col // g]
            u[:, col] = _encode(W1[:, i], sc, oc, scheme)
            err = (W1[:, i] - _decode(u[:, col], sc, oc, scheme)) / U[c, c]
            W1[:, i:] -= np.outer(err, U[c, c:i2])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return _parts_of(u, s, off, scheme)


def _check_scheme(scheme: Scheme, k: int, what: str) -> None:
    why = scheme.check(k)
    if why is not None:
        raise ValueError(f"{what}: cannot store {why}")
    if scheme.values is not None:
        raise ValueError(f"{what}: value tables come only from GGUF files (IQ4_NL, IQ4_XS)")
    if scheme.super_group:
        raise ValueError(f"{what}: two-level scales come only from GGUF files (K-quants, IQ4_XS)")


def _searched_params(x: np.ndarray, d: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """`_group_params` of x (float [n, G, g]) with each scale shrunk by the factor (1, 0.975, ...,
    0.7) that minimizes sum d (x - q)^2 over the group; d [G, g] >= 0 weighs the inputs."""
    s0, off = _group_params(x.astype(np.float32), scheme)
    best_s, best_e = s0, None
    for factor in np.arange(1.0, 0.6999, -0.025):
        s = _stored(s0 * np.float32(factor), scheme.scale_dtype)
        q = _decode(_encode(x, s[..., None], off[..., None], scheme), s[..., None], off[..., None], scheme)
        e = (d[None] * (x - q) ** 2).sum(-1)
        if best_e is None:
            best_e = e
        else:
            better = e < best_e
            best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
    return best_s, off


def _inverse_cholesky(H: np.ndarray, damp: float) -> np.ndarray:
    """U upper triangular with U^T U = (H + damp mean(diag H) I)^-1 (ten times the damping
    once more if H is not positive definite)."""
    k = H.shape[0]
    for d in (damp, 10 * damp):
        Hd = H + d * np.mean(np.diag(H)) * np.eye(k)
        try:
            Linv = np.linalg.inv(np.linalg.cholesky(Hd))  # H^-1 = Linv^T Linv
            return np.linalg.cholesky(Linv.T @ Linv).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("gptq: the Hessian is not positive definite")


def _group_params(x: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """The round-to-nearest scale s and offset of each group of x (float32 [n, G, g]), as the
    stored dtypes read back: (s [n, G], off [n, G]), off = the zero point code (int), the min
    (min) or 0 (none). See `quantize`."""
    if scheme.zero == "none":
        idx = np.abs(x).argmax(-1)[..., None]
        s = _finite(_stored(np.take_along_axis(x, idx, -1)[..., 0] / -scheme.center, scheme.scale_dtype), x, scheme)
        return s, np.zeros_like(s)
    top = (1 << scheme.bits) - 1
    lo, hi = x.min(-1), x.max(-1)
    if scheme.zero == "int":
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    s = _finite(_stored((hi - lo) / top, scheme.scale_dtype), x, scheme)
    if scheme.zero == "int":
        return s, np.clip(np.rint(-lo * _inverse(s)), 0, top)
    return s, _finite(_stored(lo, scheme.scale_dtype), x, scheme)


def _finite(v: np.ndarray, x: np.ndarray, scheme: Scheme) -> np.ndarray:
    """v (scales or mins of x's groups), unless x or v is not finite: ValueError, as a NaN or
    infinite weight, or a scale beyond the scale dtype's range (float16: |w| > 65504 * 2^(bits-1)
    or so), would be stored as NaN codes silently."""
    if not np.isfinite(v).all():
        if not np.isfinite(x).all():
            raise ValueError("the weight holds NaN or infinite values")
        raise ValueError(f"weights up to {float(np.abs(x).max()):.4g} in magnitude overflow {scheme.scale_dtype} "
                         "scales")
    return v


def _inverse(s: np.ndarray) -> np.ndarray:
    return np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)


def _encode(x: np.ndarray, s: np.ndarray, off: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Codes (uint8) of values x with scales s and offsets off (broadcast against x)."""
    top = (1 << scheme.bits) - 1
    if scheme.zero == "none":
        u = np.rint(x * _inverse(s)) + scheme.center
    elif scheme.zero == "int":
        u = np.rint(x * _inverse(s)) + off
    else:
        u = np.rint((x - off) * _inverse(s))
    return np.clip(u, 0, top).astype(np.uint8)


def _decode(u: np.ndarray, s: np.ndarray, off: np.ndarray, scheme: Scheme) -> np.ndarray:
    """The values codes u stand for (the inverse of `_encode` up to rounding)."""
    if scheme.zero == "none":
        return s * (u.astype(np.float64) - scheme.center)
    if scheme.zero == "int":
        return s * (u.astype(np.float64) - off)
    return s * u.astype(np.float64) + off


def _parts_of(u: np.ndarray, s: np.ndarray, off: np.ndarray, scheme: Scheme) -> dict[str, np.ndarray]:
    """The stored parts of codes u (uint8 [n, k], column order), scales and offsets ([n, G])."""
    parts = {"scales": dtypes.from_float32(s, scheme.scale_dtype),
             "codes": pack(u, scheme.bits, scheme.sub_group)}
    if scheme.zero == "int":
        parts["zeros"] = off.astype(np.uint8)
    elif scheme.zero == "min":
        parts["zeros"] = dtypes.from_float32(off, scheme.scale_dtype)
    return {p: parts[p] for p in scheme.parts()}


def _stored(v: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as they read back after being stored as `dtype`."""
    return dtypes.to_float32(dtypes.from_float32(np.asarray(v, np.float32), dtype), dtype)


def dequantize(parts: dict[str, np.ndarray], scheme: Scheme, k: int) -> np.ndarray:
    """The float64 [n, k] weight the parts stand for (input columns in their original order)."""
    u = unpack(parts["codes"], scheme.bits, scheme.sub_group, k).astype(np.float64)
    n, g = u.shape[0], scheme.group_size
    s, m = group_scales(parts, scheme)
    s = np.repeat(s.astype(np.float64), g, axis=1)
    if scheme.values is not None:
        w = s * np.array(scheme.values, np.float64)[u.astype(np.int64)]
    elif scheme.zero == "none":
        w = s * (u - scheme.center)
    elif scheme.zero == "int":
        w = s * (u - np.repeat(parts["zeros"].astype(np.float64), g, axis=1))
    else:
        w = s * u + np.repeat(m.astype(np.float64), g, axis=1)
    if scheme.act_order:
        out = np.empty_like(w)
        out[:, parts["perm"]] = w
        return out.reshape(n, k)
    return w


def group_scales(parts: dict[str, np.ndarray], scheme: Scheme) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales, mins) per group as float32 [n, k / group_size] (mins None unless zero is min); with
    two-level scales the products D sc and M mn, exact."""
    if not scheme.super_group:
        mins = dtypes.to_float32(parts["zeros"], scheme.scale_dtype) if scheme.zero == "min" else None
        return dtypes.to_float32(parts["scales"], scheme.scale_dtype), mins
    per = scheme.super_group // scheme.group_size

    def product(sub, sup):
        return np.asarray(sub, np.int8).astype(np.float32) * np.repeat(np.asarray(sup, np.float16), per, 1)
    mins = product(parts["zeros"], parts["super_mins"]).astype(np.float32) if scheme.zero == "min" else None
    return product(parts["scales"], parts["super_scales"]).astype(np.float32), mins


def hadamard(a: np.ndarray, block: int) -> np.ndarray:
    """a (float [..., k]) with each block of `block` values along the last axis multiplied by the
    normalized Walsh-Hadamard matrix H_b / sqrt(b), H_b[i, j] = (-1)^popcount(i & j) (Sylvester's
    order), in float64 (returned as float64). H_b / sqrt(b) is symmetric and orthogonal, so applying
    it twice gives a back. The fast transform: log2(b) rounds of sums and differences of pairs
    (Fino and Algazi 1976). llmir.hadamard's reference; `rotate` folds it into weights with it.

    Raises ValueError when block is not a power of two >= 2 dividing k."""
    k = a.shape[-1]
    if block < 2 or block & (block - 1) or k % block:
        raise ValueError(f"hadamard: block {block} must be a power of two (at least 2) dividing {k}")
    x = np.array(a, np.float64).reshape(-1, k // block, block)
    h = 1
    while h < block:
        x = x.reshape(*x.shape[:2], block // (2 * h), 2, h)
        x = np.stack([x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]], axis=-2)
        h *= 2
    return (x.reshape(a.shape) / np.sqrt(block)).astype(np.float64)


def activation_block(x: np.ndarray, sg: int) -> tuple[np.ndarray, np.ndarray]:
    """How the kernels quantize activations (float32 [T, k]) per sub-group of sg values:
    d = max|x| / 127, q = rint(x / d) in int8 (llama.cpp's Q8 activations). Returns (q [T, k]
    int8, d [T, k / sg] float32); a block of zeros has d = 0 and q = 0."""
    T, k = x.shape
    xb = np.asarray(x, np.float32).reshape(T, k // sg, sg)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    return q.reshape(T, k), d
