"""Abstract interpretation of an ONNX-derived graph at a concrete sequence length S.

A full-sequence LLM graph computes three kinds of values:

* const: from initializers and constants only (folded at compile time);
* s-only: from the sequence length alone (shape arithmetic, causal masks, position ids,
  rotary cos/sin tables), whatever the tokens are;
* data: depends on the token values (the activations).

Running the graph abstractly at a few lengths S (values for const and s-only, shapes only for
data) gives every value's shape as a function of S, folds what does not depend on S at all,
and lets the fusion passes ask what an s-only value is (a causal mask? positions? cos/sin of
positions * inv_freq?) by evaluating it. Nothing here runs the model's data path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from llmirc.errors import CheckpointError

from . import onnx_ops

CONST, SONLY, DATA = "const", "s-only", "data"
PROBE_LENGTHS = (3, 7, 12)  # lengths at which the graph is interpreted to find what depends on S


@dataclass
class Node:
    """One operation, independent of where it came from (ONNX protobuf or xDSL op)."""

    op_type: str                  # ONNX op type, or "weight" / "constant" / "opaque"
    inputs: list                  # value keys; None for an omitted optional input
    outputs: list
    attrs: dict = field(default_factory=dict)
    name: str = ""


@dataclass
class AV:
    """An abstract value at one S: kind, shape, dtype and, unless data, the value."""

    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value: np.ndarray | None = None
    load: Callable[[], np.ndarray] | None = None  # reads a weight's value when first needed


def interpret(nodes: Iterable[Node], roots: dict, S: int, read_weight: Callable[[str], np.ndarray],
              opaque_shape: Callable[[Node, int], list[tuple[tuple[int, ...], np.dtype]]] | None = None,
              cache: dict | None = None) -> dict:
    """Abstract values of every value key at sequence length S.

    `roots` maps graph inputs to functions S -> AV. `weight` nodes read their value lazily
    (only when a const computation needs it); `opaque` nodes (already-lowered ops) are data
    whose shapes `opaque_shape` gives. `cache` keeps const values across calls."""
    env: dict = {k: make(S) for k, make in roots.items()}
    cache = {} if cache is None else cache
    for node in nodes:
        if node.op_type == "weight":
            name = node.attrs["name"]
            env[node.outputs[0]] = AV(CONST, tuple(node.attrs["shape"]), np.dtype(node.attrs["dtype"]),
                                      load=lambda name=name: read_weight(name))
            continue
        if node.op_type == "constant":
            v = node.attrs["value"]
            env[node.outputs[0]] = AV(CONST, v.shape, v.dtype, v)
            continue
        if node.op_type == "opaque":
            for key, (shape, dtype) in zip(node.outputs, opaque_shape(node, S)):
                env[key] = AV(DATA, shape, dtype)
            continue
        ins = [env[k] if k is not None else None for k in node.inputs]
        data_in = any(a is not None and a.kind == DATA for a in ins)
        if node.op_type in ("Shape", "Size") or not data_in:
            kind = CONST if all(a is None or a.kind == CONST for a in ins) else SONLY
            if kind == CONST and node.outputs[0] in cache:
                outs = cache[node.outputs[0]]
            else:
                # Shape/Size read only the shape of a data input: a zero-stride stand-in.
                vals = [None if a is None else np.broadcast_to(np.zeros((), a.dtype), a.shape) if a.kind == DATA
                        else _value(a) for a in ins]
                outs = onnx_ops.evaluate(node.op_type, vals, node.attrs, node.name, n_outputs=len(node.outputs))
                if kind == CONST:
                    cache[node.outputs[0]] = outs
            _check_outputs(node, outs)
            for key, v in zip(node.outputs, outs):
                env[key] = AV(kind, v.shape, v.dtype, v)
            continue
        shapes = [None if a is None else a.shape for a in ins]
        values = [None if a is None or a.kind == DATA else _value(a, small_only=True) for a in ins]
        dtypes = [None if a is None else a.dtype for a in ins]
        outs = onnx_ops.infer_shapes(node.op_type, shapes, values, dtypes, node.attrs, node.name,
                                     n_outputs=len(node.outputs))
        _check_outputs(node, outs)
        for key, (shape, dtype) in zip(node.outputs, outs):
            env[key] = AV(DATA, tuple(shape), np.dtype(dtype))
    return env


def _check_outputs(node: Node, outs: list) -> None:
    if len(node.outputs) > len(outs):
        raise CheckpointError(f"ONNX {node.op_type} node '{node.name}' lists {len(node.outputs)} outputs; the "
                              f"operator has {len(outs)}")


def _value(a: AV, small_only: bool = False):
    """The value of a const/s-only input; weights are read when first needed."""
    if a.value is None and a.load is not None:
        if small_only and int(np.prod(a.shape)) > 4096:
            return None  # a big weight never decides an output shape
        a.value = a.load()
    return a.value


def symbolic_shape(shapes: list[tuple[int, ...]], lengths=PROBE_LENGTHS) -> tuple[tuple[int, int], ...]:
    """Each dim as (a, b) meaning a*S + b, from the shapes seen at the probe lengths."""
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise CheckpointError(f"a value changes rank with the sequence length: shapes {shapes}")
    dims = []
    for i in range(ranks.pop()):
        ys = [s[i] for s in shapes]
        a = (ys[1] - ys[0]) // (lengths[1] - lengths[0]) if lengths[1] != lengths[0] else 0
        b = ys[0] - a * lengths[0]
        if any(y != a * s + b for y, s in zip(ys, lengths)):
            raise CheckpointError(f"a dimension is not affine in the sequence length: {ys} at S={list(lengths)}")
        dims.append((a, b))
    return tuple(dims)
