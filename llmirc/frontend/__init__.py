"""Front ends: a Hugging Face checkpoint's config -> a model spec -> the llmir graph."""

from __future__ import annotations

import re
from collections.abc import Callable

from xdsl.dialects.builtin import ModuleOp

from llmirc.small_files import is_gguf

from .decoder import ShapeCheck, build_decoder
from .gpt2 import Gpt2Spec, build_gpt2, parse_gpt2_config
from .hf_config import DecoderSpec, architecture, parse_config

Spec = DecoderSpec | Gpt2Spec


def parse_spec(config: dict, source: str = "config.json") -> Spec:
    _, family = architecture(config, source)
    return parse_gpt2_config(config, source) if family == "gpt2" else parse_config(config, source)


def build_graph(spec: Spec, check: ShapeCheck, has_tensor: Callable[[str], bool], packed=None) -> ModuleOp:
    """`packed(prefix, n, k)`: a quantized matrix the source holds (GPTQ/AWQ linears of Llama-family
    checkpoints, GGUF blocks of any architecture; see build_decoder), else None."""
    if isinstance(spec, Gpt2Spec):
        return build_gpt2(spec, check, has_tensor, packed)
    return build_decoder(spec, check, has_tensor, packed)


def open_source(path, dequantize: bool = False):
    """The compiler's input: a Hugging Face checkpoint directory, an .onnx file or a .gguf file; or, from
    the Hugging Face hub's cache, a repository id ORG/NAME or its folder `models--ORG--NAME` (the snapshot
    refs/main names; `checkpoint.hub_snapshot`).

    dequantize: expand quantized tensors (GGUF blocks) to float32 instead of refusing them."""
    from pathlib import Path

    from llmirc.errors import CheckpointError

    from .checkpoint import hub_repo_id, hub_snapshot

    path = Path(path)
    if not path.exists():  # perhaps a Hugging Face repository id, ORG/NAME, in the hub's cache
        repo_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None
        if not repo_id or (snapshot := hub_snapshot(str(path))) is None:
            raise CheckpointError(f"{path}: no such file or directory" + (
                ", nor a model in the Hugging Face hub's cache (llmirc downloads nothing: `hf download "
                f"{path}` first)" if repo_id else ""))
        path = snapshot
    elif (real := path.resolve()).name.startswith("models--") and (real / "snapshots").is_dir() and \
            not (real / "config.json").exists():  # (given as '.' or through a link of another name too)
        if (snapshot := hub_snapshot(hub_repo_id(real), real.parent)) is None:
            some = sorted(p for p in (real / "snapshots").iterdir() if p.is_dir())[:1]
            raise CheckpointError(f"{path}: a Hugging Face hub cache folder whose refs/main names no snapshot there "
                                  "(what from_pretrained loads): compile a snapshot folder"
                                  + (f", e.g. {some[0]}" if some else " (it has none)"))
        path = snapshot
    if path.is_file() and path.suffix == ".onnx":
        from .onnx_import import OnnxCheckpoint

        return OnnxCheckpoint(path)
    if is_gguf(path):
        from .gguf_checkpoint import GgufCheckpoint

        return GgufCheckpoint(path, dequantize=dequantize)
    if path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (config.json + safetensors), "
                              "an .onnx file nor a .gguf file")
    ggufs = sorted(p.name for p in path.glob("*.gguf")) if not (path / "config.json").exists() else []
    if ggufs:  # a folder as llama.cpp's models come (a Hugging Face repository of GGUF files)
        raise CheckpointError(f"{path}: a folder of GGUF files ({', '.join(ggufs[:3])}{', ...' * (len(ggufs) > 3)}), "
                              f"not a checkpoint (no config.json): compile one file, e.g. {path / ggufs[0]}")
    weights = ("model.safetensors", "model.safetensors.index.json")
    onnx_files = sorted(p.name for p in path.glob("*.onnx")) if not any((path / w).exists() for w in weights) else []
    if onnx_files:  # onnxruntime-genai's builder output (genai_config.json + model.onnx), an optimum export
        first = "model.onnx" if "model.onnx" in onnx_files else onnx_files[0]
        raise CheckpointError(f"{path}: a folder of ONNX models ({', '.join(onnx_files[:3])}"
                              f"{', ...' * (len(onnx_files) > 3)}), not a safetensors checkpoint: compile one file, "
                              f"e.g. {path / first}")
    from .checkpoint import Checkpoint

    return Checkpoint(path)
