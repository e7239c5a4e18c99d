"""cast-weights: store the weights that linear and embedding ops read in another float type.

`llmirc compile --dtype D` runs it (auto: keep the checkpoint's types, the pass does nothing).
The cast is folded into the bundle at compile time (bf16 rounds to nearest even); kernels read
the stored type and accumulate in f32. Norm weights and biases are f32 whatever the dtype.

Before:  %w = "llmir.weight"() {weight = "...q_proj.weight"} : () -> tensor<64x64xf32>
         %y = "llmir.linear"(%x, %w) : (tensor<?x64xf32>, tensor<64x64xf32>) -> tensor<?x64xf32>
After (dtype=bf16):
         %c = "llmir.cast"(%w) : (tensor<64x64xf32>) -> tensor<64x64xbf16>
         %y = "llmir.linear"(%x, %c) : (tensor<?x64xf32>, tensor<64x64xbf16>) -> tensor<?x64xf32>
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc import dtypes
from llmirc.errors import LlmircError

from .report import note


def float_type(name: str, option: str):
    """The MLIR float type for a dtype option value (float32/bfloat16/float16 or f32/bf16/f16)."""
    try:
        d = dtypes.dtype(name)
    except KeyError:
        d = None
    if d is None or d.name not in L.FLOAT_TYPES:
        raise LlmircError(f"{option}: unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    return L.FLOAT_TYPES[d.name]


def weight_uses(module: ModuleOp) -> Iterator[tuple[Operation, SSAValue]]:
    """(op, weight) for every linear and embedding op: the weights whose storage type a pass may
    change (a snapshot: the caller may insert ops while iterating)."""
    for user in list(module.walk()):
        if isinstance(user, L.LinearOp):
            yield user, user.weight
        elif isinstance(user, L.EmbeddingOp):
            yield user, user.table


def replace_weight(user: Operation, w: SSAValue, value: SSAValue) -> None:
    """Makes `user` read `value` where it read the weight `w`."""
    user.operands[[i for i, v in enumerate(user.operands) if v is w][0]] = value


@dataclass(frozen=True)
class CastWeights(ModulePass):
    name = "cast-weights"

    dtype: str = "auto"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.dtype == "auto":
            return
        target = float_type(self.dtype, f"{self.name}{{dtype}}")
        casts = {}
        for user, w in weight_uses(op):
            if w.type.element_type == target or not L.is_float(w.type.element_type):  # quantized: as it is
                continue
            if w not in casts:
                cast = L.CastOp(w, target)
                user.parent_block().insert_op_before(cast, user)
                casts[w] = cast.result
                note(ctx, f"{self.name}: weight -> {dtypes.dtype(self.dtype).short}")
            replace_weight(user, w, casts[w])
