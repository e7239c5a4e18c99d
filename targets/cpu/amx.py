"""AMX micro-kernels (BF16 for float linears, INT8 for quantized ones), as textual LLVM IR
linked into a CPU library that calls them.

llvmlite's IR builder has no `x86_amx` type, so these few functions are written as LLVM IR text
with LLVM's shape-carrying AMX intrinsics (`llvm.x86.tileloadd64.internal` ...: LLVM configures
the tiles itself) and linked into the module of the kernels that declare them
(toolchain.compile_object's `extra`). Only the CPU variants with `amx-bf16` use them, and only
after llmir_amx_ready() (runtime.c) said that the OS grants the tile state.

BF16:

llmir_amx_bf16_<NB>x2(ct, w, ldw, xp, kblocks, nblocks) computes NB x 2 tiles of C^T = W . X^T
for each of nblocks blocks of 32 tokens (one call configures the tiles once: ldtilecfg waits for
every earlier tile operation, and one per 32-token block cost an eighth of the kernel's time):

* `w` points at row n0 of a row-major bf16 weight [n, k] (`ldw` bytes per row); the A tile of
  n-block i, k-block kb (16 rows x 32 bf16) is at w + 16*i*ldw + 64*kb.
* `xp` holds, per block of 32 tokens (4096 * kblocks bytes apart), X packed for the B operand
  (VNNI pairs): for k-block kb, part h (0: the
  bf16 rounding of x, 1: the bf16 rounding of what that left, so that hi + lo carries ~16 bits of
  x's mantissa) and token block tb (16 tokens), a 1 KiB tile at xp + 4096*kb + 2048*h + 1024*tb
  whose row r holds (x[t][32 kb + 2r], x[t][32 kb + 2r + 1]) for t = 0..15.
* `ct` receives the f32 results, per block of 32 tokens (2048 * NB bytes apart): tile (i, tb) =
  C^T[16 n][16 t] at ct + 1024*(2*i + tb), rows of 64 bytes: ct(i, tb)[r][c] = sum_k w[n0 + 16i + r][k] * (hi + lo)(x[16 tb + c][k]).

tdpbf16ps multiplies bf16 pairs exactly and accumulates in f32 (Intel SDM, TDPBF16PS), so the
only rounding besides f32 accumulation is that of x into hi + lo (relative 2^-18).
"""

from __future__ import annotations

import re

from llvmlite import ir

ATTRS = '"target-features"="+amx-tile,+amx-bf16,+avx512f"'


def _kernel(nb: int) -> str:
    name = f"llmir_amx_bf16_{nb}x2"
    lines = [f"define hidden void @{name}(ptr %ct0, ptr %w, i64 %ldw, ptr %xp0, i64 %kblocks, i64 %nblocks) "
             "noinline #0 {", "entry:", "  %a16 = mul i64 %ldw, 16", "  %xstride = mul i64 %kblocks, 4096",
             "  br label %blk.hdr", "blk.hdr:", "  %blk = phi i64 [0, %entry], [%blk1, %done]",
             "  %blks = icmp ult i64 %blk, %nblocks", "  br i1 %blks, label %blk.body, label %exit", "blk.body:",
             "  %xo = mul i64 %blk, %xstride", "  %xp = getelementptr i8, ptr %xp0, i64 %xo",
             f"  %co = mul i64 %blk, {2048 * nb}", "  %ct = getelementptr i8, ptr %ct0, i64 %co"]
    for i in range(nb):
        for tb in range(2):
            lines.append(f"  %z{i}{tb} = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)")
    lines += ["  br label %loop", "loop:", "  %kb = phi i64 [0, %blk.body], [%kb1, %loop]"]
    for i in range(nb):
        for tb in range(2):
            lines.append(f"  %c{i}{tb} = phi x86_amx [%z{i}{tb}, %blk.body], [%n{i}{tb}_1, %loop]")
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
    lines += ["  %blk1 = add i64 %blk, 1", "  br label %blk.hdr", "exit:", "  ret void", "}"]
    return "\n".join(lines)


# --- INT8 (qlinear, prefill)

INT8_MODES = ("row", "group_none", "group_int", "group_min")
INT8_UNIT = 640  # bytes of one 32-input sub-group of a packed operand: a 512-byte tile, two f32 x 16


def _int8_kernel(mode: str) -> str:
    """llmir_amx_i8_<mode>(acc, w, x, nsub, ntb): 16 weight rows x ntb blocks of 16 tokens, over
    nsub sub-groups of 32 inputs, each one K = 32 tile product (exact in i32) finished in f32 by the
    vector units. One call configures the tiles once (ldtilecfg waits for every tile operation
    before it: one per 16-token block cost a third of the kernel's time).

    * `w` holds, per sub-group j at w + 640 j, the A tile (16 rows x 32 code bytes, rows 32 bytes
      apart) and two f32 x 16 per row: s (the row's scale of that group) at +512, c at +576.
    * `x` holds, for token block tb and sub-group j at x + 640 (nsub tb + j), the B tile (8 rows
      of 16 tokens x 4 activation bytes: row kk holds inputs 4kk .. 4kk+3 of each token) and two
      f32 x 16 per token: the activation block's d at +512, e at +576 (quant_kernels.py).
    * `acc` receives per token block 16 rows of <16 x float> (row r at acc + 1024 tb + 64 r,
      lane = token):
        row:        sum_j d acc_j                 (codes signed u - center; scale applied later)
        group_none: sum_j s (d acc_j)             (codes signed u - center)
        group_int:  sum_j s (d acc_j + c e)       (codes unsigned, c = -z, e = d sum(q))
        group_min:  sum_j s (d acc_j) + c e       (codes unsigned, c = the group's min)
    Signed codes take tdpbssd, unsigned ones tdpbusd (Intel SDM: TDPBSSD, TDPBUSD; the first
    source unsigned for the latter). The tile product leaves its tile after every sub-group (the
    activation scale d changes), and that 1 KiB store with the conversion and FMAs per output
    bound the kernel, not the tile multiply; unrolling over sub-groups, or finishing one
    sub-group while the next multiplies, measured within 5% of this plain loop."""
    dot = "tdpbusd" if mode in ("group_int", "group_min") else "tdpbssd"
    vf = "<16 x float>"
    fma = f"call {vf} @llvm.fma.v16f32"

    def finish(f, g):
        """accumulators %<g>r = %<f>r + the sub-group's products (in %ct; scales at %wp, %xp)"""
        lines = ["  %dp = getelementptr i8, ptr %xp, i64 512", f"  %d = load {vf}, ptr %dp, align 64",
                 "  %ep = getelementptr i8, ptr %xp, i64 576", f"  %e = load {vf}, ptr %ep, align 64"]

        def splat(name, off):
            return [f"  %{name}.p = getelementptr i8, ptr %wp, i64 {off}",
                    f"  %{name}.f = load float, ptr %{name}.p, align 4",
                    f"  %{name}.i = insertelement {vf} poison, float %{name}.f, i64 0",
                    f"  %{name} = shufflevector {vf} %{name}.i, {vf} poison, <16 x i32> zeroinitializer"]
        for r in range(16):
            out = f"%{g}{r}"
            lines += [f"  %cp{r} = getelementptr i8, ptr %ct, i64 {64 * r}",
                      f"  %ci{r} = load <16 x i32>, ptr %cp{r}, align 64",
                      f"  %cf{r} = sitofp <16 x i32> %ci{r} to {vf}"]
            if mode == "row":
                lines.append(f"  {out} = {fma}({vf} %cf{r}, {vf} %d, {vf} %{f}{r})")
                continue
            lines += splat(f"s{r}", 512 + 4 * r)
            if mode == "group_int":
                lines += splat(f"k{r}", 576 + 4 * r)
                lines += [f"  %ke{r} = fmul {vf} %k{r}, %e",
                          f"  %t{r} = {fma}({vf} %cf{r}, {vf} %d, {vf} %ke{r})",
                          f"  {out} = {fma}({vf} %s{r}, {vf} %t{r}, {vf} %{f}{r})"]
            elif mode == "group_min":
                lines += splat(f"k{r}", 576 + 4 * r)
                lines += [f"  %t{r} = fmul {vf} %cf{r}, %d",
                          f"  %h{r} = {fma}({vf} %k{r}, {vf} %e, {vf} %{f}{r})",
                          f"  {out} = {fma}({vf} %s{r}, {vf} %t{r}, {vf} %h{r})"]
            else:
                lines += [f"  %t{r} = fmul {vf} %cf{r}, %d",
                          f"  {out} = {fma}({vf} %s{r}, {vf} %t{r}, {vf} %{f}{r})"]
        return lines

    lines = [f"define hidden void @llmir_amx_i8_{mode}(ptr %acc, ptr %w, ptr %x, i64 %nsub, i64 %ntb) "
             "noinline #0 {", "entry:", "  %ct = alloca [256 x i32], align 64",
             "  br label %tb.hdr", "tb.hdr:", "  %tb = phi i64 [0, %entry], [%tb1, %done]",
             "  %tbs = icmp ult i64 %tb, %ntb", "  br i1 %tbs, label %tb.body, label %exit", "tb.body:",
             "  %xo = mul i64 %tb, %nsub", f"  %xo1 = mul i64 %xo, {INT8_UNIT}",
             "  %xt = getelementptr i8, ptr %x, i64 %xo1", "  %ao = mul i64 %tb, 1024",
             "  %acct = getelementptr i8, ptr %acc, i64 %ao", "  br label %loop", "loop:",
             "  %j = phi i64 [0, %tb.body], [%j1, %loop]"]
    lines += [f"  %f{r} = phi {vf} [zeroinitializer, %tb.body], [%g{r}, %loop]" for r in range(16)]
    lines += [f"  %off = mul i64 %j, {INT8_UNIT}",
              "  %wp = getelementptr i8, ptr %w, i64 %off",
              "  %xp = getelementptr i8, ptr %xt, i64 %off",
              "  %a = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 32, ptr %wp, i64 32)",
              "  %b = call x86_amx @llvm.x86.tileloadd64.internal(i16 8, i16 64, ptr %xp, i64 64)",
              "  %z = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)",
              f"  %c = call x86_amx @llvm.x86.{dot}.internal(i16 16, i16 64, i16 32, x86_amx %z, x86_amx %a, x86_amx %b)",
              "  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %ct, i64 64, x86_amx %c)"]
    lines += finish("f", "g")
    lines += ["  %j1 = add i64 %j, 1", "  %more = icmp ult i64 %j1, %nsub",
              "  br i1 %more, label %loop, label %done", "done:"]
    for r in range(16):
        lines += [f"  %op{r} = getelementptr i8, ptr %acct, i64 {64 * r}",
                  f"  store {vf} %g{r}, ptr %op{r}, align 4"]
    lines += ["  %tb1 = add i64 %tb, 1", "  br label %tb.hdr", "exit:", "  ret void", "}"]
    return "\n".join(lines)


def module_text(triple: str, int8: bool = False) -> str:
    """The micro-kernels as an LLVM IR module for `triple`: BF16 (1 and 2 n-blocks), and with
    `int8` the INT8 ones (every mode)."""
    parts = [f'target triple = "{triple}"',
             "declare x86_amx @llvm.x86.tileloadd64.internal(i16, i16, ptr, i64)",
             "declare x86_amx @llvm.x86.tdpbf16ps.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)",
             "declare void @llvm.x86.tilestored64.internal(i16, i16, ptr, i64, x86_amx)",
             "declare x86_amx @llvm.x86.tilezero.internal(i16, i16)",
             _kernel(1), _kernel(2)]
    attrs = ATTRS
    if int8:
        parts += ["declare x86_amx @llvm.x86.tdpbssd.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)",
                  "declare x86_amx @llvm.x86.tdpbusd.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)",
                  "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)"]
        parts += [_int8_kernel(m) for m in INT8_MODES]
        attrs = ATTRS.replace("+amx-bf16", "+amx-bf16,+amx-int8")
    parts += [f"attributes #0 = {{ {attrs} }}", ""]
    return "\n".join(parts)


def declare(module: ir.Module, nb: int) -> ir.Function:
    """The llvmlite declaration of llmir_amx_bf16_<nb>x2 (defined by module_text)."""
    return _declare(module, f"llmir_amx_bf16_{nb}x2", int8=False)


def declare_int8(module: ir.Module, mode: str) -> ir.Function:
    """The llvmlite declaration of llmir_amx_i8_<mode>(acc, w, x, nsub, ntb) (defined by
    module_text)."""
    return _declare(module, f"llmir_amx_i8_{mode}", int8=True)


def _declare(module: ir.Module, name: str, int8: bool) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        ptr, i64 = ir.PointerType(), ir.IntType(64)
        types = [ptr, ptr, ptr, i64, i64] if int8 else [ptr, ptr, i64, ptr, i64, i64]
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), types), name)
    return fn


def used_by(llvm_ir: str) -> bool:
    """Whether a module's LLVM IR text calls the AMX micro-kernels."""
    return re.search(r'@"?llmir_amx_', llvm_ir) is not None


def int8_used_by(llvm_ir: str) -> bool:
    """Whether a module's LLVM IR text calls the AMX-INT8 micro-kernels."""
    return re.search(r'@"?llmir_amx_i8_', llvm_ir) is not None
