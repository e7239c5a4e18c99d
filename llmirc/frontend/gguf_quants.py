"""GGUF's block-quantized tensor formats, unpacked and dequantized with NumPy (the reference).

A quantized GGUF tensor stores each row as consecutive blocks. Every format here is, exactly,
`value = code * scale (+ offset)` over groups of consecutive elements of a row:

| format | block: elements, bytes | group | code        | scale (float32)      | offset (float32)     |
|--------|------------------------|-------|-------------|----------------------|----------------------|
| Q8_0   | 32, 34                 | 32    | int8        | d                    | -                    |
| Q4_0   | 32, 18                 | 32    | q - 8       | d                    | -                    |
| Q4_1   | 32, 20                 | 32    | q (0..15)   | d                    | m                    |
| Q5_0   | 32, 22                 | 32    | q - 16      | d                    | -                    |
| Q5_1   | 32, 24                 | 32    | q (0..31)   | d                    | m                    |
| Q2_K   | 256, 84                | 16    | q (0..3)    | d * sc (4-bit sc)    | -(dmin * mn) (4-bit) |
| Q3_K   | 256, 110               | 16    | q - 4       | d * (sc - 32) (6-bit)| -                    |
| Q4_K   | 256, 144               | 32    | q (0..15)   | d * sc (6-bit sc)    | -(dmin * mn) (6-bit) |
| Q5_K   | 256, 176               | 32    | q (0..31)   | d * sc (6-bit sc)    | -(dmin * mn) (6-bit) |
| Q6_K   | 256, 210               | 16    | q - 32      | d * sc (int8 sc)     | -                    |
| IQ4_NL | 32, 18                 | 32    | kvalues[q]  | d                    | -                    |
| IQ4_XS | 256, 136               | 32    | kvalues[q]  | d * (sc - 32) (6-bit)| -                    |

(IQ4's 4-bit q index a fixed table of 16 int8 values, `kvalues_iq4nl`: a non-uniform grid, so its
code here is the table's value, an int8; frontend/packed.py keeps the index, with the table in the
scheme.)

d, m, dmin are float16; the products d * sc are exact in float32 (at most 11 + 8 significant bits).
`unpack` returns those codes, scales and offsets: a lossless repacking that a kernel can read
directly; for the K-quants and IQ4_XS also the two levels as the file has them (int8 sub-scales and
sub-mins sc, mn or sc - 32, float16 d and -dmin per 256), which frontend/packed.py keeps;
`dequantize` computes `code * scale (+ offset)` in float32 in the order llama.cpp's
`dequantize_row_*` does, so the result is bit-identical to ggml's reference C code.

Keeping them quantized (frontend/packed.py, per format): `unpack`'s codes, scales and offsets
are repacked losslessly into llmirc's own layouts (llmirc/quant.py). Q8_0, Q4_0, Q4_1, Q5_0 and
Q5_1 keep their size (8, 4 or 5-bit codes, a float16 scale per group, and for Q4_1/Q5_1 a float16
*offset* per group: its m is not an integer multiple of d, so an integer zero point would lose
it). Q4_K, Q5_K and Q6_K keep their 4, 5 or 6-bit codes and their two-level scales (6- or 8-bit
integer sub-block scales, as int8, under a float16 super-block scale: `quant.Scheme.super_group`),
0.06-0.13 more bits per weight than the file (a byte per 6-bit sub-scale). Q2_K and Q3_K have no
2- or 3-bit layout: their codes widen to 4 bits (5.1 and 4.6 bits a weight, the file's 2.6 and 3.4).
IQ4_NL and IQ4_XS keep their 4-bit indices, the table in the scheme (`quant.Scheme.values`):
IQ4_NL its size, IQ4_XS with its two-level scales (4.3 bits a weight for 4.25).

Block layouts: ggml/src/ggml-common.h (`block_q4_0` ... `block_q6_K`); formulas:
ggml/src/ggml-quants.c (`dequantize_row_q4_0` ... `dequantize_row_q6_K`, `get_scale_min_k4`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.quants import IQ4_NL

IQ4_VALUES = np.array(IQ4_NL.kvalues, dtype=np.int8)  # ggml's kvalues_iq4nl

QK_K = 256  # elements in a K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    name: str
    type_id: int     # GGMLQuantizationType value
    block_size: int  # elements per block
    type_size: int   # bytes per block
    group: int       # elements sharing one scale (and offset)


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 2, 32, 18, 32),
    BlockFormat("Q4_1", 3, 32, 20, 32),
    BlockFormat("Q5_0", 6, 32, 22, 32),
    BlockFormat("Q5_1", 7, 32, 24, 32),
    BlockFormat("Q8_0", 8, 32, 34, 32),
    BlockFormat("Q2_K", 10, QK_K, 84, 16),
    BlockFormat("Q3_K", 11, QK_K, 110, 16),
    BlockFormat("Q4_K", 12, QK_K, 144, 32),
    BlockFormat("Q5_K", 13, QK_K, 176, 32),
    BlockFormat("Q6_K", 14, QK_K, 210, 16),
    BlockFormat("IQ4_NL", 20, 32, 18, 32),
    BlockFormat("IQ4_XS", 23, QK_K, 136, 32),
)}


@dataclass(frozen=True)
class Unpacked:
    """A block-quantized tensor, losslessly: value = codes * scales (+ offsets) per group.

    codes: int8 [..., n]; scales, offsets: float32 [..., n // group] (offsets None when the format has none).
    For the two-level formats (K-quants, IQ4_XS), the levels as stored: scales = super_scales * sub_scales
    and offsets = super_mins * sub_mins, exactly, with sub_scales, sub_mins int8 [..., n // group] and
    super_scales, super_mins float16 [..., n // 256] (super_mins = -dmin); None for the other formats."""
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    group: int
    sub_scales: np.ndarray | None = None
    super_scales: np.ndarray | None = None
    sub_mins: np.ndarray | None = None
    super_mins: np.ndarray | None = None

    ROW_FIELDS = ("codes", "scales", "offsets", "sub_scales", "super_scales", "sub_mins", "super_mins")


def _f16(raw: np.ndarray) -> np.ndarray:
    """float16 fields (2 little-endian bytes each, last axis) -> float32 [...]."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 16] packed bytes -> [nb, 32] codes: the low nibbles are elements 0..15, the high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: [nb, 4] bytes (a little-endian uint32) -> [nb, 32] with bit j of it at element j, as 0 or 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # bit j of the uint32 at position j
    return bits << 4


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: [nb, 12] bytes -> 6-bit (scale, min) of the 8 sub-blocks, each [nb, 8] (get_scale_min_k4)."""
    q = scales.astype(np.uint8)
    lo, hi, mixed = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = np.concatenate([lo & 63, (mixed & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (mixed >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _two_bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: [nb, 64] bytes -> [nb, 256] 2-bit codes. Per 128 elements, 32 bytes: bits 2j, 2j+1 of
    byte l are element 32 j + l."""
    shifts = np.arange(0, 8, 2, dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _raw_f16(raw: np.ndarray) -> np.ndarray:
    """float16 fields (2 little-endian bytes each, last axis) -> float16 [..., 1]."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float16)


def _two_level(fmt: BlockFormat, b: np.ndarray) -> tuple | None:
    """The K-quants' and IQ4_XS's levels of [nb, type_size] blocks: (int8 sub-scales [nb, groups],
    float16 d [nb, 1], int8 sub-mins, float16 -dmin (None without mins)); None for other formats."""
    name = fmt.name
    if name == "Q2_K":
        sc = b[:, 0:16]
        return (sc & 0x0F).astype(np.int8), _raw_f16(b[:, 80:82]), (sc >> 4).astype(np.int8), -_raw_f16(b[:, 82:84])
    if name == "Q3_K":
        packed, s = b[:, 96:108], np.arange(16)
        low = (packed[:, s % 8] >> (4 * (s // 8)).astype(np.uint8)) & 0x0F
        top = (packed[:, 8 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & 3
        return (low | (top << 4)).astype(np.int8) - 32, _raw_f16(b[:, 108:110]), None, None
    if name in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales(b[:, 4:16])
        return sc.astype(np.int8), _raw_f16(b[:, 0:2]), mn.astype(np.int8), -_raw_f16(b[:, 2:4])
    if name == "Q6_K":
        return b[:, 192:208].view(np.int8), _raw_f16(b[:, 208:210]), None, None
    if name == "IQ4_XS":
        s = np.arange(8)
        low = (b[:, 4 + s // 2] >> (4 * (s % 2)).astype(np.uint8)) & 0x0F
        high = (b[:, 2:4].copy().view("<u2") >> (2 * s).astype(np.uint16)) & 3
        return (low | (high << 4)).astype(np.int8) - 32, _raw_f16(b[:, 0:2]), None, None
    return None


def _unpack_blocks(fmt: BlockFormat, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[nb, type_size] uint8 blocks -> codes [nb, block_size], scales and offsets [nb, block_size // group]."""
    name = fmt.name
    if name == "Q8_0":
        return b[:, 2:].view(np.int8), _f16(b[:, 0:2])[:, None], None
    if name in ("Q4_0", "Q4_1"):
        start = 2 if name == "Q4_0" else 4
        q = _nibbles(b[:, start:start + 16])
        if name == "Q4_0":
            return q.astype(np.int8) - 8, _f16(b[:, 0:2])[:, None], None
        return q.astype(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    if name in ("Q5_0", "Q5_1"):
        start = 2 if name == "Q5_0" else 4
        q = _nibbles(b[:, start + 4:start + 20]) | _high_bits(b[:, start:start + 4])
        if name == "Q5_0":
            return q.astype(np.int8) - 16, _f16(b[:, 0:2])[:, None], None
        return q.astype(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    if name == "Q2_K":  # scales[16] (low nibble: sc, high: mn), qs[64], d, dmin
        sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82])[:, None], _f16(b[:, 82:84])[:, None]
        return _two_bit(b[:, 16:80]).astype(np.int8), d * (sc & 0x0F), -(dmin * (sc >> 4))
    if name == "Q3_K":  # hmask[32], qs[64], scales[12], d
        # element e: its third bit is bit e // 32 of hmask[e % 32], and a clear bit subtracts 4
        high = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
        q = _two_bit(b[:, 32:96]).astype(np.int8) - 4 * (1 - high.reshape(-1, QK_K).astype(np.int8))
        # sub-block s: low 4 bits in byte s % 8 (nibble s // 8), high 2 bits in byte 8 + s % 4 (pair s // 4)
        packed, s = b[:, 96:108], np.arange(16)
        low = (packed[:, s % 8] >> (4 * (s // 8)).astype(np.uint8)) & 0x0F
        top = (packed[:, 8 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & 3
        sc = (low | (top << 4)).astype(np.float32) - 32
        return q, _f16(b[:, 108:110])[:, None] * sc, None
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
        sc, mn = _k_scales(b[:, 4:16])
        qs = b[:, 16:144] if name == "Q4_K" else b[:, 48:176]
        # Each 64 elements: 32 low nibbles of 32 bytes, then the 32 high nibbles of the same bytes.
        chunks = qs.reshape(-1, 4, 32)
        q = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, QK_K)
        if name == "Q5_K":  # bit 2i of qh[l] is the 5th bit of element l of sub-block 2i, bit 2i+1 of 2i+1
            qh = b[:, 16:48]
            bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
            q = q | (bits.reshape(-1, QK_K) << 4)
        return q.astype(np.int8), d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    if name == "IQ4_NL":  # d, qs[16] (nibbles as Q4_0's)
        return IQ4_VALUES[_nibbles(b[:, 2:18])], _f16(b[:, 0:2])[:, None], None
    if name == "IQ4_XS":  # d, scales_h (uint16), scales_l[4], qs[128]: per 32, 16 bytes of nibbles as Q4_0's
        # sub-block s: low 4 bits in nibble s % 2 of scales_l[s // 2], high 2 bits in bits 2s, 2s+1 of scales_h
        s = np.arange(8)
        low = (b[:, 4 + s // 2] >> (4 * (s % 2)).astype(np.uint8)) & 0x0F
        high = (b[:, 2:4].copy().view("<u2") >> (2 * s).astype(np.uint16)) & 3
        sc = (low | (high << 4)).astype(np.float32) - 32
        q = IQ4_VALUES[_nibbles(b[:, 8:136].reshape(-1, 16))].reshape(-1, QK_K)
        return q, _f16(b[:, 0:2])[:, None] * sc, None
    if name == "Q6_K":
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])[:, None]
        # Per half (128 elements): l in 0..31 -> elements l, l+32, l+64, l+96 from
        # ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high, with qh[l] bits 0-1, 2-3, 4-5, 6-7 on top.
        low = np.concatenate([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4],
                             axis=-1)
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        q = (low | (high << 4)).reshape(-1, QK_K).astype(np.int8) - 32
        return q, d * sc, None
    raise AssertionError(name)


def unpack(fmt: BlockFormat, data: np.ndarray, n: int) -> Unpacked:
    """Raw blocks -> codes, scales, offsets.

    data: uint8 [rows, n // block_size * type_size] (or any shape with that many bytes per row of
    n elements); n: elements per row, a multiple of fmt.block_size. Returns arrays shaped [rows, ...].
    Raises ValueError for a NaN or infinite scale or min (a corrupt block)."""
    if n % fmt.block_size:
        raise ValueError(f"{fmt.name}: a row of {n} elements is not a whole number of {fmt.block_size}-blocks")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, fmt.type_size)
    rows = blocks.shape[0] * fmt.block_size // n
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 of a corrupt block: refused below
        codes, scales, offsets = _unpack_blocks(fmt, blocks)
    if not (np.isfinite(scales).all() and (offsets is None or np.isfinite(offsets).all())):
        raise ValueError("a block's scale or min is NaN or infinite (as ggml_validate_row_data refuses)")
    levels = {}
    if (two := _two_level(fmt, blocks)) is not None:
        if not (np.isfinite(two[1]).all() and (two[3] is None or np.isfinite(two[3]).all())):
            raise ValueError("a block's scale or min is NaN or infinite (as ggml_validate_row_data refuses)")
        levels = {f: None if v is None else v.reshape(rows, -1)
                  for f, v in zip(("sub_scales", "super_scales", "sub_mins", "super_mins"), two)}
    return Unpacked(codes.reshape(rows, n), scales.reshape(rows, n // fmt.group),
                    None if offsets is None else offsets.reshape(rows, n // fmt.group), fmt.group, **levels)


def dequantize(fmt: BlockFormat, data: np.ndarray, n: int, chunk_rows: int = 1024) -> np.ndarray:
    """Raw blocks -> float32 [rows, n], bit-identical to ggml's dequantize_row_* (see the module doc).

    Works through `chunk_rows` rows at a time so the temporaries stay small for big tensors."""
    row_bytes = n // fmt.block_size * fmt.type_size
    raw = np.asarray(data, dtype=np.uint8).reshape(-1, row_bytes)
    out = np.empty((raw.shape[0], n), dtype=np.float32)
    for start in range(0, raw.shape[0], chunk_rows):
        u = unpack(fmt, raw[start:start + chunk_rows], n)
        g = u.codes.reshape(u.codes.shape[0], -1, u.group).astype(np.float32)
        y = g * u.scales[..., None]
        if u.offsets is not None:
            y += u.offsets[..., None]
        out[start:start + chunk_rows] = y.reshape(-1, n)
    return out
