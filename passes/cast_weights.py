"""cast-weights: store the weights that linear and embedding ops read in another float type.

`llmirc compile --dtype D` runs it (auto: keep the checkpoint's types; the pass only casts the
f32 products of `smooth` back to the type of the checkpoint tensors they were made from).
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
from llmirc.errors import UsageError

from .report import note


def float_type(name: str, option: str):
    """The MLIR float type for a dtype option value (float32/bfloat16/float16 or f32/bf16/f16)."""
    try:
        d = dtypes.dtype(name)
    except KeyError:
        d = None
    if d is None or d.name not in L.FLOAT_TYPES:
        raise UsageError(f"{option}: unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    return L.FLOAT_TYPES[d.name]


def weight_uses(module: ModuleOp) -> Iterator[tuple[Operation, SSAValue]]:
    """(op, weight) for every linear and embedding op: the weights whose storage type a pass may
    change (a snapshot: the caller may insert ops while iterating)."""
    for user in list(module.walk()):
        if isinstance(user, L.LinearOp):
            yield user, user.weight
        elif isinstance(user, L.EmbeddingOp):
            yield user, user.table


def source_type(v: SSAValue):
    """The float element type of the checkpoint tensors a weight expression is made of (through
    scales, rotations, transposes and concatenations; a cast's own), or None where they differ."""
    op = v.owner
    if isinstance(op, (L.ScaleOp, L.HadamardOp, L.TransposeOp)):
        return source_type(op.input)
    if isinstance(op, L.ConcatOp):
        types = {source_type(i) for i in op.inputs}
        return types.pop() if len(types) == 1 else None
    return v.type.element_type


def replace_weight(user: Operation, w: SSAValue, value: SSAValue) -> None:
    """Makes `user` read `value` where it read the weight `w`."""
    user.operands[[i for i, v in enumerate(user.operands) if v is w][0]] = value


@dataclass(frozen=True)
class CastWeights(ModulePass):
    name = "cast-weights"

    dtype: str = "auto"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        fixed = None if self.dtype == "auto" else float_type(self.dtype, f"{self.name}{{dtype}}")
        casts = {}
        for user, w in weight_uses(op):
            target = fixed if fixed is not None else source_type(w)
            if target is None or w.type.element_type == target or not L.is_float(w.type.element_type):
                continue  # quantized: as it is
            if w not in casts:
                cast = L.CastOp(w, target)
                user.parent_block().insert_op_before(cast, user)
                casts[w] = cast.result
                name = next(n for n, t in L.FLOAT_TYPES.items() if t == target)
                note(ctx, f"{self.name}: weight -> {dtypes.dtype(name).short}")
            replace_weight(user, w, casts[w])
