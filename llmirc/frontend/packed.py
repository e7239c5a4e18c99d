"""Quantized checkpoint tensors (GPTQ, AWQ, GGUF) kept quantized (`llmir.packed_weight`), repacked
losslessly into llmirc's layout (llmirc/quant.py) when the bundle is written.

config.json's `quantization_config` says the method; a linear is quantized where the checkpoint
has `<prefix>.qweight` (others, such as the LM head, stay float). The published layouts, as
AutoGPTQ / GPTQModel and AutoAWQ (and transformers' integrations of them) write them, for a
linear of k inputs and n outputs, b bits, groups of g inputs (g = -1: one group of k):

* gptq (checkpoint_format gptq, or gptq_v2): `qweight` int32 [k b / 32, n], 32 / b codes of
  consecutive inputs per int32, the first in the lowest bits; `qzeros` int32 [k / g, n b / 32],
  32 / b zero points of consecutive outputs per int32 (gptq stores zero - 1, gptq_v2 the zero);
  `scales` [k / g, n] (float16); `g_idx` int32 [k]: the group of each input (act-order, desc_act,
  makes it a permutation of the groups). w[j, i] = scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j]).
* awq (version gemm, zero_point true): `qweight` int32 [k, n b / 32] and `qzeros` int32
  [k / g, n b / 32], 8 codes of outputs 8c + (0, 2, 4, 6, 1, 3, 5, 7) in nibbles 0..7 of int32 c;
  `scales` [k / g, n]. w[j, i] = scales[i / g, j] * (q[i, j] - zero[i / g, j]).

* matmul_nbits (onnxruntime's com.microsoft.MatMulNBits, as onnxruntime-genai's builder writes int4
  and int8 models): B uint8 [n, k / g, g b / 8], scales [n k / g], zero_points uint8 packed alike
  (absent: 2^(b-1)); read by frontend/onnx_contrib.py `matmul_nbits_parts`, kept as 4 / 8-bit
  codes, scales in their stored dtype (the packed weight's scale type, from the importer), uint8 zero points.

* gguf (llama.cpp's block formats, unpacked by frontend/gguf_quants.py into codes, float32
  scales and offsets per group): repacked per format as below (GGUF_SCHEMES); the bits per
  weight of the file's format -> of llmirc's layout:
      Q8_0 8.5 -> 8.5   int8 codes (q + 128), float16 scale per 32, symmetric
      Q4_0 4.5 -> 4.5   4-bit codes (q), float16 scale per 32, symmetric (w = d (q - 8))
      Q4_1 5.0 -> 5.0   4-bit codes, float16 scale and float16 min per 32
      Q5_0 5.5 -> 5.5   5-bit codes (q), float16 scale per 32, symmetric (w = d (q - 16))
      Q5_1 6.0 -> 6.0   5-bit codes, float16 scale and min per 32
      Q4_K 4.5 -> 4.63  4-bit codes, int8 sub-scale sc and sub-min mn per 32, float16 d and -dmin per 256
                        (w = d sc q - dmin mn: two-level scales, quant.Scheme.super_group)
      Q5_K 5.5 -> 5.63  5-bit codes, the same scales
      Q6_K 6.56 -> 6.56 6-bit codes (q), int8 sc per 16, float16 d per 256, symmetric (w = d sc (q - 32))
      Q3_K 3.44 -> 4.56 3-bit codes widened to 4 (q + 4), int8 sc - 32 per 16, float16 d per 256, symmetric
      Q2_K 2.63 -> 5.13 2-bit codes widened to 4, int8 sc and mn per 16, float16 d and -dmin per 256
      IQ4_NL 4.5 -> 4.5 4-bit codes (q, the table's index) and the table kvalues_iq4nl in the scheme,
                        float16 scale per 32 (w = d kvalues[q])
      IQ4_XS 4.25 -> 4.31 4-bit codes and the table, int8 sc - 32 per 32, float16 d per 256
  The kernels form the products d * sc, -dmin * mn in float32, where they are exact (not in
  float16); the sub-scales take a byte for the file's 6 bits (4 for Q2_K), and Q2_K/Q3_K's codes
  widen (llmirc has no 2- or 3-bit layout). Until 2026-12-06 the products were stored, as float32
  per group: 1.4-1.5 bits a weight more (Q4_K 6.0, Q5_K 7.0, Q6_K 8.0, Q3_K 6.0, Q2_K 8.0, IQ4_XS 5.0).

What llmirc keeps of GPTQ and AWQ: the codes as they are (4-bit codes in 4 bits, 8-bit in 8), the
scales in their dtype, uint8 zero points per group (none when every zero point is the symmetric
2^(b-1), as GPTQ's sym=true writes them), and for act-order the permutation that sorts inputs
by group (perm: the kernels read the activations in that order), so nothing is rounded.
"""

from __future__ import annotations

import numpy as np

from llmirc import dialect as L
from llmirc import dtypes, quant
from llmirc.errors import CheckpointError

from .gguf_quants import IQ4_VALUES

METHODS = ("gptq", "awq")
IQ4_TABLE = tuple(int(v) for v in IQ4_VALUES)  # IQ4_NL's and IQ4_XS's grid (ggml's kvalues_iq4nl)
GGUF_SCHEMES = {  # GGUF block format -> how llmirc keeps it (see the module docstring)
    "Q8_0": quant.Scheme(8, 32, "float16"), "Q4_0": quant.Scheme(4, 32, "float16"),
    "Q4_1": quant.Scheme(4, 32, "float16", "min"), "Q5_0": quant.Scheme(5, 32, "float16"),
    "Q5_1": quant.Scheme(5, 32, "float16", "min"),
    # the K-quants and IQ4_XS: two-level scales (int8 sub-scales under a float16 per QK_K = 256)
    "Q4_K": quant.Scheme(4, 32, "int8", "min", super_group=256),
    "Q5_K": quant.Scheme(5, 32, "int8", "min", super_group=256),
    "Q6_K": quant.Scheme(6, 16, "int8", super_group=256),
    "Q2_K": quant.Scheme(4, 16, "int8", "min", super_group=256), "Q3_K": quant.Scheme(4, 16, "int8", super_group=256),
    "IQ4_NL": quant.Scheme(4, 32, "float16", values=IQ4_TABLE),
    "IQ4_XS": quant.Scheme(4, 32, "int8", values=IQ4_TABLE, super_group=256),
}
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds output 8c + _AWQ_ORDER[i]


def parse_quantization_config(config: dict, source: str) -> dict | None:
    """The `quantization_config` of config.json as {method, format, bits, group_size}, or None.
    Raises CheckpointError for a method or option llmirc does not read."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object")
    method = str(q.get("quant_method", "")).lower()
    if method not in METHODS:
        raise CheckpointError(f"{source}: unsupported quantization method {q.get('quant_method')!r} "
                              f"(llmirc reads {', '.join(METHODS)})")
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size", 128))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise CheckpointError(f"{source}: {method} with {bits}-bit weights is not supported "
                              f"(llmirc reads {'4 or 8' if method == 'gptq' else '4'} bits)")
    if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group < 16):
        raise CheckpointError(f"{source}: quantization_config group_size must be -1 or at least 16, got {group!r}")
    if method == "gptq":
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{source}: unsupported GPTQ checkpoint_format {fmt!r} (gptq or gptq_v2)")
    else:
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm" or q.get("zero_point", True) is not True:
            raise CheckpointError(f"{source}: unsupported AWQ variant (version {version!r}, zero_point "
                                  f"{q.get('zero_point')!r}); llmirc reads version gemm with zero points")
        fmt = "awq"
    return {"method": method, "format": fmt, "bits": bits, "group_size": group}


def tensor_names(fmt: str, prefix: str, scheme: quant.Scheme) -> list[str]:
    """The checkpoint tensors a packed weight is made of."""
    if fmt == "gguf":
        return [f"{prefix}.weight"]
    if fmt == "matmul_nbits":
        return [f"{prefix}.qweight", f"{prefix}.scales"] + ([f"{prefix}.qzeros"] if scheme.zero == "int" else [])
    names = [f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros"]
    return names + ([f"{prefix}.g_idx"] if scheme.act_order else [])


class PackedLinears:
    """A checkpoint's quantized linears: `read(name)`, `info(name) -> (safetensors dtype, shape)`,
    `has(name)` give its tensors; `source` names it in errors."""

    def __init__(self, qconfig: dict, read, info, has, source: str):
        self.q, self.read, self.info, self.has, self.source = qconfig, read, info, has, source

    def weight(self, prefix: str, n: int, k: int):
        """The `llmir.packed_weight` value of linear `prefix` ([n, k]), checked against the layout;
        None when the checkpoint holds it as a float `<prefix>.weight`."""
        if not self.has(f"{prefix}.qweight"):
            return None
        q = self.q
        bits, fmt = q["bits"], q["format"]
        g = k if q["group_size"] == -1 else q["group_size"]
        per = 32 // bits
        if k % g:
            raise self.fail(prefix, f"{k} inputs do not split into groups of {g}")
        packed = {"gptq": (k // per, n), "gptq_v2": (k // per, n), "awq": (k, n // per)}[fmt]
        zeros_shape = (-(-k // g), n // per)
        self.expect(f"{prefix}.qweight", "I32", packed)
        self.expect(f"{prefix}.qzeros", "I32", zeros_shape)
        scale_dtype = self.expect(f"{prefix}.scales", None, (k // g, n))
        zeros = self.zeros(fmt, prefix, bits, n)
        zero = "none" if (zeros == 1 << (bits - 1)).all() else "int"
        act_order = fmt != "awq" and self.permutation(prefix, k, g) is not None
        scheme = quant.Scheme(bits, g, scale_dtype, zero, act_order)
        why = scheme.check(k)
        if why is not None:
            raise self.fail(prefix, f"llmirc cannot keep it quantized: {why}")
        qtype = L.QuantType(bits, g, L.FLOAT_TYPES[scale_dtype], zero, act_order)
        return L.PackedWeightOp(prefix, fmt, (n, k), qtype).result

    def fail(self, prefix: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: quantized linear '{prefix}': {message}")

    def expect(self, name: str, dtype: str | None, shape: tuple[int, ...]) -> str:
        """Checks a tensor's dtype (None: a float) and shape; returns its llmirc dtype name."""
        stored, actual = self.info(name)
        ok = stored == dtype if dtype else stored in ("F16", "BF16", "F32")
        if not ok or tuple(actual) != tuple(shape):
            want = dtype or "F16/BF16/F32"
            raise CheckpointError(f"{self.source}: tensor '{name}' is {stored}{list(actual)}; the "
                                  f"{self.q['method']} layout needs {want}{list(shape)}")
        return dtypes.dtype(stored).name

    def zeros(self, fmt: str, prefix: str, bits: int, n: int) -> np.ndarray:
        return zero_points(fmt, np.asarray(self.read(f"{prefix}.qzeros")), bits, n)

    def permutation(self, prefix: str, k: int, g: int) -> np.ndarray | None:
        """The act-order permutation of a GPTQ linear (None when g_idx is in order or absent)."""
        name = f"{prefix}.g_idx"
        if not self.has(name):
            return None
        self.expect(name, "I32", (k,))
        return act_order_permutation(np.asarray(self.read(name)), k, g, f"{self.source}: tensor '{name}'")


def unpack_int32(q: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """32/bits codes per int32 along `axis` (lowest bits first), as uint8 (widened by 32/bits)."""
    u = np.ascontiguousarray(q).view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = ((np.expand_dims(u, axis + 1) >> np.expand_dims(shifts, tuple(i for i in range(u.ndim + 1)
                                                                             if i != axis + 1)))
             & np.uint32((1 << bits) - 1))
    shape = list(u.shape)
    shape[axis] *= 32 // bits
    return codes.reshape(shape).astype(np.uint8)


def _awq_unorder(a: np.ndarray) -> np.ndarray:
    """AWQ's interleaved outputs (last axis, 8 per int32) back in order."""
    out = np.empty_like(a)
    for i, j in enumerate(_AWQ_ORDER):
        out[..., j::8] = a[..., i::8]
    return out


def zero_points(fmt: str, qzeros: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Zero points [groups, n] (int) of a packed qzeros tensor."""
    z = unpack_int32(qzeros, bits, 1)[:, :n].astype(np.int32)
    if fmt == "awq":
        return _awq_unorder(z)
    return z + 1 if fmt == "gptq" else z  # gptq stores zero - 1 (masked to its bits)


def act_order_permutation(g_idx: np.ndarray, k: int, g: int, what: str) -> np.ndarray | None:
    """perm with g_idx[perm] = [0]*g + [1]*g + ... (inputs sorted by group), None when already so."""
    if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= -(-k // g):
        raise CheckpointError(f"{what}: group index out of range")
    if (g_idx == np.arange(k) // g).all():
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not (g_idx[perm] == np.arange(k) // g).all():
        raise CheckpointError(f"{what}: groups of g_idx do not each hold group_size inputs")
    return perm.astype(np.int32)


def gguf_qtype(fmt_name: str):
    """The `!llmir.quant` type a GGUF block format is kept as."""
    s = GGUF_SCHEMES[fmt_name]
    scale = L.i8 if s.scale_dtype == "int8" else L.FLOAT_TYPES[s.scale_dtype]
    return L.QuantType(s.bits, s.group_size, scale, s.zero, values=s.values, super_group=s.super_group)


def repack(fmt: str, prefix: str, scheme: quant.Scheme, k: int, read) -> dict[str, np.ndarray]:
    """The llmirc parts (llmirc/quant.py) of a packed weight, from the checkpoint's tensors (GGUF:
    `read(prefix + ".weight")` gives the tensor unpacked, a gguf_quants.Unpacked)."""
    bits, g = scheme.bits, scheme.group_size
    if fmt == "learned":  # llmirc's own parts, learned at compile time (llmirc/autoround.py)
        from llmirc.calibration import LEARNED

        return {p: np.asarray(read(f"{LEARNED}{prefix}.{p}")) for p in scheme.parts()}
    if fmt == "matmul_nbits":  # an ONNX MatMulNBits' B, scales and zero_points (frontend/onnx_contrib.py)
        from .onnx_contrib import matmul_nbits_parts

        zp = np.asarray(read(f"{prefix}.qzeros")) if scheme.zero == "int" else None
        try:
            codes, scales, zeros = matmul_nbits_parts(read(f"{prefix}.qweight"), read(f"{prefix}.scales"), zp, k,
                                                      bits, g)
        except ValueError as e:
            raise CheckpointError(f"MatMulNBits weight '{prefix}': {e}") from None
        parts = {"codes": quant.pack(codes, bits, scheme.sub_group),
                 "scales": dtypes.from_float32(scales, scheme.scale_dtype)}
        if zeros is not None:
            parts["zeros"] = zeros
        return parts
    if fmt == "gguf":
        u = read(f"{prefix}.weight")
        if scheme.values is not None:  # the file's values (gguf_quants: the table's) back to their indices
            index = np.full(256, 255, np.uint8)
            index[np.array(scheme.values) + 128] = np.arange(len(scheme.values))
            codes = index[u.codes.astype(np.int16) + 128]
            if (codes == 255).any():
                raise CheckpointError(f"GGUF weight '{prefix}': a value outside the format's table")
        else:
            codes = u.codes.astype(np.int16) + (scheme.center if scheme.zero == "none" else 0)
        parts = {"codes": quant.pack(codes.astype(np.uint8), bits, scheme.sub_group)}
        if scheme.super_group:  # the file's two levels, as they are
            parts |= {"scales": u.sub_scales, "zeros": u.sub_mins, "super_scales": u.super_scales,
                      "super_mins": u.super_mins}
        else:
            parts["scales"] = dtypes.from_float32(u.scales, scheme.scale_dtype)
            if scheme.zero == "min":
                parts["zeros"] = dtypes.from_float32(u.offsets, scheme.scale_dtype)
        return {p: np.ascontiguousarray(parts[p]) for p in scheme.parts()}
    scales = np.asarray(read(f"{prefix}.scales"))
    n = scales.shape[1]
    if fmt == "awq":
        codes = _awq_unorder(unpack_int32(np.asarray(read(f"{prefix}.qweight")), bits, 1)).T  # [n, k]
    else:
        codes = unpack_int32(np.asarray(read(f"{prefix}.qweight")), bits, 0).T
    zeros = zero_points(fmt, np.asarray(read(f"{prefix}.qzeros")), bits, n).T  # [n, groups]
    parts = {"scales": np.ascontiguousarray(scales.T)}
    if scheme.act_order:
        perm = act_order_permutation(np.asarray(read(f"{prefix}.g_idx")), k, g, prefix)
        codes = codes[:, perm]
        parts["perm"] = perm
    if scheme.zero == "int":
        if zeros.max() > 255:
            raise CheckpointError(f"{prefix}: a zero point of {zeros.max()} does not fit 8 bits")
        parts["zeros"] = zeros.astype(np.uint8)
    parts["codes"] = quant.pack(np.ascontiguousarray(codes), bits, scheme.sub_group)
    return {p: parts[p] for p in scheme.parts()}
