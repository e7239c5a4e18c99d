"""Learned rounding of int4 weights, emulated with torch on a Llama checkpoint, to measure what it
is worth before the compiler does it (DESIGN.md, "GPTQ").

    python benchmarks/learned_rounding.py CHECKPOINT --calibration FILE --text FILE [--text FILE ...]
        [--init gptq|rtn] [--loss normalized|mse] [--iters 200] [--batch 2] [--tokens 8192]

Decoder layer by layer, in order (AutoRound: Cheng et al. 2023, "Optimize Weight Rounding via
Signed Gradient Descent for the Quantization of LLMs"): the layer's float output on the float
model's input is the target; its input is what the already quantized layers give. Each linear
weight of the layer is quantized as `--quant int4 --quant-zero-points` stores it (groups of 128,
64 for 576 inputs, float16 scales, uint8 zero points; down_proj rotated by llmirc's Hadamard
blocks of 128, as --quant-rotate), and the rounding is learned: each weight's code is
round(b + v), v in [-0.5, 0.5] learned by signed gradient descent on the layer's output error
(straight-through rounding; learning rate 1/iters decaying linearly to 0; batches of --batch
windows of 512 tokens; the step with the least loss kept).

--init gptq: b = llmirc.quant.gptq's code plus the weight's own distance to it clipped to 0.499
(so round(b) is GPTQ's code and v moves the rounding as AutoRound's does), with GPTQ's scales
fixed and its Hessians taken on the quantized layers' outputs (rows scaled to their median norm,
as llmirc's calibration does). --init rtn: AutoRound itself, b = w / s + z from round to
nearest's range, whose two ends are learned too (factors in [0.5, 1]). --iters 0: no learning
(--init gptq is then GPTQ with sequential Hessians). --loss normalized divides each token's
error by its target's root mean square: the residual stream's few huge channels otherwise
decide the last layers' loss, which the final norm scales down.

Prints each layer's output error (mean square, before and after learning) and the perplexity of
each --text with the quantized weights put into transformers (float activations), windows of 512
tokens, stride 256, as `llmirc eval-ppl --context 512 --stride 256` computes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from llmirc import quant
from llmirc.runtime.perplexity import perplexity
from llmirc.runtime.tokenizer import Tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
WINDOW = 512


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity backward (the straight-through estimator)."""
    return (x.round() - x).detach() + x


class LearnedRounding:
    """One linear weight [n, k] quantized to int4 with zero points, its rounding learnable."""

    def __init__(self, w: torch.Tensor, rotate: bool, init: str, hessian: torch.Tensor | None):
        self.n, self.k = w.shape
        self.g = 64 if self.k % 128 else 128
        self.R = torch.tensor(quant.hadamard(np.eye(128), 128), dtype=torch.float32) if rotate else None
        self.w = self._rotated(w)
        self.v = torch.zeros(self.n, self.k, requires_grad=True)
        if init == "gptq":
            h = hessian.double().numpy()
            if rotate:  # R H R for a rotated input
                h = quant.hadamard(quant.hadamard(h, 128).T, 128)
            scheme = quant.Scheme(4, self.g, "float16", "int")
            parts = quant.gptq(self.w.numpy(), h.astype(np.float32), scheme)
            u = torch.tensor(quant.unpack(parts["codes"], 4, scheme.sub_group, self.k).astype(np.float32))
            self.s = torch.tensor(parts["scales"].astype(np.float32)).repeat_interleave(self.g, 1)
            self.z = torch.tensor(parts["zeros"].astype(np.float32)).repeat_interleave(self.g, 1)
            self.base = u + (self.w / self.s + self.z - u).clamp(-0.499, 0.499)
            self.ends = []
        else:
            self.ends = [torch.ones(self.n, self.k // self.g, 1, requires_grad=True) for _ in range(2)]

    def _rotated(self, w: torch.Tensor) -> torch.Tensor:
        if self.R is None:
            return w
        return (w.reshape(self.n, self.k // 128, 128) @ self.R).reshape(self.n, self.k)

    def params(self) -> list[torch.Tensor]:
        return [self.v, *self.ends]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            for e in self.ends:
                e.clamp_(0.5, 1.0)

    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's basis (rotated back)."""
        if self.ends:
            x = self.w.reshape(self.n, self.k // self.g, self.g)
            hi = x.amax(-1, keepdim=True).clamp(min=0) * self.ends[0]
            lo = x.amin(-1, keepdim=True).clamp(max=0) * self.ends[1]
            s = ((hi - lo) / 15).clamp(min=1e-10)
            s = (s.half().float() - s).detach() + s
            z = round_ste(-lo / s).clamp(0, 15).detach()
            w = ((torch.clamp(round_ste(x / s + self.v.reshape_as(x)) + z, 0, 15) - z) * s).reshape(self.n, self.k)
        else:
            w = (torch.clamp(round_ste(self.base + self.v), 0, 15) - self.z) * self.s
        return self._rotated(w)  # R is symmetric and orthogonal: (W R) R = W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--text", type=Path, action="append", required=True)
    ap.add_argument("--init", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--loss", choices=("normalized", "mse"), default="normalized")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2, help="windows of 512 tokens per step")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (the first of the text)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_bundle_dir(args.checkpoint)
    ids = tokenizer.encode(args.calibration.read_text(), add_special_tokens=False)[:args.tokens]
    windows = torch.tensor(np.array(ids[:len(ids) // WINDOW * WINDOW]).reshape(-1, WINDOW))
    layers = model.model.layers

    captured = {}

    def capture(module, a, kw):
        captured["x"], captured["kw"] = a[0] if a else kw["hidden_states"], kw
        raise StopIteration

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    inputs = []
    for w in windows:
        try:
            model(w[None])
        except StopIteration:
            inputs.append(captured["x"].detach())
    hook.remove()
    kw = {k: v for k, v in captured["kw"].items()
          if k not in ("hidden_states", "past_key_values", "past_key_value", "cache")}
    kw["use_cache"] = False

    def call(layer, x, weights=None):
        out = functional_call(layer, weights, (x,), kw) if weights else layer(x, **kw)
        return out[0] if isinstance(out, tuple) else out

    def chunks(x):
        return [x[i:i + 4] for i in range(0, len(x), 4)]

    x_float = torch.cat(inputs)
    x_quant = x_float.clone()
    start = time.time()
    for li, layer in enumerate(layers):
        with torch.no_grad():
            target = torch.cat([call(layer, c) for c in chunks(x_float)])
        mods = {name: layer.get_submodule(name) for name in LINEARS}
        hessians: dict[str, torch.Tensor] = {}
        if args.init == "gptq":
            def add(name):
                def f(module, a):
                    x = a[0].reshape(-1, a[0].shape[-1]).double()
                    norm = x.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    x = x / norm * norm.median()
                    hessians[name] = hessians.get(name, 0) + x.T @ x
                return f
            hooks = [mods[name].register_forward_pre_hook(add(name)) for name in LINEARS]
            with torch.no_grad():
                for c in chunks(x_quant):
                    call(layer, c)
            for h in hooks:
                h.remove()
        weights = {name: LearnedRounding(m.weight.detach().clone(), name.endswith("down_proj"), args.init,
                                         hessians.get(name)) for name, m in mods.items()}
        params = [p for w in weights.values() for p in w.params()]

        def run(x):
            return call(layer, x, {name + ".weight": w.weight() for name, w in weights.items()})

        def error() -> float:
            with torch.no_grad():
                return float(np.mean([((run(x) - y) ** 2).mean().item()
                                      for x, y in zip(chunks(x_quant), chunks(target))]))

        before, best, best_params = error(), None, None
        for it in range(args.iters):
            pick = torch.randperm(len(windows))[:args.batch]
            diff = run(x_quant[pick]) - target[pick]
            if args.loss == "normalized":
                diff = diff / target[pick].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            loss = diff.pow(2).mean()
            if best is None or loss.item() < best:
                best, best_params = loss.item(), [p.detach().clone() for p in params]
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= (1 - it / args.iters) / args.iters * p.grad.sign()
            for w in weights.values():
                w.clamp_()
        with torch.no_grad():
            for p, b in zip(params, best_params or [p.detach() for p in params]):
                p.copy_(b)
            for name, w in weights.items():
                mods[name].weight.copy_(w.weight())
        after = error()
        with torch.no_grad():
            x_quant = torch.cat([call(layer, c) for c in chunks(x_quant)])
        x_float = target
        print(f"layer {li}: output error {before:.4g} -> {after:.4g} ({time.time() - start:.0f} s)", flush=True)

    def score(window_ids):
        with torch.no_grad():
            return model(torch.tensor(window_ids)[None]).logits[0].numpy()

    for text in args.text:
        result = perplexity(score, tokenizer.encode(text.read_text()), WINDOW, WINDOW // 2)
        print(f"{text}: perplexity {result.perplexity:.4f}", flush=True)


if __name__ == "__main__":
    main()
