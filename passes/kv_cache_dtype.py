"""kv-cache-dtype: the element type of the paged KV pool (`llmirc compile --kv-cache-dtype`).

`auto` stores K/V in the type the linear ops' weights have when they all agree on a half type
(a bf16 checkpoint gets a bf16 cache, also when --quant quantizes its weights), in f16 when
linears are quantized (by the checkpoint, as GGUF, GPTQ and AWQ files are, or by --quant) and
none is in a half type (llama.cpp's default cache type: it halves what long-context decode
reads), else in f32. kv_append rounds to the pool's type;
paged_attention widens exactly and computes in f32. `int8` stores codes with one float32 scale
per block, kv head and K/V (absmax / 127, grown as tokens arrive; see the kv_append kernel kind);
`fp8` (vLLM's name; also `fp8_e4m3`, `float8_e4m3fn`) the same with OCP FP8 E4M3 codes (absmax /
448), for GPUs that convert to and from it (the cuda target's sm_90; not the cpu target).

Before:  %arg: !llmir.kv_pool<layers = 2, kv_heads = 2, head_dim = 16, block_size = 16, f32>
After (dtype=bf16):
         %arg: !llmir.kv_pool<layers = 2, kv_heads = 2, head_dim = 16, block_size = 16, bf16>
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, f8E4M3FN, f16, f32, i8
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter

from llmirc import dialect as L
from llmirc.dtypes import FP8_NAMES
from llmirc.errors import LlmircError, UsageError

from .cast_weights import float_type, source_type
from .func_args import forward_func
from .report import note


def auto_kv_dtype(module: ModuleOp, quantized_as=None):
    """The half type all float linear weights share, else f32; f16 (llama.cpp's default) when
    some linears are quantized and no weight is in a half type. A weight quantized by
    quantize-weights counts as the float weight it was made from (a bf16 checkpoint compiled with
    --quant, or smoothed, keeps a bf16 cache; an f32 one gets f16), or as `quantized_as` where given
    (--dtype: the type it would have been stored in, kept float, as the linears kept are).
    Where the checkpoint quantized linears itself (GGUF, GPTQ, AWQ), its f32 linears are
    fallbacks (as in GGUF files made with llama.cpp's --leave-output-tensor) and do not vote."""
    def source(w):
        if isinstance(w.owner, L.QuantizeOp):
            return quantized_as or source_type(w.owner.input)
        return source_type(w)

    weights = [op.weight for op in module.walk() if isinstance(op, L.LinearOp)]
    sources = {source(w) for w in weights}
    quantized = any(isinstance(w.owner, L.QuantizeOp) for w in weights) or not all(map(L.is_float, sources))
    halves = {t for t in sources if L.is_float(t)} - {f32}
    if len(halves) == 1 and (quantized or f32 not in sources):
        return halves.pop()
    return f16 if quantized and not halves else f32


def kv_type(name: str, option: str):
    """The pool element type for a dtype option value: a float type, int8 or f8E4M3FN."""
    if name in ("int8", "i8"):
        return i8
    if name in FP8_NAMES:
        return f8E4M3FN
    if name in ("fp8_e5m2", "float8_e5m2"):
        raise UsageError(f"{option}: {name} is not supported (two mantissa bits); fp8 here is E4M3 "
                         "(float8_e4m3fn), with a scale per block")
    try:
        return float_type(name, option)
    except LlmircError:
        raise UsageError(f"{option}: unknown dtype {name!r} (choose auto, float32, bfloat16, float16, "
                         "int8 or fp8)") from None


@dataclass(frozen=True)
class KVCacheDtype(ModulePass):
    name = "kv-cache-dtype"

    dtype: str = "auto"
    # with dtype auto: the type the weights quantize-weights quantized count as (auto: the
    # checkpoint's; the required tail passes --dtype)
    weights: str = "auto"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        # (checked whatever dtype says: a misspelled weights=... was taken silently beside dtype=int8)
        weights = None if self.weights == "auto" else float_type(self.weights, f"{self.name}{{weights}}")
        if self.dtype == "auto":
            target = auto_kv_dtype(op, weights)
        else:
            target = kv_type(self.dtype, f"{self.name}{{dtype}}")
        f = forward_func(op)
        pools = [a for a in f.args if isinstance(a.type, L.KVPoolType)]
        pools += [o.result for o in f.walk() if isinstance(o, L.KVAppendOp)]
        if not pools or pools[0].type.dtype == target:
            return
        t = pools[0].type
        new = L.KVPoolType(t.layers.data, t.kv_heads.data, t.head_dim.data, t.block_size.data, target)
        for v in pools:
            Rewriter.replace_value_with_new_type(v, new)
        f.update_function_type()
        note(ctx, f"{self.name}: kv pool -> {target}")
