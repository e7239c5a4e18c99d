"""Learned rounding at compile time: `llmirc compile ... --quant int4 --quant-method autoround
--calibration FILE` (AutoRound: Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs", started from GPTQ's codes).

Decoder layer by layer, in order (llmir ops grouped by the layer index in their weights' names;
the embedding before the first, the final norm and LM head after the last):

1. The layer's float output on the float model's input is the target; its input is what the
   layers already quantized give (the quantized chain).
2. Each of its linear weights that quantize-weights quantizes (same scheme; down_proj in the
   rotated basis when --quant-rotate) is quantized by GPTQ (llmirc/quant.py `gptq`) with the
   Hessian of its input on the quantized chain, the layer's other weights still float.
3. The rounding is learned: each code is clamp(round(b + v)), b = GPTQ's code plus the weight's
   own distance to it clipped to 0.499, v in [-0.5, 0.5] moved by signed gradient descent on the
   layer's output error (each token's squared error over its target's mean square, so the
   residual stream's few huge channels do not decide the loss), through straight-through
   rounding; the scales and zero points stay GPTQ's. `iters` steps (200) of about 1024 tokens
   (windows drawn at random, a fixed seed), learning rate 1/iters decaying linearly to 0; the
   step with the least loss on its batch is kept, and GPTQ's codes when that is no better on
   all the windows. Gradients are NumPy vector-Jacobian products of the layer's llmir ops (below),
   float32.
4. The layer's output with the learned codes becomes the next layer's input.

The learned codes are the calibration's tensors `calibration.learned.<weight>.<part>`
(llmirc/quant.py's parts); quantize-weights reads them as `llmir.packed_weight` ops of format
`learned` in place of quantizing. Linears outside the layers (an LM head) get GPTQ with
Hessians from the quantized chain. Measured on SmolLM2-135M in a torch emulation (DESIGN.md,
"GPTQ"): int4 groups of 128 with zero points, perplexity 12.44 / 16.16 on two texts against
GPTQ's 12.61 / 16.76 (bf16: 11.95 / 15.01). This is compile-time analysis: the bundle's kernels
are what run the model.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from xdsl.dialects import func
from xdsl.ir import Operation, SSAValue

from llmirc import dialect as L
from llmirc import dtypes, quant
from llmirc.calibration import _rope, _run, causal_softmax, linear
from llmirc.errors import LlmircError
from llmirc.passes.onnx_fuse_activation import REFERENCE
from llmirc.special_functions import erf

ITERS = 200          # signed-gradient steps per layer (AutoRound's default)
STEP_TOKENS = 1024   # tokens per step (AutoRound: 8 sequences of 2048; here 2 windows of 512)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _silu_grad(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_tanh_grad(x: np.ndarray) -> np.ndarray:
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


DERIVATIVE = {  # d act(x) / dx for llmir's activations (passes/onnx_fuse_activation.py REFERENCE)
    "silu": _silu_grad,
    "gelu": lambda x: 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi),
    "gelu_tanh": _gelu_tanh_grad,
    "relu": lambda x: (x > 0).astype(x.dtype),
}


# ---- vector-Jacobian products (float64 in the tests against finite differences) ----

def rms_norm_vjp(x: np.ndarray, g: np.ndarray, eps: float, dy: np.ndarray) -> np.ndarray:
    """dL/dx of y = x / sqrt(mean(x^2) + eps) * g over the last axis, given dL/dy ([..., d])."""
    inv = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    a = dy * g
    return inv * a - x * inv ** 3 * np.mean(a * x, -1, keepdims=True)


def layer_norm_vjp(x: np.ndarray, g: np.ndarray, eps: float, dy: np.ndarray) -> np.ndarray:
    """dL/dx of y = (x - mean x) / sqrt(var x + eps) * g (+ b) over the last axis ([N, d])."""
    xc = x - x.mean(-1, keepdims=True)
    inv = 1 / np.sqrt(np.mean(xc * xc, -1, keepdims=True) + eps)
    xhat, a = xc * inv, dy * g
    return inv * (a - a.mean(-1, keepdims=True) - xhat * np.mean(a * xhat, -1, keepdims=True))


def attention_vjp(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, heads: int, kv_heads: int,
                  head_dim: int, window: int, scale: float, starts: np.ndarray,
                  softcap: float = 0.0) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv) of causal grouped-query attention within each sequence [starts[i],
    starts[i+1]) (q [N, heads*head_dim], k and v [N, kv_heads*head_dim], a sliding `window` when
    not 0, scores softcap * tanh(s / softcap) when softcap is not 0), given dL/dout [N, heads*head_dim]:
    softmax's backward, dS = P (dP - rowsum(dP P)), times the cap's 1 - tanh^2."""
    g, d, r = kv_heads, head_dim, heads // kv_heads
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for a, b in zip(starts[:-1], starts[1:]):
        n = b - a
        qs = q[a:b].reshape(n, g, r, d).transpose(1, 2, 0, 3)      # [g, r, n, d]
        ks = k[a:b].reshape(n, g, d).transpose(1, 0, 2)[:, None]    # [g, 1, n, d]
        vs = v[a:b].reshape(n, g, d).transpose(1, 0, 2)[:, None]
        do = dout[a:b].reshape(n, g, r, d).transpose(1, 2, 0, 3)
        s = (qs @ ks.transpose(0, 1, 3, 2)) * scale
        if softcap:
            t = np.tanh(s / softcap)
            s = softcap * t
        p = causal_softmax(s, window)
        dp = do @ vs.transpose(0, 1, 3, 2)                           # [g, r, n, n]
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
        if softcap:
            ds *= 1 - t * t
        dq[a:b] = (ds @ ks).transpose(2, 0, 1, 3).reshape(n, heads * d)
        dk[a:b] = (ds.transpose(0, 1, 3, 2) @ qs).sum(1).transpose(1, 0, 2).reshape(n, g * d)
        dv[a:b] = (p.transpose(0, 1, 3, 2) @ do).sum(1).transpose(1, 0, 2).reshape(n, g * d)
    return dq, dk, dv


# ---- decoder layers as blocks of llmir ops ----

def layer_index(names: list[str]) -> int | None:
    """The decoder layer of a weight made of the checkpoint tensors `names`: the first `.<n>.` of
    a name (model.layers.3.mlp.up_proj.weight: 3; the largest over the names), None without
    one (model.norm.weight)."""
    found = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
    return max(found) if found else None


def split_layers(ops: list[Operation], names_of: Callable[[SSAValue], list[str]]) -> list[list[Operation]]:
    """The forward's ops (weight ops left out) as [before, layer 0, layer 1, ..., after]: an op
    is in the layer of its weights (`names_of`: a weight value's checkpoint names), or, without
    named weights, in the latest layer of its operands; ops whose weights have no layer index (the
    embedding, the final norm) go before the layers or after them. Raises LlmircError when an
    op would read a later layer's value (no decoder-layer structure)."""
    before, after = -1, 1 << 30
    where: dict[SSAValue, int] = {}
    placed: list[tuple[int, Operation]] = []
    seen_layer = False
    for op in ops:
        if L.is_weight_op(op) or isinstance(op, func.ReturnOp):
            continue
        weights = [v for v in op.operands if isinstance(v.owner, Operation) and L.is_weight_op(v.owner)]
        inputs = [where.get(v, before) for v in op.operands if v not in weights]
        names = [n for w in weights for n in names_of(w)]
        if names:  # (constants folded into the graph, as an ONNX export's layer norms' ones, have none)
            index = layer_index(names)
            at = index if index is not None else (after if seen_layer else before)
            seen_layer |= index is not None
        else:
            at = max(inputs, default=before)
        if any(i > at for i in inputs):
            raise LlmircError(f"--quant-method autoround: {op.name} of layer {at} reads a later layer's value "
                              "(cannot split the model into decoder layers; --quant-method gptq needs no layers)")
        placed.append((at, op))
        for r in op.results:
            where[r] = at
    keys = sorted({at for at, _ in placed} | {before, after})
    return [[op for at, op in placed if at == key] for key in keys]


@dataclass
class Rounding:
    """One linear weight's learnable rounding: `parts` are quant.gptq's for its float weight `w`
    [n, k] (in the rotated basis when `block`); `v` [n, k / g, g] in [-0.5, 0.5], learned;
    scales and zero points stay GPTQ's."""
    scheme: quant.Scheme
    parts: dict
    block: int           # Hadamard block of the input rotation, 0 for none
    w: np.ndarray

    def __post_init__(self):
        s = self.scheme
        n = self.parts["scales"].shape[0]
        self.k = self.parts["codes"].shape[1] * 8 // s.bits
        self.shape3 = (n, self.k // s.group_size, s.group_size)
        self.s = np.asarray(dtypes.to_float32(self.parts["scales"], s.scale_dtype), np.float32)[..., None]
        self.z = (self.parts["zeros"].astype(np.float32) if s.zero == "int"
                  else np.full(self.s.shape[:2], s.center, np.float32))[..., None]
        self.top = (1 << s.bits) - 1
        u = quant.unpack(self.parts["codes"], s.bits, s.sub_group, self.k).reshape(self.shape3)
        self.v = np.zeros(self.shape3, np.float32)
        # b: GPTQ's code plus the weight's own distance to it (in scales), clipped to 0.499 so
        # that round(b) is the code (GPTQ's rounding residuals instead: lower layer errors on the
        # calibration text, worse perplexity on SmolLM2, 12.66 / 16.50 against 12.49 / 16.01)
        x = self.w.reshape(self.shape3) / self.s + self.z
        self.b = (u + np.clip(x - u, -0.499, 0.499)).astype(np.float32)  # (x: float64 when rotated)
        del self.w
        # the rotation as a float32 matrix: a matmul is ~4x quant.hadamard's float64 transform here
        self.h = quant.hadamard(np.eye(self.block), self.block).astype(np.float32) if self.block else None

    def _rotate(self, a: np.ndarray) -> np.ndarray:
        """quant.hadamard(a, block) in float32 (a [n, k]; H_b / sqrt(b) is symmetric)."""
        return (a.reshape(-1, self.block) @ self.h).reshape(a.shape)

    def codes(self) -> np.ndarray:
        return np.clip(np.rint(self.b + self.v), 0, self.top)

    def weight(self) -> np.ndarray:
        """The dequantized weight (float32 [n, k]) in the linear's own basis (rotated back)."""
        w = ((self.codes() - self.z) * self.s).reshape(self.shape3[0], self.k)
        return self._rotate(w) if self.block else w

    def step(self, dw: np.ndarray, lr: float) -> None:
        """v -= lr sign(dL/dv) given dL/dW [n, k] of the linear's own weight: dL/dv = dL/dW s,
        straight through the rounding (no gradient where the code is clamped)."""
        if self.block:
            dw = self._rotate(dw)
        pre = np.rint(self.b + self.v)
        inside = (pre >= 0) & (pre <= self.top)
        dq = dw.reshape(self.shape3) * self.s  # dL/d(code): symmetric schemes' scales may be negative
        self.v -= lr * np.sign(dq) * inside
        np.clip(self.v, -0.5, 0.5, out=self.v)

    def learned_parts(self) -> dict:
        """The parts with the learned codes (quant.py's layout)."""
        codes = self.codes().astype(np.uint8).reshape(self.shape3[0], self.k)
        return dict(self.parts, codes=quant.pack(codes, self.scheme.bits, self.scheme.sub_group))


class Layer:
    """One decoder layer's llmir ops (split_layers), run forward and backward in float32 NumPy on
    rows of the calibration windows. `weight(v)`: a weight value as float32."""

    def __init__(self, ops: list[Operation], weight: Callable[[SSAValue], np.ndarray]):
        self.ops = ops
        opset = set(ops)
        produced = {r for op in ops for r in op.results}
        self.weights = {v: weight(v) for op in ops for v in op.operands
                        if isinstance(v.owner, Operation) and L.is_weight_op(v.owner)}
        self.inputs = list(dict.fromkeys(v for op in ops for v in op.operands
                                         if v not in produced and v not in self.weights))
        self.outputs = [r for op in ops for r in op.results if any(u.operation not in opset for u in r.uses)]
        self.linears = [op for op in ops if isinstance(op, L.LinearOp)]
        self._produced = produced
        last = {v: i for i, op in enumerate(ops) for v in op.operands}
        self._dead_after = [[v for v in set(op.operands) if last[v] == i and v in produced and v not in self.outputs]
                            for i, op in enumerate(ops)]

    def forward(self, inputs: dict, weights: dict, starts: np.ndarray, *, keep: bool = False,
                on_linear: Callable[[L.LinearOp, np.ndarray], None] | None = None) -> dict:
        """The values of the layer (all of them with `keep`, for `backward`; else its outputs) for
        `inputs` (value -> rows), the linears reading `weights[op]` where given (float32 [n, k])."""
        env = dict(self.weights)
        env.update(inputs)
        for i, op in enumerate(self.ops):
            if isinstance(op, L.LinearOp):
                x = env[op.input]
                if on_linear is not None:
                    on_linear(op, x)
                env[op.result] = linear(op, x, weights.get(op, env[op.weight]), env.__getitem__)
            else:
                env.update(zip(op.results, _run(op, env, None, starts)))
            if not keep:
                for v in self._dead_after[i]:
                    del env[v]
        return env if keep else {v: env[v] for v in self.outputs}

    def backward(self, env: dict, d_outputs: dict, weights: dict, starts: np.ndarray, learned) -> dict:
        """dL/dW (float32 [n, k]) of each linear in `learned`, given the values `forward(...,
        keep=True)` gave and dL/d(output) for the layer's outputs."""
        grads, dws = dict(d_outputs), {}
        needed = set()  # the values downstream of a learned linear: only their gradients are used
        for op in self.ops:
            if op in learned or any(v in needed for v in op.operands):
                needed.update(op.results)
        for op in reversed(self.ops):
            dys = [grads.pop(r, None) for r in op.results]
            if all(d is None for d in dys):
                continue
            for v, dx in self._vjp(op, env, dys, weights, starts, learned, dws, needed):
                if v in self._produced:
                    grads[v] = grads[v] + dx if v in grads else dx
        return dws

    def _vjp(self, op, env, dys, weights, starts, learned, dws, needed):
        dy = dys[0]
        if isinstance(op, L.LinearOp):
            if op in learned:
                dws[op] = dy.T @ env[op.input]
            if op.input in needed:
                yield op.input, dy @ weights.get(op, env[op.weight])
            if op.residual is not None:
                yield op.residual, dy
        elif isinstance(op, L.RMSNormOp):
            if op.input in needed:  # (per head: [N, heads, d])
                x = env[op.input]
                heads = lambda a: a.reshape(len(a), op.heads, -1)  # noqa: E731
                yield op.input, rms_norm_vjp(heads(x), env[op.weight], op.eps.value.data, heads(dy)).reshape(x.shape)
        elif isinstance(op, L.LayerNormOp):
            if op.input in needed:
                yield op.input, layer_norm_vjp(env[op.input], env[op.weight], op.eps.value.data, dy)
        elif isinstance(op, L.RopeOp):
            yield op.input, _rope(op, dy, env[op.positions], sign=-1.0)
        elif isinstance(op, L.AttentionOp):
            h, g, d = (a.value.data for a in (op.num_heads, op.num_kv_heads, op.head_dim))
            grads = attention_vjp(env[op.q], env[op.k], env[op.v], dy, h, g, d, op.sliding_window.value.data,
                                  op.scale.value.data, starts, op.softcap_value())
            yield from zip((op.q, op.k, op.v), grads)
        elif isinstance(op, L.ActMulOp):
            gate, act = env[op.gate], op.act.data
            yield op.gate, dy * env[op.up] * DERIVATIVE[act](gate)
            yield op.up, dy * REFERENCE[act](gate)
        elif isinstance(op, L.ActOp):
            yield op.input, dy * DERIVATIVE[op.act.data](env[op.input])
        elif isinstance(op, L.SoftcapOp):
            t = np.tanh(env[op.input] / np.float32(op.cap.value.data))
            yield op.input, dy * (1 - t * t)
        elif isinstance(op, L.AddOp):
            yield op.lhs, dy
            yield op.rhs, dy
        elif isinstance(op, L.SplitOp):
            some = next(d for d in dys if d is not None)
            yield op.input, np.concatenate([d if d is not None else np.zeros((len(some), L.shape_of(r)[1]), some.dtype)
                                            for d, r in zip(dys, op.results)], axis=1)
        else:
            raise LlmircError(f"--quant-method autoround: no gradient for {op.name} (a decoder layer of "
                              "linear, rms_norm, layer_norm, rope, attention, act_mul, act, add and split ops)")


def normalized_error(ys: list[np.ndarray], targets: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The loss: mean over tokens of |y - t|^2 / (|t|^2 + 1e-6) (means over each row), and its
    gradient for each y."""
    count = sum(len(t) for t in targets) * len(targets)
    loss, grads = 0.0, []
    for y, t in zip(ys, targets):
        ms = np.mean(t * t, -1, keepdims=True) + np.float32(1e-6)
        diff = y - t
        loss += float(np.sum(np.mean(diff * diff, -1, keepdims=True) / ms))
        grads.append((2 / (diff.shape[-1] * count)) * diff / ms)
    return loss / count, grads


def calibrate_autoround(module, source, token_windows: list[np.ndarray], planned: dict,
                        iters: int = ITERS, progress: Callable[[str], None] = lambda s: None):
    """Learns the rounding of the linear weights `planned` holds (linear op of `module` -> (scheme,
    Hadamard block of its input rotation or 0)) layer by layer on the windows (module docstring)
    and returns the Calibration holding their codes (`learned`), and Hessians from the quantized
    chain for the float linears outside the layers. `source`, `module` as for
    calibration.calibrate. Raises LlmircError as it does, and for an op with no gradient."""
    from llmirc.calibration import Calibration, _hessian, _weight, forward_inputs
    from llmirc.passes.quantize_weights import source_names

    ops, args, starts = forward_inputs(module, token_windows)
    groups = split_layers(ops, source_names)
    cal = Calibration(int(starts[-1]), len(token_windows))
    env_f = dict(args)
    rng = np.random.default_rng(0)
    per_step = max(1, round(STEP_TOKENS / np.median(np.diff(starts))))
    layers = [g for g in groups[1:-1] if g]
    # the last layer reading each value (len(layers): the ops after them): the chains drop it after that
    last = {v: i for i, g in enumerate(layers + [groups[-1]]) for op in g for v in op.operands}
    begin = time.monotonic()
    try:
        with np.errstate(all="ignore"):
            by_input: dict[SSAValue, int] = {}  # as calibration.calibrate: q, k and v share their input's

            def record(op: L.LinearOp, x: np.ndarray) -> None:  # Hessian for GPTQ in quantize-weights
                if L.is_float(op.weight.type.element_type):
                    by_input[op.input] = cal._add(source_names(op.weight), x, starts[:-1], by_input.get(op.input))

            env_f.update(Layer(groups[0], lambda v: _weight(v, source)).forward(env_f, {}, starts, on_linear=record))
            env_q = dict(env_f)
            inside = sum(op in planned for g in layers for op in g)
            steps = f"{iters} step{'' if iters == 1 else 's'}"
            progress(f"autoround: {inside} linears in {len(layers)} decoder layers, {steps} per layer"
                     + (f"; {len(planned) - inside} outside them: GPTQ" if len(planned) > inside else "")
                     if layers else "autoround: no decoder layers (no layer index in the weights' names): GPTQ alone")
            for li, ops_i in enumerate(layers):
                layer = Layer(ops_i, lambda v: _weight(v, source))
                target = layer.forward({v: env_f[v] for v in layer.inputs}, {}, starts)
                inputs = {v: env_q[v] for v in layer.inputs}
                roundings: dict[L.LinearOp, Rounding] = {}
                hessians: dict[SSAValue, np.ndarray] = {}

                def quantize(op: L.LinearOp, x: np.ndarray) -> None:
                    names = source_names(op.weight)
                    if op not in planned:  # kept float
                        return None
                    if len(names) != 1:
                        return record(op, x)
                    scheme, block = planned[op]
                    if op.input not in hessians:  # (q, k and v read one input)
                        hessians[op.input] = _hessian(x)
                    w, h = layer.weights[op.weight], hessians[op.input]
                    if block:
                        w, h = quant.hadamard(w, block), quant.hadamard(quant.hadamard(h, block).T, block)
                    try:
                        parts = quant.gptq(w.astype(np.float32), h.astype(np.float32), scheme)
                    except ValueError as e:
                        raise LlmircError(f"cannot quantize {names[0]}: {e}") from None
                    roundings[op] = Rounding(scheme, parts, block, w)

                layer.forward(inputs, {}, starts, on_linear=quantize)

                def error(out: dict) -> float:
                    return normalized_error([out[o] for o in layer.outputs], [target[o] for o in layer.outputs])[0]

                out = layer.forward(inputs, {op: r.weight() for op, r in roundings.items()}, starts)
                errors = f"{error(out):.4g}"
                origin = "GPTQ's codes (--quant-iters 0)"
                if iters > 0 and roundings:
                    _learn(layer, roundings, inputs, target, starts, iters, per_step, rng)
                    learned = layer.forward(inputs, {op: r.weight() for op, r in roundings.items()}, starts)
                    e_gptq, e_learned = error(out), error(learned)
                    if e_learned < e_gptq:
                        out, errors = learned, f"{errors} -> {e_learned:.4g}"
                        origin = "learned rounding"
                    else:  # no better on all the windows than GPTQ's codes: those stay
                        for r in roundings.values():
                            r.v[:] = 0
                        errors += f" (learned: {e_learned:.4g}, GPTQ's codes kept)"
                        origin = "GPTQ's codes (learning did not lower the layer's output error)"
                for op, r in roundings.items():
                    cal.add_learned(source_names(op.weight)[0], r.learned_parts(), r.scheme, origin)
                progress(f"  autoround: layer {li + 1} of {len(layers)}: output error {errors} "
                         f"({time.monotonic() - begin:.0f} s)")
                env_q.update(out)
                env_f.update(target)
                for v in [v for v in env_q if last.get(v, len(layers)) <= li]:
                    del env_q[v], env_f[v]
            tail = Layer(groups[-1], lambda v: _weight(v, source))
            tail.forward({v: env_q[v] for v in tail.inputs}, {}, starts, on_linear=record)
    except BaseException:
        cal.close()
        raise
    return cal


def _learn(layer: Layer, roundings: dict, inputs: dict, target: dict, starts: np.ndarray, iters: int,
           per_step: int, rng: np.random.Generator) -> None:
    """Signed gradient descent on the roundings' v (module docstring, step 3); keeps the v of the
    least loss on the batches drawn, as AutoRound does. (A fixed check batch instead, measured
    every 10 steps, with 32768 calibration tokens: SmolLM2 int4-g128 12.64 / 16.07 against this
    one's 12.49 / 16.01 on 8192; DESIGN.md, "Learned rounding".)"""
    outputs = layer.outputs
    n = len(starts) - 1
    best, best_v = math.inf, None
    for it in range(iters):
        pick = np.sort(rng.permutation(n)[:per_step])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in pick])
        sub = np.concatenate([[0], np.cumsum(starts[pick + 1] - starts[pick])])
        weights = {op: r.weight() for op, r in roundings.items()}
        env = layer.forward({v: a[rows] for v, a in inputs.items()}, weights, sub, keep=True)
        loss, grads = normalized_error([env[o] for o in outputs], [target[o][rows] for o in outputs])
        if loss < best:
            best, best_v = loss, {op: r.v.copy() for op, r in roundings.items()}
        dws = layer.backward(env, dict(zip(outputs, grads)), weights, sub, roundings)
        lr = (1 - it / iters) / iters
        for op, r in roundings.items():
            r.step(dws[op], lr)
    for op, r in roundings.items():
        r.v = best_v[op]
