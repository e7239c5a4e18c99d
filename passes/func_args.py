"""Named arguments of the forward function (the `llmir.arg` argument attribute)."""

from __future__ import annotations

from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr
from xdsl.ir import Attribute, BlockArgument

from llmirc.dialect import ARG_ATTR


def forward_func(module: ModuleOp) -> func.FuncOp:
    for op in module.ops:
        if isinstance(op, func.FuncOp) and op.sym_name.data == "forward":
            return op
    raise ValueError("module has no func.func @forward")


def arg_names(f: func.FuncOp) -> list[str | None]:
    attrs = f.arg_attrs.data if f.arg_attrs else [DictionaryAttr({})] * len(f.args)
    names = []
    for a in attrs:
        name = a.data.get(ARG_ATTR)
        names.append(name.data if isinstance(name, StringAttr) else None)
    return names


def find_arg(f: func.FuncOp, name: str) -> BlockArgument | None:
    for arg, n in zip(f.args, arg_names(f)):
        if n == name:
            return arg
    return None


def add_arg(f: func.FuncOp, name: str, type: Attribute) -> BlockArgument:
    """Appends a named argument and keeps function_type and arg_attrs in step."""
    names = arg_names(f)
    arg = f.body.block.insert_arg(type, len(f.args))
    f.arg_attrs = ArrayAttr([DictionaryAttr({ARG_ATTR: StringAttr(n)} if n else {}) for n in [*names, name]])
    f.update_function_type()
    return arg
