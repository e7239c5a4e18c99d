"""Fuzzing the readers of untrusted input with Hypothesis: mutated and truncated inputs derived from
valid ones, for the safetensors reader, a bundle's manifest.json, config.json, tokenizer.json, the
ONNX importer and the GGUF front end.

Every outcome must be a result or an LlmircError with a one-line message: no other exception, no
case running past TIME_LIMIT seconds of CPU time (WALL_LIMIT of wall time), no memory blow-up (the
address space is capped at MEMORY_LIMIT when run as a script), and nothing written by the reader.
tests/test_fuzz.py runs a few cases of each; the campaign runs on demand:

    python tests/fuzz_readers.py                       # 10,000 cases per reader
    python tests/fuzz_readers.py --cases 500 --reader onnx --seed 3

It prints, per reader, how many cases gave a result, an error or a failure; for each kind of failure
(exception type and llmirc line) one input and its traceback are saved as fuzz-failure-<reader>-<n>.bin
and .txt in the current directory, and the script exits 1.

What each reader does with an input:
- safetensors: open_safetensors, then every tensor as an array (and as float32 when floating);
- manifest: a compiled bundle with this manifest.json: `inspect`'s summary and text, then load and
  score three tokens and generate two (the rest of the bundle is the valid one);
- config: a Hugging Face checkpoint folder with this config.json (and valid weights): the front end
  builds the llmir graph and the model facts;
- tokenizer: a folder with this tokenizer.json: load, encode, decode, stream-decode;
- onnx: this .onnx file: the importer builds the IR, then the ONNX lowering passes run on it;
- gguf: this .gguf file (a one-layer Llama with a tokenizer; its header's counts, lengths, types and
  values edited): the front end builds the llmir graph and the model facts, and reads every weight.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers when run as a script

from llmirc.errors import LlmircError  # noqa: E402

TIME_LIMIT = 10.0          # seconds of CPU time per case (the machine may be shared: wall time varies)
WALL_LIMIT = 60.0          # seconds of wall time per case, after which the case is interrupted
MEMORY_LIMIT = 8 << 30     # bytes of address space, when run as a script


# -- mutations ------------------------------------------------------------------------------------

@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """`data` after one to four byte-level edits: truncation, bit flips, insertions, deletions,
    overwrites and duplicated chunks."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite", "duplicate"]))
        n = len(b)
        if kind == "truncate":
            b = b[:draw(st.integers(0, n))]
        elif kind == "insert":
            i = draw(st.integers(0, n))
            b[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif n and kind == "flip":
            b[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif n and kind == "delete":
            i = draw(st.integers(0, n - 1))
            del b[i:i + draw(st.integers(1, 64))]
        elif n and kind == "overwrite":
            i = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            b[i:i + len(chunk)] = chunk
        elif n and kind == "duplicate":
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n))
            b[j:j] = b[i:i + draw(st.integers(1, 64))]
    return bytes(b)


SPECIAL_NUMBERS = [0, -1, 1, 2, 3, 7, 255, 2**15, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 10**12,
                   -2**31, -2**63, 0.0, -0.0, 0.5, 1e-30, 1e308, -1e308, 3.5]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(SPECIAL_NUMBERS), st.integers(-2**70, 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
              st.sampled_from(["", "..", "../x", "/etc/passwd", "F32", "BF16", "yarn", "llama3", "linear",
                               "LlamaForCausalLM", "GPT2LMHeadModel", "weights/model.safetensors", "a/../b", "\x00"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


# Keys the readers look for, so that "add" mutations also create fields the seeds lack.
KEYS = ["head_dim", "num_key_value_heads", "rope_scaling", "rope_parameters", "rope_theta", "rope_type", "type",
        "factor", "original_max_position_embeddings", "partial_rotary_factor", "attention_factor", "mscale",
        "mscale_all_dim", "beta_fast", "beta_slow", "truncate", "low_freq_factor", "high_freq_factor",
        "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attention_bias", "mlp_bias",
        "hidden_act", "tie_word_embeddings", "n_inner", "max_position_embeddings", "n_positions", "architectures",
        "full_sequence", "kv_cache", "block_size", "num_layers", "vocab_size", "workspace", "weights", "order",
        "file", "targets", "library", "tokenizer", "files", "path", "size", "sha256", "format_version",
        "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model", "vocab", "merges",
        "unk_token", "dtype", "shape", "data_offsets", "__metadata__"]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated_json(draw, data: bytes) -> bytes:
    """`data` (a JSON document) with one to three values replaced, removed, added or copied elsewhere;
    sometimes byte-level edits on top."""
    obj = json.loads(data)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path, value = paths[draw(st.integers(0, len(paths) - 1))]
        kind = draw(st.sampled_from(["replace", "replace", "remove", "add", "copy"]))
        if not path:
            if kind == "replace":
                obj = draw(JSON_VALUES)
            continue
        parent, key = _at(obj, path[:-1]), path[-1]
        if kind == "replace":
            parent[key] = draw(JSON_VALUES)
        elif kind == "remove":
            del parent[key]
        elif kind == "add" and isinstance(value, dict):
            value[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)))] = draw(JSON_VALUES)
        elif kind == "add" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(JSON_VALUES))
        elif kind == "copy":
            parent[key] = copy.deepcopy(paths[draw(st.integers(0, len(paths) - 1))][1])
    text = json.dumps(obj).encode()
    return draw(mutated_bytes(text)) if draw(st.integers(0, 4)) == 0 else text


# -- the readers ----------------------------------------------------------------------------------

@dataclass
class Reader:
    """One reader under test: valid seed inputs, how to mutate them, where an input goes, what reads it."""

    name: str
    setup: Callable[[Path], list[bytes]]      # builds the folder around the input; returns the seeds
    target: str                               # the input's file, relative to the folder
    read: Callable[[Path], object]            # reads the folder (raises LlmircError or returns)
    mutations: Callable[[bytes], st.SearchStrategy] = mutated_json
    folder: Path | None = None
    seeds: list[bytes] = field(default_factory=list)

    def prepare(self, root: Path) -> None:
        self.folder = root / self.name
        self.folder.mkdir(parents=True)
        self.seeds = self.setup(self.folder)

    def strategy(self) -> st.SearchStrategy[bytes]:
        return st.sampled_from(self.seeds).flatmap(self.mutations)


def _tiny_llama(folder: Path) -> None:
    """config.json + model.safetensors of a one-layer Llama (numpy weights, no torch)."""
    from llmirc.artifact_format.safetensors import save_safetensors

    C, inter, vocab, heads, kv, d = 16, 32, 40, 2, 1, 8
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": C,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv, "max_position_embeddings": 64, "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
              "bos_token_id": 0, "eos_token_id": 1}
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, C), "model.norm.weight": (C,),
              "model.layers.0.input_layernorm.weight": (C,), "model.layers.0.post_attention_layernorm.weight": (C,),
              "model.layers.0.self_attn.q_proj.weight": (heads * d, C),
              "model.layers.0.self_attn.k_proj.weight": (kv * d, C),
              "model.layers.0.self_attn.v_proj.weight": (kv * d, C),
              "model.layers.0.self_attn.o_proj.weight": (C, heads * d),
              "model.layers.0.mlp.gate_proj.weight": (inter, C), "model.layers.0.mlp.up_proj.weight": (inter, C),
              "model.layers.0.mlp.down_proj.weight": (C, inter)}
    save_safetensors(folder / "model.safetensors",
                     {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in shapes.items()})
    (folder / "config.json").write_text(json.dumps(config))


def _gpt2_config() -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 40, "n_embd": 16, "n_head": 2,
            "n_layer": 1, "n_positions": 32, "activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": True}


def setup_safetensors(folder: Path) -> list[bytes]:
    from llmirc.artifact_format.safetensors import SafetensorsWriter

    rng = np.random.default_rng(1)
    path = folder / "model.safetensors"
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float16),
               "c": np.arange(6, dtype=np.uint16).reshape(2, 3), "d": np.arange(4, dtype=np.int64),
               "e": np.zeros((0, 3), np.float32), "f": np.array(True)}
    with SafetensorsWriter(path, {"format": "pt"}, [(n, "BF16" if n == "c" else a.dtype, a.shape)
                                                   for n, a in tensors.items()]) as w:
        for n, a in tensors.items():
            w.write(n, a)
    return [path.read_bytes()]


def read_safetensors(folder: Path) -> None:
    from llmirc.artifact_format.safetensors import open_safetensors

    with open_safetensors(folder / "model.safetensors") as f:
        for name in f.names():
            dtype, _ = f.info(name)
            f.array(name)
            if dtype in ("F32", "F16", "BF16", "F64"):
                f.as_float32(name)


def mutated_safetensors(data: bytes) -> st.SearchStrategy[bytes]:
    """The header JSON mutated (its length field kept right), or the whole file edited bytewise."""
    n = int.from_bytes(data[:8], "little")
    header, rest = data[8:8 + n], data[8 + n:]

    def rebuild(h: bytes) -> bytes:
        return len(h).to_bytes(8, "little") + h + rest
    return st.one_of(mutated_json(header).map(rebuild), mutated_bytes(data))


def setup_manifest(folder: Path, source: str = "llama") -> list[bytes]:
    """A compiled bundle: of a one-layer Llama (paged attention, a KV cache), or of a small ONNX graph
    (a full-sequence model, quicker to compile)."""
    from llmirc.driver import CompileOptions, Progress, compile_model

    if source == "llama":
        _tiny_llama(folder / "ckpt")
        model = folder / "ckpt"
    else:
        from onnx_graphs import Graph, save

        g = Graph(C=16, vocab=40)
        (folder / "onnx").mkdir()
        model = save(g.model(g.matmul(g.op("Sin", g.x), 16, 40), shape=[1, "S", 40]), folder / "onnx")
    compile_model(model, folder / "b.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    return [(folder / "b.llmir" / "manifest.json").read_bytes()]


def read_manifest(folder: Path) -> None:
    from llmirc.runtime import load
    from llmirc.runtime.inspect import describe, summary

    describe(summary(folder / "b.llmir"))
    model = load(folder / "b.llmir")
    model.score([1, 2, 3])
    model.generate([[1, 2]], max_new_tokens=2)


def setup_config(folder: Path) -> list[bytes]:
    _tiny_llama(folder)
    gpt2 = json.dumps(_gpt2_config()).encode()
    return [(folder / "config.json").read_bytes(), gpt2]


def read_config(folder: Path) -> None:
    from llmirc.frontend import open_source

    source = open_source(folder)
    try:
        source.module()
        source.model_info()
    finally:
        source.close()


def setup_tokenizer(folder: Path) -> list[bytes]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld ✓ 日本語"] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    return [tok.to_str().encode(), wordpiece.to_str().encode()]


def read_tokenizer(folder: Path) -> None:
    from llmirc.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_bundle_dir(folder)
    ids = tok.encode("héllo the fox ✓")
    tok.decode(ids + [0, 1, 10**6])
    detok = tok.detokenizer(ids[:2])
    for i in ids[2:] + [3]:
        detok.add(i)


def setup_onnx(folder: Path) -> list[bytes]:
    from test_onnx_fallback import bidirectional_decoder, op_zoo
    from test_onnx_fusions import attention_graph

    return [m.SerializeToString() for m in (attention_graph(), attention_graph(pos="position_ids", kv_heads=1),
                                            op_zoo(), bidirectional_decoder(layers=1, C=8, H=2, vocab=16))]


def read_onnx(folder: Path) -> None:
    from llmirc.frontend.onnx_import import ONNX_LOWERING, OnnxCheckpoint
    from llmirc.passes.pipeline import make_context, parse_passes

    source = OnnxCheckpoint(folder / "model.onnx")
    module = source.module()
    source.model_info()
    ctx = make_context(read_weight=source.float32, add_weight=source.add_weight)
    for p in parse_passes(ONNX_LOWERING):
        p.apply(ctx, module)
    module.verify()


@st.composite
def mutated_onnx(draw, data: bytes) -> bytes:
    """A structural edit of the model (op types, node inputs, attributes, initializer dims and data,
    graph inputs, opset), then sometimes byte-level edits of the file."""
    import onnx

    from llmirc.frontend.onnx_ops import SUPPORTED

    m = onnx.ModelProto()
    m.ParseFromString(data)
    g = m.graph
    names = sorted({x for n in g.node for x in list(n.input) + list(n.output)} | {i.name for i in g.initializer})
    ints = st.one_of(st.sampled_from([int(x) for x in SPECIAL_NUMBERS if isinstance(x, int) and -2**63 <= x < 2**63]),
                     st.integers(-5, 5))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["op_type", "input", "attribute", "dims", "raw_data", "data_type", "graph_input",
                                     "remove_node", "opset", "output", "values", "values"]))
        node = g.node[draw(st.integers(0, len(g.node) - 1))] if len(g.node) else None
        init = g.initializer[draw(st.integers(0, len(g.initializer) - 1))] if len(g.initializer) else None
        if kind == "op_type" and node is not None:
            node.op_type = draw(st.sampled_from(sorted(SUPPORTED) + ["Loop", "Foo"]))
        elif kind == "input" and node is not None and len(node.input):
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names + ["", "missing"]))
        elif kind == "attribute" and node is not None and len(node.attribute):
            a = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if a.type == onnx.AttributeProto.INT:
                a.i = draw(ints)
            elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                a.ints[draw(st.integers(0, len(a.ints) - 1))] = draw(ints)
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = draw(st.floats(width=32))
            elif a.type == onnx.AttributeProto.TENSOR:
                a.t.dims.append(draw(st.integers(0, 2**40)))
        elif kind == "dims" and init is not None:
            if len(init.dims) and draw(st.booleans()):
                init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(st.integers(-2, 2**40))
            else:
                init.dims.append(draw(st.integers(0, 3)))
        elif kind == "values" and init is not None and init.data_type in (onnx.TensorProto.INT64,
                                                                             onnx.TensorProto.FLOAT):
            # shapes, axes, starts and scales are small initializers: give them extreme values
            try:
                values = onnx.numpy_helper.to_array(init).copy()
            except ValueError:  # an earlier edit of this case cut its data
                continue
            if values.size and values.size <= 64:
                flat = values.reshape(-1)
                pool = ints if init.data_type == onnx.TensorProto.INT64 else \
                    st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, 65504.0, 1e-45])
                flat[draw(st.integers(0, flat.size - 1))] = draw(pool)
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        elif kind == "raw_data" and init is not None:
            init.raw_data = init.raw_data[:draw(st.integers(0, len(init.raw_data)))]
        elif kind == "data_type" and init is not None:
            init.data_type = draw(st.integers(0, 25))
        elif kind == "graph_input":
            dim = g.input[draw(st.integers(0, len(g.input) - 1))].type.tensor_type.shape.dim
            if len(dim):
                d = dim[draw(st.integers(0, len(dim) - 1))]
                if draw(st.booleans()):
                    d.dim_value = draw(st.integers(0, 2**40))
                else:
                    d.dim_param = draw(st.text(max_size=3))
        elif kind == "remove_node" and node is not None:
            g.node.remove(node)
        elif kind == "opset":
            m.opset_import[0].version = draw(st.integers(0, 30))
        elif kind == "output" and len(g.output):
            g.output[0].name = draw(st.sampled_from(names))
    out = m.SerializeToString()
    return draw(mutated_bytes(out)) if draw(st.integers(0, 5)) == 0 else out


def setup_gguf(folder: Path) -> list[bytes]:
    """A one-layer Llama as GGUF (float32; and with a Q8_0 matrix) with a SentencePiece-style tokenizer."""
    import gguf

    from gguf_files import _add, spm_tokenizer_metadata

    _tiny_llama(folder / "ckpt")
    from llmirc.artifact_format.safetensors import open_safetensors

    with open_safetensors(folder / "ckpt" / "model.safetensors") as f:
        weights = {n: np.array(f.array(n)) for n in f.names()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for hf, g in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                  ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                  ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                  ("mlp.down_proj", "ffn_down")):
        names[f"model.layers.0.{hf}.weight"] = f"blk.0.{g}.weight"
    tokenizer = spm_tokenizer_metadata(["the quick brown fox", "héllo wörld"] * 4, 300)
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    weights["model.embed_tokens.weight"] = np.resize(weights["model.embed_tokens.weight"], (vocab, 16))
    seeds = []
    for kind in ("F32", "Q8_0"):
        path = folder / f"{kind}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 16),
                           (w.add_head_count, 2), (w.add_head_count_kv, 1), (w.add_feed_forward_length, 32),
                           (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0),
                           (w.add_rope_dimension_count, 8), (w.add_vocab_size, vocab)):
            add(value)
        for key, value in tokenizer.items():
            _add(w, key, value)
        w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
        for hf, g in names.items():
            a = weights[hf].astype(np.float32)
            if kind == "Q8_0" and a.ndim == 2 and a.shape[1] % 32 == 0:  # (blocks of 32: down_proj)
                w.add_tensor(g, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(g, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        seeds.append(path.read_bytes())
    return seeds


def read_gguf(folder: Path) -> None:
    from llmirc.frontend import open_source

    source = open_source(folder / "model.gguf")
    try:
        source.module()
        source.model_info()
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            source.read(name)
    finally:
        source.close()


def _gguf_layout(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(where a valid GGUF file's tensor data begins, [(offset, width)] of each single number of its
    header: the counts, lengths, value types, scalar values, tensor dimensions, types and offsets)."""
    import gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        reader = gguf.GGUFReader(f.name)
    numbers = []
    for entry in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        at = entry.offset
        # an array's items are left alone (they would be most of the numbers): its key, type, item type, count
        parts = entry.parts[:5] if entry.types[:1] == [gguf.GGUFValueType.ARRAY] else entry.parts
        for part in parts:
            if part.dtype.kind in "uif" and (part.size == 1 or entry.name.endswith(".weight")):  # (dimensions)
                numbers += [(at + i * part.itemsize, part.itemsize) for i in range(part.size)]
            at += part.nbytes
    return reader.data_offset, numbers


@st.composite
def mutated_gguf(draw, data: bytes) -> bytes:
    """One to three of the header's numbers (a count, length, value type, scalar value, tensor
    dimension, type or offset) replaced by an extreme or small one, or byte-level edits of the
    header; sometimes byte-level edits of the whole file."""
    end, numbers = _GGUF_LAYOUTS.setdefault(data, _gguf_layout(data))
    header, rest = bytearray(data[:end]), data[end:]
    for _ in range(draw(st.integers(1, 3))):
        at, width = numbers[draw(st.integers(0, len(numbers) - 1))]
        value = draw(st.one_of(st.sampled_from([x for x in SPECIAL_NUMBERS if isinstance(x, int)]),
                               st.integers(0, 16)))
        header[at:at + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    out = bytes(header) + rest
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(mutated_bytes(out))
    if kind == 1:
        return draw(mutated_bytes(bytes(header))) + rest
    return out


_GGUF_LAYOUTS: dict[bytes, tuple[int, list[tuple[int, int]]]] = {}


READERS = {
    "safetensors": Reader("safetensors", setup_safetensors, "model.safetensors", read_safetensors,
                          mutated_safetensors),
    "manifest": Reader("manifest", setup_manifest, "b.llmir/manifest.json", read_manifest),
    "config": Reader("config", setup_config, "config.json", read_config),
    "tokenizer": Reader("tokenizer", setup_tokenizer, "tokenizer.json", read_tokenizer),
    "onnx": Reader("onnx", setup_onnx, "model.onnx", read_onnx, mutated_onnx),
    "gguf": Reader("gguf", setup_gguf, "model.gguf", read_gguf, mutated_gguf),
}


# -- running a case -------------------------------------------------------------------------------

class CaseTimeout(Exception):
    """A case ran past WALL_LIMIT."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(reader: Reader, data: bytes) -> str:
    """'result' or 'error' (an LlmircError with a one-line message); anything else raises."""
    target = reader.folder / reader.target
    target.write_bytes(data)
    before = _listing(reader.folder)
    start = time.process_time()
    with warnings.catch_warnings(record=True) as warned:  # the CLI would print them beside its one line
        warnings.simplefilter("always")
        try:
            with time_limit(WALL_LIMIT):
                reader.read(reader.folder)
            outcome = "result"
        except LlmircError as e:
            message = str(e)
            assert message and "\n" not in message, \
                f"{reader.name}: an error message that is not one line: {message!r}"
            outcome = "error"
    elapsed = time.process_time() - start
    assert not warned, f"{reader.name}: a warning: {warned[0].category.__name__}: {warned[0].message} " \
                       f"({warned[0].filename}:{warned[0].lineno})"
    assert _listing(reader.folder) == before, f"{reader.name}: the reader wrote or changed files"
    assert elapsed < TIME_LIMIT, f"{reader.name}: a case took {elapsed:.1f} s of CPU time"
    return outcome


def fuzz(reader: Reader, cases: int, seed: int | None = None, failures: dict | None = None) -> Counter:
    """Runs `cases` Hypothesis examples against a prepared reader; returns the outcome counts.

    With `failures` (a dict), a failing case is recorded there (by exception type and the llmirc
    line it came from: one example each) and counted as 'failure', and fuzzing goes on; without,
    it raises (after Hypothesis shrank it to a smallest failing input)."""
    counts = Counter()

    @settings(max_examples=cases, database=None, deadline=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate] if failures is not None
              else [Phase.generate, Phase.shrink])
    @given(data=reader.strategy())
    def one(data):
        if failures is None:
            counts[run_case(reader, data)] += 1
            return
        try:
            counts[run_case(reader, data)] += 1
        except Exception as e:
            counts["failure"] += 1
            failures.setdefault(_signature(e), (data, "".join(traceback.format_exception(e))))

    if seed is not None:
        one = hypothesis.seed(seed)(one)
    one()
    return counts


def _signature(e: BaseException) -> str:
    """The exception type and the innermost llmirc line that raised it."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/llmirc/" in f.filename
              or any(f"/{d}/" in f.filename for d in ("passes", "targets", "artifact_format"))]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(e).__name__} at {where}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per reader (default 10,000)")
    parser.add_argument("--reader", action="append", choices=sorted(READERS), help="only these readers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="llmirc-fuzz-") as tmp:
        for name in args.reader or list(READERS):
            reader = READERS[name]
            reader.prepare(Path(tmp))
            failures: dict = {}
            start = time.perf_counter()
            counts = fuzz(reader, args.cases, seed=args.seed, failures=failures)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{name}: {sum(counts.values())} cases: {counts['result']} results, {counts['error']} errors, "
                  f"{counts['failure']} failures ({time.perf_counter() - start:.0f} s; peak RSS so far "
                  f"{peak:.0f} MiB)", flush=True)
            for i, (signature, (data, trace)) in enumerate(failures.items()):
                path = Path(f"fuzz-failure-{name}-{i}.bin")
                path.write_bytes(data)
                path.with_suffix(".txt").write_text(trace)
                print(f"  {signature}: {trace.strip().splitlines()[-1][:200]}  (input: {path}, trace: "
                      f"{path.with_suffix('.txt')})", flush=True)
            failed += len(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
