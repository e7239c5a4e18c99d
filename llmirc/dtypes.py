"""The one table of element types: names in the compiler, the IR, safetensors, numpy and kernels.

Every weight, workspace buffer and KV pool of a plan carries one of these (by `name`), and so
do the bundle's manifest and the compiled library's model info. Part of the loader: numpy only.

`name` follows PyTorch/NumPy (`float32`, `bfloat16`, ...); `short` is the spelling of kernel
parameters (`f32`, `bf16`, `i64`, `u8`, `bool`: MLIR's element types but for the unsigned and
boolean ones, whose MLIR spellings `ui8`/`i1` would clash with NumPy's `i1`); `safetensors` is the
safetensors header's code. NumPy has no bfloat16: bf16 data is stored and passed around as its
uint16 bit pattern (the upper half of the float32 with the same sign and exponent), so
`storage` is what numpy holds, not what the bits mean. float8_e4m3fn (OCP FP8 E4M3, MLIR's
f8E4M3FN) is only ever a KV pool's element type on GPUs that have it: it has no safetensors code
here (checkpoints in FP8 are refused by the reader), and numpy holds its bytes as uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str          # float32, bfloat16, float16, float64, int64, int32, int16, int8, uint8, bool
    short: str         # f32, bf16, f16, f64, i64, i32, i16, i8, u8, bool
    safetensors: str | None  # F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL (None: not read from checkpoints)
    storage: str       # numpy dtype of the stored bytes (little-endian; bf16 as <u2)
    itemsize: int      # bytes per element
    kind: str          # "f" floating point, "i" signed int, "u" unsigned int, "b" bool (one byte, 0/1)

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.storage)

    @property
    def is_float(self) -> bool:
        return self.kind == "f"

    def __str__(self) -> str:
        return self.name


_ALL = (
    DType("float32", "f32", "F32", "<f4", 4, "f"),
    DType("bfloat16", "bf16", "BF16", "<u2", 2, "f"),
    DType("float16", "f16", "F16", "<f2", 2, "f"),
    DType("float64", "f64", "F64", "<f8", 8, "f"),
    DType("int64", "i64", "I64", "<i8", 8, "i"),
    DType("int32", "i32", "I32", "<i4", 4, "i"),
    DType("int16", "i16", "I16", "<i2", 2, "i"),
    DType("int8", "i8", "I8", "i1", 1, "i"),
    DType("uint8", "u8", "U8", "u1", 1, "u"),
    DType("uint16", "u16", "U16", "<u2", 2, "u"),
    DType("uint32", "u32", "U32", "<u4", 4, "u"),
    DType("uint64", "u64", "U64", "<u8", 8, "u"),
    DType("bool", "bool", "BOOL", "?", 1, "b"),
    DType("float8_e4m3fn", "f8E4M3FN", None, "u1", 1, "f"),
)
_BY_KEY: dict[str, DType] = {}
for _d in _ALL:
    for _key in (_d.name, _d.short, _d.safetensors):
        if _key is not None:
            _BY_KEY.setdefault(_key, _d)
_BY_NUMPY = {np.dtype(d.storage): d for d in _ALL if d.name not in ("bfloat16", "uint16", "float8_e4m3fn")}
_BY_NUMPY[np.dtype("<u2")] = _BY_KEY["uint16"]

FLOAT32, BFLOAT16, FLOAT16 = _BY_KEY["float32"], _BY_KEY["bfloat16"], _BY_KEY["float16"]
FLOATS = (FLOAT32, BFLOAT16, FLOAT16)  # what weights and KV caches may be stored in
SAFETENSORS_CODES = frozenset(d.safetensors for d in _ALL if d.safetensors)
FP8_E4M3 = _BY_KEY["float8_e4m3fn"]
FP8_NAMES = ("fp8", "fp8_e4m3", "float8_e4m3fn")  # --kv-cache-dtype spellings of FP8 E4M3 (vLLM's are the first two)
QUANTIZED_KV = ("int8", "float8_e4m3fn")  # KV pools of codes with a float32 scale per block (targets/signatures.py)


def kv_cache_dtype_name(option: str) -> str | None:
    """The dtype name a `--kv-cache-dtype` value stands for (`fp8` -> float8_e4m3fn, `bf16` ->
    bfloat16, ...), None for one that names no dtype (`auto`, a typo)."""
    if option in FP8_NAMES:
        return FP8_E4M3.name
    try:
        return dtype(option).name
    except KeyError:
        return None


def dtype(key: str | DType | np.dtype | type) -> DType:
    """The DType for a name (`bfloat16`), short name (`bf16`), safetensors code (`BF16`), DType or
    numpy dtype (ml_dtypes' bfloat16 is bfloat16; a numpy uint16 array is uint16: bf16 bits are only
    bf16 when a table says so).

    Raises KeyError naming the key when it is none of these."""
    if isinstance(key, DType):
        return key
    if isinstance(key, str):
        if key in _BY_KEY:
            return _BY_KEY[key]
        raise KeyError(f"unknown dtype {key!r}")
    try:
        d = np.dtype(key)
        if d.name == "bfloat16":  # ml_dtypes' bfloat16 (onnx, jax)
            return BFLOAT16
        return _BY_NUMPY[d.newbyteorder("<") if d.byteorder == ">" else d]
    except (TypeError, KeyError):
        raise KeyError(f"unknown dtype {key!r}") from None


def to_float32(data: np.ndarray, stored: str | DType) -> np.ndarray:
    """Stored floating-point data (bf16 as uint16 bits) as float32; exact for bf16/f16 (widening)."""
    d = dtype(stored)
    if d.name == "bfloat16":
        return (np.asarray(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data).astype(np.float32, copy=False)


def count_nonfinite(data: np.ndarray, stored: str | DType) -> int:
    """How many values of stored floating-point data (bf16 as uint16 bits) are NaN or infinite
    (IEEE 754: the exponent bits all ones). Reads the data in slices of 4M values."""
    d, flat = dtype(stored), np.asarray(data).reshape(-1)
    step, count = 1 << 22, 0
    for i in range(0, flat.size, step):
        part = flat[i:i + step]
        if d.name == "bfloat16":
            count += int(np.count_nonzero((part.view(np.uint16) & 0x7F80) == 0x7F80))
        else:
            count += part.size - int(np.count_nonzero(np.isfinite(part)))
    return count


def from_float32(data: np.ndarray, to: str | DType) -> np.ndarray:
    """float32 data stored as `to` (bf16: round to nearest even, NaN kept NaN, as torch does)."""
    d = dtype(to)
    data = np.asarray(data, np.float32)
    if d.name == "bfloat16":
        bits = data.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(data)
        return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded) if nan.any() else rounded
    with np.errstate(over="ignore"):  # out of range becomes inf, as a cast should
        return data.astype(d.storage)
