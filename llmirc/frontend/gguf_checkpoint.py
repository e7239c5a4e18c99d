"""A GGUF file (llama.cpp's format) as a compiler source, read with the `gguf` package.

The metadata (`{arch}.embedding_length`, `.block_count`, `.attention.head_count(_kv)`,
`.rope.freq_base`, ...) becomes the Hugging Face config those keys were written from (llama.cpp's
`convert_hf_to_gguf.py` and `llama-model.cpp` define the keys; transformers' GGUF loader maps them
the same way), and that config goes through the same validated parser as a checkpoint's
config.json, so the graph is the one the safetensors front end builds. GGUF tensor names map to
the Hugging Face names the graph builders use (`token_embd.weight` -> `model.embed_tokens.weight`,
`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...).

llama-family files: `convert_hf_to_gguf.py` permutes the rows of q and k (and their biases) in
each head from the half-split rotary layout to llama.cpp's interleaved one. This source undoes
that permutation on read, so the weights are the Hugging Face ones and the graph keeps the
half-split (`neox`) rope; Qwen2 and GPT-2 files are not permuted. GPT-2 projections are stored
[out, in] (convert transposes the Conv1D weights), which the graph reads without a transpose.
Llama-3 rope scaling arrives as the `rope_freqs.weight` tensor (per-frequency divisors), folded
into the rotary frequencies.

A model split by gguf-split (`NAME-00001-of-0000N.gguf`, ...) is read from its first file, which holds
the metadata; the other files' tensors join it (_open_splits), as llama.cpp loads them.

Tensor types: F32/F16/BF16 tensors keep their type (`read` returns them as stored, like safetensors
weights; `--dtype` can still cast them). The block-quantized formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) are kept quantized: their matrices (linears, the
embedding, the LM head) enter the graph as `llmir.packed_weight` of the `!llmir.quant` type each
format is repacked into losslessly (frontend/packed.py says which, per format), and `read(name)`
returns `gguf_quants.unpack` of the blocks (the q/k row un-permutation moves whole rows, so it
applies unchanged). With `dequantize=True` (`llmirc compile --dequantize`) they are expanded to
float32 with `gguf_quants.dequantize` instead. Quantized vectors (biases, norms) are refused unless
dequantizing. The formats llmirc has no layout for (IQ1-IQ3, TQ1_0, TQ2_0, MXFP4: FLOAT_ONLY) are
read with `--dequantize` only, expanded by the gguf package's own dequantizer
(`gguf.quants.dequantize`); without it they are refused by name, with that way out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import traceback
from pathlib import Path

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from llmirc import dialect as L
from llmirc import dtypes
from llmirc.errors import CheckpointError
from llmirc.scratch import scratch_dir

from . import build_graph, parse_spec
from .checkpoint import Checkpoint, finite
from .context import Limit
from .gguf_quants import FORMATS, Unpacked, dequantize, unpack
from .packed import gguf_qtype
from .gguf_tokenizer import EOG_TEXTS, build_tokenizer, fim_tokens

SPLIT_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")  # gguf-split's file names (NAME-00001-of-00003.gguf)


def split_part(first: Path, i: int, count: int) -> Path:
    """File i (from 0) of `count` of the split model whose first file is `first` (named as SPLIT_NAME)."""
    return first.with_name(f"{SPLIT_NAME.fullmatch(first.name)[1]}-{i + 1:05d}-of-{count:05d}.gguf")


def split_files(path: Path) -> list[Path]:
    """The files of a gguf-split model that `path` names as its first (path itself for any other
    name; the others that exist, by name only: the reader checks their split.* metadata)."""
    name = SPLIT_NAME.fullmatch(path.name)
    if name is None or int(name[2]) != 1:
        return [path]
    return [path] + [p for i in range(1, int(name[3])) if (p := split_part(path, i, int(name[3]))).is_file()]


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
GEMMA = ("gemma2", "gemma3")
PERMUTED = ("llama", "smollm3")  # convert_hf_to_gguf's LlamaModel and its subclasses permute q and k
ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # phi3's longrope, one factor per frequency
FLOAT_TYPES = {GGMLQuantizationType.F32: "F32", GGMLQuantizationType.F16: "F16", GGMLQuantizationType.BF16: "BF16"}
STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # -> llmirc.dtypes names
# Block formats read only as float32 (--dequantize), by gguf.quants.dequantize: no llmirc layout keeps them.
FLOAT_ONLY = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4")
_MISSING = object()

# llama.cpp's end-of-generation tokens besides eos/eot/eom: those named as EOG_TEXTS says (gguf_tokenizer), and
# the FIM pad/repo/separator tokens (gguf_tokenizer.fim_tokens: the file's ids, or found by their texts).
FIM_EOG = ("fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id")

# Keys that change the math of these architectures in llama.cpp, with the value that does not.
_NEUTRAL = {"attention.scale": None, "logit_scale": 1.0, "attention.clamp_kqv": 0.0, "attention.max_alibi_bias": 0.0,
            "expert_count": 0, "attention.causal": True, "attention.sliding_window": 0,
            "use_parallel_residual": False, "rope.dimension_sections": None}


def _layer_names(arch: str, i: int) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, for block i."""
    g = f"blk.{i}"
    if arch == "gpt2":
        p = f"transformer.h.{i}"
        pairs = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        return {f"{p}.{hf}.{kind}": f"{g}.{gg}.{kind}" for hf, gg in pairs.items() for kind in ("weight", "bias")}
    p = f"model.layers.{i}"
    names = {f"{p}.input_layernorm.weight": f"{g}.attn_norm.weight",
             f"{p}.post_attention_layernorm.weight": f"{g}.ffn_norm.weight"}
    if arch in GEMMA:  # its post_attention_layernorm is on the attention's output; the MLP's are pre and post
        names |= {f"{p}.post_attention_layernorm.weight": f"{g}.post_attention_norm.weight",
                  f"{p}.pre_feedforward_layernorm.weight": f"{g}.ffn_norm.weight",
                  f"{p}.post_feedforward_layernorm.weight": f"{g}.post_ffw_norm.weight"}
    pairs = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"} if arch == "phi3" else {  # (phi3: fused q/k/v and gate/up, as in HF)
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
    for hf, gg in pairs.items():
        for kind in ("weight", "bias"):
            names[f"{p}.{hf}.{kind}"] = f"{g}.{gg}.{kind}"
    if arch in ("qwen3", "gemma3"):
        names |= {f"{p}.self_attn.q_norm.weight": f"{g}.attn_q_norm.weight",
                  f"{p}.self_attn.k_norm.weight": f"{g}.attn_k_norm.weight"}
    return names


def _global_names(arch: str) -> dict[str, str]:
    if arch == "gpt2":
        return {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                "lm_head.weight": "output.weight"}
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def _why_unreadable(path: Path, e: Exception) -> str:
    """Words for the gguf reader's failure on `path`: it raises numpy's and its own assorted
    exceptions (ValueError, IndexError, KeyError, ...) on malformed input."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "it is empty"
    if head[:4] != b"GGUF":
        return f"it begins with {head[:4]!r}, not with GGUF's magic b'GGUF'"
    if "version" in str(e):
        return f"GGUF version {int.from_bytes(head[4:8], 'little')}, which the gguf reader cannot read"
    if "Invalid alignment" in str(e):
        return "its general.alignment is not a power of two"
    unknown = re.fullmatch(r"(?:np\.uint32\()?(\d+)\)? is not a valid GGMLQuantizationType", str(e))
    if unknown:
        return f"a tensor has type id {unknown[1]}, which the gguf reader does not know"
    if "is not a multiple of" in str(e) and "block size" in str(e):  # a row cut inside a block
        return f"a tensor's rows are not a whole number of blocks: {e}"
    if any(frame.name == "_build_tensors" for frame in traceback.extract_tb(e.__traceback__)):
        return f"a tensor's data runs past the end of the file ({path.stat().st_size} bytes): truncated?"
    return f"its header (metadata and tensor table) is truncated or corrupt; the file has {path.stat().st_size} bytes"


# GGUF metadata value types (gguf.GGUFValueType): the size of each scalar; 8 is a string, 9 an array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_ARRAY_DEPTH = 8  # arrays of arrays (real files have none)
# Metadata array items in all: the gguf reader parses about a million a minute on a 2-core host. Real files hold
# under a million (a 262k vocabulary's tokens, scores and types; merges).
_MAX_ARRAY_ITEMS = 1 << 22


def layout_problem(path: Path) -> str | None:
    """Why the header of the GGUF file at `path` (version 2 or 3; the gguf reader judges others) cannot
    be read within the file, or None: every count and length it declares must fit in the bytes that
    follow it, as llama.cpp's gguf reader checks them. The gguf package's reader trusts them: an array
    declaring 2**63 one-byte items at the end of a 94-byte file had it loop without end, its memory
    growing (1.7 GB in 30 s). Raises OSError when the file cannot be read."""
    import mmap
    import struct

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            return None  # the reader names what is wrong with it
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                return None
            order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"  # as the reader decides
            if struct.unpack_from(order + "I", data, 4)[0] not in (2, 3):
                return None
            tensors, kvs = struct.unpack_from(order + "QQ", data, 8)
            pos, items = 24, 0

            def need(n: int, what: str) -> None:
                if n > size - pos:
                    raise _Overrun(f"{what} needs {n} bytes at byte {pos}, past the end of the file ({size} bytes)")

            def number(fmt: str, what: str) -> int:
                nonlocal pos
                need(struct.calcsize(fmt), what)
                (value,) = struct.unpack_from(order + fmt, data, pos)
                pos += struct.calcsize(fmt)
                return value

            def string(what: str) -> str:
                nonlocal pos
                n = number("Q", what)
                need(n, what)
                pos += n
                return bytes(data[pos - n:pos - n + min(n, 60)]).decode("utf-8", "replace")

            def value(kind: int, what: str, depth: int) -> None:
                nonlocal pos, items
                if kind in _SCALAR_BYTES:
                    need(_SCALAR_BYTES[kind], what)
                    pos += _SCALAR_BYTES[kind]
                elif kind == 8:
                    string(what)
                elif kind == 9 and depth < _MAX_ARRAY_DEPTH:
                    item, count = number("I", what), number("Q", what)
                    need(count * _SCALAR_BYTES.get(item, 8 if item == 8 else 12), f"{what} ({count} items)")
                    items += count  # (strings take 8 bytes at least, arrays 12)
                    if items > _MAX_ARRAY_ITEMS:
                        raise _Overrun(f"{what} takes the metadata's arrays past {_MAX_ARRAY_ITEMS} items in all "
                                       "(a real model's hold under a million)")
                    if item in _SCALAR_BYTES:
                        pos += count * _SCALAR_BYTES[item]
                    else:
                        for _ in range(count):
                            value(item, what, depth + 1)
                else:
                    raise _Overrun(f"{what} has value type {kind}" + (", arrays nested too deeply" if kind == 9 else
                                                                       ", which GGUF does not define"))

            try:
                need(kvs * 13, f"a metadata key count of {kvs}")  # a key's length, its type and a byte at least
                for i in range(kvs):
                    key = string(f"metadata key {i}")
                    value(number("I", f"metadata key {key!r}"), f"the value of metadata key {key!r}", 0)
                need(tensors * 24, f"a tensor count of {tensors}")  # a name's length, dimensions, type, offset
                for i in range(tensors):
                    name = string(f"the name of tensor {i}")
                    dims = number("I", f"tensor {name!r}")
                    need(dims * 8 + 12, f"tensor {name!r} ({dims} dimensions)")
                    pos += dims * 8 + 12
                    (offset,) = struct.unpack_from(order + "Q", data, pos - 8)
                    if offset > size:  # (the reader adds it to where the data begins: 2**64 - 8 wrapped around)
                        raise _Overrun(f"tensor {name!r} has its data at offset {offset}, past the end of the file "
                                       f"({size} bytes)")
            except _Overrun as e:
                return f"its header (metadata and tensor table) is truncated or corrupt: {e}"
    return None


class _Overrun(Exception):
    pass


def _check_layout(path: Path) -> None:
    """CheckpointError naming `path` and the problem when `layout_problem` finds one."""
    try:
        problem = layout_problem(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    if problem:
        raise CheckpointError(f"{path}: not a readable GGUF file: {problem}")


class GgufCheckpoint:
    """A source of the compiler (see frontend.open_source) reading one .gguf file."""

    kind = "gguf"
    lowering = ""  # the front end emits llmir directly

    def __init__(self, path: Path, dequantize: bool = False):
        self.root = self.path = path
        self.dequantize = dequantize
        self._tmp: Path | None = None
        _check_layout(path)
        try:
            self._reader = GGUFReader(path, "r")
            self.meta = {k: f.contents() for k, f in self._reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:  # noqa: BLE001 (third-party parser of untrusted input)
            raise CheckpointError(f"{path}: not a readable GGUF file: {_why_unreadable(path, e)}") from None
        self._readers = {path: self._reader}  # the files of a split model (_open_splits), the first given
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._used: set[str] = set()  # the tensors looked at so far (_gguf_name, _stored, _packed)
        self._open_splits()
        self._check_bounds()
        self.arch = self._get("general.architecture", str)
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(f"{path}: unsupported GGUF architecture {self.arch!r} "
                                  f"(llmirc reads {', '.join(ARCHITECTURES)})")
        self._names = _global_names(self.arch)
        layers = self._get(f"{self.arch}.block_count", int)
        if not 0 < layers <= len(self._tensors):
            raise CheckpointError(f"{path}: {self.arch}.block_count {layers} does not fit the file's "
                                  f"{len(self._tensors)} tensors")
        for i in range(layers):
            self._names.update(_layer_names(self.arch, i))
        known = set(self._names.values()) | {"llama": {"rope_freqs.weight"}, "phi3": set(ROPE_FACTORS)}.get(
            self.arch, set())
        unexpected = sorted(set(self._tensors) - known)
        if unexpected:
            raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not part of a {self.arch} model llmirc knows"
                                  + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        quantized = [n for n in self._tensors if self._type_name(n) not in FLOAT_TYPES.values()]
        for name in quantized:
            kind = self._type_name(name)
            if kind in FLOAT_ONLY and not dequantize:
                raise CheckpointError(f"{path}: tensor '{name}' has type {kind}, which llmirc cannot keep quantized "
                                      f"(it keeps {', '.join(FORMATS)}): compile with --dequantize to expand it to "
                                      "float32")
            if kind not in FORMATS and kind not in FLOAT_ONLY:
                raise CheckpointError(f"{path}: tensor '{name}' has type {kind}, which llmirc cannot read (readable: "
                                      f"{', '.join(list(FLOAT_TYPES.values()) + list(FORMATS))}, and with "
                                      f"--dequantize {', '.join(FLOAT_ONLY)})")
        self.tokenizer, self.tokenizer_config = (build_tokenizer(self.meta, str(path))
                                                 if "tokenizer.ggml.model" in self.meta else (None, None))
        self.config = self._hf_config()
        self.spec = parse_spec(self.config, str(path))
        if self.arch == "gpt2":
            self.spec = dataclasses.replace(self.spec, conv1d_weights=False)
        elif self.arch in GEMMA:  # (convert_hf_to_gguf stores Gemma's norm weights as 1 + w)
            self.spec = dataclasses.replace(self.spec, norm_offset=0.0)
        elif "rope_freqs.weight" in self._tensors:
            self.spec = dataclasses.replace(self.spec, rope=self._rope_freqs(self.spec.rope))
        types = sorted({self._type_name(n) for n in self._tensors})
        self.summary = f"{self.arch}, tensors {'/'.join(types)}" + (
            (", dequantized to float32" if dequantize else ", kept quantized") if quantized else "")

    # -- reading the file ---------------------------------------------------------------------

    def _open_splits(self) -> None:
        """A model split by llama.cpp's gguf-split (`NAME-00001-of-0000N.gguf`, `split.count` N): the
        other files' tensors join the first's, as llama.cpp loads them given the first file. The
        metadata is the first file's (the others hold only `split.*`)."""
        count, no = self.meta.get("split.count", 1), self.meta.get("split.no", 0)
        if count == 1:
            return
        name = SPLIT_NAME.fullmatch(self.path.name)
        if not isinstance(count, int) or not isinstance(no, int) or not 0 <= no < count:
            raise CheckpointError(f"{self.path}: split.no {no!r} of split.count {count!r} is not a split of a model")
        if name is None or (int(name[2]), int(name[3])) != (no + 1, count):
            raise CheckpointError(f"{self.path}: split {no + 1} of {count} of a model split by gguf-split, not named "
                                  f"as one (NAME-{no + 1:05d}-of-{count:05d}.gguf), so its other files cannot be found")
        if no != 0:
            raise CheckpointError(f"{self.path}: split {no + 1} of {count} of a model split by gguf-split: compile "
                                  f"the first, {name[1]}-00001-of-{count:05d}.gguf (it reads the others)")
        for i in range(1, count):
            part = split_part(self.path, i, count)
            if not part.is_file():
                raise CheckpointError(f"{self.path}: split {i + 1} of {count} of the model, {part.name}, is missing")
            _check_layout(part)
            try:
                reader = GGUFReader(part, "r")
            except Exception as e:  # noqa: BLE001 (third-party parser of untrusted input)
                raise CheckpointError(f"{part}: not a readable GGUF file: {_why_unreadable(part, e)}") from None
            fields = {k: reader.fields[k].contents() for k in ("split.no", "split.count") if k in reader.fields}
            if fields != {"split.no": i, "split.count": count}:
                raise CheckpointError(f"{part}: its split.no and split.count are {fields}, not split {i + 1} of "
                                      f"{count} as its name says")
            self._readers[part] = reader
            for t in reader.tensors:
                if t.name in self._tensors:
                    raise CheckpointError(f"{part}: tensor {t.name!r} is in another split of the model too")
                self._tensors[t.name] = t
        declared = self.meta.get("split.tensors.count")
        if declared is not None and declared != len(self._tensors):
            raise CheckpointError(f"{self.path}: split.tensors.count is {declared!r}, but the {count} splits hold "
                                  f"{len(self._tensors)} tensors")

    def _check_bounds(self) -> None:
        """Every tensor's data aligned, inside its file and not overlapping another's."""
        for path, reader in self._readers.items():
            size, end, previous = path.stat().st_size, 0, None
            for t in sorted(reader.tensors, key=lambda t: t.data_offset):
                if t.data_offset % reader.alignment or t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                    raise CheckpointError(f"{path}: tensor {t.name!r} data (offset {t.data_offset}, {t.n_bytes} "
                                          f"bytes) is misaligned or past the end of the file ({size} bytes)")
                if t.data_offset < end:
                    raise CheckpointError(f"{path}: tensor {t.name!r} data overlaps tensor {previous!r}")
                end, previous = t.data_offset + t.n_bytes, t.name

    def _get(self, key: str, kind: type, default=_MISSING):
        value = self.meta.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is missing")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array with one value
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.path}: metadata key '{key}' must be {kind.__name__}, got {value!r}"[:300])
        return value

    def _type_name(self, gguf_name: str) -> str:
        t = GGMLQuantizationType(self._tensors[gguf_name].tensor_type)
        return FLOAT_TYPES.get(t) or t.name

    def _hf_config(self) -> dict:
        """The Hugging Face config.json this file's metadata stands for."""
        a, get = self.arch, self._get
        if "token_embd.weight" not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        vocab = self.shape_of("token_embd.weight")[0]
        declared = get(f"{a}.vocab_size", int, vocab)
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if declared != vocab or (isinstance(tokens, list) and len(tokens) > vocab):
            raise CheckpointError(f"{self.path}: token_embd.weight has {vocab} rows but {a}.vocab_size is {declared}"
                                  + (f" and the tokenizer has {len(tokens)} tokens" if tokens else ""))
        for key, neutral in _NEUTRAL.items():
            if a in ("phi3", *GEMMA) and key == "attention.sliding_window":  # (read below)
                continue
            value = self.meta.get(f"{a}.{key}")
            if value is not None and value != neutral:
                raise CheckpointError(f"{self.path}: unsupported metadata {a}.{key} = {value!r}"[:300])
        tok = "tokenizer.ggml."
        ids = {k: self.meta.get(tok + k) for k in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id",
                                                   "padding_token_id")}
        for key, value in ids.items():
            if value is not None and (not isinstance(value, int) or not 0 <= value < vocab):
                raise CheckpointError(f"{self.path}: {tok + key} {value!r} is not a token id (vocabulary {vocab})")
        eos = list(dict.fromkeys([ids[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
                                  if isinstance(ids[k], int)] + self._eog_by_text(tokens, vocab)))
        common = {"vocab_size": vocab, "bos_token_id": ids["bos_token_id"], "eos_token_id": eos or None,
                  "pad_token_id": ids["padding_token_id"], "tie_word_embeddings": "output.weight" not in self._tensors}
        for key in ("attention.head_count", "embedding_length", "context_length", "feed_forward_length"):
            # named here: past this point they are checked under config.json's names
            if get(f"{a}.{key}", int, 1) <= 0:
                raise CheckpointError(f"{self.path}: {a}.{key} is {self.meta[f'{a}.{key}']}; it must be positive")
        heads = get(f"{a}.attention.head_count", int)
        if a == "gpt2":
            return {"architectures": [ARCHITECTURES[a]], "model_type": "gpt2", **common,
                    "n_embd": get(f"{a}.embedding_length", int), "n_inner": get(f"{a}.feed_forward_length", int),
                    "n_layer": get(f"{a}.block_count", int), "n_head": heads,
                    "n_positions": get(f"{a}.context_length", int),
                    "layer_norm_epsilon": get(f"{a}.attention.layer_norm_epsilon", float),
                    "activation_function": "gelu_new"}
        hidden = get(f"{a}.embedding_length", int)
        head_dim = get(f"{a}.attention.key_length", int, hidden // heads if heads else 0)
        if get(f"{a}.attention.value_length", int, head_dim) != head_dim:
            raise CheckpointError(f"{self.path}: {a}.attention.value_length differs from key_length {head_dim}")
        rotary = get(f"{a}.rope.dimension_count", int, head_dim)
        if a in ("llama", "smollm3", *GEMMA) and rotary != head_dim:  # llama.cpp refuses this too (invalid n_rot)
            raise CheckpointError(f"{self.path}: {a}.rope.dimension_count {rotary} differs from the head size "
                                  f"{head_dim}")
        config = {"architectures": [ARCHITECTURES[a]], "model_type": a, **common, "hidden_size": hidden,
                  "intermediate_size": get(f"{a}.feed_forward_length", int),
                  "num_hidden_layers": get(f"{a}.block_count", int), "num_attention_heads": heads,
                  "num_key_value_heads": get(f"{a}.attention.head_count_kv", int, heads), "head_dim": head_dim,
                  "rms_norm_eps": get(f"{a}.attention.layer_norm_rms_epsilon", float),
                  "max_position_embeddings": get(f"{a}.context_length", int),
                  "rope_theta": get(f"{a}.rope.freq_base", float, 10000.0), "hidden_act": "silu",
                  "partial_rotary_factor": rotary / head_dim if head_dim else 1.0}
        if a in ("llama", "smollm3"):  # (smollm3: every 4th layer without rope, llama.cpp's n_no_rope_layer_step)
            config.update(attention_bias="blk.0.attn_q.bias" in self._tensors,
                          mlp_bias="blk.0.ffn_up.bias" in self._tensors)
        if a == "qwen3":
            config.update(attention_bias="blk.0.attn_q.bias" in self._tensors)
        if a in GEMMA:
            config.update(self._gemma())
            return config
        if a == "phi3":
            # The window applies as in transformers (llama.cpp 0.3.36 ignores phi3's: "Phi SWA is currently
            # disabled"), the same below it; convert_hf_to_gguf writes 0 for none.
            config.update(sliding_window=get(f"{a}.attention.sliding_window", int, 0) or None)
            if any(n in self._tensors for n in ROPE_FACTORS):
                config.update(self._longrope())
                return config
        scaling = self._rope_scaling()
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def _gemma(self) -> dict:
        """gemma2's and gemma3's config.json fields as llama.cpp reads the file (src/models/gemma2.cpp and
        gemma3.cpp, 0.3.36): with a sliding window (gemma2: 4096 when the file has none; gemma3: none), the
        layers sliding as attention.sliding_window_pattern says (an array of flags, or every n-th layer full;
        gemma2 every 2nd, gemma3 every 6th by default), gemma3's with rope.freq_base_swa's unscaled rotary table
        (10000 by default), the others rope.freq_base's and rope.scaling's; gemma3 without a window: every layer
        full and the latter. Queries scaled by head_dim^-1/2, except the 27B models' (gemma2 with 46 layers,
        gemma3 with 62) by (hidden / heads)^-1/2: query_pre_attn_scalar, which the file does not hold. gemma2's
        attention scores and logits soft-capped (attn_logit_softcapping, final_logit_softcapping: 50 and 30 when
        missing); gemma3's logits where final_logit_softcapping is set (its attention's cap is never applied).
        Norm weights are stored as 1 + w."""
        a, get = self.arch, self._get
        layers, heads = get(f"{a}.block_count", int), get(f"{a}.attention.head_count", int)
        hidden = get(f"{a}.embedding_length", int)
        gemma2 = a == "gemma2"
        window = get(f"{a}.attention.sliding_window", int, 4096 if gemma2 else 0)
        if window < 0:
            raise CheckpointError(f"{self.path}: {a}.attention.sliding_window {window} is negative")
        pattern = self.meta.get(f"{a}.attention.sliding_window_pattern", 2 if gemma2 else 6)
        if isinstance(pattern, list):
            if len(pattern) != layers or not all(isinstance(f, bool) for f in pattern):
                raise CheckpointError(f"{self.path}: {a}.attention.sliding_window_pattern must be {layers} flags (one "
                                      f"per layer) or a number, got {pattern!r}"[:300])
            sliding = pattern
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
        else:
            raise CheckpointError(f"{self.path}: {a}.attention.sliding_window_pattern must be a number of layers or "
                                  f"flags, got {pattern!r}"[:300])
        if not window:
            sliding = [False] * layers
        head_dim = get(f"{a}.attention.key_length", int, hidden // heads)
        config = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window or None,
                  "layer_types": ["sliding_attention" if f else "full_attention" for f in sliding],
                  "query_pre_attn_scalar": hidden // heads if layers == (46 if gemma2 else 62) else head_dim,
                  "final_logit_softcapping": get(f"{a}.final_logit_softcapping", float, 30.0 if gemma2 else None)}
        theta = get(f"{a}.rope.freq_base", float, 10000.0)
        if gemma2:  # (one rotary table: the sliding layers' base is the full layers' unless the file says otherwise)
            if get(f"{a}.rope.freq_base_swa", float, theta) != theta:
                raise CheckpointError(f"{self.path}: {a}.rope.freq_base_swa differs from {a}.rope.freq_base "
                                      "(a second rotary table, which Gemma 2 does not have)")
            scaling = self._rope_scaling()
            return config | {"attn_logit_softcapping": get(f"{a}.attn_logit_softcapping", float, 50.0)} | (
                {"rope_scaling": scaling} if scaling else {})
        full = {"rope_type": "default", "rope_theta": theta} | (self._rope_scaling() or {})
        local = {"rope_type": "default", "rope_theta": get(f"{a}.rope.freq_base_swa", float, 10000.0)}
        return config | {"model_type": "gemma3_text",
                         "rope_parameters": {"full_attention": full, "sliding_attention": local}}

    def _eog_by_text(self, tokens, vocab: int) -> list[int]:
        """The tokens llama.cpp ends generation at besides eos/eot/eom: those named as EOG_TEXTS says
        (Phi-3's <|end|>, ChatML's <|im_end|>, ... whatever the file's eos), and the FIM pad/repo/separator
        tokens; <|end|> not where <|return|> and <|call|> (or <|calls|> and <|flush|>) are, as there."""
        if not isinstance(tokens, list):
            return []
        ids = {t: i for i, t in enumerate(tokens) if isinstance(t, str) and i < vocab}  # (the last of a text)
        found = [i for t, i in ids.items() if t in EOG_TEXTS]
        found += [i for key, i in fim_tokens(self.meta, tokens, vocab).items() if key in FIM_EOG]
        if {"<|return|>", "<|call|>"} <= ids.keys() or {"<|calls|>", "<|flush|>"} <= ids.keys():
            found = [i for i in found if i != ids.get("<|end|>")]
        return sorted(set(found))

    def _rope_scaling(self) -> dict | None:
        """`{arch}.rope.scaling.*` -> a Hugging Face rope_scaling dict (convert_hf_to_gguf writes the reverse)."""
        p = f"{self.arch}.rope."
        kind = self._get(p + "scaling.type", str, "linear" if p + "scale_linear" in self.meta else "none")
        if kind == "none":
            return None
        if kind == "linear":
            factor = self._get(p + "scaling.factor", float, None) or self._get(p + "scale_linear", float)
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": self._get(p + "scaling.factor", float),
                       "original_max_position_embeddings": self._original_context()}
            for key, hf in (("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow"),
                            ("scaling.yarn_attn_factor", "attention_factor"),
                            ("scaling.attn_factor", "attention_factor")):
                if p + key in self.meta:
                    scaling[hf] = self._get(p + key, float)
            for key, neutral in (("scaling.yarn_ext_factor", 1.0), ("scaling.yarn_log_multiplier", 0.0)):
                if self.meta.get(p + key, neutral) != neutral:
                    raise CheckpointError(f"{self.path}: unsupported metadata {p + key} = {self.meta[p + key]!r}")
            return scaling
        raise CheckpointError(f"{self.path}: unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")

    def _longrope(self) -> dict:
        """phi3's longrope (convert_hf_to_gguf's Phi3MiniModel writes its factors as tensors) -> config.json's
        original_max_position_embeddings and rope_scaling, the file's attention factor with them (1 where
        the file has none, as llama.cpp reads it: not transformers' default from the context lengths)."""
        short, long = (dtypes.to_float32(*self._stored(n)).tolist() if n in self._tensors else None
                       for n in ROPE_FACTORS)
        if short is None or long is None:
            raise CheckpointError(f"{self.path}: longrope needs both tensors {' and '.join(ROPE_FACTORS)}")
        p = f"{self.arch}.rope.scaling."
        scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                   "attention_factor": self._get(p + "attn_factor", float, 1.0)}
        return {"original_max_position_embeddings": self._original_context(),
                "rope_scaling": scaling}

    def _original_context(self) -> int:
        """rope.scaling.original_context_length, else the context length (llama.cpp's n_ctx_orig_yarn)."""
        a = self.arch
        return self._get(f"{a}.rope.scaling.original_context_length", int, self._get(f"{a}.context_length", int))

    def _rope_freqs(self, rope):
        """Llama-3 scaling as llama.cpp applies it: theta_i = pos * base^(-2i/d) / rope_freqs[i]."""
        factors = dtypes.to_float32(*self._stored("rope_freqs.weight"))
        if factors.shape != (len(rope.inv_freq),):
            raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' has shape {list(factors.shape)}, "
                                  f"expected [{len(rope.inv_freq)}]")
        inv = np.asarray(rope.inv_freq, dtype=np.float32) / factors
        return dataclasses.replace(rope, inv_freq=tuple(float(x) for x in inv))

    def shape_of(self, gguf_name: str) -> tuple[int, ...]:
        """A GGUF tensor's shape in NumPy order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self._tensors[gguf_name].shape.tolist()))

    def _stored(self, gguf_name: str) -> tuple[np.ndarray | Unpacked, str]:
        """(data, llmirc dtype name): F32/F16/BF16 as stored (BF16 as uint16 bits, zero-copy views of
        the mapped file), quantized tensors dequantized to float32 (with dequantize=True), else
        unpacked (gguf_quants.unpack: codes, scales, offsets; dtype 'quantized'). A float tensor with
        NaN or infinite values, or a block with a NaN or infinite scale: CheckpointError."""
        t, kind = self._tensors[gguf_name], self._type_name(gguf_name)
        shape = self.shape_of(gguf_name)
        self._used.add(gguf_name)
        if kind in STORED:
            data = t.data.view("<u2" if kind == "BF16" else t.data.dtype).reshape(shape)
            return finite(self.path, gguf_name, data, STORED[kind]), STORED[kind]
        if kind in FLOAT_ONLY:  # (read with dequantize=True only: __init__ refuses them otherwise)
            with np.errstate(all="ignore"):  # (a corrupt block's inf or NaN is refused by finite)
                data = gguf.quants.dequantize(t.data, GGMLQuantizationType[kind]).astype(np.float32, copy=False)
            return finite(self.path, gguf_name, data.reshape(shape), "float32"), "float32"
        try:
            if not self.dequantize:
                return unpack(FORMATS[kind], t.data, shape[-1]), "quantized"
            return dequantize(FORMATS[kind], t.data, shape[-1]).reshape(shape), "float32"
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor '{gguf_name}' is corrupt: {e}") from None

    # -- the source interface ---------------------------------------------------------------------

    def _gguf_name(self, name: str) -> str:
        gguf_name = self._names.get(name)
        if gguf_name is None or gguf_name not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor '{gguf_name or name}' is missing from the GGUF file")
        self._used.add(gguf_name)
        return gguf_name

    def has(self, name: str) -> bool:
        return self._names.get(name) in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shape_of(self._gguf_name(name))

    def dtype(self, name: str) -> str:
        return self._type_name(self._gguf_name(name))

    def read(self, name: str) -> np.ndarray | Unpacked:
        """The tensor under its Hugging Face name as stored (see _stored), llama q/k rows un-permuted."""
        data, _ = self._stored(self._gguf_name(name))
        if self.arch in PERMUTED and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = self.spec.num_heads if ".q_proj." in name else self.spec.num_kv_heads
            if isinstance(data, Unpacked):  # rows of codes, scales and offsets move together
                return dataclasses.replace(data, **{f: unpermute_rows(getattr(data, f), heads) for f in
                                                    Unpacked.ROW_FIELDS if getattr(data, f) is not None})
            data = unpermute_rows(data, heads)
        return data

    def float32(self, name: str) -> np.ndarray:
        """The tensor under its Hugging Face name as float32."""
        data = self.read(name)
        if isinstance(data, Unpacked):
            g = data.codes.reshape(data.codes.shape[0], -1, data.group).astype(np.float32) * data.scales[..., None]
            return (g if data.offsets is None else g + data.offsets[..., None]).reshape(data.codes.shape)
        return dtypes.to_float32(data, self._stored_type(self._gguf_name(name)))

    def _stored_type(self, gguf_name: str) -> str:
        return STORED.get(self._type_name(gguf_name), "float32")

    def module(self):
        return build_graph(self.spec, self._check_shape, self.has, self._packed)

    def _packed(self, prefix: str, n: int, k: int):
        """A block-quantized matrix kept quantized (llmir.packed_weight, frontend/packed.py); None
        for a float one (or when dequantizing)."""
        gguf_name = self._names.get(f"{prefix}.weight")
        kind = self._type_name(gguf_name) if gguf_name in self._tensors else None
        if kind is None or kind in STORED or self.dequantize:
            return None
        if self.shape_of(gguf_name) != (n, k):
            raise CheckpointError(f"{self.path}: tensor '{gguf_name}' has shape {list(self.shape_of(gguf_name))}, "
                                  f"the metadata implies {[n, k]}")
        self._used.add(gguf_name)
        return L.PackedWeightOp(prefix, "gguf", (n, k), gguf_qtype(kind)).result

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> str:
        """Raises if the tensor's shape is not `shape`; returns the dtype `read` gives it."""
        gguf_name = self._gguf_name(name)
        actual = self.shape_of(gguf_name)
        if actual != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor '{gguf_name}' has shape {list(actual)}, "
                                  f"the metadata implies {list(shape)}")
        kind = self._type_name(gguf_name)
        if kind not in STORED and not self.dequantize:  # matrices kept quantized come from _packed
            raise CheckpointError(f"{self.path}: tensor '{gguf_name}' is {kind}-quantized, which llmirc keeps "
                                  "for matrices only: compile with --dequantize to expand it to float32")
        return self._stored_type(gguf_name)

    def add_weight(self, name: str, value: np.ndarray) -> None:
        raise AssertionError("the GGUF front end synthesizes no weights")

    def unused_tensors(self) -> list[str]:
        """After module(): the file's tensors the graph does not use (GGUF names), sorted."""
        return sorted(set(self._tensors) - self._used)

    use_context = Checkpoint.use_context  # (longrope's long factors past original_max_position_embeddings)

    def model_info(self) -> dict:
        """Checkpoint's facts of the spec the graph does not hold, the context named by its metadata key."""
        info = Checkpoint.model_info(self)
        return info | {"context": Limit(info["context"].tokens, f"{self.path.name} {self.arch}.context_length")}

    def generation_config(self) -> dict:
        s = self.spec
        return {"bos_token_id": s.bos_token_id, "eos_token_id": list(s.eos_token_ids), "pad_token_id": s.pad_token_id}

    def _files(self) -> Path:
        """config.json, generation_config.json and the tokenizer files, written once to a private folder."""
        if self._tmp is None:
            self._scratch = scratch_dir("gguf")  # removed by close
            self._tmp = Path(self._scratch.name)
            (self._tmp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
            (self._tmp / "generation_config.json").write_text(json.dumps(self.generation_config(), indent=2) + "\n")
            if self.tokenizer is not None:
                self.tokenizer.save(str(self._tmp / "tokenizer.json"))
                (self._tmp / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2) + "\n")
                template = self.meta.get("tokenizer.chat_template")
                if isinstance(template, str) and template:
                    (self._tmp / "chat_template.jinja").write_text(template)
        return self._tmp

    def config_files(self) -> list[Path]:
        folder = self._files()
        return [folder / "config.json", folder / "generation_config.json"]

    def tokenizer_files(self) -> list[Path]:
        folder = self._files()
        return [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
                if (folder / n).is_file()]

    def fingerprint(self) -> str:
        """sha256 over the file's name, size and first 64 KiB (its header); of each file, for a split model.

        Cheap identification of the source; the bundle's own weights carry full checksums."""
        h = hashlib.sha256()
        for path in self._readers:
            h.update(os.fsencode(path.name))
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 16))
        return h.hexdigest()

    def drop_pages(self) -> None:
        """Not done yet: the gguf package's reader maps the whole file, and it stays resident once read."""

    def close(self) -> None:
        if self._tmp is not None:
            self._scratch.cleanup()
            self._tmp = None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute on the rows of a q/k weight or bias.

    convert stores, in each head, row (half h, index i) of the Hugging Face layout at position
    2 * i + h (llama.cpp's interleaved rotary pairs); this returns the rows in Hugging Face order.
    w: [heads * head_dim, ...] -> same shape."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
