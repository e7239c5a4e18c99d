"""ONNX model -> xDSL IR: `onnx.*` ops for the data path, constants folded, shapes in S.

The graph is read as a full-sequence forward of one sequence (batch 1). Inputs are given roles
by name: `input_ids` (the tokens), `attention_mask` (all ones for one unpadded sequence) and
`position_ids` (0..S-1). The graph is interpreted abstractly at a few sequence lengths
(onnx_analysis): what does not depend on S is folded into constants, and every value gets its
shape with `?` for the dims that grow with S.

Half-precision exports (float16, bfloat16: `model.half()` before `torch.onnx.export`) are
computed in float32, as f16/bf16 safetensors checkpoints are: the importer sees every f16/bf16
tensor type, initializer, constant and Cast target as float32 (but for the scales of
MatMulNBits / GatherBlockQuantized weights: their llmir.weight has the stored type, which the packed
weight keeps). Their linear and embedding weights are stored in the export's type again
(`half_dtype`, `--dtype auto`), losslessly.

Untrusted input: external data paths must stay in the model's folder and lie within their
files; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from xdsl.dialects import func
from xdsl.dialects.builtin import (
    ArrayAttr,
    DenseIntOrFPElementsAttr,
    DictionaryAttr,
    ModuleOp,
    StringAttr,
    TensorType,
)
from xdsl.ir import SSAValue

from llmirc import dialect as L
from llmirc.errors import CheckpointError, naming

from . import onnx_ops
from .checkpoint import carried_files, checkpoint_area, tokenizer_files
from .context import Limit
from .onnx_analysis import CONST, DATA, PROBE_LENGTHS, SONLY, AV, Node, interpret, symbolic_shape
from .onnx_dialect import NoneOp, element_type, make_op
from . import onnx_contrib
from .onnx_contrib import expand_contrib
from .onnx_functions import expand_functions

MIN_OPSET = 17
SMALL_CONSTANT = 256  # constants up to this many elements are kept in the IR text
INPUT_ROLES = {"input_ids": "onnx:input_ids", "attention_mask": "onnx:attention_mask",
               "position_ids": "onnx:position_ids"}
PAST = re.compile(r"past_key_values[._](\d+)[._](key|value)|past[._](key|value)[._](\d+)|past[._](\d+)[._](key|value)")
HALF = {onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.BFLOAT16: "bf16"}
GENAI_SEARCH = ("temperature", "top_k", "top_p", "repetition_penalty")  # generation_config.json's names too
ELEMENT_TYPES = set(onnx_ops.DTYPES)  # what tensors, graph inputs and Casts may hold


def computed_dtype(code: int) -> np.dtype:
    """The numpy dtype llmirc reads and computes an ONNX element type in (half precision: float32)."""
    return np.dtype(np.float32) if code in HALF else onnx_ops.DTYPES[code]


def _check_element_type(code: int, where: str) -> None:
    if code not in ELEMENT_TYPES:
        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else str(code)
        raise CheckpointError(f"{where} has element type {name}, which llmirc does not read")


def _as_computed(attrs: dict) -> dict:
    """A node's attributes with half-precision types (Cast's `to`, a `dtype`, a tensor `value`) as float32."""
    for key in ("to", "dtype"):
        if attrs.get(key) in HALF:
            attrs[key] = onnx.TensorProto.FLOAT
    value = attrs.get("value")
    if isinstance(value, np.ndarray) and value.dtype.name in ("float16", "bfloat16"):
        attrs["value"] = value.astype(np.float32)
    return attrs


ONNX_LOWERING = ("onnx-fuse-embedding,onnx-fuse-linear,onnx-glue,onnx-fuse-norm,onnx-fuse-activation,onnx-glue,"
                 "onnx-fuse-attention,onnx-to-llmir")


class OnnxCheckpoint:
    """An ONNX model file and its weights (inline or external data), as a compiler source.

    config.json, generation_config.json and tokenizer files next to the model are used when
    present (optimum's exports have them): they give the context length and special tokens."""

    kind = "onnx"
    lowering = ONNX_LOWERING

    def __init__(self, path: Path):
        self.path, self.root = path, path.parent
        try:
            self.proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises DecodeError and friends
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: not a valid ONNX model ({reason})") from None
        graph = self.proto.graph
        if not graph.node and not self.proto.opset_import:  # (protobuf reads an empty file as an empty model)
            raise CheckpointError(f"{path}: not an ONNX model (no graph and no opset: empty, or another format)")
        opsets = {o.domain or "ai.onnx": o.version for o in self.proto.opset_import}
        if opsets.get("ai.onnx", 0) < MIN_OPSET:
            raise CheckpointError(f"{path}: opset {opsets.get('ai.onnx')} is too old; llmirc reads opset {MIN_OPSET} "
                                  "and newer (re-export, or convert with onnx.version_converter)")
        self.contrib = Counter(expand_contrib(self.proto, path))
        self.expanded = Counter(expand_functions(self.proto, onnx_ops.SUPPORTED, path))
        graph = self.proto.graph  # (the expansion replaced it)
        unsupported = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.node
                              if (n.domain, n.op_type) not in onnx_contrib.KEPT and
                              (n.domain not in ("", "ai.onnx") or n.op_type not in onnx_ops.SUPPORTED))
        if unsupported:
            listed = ", ".join(f"{op} x{count}" for op, count in sorted(unsupported.items()))
            raise CheckpointError(f"{path}: unsupported ONNX operators: {listed}")
        self.initializers = {t.name: t for t in graph.initializer}
        # packed weights' parts (MatMulNBits, GatherBlockQuantized) by GPTQ's names: <codes>.qweight, .scales, ...
        self.packed_parts = {f"{n.input[at[0]]}.{part}": n.input[i] for n in graph.node
                             if (at := onnx_contrib.KEPT.get((n.domain, n.op_type)))
                             for i, part in zip(at, ("qweight", "scales", "qzeros")) if i < len(n.input) and n.input[i]}
        for t in graph.initializer:
            self._check_initializer(t)
        self.folded: dict[str, np.ndarray] = {}  # large constants computed at compile time
        self.summary = ""
        self.position_tables: list[Limit] = []  # found by import_onnx

    # -- weights ---------------------------------------------------------------------------
    def _check_initializer(self, t: onnx.TensorProto) -> None:
        """Type, dims and the size of the data (inline or external) agree, before anything reads it."""
        _check_element_type(t.data_type, f"{self.path}: tensor '{t.name}'")
        if any(d < 0 for d in t.dims):
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has negative dims {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            self._check_external(t)
            return
        count = int(np.prod(t.dims, dtype=object))
        if t.raw_data:
            size, expected = len(t.raw_data), count * onnx_ops.DTYPES[t.data_type].itemsize
        else:  # typed fields: one entry per element (two per complex, which is not read)
            expected = count
            size = sum(len(f) for f in (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data))
        if size != expected:
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has {size} {'bytes' if t.raw_data else 'values'} "
                                  f"of data; its dims {list(t.dims)} need {expected}")

    def _check_external(self, t: onnx.TensorProto) -> None:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has external data at {location!r}, outside the "
                                  "model's folder")
        if "\0" in location:  # (no file has such a name: the OS refuses it, as a ValueError)
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has external data at {location!r}, a name with a "
                                  "NUL character")
        file = (self.root / rel).resolve()
        if not file.is_relative_to(checkpoint_area(self.root)) or not file.is_file():
            raise CheckpointError(f"{self.path}: external data {location!r} of tensor '{t.name}' is missing or "
                                  "leaves the model's folder")
        itemsize = onnx_ops.DTYPES[t.data_type].itemsize
        expected = int(np.prod(t.dims, dtype=object)) * itemsize
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", expected))
        except ValueError:
            raise CheckpointError(f"{self.path}: external data of tensor '{t.name}' has a non-integer offset or "
                                  "length") from None
        size = file.stat().st_size
        if length != expected or offset < 0:
            raise CheckpointError(f"{self.path}: external data of tensor '{t.name}' in {location}: {length} bytes "
                                  f"at offset {offset}, where its shape and type take {expected}")
        if offset + length > size:
            raise CheckpointError(f"{self.path}: external data of tensor '{t.name}' in {location} ends at byte "
                                  f"{offset + length}, past the file's end ({size} bytes): truncated?")

    def read(self, name: str) -> np.ndarray:
        """An initializer (or a constant folded at compile time) in the type llmirc computes it in
        (`computed_dtype`: f16/bf16 as float32)."""
        if name in self.folded:
            return self.folded[name]
        name = self.packed_parts.get(name, name)
        t = self.initializers.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no initializer '{name}'")
        if t.data_location != onnx.TensorProto.EXTERNAL:
            data = numpy_helper.to_array(t)
        else:
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            offset = int(info.get("offset", 0))
            count = int(np.prod(t.dims, dtype=np.int64))
            if count == 0:  # (np.memmap raises for an empty file)
                data = np.empty(tuple(t.dims), dtype=dtype)
            else:
                data = np.memmap(self.root / info["location"], dtype=dtype, mode="r", offset=offset, shape=(count,))
                data = data.reshape(tuple(t.dims))
        return data.astype(np.float32) if t.data_type in HALF else data

    def float32(self, name: str) -> np.ndarray:
        """A weight as float32 (MatMulNBits' packed codes and zero points as stored, uint8). Raises
        CheckpointError for another non-float initializer, or one holding NaN (infinities pass:
        exports keep -inf mask constants)."""
        a = self.read(name)
        if a.dtype == np.uint8 and name in self.packed_parts.values():
            return a
        if a.dtype.kind != "f":
            raise CheckpointError(f"{self.path}: weight '{name}' has dtype {a.dtype}; weights must be floating point")
        a = a.astype(np.float32, copy=False)
        bad = int(np.count_nonzero(np.isnan(a)))
        if bad:
            raise CheckpointError(f"{self.path}: tensor '{name}' holds {bad} NaN value{'s' * (bad > 1)} (of {a.size}): "
                                  "the model is corrupt")
        return a

    def add_weight(self, name: str, value: np.ndarray) -> None:
        self.folded[name] = value

    def unused_tensors(self) -> list[str]:
        """None to report: an initializer no node reads is not part of the graph ONNX defines."""
        return []

    def module(self) -> ModuleOp:
        return import_onnx(self)

    def _config(self, name: str) -> dict:
        from .hf_config import load_config

        path = self.root / name
        return load_config(path) if path.is_file() else {}

    def generation_config(self) -> dict:
        """generation_config.json, else the sampling fields of onnxruntime-genai's genai_config.json
        `search` object (GENAI_SEARCH: the builder copies them there from the model's generation
        config; `serve` reads them as vLLM reads generation_config.json)."""
        if (self.root / "generation_config.json").is_file() or not (self.root / "genai_config.json").is_file():
            return self._config("generation_config.json")
        search = self._config("genai_config.json").get("search")
        return {k: search[k] for k in GENAI_SEARCH if k in search} if isinstance(search, dict) else {}

    def model_info(self) -> dict:
        """Facts the graph does not hold, from config.json when there is one, else from
        onnxruntime-genai's genai_config.json (its `model` object: context_length, bos/eos/pad token
        ids, type); `context` is what it states (None without either), `position_tables` what the
        graph's tables allow."""
        config, source = self._config("config.json"), "config.json"
        archs = config.get("architectures") or []
        if not config and (self.root / "genai_config.json").is_file():
            config, source = self._config("genai_config.json").get("model"), "genai_config.json model"
            if not isinstance(config, dict):
                raise CheckpointError(f"{self.root / 'genai_config.json'}: 'model' must be an object")
            config = {**config, "max_position_embeddings": config.get("context_length")} if \
                "context_length" in config else config
            archs = [f"onnxruntime-genai {config.get('type', 'model')}"]
        eos = config.get("eos_token_id")
        producer = f"{self.proto.producer_name} {self.proto.producer_version}".strip()
        key = next((k for k in ("max_position_embeddings", "n_positions") if k in config), None)
        field = "context_length" if source != "config.json" else key
        if key is not None and (not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1):
            raise CheckpointError(f"{self.root / source.split()[0]}: field '{field}' must be a positive integer, "
                                  f"got {config[key]!r}")
        return {"architecture": f"ONNX ({archs[0] if archs else producer or 'unknown producer'})",
                "context": Limit(config[key], f"{source} {field}") if key else None,
                "position_tables": self.position_tables,
                "bos_token_id": config.get("bos_token_id"),
                "eos_token_ids": eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [],
                "pad_token_id": config.get("pad_token_id"),
                "weight_dtype": self.half_dtype()}

    def half_dtype(self) -> str | None:
        """float16 or bfloat16 for a half-precision export (the type most of its float initializers
        have): `--dtype auto` stores its linear and embedding weights so again, bit for bit."""
        counts = {code: 0 for code in (onnx.TensorProto.FLOAT, *HALF)}
        for t in self.initializers.values():
            if t.data_type in counts:
                counts[t.data_type] += int(np.prod(t.dims, dtype=np.int64))
        code = max(counts, key=counts.get)
        return {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}.get(code)

    def config_files(self) -> list[Path]:
        return carried_files(self.root, [self.root / "config.json", self.root / "generation_config.json"])

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files(self.root)

    def drop_pages(self) -> None:
        """Nothing to release: external data is mapped per read and unmapped when the array goes."""

    def close(self) -> None:
        pass

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    # -- graph -------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        out = []
        for i, n in enumerate(self.proto.graph.node):
            name = n.name or f"#{i}"
            try:
                attrs = _as_computed(onnx_ops.attrs_of(n))
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:  # a tensor attribute that is not one
                raise CheckpointError(f"{self.path}: ONNX node '{name}' has an attribute that cannot be read "
                                      f"({' '.join(str(e).split())[:200]})") from None
            out.append(Node(n.op_type, [x or None for x in n.input], list(n.output), attrs, name))
        return out

    def roots(self) -> tuple[dict, dict]:
        """Graph inputs by role, as functions of S (one sequence of S tokens, batch 1).

        Past K/V inputs (`past_key_values.N.key`, ...) are empty: the graph is read as the
        first step, and the paged KV cache takes their place."""
        roots, roles = {}, {}
        for inp in self.proto.graph.input:
            if inp.name in self.initializers:
                continue  # old exporters list initializers as inputs too
            tt = inp.type.tensor_type
            _check_element_type(tt.elem_type, f"{self.path}: input '{inp.name}'")
            dtype = computed_dtype(tt.elem_type)
            dims = tt.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value != 1:
                raise CheckpointError(f"{self.path}: input '{inp.name}' has batch size {dims[0].dim_value}; "
                                      "llmirc reads a batch-1 (or dynamic-batch) graph")
            role = INPUT_ROLES.get(inp.name) or ("onnx:past" if PAST.fullmatch(inp.name) else None)
            if role is None:
                embeds = " (the embeddings as an input: onnxruntime-genai's builder writes it with " \
                    "exclude_embeds=true; llmirc compiles graphs that read token ids: build without it)" \
                    if inp.name == "inputs_embeds" else ""
                raise CheckpointError(f"{self.path}: graph input '{inp.name}' has no known role (expected "
                                      f"{', '.join(INPUT_ROLES)} or past_key_values.N.key/value){embeds}")
            if role != "onnx:past" and len(dims) != 2:
                raise CheckpointError(f"{self.path}: input '{inp.name}' must be [batch, sequence]")
            seq_axis = 1 if role != "onnx:past" else 2 if len(dims) == 4 else None
            if seq_axis is not None and dims[seq_axis].HasField("dim_value") and \
                    (role != "onnx:past" or dims[seq_axis].dim_value):
                raise CheckpointError(f"{self.path}: input '{inp.name}' has a fixed "
                                      f"{'past' if role == 'onnx:past' else 'sequence'} length of "
                                      f"{dims[seq_axis].dim_value}; export with a dynamic sequence axis "
                                      "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes=...)")
            if role in ("onnx:input_ids", "onnx:position_ids") and dtype.kind not in "iu":
                raise CheckpointError(f"{self.path}: input '{inp.name}' has element type {dtype}; it holds indices "
                                      "and must be an integer type (int64 or int32)")
            roles[inp.name] = role
            if role == "onnx:input_ids":
                roots[inp.name] = lambda S, d=dtype: AV(DATA, (1, S), d)
            elif role == "onnx:attention_mask":
                roots[inp.name] = lambda S, d=dtype: AV(SONLY, (1, S), d, np.ones((1, S), d))
            elif role == "onnx:position_ids":
                roots[inp.name] = lambda S, d=dtype: AV(SONLY, (1, S), d, np.arange(S, dtype=d)[None])
            else:
                shape = tuple(1 if i == 0 else d.dim_value if d.HasField("dim_value") else 0
                              for i, d in enumerate(dims))
                roots[inp.name] = lambda S, d=dtype, s=shape: AV(SONLY, s, d, np.zeros(s, d))
        if "input_ids" not in roles:
            raise CheckpointError(f"{self.path}: the graph has no 'input_ids' input")
        return roots, roles


def import_onnx(ckpt: OnnxCheckpoint) -> ModuleOp:
    nodes = ckpt.nodes()
    roots, roles = ckpt.roots()
    weight_nodes = [Node("weight", [], [name], {"name": name, "shape": tuple(t.dims),
                                                "dtype": computed_dtype(t.data_type)})
                    for name, t in ckpt.initializers.items()]
    _check_order(ckpt, nodes, set(roots) | set(ckpt.initializers))
    cache: dict = {}
    with naming(ckpt.path):  # a node's problem, found by evaluating it
        probes = [interpret(weight_nodes + nodes, roots, S, ckpt.read, cache=cache) for S in PROBE_LENGTHS]
        ckpt.position_tables = position_tables(nodes, probes)
        return _emit(ckpt, nodes, roles, probes)


def _check_order(ckpt: OnnxCheckpoint, nodes: list[Node], defined: set[str]) -> None:
    """Each value is defined once (graph input, initializer or node output) before a node reads it."""
    for node in nodes:
        for key in node.inputs:
            if key is not None and key not in defined:
                raise CheckpointError(f"{ckpt.path}: ONNX node '{node.name}' reads '{key}', which no graph input, "
                                      "initializer or earlier node defines")
        for key in node.outputs:
            if key in defined:
                raise CheckpointError(f"{ckpt.path}: ONNX node '{node.name}' defines '{key}' a second time")
        defined.update(k for k in node.outputs if k)
    for out in ckpt.proto.graph.output:
        if out.name not in defined:
            raise CheckpointError(f"{ckpt.path}: graph output '{out.name}' is not computed by the graph")


def position_tables(nodes: list[Node], probes: list[dict]) -> list[Limit]:
    """Constant tables the graph reads at positions 0..S-1 (a Gather by the positions, or a
    Slice to the sequence length): learned position embeddings, rotary caches, causal masks.
    Their rows bound the sequence length."""
    found = []
    for node in nodes:
        if node.op_type not in ("Gather", "Slice") or not node.inputs or node.inputs[0] is None:
            continue
        table = probes[0][node.inputs[0]]
        out = [p[node.outputs[0]] for p in probes]
        if table.kind != CONST or out[0].kind != SONLY:
            continue
        if node.op_type == "Gather":
            axis = node.attrs.get("axis", 0) % max(len(table.shape), 1)
            idx = [p[node.inputs[1]] for p in probes]
            if not all(i.value is not None and i.value.size and int(i.value.max()) == S - 1
                       for i, S in zip(idx, PROBE_LENGTHS)):
                continue
        else:
            axes = [a for a in range(len(table.shape)) if all(len(o.shape) == len(table.shape) and o.shape[a] == S
                                                              for o, S in zip(out, PROBE_LENGTHS))]
            if not axes:
                continue
            axis = axes[0]
        rows = table.shape[axis]
        found.append(Limit(rows, f"position table '{node.inputs[0]}' of ONNX node '{node.name}' has {rows} rows"))
    return found


def _foldable(key, probes: list[dict]) -> bool:
    avs = [p[key] for p in probes]
    if avs[0].kind == DATA:
        return False
    if avs[0].kind == CONST:
        return True
    return all(a.shape == avs[0].shape and np.array_equal(a.value, avs[0].value) for a in avs[1:])


def _type(key, probes: list[dict]) -> TensorType:
    dims = symbolic_shape([p[key].shape for p in probes])
    return TensorType(element_type(probes[0][key].dtype), [L.DYN if a else b for a, b in dims])


def _needed(nodes: list[Node], outputs: list[str]) -> list[Node]:
    """The nodes the outputs depend on, in graph order (present-KV outputs' own computations are left
    out: a sliding-window cache's keys, truncated to the window, have no shape affine in S)."""
    wanted, kept = set(outputs), []
    for node in reversed(nodes):
        if wanted.intersection(node.outputs):
            kept.append(node)
            wanted.update(k for k in node.inputs if k is not None)
    return kept[::-1]


def _emit(ckpt: OnnxCheckpoint, nodes: list[Node], roles: dict, probes: list[dict]) -> ModuleOp:
    graph = ckpt.proto.graph
    inputs = [i.name for i in graph.input if i.name in roles]
    names = [o.name for o in graph.output]
    # The logits; present-KV outputs are what the paged cache replaces.
    outputs = ["logits"] if "logits" in names else names[:1]
    if outputs == ["hidden_states"]:  # onnxruntime-genai's builder with exclude_lm_head=true
        raise CheckpointError(f"{ckpt.path}: the graph's output is 'hidden_states', with no 'logits' (a model "
                              "without its LM head, as the builder's exclude_lm_head writes it): llmirc compiles "
                              "decoders whose output is the logits")
    arg_types = [_type(name, probes) for name in inputs]
    out_types = [_type(name, probes) for name in outputs]
    forward = func.FuncOp("forward", (arg_types, out_types), arg_attrs=ArrayAttr([
        DictionaryAttr({L.ARG_ATTR: StringAttr(roles[n]), "onnx.name": StringAttr(n)}) for n in inputs]))
    block = forward.body.block
    values: dict[str, SSAValue] = dict(zip(inputs, block.args))
    producers = {k: n for n in nodes for k in n.outputs}
    scales = {v for k, v in ckpt.packed_parts.items() if k.endswith(".scales") and v in ckpt.initializers}

    def constant(key: str) -> SSAValue:
        """A folded value (initializer or computed) as llmir.constant (small), llmir.weight, or the
        llmir.transpose of an initializer's llmir.weight (a tied embedding that transposes the LM head's
        MatMul weight, as onnxruntime-genai's builder writes it: then stored once, with the head's). A
        packed weight's scales are an llmir.weight of their stored type (float16 too): the packed weight's."""
        av = probes[0][key]
        if key in scales:
            op = L.WeightOp(key, av.shape, element_type(onnx_ops.DTYPES[ckpt.initializers[key].data_type]))
            block.add_op(op)
            return op.result
        src = producers.get(key)
        if src is not None and src.op_type == "Transpose" and src.inputs[0] in ckpt.initializers and \
                len(av.shape) == 2 and list(src.attrs.get("perm") or [1, 0]) == [1, 0] and \
                int(np.prod(av.shape)) > SMALL_CONSTANT:
            op = L.TransposeOp(operand(src.inputs[0]))
            block.add_op(op)
            return op.result
        value = av.value if av.value is not None else (av.load() if int(np.prod(av.shape)) <= SMALL_CONSTANT
                                                        else None)
        if value is not None and value.size <= SMALL_CONSTANT:
            typ = TensorType(element_type(value.dtype), value.shape)
            flat = value.reshape(-1)
            data = [bool(x) for x in flat] if value.dtype == np.bool_ else \
                [float(x) for x in flat] if value.dtype.kind == "f" else [int(x) for x in flat]
            op = L.ConstantOp(DenseIntOrFPElementsAttr.from_list(typ, data))
        else:
            if value is not None:
                ckpt.folded[key] = value
            op = L.WeightOp(key, av.shape, element_type(av.dtype))
        block.add_op(op)
        return op.result

    def operand(key) -> SSAValue:
        if key is None:
            none = NoneOp()
            block.add_op(none)
            return none.result
        if key not in values:
            values[key] = constant(key)
        return values[key]

    folded = 0
    for node in _needed(nodes, outputs):
        if all(_foldable(k, probes) for k in node.outputs):
            folded += 1
            continue  # its outputs are materialized as constants where they are used
        operands = [operand(k) for k in node.inputs]
        op = make_op(node.op_type, operands, [_type(k, probes) for k in node.outputs], node.attrs, node.name)
        block.add_op(op)
        values.update(zip(node.outputs, op.results))
    block.add_op(func.ReturnOp(*[operand(k) for k in outputs]))
    half = sorted({HALF[t.data_type] for t in ckpt.initializers.values() if t.data_type in HALF})
    expanded, contrib = (", ".join(f"{op} x{n}" for op, n in sorted(c.items())) for c in (ckpt.expanded, ckpt.contrib))
    ckpt.summary = f"{len(nodes)} ONNX nodes, {folded} folded into constants at compile time" + \
        (f", {'/'.join(half)} weights computed in float32" if half else "") + \
        (f", expanded into their ONNX function bodies: {expanded}" if expanded else "") + \
        (f", onnxruntime contrib operators replaced: {contrib}" if contrib else "")
    return ModuleOp([forward])


