"""Triton's interpreter for the kernel tests (TRITON_INTERPRET=1 is set in conftest.py, before any
kernel is decorated), with fixes to Triton 3.9's interpreter so that bfloat16 and FP8 behave as
on a GPU:

* `InterpreterBuilder.create_dot` multiplies bf16 operands as their raw uint16 bits (they are
  widened to float32 first: exact, a bf16 product is exact in f32);
* `cast_impl` rounds f32 to bf16 toward zero, and its round-to-nearest mode loses the carry into
  the exponent (the GPU, and `.to(tl.bfloat16)`'s default, round to nearest even: done here with
  integer arithmetic); it casts integers to bf16 by reinterpreting their bits (here: through
  f32, exact for int8 codes);
* `create_fp_to_fp` from f32 to FP8 E4M3 loses the carry into the exponent too (127.5 becomes
  64, not 128) and flushes subnormals (here: torch's conversion, round to nearest even as the
  GPU's cvt.rn)."""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

_create_dot = interpreter.InterpreterBuilder.create_dot
_cast_impl = interpreter.InterpreterBuilder.cast_impl
_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp


def _widen_bf16(h):
    if h.dtype.scalar == tl.bfloat16:
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
    return h


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc, _dot=_create_dot):
    return _dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)


def _cast_impl(self, src, dst_type, _cast=_cast_impl):
    if dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_int():  # reinterpreted, not converted
        src = _cast(self, src, tl.block_type(tl.float32, dst_type.shape) if dst_type.is_block() else tl.float32)
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
        return interpreter.TensorHandle(rounded, tl.bfloat16)
    return _cast(self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode, _fp_to_fp=_fp_to_fp):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:  # torch rounds as the GPU does
        f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return interpreter.TensorHandle(f32.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), tl.float8e4nv)
    return _fp_to_fp(self, src, dst_type, rounding_mode)


interpreter.InterpreterBuilder.create_dot = _create_dot
interpreter.InterpreterBuilder.create_fp_to_fp = _create_fp_to_fp
interpreter.InterpreterBuilder.cast_impl = _cast_impl
