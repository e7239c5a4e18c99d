"""Standard ONNX operators defined as functions, expanded into their function bodies.

The ONNX standard defines some operators by a body of other operators (`onnx.defs`: a schema's
function, often built from the call's attributes and input types). Opset 23's fused LLM
operators are such: `RMSNormalization`, `RotaryEmbedding` and `Attention`, which torch.onnx
writes at that opset; older ones include Mish and Celu. llmirc evaluates none of them itself:
each call is replaced by the body the standard gives for it (onnx.inliner), so the importer, its
fusions and the full-sequence fallback read it as the primitive operators it is defined by, and
the fusions recognize opset 23's attention as they recognize opset 18's.

Untrusted input: the bodies come from the installed onnx package's schemas, never from the file;
a call the schema cannot build a body for is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.inliner
from onnx import defs, shape_inference

from llmirc.errors import CheckpointError

DOMAIN = "llmirc.expanded"  # the model-local functions made here, inlined before the importer reads the graph
MAX_ROUNDS = 16  # bodies calling function operators, functions calling functions: expanded round by round


def _function_schema(node: onnx.NodeProto, opset: int) -> defs.OpSchema | None:
    """The schema of a standard operator that the standard defines by a function body, or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        schema = defs.get_schema(node.op_type, opset)
    except defs.SchemaError:
        return None
    return schema if schema.has_function or schema.has_context_dependent_function else None


def expand_functions(model: onnx.ModelProto, evaluated: frozenset[str], path: Path) -> list[str]:
    """Replace, in place, every call of a standard operator outside `evaluated` that the ONNX
    standard defines as a function (and every call of a model-local function) by its body.

    Returns the expanded operators' names (model-local functions as domain.name), one per call,
    for the compile report. A call the schema builds no body for (an input of unknown type, say)
    is left as it is, for the importer to refuse by name. A body may call such operators itself (a
    model-local function calling Mish, one function calling another): the expansion repeats until
    none is left. Raises CheckpointError for a call its schema refuses (onnx.checker), or when
    shape inference or the inliner fails."""
    expanded_ops: list[str] = []
    for _ in range(MAX_ROUNDS):
        if not _expand_once(model, evaluated, path, expanded_ops):
            return expanded_ops
    raise CheckpointError(f"{path}: its functions are nested more than {MAX_ROUNDS} deep")


def _expand_once(model: onnx.ModelProto, evaluated: frozenset[str], path: Path, expanded_ops: list[str]) -> bool:
    """One round of expand_functions: the top graph's calls (and every model-local function) inlined;
    appends to `expanded_ops`. False when there was nothing to expand."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    calls = [(i, s) for i, n in enumerate(model.graph.node) if n.op_type not in evaluated
             if (s := _function_schema(n, opset)) is not None]
    if not calls and not model.functions:
        return False
    _check_calls(model, [model.graph.node[i] for i, _ in calls], path)
    # Bodies built for an older opset are converted to the model's, which takes every value's type.
    typed = _with_types(model, path)
    types = {v.name: v.type for v in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]}
    for t in typed.graph.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    local = {(f.domain, f.name) for f in model.functions}
    expanded_ops.extend(f"{n.domain}.{n.op_type}" for n in model.graph.node if (n.domain, n.op_type) in local)
    for i, schema in calls:
        node = typed.graph.node[i]
        _check_axes(node, types, path)
        body = _body(node, schema, opset, types)
        if body is None:
            continue
        for j, inner in enumerate(body.node):  # errors name the call: 'RotaryEmbedding_3/Slice.5'
            inner.name = f"{node.name or node.op_type}/{inner.op_type}.{j}"
        body.domain, body.name = DOMAIN, f"{node.op_type}.{len(expanded_ops)}"
        expanded_ops.append(node.op_type)
        node.domain, node.op_type = DOMAIN, body.name
        typed.functions.append(body)
    if not typed.functions:  # (calls left for the importer to refuse)
        return False
    if all(o.domain != DOMAIN for o in typed.opset_import):
        typed.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    try:
        expanded = onnx.inliner.inline_local_functions(typed, convert_version=True)
    except Exception as e:  # the C++ inliner raises its own error types
        raise CheckpointError(f"{path}: its functions cannot be inlined ({' '.join(str(e).split())[:200]})") from None
    del expanded.graph.value_info[:]  # (the importer finds its own shapes)
    model.CopyFrom(expanded)
    return True


def _check_calls(model: onnx.ModelProto, calls: list[onnx.NodeProto], path: Path) -> None:
    """Each call has the inputs and attribute types its schema requires (onnx.checker), before a body
    is built from it."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = {o.domain: o.version for o in model.opset_import}
    for node in calls:
        try:
            onnx.checker.check_node(node, context)
        except onnx.checker.ValidationError as e:
            reason = " ".join(str(e).split("==>")[0].split())[:200]
            raise CheckpointError(f"{path}: ONNX {node.op_type} node '{node.name or node.output[0]}': "
                                  f"{reason}") from None


def _check_axes(node: onnx.NodeProto, types: dict, path: Path) -> None:
    """An `axis` (or `axes`) attribute names an axis of the first input: -rank <= axis < rank, as
    onnxruntime requires (RMSNormalization, LayerNormalization, Softmax, MeanVarianceNormalization;
    a body built from an axis out of range reduces over no axis, or fails elsewhere). Unchecked
    while the input's rank is unknown."""
    shape = types.get(node.input[0], onnx.TypeProto()).tensor_type if node.input else None
    if shape is None or not shape.HasField("shape"):
        return
    rank = len(shape.shape.dim)
    for a in node.attribute:
        values = [a.i] if a.name == "axis" and a.type == onnx.AttributeProto.INT else \
            list(a.ints) if a.name == "axes" and a.type == onnx.AttributeProto.INTS else []
        for v in values:
            if not -rank <= v < rank:
                raise CheckpointError(f"{path}: ONNX {node.op_type} node '{node.name or node.output[0]}': "
                                      f"{a.name} {v} is out of range for its rank-{rank} input "
                                      f"(from {-rank} to {rank - 1})")


def _with_types(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model with every value's type (element type and shape, as far as onnx's shape inference
    finds them) in its value_info."""
    try:
        return shape_inference.infer_shapes(model)
    except Exception as e:  # InferenceError and protobuf's errors
        raise CheckpointError(f"{path}: ONNX shape inference failed ({' '.join(str(e).split())[:200]})") from None


def _body(node: onnx.NodeProto, schema: defs.OpSchema, opset: int, types: dict) -> onnx.FunctionProto | None:
    """The function body the standard gives for this call, or None where it gives none (context-dependent
    bodies are built from the call's attributes and its inputs' types; none is built when an input's
    type is unknown, as after an operator onnx does not know)."""
    if any(x and not types.get(x, onnx.TypeProto()).tensor_type.elem_type for x in node.input):
        return None
    plain = schema.has_function
    # bodies are defined at some opsets; the newest up to the model's is the one
    defined = schema.function_opset_versions if plain else schema.context_dependent_function_opset_versions
    versions = [v for v in defined if v <= opset]
    if not versions:
        return None
    if plain:
        built = schema.get_function_with_opset_version(max(versions))
    else:
        inputs = [types.get(x, onnx.TypeProto()).SerializeToString() if x else b"" for x in node.input]
        try:
            built = schema.get_context_dependent_function_with_opset_version(
                max(versions), node.SerializeToString(), inputs)
        except Exception:  # onnx's C++ builders raise their own error types
            return None
    if not built:
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(built)
    return body
