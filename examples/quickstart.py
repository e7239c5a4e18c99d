"""Make a small random Llama checkpoint, compile it with llmirc, run it, compare with transformers.

    python examples/quickstart.py [OUT_DIR]      # default: examples/out beside this file

Needs the dev install (transformers makes the checkpoint: nothing is downloaded).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import hf_greedy, make_checkpoint  # noqa: E402

import llmirc.runtime as rt  # noqa: E402


def main(out: Path) -> None:
    ckpt, bundle = out / "tiny-llama", out / "tiny-llama.llmir"
    reference = make_checkpoint(ckpt, "llama", tokenizer=True, hidden_size=128, num_hidden_layers=4,
                                intermediate_size=384, num_attention_heads=8, num_key_value_heads=2)
    print(f"checkpoint: {ckpt}")

    subprocess.run([sys.executable, "-m", "llmirc.cli", "compile", str(ckpt), "--target", "cpu", "-o", str(bundle)],
                   check=True)
    subprocess.run([sys.executable, "-m", "llmirc.cli", "inspect", str(bundle)], check=True)

    model = rt.load(bundle)
    prompts = [model.tokenizer.encode(p) for p in ("the quick brown fox", "paged attention stores")]
    outputs = model.generate(prompts, max_new_tokens=16, ignore_eos=True)
    for prompt, got in zip(prompts, outputs):
        same = got == hf_greedy(reference, prompt, 16)
        print(f"{model.tokenizer.decode(prompt)!r} -> {model.tokenizer.decode(got)!r} "
              f"({'same tokens as transformers' if same else 'DIFFERS from transformers'})")
    print("streaming:", end=" ", flush=True)
    for delta in model.stream_text(prompts[0], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1):
        print(delta, end="", flush=True)
    print()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out")
