"""onnx-fuse-activation: SiLU, GELU (erf and tanh forms) and ReLU become llmir.act, Gemma 2's soft-capping
of the logits (cap * tanh(x / cap)) llmir.softcap.

Before (GELU, erf form):
    %d = "onnx.Div"(%x, 1.414)  %e = "onnx.Erf"(%d)  %a = "onnx.Add"(%e, 1)
    %m = "onnx.Mul"(%x, %a)     %y = "onnx.Mul"(%m, 0.5)
After:
    %y = "llmir.unsqueeze_batch"("llmir.act"("llmir.squeeze_batch"(%x)) {act = "gelu"})

Anchors: Sigmoid, Erf, Tanh, Relu and onnx.Gelu on activations. The region is every
elementwise op computed from the anchor's input alone; it is fused when it computes one of
the activations, or a soft-cap by one of its scalar constants, on random inputs (the closest one, within
a tolerance that allows for the region's
constants being rounded: a bfloat16 export stores 0.7978845 as 0.796875). onnx-to-llmir
then turns act(gate) * up into act_mul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.frontend.onnx_dialect import OnnxOp
from llmirc.special_functions import erf

from .func_args import forward_func
from .onnx_fuse_norm import sources_above
from .onnx_match import Oracle, close, closure_down, erase_dead, evaluate, softcap_candidates
from .report import note

ANCHORS = ("Sigmoid", "Erf", "Tanh", "Relu", "Gelu")
REFERENCE = {  # llmir's activations in NumPy (also what GPTQ's calibration forward computes)
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
}


@dataclass(frozen=True)
class FuseActivation(ModulePass):
    name = "onnx-fuse-activation"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        for anchor in [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type in ANCHORS]:
            if anchor.parent is None or not oracle.is_data(anchor.operands[0]):
                continue
            for x in sources_above(anchor.operands[0], oracle, limit=3):
                if act := self._try(anchor, x, oracle):
                    note(ctx, f"{self.name}: {act}")
                    break

    @staticmethod
    def _try(anchor: OnnxOp, x, oracle: Oracle) -> str | None:
        shape = oracle.shape(x)
        if len(shape) != 3 or shape[0] != 1:
            return None
        ops, outs = closure_down(x, oracle)
        if anchor not in ops or len(outs) != 1:
            return None
        S = 7
        xs = (np.random.default_rng(1).standard_normal((1, S, shape[-1])) * 4).astype(np.float32)
        got = evaluate(ops, {x: xs}, oracle, S)[outs[0]]
        tol = constant_precision(ops, oracle)
        x64 = xs.astype(np.float64)
        refs = {act: ref(x64) for act, ref in REFERENCE.items()}
        if anchor.op_type == "Tanh":
            scalars = [float(np.asarray(oracle.value(v)).reshape(-1)[0]) for op in ops for v in op.operands
                       if oracle.has_value(v) and np.asarray(oracle.value(v)).dtype.kind == "f"
                       and np.asarray(oracle.value(v)).size == 1]
            refs |= {cap: cap * np.tanh(x64 / cap) for cap in softcap_candidates(scalars)}
        for act in sorted(refs, key=lambda a: float(np.nanmax(np.abs(got - refs[a])))):  # closest first
            if close(got, refs[act], tol):
                out = outs[0]
                at = out.owner
                block = at.parent_block()
                rows = L.SqueezeBatchOp(x)
                new = L.ActOp(rows.result, act) if isinstance(act, str) else L.SoftcapOp(rows.result, act)
                back = L.UnsqueezeBatchOp(new.result)
                block.insert_ops_before([rows, new, back], at)
                out.replace_all_uses_with(back.result)
                erase_dead(ops)
                return act if isinstance(act, str) else f"softcap {act:g}"
        return None


def constant_precision(ops, oracle: Oracle) -> float:
    """The tolerance (relative to the largest output) for a region whose float constants may be rounded:
    when each is a bfloat16 (or float16) value, as in a half-precision export read as float32, 1/16 of
    that type's unit roundoff. (GELU's tanh form with bfloat16 constants is 2e-5 off the exact one; the
    near misses the check must refuse, e.g. x * sigmoid(2x) for SiLU, are 100 times farther.) Else 1e-5."""
    import ml_dtypes

    values = [np.asarray(oracle.value(v), np.float32).reshape(-1) for op in ops for v in op.operands
              if oracle.has_value(v) and np.asarray(oracle.value(v)).dtype.kind == "f"]
    consts = np.concatenate(values) if values else np.zeros(0, np.float32)
    for half, unit_roundoff in ((ml_dtypes.bfloat16, 2.0 ** -8), (np.float16, 2.0 ** -11)):
        if consts.size and np.array_equal(consts.astype(half).astype(np.float32), consts):
            return max(1e-5, unit_roundoff / 16)
    return 1e-5
