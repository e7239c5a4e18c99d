"""The plan's kernel calls as one LLVM function, `llmir_forward(dims, ptrs)` (DESIGN.md, the ABI).

The host makes one call per step; this function computes every argument (workspace byte
offsets from T and L, column offsets of views in elements of the buffer's dtype, dims) and
calls the kernels in order, passing each call's named arguments in its signature's order. A
generic kernel's meta table (plan.Meta: sizes as polynomials in T) becomes a constant array in
the library; the kernel evaluates it.
"""

from __future__ import annotations

import json

from llvmlite import ir

from llmirc import dtypes
from llmirc.targets.plan import ABI_INPUTS, ABI_VERSION, DIMS, Dim, Meta, Plan, Ref
from llmirc.targets.signatures import signature

I64 = ir.IntType(64)
I8 = ir.IntType(8)
PTR = ir.PointerType()
I8P = ir.IntType(8).as_pointer()
# ptrs[]: the ABI inputs, then pool, workspace, logits, then the weights in plan order.
PTR_INDEX = {name: i for i, name in enumerate(ABI_INPUTS)}
PTR_INDEX.update(pool=len(ABI_INPUTS), ws=len(ABI_INPUTS) + 1, logits=len(ABI_INPUTS) + 2)
FIRST_WEIGHT = len(ABI_INPUTS) + 3


def emit_forward(module: ir.Module, plan: Plan, kernels: dict[str, ir.Function], uses_amx: bool) -> ir.Function:
    """Adds `llmir_forward`, `llmir_abi_version` and `llmir_model_info` to `module`, calling the
    kernel functions `kernels` (by plan symbol); `uses_amx`: whether a kernel calls AMX
    micro-kernels (model_info's `amx`)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64.as_pointer(), I8P.as_pointer()]),
                     "llmir_forward")
    dims_arg, ptrs_arg = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    dims = {name: b.load(b.gep(dims_arg, [ir.Constant(I64, i)]), name=name) for i, name in enumerate(DIMS)}

    def ptr(index: int) -> ir.Value:
        return b.load(b.gep(ptrs_arg, [ir.Constant(I64, index)]), typ=PTR)

    slot_base = {}
    ws = ptr(PTR_INDEX["ws"])
    for slot in range(len(plan.slots)):
        coef = plan.slot_offset(slot)  # bytes
        offset = b.add(b.mul(dims["T"], ir.Constant(I64, coef["T"])), b.mul(dims["L"], ir.Constant(I64, coef["L"])))
        if coef["TT"] or coef["const"]:
            tt = b.mul(b.mul(dims["T"], dims["T"]), ir.Constant(I64, coef["TT"]))
            offset = b.add(b.add(offset, tt), ir.Constant(I64, coef["const"]))
        slot_base[slot] = b.gep(ws, [offset], source_etype=I8)

    def pointer(ref: Ref) -> ir.Value:
        if ref.space == "null":
            return ir.Constant(PTR, None)
        if ref.space == "ws":
            base = slot_base[ref.index]
        elif ref.space == "weight":
            base = ptr(FIRST_WEIGHT + ref.index)
        elif ref.space == "input":
            base = ptr(PTR_INDEX[ref.index])
        else:
            base = ptr(PTR_INDEX[ref.space])
        if not ref.col:
            return base
        itemsize = dtypes.dtype(plan.dtype_of(ref)).itemsize
        return b.gep(base, [ir.Constant(I64, ref.col * itemsize)], source_etype=I8)

    for call in plan.calls:
        callee = kernels[call.symbol]
        params = signature(call.kind, call.params).params
        values = []
        for param, llvm_arg in zip(params, callee.args, strict=True):
            arg = call.args[param.name]
            if isinstance(arg, Ref):
                values.append(pointer(arg))
            elif isinstance(arg, Meta):
                values.append(_meta_table(module, arg))
            elif isinstance(arg, Dim):
                values.append(dims[arg.name])
            else:
                values.append(ir.Constant(llvm_arg.type, arg))
        b.call(callee, values)
    b.ret_void()

    version = ir.Function(module, ir.FunctionType(I64, []), "llmir_abi_version")
    ir.IRBuilder(version.append_basic_block()).ret(ir.Constant(I64, ABI_VERSION))
    _emit_model_info(module, plan, uses_amx)
    return fn


def _meta_table(module: ir.Module, meta: Meta) -> ir.Value:
    flat = [c for entry in meta.entries for c in entry]
    table = ir.GlobalVariable(module, ir.ArrayType(I64, len(flat)), module.get_unique_name("llmir_meta"))
    table.initializer = ir.Constant(table.type.pointee, flat)
    table.global_constant = True
    table.linkage = "internal"
    return table


def model_info(plan: Plan, uses_amx: bool) -> dict:
    """The sizes the library was compiled for; the loader sizes its buffers from these, never
    from the (editable) manifest, and checks the weights it passes against them (shape and dtype)
    and each step's indices against the limits (token_rows, position_rows, max_context).

    workspace: bytes (coefficients of T, L, TT, const); kv_pool: the pool's spec (dtype, dims);
    weights: [dtype, shape] per weight in the order the library takes them; amx: whether kernels
    call AMX micro-kernels (prefill-sized matmuls, where the OS grants the tile state)."""
    return {"abi_version": ABI_VERSION, "workspace": plan.workspace(), "kv_pool": plan.pool.to_json(),
            "logits_cols": plan.logits_cols, "weights": [[w.dtype, list(w.shape)] for w in plan.weights],
            "full_sequence": plan.full_sequence, "amx": uses_amx, **plan.limits}


def _emit_model_info(module: ir.Module, plan: Plan, uses_amx: bool) -> None:
    data = bytearray(json.dumps(model_info(plan, uses_amx), separators=(",", ":")).encode() + b"\0")
    text = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(8), len(data)), "llmir_model_info_json")
    text.initializer = ir.Constant(text.type.pointee, data)
    text.global_constant = True
    fn = ir.Function(module, ir.FunctionType(I8P, []), "llmir_model_info")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(b.bitcast(text, I8P))
