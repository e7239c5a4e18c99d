"""The `llmir` dialect: the graph-level ops of a decoder-only LLM, in xDSL.

Activations are 2-D row-major tensors `tensor<?xNxf32>`: one row per token of the flat batch
(see DESIGN.md, "The ABI"), so every op below is either row-wise or says how it mixes rows.
Weights enter the graph through `llmir.weight`, which names a tensor of the checkpoint and has its
element type (f32, bf16, f16: linear and embedding read them as stored, accumulating in f32); the
IR never holds weight data. A quantized weight has the element type `!llmir.quant<...>` (storage
bits, group size, scale dtype, zero points; see llmirc/quant.py): `llmir.quantize` makes one from
a float weight at compile time, `llmir.packed_weight` names one a checkpoint already holds
(GPTQ, AWQ), and `llmir.linear` / `llmir.embedding` read either kind. `llmir.scale` multiplies
a weight by per-channel factors at compile time (SmoothQuant's, from the `smooth` pass),
`llmir.offset` adds a constant to one (Gemma's norm weights, 1 + w);
`llmir.hadamard` rotates blocks of a row (quantize-weights{rotate}: on an activation a kernel,
on a weight folded at compile time). The KV cache is a value of type `!llmir.kv_pool<...>` threaded through
`kv_append` (which returns the updated pool) to `paged_attention`, so ordering is explicit SSA.

The generic textual form of everything here parses and verifies in upstream MLIR (as an
unregistered dialect); tests/test_ir.py checks that (iree.compiler's MLIR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    ArrayAttr,
    BFloat16Type,
    Float16Type,
    Float32Type,
    DenseIntOrFPElementsAttr,
    DenseArrayBase,
    FloatAttr,
    IntAttr,
    IntegerAttr,
    StringAttr,
    TensorType,
    bf16,
    f16,
    f32,
    i8,
    i64,
)
from xdsl.ir import Attribute, Dialect, ParametrizedAttribute, SSAValue, TypeAttribute
from xdsl.irdl import (
    IRDLOperation,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_operand_def,
    opt_prop_def,
    prop_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
    AttrSizedOperandSegments,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.traits import Pure
from xdsl.utils.exceptions import VerifyException

from llmirc.quant import layout_problem, super_group_problem, table_problem

_POOL_KEYS = ("layers", "kv_heads", "head_dim", "block_size")
DYN = DYNAMIC_INDEX  # a dimension only known at run time (tokens in the batch, rows kept for logits)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def tensor(*shape: int, dtype: Attribute = f32) -> TensorType:
    return TensorType(dtype, shape)


# llmirc.dtypes names of the floating-point element types weights may have
FLOAT_TYPES: dict[str, Attribute] = {"float32": f32, "bfloat16": bf16, "float16": f16}


def is_float(element: Attribute) -> bool:
    return isinstance(element, (Float32Type, BFloat16Type, Float16Type))


def is_weight_element(element: Attribute) -> bool:
    """What linear and embedding weights may hold: a float type or a quantized one."""
    return is_float(element) or isinstance(element, QuantType)


def shape_of(value: SSAValue) -> tuple[int, ...]:
    t = value.type
    if not isinstance(t, TensorType):
        raise VerifyException(f"expected a tensor, got {t}")
    return tuple(t.get_shape())


def _f(value: float) -> FloatAttr:
    return FloatAttr(float(value), f32)


def _i(value: int) -> IntegerAttr:
    return IntegerAttr(int(value), i64)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise VerifyException(message)


def _rows(value: SSAValue, cols: int | None = None, what: str = "operand") -> tuple[int, int]:
    s = shape_of(value)
    _check(len(s) == 2, f"{what} must be 2-D [rows, cols], got shape {s}")
    if cols is not None:
        _check(s[1] == cols, f"{what} has {s[1]} columns, expected {cols}")
    return s[0], s[1]


@irdl_attr_definition
class KVPoolType(ParametrizedAttribute, TypeAttribute):
    """The paged KV cache: [layers, 2, blocks, kv_heads, block_size, head_dim] of `dtype`.

    The number of blocks is chosen by the loader, so it is not part of the type."""

    name = "llmir.kv_pool"

    layers: IntAttr
    kv_heads: IntAttr
    head_dim: IntAttr
    block_size: IntAttr
    dtype: Attribute

    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: Attribute = f32):
        super().__init__(IntAttr(layers), IntAttr(kv_heads), IntAttr(head_dim), IntAttr(block_size), dtype)

    def print_parameters(self, printer: Printer) -> None:
        values = (self.layers, self.kv_heads, self.head_dim, self.block_size)
        printer.print_string("<" + ", ".join(f"{k} = {v.data}" for k, v in zip(_POOL_KEYS, values)) + ", ")
        printer.print_attribute(self.dtype)
        printer.print_string(">")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> list[Attribute]:
        parser.parse_punctuation("<")
        values = []
        for key in _POOL_KEYS:
            parser.parse_keyword(key)
            parser.parse_punctuation("=")
            values.append(IntAttr(parser.parse_integer()))
            parser.parse_punctuation(",")
        dtype = parser.parse_type()
        parser.parse_punctuation(">")
        return [*values, dtype]

    def verify(self) -> None:
        for key in _POOL_KEYS:
            _check(getattr(self, key).data > 0, f"kv_pool {key} must be positive")


_QUANT_ZEROS = ("none", "int", "min")


@irdl_attr_definition
class QuantType(ParametrizedAttribute, TypeAttribute):
    """The element type of a quantized weight: `bits`-bit unsigned codes in groups of
    `group_size` along the input dimension, one scale (of type `scale`) per group, and zero
    points: none (symmetric), int (a uint8 zero point per group) or min (a float offset per
    group); `values`: a value table (code u stands for values[u], GGUF's IQ4 grid; empty: the
    uniform grid); `act_order`: the columns are stored permuted (GPTQ act-order); `super_group`
    (scale i8): two-level scales, int8 sub-scales (and sub-mins) per group times a float16 per
    super_group weights (GGUF's K-quants and IQ4_XS; 0: one level).

    `!llmir.quant<bits = 4, group_size = 32, scale = f16, zero = none>`,
    `!llmir.quant<bits = 4, group_size = 32, scale = f16, zero = none, values = [-127, -104, ...]>`,
    `!llmir.quant<bits = 4, group_size = 32, scale = i8, zero = min, super_group = 256>`;
    see llmirc/quant.py for the meaning of the codes and their layout in the bundle."""

    name = "llmir.quant"

    bits: IntAttr
    group_size: IntAttr
    scale: Attribute
    zero: StringAttr
    act_order: IntAttr
    values: ArrayAttr
    super_group: IntAttr

    def __init__(self, bits: int, group_size: int, scale: Attribute = f16, zero: str = "none",
                 act_order: bool = False, values: Sequence[int] | None = None, super_group: int = 0):
        super().__init__(IntAttr(bits), IntAttr(group_size), scale, StringAttr(zero), IntAttr(int(act_order)),
                         ArrayAttr([IntAttr(v) for v in values or ()]), IntAttr(super_group))

    @property
    def table(self) -> tuple[int, ...] | None:
        """The value table as ints (None: the uniform grid)."""
        return tuple(v.data for v in self.values.data) or None

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<bits = {self.bits.data}, group_size = {self.group_size.data}, scale = ")
        printer.print_attribute(self.scale)
        printer.print_string(f", zero = {self.zero.data}")
        if self.table:
            printer.print_string(f", values = [{', '.join(str(v) for v in self.table)}]")
        if self.super_group.data:
            printer.print_string(f", super_group = {self.super_group.data}")
        printer.print_string(f"{', act_order' if self.act_order.data else ''}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> list[Attribute]:
        parser.parse_punctuation("<")
        values = []
        for key in ("bits", "group_size"):
            parser.parse_keyword(key)
            parser.parse_punctuation("=")
            values.append(IntAttr(parser.parse_integer()))
            parser.parse_punctuation(",")
        parser.parse_keyword("scale")
        parser.parse_punctuation("=")
        scale = parser.parse_type()
        parser.parse_punctuation(",")
        parser.parse_keyword("zero")
        parser.parse_punctuation("=")
        zero = parser.parse_identifier()
        table, act_order, super_group = [], False, 0
        while parser.parse_optional_punctuation(",") is not None:
            if parser.parse_optional_keyword("values") is not None:
                parser.parse_punctuation("=")
                table = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parser.parse_integer)
            elif parser.parse_optional_keyword("super_group") is not None:
                parser.parse_punctuation("=")
                super_group = parser.parse_integer()
            else:
                parser.parse_keyword("act_order")
                act_order = True
        parser.parse_punctuation(">")
        return [*values, scale, StringAttr(zero), IntAttr(int(act_order)), ArrayAttr([IntAttr(v) for v in table]),
                IntAttr(super_group)]

    def verify(self) -> None:
        _check(self.group_size.data >= 16, "quant: group_size must be at least 16")
        sub_group = min(32, self.group_size.data)
        why = layout_problem(self.bits.data, sub_group, sub_group)
        _check(why is None, f"quant: {why}")
        if self.super_group.data:
            _check(self.scale == i8, "quant: two-level scales (super_group) take i8 sub-scales")
            why = super_group_problem(self.super_group.data, self.group_size.data, self.zero.data)
            _check(why is None, f"quant: {why}")
        else:
            _check(is_float(self.scale), "quant: the scale type must be f32, bf16 or f16 (i8 with super_group)")
        _check(self.zero.data in _QUANT_ZEROS, f"quant: zero must be one of {', '.join(_QUANT_ZEROS)}")
        _check(self.act_order.data in (0, 1), "quant: act_order is a flag")
        _check(all(isinstance(v, IntAttr) for v in self.values.data), "quant: values must be integers")
        if self.table:
            why = table_problem(self.table, self.bits.data, self.zero.data)
            _check(why is None, f"quant: {why}")


class _LlmirOp(IRDLOperation):
    traits = traits_def(Pure())


@irdl_op_definition
class WeightOp(_LlmirOp):
    """A named weight tensor of the model (a checkpoint tensor, or one the compiler made)."""

    name = "llmir.weight"
    weight = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, weight: str, shape: Sequence[int], dtype: Attribute = f32):
        super().__init__(properties={"weight": StringAttr(weight)}, result_types=[tensor(*shape, dtype=dtype)])

    def verify_(self) -> None:
        _check(all(d >= 0 for d in shape_of(self.result)), "weights have static shapes")


@irdl_op_definition
class ConstantOp(_LlmirOp):
    """A small constant folded into the IR (shape vectors, scalars, tables)."""

    name = "llmir.constant"
    value = prop_def(DenseIntOrFPElementsAttr)
    result = result_def(TensorType)

    def __init__(self, value: DenseIntOrFPElementsAttr):
        super().__init__(properties={"value": value}, result_types=[value.type])


@irdl_op_definition
class ConcatOp(_LlmirOp):
    """Concatenation along `axis`; on weights it is folded into the bundle at compile time."""

    name = "llmir.concat"
    inputs = var_operand_def(TensorType)
    axis = prop_def(IntegerAttr)
    result = result_def(TensorType)

    def __init__(self, inputs: Sequence[SSAValue], axis: int = 0):
        shapes = [shape_of(v) for v in inputs]
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        super().__init__(operands=[inputs], properties={"axis": _i(axis)},
                         result_types=[tensor(*out, dtype=inputs[0].type.element_type)])

    def verify_(self) -> None:
        shapes = [shape_of(v) for v in self.inputs]
        axis = self.axis.value.data
        _check(len(shapes) >= 1, "concat needs inputs")
        for s in shapes:
            _check(len(s) == len(shapes[0]) and 0 <= axis < len(s), "concat: rank or axis mismatch")
            _check(all(a == b for d, (a, b) in enumerate(zip(s, shapes[0])) if d != axis),
                   f"concat: shapes {shapes} differ off axis {axis}")
        _check(all(v.type.element_type == self.result.type.element_type for v in self.inputs),
               "concat: operand and result element types differ")


@irdl_op_definition
class TransposeOp(_LlmirOp):
    """Transpose of a 2-D tensor; on weights (e.g. Conv1D or ONNX MatMul [in, out] layouts) it is
    folded into the bundle at compile time."""

    name = "llmir.transpose"
    input = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue):
        rows, cols = _rows(input)
        super().__init__(operands=[input], result_types=[tensor(cols, rows, dtype=input.type.element_type)])

    def verify_(self) -> None:
        rows, cols = _rows(self.input)
        _check(shape_of(self.result) == (cols, rows), "transpose: result shape mismatch")
        _check(self.input.type.element_type == self.result.type.element_type, "transpose: element types differ")


@irdl_op_definition
class CastOp(_LlmirOp):
    """A weight converted to another floating-point element type (`cast-weights`); folded into the
    bundle at compile time (bf16: round to nearest even)."""

    name = "llmir.cast"
    input = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, dtype: Attribute):
        super().__init__(operands=[input], result_types=[tensor(*shape_of(input), dtype=dtype)])

    def verify_(self) -> None:
        _check(shape_of(self.input) == shape_of(self.result), "cast: shapes differ")
        _check(all(is_float(t.type.element_type) for t in (self.input, self.result)),
               "cast: only floating-point weights are cast")


@irdl_op_definition
class ScaleOp(_LlmirOp):
    """A float weight with each slice along `axis` multiplied (`inverse`: divided) by one element
    of `scale` (f32 [shape[axis]]), computed in f32 (`smooth`: SmoothQuant's channel scales,
    w[:, j] * s_j for a linear's input channels, g_j / s_j for the norm before it); folded into
    the bundle at compile time. The result is f32: what it feeds is quantized from the exact
    product, or cast to the stored type once."""

    name = "llmir.scale"
    input = operand_def(TensorType)
    scale = operand_def(TensorType)
    axis = prop_def(IntegerAttr)
    inverse = prop_def(IntegerAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, scale: SSAValue, axis: int, inverse: bool = False):
        super().__init__(operands=[input, scale], properties={"axis": _i(axis), "inverse": _i(int(inverse))},
                         result_types=[tensor(*shape_of(input))])

    def verify_(self) -> None:
        shape, axis = shape_of(self.input), self.axis.value.data
        _check(0 <= axis < len(shape), f"scale: axis {axis} of a rank-{len(shape)} weight")
        _check(shape_of(self.scale) == (shape[axis],) and self.scale.type.element_type == f32,
               f"scale: the scale must be f32 [{shape[axis]}]")
        _check(is_float(self.input.type.element_type), "scale: the input must be a float weight")
        _check(shape_of(self.result) == shape and self.result.type.element_type == f32,
               "scale: the result must be f32 of the input's shape")
        _check(self.inverse.value.data in (0, 1), "scale: inverse is a flag")


@irdl_op_definition
class OffsetOp(_LlmirOp):
    """A float weight plus the constant `offset`, computed in f32 (Gemma's RMSNorm multiplies by
    1 + w: transformers' Gemma3RMSNorm, `1.0 + self.weight.float()`); folded into the bundle at
    compile time. The result is f32."""

    name = "llmir.offset"
    input = operand_def(TensorType)
    offset = prop_def(FloatAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, offset: float):
        super().__init__(operands=[input], properties={"offset": _f(offset)}, result_types=[tensor(*shape_of(input))])

    def verify_(self) -> None:
        _check(is_float(self.input.type.element_type), "offset: the input must be a float weight")
        _check(shape_of(self.result) == shape_of(self.input) and self.result.type.element_type == f32,
               "offset: the result must be f32 of the input's shape")


@irdl_op_definition
class HadamardOp(_LlmirOp):
    """x (2-D [rows, k]) with each block of `block` columns of a row multiplied by the normalized
    Walsh-Hadamard matrix H_b / sqrt(b) (Sylvester's order: H_b[i, j] = (-1)^popcount(i & j)),
    computed in f32 (llmirc/quant.py `hadamard` is the reference). H_b / sqrt(b) is orthogonal
    and its own inverse, so linear(hadamard(x), hadamard(w)) = linear(x, w) in exact arithmetic
    (QuaRot's online Hadamard, Ashkboos et al. 2024): quantize-weights{rotate} puts it before a
    linear whose input has outlier channels, so that its rotated weight quantizes with less error.
    On an activation it is a kernel (`hadamard`); on a weight it is folded into the bundle at
    compile time, like `llmir.scale`. The result is f32."""

    name = "llmir.hadamard"
    input = operand_def(TensorType)
    block = prop_def(IntegerAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, block: int):
        super().__init__(operands=[input], properties={"block": _i(block)}, result_types=[tensor(*shape_of(input))])

    def verify_(self) -> None:
        rows, cols = _rows(self.input, what="hadamard: the input")
        b = self.block.value.data
        _check(b >= 2 and b & (b - 1) == 0 and cols % b == 0,
               f"hadamard: block {b} must be a power of two (at least 2) dividing the {cols} columns")
        _check(is_float(self.input.type.element_type), "hadamard: the input must be float")
        _check(shape_of(self.result) == (rows, cols) and self.result.type.element_type == f32,
               "hadamard: the result must be f32 of the input's shape")


@irdl_op_definition
class QuantizeOp(_LlmirOp):
    """A float weight quantized into the result's `!llmir.quant` element type (`quantize-weights`);
    folded into the bundle at compile time (llmirc/quant.py): round to nearest, or GPTQ when a
    `hessian` (f32 [in_features, in_features], from calibration) is given."""

    name = "llmir.quantize"
    input = operand_def(TensorType)
    hessian = opt_operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, qtype: QuantType, hessian: SSAValue | None = None):
        super().__init__(operands=[input, [hessian] if hessian else []],
                         result_types=[tensor(*shape_of(input), dtype=qtype)])

    def verify_(self) -> None:
        _, k = _rows(self.input, what="quantize input")
        _check(shape_of(self.input) == shape_of(self.result), "quantize: shapes differ")
        _check(is_float(self.input.type.element_type), "quantize: the input must be a float weight")
        q = self.result.type.element_type
        _check(isinstance(q, QuantType), "quantize: the result must have a !llmir.quant element type")
        _check(not q.act_order.data, "quantize: act-order comes only from checkpoints")
        _check_groups(q, k)
        _check(self.hessian is None or (shape_of(self.hessian) == (k, k) and self.hessian.type.element_type == f32),
               f"quantize: the hessian must be f32 [{k}, {k}]")


@irdl_op_definition
class PackedWeightOp(_LlmirOp):
    """A quantized weight as a checkpoint stores it: the tensors `<weight>.qweight`, `.scales`,
    (`.qzeros`, `.g_idx`) in `format` gptq, gptq_v2 or awq, or a GGUF block-quantized
    `<weight>.weight` (format gguf), repacked losslessly into llmirc's layout when the bundle is
    written (llmirc/frontend/packed.py)."""

    name = "llmir.packed_weight"
    weight = prop_def(StringAttr)
    format = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, weight: str, format: str, shape: Sequence[int], qtype: QuantType):
        super().__init__(properties={"weight": StringAttr(weight), "format": StringAttr(format)},
                         result_types=[tensor(*shape, dtype=qtype)])

    def verify_(self) -> None:
        _, k = _rows(self.result, what="packed weight")
        q = self.result.type.element_type
        _check(isinstance(q, QuantType), "packed_weight: the result must have a !llmir.quant element type")
        _check_groups(q, k)


def _check_groups(q: QuantType, k: int) -> None:
    g = q.group_size.data
    _check(k % g == 0 and k % min(g, 32) == 0, f"quant: {k} inputs do not split into groups of {g}")


@irdl_op_definition
class SplitOp(_LlmirOp):
    """Splits the columns of a 2-D tensor into consecutive parts (views: no copy at run time)."""

    name = "llmir.split"
    input = operand_def(TensorType)
    sizes = prop_def(DenseArrayBase)
    outputs = var_result_def(TensorType)

    def __init__(self, input: SSAValue, sizes: Sequence[int]):
        rows, _ = _rows(input)
        super().__init__(operands=[input], properties={"sizes": DenseArrayBase.from_list(i64, list(sizes))},
                         result_types=[[tensor(rows, n) for n in sizes]])

    def verify_(self) -> None:
        rows, cols = _rows(self.input)
        sizes = self.sizes.get_values()
        _check(sum(sizes) == cols, f"split sizes {sizes} do not add up to {cols} columns")
        _check(len(sizes) == len(self.outputs), "split: one result per size")
        for r, n in zip(self.outputs, sizes):
            _check(shape_of(r) == (rows, n), "split: result shape mismatch")


@irdl_op_definition
class EmbeddingOp(_LlmirOp):
    """out[t] = table[token_ids[t]] * scale, in f32 (`scale`, default 1: Gemma's sqrt(hidden_size),
    which its tied LM head does not take)."""

    name = "llmir.embedding"
    table = operand_def(TensorType)
    token_ids = operand_def(TensorType)
    scale = opt_prop_def(FloatAttr)
    result = result_def(TensorType)

    def __init__(self, table: SSAValue, token_ids: SSAValue, scale: float = 1.0):
        super().__init__(operands=[table, token_ids], properties={"scale": _f(scale)} if scale != 1.0 else {},
                         result_types=[tensor(shape_of(token_ids)[0], shape_of(table)[1])])

    @property
    def factor(self) -> float:
        """The scale (1.0 where none is set)."""
        return self.scale.value.data if self.scale is not None else 1.0

    def verify_(self) -> None:
        _, dim = _rows(self.table, what="embedding table")
        _check(is_weight_element(self.table.type.element_type) and not _act_order(self.table),
               "embedding: the table must be f32, bf16, f16 or quantized (without act-order)")
        _check(len(shape_of(self.token_ids)) == 1, "embedding: token ids must be 1-D")
        _rows(self.result, dim, "embedding result")


def _act_order(v: SSAValue) -> bool:
    t = v.type.element_type
    return isinstance(t, QuantType) and bool(t.act_order.data)


@irdl_op_definition
class RMSNormOp(_LlmirOp):
    """out = x * rsqrt(mean(x^2, axis=-1) + eps) * weight: x [T, dim], weight [dim].

    With `num_heads` H (Qwen3's q_norm and k_norm), each of a row's H heads is normalized on its
    own: x [T, H * d] read as [T, H, d], weight [d] (shared by the heads)."""

    name = "llmir.rms_norm"
    input = operand_def(TensorType)
    weight = operand_def(TensorType)
    eps = prop_def(FloatAttr)
    num_heads = opt_prop_def(IntegerAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, weight: SSAValue, eps: float, num_heads: int | None = None):
        props = {"eps": _f(eps)} | ({"num_heads": _i(num_heads)} if num_heads is not None else {})
        super().__init__(operands=[input, weight], properties=props, result_types=[input.type])

    @property
    def heads(self) -> int:
        """How many parts each row is normalized in (1: the whole row)."""
        return self.num_heads.value.data if self.num_heads is not None else 1

    def verify_(self) -> None:
        _, dim = _rows(self.input)
        h = self.heads
        _check(h >= 1 and dim % h == 0, f"rms_norm num_heads {h} does not divide the row of {dim}")
        _check(shape_of(self.weight) == (dim // h,), f"rms_norm weight must be [{dim // h}]")


@irdl_op_definition
class LayerNormOp(_LlmirOp):
    """out = (x - mean) * rsqrt(var + eps) * weight [+ bias]"""

    name = "llmir.layer_norm"
    input = operand_def(TensorType)
    weight = operand_def(TensorType)
    bias = opt_operand_def(TensorType)
    eps = prop_def(FloatAttr)
    result = result_def(TensorType)

    irdl_options = (AttrSizedOperandSegments(as_property=True),)

    def __init__(self, input: SSAValue, weight: SSAValue, bias: SSAValue | None, eps: float):
        super().__init__(operands=[input, weight, [bias] if bias else []], properties={"eps": _f(eps)},
                         result_types=[input.type])

    def verify_(self) -> None:
        _, dim = _rows(self.input)
        _check(shape_of(self.weight) == (dim,), f"layer_norm weight must be [{dim}]")
        _check(self.bias is None or shape_of(self.bias) == (dim,), f"layer_norm bias must be [{dim}]")


@irdl_op_definition
class LinearOp(_LlmirOp):
    """out = x @ weight^T [+ bias] [+ residual]; weight is [out_features, in_features]."""

    name = "llmir.linear"
    input = operand_def(TensorType)
    weight = operand_def(TensorType)
    bias = opt_operand_def(TensorType)
    residual = opt_operand_def(TensorType)
    result = result_def(TensorType)

    irdl_options = (AttrSizedOperandSegments(as_property=True),)

    def __init__(self, input: SSAValue, weight: SSAValue, bias: SSAValue | None = None,
                 residual: SSAValue | None = None):
        rows, _ = _rows(input)
        n = shape_of(weight)[0]
        super().__init__(operands=[input, weight, [bias] if bias else [], [residual] if residual else []],
                         result_types=[tensor(rows, n)])

    def verify_(self) -> None:
        rows, k = _rows(self.input)
        n, wk = _rows(self.weight, what="linear weight")
        _check(wk == k, f"linear: input has {k} features, weight expects {wk}")
        _check(is_weight_element(self.weight.type.element_type), "linear: the weight must be f32, bf16, f16 or quantized")
        _check(self.bias is None or shape_of(self.bias) == (n,), f"linear bias must be [{n}]")
        _check(self.residual is None or shape_of(self.residual) == (rows, n), "linear residual shape mismatch")
        _check(shape_of(self.result) == (rows, n), "linear: result shape mismatch")


@irdl_op_definition
class RopeOp(_LlmirOp):
    """Rotary position embedding of each head of x at `positions`.

    `inv_freq` holds the rotary_dim/2 inverse frequencies (scaling already applied),
    `scaling` multiplies cos and sin; style is `neox` (half-split) or `interleaved`."""

    name = "llmir.rope"
    input = operand_def(TensorType)
    positions = operand_def(TensorType)
    num_heads = prop_def(IntegerAttr)
    head_dim = prop_def(IntegerAttr)
    inv_freq = prop_def(DenseArrayBase)
    scaling = prop_def(FloatAttr)
    style = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, positions: SSAValue, num_heads: int, head_dim: int,
                 inv_freq: Sequence[float], scaling: float = 1.0, style: str = "neox"):
        super().__init__(operands=[input, positions], result_types=[input.type], properties={
            "num_heads": _i(num_heads), "head_dim": _i(head_dim),
            "inv_freq": DenseArrayBase.from_list(f32, [float(x) for x in inv_freq]),
            "scaling": _f(scaling), "style": StringAttr(style)})

    def verify_(self) -> None:
        _rows(self.input, _check_rope(self))


def _check_rope(op: "RopeOp | RopeKVAppendOp") -> int:
    """Checks a rope's properties; returns the width of its q rows (num_heads * head_dim)."""
    h, d = op.num_heads.value.data, op.head_dim.value.data
    half = len(op.inv_freq.get_values())
    _check(0 < 2 * half <= d, f"{op.name}: rotary dim {2 * half} exceeds head dim {d}")
    _check(op.style.data in ("neox", "interleaved"), f"{op.name}: unknown style {op.style.data}")
    return h * d


def _check_cap(attr: FloatAttr, what: str) -> None:
    cap = attr.value.data
    _check(0.0 < cap < math.inf, f"{what} must be finite and > 0, got {cap}")


class _AttentionShape(_LlmirOp):
    num_heads = prop_def(IntegerAttr)
    num_kv_heads = prop_def(IntegerAttr)
    head_dim = prop_def(IntegerAttr)
    scale = prop_def(FloatAttr)
    sliding_window = prop_def(IntegerAttr)  # 0: attend to the whole prefix
    softcap = opt_prop_def(FloatAttr)  # scores capped to softcap * tanh(s / softcap) (Gemma 2); absent: not capped

    def _dims(self) -> tuple[int, int, int]:
        h, g, d = (a.value.data for a in (self.num_heads, self.num_kv_heads, self.head_dim))
        _check(h > 0 and g > 0 and d > 0 and h % g == 0, f"attention: {h} heads not divisible into {g} kv heads")
        if self.softcap is not None:
            _check_cap(self.softcap, "attention: softcap")
        return h, g, d

    def softcap_value(self) -> float:
        """The softcap, 0.0 where the scores are not capped."""
        return self.softcap.value.data if self.softcap is not None else 0.0

    @staticmethod
    def props(num_heads, num_kv_heads, head_dim, scale, sliding_window, softcap=0.0) -> dict[str, Attribute]:
        props = {"num_heads": _i(num_heads), "num_kv_heads": _i(num_kv_heads), "head_dim": _i(head_dim),
                 "scale": _f(scale), "sliding_window": _i(sliding_window or 0)}
        return props | ({"softcap": _f(softcap)} if softcap else {})


@irdl_op_definition
class AttentionOp(_AttentionShape):
    """Causal multi-head attention of one whole sequence (grouped-query when kv heads < heads).

    Full-sequence semantics: no cache. The paged-kv pass turns it into kv_append +
    paged_attention, which is what makes incremental decoding possible."""

    name = "llmir.attention"
    q = operand_def(TensorType)
    k = operand_def(TensorType)
    v = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, q, k, v, *, num_heads, num_kv_heads, head_dim, scale, sliding_window=0, softcap=0.0):
        super().__init__(operands=[q, k, v], result_types=[q.type],
                         properties=self.props(num_heads, num_kv_heads, head_dim, scale, sliding_window, softcap))

    def verify_(self) -> None:
        h, g, d = self._dims()
        rows, _ = _rows(self.q, h * d, "q")
        _rows(self.k, g * d, "k")
        _rows(self.v, g * d, "v")


@irdl_op_definition
class KVAppendOp(_LlmirOp):
    """Writes each token's K and V of `layer` into the pool at slot_mapping[t]; returns the pool."""

    name = "llmir.kv_append"
    k = operand_def(TensorType)
    v = operand_def(TensorType)
    slot_mapping = operand_def(TensorType)
    pool = operand_def(KVPoolType)
    layer = prop_def(IntegerAttr)
    result = result_def(KVPoolType)

    def __init__(self, k, v, slot_mapping, pool, layer: int):
        super().__init__(operands=[k, v, slot_mapping, pool], properties={"layer": _i(layer)},
                         result_types=[pool.type])

    def verify_(self) -> None:
        pool = self.pool.type
        assert isinstance(pool, KVPoolType)
        width = pool.kv_heads.data * pool.head_dim.data
        _rows(self.k, width, "k")
        _rows(self.v, width, "v")
        _check(0 <= self.layer.value.data < pool.layers.data, "kv_append: layer out of range")


@irdl_op_definition
class RopeKVAppendOp(_LlmirOp):
    """llmir.rope of q (the first result) and of k, whose result goes with v into the pool at
    slot_mapping[t] as llmir.kv_append writes them (the second result): one op for the three, made
    by the fuse-rope-kv-append pass. Properties: llmir.rope's (for both) and kv_append's layer."""

    name = "llmir.rope_kv_append"
    q = operand_def(TensorType)
    k = operand_def(TensorType)
    v = operand_def(TensorType)
    positions = operand_def(TensorType)
    slot_mapping = operand_def(TensorType)
    pool = operand_def(KVPoolType)
    num_heads = prop_def(IntegerAttr)
    head_dim = prop_def(IntegerAttr)
    inv_freq = prop_def(DenseArrayBase)
    scaling = prop_def(FloatAttr)
    style = prop_def(StringAttr)
    layer = prop_def(IntegerAttr)
    q_result = result_def(TensorType)
    pool_result = result_def(KVPoolType)

    def __init__(self, q, k, v, positions, slot_mapping, pool, rope: RopeOp, layer: int):
        """The rope's properties are `rope`'s (an llmir.rope of q)."""
        super().__init__(operands=[q, k, v, positions, slot_mapping, pool], result_types=[q.type, pool.type],
                         properties={name: rope.properties[name] for name in
                                     ("num_heads", "head_dim", "inv_freq", "scaling", "style")} | {"layer": _i(layer)})

    def verify_(self) -> None:
        pool = self.pool.type
        assert isinstance(pool, KVPoolType)
        d = self.head_dim.value.data
        _check(pool.head_dim.data == d, "rope_kv_append: pool head_dim mismatch")
        _rows(self.q, _check_rope(self), "q")
        _rows(self.k, pool.kv_heads.data * d, "k")
        _rows(self.v, pool.kv_heads.data * d, "v")
        _check(0 <= self.layer.value.data < pool.layers.data, "rope_kv_append: layer out of range")


@irdl_op_definition
class PagedAttentionOp(_AttentionShape):
    """Attention of each query token over its sequence's keys in the pool (via the block table)."""

    name = "llmir.paged_attention"
    q = operand_def(TensorType)
    pool = operand_def(KVPoolType)
    block_tables = operand_def(TensorType)
    seq_lens = operand_def(TensorType)
    query_start_loc = operand_def(TensorType)
    positions = operand_def(TensorType)
    layer = prop_def(IntegerAttr)
    result = result_def(TensorType)

    def __init__(self, q, pool, block_tables, seq_lens, query_start_loc, positions, *, layer,
                 num_heads, num_kv_heads, head_dim, scale, sliding_window=0, softcap=0.0):
        props = self.props(num_heads, num_kv_heads, head_dim, scale, sliding_window, softcap)
        props["layer"] = _i(layer)
        super().__init__(operands=[q, pool, block_tables, seq_lens, query_start_loc, positions],
                         properties=props, result_types=[q.type])

    def verify_(self) -> None:
        h, g, d = self._dims()
        _rows(self.q, h * d, "q")
        pool = self.pool.type
        assert isinstance(pool, KVPoolType)
        _check((pool.kv_heads.data, pool.head_dim.data) == (g, d), "paged_attention: pool shape mismatch")
        _check(len(shape_of(self.block_tables)) == 2, "block_tables must be 2-D")


@irdl_op_definition
class ActMulOp(_LlmirOp):
    """out = act(gate) * up (SwiGLU / GeGLU)."""

    name = "llmir.act_mul"
    gate = operand_def(TensorType)
    up = operand_def(TensorType)
    act = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, gate: SSAValue, up: SSAValue, act: str):
        super().__init__(operands=[gate, up], properties={"act": StringAttr(act)}, result_types=[gate.type])

    def verify_(self) -> None:
        _check(self.act.data in ACTIVATIONS, f"unknown activation {self.act.data}")
        _check(shape_of(self.gate) == shape_of(self.up), "act_mul: gate and up shapes differ")


@irdl_op_definition
class ActOp(_LlmirOp):
    """out = act(x)"""

    name = "llmir.act"
    input = operand_def(TensorType)
    act = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, act: str):
        super().__init__(operands=[input], properties={"act": StringAttr(act)}, result_types=[input.type])

    def verify_(self) -> None:
        _check(self.act.data in ACTIVATIONS, f"unknown activation {self.act.data}")


@irdl_op_definition
class SoftcapOp(_LlmirOp):
    """out = cap * tanh(x / cap): Gemma 2's soft-capping of the final logits (final_logit_softcapping)."""

    name = "llmir.softcap"
    input = operand_def(TensorType)
    cap = prop_def(FloatAttr)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, cap: float):
        super().__init__(operands=[input], properties={"cap": _f(cap)}, result_types=[input.type])

    def verify_(self) -> None:
        _check_cap(self.cap, "softcap: cap")


@irdl_op_definition
class AddOp(_LlmirOp):
    """out = lhs + rhs (same shapes)."""

    name = "llmir.add"
    lhs = operand_def(TensorType)
    rhs = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, lhs: SSAValue, rhs: SSAValue):
        super().__init__(operands=[lhs, rhs], result_types=[lhs.type])

    def verify_(self) -> None:
        _check(shape_of(self.lhs) == shape_of(self.rhs), "add: operand shapes differ")


@irdl_op_definition
class GatherRowsOp(_LlmirOp):
    """out[i] = input[indices[i]]: keeps the rows that are still needed (e.g. for logits)."""

    name = "llmir.gather_rows"
    input = operand_def(TensorType)
    indices = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue, indices: SSAValue):
        _, cols = _rows(input)
        super().__init__(operands=[input, indices], result_types=[tensor(shape_of(indices)[0], cols)])

    def verify_(self) -> None:
        _check(len(shape_of(self.indices)) == 1, "gather_rows: indices must be 1-D")


@irdl_op_definition
class SqueezeBatchOp(_LlmirOp):
    """[1, rows, cols] -> [rows, cols]: an ONNX activation (batch 1) entering llmir's row form."""

    name = "llmir.squeeze_batch"
    input = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue):
        s = shape_of(input)
        super().__init__(operands=[input], result_types=[tensor(*s[1:], dtype=input.type.element_type)])

    def verify_(self) -> None:
        s = shape_of(self.input)
        _check(len(s) == 3 and s[0] == 1 and shape_of(self.result) == s[1:], "squeeze_batch needs [1, rows, cols]")


@irdl_op_definition
class UnsqueezeBatchOp(_LlmirOp):
    """[rows, cols] -> [1, rows, cols]: an llmir value handed back to ONNX ops (batch 1)."""

    name = "llmir.unsqueeze_batch"
    input = operand_def(TensorType)
    result = result_def(TensorType)

    def __init__(self, input: SSAValue):
        super().__init__(operands=[input], result_types=[tensor(1, *shape_of(input), dtype=input.type.element_type)])

    def verify_(self) -> None:
        _check(shape_of(self.result) == (1, *shape_of(self.input)), "unsqueeze_batch: shape mismatch")


# Ops that only make weights: the bundle writer folds them at compile time (targets/plan.py).
WEIGHT_OPS = (WeightOp, ConstantOp, ConcatOp, TransposeOp, CastOp, ScaleOp, OffsetOp, QuantizeOp, PackedWeightOp)


def is_weight_op(op) -> bool:
    """Whether op makes a weight (folded at compile time): a WEIGHT_OPS op, or an llmir.hadamard
    of a weight (on an activation it is a kernel)."""
    while isinstance(op, HadamardOp):
        op = op.input.owner
    return isinstance(op, WEIGHT_OPS)


LLMIR = Dialect(
    "llmir",
    [WeightOp, ConstantOp, ConcatOp, TransposeOp, CastOp, ScaleOp, OffsetOp, HadamardOp, QuantizeOp, PackedWeightOp,
     SplitOp, EmbeddingOp, RMSNormOp, LayerNormOp, LinearOp, RopeOp, AttentionOp, KVAppendOp, RopeKVAppendOp,
     PagedAttentionOp, ActMulOp, ActOp, SoftcapOp, AddOp, GatherRowsOp, SqueezeBatchOp, UnsqueezeBatchOp],
    [KVPoolType, QuantType],
)

# Names of the forward function's arguments, carried as the `llmir.arg` arg attribute.
ARG_ATTR = "llmir.arg"
# Unit attribute of a forward function that still holds ONNX ops (compiled generically): every
# step recomputes the whole sequence (see passes/onnx_to_llmir.py and targets/generic_plan.py).
FULL_SEQUENCE = "llmir.full_sequence"
__all__ = [name for name in dir() if name.endswith("Op")] + ["KVPoolType", "QuantType", "LLMIR", "tensor", "DYN",
                                                              "ARG_ATTR", "FULL_SEQUENCE", "is_float", "WEIGHT_OPS",
                                                              "is_weight_op", "is_weight_element", "FLOAT_TYPES"]
