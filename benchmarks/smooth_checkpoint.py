"""SmoothQuant's channel scaling applied to a Llama checkpoint, to measure what it is worth
before the compiler does it (BENCHMARKS.md, "Where int8 loses to Q8_0").

    python benchmarks/smooth_checkpoint.py CHECKPOINT OUT --calibration FILE [--alpha 0.5]
        [--tokens 4096] [--skip-chars 0] [--skip-first 0] [--statistic max|rms] [--shrink-only]

For each layer, each input channel j of q/k/v, gate/up and down_proj is divided by
s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) and column j of those weights multiplied by it
(Xiao et al. 2023, "SmoothQuant", eq. 4). The division is folded into the op before: the input
RMSNorm's weight (q/k/v), the post-attention RMSNorm's weight (gate/up) and the rows of up_proj
(down_proj reads silu(gate) * up). So the model is the same in float, and the activations that
llmirc's int8 kernels round in blocks of 32 have no outlier channels. max|x_j| (or with
--statistic rms its root mean square) is taken by transformers (float32) over --tokens tokens
of --calibration, from character --skip-chars on, in windows of 512, leaving out the first
--skip-first tokens of each window (the attention sink). --shrink-only divides s by its median
over the channels and clamps it at 1: no channel is made larger, so a value the calibration
text did not show cannot become a new outlier (the variant that held across calibration
windows). The output is an f32 safetensors checkpoint for `llmirc compile`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def channel_stat(model, ids: list[int], skip_first: int, statistic: str) -> dict[str, torch.Tensor]:
    """max |x_j| (or the root mean square of x_j) over the tokens of the inputs of each layer's
    q_proj, gate_proj and down_proj, but the first `skip_first` tokens of each window."""
    found: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach()[:, skip_first:].reshape(-1, inputs[0].shape[-1])
            found.setdefault(name, []).append(x.abs().amax(0) if statistic == "max" else (x * x).mean(0))
        return record
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(hook(f"{i}.attn"))
        layer.mlp.gate_proj.register_forward_pre_hook(hook(f"{i}.mlp"))
        layer.mlp.down_proj.register_forward_pre_hook(hook(f"{i}.down"))
    with torch.inference_mode():
        for start in range(0, len(ids), 512):
            model(torch.tensor([ids[start:start + 512]]))
    if statistic == "max":
        return {k: torch.stack(v).amax(0) for k, v in found.items()}
    return {k: torch.stack(v).mean(0).sqrt() for k, v in found.items()}


def smoothing(xmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, shrink_only: bool) -> torch.Tensor:
    """s_j for the input channels of `weights` ([n, k] each, one input). shrink_only: relative
    to the median channel, and never below 1 (no channel is made larger than it was)."""
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = xmax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)
    return (s / s.median()).clamp(min=1.0) if shrink_only else s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--skip-chars", type=int, default=0)
    parser.add_argument("--skip-first", type=int, default=0)
    parser.add_argument("--statistic", choices=("max", "rms"), default="max")
    parser.add_argument("--shrink-only", action="store_true")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    text = args.calibration.read_text(encoding="utf-8")[args.skip_chars:]
    xmax = channel_stat(model, tokenizer.encode(text).ids[:args.tokens], args.skip_first, args.statistic)
    state = {k: v.float() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        attn = [state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        s = smoothing(xmax[f"{i}.attn"], attn, args.alpha, args.shrink_only)
        state[p + "input_layernorm.weight"] /= s
        for w in attn:
            w *= s
        mlp = [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
        s = smoothing(xmax[f"{i}.mlp"], mlp, args.alpha, args.shrink_only)
        state[p + "post_attention_layernorm.weight"] /= s
        for w in mlp:
            w *= s
        s = smoothing(xmax[f"{i}.down"], [state[p + "mlp.down_proj.weight"]], args.alpha, args.shrink_only)
        state[p + "mlp.up_proj.weight"] /= s[:, None]
        state[p + "mlp.down_proj.weight"] *= s
    shutil.copytree(args.checkpoint, args.out, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({k: v.contiguous() for k, v in state.items()}, args.out / "model.safetensors")
    config = json.loads((args.out / "config.json").read_text())
    config.update(torch_dtype="float32", dtype="float32")
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {args.out} (alpha {args.alpha}, {args.tokens} calibration tokens)")


if __name__ == "__main__":
    main()
