"""onnx-fuse-attention: a decomposed attention block (RoPE, causal mask, grouped-query repeat of
K/V, softmax(QK^T * scale) V, head reshapes) becomes llmir.rope + llmir.attention.

Before (schematically; exporters spell every step differently):
    q, k, v: [1, S, N] projections -> Reshape/Transpose to [1, heads, S, D]
    -> q*cos + rotate_half(q)*sin (and k)  -> Unsqueeze/Expand/Reshape (repeat K/V heads)
    -> MatMul(q, k^T) * scale (-> tanh(s / cap) * cap) + mask -> Softmax -> MatMul(., v)
    -> Transpose/Reshape to [1, S, H*D]
After:
    %a = "llmir.attention"("llmir.rope"(%q, %positions), "llmir.rope"(%k, %positions), %v)
         {num_heads, num_kv_heads, head_dim, scale, sliding_window, softcap}

Structure finds the candidate: an activation Softmax over the last axis, the MatMul feeding it
(QK^T) and the one it feeds (PV), the block's output below through layout ops, and the q/k/v
sources above. Shapes give heads and head dim. The rotary inverse frequencies are a float
constant in the ancestry of the cos/sin tables (checked against the tables at a long length),
the scale a product of the region's scalar constants, Gemma 2's soft-cap one of them (or its
inverse) where the region has a Tanh, the sliding window the causal mask evaluated at a long
length. The region must then compute exactly that on random q/k/v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc.frontend.onnx_analysis import DATA
from llmirc.frontend.onnx_dialect import OnnxOp

from .func_args import forward_func
from .onnx_fuse_embedding import index_arg
from .onnx_match import (ELEMENTWISE, LAYOUT, Oracle, Region, close, erase_dead, evaluate, region_up, shape_only,
                         softcap_candidates)
from .report import note

LONG = 512  # length at which masks and rotary tables are checked (or the position tables' rows, when fewer)


@dataclass
class Rope:
    inv_freq: np.ndarray  # float32 [rotary_dim / 2]
    scaling: float
    style: str
    tol: float = 1e-5  # how closely the model's tables hold cos and sin: their rounding (half tables)


def rope_ref(x: np.ndarray, heads: int, d: int, rope: Rope | None) -> np.ndarray:
    """x [S, heads*d] float64, rotated at positions 0..S-1 (as the llmir.rope kernel does)."""
    if rope is None:
        return x
    S, half = x.shape[0], len(rope.inv_freq)
    ang = (np.arange(S, dtype=np.float32)[:, None] * rope.inv_freq[None, :]).astype(np.float32).astype(np.float64)
    c, s = np.cos(ang) * rope.scaling, np.sin(ang) * rope.scaling
    x = x.reshape(S, heads, d).copy()
    if rope.style == "neox":
        i1, i2 = np.arange(half), np.arange(half) + half
    else:
        i1, i2 = np.arange(half) * 2, np.arange(half) * 2 + 1
    x1, x2 = x[:, :, i1].copy(), x[:, :, i2].copy()
    x[:, :, i1] = x1 * c[:, None] - x2 * s[:, None]
    x[:, :, i2] = x2 * c[:, None] + x1 * s[:, None]
    return x.reshape(S, heads * d)


def attention_ref(q, k, v, heads, kv_heads, d, scale, window, rope, softcap=0.0):
    S = q.shape[0]
    q, k = rope_ref(q, heads, d, rope), rope_ref(k, kv_heads, d, rope)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    out = np.zeros((S, heads * d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q[:, h * d:(h + 1) * d] @ k[:, g * d:(g + 1) * d].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h * d:(h + 1) * d] = (p / p.sum(-1, keepdims=True)) @ v[:, g * d:(g + 1) * d]
    return out


def _chain_up(v: SSAValue, oracle: Oracle, kinds) -> Operation | None:
    """Follows the single data operand up through `kinds` ops; returns the first other op."""
    while isinstance(v.owner, OnnxOp) and v.owner.op_type in kinds:
        data = [o for o in v.owner.operands if oracle.is_data(o)]
        if len(data) != 1:
            return None
        v = data[0]
    return v.owner if isinstance(v.owner, OnnxOp) else None


def _matmul_below(v: SSAValue) -> OnnxOp | None:
    """The one MatMul whose left operand is computed from `v` through elementwise ops (P @ V)."""
    seen, stack, found = {v}, [v], set()
    while stack:
        for use in stack.pop().uses:
            op = use.operation
            if isinstance(op, OnnxOp) and op.op_type == "MatMul" and use.index == 0:
                found.add(op)
            elif isinstance(op, OnnxOp) and op.op_type in ELEMENTWISE and op.results[0] not in seen:
                seen.add(op.results[0])
                stack.append(op.results[0])
    return found.pop() if len(found) == 1 else None


def _split_shared(op: OnnxOp) -> bool:
    """A Split of the columns some of whose parts llmir ops read already (onnxruntime-genai's builder
    splits its packed q/k/v projection, then normalizes q and k per head, Qwen3's q_norm and k_norm):
    its parts are the attention's sources, not its region (onnx-glue makes the Split an llmir.split)."""
    return op.op_type == "Split" and len(L.shape_of(op.operands[0])) == 3 and \
        op.py_attrs().get("axis", 0) in (-1, 2) and \
        any(not isinstance(u.operation, OnnxOp) for r in op.results for u in r.uses)


def _only_use(v: SSAValue) -> Operation | None:
    """The one op reading v, not counting Shape/Size (they read the shape only)."""
    uses = [u.operation for u in v.uses if not shape_only(u.operation)]
    return uses[0] if len(uses) == 1 else None


def _rounding(table: np.ndarray) -> float:
    """The absolute error of a table of values up to 1 as stored: float16's or bfloat16's half unit
    in the last place where every value is one of theirs (the importer reads half tables as float32),
    else 1e-5."""
    t = np.asarray(table, np.float32)
    if not np.any(t.view(np.uint32) & 0xFFFF):  # (first: bfloat16's values up to 1 are mostly float16's too)
        return 2 ** -8
    if np.array_equal(t.astype(np.float16).astype(np.float32), t):
        return 2 ** -11
    return 1e-5


def _inv_freq_from_tables(cos: np.ndarray, sin: np.ndarray) -> list[np.ndarray]:
    """Inverse-frequency candidates behind cos/sin tables [n, w] read at positions 0..n-1 (a
    rotary cache stored as a weight, as onnxruntime-genai's builder stores it): each column's angle
    grows by inv per position, so the unwrapped atan2 over the positions gives inv, which is then
    snapped to the float32 value (of the few nearest) whose float32 angles p * inv best give the
    tables. Widths w = D/2 (halves or even/odd) or D (the angles twice: [a, a] or each repeated)."""
    ang = np.unwrap(np.arctan2(sin, cos), axis=0)
    n = cos.shape[0]
    p = np.arange(n, dtype=np.float64)[:, None]
    est = (p * ang).sum(0) / (p * p).sum()  # least squares through the origin
    if not np.all(np.isfinite(est)) or np.any(np.abs(est) > np.pi):
        return []
    near = est.astype(np.float32)[None, :] + np.arange(-3, 4, dtype=np.float32)[:, None] * np.spacing(
        est.astype(np.float32))[None, :]
    pf = np.arange(n, dtype=np.float32)[:, None, None]
    angles = (pf * near[None]).astype(np.float64)  # [n, 7, w]
    err = np.abs(np.cos(angles) - cos[:, None, :] / max(abs(float(cos[0, 0])), 1e-30)).max(0)
    inv = near[err.argmin(0), np.arange(near.shape[1])].astype(np.float32)
    w = len(inv)
    return [inv] if w % 2 else [inv, inv[: w // 2].copy(), inv[::2].copy()]


@dataclass(frozen=True)
class FuseAttention(ModulePass):
    name = "onnx-fuse-attention"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        f = forward_func(op)
        oracle = Oracle(op, ctx.read_weight)
        long = min(LONG, oracle.table_rows() or LONG)  # (a builder's rotary cache of 256 rows: 512 is past it)
        for softmax in [o for o in f.body.block.ops if isinstance(o, OnnxOp) and o.op_type == "Softmax"]:
            if softmax.parent is not None and oracle.is_data(softmax.operands[0]):
                if what := self._try(softmax, oracle, f, long):
                    note(ctx, f"{self.name}: {what}")

    def _try(self, softmax: OnnxOp, oracle: Oracle, f, long: int) -> str | None:
        """A description of the fused block, or None."""
        rank = len(oracle.shape(softmax.operands[0]))
        if softmax.py_attrs().get("axis", -1) not in (-1, rank - 1):
            return None
        qk = _chain_up(softmax.operands[0], oracle, ELEMENTWISE)
        if qk is None or qk.op_type != "MatMul" or not all(oracle.is_data(o) for o in qk.operands):
            return None
        user = _matmul_below(softmax.results[0])
        if user is None:
            return None
        out = user.results[0]
        while (nxt := _only_use(out)) is not None and isinstance(nxt, OnnxOp) and nxt.op_type in LAYOUT:
            out = nxt.results[0]
        inner = {qk, user}

        def is_source(x: SSAValue) -> bool:
            o = x.owner
            return not isinstance(o, OnnxOp) or (o.op_type not in ELEMENTWISE | LAYOUT | {"MatMul", "Softmax"}) \
                or (o.op_type == "MatMul" and o not in inner) or _split_shared(o)

        region = region_up(out, oracle, is_source)
        if region is None or len(region.sources) not in (1, 3):
            return None
        q_shape, out_shape = oracle.shape(qk.operands[0]), oracle.shape(out)
        if len(q_shape) < 3 or not (len(out_shape) == 2 or (len(out_shape) == 3 and out_shape[0] == 1)):
            return None  # the block's output: [1, S, H*D], or rows [S, H*D] (Gemm-based exports)
        heads, d = q_shape[-3], q_shape[-1]
        srcs = self._roles(region, qk, user, oracle)
        if srcs is None:
            return None
        widths = [oracle.shape(s)[-1] for s in region.sources]
        if len(region.sources) == 3:
            kv_heads = widths[region.sources.index(srcs[1])] // d
        else:
            kv_heads = (widths[0] // d - heads) // 2
        if kv_heads < 1 or heads % kv_heads or out_shape[-1] != heads * d:
            return None
        # The first candidate that computes the region, or with a soft-cap the closest one: random scores far
        # below the caps hardly bend, so 16 tanh(s / 16) passes for 50 tanh(s / 50) too, only less closely.
        capped = any(o.op_type == "Tanh" for o in region.ops)
        found = None
        for params in self._candidates(region, oracle, d, capped, long):
            error = self._error(region, srcs, oracle, heads, kv_heads, d, *params)
            if error <= 1 and (found is None or error < found[0]):
                found = (error, params)
                if not capped:
                    break
        if found is None:
            return None
        self._rewrite(region, srcs, f, heads, kv_heads, d, *found[1])
        scale, window, rope, softcap = found[1]
        return (f"attention ({'rope ' + rope.style if rope else 'no rope'}, {heads}/{kv_heads} heads"
                f"{', window %d' % window if window else ''}{', softcap %g' % softcap if softcap else ''})")

    @staticmethod
    def _roles(region: Region, qk: OnnxOp, pv: OnnxOp, oracle: Oracle):
        """(q, k, v) sources; for one fused source, that source three times."""
        if len(region.sources) == 1:
            return (region.sources[0],) * 3

        def ancestors(v: SSAValue) -> set:
            seen, stack = set(), [v]
            while stack:
                x = stack.pop()
                if x in region.sources:
                    seen.add(x)
                elif isinstance(x.owner, OnnxOp) and x.owner in region.ops:
                    stack.extend(o for o in x.owner.operands if oracle.kind(o) == DATA)
            return seen

        q, k, v = ancestors(qk.operands[0]), ancestors(qk.operands[1]), ancestors(pv.operands[1])
        if not (len(q) == len(k) == len(v) == 1) or len(q | k | v) != 3:
            return None
        return q.pop(), k.pop(), v.pop()

    def _candidates(self, region: Region, oracle: Oracle, d: int, capped: bool, long: int):
        params = region.params(oracle)
        scalars = [float(np.asarray(oracle.value(p)).reshape(-1)[0]) for p in params
                   if int(np.prod(oracle.shape(p))) == 1 and np.asarray(oracle.value(p)).dtype.kind == "f"]
        scales = [d ** -0.5, 1.0]
        prod_all = float(np.prod([s for s in scalars if s not in (0.0, 1.0) and abs(s) < 1e3] or [1.0]))
        scales += [prod_all, prod_all ** 2] + [s for s in scalars if 0 < s < 1] + [1 / s for s in scalars if s > 1]
        ropes = [None] + self._ropes(params, oracle, d, long)
        windows = sorted({self._window(params, oracle, long)})
        softcaps = softcap_candidates(scalars) if capped else [0.0]
        seen = set()
        for rope, scale, window, softcap in product(ropes, scales, windows, softcaps):
            key = (id(rope), round(scale, 9), window, softcap)
            if key not in seen:
                seen.add(key)
                yield scale, window, rope, softcap

    @staticmethod
    def _window(params, oracle: Oracle, long: int) -> int:
        """The sliding window of the causal mask (0: none), read from the mask at a long length."""
        for p in params:
            shape = oracle.shape(p, long)
            if len(shape) >= 2 and shape[-1] == shape[-2] == long:
                m = np.asarray(oracle.value(p, long)).reshape(-1, long, long)[0]
                allowed = m if m.dtype == np.bool_ else (m == 0)
                if not allowed[0, 0]:  # a boolean "masked" mask (Where(masked, -inf, scores))
                    allowed = ~allowed
                counts = allowed.sum(-1)
                if allowed[0, 0] and counts.max() < long:
                    return int(counts.max())
        return 0

    @staticmethod
    def _ropes(params, oracle: Oracle, d: int, long: int) -> list[Rope]:
        """Rotary candidates: float constants of length rotary_dim/2 in the ancestry of the region's
        s-only inputs, checked against those inputs' cos/sin tables at a long length."""
        consts, tables = [], []
        for p in params:
            if oracle.kind(p) != "s-only":
                continue
            value = np.asarray(oracle.value(p, long), np.float64)
            if value.dtype.kind == "f" and long in value.shape and value.shape[-1] <= d:
                tables.append(value.reshape(long, -1))
            stack, seen = [p], set()
            while stack:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                o = x.owner
                if isinstance(o, OnnxOp):
                    stack.extend(o.operands)
                elif isinstance(o, (L.WeightOp, L.ConstantOp)) and \
                        sum(n > 1 for n in L.shape_of(x)) == 1 and 1 < max(L.shape_of(x)) <= d // 2:
                    consts.append(np.asarray(oracle.value(x), np.float32).reshape(-1))  # e.g. [1, D/2, 1]
        for c, s in product(tables, tables):  # stored tables (no inverse frequencies to find above them)
            if c is not s and c.shape == s.shape:
                consts += [inv for inv in _inv_freq_from_tables(c, s) if 1 < len(inv) <= d // 2]
        found = []
        for inv in consts:
            if inv.dtype.kind != "f" or len(inv) < 1:
                continue
            ang = (np.arange(long, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float32).astype(np.float64)
            for table in tables:
                width = table.shape[1]
                # Tables of width rotary_dim (cat or repeat_interleave of the angles), or of width
                # rotary_dim/2 multiplying x[..., ::2] / x[..., 1::2] or two halves: verification picks.
                for style, expand in (("neox", lambda a: np.concatenate([a, a], 1)),
                                      ("interleaved", lambda a: np.repeat(a, 2, 1)),
                                      ("neox", lambda a: a), ("interleaved", lambda a: a)):
                    for fn in (np.cos, np.sin):
                        ref = expand(fn(ang))
                        if ref.shape[1] != width:
                            continue
                        scaling = float(table[0, 0]) if fn is np.cos else 1.0
                        if fn is np.sin:
                            nz = np.abs(ref) > 0.1
                            scaling = float(np.median(table[nz] / ref[nz])) if nz.any() else 1.0
                        tol = _rounding(table)
                        if scaling and close(table, ref * scaling, tol):
                            rope = Rope(inv, scaling, style, tol)
                            if not any(np.array_equal(r.inv_freq, inv) and r.style == style for r in found):
                                found.append(rope)
        return found

    @staticmethod
    def _error(region: Region, srcs, oracle: Oracle, heads, kv_heads, d, scale, window, rope, softcap) -> float:
        """How far the region is from attention with these parameters on random q, k and v, in units of the
        tolerance (at most 1: it computes that attention; inf: not of these shapes)."""
        rng = np.random.default_rng(2)
        worst = 0.0
        for S in (7, 12):
            feeds = {s: rng.standard_normal(oracle.shape(s, S)).astype(np.float32) for s in region.sources}
            got = evaluate(region.ops, feeds, oracle, S)[region.output]
            if got.size != S * heads * d:
                return math.inf
            got = got.reshape(S, heads * d)
            parts = [feeds[s].reshape(S, -1).astype(np.float64) for s in srcs]
            if len(region.sources) == 1:
                qkv = parts[0]
                parts = [qkv[:, :heads * d], qkv[:, heads * d:(heads + kv_heads) * d], qkv[:, (heads + kv_heads) * d:]]
            if [p.shape[1] for p in parts] != [heads * d, kv_heads * d, kv_heads * d]:
                return math.inf  # the sources are not q, k and v of these heads
            want = attention_ref(*parts, heads, kv_heads, d, scale, window, rope, softcap)
            # half tables move q and k by their rounding; the scores (|q||k| scale ~ d scale) move by as much. (The
            # scale is taken at most 1, as every model's is: a product of a soft-capped region's constants, 50 * 50 /
            # 16, made a tolerance that let tanh(156 s) pass for 50 tanh(s / 800).)
            tol = 1e-4 + (0 if rope is None else 4 * rope.tol * d * min(scale, 1.0))
            if not np.array_equal(np.isfinite(got), np.isfinite(want)):
                return math.inf
            fin = np.isfinite(want)
            size = max(1.0, float(np.abs(want[fin]).max())) if fin.any() else 1.0
            worst = max(worst, float(np.abs(got[fin] - want[fin]).max(initial=0.0)) / (tol * size))
        return worst

    @staticmethod
    def _rewrite(region: Region, srcs, f, heads, kv_heads, d, scale, window, rope, softcap) -> None:
        at = region.output.owner
        block = at.parent_block()
        new: list[Operation] = []

        def rows(v):
            op = L.SqueezeBatchOp(v)
            new.append(op)
            return op.result

        if len(region.sources) == 1:
            split = L.SplitOp(rows(srcs[0]), [heads * d, kv_heads * d, kv_heads * d])
            new.append(split)
            q, k, v = split.outputs
        else:
            q, k, v = (rows(s) for s in srcs)
        if rope is not None:
            positions = index_arg(f, "positions")
            args = dict(head_dim=d, inv_freq=[float(x) for x in rope.inv_freq], scaling=rope.scaling, style=rope.style)
            q_op, k_op = L.RopeOp(q, positions, heads, **args), L.RopeOp(k, positions, kv_heads, **args)
            new += [q_op, k_op]
            q, k = q_op.result, k_op.result
        att = L.AttentionOp(q, k, v, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=scale,
                            sliding_window=window, softcap=softcap)
        new.append(att)
        if len(L.shape_of(region.output)) == 3:
            new.append(L.UnsqueezeBatchOp(att.result))
        block.insert_ops_before(new, at)
        region.output.replace_all_uses_with(new[-1].results[0])
        erase_dead(region.ops)
