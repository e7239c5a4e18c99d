"""The `onnx` dialect: one generic xDSL op per ONNX operator type, as imported.

`onnx.<OpType>` ops carry the ONNX attributes (`attrs`) and the ONNX node name (`node`, so
errors point at the source). A missing optional input is a value of `onnx.none`. The fusion
passes rewrite these ops into `llmir` ops; what is left is compiled generically (or refused).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from xdsl.dialects.builtin import (
    ArrayAttr,
    BFloat16Type,
    DenseIntOrFPElementsAttr,
    Float16Type,
    IntegerType,
    Signedness,
    TensorType,
    f32,
    i1,
    i8,
    i16,
    i32,
    DenseArrayBase,
    DictionaryAttr,
    FloatAttr,
    IntegerAttr,
    NoneType,
    StringAttr,
    f64,
    i64,
)
from xdsl.ir import Attribute
from xdsl.irdl import (
    IRDLOperation,
    irdl_op_definition,
    prop_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.traits import Pure

from llmirc.errors import CheckpointError


class OnnxOp(IRDLOperation):
    """Base of every `onnx.<OpType>`."""

    inputs = var_operand_def()
    outputs = var_result_def()
    attrs = prop_def(DictionaryAttr)
    node = prop_def(StringAttr)
    traits = traits_def(Pure())  # every supported ONNX operator is a pure function of its inputs

    @property
    def op_type(self) -> str:
        return self.name.removeprefix("onnx.")

    def py_attrs(self) -> dict:
        return {k: from_attr(v) for k, v in self.attrs.data.items()}


@irdl_op_definition
class NoneOp(IRDLOperation):
    """An omitted optional input."""

    name = "onnx.none"
    result = result_def(NoneType)
    traits = traits_def(Pure())

    def __init__(self):
        super().__init__(result_types=[NoneType()])


@cache
def op_class(op_type: str) -> type[OnnxOp]:
    cls = type(f"Onnx{op_type}Op", (OnnxOp,), {"name": f"onnx.{op_type}", "__module__": __name__})
    return irdl_op_definition(cls)


def make_op(op_type: str, inputs, result_types, attrs: dict, node: str) -> OnnxOp:
    return op_class(op_type)(operands=[list(inputs)], result_types=[list(result_types)],
                             properties={"attrs": DictionaryAttr({k: to_attr(v) for k, v in attrs.items()}),
                                         "node": StringAttr(node)})


def to_attr(value) -> Attribute:
    if isinstance(value, np.ndarray):  # a tensor attribute (ConstantOfShape's value, ...)
        flat = value.reshape(-1).tolist()
        typ = TensorType(element_type(value.dtype), value.shape)
        return DenseIntOrFPElementsAttr.from_list(typ, [bool(x) for x in flat] if value.dtype == np.bool_ else flat)
    if isinstance(value, bool):
        return IntegerAttr(int(value), i64)
    if isinstance(value, int):
        return IntegerAttr(value, i64)
    if isinstance(value, float):
        return FloatAttr(value, f64)
    if isinstance(value, str):
        return StringAttr(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) for v in value):
            return DenseArrayBase.from_list(i64, list(value))
        if all(isinstance(v, (int, float)) for v in value):
            return DenseArrayBase.from_list(f64, [float(v) for v in value])
        return ArrayAttr([to_attr(v) for v in value])
    raise TypeError(f"cannot store attribute value {value!r}")


def from_attr(attr: Attribute):
    if isinstance(attr, IntegerAttr):
        return attr.value.data
    if isinstance(attr, FloatAttr):
        return attr.value.data
    if isinstance(attr, StringAttr):
        return attr.data
    if isinstance(attr, DenseArrayBase):
        return list(attr.get_values())
    if isinstance(attr, ArrayAttr):
        return [from_attr(a) for a in attr.data]
    if isinstance(attr, DenseIntOrFPElementsAttr):
        return constant_value(attr)
    raise TypeError(f"unexpected attribute {attr}")


_ELEMENT = {np.dtype(np.float32): f32, np.dtype(np.float64): f64, np.dtype(np.int64): i64,
            np.dtype(np.int32): i32, np.dtype(np.int16): i16, np.dtype(np.int8): i8, np.dtype(np.bool_): i1,
            np.dtype(np.float16): Float16Type(), np.dtype(np.uint8): IntegerType(8, Signedness.UNSIGNED)}


def element_type(dtype: np.dtype) -> Attribute:
    dtype = np.dtype(dtype)
    if dtype in _ELEMENT:
        return _ELEMENT[dtype]
    if dtype.name == "bfloat16":
        return BFloat16Type()
    raise CheckpointError(f"unsupported tensor element type {dtype}")


def numpy_dtype(element: Attribute) -> np.dtype:
    for dtype, el in _ELEMENT.items():
        if el == element:
            return dtype
    if isinstance(element, BFloat16Type):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise TypeError(f"no numpy dtype for {element}")


def constant_value(attr: DenseIntOrFPElementsAttr) -> np.ndarray:
    t = attr.get_type()
    return np.array(attr.get_values(), dtype=numpy_dtype(t.element_type)).reshape(tuple(t.get_shape()))



