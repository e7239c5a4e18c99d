"""End-to-end tuning of a quantized bundle's group scales, emulated with torch, to measure what it
is worth before the compiler does it (DESIGN.md, "Learned rounding"; EfficientQAT's E2E-QP in
spirit: Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training for LLMs").

    python benchmarks/tune_scales.py BUNDLE CHECKPOINT --calibration FILE --text FILE [--text FILE ...]
        [--steps 48] [--lr 2e-4] [--batch 2] [--tokens 8192] [--out TUNED_BUNDLE]

BUNDLE is a `llmirc compile CHECKPOINT --quant ...` bundle of that checkpoint (a Llama-shaped model:
q/k/v and gate/up fused, down_proj's input optionally rotated by Hadamard blocks of 128). Its
quantized linears go into transformers' float32 model as (code - zero) * scale, codes and zero
points fixed, each group's scale s0 * exp(t) with t learned (Adam, cosine decay) on the KL
divergence from the float model's next-token distribution, over --tokens tokens of the
calibration file in windows of 512 (float activations: the bundle's int8 activation blocks are
not emulated). Prints the KL on 4 windows of the file just after those tokens every 8 steps, and
the perplexity of each --text before and after (windows of 512, stride 256, as `llmirc eval-ppl
--context 512 --stride 256`). --out writes BUNDLE with the tuned scales (rounded to their stored
dtype; the manifest's sha256 updated) for `llmirc eval-ppl`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llmirc import dtypes, quant
from llmirc.runtime import load
from llmirc.runtime.perplexity import perplexity

WINDOW = 512


class QLinear(torch.nn.Module):
    """A bundle's quantized linear [n, k] (scales and zeros per group of g inputs) with learned scales."""

    def __init__(self, tensors: dict, name: str, scale_dtype: str, k: int):
        super().__init__()
        codes = tensors[name + ".codes"]
        s = dtypes.to_float32(tensors[name + ".scales"], scale_dtype).astype(np.float32)
        self.name, self.scale_dtype, self.g = name, scale_dtype, k // s.shape[1]
        bits = codes.shape[1] * 8 // k
        u = quant.unpack(codes, bits, min(32, self.g), k).astype(np.float32)
        z = tensors.get(name + ".zeros", np.full(s.shape, 2 ** (bits - 1))).astype(np.float32)
        self.register_buffer("u", torch.from_numpy(u))
        self.register_buffer("z", torch.from_numpy(z).repeat_interleave(self.g, dim=1))
        self.register_buffer("s0", torch.from_numpy(s))
        self.t = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.rotate = torch.from_numpy(quant.hadamard(np.eye(128), 128)).float() if "down_proj" in name else None

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def weight(self) -> torch.Tensor:
        return (self.u - self.z) * self.scales().repeat_interleave(self.g, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate is not None:
            x = (x.reshape(*x.shape[:-1], -1, 128) @ self.rotate).reshape(x.shape)
        return F.linear(x, self.weight())


class Rows(torch.nn.Module):
    """Rows [a, b) of a fused quantized linear (q/k/v or gate/up)."""

    def __init__(self, fused: QLinear, a: int, b: int):
        super().__init__()
        self.fused, self.a, self.b = [fused], a, b  # (a list: not a submodule, its t is counted once)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fused[0].weight()[self.a:self.b])


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as NumPy arrays (bfloat16 as its uint16 bits, as llmirc.dtypes)."""
    out = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            out[name] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def quantize_model(student, tensors: dict, stored: dict) -> list[QLinear]:
    """Puts the bundle's quantized linears into `student` in place of its float ones."""
    modules = dict(student.named_modules())
    qlinears = []
    for key in [n.removesuffix(".codes") for n in tensors if n.endswith(".codes")]:
        fused = re.fullmatch(r"(.*)\.\{(.*)\}\.weight", key)
        names = [f"{fused.group(1)}.{c}" for c in fused.group(2).split(",")] if fused else [key.removesuffix(".weight")]
        floats = [modules[n] for n in names]
        q = QLinear(tensors, key, stored[key + ".scales"], floats[0].in_features)
        a = 0
        for n, f in zip(names, floats):
            parent, _, child = n.rpartition(".")
            setattr(modules[parent], child, q if len(names) == 1 else Rows(q, a, a + f.out_features))
            a += f.out_features
        qlinears.append(q)
    return qlinears


def kl(teacher, student, batch: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions (nats)."""
    with torch.no_grad():
        pt = F.log_softmax(teacher(batch).logits.float(), -1)
    ls = F.log_softmax(student(batch).logits.float(), -1)
    return (pt.exp() * (pt - ls)).sum(-1).mean()


def write_bundle(bundle: Path, out: Path, manifest: dict, qlinears: list[QLinear]) -> None:
    """A copy of `bundle` whose scales are the tuned ones, patched in place in its weights file."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    rel = manifest["weights"]["file"]
    data = bytearray((out / rel).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    for q in qlinears:
        a, b = header[q.name + ".scales"]["data_offsets"]
        raw = dtypes.from_float32(q.scales().detach().numpy(), q.scale_dtype).tobytes()
        assert len(raw) == b - a, q.name
        data[8 + n + a:8 + n + b] = raw
    (out / rel).write_bytes(bytes(data))
    for f in manifest["files"]:
        if f["path"] == rel:
            f["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--text", type=Path, action="append", required=True)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-4, help="Adam's learning rate of log(scale)")
    ap.add_argument("--batch", type=int, default=2, help="windows of 512 tokens per step")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    tensors = read_tensors(args.bundle / manifest["weights"]["file"])
    tokenizer = load(args.bundle).tokenizer
    teacher, student = (AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
                        for _ in range(2))
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    qlinears = quantize_model(student, tensors, manifest["weights"]["dtypes"])
    print(f"{len(qlinears)} quantized linears", flush=True)

    def ppl(label: str) -> None:
        def score(ids):
            with torch.no_grad():
                return student(torch.tensor([ids])).logits[0].double().numpy()
        values = [perplexity(score, tokenizer.encode(t.read_text(encoding="utf-8")), WINDOW, WINDOW // 2).perplexity
                  for t in args.text]
        print(f"perplexity {label}: {' '.join(f'{v:.4f}' for v in values)}", flush=True)

    ids = tokenizer.encode(args.calibration.read_text(encoding="utf-8"))
    windows = [ids[i:i + WINDOW] for i in range(0, args.tokens - WINDOW + 1, WINDOW)]
    check = torch.tensor([ids[args.tokens + i * WINDOW:args.tokens + (i + 1) * WINDOW] for i in range(4)])
    ppl("before")
    opt = torch.optim.Adam([q.t for q in qlinears], lr=args.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / args.steps)))
    rng, order, begin = np.random.default_rng(0), [], time.monotonic()
    for step in range(args.steps):
        if step % 8 == 0:
            with torch.no_grad():
                print(f"step {step}: check KL {kl(teacher, student, check).item():.5f}", flush=True)
        order = order or list(rng.permutation(len(windows)))
        batch = torch.tensor([windows[order.pop()] for _ in range(min(args.batch, len(order)))])
        loss = kl(teacher, student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        print(f"step {step}: KL {loss.item():.5f} ({time.monotonic() - begin:.0f} s)", flush=True)
    with torch.no_grad():
        print(f"after: check KL {kl(teacher, student, check).item():.5f}", flush=True)
    ppl("after")
    if args.out:
        write_bundle(args.bundle, args.out, manifest, qlinears)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
