"""Strict safetensors reader and streaming writer (standard library + numpy only).

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data section.
The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data section) plus an optional "__metadata__": {str: str}.

Files are untrusted: `open_safetensors` validates the whole header before anything is
used, with the same rules as the official reader (tensors tile the data section exactly:
no overlap, no gap, no trailing bytes). Errors are raised as `error_cls` (CheckpointError
by default; the bundle reader passes BundleError) with a one-line message starting with
`label` (the path by default). Misuse of the writer by the calling code is a bug and raises
ValueError.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llmirc.dtypes import SAFETENSORS_CODES, dtype as _dtype, to_float32
from llmirc.errors import CheckpointError
from llmirc.small_files import parse_json

# dtypes are the safetensors codes of llmirc.dtypes (BF16 is stored and returned as its raw
# uint16 bit pattern; `as_float32` converts it). These are recognized so the error says
# "unsupported" rather than "unknown"; they have no numpy dtype.
UNSUPPORTED_DTYPES = {"F8_E4M3": 1, "F8_E5M2": 1}
PADDING_PREFIX = "__padding__."  # U8 tensors a writer with `align` inserts between tensors

MAX_HEADER_BYTES = 100 << 20
_MAX_NDIM = 32                # numpy 1.x limit
_MAX_ELEMENT_BYTES = 1 << 62  # keeps numpy's size arithmetic (which ignores zero dims) in range


def _itemsize(dtype: str) -> int:
    return _dtype(dtype).itemsize if dtype in SAFETENSORS_CODES else UNSUPPORTED_DTYPES[dtype]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. Use `open_safetensors` to create one.

    Arrays returned by `array` are read-only views into the map; they stay valid after
    `close()` (the map is then released when the last view is garbage-collected).
    """

    def __init__(self, path, mm: mmap.mmap, data_start: int, tensors: dict, metadata: dict,
                 error_cls: type[Exception], label: str):
        self.path = Path(path)
        self.metadata: dict[str, str] = metadata
        self._mm = mm
        self._data_start = data_start
        self._tensors = tensors  # name -> (dtype, shape, begin, end), in data order
        self._error_cls = error_cls
        self._label = label

    def names(self) -> list[str]:
        """Tensor names in data-section order."""
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(end - begin for _, _, begin, end in self._tensors.values())

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def array(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor. BF16 comes back as uint16 bit patterns."""
        dtype, shape, begin, end = self._entry(name)
        if dtype not in SAFETENSORS_CODES:
            raise self._error_cls(f"{self._label}: tensor {name!r} has dtype {dtype}, "
                                  "which llmirc does not support")
        np_dtype = _dtype(dtype).numpy
        if end == begin:
            arr = np.empty(shape, np_dtype)
            arr.flags.writeable = False
            return arr
        if self._mm is None:
            raise ValueError(f"{self._label}: file is closed")
        count = (end - begin) // np_dtype.itemsize
        return np.frombuffer(self._mm, np_dtype, count, self._data_start + begin).reshape(shape)

    def as_float32(self, name: str) -> np.ndarray:
        """The tensor as float32: a zero-copy view for F32, a new array for F16/BF16/F64."""
        dtype = self._entry(name)[0]
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise self._error_cls(f"{self._label}: tensor {name!r} has dtype {dtype}, not a floating-point type")
        return to_float32(self.array(name), dtype)

    def drop_pages(self) -> None:
        """Unmaps the pages read so far from this process (MADV_DONTNEED; they stay in the page
        cache and fault back in when read again): a reader that streams the file keeps its
        resident memory at what it still holds, not the whole file."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # arrays still view it; it is unmapped when they are freed
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _entry(self, name):
        try:
            return self._tensors[name]
        except (KeyError, TypeError):
            raise self._error_cls(f"{self._label}: no tensor named {name!r}") from None


def open_safetensors(path, *, error_cls: type[Exception] = CheckpointError,
                     label: str | None = None) -> SafetensorsFile:
    """Open and fully validate a safetensors file; see the module docstring for errors."""
    label = str(path) if label is None else label

    def fail(msg):
        return error_cls(f"{label}: {msg}")

    with reraise_os_error(error_cls, label, "cannot read"), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise fail(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise fail(f"header length {n} exceeds file size {size}")
        if n > MAX_HEADER_BYTES:
            raise fail(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        header = f.read(n)
        if len(header) != n:  # the file shrank under us
            raise fail(f"header truncated: read {len(header)} of {n} bytes")
        tensors, metadata = _parse_header(header, size - 8 - n, fail)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # whole file: never 0 bytes
    return SafetensorsFile(path, mm, 8 + n, tensors, metadata, error_cls, label)


def _parse_header(raw: bytes, data_size: int, fail):
    try:
        header = parse_json(raw, strict=True)
    except ValueError as e:
        raise fail(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ must be an object of string values")
    tensors = {name: _parse_entry(name, entry, data_size, fail) for name, entry in header.items()}
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])))
    # Like the official reader: tensors tile the data section with no overlap, gap or tail.
    pos, prev = 0, None
    for name, (_, _, begin, end) in ordered.items():
        if begin < pos:
            raise fail(f"tensor {name!r} (bytes {begin}..{end}) overlaps tensor {prev!r}")
        if begin > pos:
            raise fail(f"gap of {begin - pos} bytes before tensor {name!r} in the data section")
        pos, prev = end, name
    if pos != data_size:
        raise fail(f"data section has {data_size - pos} bytes after the last tensor")
    return ordered, metadata


def _parse_entry(name, entry, data_size, fail):
    what = f"tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise fail(f"{what}: entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or (dtype not in SAFETENSORS_CODES and dtype not in UNSUPPORTED_DTYPES):
        raise fail(f"{what}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"{what}: shape {shape!r} is not a list of non-negative integers")
    itemsize = _itemsize(dtype)
    if len(shape) > _MAX_NDIM or math.prod(max(d, 1) for d in shape) * itemsize > _MAX_ELEMENT_BYTES:
        raise fail(f"{what}: shape {shape!r} is too large")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise fail(f"{what}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise fail(f"{what}: data_offsets [{begin}, {end}] outside the data section of {data_size} bytes")
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise fail(f"{what}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}")
    return dtype, tuple(shape), begin, end


class SafetensorsWriter:
    """Streams tensors to a safetensors file without holding them all in memory.

    Declare every tensor first (`tensors=[(name, dtype, shape), ...]` or `declare`), then
    `write` each array in declaration order; `close` checks that all were written. dtype is a
    safetensors name ("F32", "BF16", ...) or anything numpy accepts; BF16 data is passed as
    uint16 bit patterns. The data section starts 8-byte aligned (header padded with spaces).
    With `align` (a power of two, e.g. 64), every tensor starts at a file offset that is a
    multiple of it (so at an aligned address once the file is mapped): the header is padded to
    it, and U8 tensors named `PADDING_PREFIX<n>` fill the gaps (the format forbids holes).
    If the `with` block raises, the partial file is deleted.
    OSErrors are raised as `error_cls` naming `label`; misuse raises ValueError.
    """

    def __init__(self, path, metadata: dict[str, str] | None = None,
                 tensors: Iterable[tuple] | None = None, *,
                 error_cls: type[Exception] = CheckpointError, label: str | None = None, align: int | None = None):
        if align is not None and (align < 8 or align & (align - 1)):
            raise ValueError(f"align must be a power of two >= 8, got {align}")
        self._align = align
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (metadata or {}).items()):
            raise ValueError("safetensors metadata must map str to str")
        self.path = Path(path)
        self._metadata = dict(metadata or {})
        self._error_cls, self._label = error_cls, str(path) if label is None else label
        self._declared: list[tuple[str, str, tuple[int, ...]]] = []
        self._next = -1  # index of the next tensor to write; -1 = header not written yet
        self._file = None
        for t in tensors or ():
            self.declare(*t)
        with self._io():
            self._file = open(self.path, "wb")

    @property
    def closed(self) -> bool:
        return self._file is None

    def declare(self, name: str, dtype, shape) -> None:
        if self._next >= 0:
            raise ValueError(f"{self._label}: declare({name!r}) after writing started")
        if not isinstance(name, str) or name == "__metadata__" or any(name == d[0] for d in self._declared):
            raise ValueError(f"{self._label}: invalid or duplicate tensor name {name!r}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"{self._label}: tensor {name!r}: negative dimension in {shape}")
        self._declared.append((name, _st_dtype(dtype), shape))

    def write(self, name: str, array: np.ndarray) -> None:
        if self._file is None:
            raise ValueError(f"{self._label}: write({name!r}) on a closed writer")
        if self._next < 0:
            self._write_header()
        if self._next >= len(self._declared) or self._declared[self._next][0] != name:
            expected = self._declared[self._next][0] if self._next < len(self._declared) else "nothing"
            raise ValueError(f"{self._label}: write({name!r}) out of order; expected {expected!r}")
        _, dtype, shape = self._declared[self._next]
        array = np.asarray(array)
        np_dtype = _dtype(dtype).numpy
        if array.dtype.str[1:] != np_dtype.str[1:] or array.shape != shape:
            raise ValueError(f"{self._label}: tensor {name!r}: got {array.dtype}{list(array.shape)}, "
                             f"declared {dtype}{list(shape)} (numpy {np_dtype})")
        data = np.ascontiguousarray(array, dtype=np_dtype)  # copies only if strided or big-endian
        with self._io():
            if self._pads[self._next]:
                self._file.write(bytes(self._pads[self._next]))
            if data.size:
                self._file.write(data.reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises ValueError if a declared tensor was not written."""
        if self._file is None:
            return
        if self._next < 0:
            self._write_header()
        missing = [d[0] for d in self._declared[self._next:]]
        if missing:
            self.abort()
            raise ValueError(f"{self._label}: tensors declared but not written: {', '.join(map(repr, missing))}")
        with self._io():
            f, self._file = self._file, None
            f.close()

    def abort(self) -> None:
        """Close and delete the partial file."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()  # (flushing its buffer may fail again, e.g. on a full disk)
            except OSError:
                pass
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_header(self):
        header, offset, self._pads = {}, 0, []
        if self._metadata:
            header["__metadata__"] = self._metadata
        for name, dtype, shape in self._declared:
            pad = -offset % self._align if self._align else 0
            if pad:  # (the data section itself starts aligned: see below)
                header[f"{PADDING_PREFIX}{len(self._pads)}"] = {"dtype": "U8", "shape": [pad],
                                                                "data_offsets": [offset, offset + pad]}
                offset += pad
            self._pads.append(pad)
            size = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % (self._align or 8))  # 8 + len(raw) is then a multiple of align
        with self._io():
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _io(self):
        return reraise_os_error(self._error_cls, self._label)


@contextlib.contextmanager
def reraise_os_error(error_cls: type[Exception], label: str, action: str = "cannot write"):
    """Turn OSError (disk full, permissions) into a one-line user error."""
    try:
        yield
    except OSError as e:
        raise error_cls(f"{label}: {action}: {e.strerror or e}") from e


def _st_dtype(dtype) -> str:
    if isinstance(dtype, str) and dtype in UNSUPPORTED_DTYPES:
        raise ValueError(f"writing dtype {dtype} is not supported")
    if isinstance(dtype, str) and dtype in SAFETENSORS_CODES:
        return dtype
    try:  # anything numpy accepts ("<f4", np.float16, ...); bf16 only by its code
        return _dtype(np.dtype(dtype)).safetensors
    except (TypeError, KeyError):
        raise ValueError(f"no safetensors dtype for {dtype!r}") from None


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None, *,
                     error_cls: type[Exception] = CheckpointError) -> None:
    """Write numpy arrays (numpy-native dtypes; uint16 is written as U16, not BF16)."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    with SafetensorsWriter(path, metadata, [(n, a.dtype, a.shape) for n, a in arrays.items()],
                           error_cls=error_cls) as w:
        for name, a in arrays.items():
            w.write(name, a)
