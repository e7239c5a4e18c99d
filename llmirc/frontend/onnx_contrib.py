"""onnxruntime's contrib operators that onnxruntime-genai's model builder writes, replaced by the
standard operators they are defined by.

`python -m onnxruntime_genai.models.builder` (the source of most ONNX LLMs people download) writes
its decoders with four operators of onnxruntime's own (ONNX Runtime's ContribOperators.md):
`SimplifiedLayerNormalization` (RMSNorm; in the default domain, though no ONNX opset defines it),
`com.microsoft.SkipSimplifiedLayerNormalization` (the residual add, then RMSNorm),
`com.microsoft.SkipLayerNormalization` (the same with LayerNorm) and
`com.microsoft.GroupQueryAttention` (rotary embedding from cos/sin tables, the KV cache's append
and causal grouped-query attention in one node); for `-e cpu -p fp16`, `com.microsoft.RotaryEmbedding`
and `com.microsoft.MultiHeadAttention` in its place. Each call is replaced here by the standard
operators that compute it, spelled as torch.onnx spells them, so the importer, its fusions and the
full-sequence fallback read a builder's model as they read an exported one: there is one reading
of each computation. The KV cache is the paged one llmirc makes; the node's past/present inputs
and outputs keep their meaning (present = past followed by the step's keys and values).

What the replacement does not compute is refused by name: GroupQueryAttention's
smooth_softmax, attention_bias and head_sink, a rotary table narrower than the head (partial
rotary), the norms' mean / inv_std_var outputs, RotaryEmbedding's is_packed_batching and scale (which
onnxruntime's CPU kernel ignores), MultiHeadAttention's packed q/k/v, past_sequence_length,
cache_indirection and qk output, and a past without the present outputs. Padding is not modelled: a
batch of one sequence without padding, as the importer reads every graph (seqlens_k and
total_sequence_length then say nothing more than the shapes do).

`com.microsoft.MatMulNBits` and `GatherBlockQuantized` (the builder's int4 and int8 weights,
`-p int4`; the second for an embedding tied to the LM head, read from the head's codes) are kept as
operators of their own (KEPT): onnx-fuse-linear and onnx-fuse-embedding make them a linear and an
embedding of an `llmir.packed_weight` (format `matmul_nbits`), repacked losslessly into llmirc's
layout (frontend/packed.py) from the parts `matmul_nbits_parts` reads, so the weights stay
quantized, one copy for a tied pair. The QDQ form of the same weights (`use_qdq=true`: a blocked
DequantizeLinear before a MatMul or a Gather) and GatherBlockQuantized of int4 codes are rewritten
into these two first (`_blocked_dequantize_to_nbits`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmirc.errors import CheckpointError

MS = "com.microsoft"
SUPPORTED = {("", "SimplifiedLayerNormalization"), (MS, "SimplifiedLayerNormalization"),
             (MS, "SkipSimplifiedLayerNormalization"), (MS, "SkipLayerNormalization"), (MS, "GroupQueryAttention"),
             (MS, "RotaryEmbedding"), (MS, "MultiHeadAttention")}
RANKED = {"RotaryEmbedding", "MultiHeadAttention"}  # their forms differ by their inputs' ranks

# kept as operators: the positions of their packed codes, scales and zero points among the inputs
KEPT = {(MS, "MatMulNBits"): (1, 2, 3), (MS, "GatherBlockQuantized"): (0, 2, 3)}


def expand_contrib(model: onnx.ModelProto, path: Path) -> list[str]:
    """Replace, in place, every call of a SUPPORTED contrib operator in the top graph by standard
    operators (opset 18 and later spellings: ReduceMean, Split and Squeeze take their axes as
    inputs). Returns the replaced operators' names, one per call, for the compile report. Raises
    CheckpointError naming the file and the node for a call the replacement does not compute."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    calls = [n for n in model.graph.node if (_domain(n), n.op_type) in SUPPORTED]
    if calls and opset < 18:
        raise CheckpointError(f"{path}: contrib operators ({calls[0].op_type}) are read at opset 18 and later, "
                              f"this model imports opset {opset}")
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input}
    pending: list = []  # (call, its keys, kv heads) whose head size only shape inference finds
    nodes, expanded = [], []
    ranks = _ranks(model) if any(n.op_type in RANKED for n in calls) else {}
    original = list(model.graph.node)
    for at, n in enumerate(original):
        if (_domain(n), n.op_type) not in SUPPORTED:
            nodes.append(n)
            continue
        if n.op_type in RANKED and any(i and i not in ranks for i in n.input):
            # values after calls onnx has no schema for: inferred again through the calls replaced so far
            ranks.update({k: v for k, v in _ranks(model, nodes + original[at:]).items() if k not in ranks})
        b = _Body(n, path, ranks)
        _BODIES[n.op_type](b, inits, graph_inputs, pending)
        nodes.extend(b.nodes)
        expanded.append(f"{_domain(n) + '.' if _domain(n) else ''}{n.op_type}")
    if calls:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _infer_head_size(model, graph_inputs, pending, path)
    _gather_stored_codes(model, inits)
    expanded += _blocked_dequantize_to_nbits(model, path)
    return expanded


_QDQ_CODES = {onnx.TensorProto.INT4: (4, 8), onnx.TensorProto.UINT4: (4, 0),
              onnx.TensorProto.INT8: (8, 128), onnx.TensorProto.UINT8: (8, 0)}  # bits, offset to unsigned


def _blocked_dequantize_to_nbits(model: onnx.ModelProto, path: Path) -> list[str]:
    """The QDQ form of blocked int4/int8 weights (the builder's `use_qdq=true`, and Gather quantized
    by `op_types_to_quantize=MatMul/Gather`): a DequantizeLinear (opset 21's block_size) of stored
    codes [K, N] blocked along K, read only by MatMul as its B, is that MatMul's MatMulNBits; of a
    table [V, H] blocked along H, read only by Gather as its data, the Gather's GatherBlockQuantized.
    The codes are the same numbers made unsigned (int4 + 8, int8 + 128, the zero points so too), so
    both read them as they read the builder's default form: quantized, repacked losslessly. Other
    DequantizeLinear nodes are left as they are. Returns what was rewritten, one entry per node."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    replaced, dropped, added, done = {}, set(), [], []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or _domain(n) or len(n.output) != 1 or n.output[0] in outputs:
            continue
        x, scale = (inits.get(i) for i in (list(n.input) + [""])[:2])
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        users = readers.get(n.output[0], [])
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        block, axis = attrs.get("block_size", 0), attrs.get("axis", 1)
        if x is None or scale is None or x.data_type not in _QDQ_CODES or len(x.dims) != 2 or len(users) != 1 or \
                (zp is not None and zp.data_type != x.data_type) or block < 16 or block & (block - 1):
            continue
        user, (rows, cols) = users[0], x.dims
        matmul = user.op_type == "MatMul" and list(user.input).index(n.output[0]) == 1 and axis in (0, -2)
        gather = user.op_type == "Gather" and list(user.input).index(n.output[0]) == 0 and axis in (1, -1) and \
            next((a.i for a in user.attribute if a.name == "axis"), 0) == 0
        k, n_rows = (rows, cols) if matmul else (cols, rows)  # the weight [N, K] / table [V, H] read
        if _domain(user) or not (matmul or gather) or k % block or tuple(scale.dims) != \
                ((k // block, n_rows) if matmul else (n_rows, k // block)):
            continue
        bits, offset = _QDQ_CODES[x.data_type]
        read = [numpy_helper.to_array(t, str(path.parent)) for t in (x, scale) + ((zp,) if zp is not None else ())]
        codes = (read[0].astype(np.int16) + offset).astype(np.uint8)
        codes, scales = (codes.T, read[1].T) if matmul else (codes, read[1])
        packed = codes if bits == 8 else _pack4(codes)
        stem = n.output[0]
        names = [f"{stem}_nbits_codes", f"{stem}_nbits_scales"]
        added += [numpy_helper.from_array(np.ascontiguousarray(packed.reshape(n_rows, k // block, -1) if matmul
                                                                else packed), names[0]),
                  numpy_helper.from_array(np.ascontiguousarray(scales), names[1])]
        if zp is not None or not offset:  # (unsigned codes without zero points: zero 0, not 2^(bits-1))
            z = (read[2].astype(np.int16) + offset).astype(np.uint8) if zp is not None else \
                np.zeros(read[1].shape, np.uint8)
            z = z.T if matmul else z
            z = _pack4(z) if bits == 4 else z
            names.append(f"{stem}_nbits_zero_points")
            added.append(numpy_helper.from_array(np.ascontiguousarray(z.reshape(-1) if matmul else z), names[2]))
        if matmul:
            replaced[id(user)] = helper.make_node("MatMulNBits", [user.input[0], *names], list(user.output),
                                                  user.name, domain=MS, K=k, N=n_rows, bits=bits, block_size=block)
        else:
            replaced[id(user)] = helper.make_node(
                "GatherBlockQuantized", [names[0], user.input[1], *names[1:]], list(user.output), user.name,
                domain=MS, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        replaced[id(n)] = None
        dropped.update(i for i in n.input if i)
        done.append(f"DequantizeLinear + {user.op_type} -> {replaced[id(user)].op_type}")
    for n in model.graph.node:  # GatherBlockQuantized of int4 codes (zero 0) or uint4 codes and zero points:
        data = inits.get(n.input[0]) if (_domain(n), n.op_type) == (MS, "GatherBlockQuantized") else None
        zp_name = n.input[3] if data is not None and len(n.input) > 3 else ""  # the same as unsigned bytes
        if data is None or data.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or \
                len(data.dims) != 2 or data.dims[1] % 2 or (data.data_type == onnx.TensorProto.UINT4 and not zp_name):
            continue
        if zp_name and (zp_name not in inits or inits[zp_name].data_type != data.data_type):
            continue
        offset = 8 if data.data_type == onnx.TensorProto.INT4 else 0
        zp = numpy_helper.to_array(inits[zp_name], str(path.parent)) if zp_name else None
        codes = (numpy_helper.to_array(data, str(path.parent)).astype(np.int16) + offset).astype(np.uint8)
        new = [numpy_helper.from_array(_pack4(codes), f"{n.input[0]}_uint4")]
        if zp is not None:
            new.append(numpy_helper.from_array(_pack4((zp.astype(np.int16) + offset).astype(np.uint8)),
                                               f"{zp_name}_uint4"))
        dropped.update(i for i in (n.input[0], zp_name) if i)
        n.input[0] = new[0].name
        if zp_name:
            n.input[3] = new[1].name
        added += new
        done.append("GatherBlockQuantized of 4-bit codes -> of uint8")
    if not added:
        return done
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    still = {i for n in model.graph.node for i in n.input} | outputs
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return done


def _ranks(model: onnx.ModelProto, nodes: list | None = None) -> dict[str, tuple[int, tuple]]:
    """(element type, dims: ints or None) of the graph's values that its inputs, initializers, value_info
    and onnx's shape inference give (the builder writes value_info for every node's output), for the
    graph's nodes or `nodes` in their place."""
    if nodes is not None:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # (the importer reports what is wrong with the graph)
        typed = model
    g = typed.graph
    ranks = {t.name: (t.data_type, tuple(t.dims)) for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            ranks[v.name] = (tt.elem_type, dims)
    return ranks


def _reshaped_rows(reshape: onnx.NodeProto, inits: dict, made: dict) -> int | None:
    """The rows a Reshape to [rows, cols] asks for, from a stored shape or a Constant (else None)."""
    name = reshape.input[1] if len(reshape.input) > 1 else ""
    const = made.get(name)
    shape = inits.get(name) if const is None else next(
        (a.t for a in const.attribute if a.name == "value") if const.op_type == "Constant" else iter(()), None)
    if shape is None:
        return None
    values = numpy_helper.to_array(shape).reshape(-1)
    return int(values[0]) if len(values) == 2 else None


def _gather_stored_codes(model: onnx.ModelProto, inits: dict) -> None:
    """GatherBlockQuantized of a Reshape of stored codes (the builder's tied embedding reads the LM
    head's MatMulNBits codes [N, blocks, blob] as [N, blocks * blob]) reads the stored tensor itself:
    the same bytes, and the same packed weight as the head's."""
    made = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        src = made.get(n.input[0]) if (n.domain, n.op_type) == (MS, "GatherBlockQuantized") and n.input else None
        if src is not None and src.op_type == "Reshape" and src.input[0] in inits and \
                len(inits[src.input[0]].dims) >= 2 and inits[src.input[0]].dims[0] == _reshaped_rows(src, inits, made):
            n.input[0] = src.input[0]
            for a in n.attribute:  # (each row's codes are still its last axis's, now in blocks)
                if a.name == "quantize_axis":
                    a.i = len(inits[src.input[0]].dims) - 1


def _infer_head_size(model: onnx.ModelProto, graph_inputs: dict, pending: list[tuple[_Body, str, int]],
                     path: Path) -> None:
    """Past inputs of calls without rotary tables (no head size to read off them), and past inputs a
    Concat appends keys or values to (MultiHeadAttention's past, or the builder's own Concat before it
    for grouped-query heads): the heads and head size of what they are concatenated with, as onnx's
    shape inference finds them."""
    concats = [n for n in model.graph.node if n.op_type == "Concat" and len(n.input) == 2 and
               n.input[0] in graph_inputs and any(a.name == "axis" and a.i == 2 for a in n.attribute) and
               any(not d.HasField("dim_value") for d in graph_inputs[n.input[0]].type.tensor_type.shape.dim[1:])]
    if not pending and not concats:
        return
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # (the importer reports what is wrong with the graph)
        return
    shapes = {v.name: v.type.tensor_type.shape.dim for v in typed.graph.value_info}
    for b, keys, kv_heads in pending:
        dims = shapes.get(keys, ())
        if len(dims) == 4 and dims[3].HasField("dim_value"):
            for i in (3, 4):
                _past_dims(b, graph_inputs.get(b.input(i)), kv_heads, dims[3].dim_value)
    for n in concats:
        dims = shapes.get(n.input[1], ())
        if len(dims) == 4 and all(dims[i].HasField("dim_value") for i in (1, 3)):
            _past_dims(_Body(n, path), graph_inputs[n.input[0]], dims[1].dim_value, dims[3].dim_value)


def _domain(n: onnx.NodeProto) -> str:
    return "" if n.domain in ("", "ai.onnx") else n.domain


class _Body:
    """The standard nodes replacing one call; intermediate values are named after the call."""

    def __init__(self, node: onnx.NodeProto, path: Path, ranks: dict[str, tuple] | None = None):
        self.node, self.path, self.nodes, self.ranks = node, path, [], ranks if ranks is not None else {}
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.name = node.name or f"{node.op_type}_{node.output[0]}"

    def input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def output(self, i: int) -> str:
        return self.node.output[i] if i < len(self.node.output) else ""

    def fail(self, problem: str):
        raise CheckpointError(f"{self.path}: ONNX {self.node.op_type} node '{self.name}': {problem}")

    def rank(self, i: int, *allowed: int) -> int:
        """The rank of input i, one of `allowed` (else the call is refused)."""
        known = self.ranks.get(self.input(i))
        if known is None:
            self.fail(f"the rank of input {i} ('{self.input(i)}') is not known (no shape for it in the graph)")
        if len(known[1]) not in allowed:
            self.fail(f"input {i} ('{self.input(i)}') has rank {len(known[1])}, where llmirc reads "
                      f"{' or '.join(map(str, allowed))}")
        return len(known[1])

    def dim(self, i: int, axis: int) -> int | None:
        """Input i's size along `axis` where the graph gives it."""
        known = self.ranks.get(self.input(i))
        return known[1][axis] if known is not None and -len(known[1]) <= axis < len(known[1]) else None

    def typed(self, i: int, rank: int) -> None:
        """Record output i's rank (and input 0's element type): later calls read it."""
        if self.output(i) and self.output(i) not in self.ranks:
            self.ranks[self.output(i)] = (self.ranks.get(self.input(0), (0, ()))[0], (None,) * rank)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"{self.name}/{op_type}.{len(self.nodes)}"
        name = f"{self.name}/{op_type}.{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype)))

    def scalar(self, value: float, elem_type: int) -> str:
        """A float scalar of an ONNX element type (a constant: CastLike of an activation would not be)."""
        return self.op("Cast", self.const(value, np.float32), to=elem_type)


def _rms(b: _Body, x: str, gamma: str, eps: float, out: str, inits: dict) -> None:
    """x / sqrt(mean(x^2 over the last axis) + eps) * gamma (torch.onnx's spelling of RMSNorm)."""
    t = _elem_type(b, inits, gamma)
    mean = b.op("ReduceMean", b.op("Pow", x, b.scalar(2.0, t)), b.const([-1]), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean, b.scalar(eps, t))))
    b.op("Mul", b.op("Mul", x, inv), gamma, out=out)


def _elem_type(b: _Body, known: dict, name: str) -> int:
    """The element type of an initializer or graph input (the activations' type in a builder's model)."""
    v = known.get(name)
    t = v.data_type if isinstance(v, onnx.TensorProto) else v.type.tensor_type.elem_type if v is not None else 0
    if t not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        b.fail(f"'{name}' must be a stored weight or a graph input of a float type")
    return t


def _no_statistics(b: _Body, *outputs: int) -> None:
    for i in outputs:
        if b.output(i):
            b.fail(f"output {i} (the normalization's statistics) is not computed by llmirc")


def _simplified_layer_norm(b: _Body, inits: dict, *_) -> None:
    if b.attrs.get("axis", -1) != -1:
        b.fail(f"axis {b.attrs['axis']}: llmirc reads RMSNorm over the last axis only")
    _no_statistics(b, 1)
    _rms(b, b.input(0), b.input(1), float(b.attrs.get("epsilon", 1e-5)), b.output(0), inits)


def _skip_norm(b: _Body, inits: dict, *_) -> None:
    """SkipSimplifiedLayerNormalization(input, skip, gamma) and SkipLayerNormalization(input, skip,
    gamma, beta, bias): s = input + skip (+ bias), output 0 the norm of s, output 3 s itself."""
    simplified = b.node.op_type == "SkipSimplifiedLayerNormalization"
    if simplified and b.input(3):
        b.fail("a bias input is not read by llmirc")  # (onnxruntime's versions disagree on where it goes)
    _no_statistics(b, 1, 2)
    s = b.op("Add", b.input(0), b.input(1))
    if not simplified and b.input(4):
        s = b.op("Add", s, b.input(4))
    if b.output(3):
        b.op("Identity", s, out=b.output(3))
    eps = float(b.attrs.get("epsilon", 1e-12))
    if simplified:
        _rms(b, s, b.input(2), eps, b.output(0), inits)
        return
    inputs = [s, b.input(2)] + ([b.input(3)] if b.input(3) else [])
    b.op("LayerNormalization", *inputs, out=b.output(0), axis=-1, epsilon=eps)


def _group_query_attention(b: _Body, inits: dict, graph_inputs: dict, pending: list) -> None:
    """GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
    cos_cache, sin_cache, position_ids): query [B, S, Hq*D] (q, k and v packed when key and value are
    omitted), past [B, Hkv, P, D]; output [B, S, Hq*D], present [B, Hkv, P + S, D]."""
    a = b.attrs
    if a.get("smooth_softmax", 0):
        b.fail(f"smooth_softmax={a['smooth_softmax']} is not computed by llmirc")
    cap = float(a.get("softcap", 0.0))
    if not 0.0 <= cap < float("inf"):
        b.fail(f"softcap={cap} is not a finite number >= 0")
    for i, what in ((10, "attention_bias"), (11, "head_sink")):
        if b.input(i):
            b.fail(f"input {i} ({what}) is not read by llmirc")
    heads, kv_heads = int(a.get("num_heads", 0)), int(a.get("kv_num_heads", 0))
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        b.fail(f"num_heads {heads} is not a positive multiple of kv_num_heads {kv_heads}")
    if bool(b.input(1)) != bool(b.input(2)):
        b.fail("key and value must both be given, or both omitted (q, k and v packed in query)")
    if not (b.input(3) and b.input(4)):
        b.fail("past_key and past_value are missing")
    rotary = bool(a.get("do_rotary", 0))
    d = -1
    if rotary:
        tables = [inits.get(b.input(i)) for i in (7, 8)]
        if any(t is None or len(t.dims) != 2 for t in tables) or tables[0].dims != tables[1].dims:
            b.fail("with do_rotary, cos_cache and sin_cache must be stored tables of one shape [positions, d/2]")
        d = 2 * int(tables[0].dims[1])  # the whole head rotates: a narrower table fails the head's reshape
    q, k, v = b.input(0), b.input(1), b.input(2)
    t = _elem_type(b, {**inits, **graph_inputs}, b.input(3))

    def heads_first(x: str, n: int) -> str:  # [B, S, n*D] -> [B, n, S, D]
        return b.op("Transpose", b.op("Reshape", x, b.const([0, 0, n, d])), perm=[0, 2, 1, 3])

    if k:
        q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
    else:
        packed = b.op("Transpose", b.op("Reshape", q, b.const([0, 0, heads + 2 * kv_heads, d])), perm=[0, 2, 1, 3])
        q, k, v = (f"{b.name}/{x}" for x in "qkv")
        b.nodes.append(helper.make_node("Split", [packed, b.const([heads, kv_heads, kv_heads])], [q, k, v],
                                        name=f"{b.name}/Split", axis=1))
    past_len = b.op("Shape", b.input(3), start=2, end=3)
    total = b.op("Add", past_len, b.op("Shape", q, start=2, end=3))
    if rotary:
        if b.input(9):  # position_ids [B, S] -> tables [B, 1, S, d/2]
            cos, sin = (b.op("Unsqueeze", b.op("Gather", b.input(i), b.input(9), axis=0), b.const([1])) for i in (7, 8))
        else:  # positions past_len .. total - 1
            pos = b.op("Range", *(b.op("Squeeze", x, b.const([0])) for x in (past_len, total)), b.const(1))
            cos, sin = (b.op("Gather", b.input(i), pos, axis=0) for i in (7, 8))
        q, k = (_rotate(b, x, cos, sin, d, bool(a.get("rotary_interleaved", 0))) for x in (q, k))
    for i in (3, 4):  # the builder leaves the past's head size symbolic ('kv_cache_dim'): it is D
        _past_dims(b, graph_inputs.get(b.input(i)), kv_heads, d)
    if d < 0:
        pending.append((b, k, kv_heads))
    k = b.op("Concat", b.input(3), k, axis=2, out=b.output(1) or None)
    v = b.op("Concat", b.input(4), v, axis=2, out=b.output(2) or None)
    if heads != kv_heads:  # [B, Hkv, T, D] -> [B, Hq, T, D], each kv head serving heads/kv_heads query heads
        repeat = b.const([1, 1, heads // kv_heads, 1, 1])
        k, v = (b.op("Reshape", b.op("Expand", b.op("Unsqueeze", x, b.const([2])), repeat), b.const([0, heads, -1, d]))
                for x in (k, v))
    mask = _causal_mask(b, past_len, total, int(a.get("local_window_size", -1)), t)
    scores = _scaled_scores(b, q, k, float(a.get("scale", 0.0)), t)
    if cap:  # Gemma 2's soft-capping, as transformers' eager attention spells it: tanh(s / cap) * cap
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, b.scalar(cap, t))), b.scalar(cap, t))
    scores = b.op("Add", scores, mask)
    out = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, -1]), out=b.output(0))


def _past_dims(b: _Body, inp: onnx.ValueInfoProto | None, kv_heads: int, d: int) -> None:
    """A past input [B, Hkv, P, D] of the graph: symbolic Hkv and D (known here) made fixed; fixed ones
    that disagree refused."""
    if inp is None or len(inp.type.tensor_type.shape.dim) != 4:
        return
    for axis, want in ((1, kv_heads), (3, d)):
        dim = inp.type.tensor_type.shape.dim[axis]
        if want < 0:
            continue
        if dim.HasField("dim_value") and dim.dim_value != want:
            b.fail(f"input '{inp.name}' has {dim.dim_value} at axis {axis}, where {want} is expected")
        dim.dim_value = want


def _rotate(b: _Body, x: str, cos: str, sin: str, d: int, interleaved: bool, partial: bool = False) -> str:
    """x [B, H, S, D] (or [B, S, H, D]) rotated by the angles whose cos and sin are given (broadcasting
    to [.., d/2]): halves (x1, x2) of its first d elements -> (x1 c - x2 s, x2 c + x1 s), or their even
    and odd elements when interleaved; with `partial`, x's elements after the first d kept as they are
    (d is then at most D, else D itself)."""
    def part(start: int, step: int) -> str:
        return b.op("Slice", x, b.const([start]), b.const([d if step == 2 else start + d // 2]), b.const([3]),
                    b.const([step]))
    x1, x2 = (part(0, 2), part(1, 2)) if interleaved else (part(0, 1), part(d // 2, 1))
    r1 = b.op("Sub", b.op("Mul", x1, cos), b.op("Mul", x2, sin))
    r2 = b.op("Add", b.op("Mul", x2, cos), b.op("Mul", x1, sin))
    if not interleaved:
        rotated = b.op("Concat", r1, r2, axis=3)
    else:
        pairs = b.op("Concat", b.op("Unsqueeze", r1, b.const([4])), b.op("Unsqueeze", r2, b.const([4])), axis=4)
        rotated = b.op("Reshape", pairs, b.const([0, 0, 0, d]))
    if not partial:
        return rotated
    rest = b.op("Slice", x, b.const([d]), b.const([np.iinfo(np.int64).max]), b.const([3]))
    return b.op("Concat", rotated, rest, axis=3)


def _scaled_scores(b: _Body, q: str, k: str, scale: float, t: int) -> str:
    """q [B, H, S, D] times k [B, H, T, D] transposed, times `scale` (0: 1 / sqrt(D), as the contrib
    attention operators default it), in element type t."""
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    if scale:
        return b.op("Mul", scores, b.scalar(scale, t))
    width = b.op("Cast", b.op("Shape", q, start=3, end=4), to=t)
    return b.op("Div", scores, b.op("Sqrt", width))


def _causal_mask(b: _Body, past_len: str, total: str, window: int, t: int) -> str:
    """[S, T] additive mask: query i (position past_len + i) reads key j where j <= past_len + i, and
    with a window w > 0 where j > past_len + i - w (local_window_size: w keys, the query's own
    among them, as onnxruntime computes it and transformers' sliding_window counts)."""
    scalar = [b.op("Squeeze", x, b.const([0])) for x in (past_len, total)]
    rows = b.op("Unsqueeze", b.op("Range", *scalar, b.const(1)), b.const([1]))
    cols = b.op("Range", b.const(0), scalar[1], b.const(1))
    allowed = b.op("LessOrEqual", cols, rows)
    if window > 0:
        allowed = b.op("And", allowed, b.op("Greater", cols, b.op("Sub", rows, b.const(window))))
    return b.op("Where", allowed, b.scalar(0.0, t), b.scalar(float(np.finfo(np.float32).min), t))


def _rotary_embedding(b: _Body, inits: dict, *_) -> None:
    """RotaryEmbedding(input, position_ids, cos_cache, sin_cache): input [B, S, N*H] or [B, N, S, H],
    each head's first r elements rotated (r = 2 * the tables' width; r < H only with num_heads and
    rotary_embedding_dim given: partial rotary), as halves or interleaved pairs, by the tables' rows at
    position_ids [B, S], or at position_ids[0] + i for position_ids of shape [1]."""
    a = b.attrs
    if a.get("is_packed_batching", 0):
        b.fail("is_packed_batching=1 (ragged batches) is not read by llmirc")
    if float(a.get("scale", 1.0)) != 1.0:
        b.fail(f"scale={a['scale']} is not read by llmirc (onnxruntime's CPU kernel ignores it)")
    tables = [inits.get(b.input(i)) for i in (2, 3)]
    if any(t is None or len(t.dims) != 2 for t in tables) or tables[0].dims != tables[1].dims:
        b.fail("cos_cache and sin_cache must be stored tables of one shape [positions, r/2]")
    r = 2 * int(tables[0].dims[1])
    heads, dim = int(a.get("num_heads", 0)), int(a.get("rotary_embedding_dim", 0))
    rank, pos_rank = b.rank(0, 3, 4), b.rank(1, 1, 2)
    if dim and dim != r:
        b.fail(f"rotary_embedding_dim {dim} with tables of width {r // 2} (rotary_embedding_dim / 2 expected)")
    if dim and rank == 3 and not heads:
        b.fail("rotary_embedding_dim without num_heads (onnxruntime requires both for a 3D input)")
    x = b.input(0)
    if rank == 3:  # [B, S, N*H] -> [B, S, N, H]
        x = b.op("Reshape", x, b.const([0, 0, heads, -1] if dim else [0, 0, -1, r]))
    if rank == 4:
        head = b.dim(0, 3)
    elif not dim:  # (heads of the tables' width)
        head = r
    else:
        head = b.dim(0, 2) // heads if b.dim(0, 2) else None
    seq_axis = 1 if rank == 3 else 2  # of x as rotated; the tables get a unit heads axis
    if pos_rank == 2:  # [B, S] -> tables [B, S, 1, r/2] or [B, 1, S, r/2]
        cos, sin = (b.op("Unsqueeze", b.op("Gather", b.input(i), b.input(1), axis=0), b.const([3 - seq_axis]))
                    for i in (2, 3))
    else:  # positions p .. p + S - 1 -> tables [S, 1, r/2] or [S, r/2]
        start = b.op("Squeeze", b.op("Reshape", b.input(1), b.const([1])), b.const([0]))
        length = b.op("Squeeze", b.op("Shape", x, start=seq_axis, end=seq_axis + 1), b.const([0]))
        pos = b.op("Range", start, b.op("Add", start, length), b.op("CastLike", b.const(1), start))
        cos, sin = (b.op("Gather", b.input(i), pos, axis=0) for i in (2, 3))
        if rank == 3:
            cos, sin = (b.op("Unsqueeze", t, b.const([1])) for t in (cos, sin))
    y = _rotate(b, x, cos, sin, r, bool(a.get("interleaved", 0)), partial=head != r)
    b.op("Reshape", y, b.const([0, 0, -1]), out=b.output(0)) if rank == 3 else b.op("Identity", y, out=b.output(0))
    b.typed(0, rank)


def _multi_head_attention(b: _Body, inits: dict, graph_inputs: dict, pending: list) -> None:
    """MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value):
    query [B, S, N*H], key and value [B, L, N*H] (appended to past_key/past_value [B, N, P, H] when given:
    present = the concatenation, T = P + L) or [B, N, T, H] as they are; bias [3 widths] added to q, k
    and v; key_padding_mask [B, T] or [B, S, T] (0: masked by mask_filter_value), attention_bias
    [B|1, N|1, S, T] added to the scaled scores; unidirectional: query i reads keys j <= T - S + i."""
    a = b.attrs
    heads = int(a.get("num_heads", 0))
    if heads < 1:
        b.fail(f"num_heads {heads} is not a positive number")
    for i, what in ((8, "past_sequence_length (a shared KV buffer)"), (9, "cache_indirection (beam search)")):
        if b.input(i):
            b.fail(f"input {i} ({what}) is not read by llmirc")
    if b.output(3):
        b.fail("output 3 (qk, the attention probabilities) is not computed by llmirc")
    if not (b.input(1) and b.input(2)):
        b.fail("key and value must be given (q, k and v packed in query are not read by llmirc)")
    b.rank(0, 3)
    kv_rank = b.rank(1, 3, 4)
    b.rank(2, kv_rank)
    if bool(b.input(6)) != bool(b.input(7)):
        b.fail("past_key and past_value must both be given, or both omitted")
    if b.input(6) and not (b.output(1) and b.output(2)):  # (its CPU kernel then reads no past: garbage out)
        b.fail("past_key and past_value without the present_key and present_value outputs are not read by llmirc")
    if kv_rank == 4 and (b.input(3) or b.input(6)):
        b.fail("key and value of shape [B, N, T, H] (used as they are) with a bias or a past are not read by llmirc")
    t = b.ranks.get(b.input(0), (0,))[0]
    if t not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        b.fail(f"query '{b.input(0)}' must be of a float type")
    q, k, v = b.input(0), b.input(1), b.input(2)
    if b.input(3):  # bias [Dq + Dk + Dv]: Dk = Dq
        dq, dv = (b.op("Shape", x, start=2, end=3) for x in (q, v))
        ends = [dq, b.op("Add", dq, dq), b.op("Add", b.op("Add", dq, dq), dv)]
        starts = [b.const([0]), ends[0], ends[1]]
        q, k, v = (b.op("Add", x, b.op("Slice", b.input(3), s0, e, b.const([0])))
                   for x, s0, e in zip((q, k, v), starts, ends))

    def heads_first(x: str) -> str:  # [B, S, N*H] -> [B, N, S, H]
        return b.op("Transpose", b.op("Reshape", x, b.const([0, 0, heads, -1])), perm=[0, 2, 1, 3])

    q = heads_first(q)
    if kv_rank == 3:
        k, v = heads_first(k), heads_first(v)
    if b.input(6):
        k = b.op("Concat", b.input(6), k, axis=2, out=b.output(1) or None)
        v = b.op("Concat", b.input(7), v, axis=2, out=b.output(2) or None)
    else:
        for i, x in ((1, k), (2, v)):
            if b.output(i):
                b.op("Identity", x, out=b.output(i))
    scores = _scaled_scores(b, q, k, float(a.get("scale", 0.0)), t)
    total = b.op("Shape", k, start=2, end=3)
    if a.get("unidirectional", 0):
        past_len = b.op("Sub", total, b.op("Shape", q, start=2, end=3))
        scores = b.op("Add", scores, _causal_mask(b, past_len, total, -1, t))
    if b.input(4):
        mask_rank = b.rank(4, 2, 3)
        masked = b.op("Equal", b.op("Cast", b.input(4), to=onnx.TensorProto.INT64), b.const(0))
        filt = b.op("Where", masked, b.scalar(float(a.get("mask_filter_value", -10000.0)), t), b.scalar(0.0, t))
        scores = b.op("Add", scores, b.op("Unsqueeze", filt, b.const([1, 2] if mask_rank == 2 else [1])))
    if b.input(5):
        scores = b.op("Add", scores, b.input(5))
    out = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, -1]), out=b.output(0))
    b.typed(0, 3)
    b.typed(1, 4)
    b.typed(2, 4)


_BODIES = {"SimplifiedLayerNormalization": _simplified_layer_norm, "SkipSimplifiedLayerNormalization": _skip_norm,
           "SkipLayerNormalization": _skip_norm, "GroupQueryAttention": _group_query_attention,
           "RotaryEmbedding": _rotary_embedding, "MultiHeadAttention": _multi_head_attention}


def matmul_nbits_problem(b_shape: tuple, b_dtype, scales_size: int, k: int, bits: int, block: int) -> str | None:
    """Why MatMulNBits' B (of this shape and dtype) and scales (of this size) are not the layout
    `matmul_nbits_parts` reads for K inputs, or None: checkable from the shapes alone."""
    if bits not in (4, 8):
        return f"{bits}-bit weights (llmirc reads 4 and 8 bits)"
    if block < 16 or block & (block - 1) or k % block:
        return f"K={k} in blocks of {block}: llmirc reads blocks of a power of two of at least 16 dividing K"
    n, blocks = (b_shape[0] if len(b_shape) else 0), k // block
    if np.dtype(b_dtype) != np.uint8 or n == 0 or int(np.prod(b_shape)) != n * k * bits // 8:
        return (f"B is {np.dtype(b_dtype)}{list(b_shape)}, where uint8[N, {blocks}, {block * bits // 8}] (or any "
                "shape of those bytes a row) is expected")
    if scales_size != n * blocks:
        return f"scales has {scales_size} values, where {n * blocks} are expected"
    return None


def _pack4(u: np.ndarray) -> np.ndarray:
    """[rows, count] 4-bit codes -> [rows, ceil(count / 2)] bytes, the first code in the low bits
    (`_unpack`'s layout); an odd row padded with 8, the default zero point."""
    u = np.concatenate([u, np.full((u.shape[0], u.shape[1] % 2), 8, np.uint8)], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _unpack(x: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[rows, bytes] of 8 / bits codes a byte (the first in the lowest bits) -> [rows, count] codes."""
    if bits == 8:
        return x[:, :count]
    return np.stack([x & 15, x >> 4], -1).reshape(x.shape[0], -1)[:, :count]


def _zero_points(zero_points, n: int, blocks: int, bits: int) -> np.ndarray:
    """zero_points uint8, packed as the codes and each row padded to whole bytes -> [n, blocks]."""
    zp = np.asarray(zero_points)
    per_row = -(-blocks * bits // 8)
    if zp.dtype != np.uint8 or zp.size != n * per_row:
        raise ValueError(f"zero_points is {zp.dtype}{list(zp.shape)}, where uint8[{n * per_row}] is expected "
                         "(llmirc does not read float zero points)")
    return _unpack(zp.reshape(n, per_row), bits, blocks)


def matmul_nbits_parts(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, bits: int,
                       block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' weight (ONNX Runtime's ContribOperators.md) as (codes uint8 [N, K], scales
    float32 [N, K / block], zero points uint8 [N, K / block] or None for the default 2^(bits-1)):
    B uint8 [N, K / block, block * bits / 8] holds each block's codes, 8 / bits per byte, the first
    in the lowest bits; scales [N * K / block] (any shape of that size); zero_points uint8 packed the
    same way, each row's padded to whole bytes. w[n, i] = scales[n, i / block] * (code - zero).
    Raises ValueError for what does not fit that layout (llmirc reads 4 and 8 bits, K a multiple of
    block, zero points as codes rather than floats)."""
    b, scales = np.asarray(b), np.asarray(scales)
    problem = matmul_nbits_problem(b.shape, b.dtype, scales.size, k, bits, block)
    if problem is None and scales.dtype.kind != "f":
        problem = f"scales of type {scales.dtype} (floats expected)"
    if problem is not None:
        raise ValueError(problem)
    n, blocks = b.shape[0], k // block
    zeros = None if zero_points is None else _zero_points(zero_points, n, blocks, bits)
    return _unpack(b.reshape(n, -1), bits, k), scales.reshape(n, blocks).astype(np.float32), zeros


def matmul_nbits_weight(b, scales, zero_points, k: int, bits: int, block: int) -> np.ndarray:
    """The float32 weight [N, K] MatMulNBits' parts stand for (the reference the importer evaluates)."""
    codes, s, z = matmul_nbits_parts(b, scales, zero_points, k, bits, block)
    zero = np.float32(1 << (bits - 1)) if z is None else np.repeat(z, block, 1).astype(np.float32)
    return (codes.astype(np.float32) - zero) * np.repeat(s, block, 1)


def packed_weight(name: str, b_shape: tuple, b_dtype, scales, zero_points, k: int, bits: int, block: int):
    """The `llmir.packed_weight` [N, k] of a MatMulNBits / GatherBlockQuantized weight whose stored codes
    are the initializer `name`, of this shape and dtype, its scales of the type of the value `scales`
    (the stored one: float16, bfloat16 or float32; float32 for another), zero points none when absent or
    all 2^(bits-1). Raises ValueError for a layout `matmul_nbits_parts` does not read, found from the
    shapes (and the zero points' values)."""
    from llmirc import dialect as L

    if problem := matmul_nbits_problem(b_shape, b_dtype, int(np.prod(L.shape_of(scales))), k, bits, block):
        raise ValueError(problem)
    zeros = None if zero_points is None else _zero_points(zero_points, b_shape[0], k // block, bits)
    zero = "none" if zeros is None or (zeros == 1 << (bits - 1)).all() else "int"
    scale = scales.type.element_type
    qtype = L.QuantType(bits, block, scale if L.is_float(scale) else L.FLOAT_TYPES["float32"], zero, False)
    return L.PackedWeightOp(name, "matmul_nbits", (b_shape[0], k), qtype)
