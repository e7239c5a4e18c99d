"""A Hugging Face checkpoint directory: config.json + safetensors (single or sharded) + tokenizer.

Tensors are memory-mapped and read one at a time, so compiling never holds the checkpoint
twice. Shard paths from the index must stay inside the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from llmirc import dtypes
from llmirc.artifact_format.safetensors import SafetensorsFile, open_safetensors
from llmirc.errors import CheckpointError
from llmirc.small_files import parse_json, present, present_small_files, read_small_text

from . import build_graph, parse_spec
from .context import Limit
from .hf_config import DecoderSpec, for_context, load_config, text_config
from .packed import PackedLinears, parse_quantization_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
# Tensors a checkpoint may hold that transformers leaves unused too: buffers some exports save (the
# rotary inverse frequencies, GPT-2's causal mask). (A tied LM head's copy of the embedding is another.)
EXPECTED_UNUSED = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
# A multimodal checkpoint's text model (hf_config.text_config): its tensors' prefix and LM head, as transformers
# 5 saves them, then as transformers 4.50 saved them (the Hub's gemma-3-4b-it and larger)
TEXT_MODEL_NAMES = (("model.language_model.", "lm_head"), ("language_model.model.", "language_model.lm_head"))
# Tokenizer files of other formats, which llmirc does not read (it reads tokenizer.json only).
OTHER_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                         "vocab.txt", "added_tokens.json", "tokenizer.tiktoken", "qwen.tiktoken")


def tokenizer_files(root: Path) -> list[Path]:
    """The tokenizer files of a checkpoint's folder that a bundle carries."""
    return carried_files(root, [root / n for n in TOKENIZER_FILES])


def carried_files(root: Path, paths: list[Path]) -> list[Path]:
    """Those of `paths` (small files of the checkpoint folder `root` that the bundle carries as they are:
    config.json, generation_config.json, tokenizer files) that are there, each checked by
    check_small_file and, symlinks followed, lying where a shard may (`checkpoint_area`): a link of a
    downloaded or cloned checkpoint to a file of the user's (chat_template.jinja -> ~/.netrc) would put that
    file into a bundle that may then be shared. Raises CheckpointError naming the file."""
    found = present_small_files(paths, CheckpointError)
    area = checkpoint_area(root)
    for path in found:
        if not path.resolve().is_relative_to(area):
            raise CheckpointError(f"{path}: a link leading outside the checkpoint's folder (to {path.resolve()}); "
                                  "the bundle would carry that file: copy it into the folder instead")
    return found


def missing_tokenizer_note(root: Path) -> str | None:
    """One line when `root` has no tokenizer.json (the bundle then takes token ids only), naming the
    tokenizer files found there that llmirc does not read; None when there is one. `root` a file
    (GGUF, whose tokenizer is its tokenizer.ggml.* metadata): one line saying it has none."""
    if root.is_file():
        return f"{root} holds no tokenizer (tokenizer.ggml.*): the bundle has no tokenizer and takes token ids only"
    if (root / "tokenizer.json").is_file():
        return None
    others = [n for n in OTHER_TOKENIZER_FILES + TOKENIZER_FILES[1:] if (root / n).is_file()]
    found = f"; found but not used: {', '.join(others)} (llmirc reads tokenizer.json: write one with " \
        "transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))" if others else ""
    return f"no tokenizer.json in {root}: the bundle has no tokenizer and takes token ids only{found}"


def finite(where, name: str, data: np.ndarray, stored: str) -> np.ndarray:
    """data, unless some of its values are NaN or infinite: CheckpointError naming the file and
    tensor (a corrupt or diverged checkpoint; llama.cpp's loader refuses such rows too,
    ggml_validate_row_data). `stored`: the data's dtype (bf16 as uint16 bits)."""
    bad = dtypes.count_nonfinite(data, stored)
    if bad:
        raise CheckpointError(f"{where}: tensor '{name}' holds {bad} NaN or infinite value{'s' * (bad > 1)} "
                              f"(of {data.size}): the checkpoint is corrupt")
    return data


def hub_repository(folder: Path) -> Path | None:
    """The repository folder `models--ORG--NAME` of the Hugging Face hub's cache when `folder` (symlinks
    followed) is one of its snapshots, `models--ORG--NAME/snapshots/REVISION/` (each file there a symlink
    to `../../blobs/HASH`: the layout huggingface_hub's `snapshot_download` writes); else None."""
    real = folder.resolve()
    return real.parent.parent if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--") \
        else None


def checkpoint_area(root: Path) -> Path:
    """The folder that the files a checkpoint in `root` names (safetensors shards, ONNX external data)
    may lie in once symlinks are followed: `root` itself, or the hub repository's folder of a snapshot."""
    return hub_repository(root) or root.resolve()


def source_name(root: Path) -> str:
    """A source's name for the manifest: a file's own name (a GGUF file in the hub's cache is a symlink
    to a blob named by its hash), a folder's, or `ORG/NAME` for a snapshot of the hub's cache."""
    path = Path(os.path.abspath(root))  # ('.' and '..' resolved, symlinks not)
    repo = hub_repository(path) if path.is_dir() else None
    return hub_repo_id(repo) if repo else path.name


def hub_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The snapshot folder of the Hugging Face hub repository `repo_id` ("ORG/NAME") in a hub cache (`cache`,
    else huggingface_hub's own: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub): the revision
    its refs/main names, what transformers' from_pretrained("ORG/NAME") loads offline. Nothing is downloaded
    (huggingface_hub's snapshot_download with local_files_only). None when it is not there."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (ImportError, OSError, ValueError):  # (not in the cache; not a repository id)
        return None
    return folder if hub_repository(folder) is not None else None


def hub_repo_id(repo: Path) -> str:
    """ORG/NAME of a hub cache repository folder `models--ORG--NAME` (huggingface_hub's folder name)."""
    return repo.name.removeprefix("models--").replace("--", "/", 1)


class Checkpoint:
    """A source of the compiler (see frontend.open_source): graph, weights, tokenizer, facts."""

    kind = "hf-safetensors"
    lowering = ""  # the front end emits llmir directly
    summary = ""

    def __init__(self, root: Path):
        self.root = root
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a checkpoint directory")
        self.config_path = root / "config.json"
        self.config = load_config(self.config_path)
        self.config_files()  # (refused before the compile, not when the bundle is written)
        text = text_config(self.config, str(self.config_path))
        self.spec = parse_spec(text or self.config, str(self.config_path))
        self.quantization = parse_quantization_config(self.config, str(self.config_path))
        if self.quantization and self.spec.architecture == "GPT2LMHeadModel":
            raise CheckpointError(f"{self.config_path}: {self.quantization['method']} checkpoints of GPT-2 are "
                                  "not supported")
        self.summary = f"{self.quantization['method']} {self.quantization['bits']}-bit" if self.quantization else ""
        self._files: dict[Path, SafetensorsFile] = {}
        self._where = self._index()  # tensor name -> shard path
        self._used: set[str] = set()  # the tensors looked at so far (_file)
        self.other_modalities: list[str] = []  # a multimodal checkpoint's tensors outside its text model
        if text is not None:
            self.config = text
            self._text_model()

    def _text_model(self) -> None:
        """A multimodal checkpoint compiled as its text model: the decoder's tensors under their prefix,
        the image model's left out (and said so)."""
        for prefix, head in TEXT_MODEL_NAMES:
            if f"{prefix}embed_tokens.weight" in self._where:
                self.spec = dataclasses.replace(self.spec, tensor_prefix=prefix, lm_head=head)
                self.other_modalities = sorted(n for n in self._where if not n.startswith((prefix, head + ".")))
                self.summary = ", ".join(filter(None, [self.summary, f"text model only ({len(self.other_modalities)} "
                                                                     "tensors of the image model left out)"]))
                return
        raise CheckpointError(f"{self.root}: a multimodal checkpoint without its text model's embedding "
                              f"({' or '.join(p + 'embed_tokens.weight' for p, _ in TEXT_MODEL_NAMES)})")

    def _index(self) -> dict[str, Path]:
        single, index = self.root / "model.safetensors", self.root / "model.safetensors.index.json"
        if present(index):
            try:
                data = parse_json(read_small_text(index, CheckpointError))
                weight_map = data["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            return {name: self._inside(index, shard) for name, shard in weight_map.items()}
        if present(single):
            if not single.is_file():
                raise CheckpointError(f"{single}: not a regular file")
            f = self._files[single] = self._open(single)  # (kept open: its header is parsed once)
            return {name: single for name in f.names()}
        if any((self.root / p).exists() for p in PICKLE_FILES):
            raise CheckpointError(f"{self.root}: only pickle-based PyTorch weights found; llmirc reads safetensors "
                                  "only (pickles can run code): convert the checkpoint to safetensors")
        raise CheckpointError(f"{self.root}: no model.safetensors or model.safetensors.index.json")

    def _inside(self, index: Path, shard: object) -> Path:
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index}: shard path {shard!r} leaves the checkpoint directory")
        path = (self.root / shard).resolve()
        if not path.is_relative_to(checkpoint_area(self.root)):
            raise CheckpointError(f"{index}: shard path {shard!r} leaves the checkpoint directory")
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing")
        return path

    @staticmethod
    def _open(path: Path) -> SafetensorsFile:
        return open_safetensors(path, error_cls=CheckpointError)

    def _file(self, name: str) -> SafetensorsFile:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.root}: tensor '{name}' is missing from the checkpoint")
        if path not in self._files:
            self._files[path] = self._open(path)
        f = self._files[path]
        if name not in f:  # (not f.names(): a list of every name, built per tensor looked at)
            raise CheckpointError(f"{path}: tensor '{name}' listed in the index is not in the file")
        self._used.add(name)
        return f

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).info(name)[1])

    def dtype(self, name: str) -> str:
        return self._file(name).info(name)[0]

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a zero-copy view of the mapped file when it is stored as F32)."""
        f = self._file(name)
        dtype = f.info(name)[0]
        if dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{self._where[name]}: tensor '{name}' has dtype {dtype}; "
                                  "weights must be F32, F16 or BF16")
        return finite(self._where[name], name, f.as_float32(name), "float32")

    def use_context(self, max_model_len: int | None) -> None:
        """The model for a bundle of `max_model_len` tokens (--max-model-len; None: the one the source
        states): longrope's long factors past original_max_position_embeddings (hf_config.for_context).
        Called before module()."""
        if isinstance(self.spec, DecoderSpec):
            self.spec = for_context(self.spec, max_model_len)

    def module(self):
        packed = None
        if self.quantization:
            linears = PackedLinears(self.quantization, self.read, lambda n: self._file(n).info(n), self.has,
                                    str(self.root))
            packed = linears.weight
        return build_graph(self.spec, self._check_shape, self.has, packed)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> str:
        actual = self.shape(name)
        if tuple(actual) != tuple(shape):
            raise CheckpointError(f"{self.root}: tensor '{name}' has shape {list(actual)}, "
                                  f"config.json implies {list(shape)}")
        stored = self.dtype(name)
        if stored not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{self._where[name]}: tensor '{name}' has dtype {stored}; "
                                  "weights must be F32, F16 or BF16")
        return dtypes.dtype(stored).name

    def add_weight(self, name: str, value: np.ndarray) -> None:
        raise AssertionError("the Hugging Face front end synthesizes no weights")

    def unused_tensors(self) -> list[str]:
        """After module(): the checkpoint's tensors the graph does not use, sorted, leaving out those
        transformers ignores too (EXPECTED_UNUSED; a tied model's lm_head.weight). A checkpoint
        whose config.json leaves out a feature its tensors have (biases, say) shows here."""
        tied, head = self.spec.tie_word_embeddings, getattr(self.spec, "lm_head", "lm_head")
        skip = set(self.other_modalities)  # (said in the summary)
        return sorted(n for n in self._where if n not in self._used and not n.endswith(EXPECTED_UNUSED)
                      and not (tied and n == f"{head}.weight") and n not in skip)

    def model_info(self) -> dict:
        """Facts from config.json that the graph does not hold (`context`: the one it states)."""
        s = self.spec
        key = "n_positions" if s.architecture == "GPT2LMHeadModel" else "max_position_embeddings"
        # longrope's short factors hold up to original_max_position_embeddings (DecoderSpec.rope_context)
        rope = [Limit(s.rope_context, "rope type 'longrope': its short factors, up to "
                      "original_max_position_embeddings; a --max-model-len past it takes the long ones")] \
            if getattr(s, "rope_context", None) else []
        return {"architecture": s.architecture, "position_tables": rope,
                "context": Limit(s.max_position_embeddings, f"config.json {key}" + ("" if key in self.config else
                                                                                     " (its default)")),
                "bos_token_id": s.bos_token_id, "eos_token_ids": list(s.eos_token_ids),
                "pad_token_id": s.pad_token_id}

    def config_files(self) -> list[Path]:
        return carried_files(self.root, [self.config_path, self.root / "generation_config.json"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (a zero-copy view of the mapped file; BF16 as uint16 bits); a float
        tensor holding NaN or infinite values: CheckpointError."""
        f = self._file(name)
        stored = f.info(name)[0]
        data = f.array(name)
        return finite(self._where[name], name, data, stored) if stored in ("F32", "F16", "BF16") else data

    def drop_pages(self) -> None:
        """Releases the mapped pages read so far (the bundle writer streams the weights through)."""
        for f in self._files.values():
            f.drop_pages()

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files(self.root)

    def generation_config(self) -> dict:
        path = self.root / "generation_config.json"
        return load_config(path) if present(path) else {}

    def fingerprint(self) -> str:
        """sha256 over config.json and each shard's name, size and first 64 KiB (its header).

        Cheap identification of the source; the bundle's own weights carry full checksums."""
        h = hashlib.sha256(self.config_path.read_bytes())
        for path in sorted(set(self._where.values())):
            h.update(os.fsencode(path.name))
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 16))
        return h.hexdigest()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
