"""AMX-BF16 micro-kernels, as textual LLVM IR linked into a CPU library that calls them.

llvmlite's IR builder has no `x86_amx` type, so these few functions are written as LLVM IR text
with LLVM's shape-carrying AMX intrinsics (`llvm.x86.tileloadd64.internal` ...: LLVM configures
the tiles itself) and linked into the module of the kernels that declare them
(toolchain.compile_object's `extra`). Only the CPU variants with `amx-bf16` use them, and only
after llmir_amx_ready() (runtime.c) said that the OS grants the tile state.

llmir_amx_bf16_<NB>x2(ct, w, ldw, xp, kblocks) computes NB x 2 tiles of C^T = W . X^T:

* `w` points at row n0 of a row-major bf16 weight [n, k] (`ldw` bytes per row); the A tile of
  n-block i, k-block kb (16 rows x 32 bf16) is at w + 16*i*ldw + 64*kb.
* `xp` holds 32 tokens of X packed for the B operand (VNNI pairs): for k-block kb, part h (0: the
  bf16 rounding of x, 1: the bf16 rounding of what that left, so that hi + lo carries ~16 bits of
  x's mantissa) and token block tb (16 tokens), a 1 KiB tile at xp + 4096*kb + 2048*h + 1024*tb
  whose row r holds (x[t][32 kb + 2r], x[t][32 kb + 2r + 1]) for t = 0..15.
* `ct` receives the f32 results: tile (i, tb) = C^T[16 n][16 t] at ct + 1024*(2*i + tb), rows of
  64 bytes: ct(i, tb)[r][c] = sum_k w[n0 + 16i + r][k] * (hi + lo)(x[16 tb + c][k]).

tdpbf16ps multiplies bf16 pairs exactly and accumulates in f32 (Intel SDM, TDPBF16PS), so the
only rounding besides f32 accumulation is that of x into hi + lo (relative 2^-18).
"""

from __future__ import annotations

from llvmlite import ir

ATTRS = '"target-features"="+amx-tile,+amx-bf16,+avx512f"'


def _kernel(nb: int) -> str:
    name = f"llmir_amx_bf16_{nb}x2"
    lines = [f"define hidden void @{name}(ptr %ct, ptr %w, i64 %ldw, ptr %xp, i64 %kblocks) noinline #0 {{",
             "entry:"]
    for i in range(nb):
        for tb in range(2):
            lines.append(f"  %z{i}{tb} = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)")
    lines += ["  %a16 = mul i64 %ldw, 16", "  br label %loop", "loop:",
              "  %kb = phi i64 [0, %entry], [%kb1, %loop]"]
    for i in range(nb):
        for tb in range(2):
            lines.append(f"  %c{i}{tb} = phi x86_amx [%z{i}{tb}, %entry], [%n{i}{tb}_1, %loop]")
    lines.append("  %ka = mul i64 %kb, 64")
    for i in range(nb):
        lines += [f"  %ao{i} = add i64 %ka, {'0' if i == 0 else '%a16'}",
                  f"  %ap{i} = getelementptr i8, ptr %w, i64 %ao{i}",
                  f"  %a{i} = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %ap{i}, i64 %ldw)"]
    lines.append("  %kx = mul i64 %kb, 4096")
    for tb in range(2):
        for h in range(2):
            off = 2048 * h + 1024 * tb
            lines += [f"  %bo{tb}{h} = add i64 %kx, {off}",
                      f"  %bp{tb}{h} = getelementptr i8, ptr %xp, i64 %bo{tb}{h}",
                      f"  %b{tb}{h} = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %bp{tb}{h}, "
                      "i64 64)"]
            for i in range(nb):
                src = f"%c{i}{tb}" if h == 0 else f"%n{i}{tb}_0"
                lines.append(f"  %n{i}{tb}_{h} = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, "
                             f"i16 64, x86_amx {src}, x86_amx %a{i}, x86_amx %b{tb}{h})")
    lines += ["  %kb1 = add i64 %kb, 1", "  %more = icmp ult i64 %kb1, %kblocks",
              "  br i1 %more, label %loop, label %done", "done:"]
    for i in range(nb):
        for tb in range(2):
            lines += [f"  %cp{i}{tb} = getelementptr i8, ptr %ct, i64 {1024 * (2 * i + tb)}",
                      f"  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %cp{i}{tb}, i64 64, "
                      f"x86_amx %n{i}{tb}_1)"]
    lines += ["  ret void", "}"]
    return "\n".join(lines)


def module_text(triple: str) -> str:
    """The micro-kernels (1 and 2 n-blocks) as an LLVM IR module for `triple`."""
    return "\n".join([
        f'target triple = "{triple}"',
        "declare x86_amx @llvm.x86.tileloadd64.internal(i16, i16, ptr, i64)",
        "declare x86_amx @llvm.x86.tdpbf16ps.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)",
        "declare void @llvm.x86.tilestored64.internal(i16, i16, ptr, i64, x86_amx)",
        "declare x86_amx @llvm.x86.tilezero.internal(i16, i16)",
        _kernel(1), _kernel(2),
        f"attributes #0 = {{ {ATTRS} }}", ""])


def declare(module: ir.Module, nb: int) -> ir.Function:
    """The llvmlite declaration of llmir_amx_bf16_<nb>x2 (defined by module_text)."""
    name = f"llmir_amx_bf16_{nb}x2"
    fn = module.globals.get(name)
    if fn is None:
        ptr, i64 = ir.PointerType(), ir.IntType(64)
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr, ptr, i64, ptr, i64]), name)
    return fn


def used_by(module: ir.Module) -> bool:
    return any(name.startswith("llmir_amx_bf16_") for name in module.globals)
