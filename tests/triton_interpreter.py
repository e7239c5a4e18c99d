"""Triton's interpreter for the kernel tests (TRITON_INTERPRET=1 is set in conftest.py, before any
kernel is decorated), with two fixes to Triton 3.9's interpreter so that bfloat16 behaves as on a
GPU: `InterpreterBuilder.create_dot` multiplies bf16 operands as their raw uint16 bits (they are
widened to float32 first: exact, a bf16 product is exact in f32), and `cast_impl` rounds f32 to
bf16 toward zero, and its round-to-nearest mode loses the carry into the exponent (the GPU, and
`.to(tl.bfloat16)`'s default, round to nearest even: done here with integer arithmetic), and it
casts integers to bf16 by reinterpreting their bits (here: through f32, exact for int8 codes)."""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_create_dot = interpreter.InterpreterBuilder.create_dot
_cast_impl = interpreter.InterpreterBuilder.cast_impl


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


interpreter.InterpreterBuilder.create_dot = _create_dot
interpreter.InterpreterBuilder.cast_impl = _cast_impl
