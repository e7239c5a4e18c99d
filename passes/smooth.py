"""smooth: SmoothQuant's channel scaling, so that int8 activations lose less to outlier channels.

`llmirc compile --quant int8 --quant-smooth ALPHA --calibration FILE` runs it first, before the
pipeline (fuse-linears would hide the structure it looks for). A few input channels of an LLM's
linears carry values tens of times larger than the rest; the quantized kernels round each
block of 32 activations to int8 with one scale, so those channels cost the others their
precision. Dividing input channel j by s_j, and multiplying column j of the weights that read
it by s_j, leaves the model the same in exact arithmetic and moves the range into the weights,
quantized per group offline (Xiao et al. 2023, "SmoothQuant", eq. 4):

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha),  then s <- max(s / median(s), 1)

max|x_j| comes from calibration (llmirc/calibration.py; without each window's first token, an
attention sink). The second step is llmirc's: plain SmoothQuant scales make channels below
the median larger, and on SmolLM2-135M a value the calibration text had not shown then became
a new outlier (perplexity +1.39% against +0.72% unsmoothed over 30,000 tokens, for one of two
calibration windows); scales relative to the median and never below 1 shrink the outliers only
(+0.21% and +0.22% in both; BENCHMARKS.md, "Where int8 loses to Q8_0").

The division is folded into the op before, where that is exact:
* an rms_norm (layer_norm) whose result only linears read as their input: its weight (and
  bias) divided by s; the linears' weights multiplied by s along their input axis (q/k/v,
  gate/up, GPT-2's c_attn and c_fc);
* act_mul(gate, up) read only by one linear (down_proj): the rows of up's weight (and bias)
  divided by s, since act(g) * (u / s) = (act(g) * u) / s.
Left out: o_proj (its input comes from attention over v rows shared by a group of query heads),
the LM head (a tied head's columns are the embedding table's), and linears whose weights are
not float (a checkpoint's own quantized ones). Each scaled weight is an `llmir.scale` op whose
scale is an `llmir.weight` naming the calibration's tensor, so `--print-ir-after-all` shows it;
the bundle writer folds it in f32. GPTQ (quantize-weights) scales a smoothed input's Hessian to
match: H' = diag(1/s) H diag(1/s).

Before:  %n = "llmir.rms_norm"(%x, %g)   %q = "llmir.linear"(%n, %wq)   %k = ...   %v = ...
After:   %s = "llmir.weight"() {weight = "calibration.smooth.0"} : () -> tensor<64xf32>
         %g2 = "llmir.scale"(%g, %s) {axis = 0, inverse = 1}
         %n = "llmir.rms_norm"(%x, %g2)
         %wq2 = "llmir.scale"(%wq, %s) {axis = 1, inverse = 0}   %q = "llmir.linear"(%n, %wq2)  ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc import quant
from llmirc.errors import UsageError

from .func_args import forward_func
from .quantize_weights import lm_head_of, source_names
from .report import note

SCALES = "calibration.smooth."  # + the calibration's input index: f32 [k]


def smoothing_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s (float32 [k]) from each input channel's max |x_j| and max_i |W_ij| over the weights
    that read it ([k] each): SmoothQuant's, relative to their median and clamped at 1 (see
    the module's docstring). Channels never seen (max 0) get 1."""
    s = np.maximum(xmax, 1e-5).astype(np.float64) ** alpha / np.maximum(wmax, 1e-5).astype(np.float64) ** (1 - alpha)
    return np.maximum(s / np.median(s), 1.0).astype(np.float32)


def float_value(v: SSAValue, read, packed=None) -> np.ndarray | None:
    """The float32 value of a weight expression (`read(name)`: a named weight as float32;
    `packed(v)`: a checkpoint's quantized weight dequantized, or None to leave those out), or
    None where it is not made of float weights alone. Calibration's forward reads its weights
    through this too (llmirc/calibration.py)."""
    op = v.owner
    if isinstance(op, L.WeightOp):
        return np.asarray(read(op.weight.data), np.float32) if L.is_float(v.type.element_type) else None
    if isinstance(op, L.ConstantOp):  # an ONNX export's norm weights are folded constants
        from llmirc.frontend.onnx_dialect import constant_value

        a = np.asarray(constant_value(op.value))
        return a.astype(np.float32) if a.dtype.kind == "f" else None
    if isinstance(op, L.PackedWeightOp):
        return None if packed is None else packed(v)
    parts = [float_value(i, read, packed) for i in op.operands]
    if any(p is None for p in parts):
        return None
    if isinstance(op, (L.TransposeOp, L.CastOp)):
        return parts[0].T if isinstance(op, L.TransposeOp) else parts[0]
    if isinstance(op, L.ScaleOp):
        a, s = parts
        s = s.reshape([-1 if d == op.axis.value.data else 1 for d in range(a.ndim)])
        return a / s if op.inverse.value.data else a * s
    if isinstance(op, L.OffsetOp):
        return parts[0] + np.float32(op.offset.value.data)
    if isinstance(op, L.HadamardOp):
        return quant.hadamard(parts[0], op.block.value.data)
    if isinstance(op, L.ConcatOp):
        return np.concatenate(parts, axis=op.axis.value.data)
    return None


@dataclass(frozen=True)
class Smooth(ModulePass):
    name = "smooth"

    alpha: float = 0.5

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if not 0 < self.alpha < 1:
            raise UsageError(f"{self.name}: alpha must be between 0 and 1, got {self.alpha}")
        calibration = getattr(ctx, "calibration", None)
        if calibration is None:
            raise UsageError(f"{self.name}: needs calibration data (llmirc compile --quant-smooth ALPHA "
                             "--calibration FILE)")
        read = lambda name: calibration.read(name) if calibration.has(name) else ctx.read_weight(name)
        lm_head = lm_head_of(op)
        for producer in list(forward_func(op).body.block.ops):
            if isinstance(producer, (L.RMSNormOp, L.LayerNormOp)):
                if isinstance(producer, L.RMSNormOp) and producer.heads > 1:
                    continue  # a weight of head_dim shared by the heads: no per-channel scale folds into it
                before = [producer.weight] + ([producer.bias] if isinstance(producer, L.LayerNormOp)
                                              and producer.bias is not None else [])
                what = producer.name.removeprefix("llmir.")
            elif isinstance(producer, L.ActMulOp) and isinstance(up := producer.up.owner, L.LinearOp) \
                    and producer.up.has_one_use() and up.residual is None:
                before = [up.weight] + ([up.bias] if up.bias is not None else [])
                what = "act_mul"
            else:
                continue
            readers = [u.operation for u in producer.results[0].uses]
            if not readers or lm_head in readers or not all(
                    isinstance(r, L.LinearOp) and r.input is producer.results[0] and r.residual is None
                    for r in readers):
                continue
            weights = [float_value(r.weight, read) for r in readers]
            found = calibration.maximum_for([n for r in readers for n in source_names(r.weight)])
            if found is None or any(w is None for w in weights) or any(float_value(w, read) is None for w in before):
                continue
            index, xmax = found
            if calibration.has(f"{SCALES}{index}"):  # smoothed already (smooth ran twice, or a merged input)
                continue
            s = smoothing_scales(xmax, np.max([np.abs(w).max(0) for w in weights], axis=0), self.alpha)
            calibration.add(f"{SCALES}{index}", s)
            scale = L.WeightOp(f"{SCALES}{index}", (len(s),))
            first = up if what == "act_mul" else producer  # the op reading `before`
            block = first.parent_block()
            block.insert_op_before(scale, first)
            for user, w, axis, inverse in [(first, w, 0, True) for w in before] + \
                                          [(r, r.weight, 1, False) for r in readers]:
                scaled = L.ScaleOp(w, scale.result, axis, inverse)
                block.insert_op_before(scaled, user)
                user.operands[list(user.operands).index(w)] = scaled.result
            note(ctx, f"{self.name}: {what} -> {len(readers)} linear{'s' if len(readers) > 1 else ''}")

