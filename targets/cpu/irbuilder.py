"""Small llvmlite helpers that keep the cpu kernels readable.

Types and constants, counted loops as context managers (phi induction variables, i64),
entry-block allocas (mem2reg/SROA turn them back into registers), unaligned vector loads and
stores of f32 lanes, intrinsics (fma, sqrt, min/max, reductions), a many-vectors-at-once
horizontal sum, accurate inline vector exp / erfc / x*sigmoid(z), libm calls (lane by lane),
and `parallel_for` over the library's thread pool (runtime.c).

Vectors are `<n x float>` for any n >= 1; a kernel picks n from the variant's vector width
and handles remainders with narrower vectors (see `vector_chunks`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable, Sequence

from llvmlite import ir

F32 = ir.FloatType()
F64 = ir.DoubleType()
HALF = ir.HalfType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

# Fast-math flags for arithmetic whose association order does not matter (dot products, sums).
# No nnan/ninf: NaN and inf inputs must still propagate.
FAST = ("reassoc", "contract", "nsz")


def vty(n: int, elem=F32) -> ir.VectorType:
    return ir.VectorType(elem, n)


def width(v: ir.Value) -> int:
    """Lanes of a vector value, 0 for a scalar."""
    return v.type.count if isinstance(v.type, ir.VectorType) else 0


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, v)


def i64(v) -> ir.Value:
    return v if isinstance(v, ir.Value) else ir.Constant(I64, int(v))


def f32(v: float) -> ir.Constant:
    return ir.Constant(F32, float(v))


def const_like(ty: ir.Type, value: float) -> ir.Constant:
    """A float constant of type `ty` (f32 or <n x f32>, splatted)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [float(value)] * ty.count)
    return ir.Constant(ty, float(value))


def define(module: ir.Module, name: str, args: Sequence[tuple[str, ir.Type]], ret=VOID,
           internal: bool = False) -> tuple[ir.Function, ir.IRBuilder]:
    """Define a function with named arguments; returns it and a builder at its entry."""
    fn = ir.Function(module, ir.FunctionType(ret, [t for _, t in args]), name)
    for a, (n, _) in zip(fn.args, args):
        a.name = n
    fn.attributes.add("nounwind")
    if internal:
        fn.linkage = "internal"
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def declare(module: ir.Module, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, list(args)), name)
    return fn


# --- control flow

@contextmanager
def for_range(b: ir.IRBuilder, start, stop, step=1, name: str = "i"):
    """`for (i = start; i < stop; i += step)` over i64; yields i. Signed compare."""
    start, stop, step = i64(start), i64(stop), i64(step)
    pre = b.block
    hdr = b.append_basic_block(name + ".hdr")
    body = b.append_basic_block(name + ".body")
    end = b.append_basic_block(name + ".end")
    b.branch(hdr)
    b.position_at_end(hdr)
    i = b.phi(I64, name)
    i.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", i, stop), body, end)
    b.position_at_end(body)
    yield i
    nxt = b.add(i, step, flags=("nsw",))
    i.add_incoming(nxt, b.block)
    b.branch(hdr)
    b.position_at_end(end)


@contextmanager
def while_(b: ir.IRBuilder, cond: Callable[[ir.IRBuilder], ir.Value], name: str = "w"):
    """`while (cond(b)) { body }`: cond is emitted in the loop header each iteration."""
    hdr = b.append_basic_block(name + ".hdr")
    body = b.append_basic_block(name + ".body")
    end = b.append_basic_block(name + ".end")
    b.branch(hdr)
    b.position_at_end(hdr)
    b.cbranch(cond(b), body, end)
    b.position_at_end(body)
    yield
    b.branch(hdr)
    b.position_at_end(end)


def var(b: ir.IRBuilder, ty: ir.Type, init=None, name: str = "") -> ir.Value:
    """A stack slot in the entry block (promoted to a register by mem2reg); `init` is stored
    at the current position."""
    with b.goto_entry_block():
        p = b.alloca(ty, name=name)
    p.type = PTR  # an opaque pointer (llvmlite types allocas as typed pointers)
    if init is not None:
        b.store(init, p)
    return p


def keep_in_memory(b: ir.IRBuilder, slots: Sequence[ir.Value]) -> None:
    """An empty inline asm that takes the stack slots' addresses and clobbers memory: the slots
    escape, so mem2reg cannot promote them, and no value behind them stays in a register across
    this point. For accumulators touched rarely in a loop whose other values need every
    register (qlinear's f32 sums on 16-register ISAs: promoted, they made LLVM spill the inner
    loop's operands instead)."""
    fty = ir.FunctionType(ir.VoidType(), [PTR] * len(slots))
    asm = ir.InlineAsm(fty, "", ",".join(["r"] * len(slots) + ["~{memory}"]), side_effect=True)
    b.call(asm, list(slots))


def imin(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def imax(b, x, y):
    return b.select(b.icmp_signed(">", x, y), x, y)


# --- memory

def gep(b: ir.IRBuilder, ptr: ir.Value, idx, ety: ir.Type = F32, inbounds: bool = True
        ) -> ir.Value:
    return b.gep(ptr, [i64(idx)], inbounds=inbounds, source_etype=ety)


# How far ahead a weight read one row at a time (decode) is prefetched, in bytes: the next row is
# too near on a Zen 4 host, 16 KiB ran its Q4_0 decode 20% faster (BENCHMARKS.md, "one row at a time").
PREFETCH_AHEAD = 16 * 1024


def rows_ahead(R: int, row_bytes: int, streamed: bool = False) -> int:
    """Rows of the weight ahead of a block of R rows that its software prefetch reads: the next
    block, or for a decode block (`streamed`, see by_row_blocks) the row PREFETCH_AHEAD bytes on
    (at least the next block)."""
    return max(R, -(-PREFETCH_AHEAD // row_bytes)) if streamed else R


def by_row_blocks(b: ir.IRBuilder, ng: ir.Value, cmax: ir.Value, rows: Sequence[int], emit,
                  one_row_decode: bool = True, decode_rows: Sequence[int] | None = None) -> None:
    """Emit, under the condition that picks it, emit(R, sizes, streamed) for each row-block height
    R. With one token group (decode: memory-bound) and `one_row_decode` (CpuVariant.one_row_decode),
    the weight streams in address order (`streamed`): a group of c tokens reads decode_rows[c - 1]
    rows side by side (default 1, one row at a time). Otherwise R = rows[c - 1] for the largest
    group c = cmax (groups hold cmax or cmax - 1 tokens). Heights must not grow with c."""
    C = len(rows)

    def by_height(heights, streamed: bool):
        for R in sorted(set(heights), reverse=True):
            cs = [c for c in range(1, C + 1) if heights[c - 1] == R]
            with b.if_then(b.and_(b.icmp_signed(">=", cmax, i64(cs[0])), b.icmp_signed("<=", cmax, i64(cs[-1])))):
                emit(R, range(cs[0] if streamed else max(1, cs[0] - 1), cs[-1] + 1), streamed)
    if not one_row_decode:
        by_height(rows, False)
        return
    with b.if_else(b.icmp_signed("==", ng, i64(1))) as (streamed, other):
        with streamed:
            by_height(decode_rows or (1,) * C, True)
        with other:
            by_height(rows, False)


def prefetch(b: ir.IRBuilder, ptr: ir.Value) -> None:
    """Prefetch the cache line at ptr for reading (into all cache levels). A prefetch never
    faults, so ptr may point past the end of a buffer (build it with inbounds=False)."""
    fn = declare(b.module, "llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
    b.call(fn, [ptr, i32(0), i32(3), i32(1)])


def load_vec(b: ir.IRBuilder, ptr: ir.Value, idx, n: int) -> ir.Value:
    """Load `<n x float>` from ptr[idx .. idx+n) (unaligned)."""
    return b.load(gep(b, ptr, idx), typ=vty(n), align=4)


def store_vec(b: ir.IRBuilder, val: ir.Value, ptr: ir.Value, idx) -> None:
    b.store(val, gep(b, ptr, idx), align=4)


def load_f32(b, ptr, idx) -> ir.Value:
    return b.load(gep(b, ptr, idx), typ=F32, align=4)


def load_i32(b, ptr, idx) -> ir.Value:
    """Load an i32 and sign-extend it to i64."""
    return b.sext(b.load(gep(b, ptr, idx, I32), typ=I32, align=4), I64)


class Storage:
    """How kernels address, read and write elements stored as `dtype` (float32, bfloat16, float16;
    int8 codes are read only): values are always f32 in registers. Loads widen exactly (bf16: the
    bits shifted into the top half of an f32; f16: fpext, F16C's vcvtph2ps where the cpu has it;
    int8: sitofp, the caller applies the scale); stores round to nearest even (bf16: by integer
    arithmetic, NaN kept quiet NaN; f16: fptrunc)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.ety = {"float32": F32, "bfloat16": I16, "float16": HALF, "int8": I8}[dtype]
        self.itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[dtype]

    def gep(self, b: ir.IRBuilder, ptr: ir.Value, idx, inbounds: bool = True) -> ir.Value:
        return gep(b, ptr, idx, self.ety, inbounds)

    def load(self, b: ir.IRBuilder, ptr: ir.Value, idx, n: int) -> ir.Value:
        """`<n x float>` (n >= 1) from the n elements at ptr[idx]; n = 0: one f32 scalar."""
        ty = vty(n, self.ety) if n else self.ety
        raw = b.load(self.gep(b, ptr, idx), typ=ty, align=self.itemsize)
        if self.dtype == "float32":
            return raw
        fty = vty(n) if n else F32
        if self.dtype == "float16":
            return b.fpext(raw, fty)
        if self.dtype == "int8":
            return b.sitofp(raw, fty)
        ity = vty(n, I32) if n else I32
        wide = b.shl(b.zext(raw, ity), ir.Constant(ity, [16] * n) if n else ir.Constant(I32, 16))
        return b.bitcast(wide, fty)

    def store(self, b: ir.IRBuilder, val: ir.Value, ptr: ir.Value, idx) -> None:
        """Store f32 value(s) `val` (scalar or vector) as this storage type at ptr[idx]."""
        n = width(val)
        if self.dtype == "float32":
            out = val
        elif self.dtype == "float16":
            out = b.fptrunc(val, vty(n, HALF) if n else HALF)
        else:
            out = bf16_round(b, val)
        b.store(out, self.gep(b, ptr, idx), align=self.itemsize)


def bf16_round(b: ir.IRBuilder, val: ir.Value) -> ir.Value:
    """f32 value(s) rounded to nearest even bf16, as i16 bit patterns (NaN stays a quiet NaN)."""
    n = width(val)
    ity = vty(n, I32) if n else I32

    def c(v):
        return ir.Constant(ity, [v] * n) if n else ir.Constant(I32, v)
    bits = b.bitcast(val, ity)
    lsb = b.and_(b.lshr(bits, c(16)), c(1))
    rounded = b.lshr(b.add(bits, b.add(lsb, c(0x7FFF))), c(16))
    quiet = b.or_(b.lshr(bits, c(16)), c(0x40))
    isnan = b.fcmp_unordered("uno", val, val)
    return b.trunc(b.select(isnan, quiet, rounded), vty(n, I16) if n else I16)


def bf16_widen(b: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """i16 bf16 bit patterns (vector) as f32 (exact)."""
    n = width(bits)
    return b.bitcast(b.shl(b.zext(bits, vty(n, I32)), ir.Constant(vty(n, I32), [16] * n)), vty(n))


def transpose(b: ir.IRBuilder, rows: Sequence[ir.Value]) -> list[ir.Value]:
    """The transpose of an n x n matrix held as n vectors of n lanes (n a power of two): log2(n)
    stages of two-vector shuffles that swap off-diagonal blocks of halving size."""
    v, n = list(rows), len(rows)
    h = n // 2
    while h:
        for i in range(n):
            if i & h:
                continue
            a, c = v[i], v[i + h]
            v[i] = shuffle(b, a, c, [j if not j & h else n + j - h for j in range(n)])
            v[i + h] = shuffle(b, a, c, [j + h if not j & h else n + j for j in range(n)])
        h //= 2
    return v


def storage(dtype: str) -> Storage:
    return Storage(dtype)


def memcpy(b: ir.IRBuilder, dst, src, nbytes) -> None:
    fn = b.module.declare_intrinsic("llvm.memcpy", [PTR, PTR, I64])
    b.call(fn, [dst, src, i64(nbytes), ir.Constant(I1, 0)])


# --- vectors

def splat(b: ir.IRBuilder, x, n: int) -> ir.Value:
    """x (a Python float, or a scalar value of any type) in all n lanes of a vector"""
    if isinstance(x, (int, float)):
        return const_like(vty(n), x)
    if isinstance(x, ir.Constant):
        return ir.Constant(vty(n, x.type), [x.constant] * n)
    v = b.insert_element(ir.Constant(vty(n, x.type), ir.Undefined), x, i32(0))
    return b.shuffle_vector(v, v, ir.Constant(vty(n, I32), [0] * n))


def shuffle(b: ir.IRBuilder, x, y, mask: Sequence[int]) -> ir.Value:
    return b.shuffle_vector(x, y, ir.Constant(vty(len(mask), I32), list(mask)))


def lanes(b: ir.IRBuilder, v, start: int, count: int) -> ir.Value:
    """Lanes [start, start+count) of v as a `<count x float>`."""
    if start == 0 and count == width(v):
        return v
    return shuffle(b, v, v, range(start, start + count))


def widen(b: ir.IRBuilder, v, n: int) -> ir.Value:
    """Zero-pad vector v to n lanes."""
    m = width(v)
    if m == n:
        return v
    return shuffle(b, v, const_like(v.type, 0.0), list(range(m)) + [m] * (n - m))


def concat(b: ir.IRBuilder, vs: Sequence[ir.Value]) -> ir.Value:
    """Concatenate equal-width vectors (count a power of two)."""
    vs = list(vs)
    while len(vs) > 1:
        w = width(vs[0])
        vs = [shuffle(b, vs[i], vs[i + 1], range(2 * w)) for i in range(0, len(vs), 2)]
    return vs[0]


def _overload(ty: ir.Type) -> str:
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{ty.element.intrinsic_name}"
    return ty.intrinsic_name


def intrinsic(b: ir.IRBuilder, name: str, args: Sequence[ir.Value], fastmath=()) -> ir.Value:
    """Call an LLVM intrinsic overloaded on (and returning) its first argument's type."""
    ty = args[0].type
    fn = declare(b.module, f"{name}.{_overload(ty)}", ty, [a.type for a in args])
    return b.call(fn, list(args), fastmath=fastmath)


def fma(b, x, y, z) -> ir.Value:
    """x * y + z, fused where the target has FMA (llvm.fmuladd; llvm.fma would become a
    libm call per lane on targets without it, such as x86-64-v2)."""
    return intrinsic(b, "llvm.fmuladd", [x, y, z])


def fmax(b, x, y) -> ir.Value:
    return intrinsic(b, "llvm.maxnum", [x, y])


def fmin(b, x, y) -> ir.Value:
    return intrinsic(b, "llvm.minnum", [x, y])


def sqrt(b, x) -> ir.Value:
    return intrinsic(b, "llvm.sqrt", [x])


def hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of the lanes of v (any association order)."""
    n = width(v)
    if n == 0:
        return v
    if n == 1:
        return b.extract_element(v, i32(0))
    fn = declare(b.module, f"llvm.vector.reduce.fadd.{_overload(v.type)}", F32, [F32, v.type])
    return b.call(fn, [f32(-0.0), v], fastmath=("reassoc", "nsz"))


def hmax(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Max of the lanes of v by a shuffle tree of maxnum (NaN lanes are ignored); another width
    than a power of two is first padded to one with copies of lane 0 (the tree dropped lanes:
    int8 per-row qlinear's sub-groups of 20, 24 or 28 inputs lost the activation scale's maximum).
    llvm.vector.reduce.fmax without fast-math flags lowers to a serial chain."""
    n = width(v)
    if n == 0:
        return v
    if n & (n - 1):
        v = shuffle(b, v, v, [*range(n), *[0] * ((1 << n.bit_length()) - n)])
        n = width(v)
    while n > 1:
        n //= 2
        v = fmax(b, lanes(b, v, 0, n), lanes(b, v, n, n))
    return b.extract_element(v, i32(0))


def hsum_many(b: ir.IRBuilder, vecs: Sequence[ir.Value]) -> ir.Value:
    """Horizontal sums of several equal-width vectors at once, by a transpose-and-add tree.

    Returns a vector whose lane i is the sum of the lanes of vecs[i] (padded with zero lanes to
    a power of two). Costs about 3 shuffle/add instructions per pair instead of a full
    reduction per vector. Each vector's lanes are summed in the same order whatever the number
    of vectors, Butterfly's: lane j with lane j + w/2, then those sums alike (no reassociation:
    kernels that must match bit for bit across shapes rely on it).
    """
    vecs = list(vecs)
    w = width(vecs[0])
    p = 1 << max(0, (len(vecs) - 1).bit_length())
    zero = const_like(vecs[0].type, 0.0)
    vecs += [zero] * (p - len(vecs))
    if w == 1:
        return concat(b, vecs)
    if p > w:  # reduce groups of w vectors separately, then concatenate
        return concat(b, [hsum_many(b, vecs[i:i + w]) for i in range(0, p, w)])
    seg = w  # each vector holds (w // seg) segments of length seg, in input order
    while len(vecs) > 1:
        half = seg // 2
        first = [s * seg + j for s in range(w // seg) for j in range(half)]
        second = [s * seg + half + j for s in range(w // seg) for j in range(half)]
        nxt = []
        for x, y in zip(vecs[0::2], vecs[1::2]):
            lo = shuffle(b, x, y, first + [w + i for i in first])
            hi = shuffle(b, x, y, second + [w + i for i in second])
            nxt.append(b.fadd(lo, hi))
        vecs, seg = nxt, half
    v = vecs[0]
    while seg > 1:  # fewer vectors than lanes: fold within each segment
        n = width(v)
        half = seg // 2
        lo = shuffle(b, v, v, [s * seg + j for s in range(n // seg) for j in range(half)])
        hi = shuffle(b, v, v, [s * seg + half + j for s in range(n // seg) for j in range(half)])
        v = b.fadd(lo, hi)
        seg = half
    return v


def bit_reversed(n: int) -> list[int]:
    """0..n-1 (n a power of two) in bit-reversed order: the order in which Butterfly takes the
    lanes of a vector."""
    bits = n.bit_length() - 1
    return [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)]


class Butterfly:
    """The sum of n values (n a power of two), fed one at a time, in the order hsum_many sums
    the n lanes of one vector: lane j + lane j + n/2 for j < n/2, then the same on those sums,
    until one is left. Fed in bit_reversed(n) order, that is adjacent pairs, then adjacent pairs
    of pairs: add() emits each sum as soon as both halves are there, so few partial sums are
    live at once (values may be vectors: a lane each summed alike)."""

    def __init__(self, b: ir.IRBuilder):
        self.b, self.stack = b, []  # (level, partial sum)

    def add(self, v: ir.Value) -> None:
        level = 0
        while self.stack and self.stack[-1][0] == level:
            v = self.b.fadd(self.stack.pop()[1], v)
            level += 1
        self.stack.append((level, v))

    def total(self) -> ir.Value:
        assert len(self.stack) == 1, "Butterfly: fed a number of values that is not a power of two"
        return self.stack[0][1]


def vector_chunks(n: int, vw: int) -> tuple[int, list[tuple[int, int]]]:
    """Split [0, n) into `n // vw` full vectors and a static tail of power-of-two widths.

    Returns (number of full vectors, [(offset, width), ...] for the tail).
    """
    nfull = n // vw
    tail, off, w = [], nfull * vw, vw // 2
    rem = n - off
    while w >= 1:
        if rem & w:
            tail.append((off, w))
            off += w
        w //= 2
    return nfull, tail


def vector_loop(b: ir.IRBuilder, n: int, vw: int, body: Callable, unroll: int = 1,
                name: str = "v") -> None:
    """Emit body(b, offset: i64 value, width: int, slot: int) over [0, n) for a static n.

    Full vectors run in a loop unrolled `unroll` times (slot = 0..unroll-1 tells the body
    which of its independent accumulators to use); the tail is straight-line code with
    narrower vectors (slot 0).
    """
    nfull, tail = vector_chunks(n, vw)
    step = vw * unroll
    nloop = nfull // unroll
    if nloop == 1:
        for u in range(unroll):
            body(b, i64(u * vw), vw, u)
    elif nloop > 1:
        with for_range(b, 0, nloop * step, step, name) as off:
            for u in range(unroll):
                body(b, off if u == 0 else b.add(off, i64(u * vw), flags=("nsw",)), vw, u)
    for u in range(nfull - nloop * unroll):
        body(b, i64(nloop * step + u * vw), vw, u)
    for off, w in tail:
        body(b, i64(off), w, 0)


# --- math

def libm(b: ir.IRBuilder, name: str, x: ir.Value) -> ir.Value:
    """Call a one-argument libm function on a scalar, or lane by lane on a vector: float
    functions (expf, cosf, sinf, erff, tanhf) on f32, double ones (exp, erfc, ...) on f64."""
    ety = x.type.element if isinstance(x.type, ir.VectorType) else x.type
    fn = declare(b.module, name, ety, [ety])
    n = width(x)
    if n == 0:
        return b.call(fn, [x])
    out = ir.Constant(x.type, ir.Undefined)
    for i in range(n):
        out = b.insert_element(out, b.call(fn, [b.extract_element(x, i32(i))]), i32(i))
    return out


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375          # 9 significant bits: n * LN2_HI is exact for |n| < 2^15
_LN2_LO = -2.12194440e-4
# Minimax polynomial for (exp(r) - 1 - r) / r^2 on [-ln2/2, ln2/2] (Cephes expf).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def exp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp(x) as f32 (scalar or vector), inline (no libm call), within ~1 ulp over the whole
    range: Cody-Waite reduction x = n ln2 + r, a degree-7 polynomial for e^r, then scaling by
    2^n in two steps so results underflow gradually to denormals and 0 and overflow to inf.
    NaN propagates. `x` may be f64 (or <n x double>): the reduction then runs in f64, so an
    argument computed in f64 keeps its precision (the result is still f32)."""
    n_lanes = width(x)
    fty = vty(n_lanes) if n_lanes else F32
    ity = vty(n_lanes, I32) if n_lanes else I32
    def ic(v):
        return ir.Constant(ity, [v] * n_lanes if n_lanes else v)

    def c(v):
        return const_like(fty, v)

    def xc_(v):
        return const_like(x.type, v)

    wide = (x.type.element if n_lanes else x.type) == F64
    xc = fmin(b, fmax(b, x, xc_(-104.0)), xc_(89.0))
    n = intrinsic(b, "llvm.rint", [b.fmul(xc, xc_(_LOG2E))])
    if wide:
        r = b.fptrunc(fma(b, n, xc_(-math.log(2.0)), xc), fty)
    else:
        r = fma(b, n, c(-_LN2_HI), xc)
        r = fma(b, n, c(-_LN2_LO), r)
    p = c(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = fma(b, p, r, c(coef))
    y = b.fadd(fma(b, p, b.fmul(r, r), r), c(1.0))
    ni = b.fptosi(n, ity)
    n1 = b.ashr(ni, ic(1))
    n2 = b.sub(ni, n1)

    def pow2(k):
        return b.bitcast(b.shl(b.add(k, ic(127)), ic(23)), fty)

    res = b.fmul(b.fmul(y, pow2(n1)), pow2(n2))
    isnan = b.fcmp_unordered("uno", x, x)
    return b.select(isnan, b.fptrunc(x, fty) if wide else x, res)


# Chebyshev fit of erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: relative error
# below 1.2e-7 everywhere (Numerical Recipes, erfcc; checked against math.erfc in the tests).
_ERFC_POLY = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
              -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def erfc_pos(b: ir.IRBuilder, z: ir.Value) -> ir.Value:
    """erfc(z) as f32 for an f64 (scalar or vector) z >= 0, inline: the exponent
    -z^2 + P(t) is formed in f64 (erfc's relative error grows like 2 z^2 times that of its
    argument) and exponentiated with `exp`. Relative error ~2e-7; NaN propagates."""
    c = lambda v: const_like(z.type, v)  # noqa: E731
    t = b.fdiv(c(1.0), fma(b, z, c(0.5), c(1.0)))
    p = c(_ERFC_POLY[-1])
    for coef in _ERFC_POLY[-2::-1]:
        p = fma(b, p, t, c(coef))
    e = exp(b, fma(b, b.fneg(z), z, p))
    return b.fmul(b.fptrunc(t, e.type), e)


# tanh(y) = y P(y^2) for |y| < TANH_SMALL: the Maclaurin series' first six terms (1.5 ulp there;
# (1 - t) / (1 + t) would lose bits to the cancellation in 1 - t)
TANH_SMALL = 0.35
TANH_POLY = (1.0, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925)


def tanh(b: ir.IRBuilder, y: ir.Value) -> ir.Value:
    """tanh(y) for f32 y (scalar or vector), inline: y P(y^2) below TANH_SMALL, else
    sign(y) (1 - t) / (1 + t) with t = exp(-2|y|) (no overflow: t <= 1). Within 4 ulp of the
    exact value for every f32 y; tanh(+-inf) = +-1, NaN propagates."""
    c = lambda v: const_like(y.type, v)  # noqa: E731
    a = intrinsic(b, "llvm.fabs", [y])
    t = exp(b, b.fmul(a, c(-2.0)))
    big = b.fdiv(b.fsub(c(1.0), t), b.fadd(c(1.0), t))
    u = b.fmul(y, y)
    p = c(TANH_POLY[-1])
    for coef in TANH_POLY[-2::-1]:
        p = fma(b, p, u, c(coef))
    small = b.fmul(y, p)
    return b.select(b.fcmp_unordered("<", a, c(TANH_SMALL)), small, intrinsic(b, "llvm.copysign", [big, y]))


def softcap(b: ir.IRBuilder, x: ir.Value, cap: float) -> ir.Value:
    """cap * tanh(x / cap) for f32 x (Gemma 2's soft-capping of attention scores and logits),
    x / cap as x * (1 / cap) rounded (llama.cpp's ggml_scale): within ~5 ulp of cap * tanh(x / cap)."""
    return b.fmul(tanh(b, b.fmul(x, const_like(x.type, 1.0 / cap))), const_like(x.type, cap))


def sigmoid_mul(b: ir.IRBuilder, x: ir.Value, z: ir.Value) -> ir.Value:
    """x * sigmoid(z) = x / (1 + exp(-z)) in f32, accurate for any sign and size of z:
    with t = exp(-|z|), it is x / (1 + t) for z >= 0 and x t / (1 + t) for z < 0 (no
    overflow, no cancellation). `z` may be f64 (computed in f64 to keep its precision);
    silu(x) = sigmoid_mul(x, x)."""
    t = exp(b, b.fneg(intrinsic(b, "llvm.fabs", [z])))
    zero = const_like(z.type, 0.0)
    neg = b.fcmp_ordered("<", z, zero)
    xt = b.select(b.fcmp_ordered(">", t, const_like(t.type, 0.0)), b.fmul(x, t),
                  const_like(t.type, 0.0))
    return b.fdiv(b.select(neg, xt, x), b.fadd(const_like(t.type, 1.0), t))


# --- threading (libgomp)

def min_items(work_per_item: int, grain: int = 32768) -> int:
    """Items a thread should get at least so that its work (in rough element-operations)
    pays for a fork/join of a few microseconds."""
    return max(1, math.ceil(grain / max(1, work_per_item)))


def named(fn: ir.Function, vals) -> SimpleNamespace:
    """A parallel_for body's values by the names of fn's arguments (`vals` as the body gets them;
    extra captures after the arguments are left out)."""
    return SimpleNamespace(**{a.name: v for a, v in zip(fn.args, vals)})


def parallel_for(module: ir.Module, b: ir.IRBuilder, n_items: ir.Value,
                 body_fn: Callable[[ir.IRBuilder, ir.Value, list], None],
                 min_items_per_thread=1, captures: Sequence[ir.Value] | None = None,
                 dynamic: int = 0) -> None:
    """Run body_fn(builder, item, values) for item in [0, n_items) across the library's threads.

    The body is outlined into an internal function `<caller>.parN.chunk(ctx, lo, hi)`; `values`
    are `captures` (default: the caller's arguments) reloaded there from a struct on the caller's
    stack. A task for llmir_parallel (targets/cpu/runtime.c) claims runs of items from an atomic
    counter in that struct until none are left, so the region completes whichever threads join
    it: runs of `dynamic` items, or by default about a quarter of a thread's share (contiguous
    runs suit the hardware prefetcher; several per thread balance the load and a thread the OS
    deschedules). The team has min(n_items / min_items_per_thread, llmir_num_threads()) threads
    (min_items_per_thread may be a runtime i64); with fewer than 2 the chunk function runs
    serially on the calling thread.
    """
    caller = b.function
    caps = list(caller.args) if captures is None else list(captures)
    st = ir.LiteralStructType([I64, I64, I64] + [v.type for v in caps])  # n, counter, run, captures
    k = 0
    while f"{caller.name}.par{k}.chunk" in module.globals:
        k += 1
    base = f"{caller.name}.par{k}"

    def field(bb, ptr, i):
        return bb.gep(ptr, [i32(0), i32(i)], inbounds=True, source_etype=st)

    chunk, cb = define(module, base + ".chunk", [("ctx", PTR), ("lo", I64), ("hi", I64)], internal=True)
    ctx, lo, hi = chunk.args
    vals = [cb.load(field(cb, ctx, k + 3), typ=v.type, name=getattr(v, "name", ""))
            for k, v in enumerate(caps)]
    with for_range(cb, lo, hi, 1, "item") as item:
        body_fn(cb, item, vals)
    cb.ret_void()

    task, tb = define(module, base + ".task", [("ctx", PTR)], internal=True)
    (tctx,) = task.args
    n = tb.load(field(tb, tctx, 0), typ=I64)
    run = tb.load(field(tb, tctx, 2), typ=I64)
    claim, work, done = (task.append_basic_block(s) for s in ("claim", "run", "done"))
    tb.branch(claim)
    tb.position_at_end(claim)
    first = tb.atomic_rmw("add", field(tb, tctx, 1), run, "monotonic")
    tb.cbranch(tb.icmp_signed("<", first, n), work, done)
    tb.position_at_end(work)
    tb.call(chunk, [tctx, first, imin(tb, tb.add(first, run), n)])
    tb.branch(claim)
    tb.position_at_end(done)
    tb.ret_void()

    data = var(b, st, name="par.ctx")
    b.store(n_items, field(b, data, 0))
    b.store(i64(0), field(b, data, 1))
    for k, v in enumerate(caps):
        b.store(v, field(b, data, k + 3))
    want = b.sdiv(n_items, i64(min_items_per_thread))
    team = imin(b, want, b.sext(b.call(declare(module, "llmir_num_threads", I32, []), []), I64))
    with b.if_else(b.icmp_signed(">=", team, i64(2))) as (par, ser):
        with par:
            per_run = imax(b, i64(1), b.sdiv(b.add(n_items, b.sub(b.mul(team, i64(4)), i64(1))),
                                             b.mul(team, i64(4))))
            b.store(i64(dynamic) if dynamic else per_run, field(b, data, 2))
            fn = declare(module, "llmir_parallel", VOID, [PTR, PTR, I32])
            b.call(fn, [task, data, b.trunc(team, I32)])
        with ser:
            b.call(chunk, [data, i64(0), n_items])
