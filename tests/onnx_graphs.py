"""Small hand-built ONNX graphs for the fusion tests (opset 18): a builder for the boilerplate.

Every graph starts with the token lookup `Gather(embed, input_ids)` -> x [1, S, C] float32 and
ends with one [1, S, C] output. Values are named by the builder (`t1`, `t2`, ...); numpy arrays
and Python numbers passed where a value is expected become initializers (float32 or int64).

    g = Graph(C=32)
    y = g.op("Mul", g.x, g.op("Sigmoid", g.x))
    model = g.model(y)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
VOCAB = 50


class Graph:
    def __init__(self, C: int = 32, *, seed: int = 0, inputs=("input_ids",), vocab: int = VOCAB):
        self.C, self.rng = C, np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.values: dict[str, np.ndarray] = {}  # initializer values by name
        self.inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "S"]) for name in inputs]
        self._n = 0
        self.embed = self.init(self.rng.standard_normal((vocab, C)).astype(np.float32), "embed")
        self.x = self.op("Gather", self.embed, "input_ids", axis=0)

    def _name(self, prefix: str = "t") -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def init(self, value, name: str | None = None) -> str:
        """An initializer (float64 values are stored as float32)."""
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        name = name or self._name("w")
        self.inits.append(numpy_helper.from_array(value, name))
        self.values[name] = value
        return name

    def randn(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> str:
        return self.init(self.rng.standard_normal(shape).astype(np.float32) * scale + shift)

    def op(self, op_type: str, *inputs, outputs: int = 1, **attrs):
        """One node; inputs are value names, None (omitted) or numpy/Python constants."""
        names = []
        for v in inputs:
            if v is None:
                names.append("")
            elif isinstance(v, str):
                names.append(v)
            else:
                names.append(self.init(v if isinstance(v, np.ndarray) else np.array(v)))
        outs = [self._name() for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, names, outs, name=f"{op_type}_{len(self.nodes)}", **attrs))
        return outs[0] if outputs == 1 else outs

    # -- common pieces ----------------------------------------------------------------------
    def i64(self, *values: int) -> np.ndarray:
        return np.array(values, np.int64)

    def seq_len(self, like: str | None = None) -> str:
        """S as an int64 scalar, read off the shape of `like` (x by default), as exporters do."""
        dim = self.op("Shape", like or self.x, start=1, end=2)
        return self.op("Squeeze", dim, self.i64(0))

    def positions(self) -> str:
        """0..S-1 as int64 [S] from a Range over the sequence length."""
        return self.op("Range", np.array(0, np.int64), self.seq_len(), np.array(1, np.int64))

    def matmul(self, x: str, n_in: int, n_out: int, bias: bool = False, scale: float = 0.3) -> str:
        y = self.op("MatMul", x, self.randn(n_in, n_out, scale=scale))
        return self.op("Add", y, self.randn(n_out, scale=0.1)) if bias else y

    def model(self, output: str, shape: list | None = None, opset: int = OPSET,
              functions: list[onnx.FunctionProto] = ()) -> onnx.ModelProto:
        """The model computing `output` ([1, S, C] unless `shape` says otherwise), with model-local
        `functions`."""
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, shape or [1, "S", self.C])
        graph = helper.make_graph(self.nodes, "test", self.inputs, [out], self.inits)
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(f.domain, 1) for f in functions)]
        model = helper.make_model(graph, opset_imports=opsets, functions=functions)
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path
