"""Kernel signatures, declared once for every target: static parameters and typed, named arguments.

A kernel *kind* (`linear`, `paged_attention`, ...) is specialized by its static parameters
(sizes, eps, flags, storage dtypes), which a backend bakes into the code; its run-time
arguments are named and typed. The plan binds arguments by name (`Plan` checks each pointer's
dtype against the buffer it points into), the CPU backend turns the list into a C function
type, the GPU backends into a Triton signature and launch, and the manifest records calls by
name. A dtype in a signature is a `llmirc.dtypes` name, or `{param}`: the static parameter of
that name (so `linear` with `w_dtype=bfloat16` takes `w` as a `bfloat16*`).

Conventions every backend implements:

* Activations are row-major float32 matrices with a leading dimension `ld_*` in elements, so a
  kernel can read or write a column slice of a bigger buffer: row r of `x` starts at x + r*ld_x.
* Counts are int64 (`T` tokens, `L` logits rows, `B` sequences, `max_blocks`, `num_blocks`);
  indices are int32. Every kernel is a no-op for zero rows and correct for any row count.
* Arithmetic is float32 (f32 accumulation for half-precision storage: loads widen exactly).
  Sums and dot products may be reassociated, so results differ from a sequential f32 loop by
  rounding only. Stores into half-precision storage round to nearest even.
* Unless stated, `out` must not overlap the inputs. Nullable pointers may be null when the flag
  that uses them is off.

Semantics (`p.` = static param):

embedding {dim, dtype, scale}: out[t, 0:dim] = table[ids[t], 0:dim] * p.scale (table [vocab, dim] of
    p.dtype; a scale of 1 copies the row exactly, any other is one f32 multiply per element).
rms_norm {dim, eps, heads}: out[t,i] = (x[t,i] * r_t) * w[i], r_t = 1/sqrt(sum_i x[t,i]^2 / dim + eps)
    (Hugging Face order), for i < dim. heads > 1 (Qwen3's q_norm, k_norm): each row holds heads
    parts of dim, each normalized alike with the same w [dim] (x[t, h*dim + i], r_{t,h}). out may
    equal x.
layer_norm {dim, eps, bias}: mu = mean_i x[t,i]; var = mean_i (x[t,i] - mu)^2 (biased, two-pass);
    out[t,i] = (x[t,i] - mu) / sqrt(var + eps) * w[i] (+ b[i] if p.bias). out may equal x.
linear {n, k, bias, residual, w_dtype}: out[t,j] = sum_i x[t,i] * w[j,i] (+ bias[j]) (+ residual[t,j])
    for t < T, j < n; w is [n, k] row-major of p.w_dtype, contiguous. out may be the same pointer
    as residual (with ld_out == ld_res), never x or w.
qlinear {n, k, bits, group_size, scale_dtype, zero, zero_dtype, act_order, values, super_group, bias,
    residual}: linear with a quantized weight (llmirc/quant.py: `codes` uint8 in the super-block layout
    (code u stands for p.values[u] where p.values, a table of 2^bits ints, is given; absent or None:
    the uniform grid), `scales` [n, k/group_size] of p.scale_dtype, `zeros` [n, k/group_size] of
    p.zero_dtype unless p.zero is none, `perm` int32 [k] if p.act_order; with p.super_group S > 0,
    int8 `scales` and `zeros` are sub-scales and sub-mins, each group's scale
    super_scales[j, g G / S] * scales[j, g] and min super_mins[j, g G / S] * zeros[j, g] (float16
    [n, k / S]; f32 products, exact)) and activations quantized on the fly: with
    xp[t,i] = x[t, perm[i]] (x[t,i] without act_order), each block of 32 (16 when group_size is 16)
    consecutive xp values is d * q, d = max|block| / 127, q = rint(xp / d) in int8 (llama.cpp's Q8
    activations); out[t,j] = sum_i d q[t,i] * W[j,i] (+ bias[j]) (+ residual[t,j]), W the dequantized
    weight, the integer products exact. `xq` is scratch of T * qlinear_scratch_bytes(k, block)
    bytes. out may be residual (with ld_out == ld_res), never x.
    The GPU targets (cuda, hip: targets/triton/quant.py) differ in the activations, deliberately:
    they do not quantize them and do not use `xq`; instead xp is rounded to bfloat16 (x~) and
    out[t,j] = sum_i x~[t,i] * W[j,i] (+ bias[j]) (+ residual[t,j]), sums in f32 in any order (the
    code differences u - c exact in bfloat16, each group's scale and min applied in f32 after its
    products). Why: on a GPU, per-block activation scales mean an f32 multiply-add per output per
    block of 32 inputs beside the tensor cores' products, which would bound prefill, while decode
    is bound by the weight bytes either way; x~ keeps 8 significant bits per value, at least as
    precise as the CPU's int8 blocks. So a bundle's cpu and cuda/hip targets agree to within the
    CPU's activation quantization (half a step d/2 per value), not to f32 rounding.
qembedding {dim, bits, group_size, scale_dtype, zero, zero_dtype, values, super_group, scale}: embedding of
    a quantized table (as qlinear's weight, [vocab, dim]): out[t, :] = the dequantized row ids[t] * p.scale, in f32.
rope {num_heads, head_dim, rotary_dim, style, inv_freq, scaling}: for token t, head h,
    i < rotary_dim/2: a = (float)positions[t] * inv_freq[i] (one f32 multiply);
    c = cos(a) * scaling, s = sin(a) * scaling; neox pairs x[h*hd + i] with x[h*hd + i + rot/2],
    interleaved pairs x[h*hd + 2i] with x[h*hd + 2i + 1]; out(x1) = x1 c - x2 s,
    out(x2) = x2 c + x1 s; elements past rotary_dim are copied. out may equal x.
kv_append {num_layers, num_kv_heads, head_dim, block_size, kv_dtype}: pool is
    [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] of p.kv_dtype; for token t
    with s = slot_mapping[t] >= 0 (s < 0 is skipped), blk = s / block_size, off = s % block_size:
    pool[layer, 0, blk, g, off, :] = k[t, g*head_dim : +head_dim], and V at index 1 likewise.
    An int8 pool (p.kv_dtype int8) is followed by float32 scales [num_layers, 2, num_blocks,
    num_kv_heads]: K/V = scale * code. A call writes a block's slots as one *run* of consecutive
    tokens: its scale becomes new = max(old, max|run| / 127) (old = 0 when the run starts at
    offset 0: the block starts afresh), the codes already in the block become rint(code * (old /
    new)) (unchanged when it did not grow), and the run's rint(x * (1 / new)), clamped to
    [-127, 127]; divisions correctly rounded. A quantized pool asks two things of the caller,
    which the runtime's block allocation gives: no other token of the call writes that block, and
    K/V are finite (a NaN is not kept; an infinity makes its block's scale infinite). An FP8
    pool (float8_e4m3fn, GPU only) is the same with 448 for 127 and the E4M3 conversion's round
    to nearest even for rint.
paged_attention {num_heads, num_kv_heads, head_dim, block_size, scale, sliding_window, softcap, kv_dtype,
        num_layers}:
    for token t of sequence b (query_start_loc[b] <= t < query_start_loc[b+1]), p = positions[t],
    head h, kv head g = h / (num_heads / num_kv_heads): keys j in [lo, hi] with
    lo = max(0, p - sliding_window + 1) if sliding_window > 0 else 0, hi = min(p, seq_lens[b] - 1);
    key j is at block block_tables[b, j / block_size], slot j % block_size of the pool;
    out[t, h*hd : +hd] = sum_j softmax_j(s_j) V_j (zeros without keys), s_j = scale * q[t, h*hd : +hd] . K_j,
    soft-capped to softcap * tanh(s_j / softcap) where softcap > 0 (Gemma 2's attn_logit_softcapping).
    out may equal q. num_layers (the pool's) is needed only for an int8 pool (where its scales are).
act_mul {dim, act}: out[t,i] = act(gate[t,i]) * up[t,i]. act {dim, act}: out[t,i] = act(x[t,i]).
softcap {dim, cap}: out[t,i] = cap * tanh(x[t,i] / cap) (Gemma 2's final_logit_softcapping). out may equal x.
    silu(x) = x / (1 + exp(-x)); gelu(x) = 0.5 x (1 + erf(x / sqrt 2));
    gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); relu(x) = max(x, 0).
    out may equal an input.
gather_rows {dim}: out[l, 0:dim] = x[idx[l], 0:dim].
add {dim}: out[t,i] = a[t,i] + b[t,i]. out may equal a or b.
hadamard {dim, block}: out[t, j:j+block] = (H x[t, j:j+block]) / sqrt(block) for each j a multiple
    of p.block (a power of two dividing dim), H[i, l] = (-1)^popcount(i & l) (Sylvester's
    Walsh-Hadamard matrix; llmirc/quant.py `hadamard`), sums in any order. out may equal x.

Generic kernels of full-sequence models (`g_*`, targets/cpu/generic.py) take a table of
run-time sizes (`meta`, int64), `T`, then one pointer per operand of the dtypes in their
params.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmirc import dtypes

REQUIRED = object()  # a static parameter without a default


@dataclass(frozen=True)
class Param:
    """A run-time argument: `type` is ptr, i64 or f32; a ptr has an element `dtype` (a dtypes name
    or `{static param}`), an access mode, and may be null (`nullable`)."""

    name: str
    type: str
    dtype: str = ""
    access: str = "r"  # r, w or rw
    nullable: bool = False


@dataclass(frozen=True)
class Signature:
    kind: str
    static: dict          # static parameter -> default (REQUIRED when none)
    params: tuple[Param, ...]

    def bind_static(self, given: dict) -> dict:
        """The full static parameters (defaults filled in); ValueError on unknown or missing ones."""
        unknown = set(given) - set(self.static)
        missing = [k for k, d in self.static.items() if d is REQUIRED and k not in given]
        if unknown or missing:
            raise ValueError(f"{self.kind} kernel: unknown static params {sorted(unknown)}, missing {missing}")
        return {k: given.get(k, d) for k, d in self.static.items()}

    def pointee(self, param: Param, static: dict) -> dtypes.DType:
        """The element type of pointer `param` for these static parameters."""
        name = param.dtype
        if name.startswith("{"):
            name = static[name[1:-1]]
        return dtypes.dtype(name)


def _ptr(name, dtype="float32", access="r", nullable=False):
    return Param(name, "ptr", dtype, access, nullable)


def _i64(name):
    return Param(name, "i64")


_OUT = (_ptr("out", access="w"), _i64("ld_out"))


def _mat(name):
    return (_ptr(name), _i64("ld_" + name))


# a quantized weight (llmirc/quant.py's parts but perm)
_QWEIGHT = (_ptr("codes", "uint8"), _ptr("scales", "{scale_dtype}"), _ptr("zeros", "{zero_dtype}", nullable=True),
            _ptr("super_scales", "float16", nullable=True), _ptr("super_mins", "float16", nullable=True))


_SIGNATURES = [
    Signature("embedding", {"dim": REQUIRED, "dtype": "float32", "scale": 1.0},
              (*_OUT, _ptr("table", "{dtype}"), _ptr("ids", "int32"), _i64("T"))),
    Signature("rms_norm", {"dim": REQUIRED, "eps": REQUIRED, "heads": 1},
              (*_OUT, *_mat("x"), _ptr("w"), _i64("T"))),
    Signature("layer_norm", {"dim": REQUIRED, "eps": REQUIRED, "bias": True},
              (*_OUT, *_mat("x"), _ptr("w"), _ptr("b", nullable=True), _i64("T"))),
    Signature("linear", {"n": REQUIRED, "k": REQUIRED, "bias": False, "residual": False, "w_dtype": "float32"},
              (*_OUT, *_mat("x"), _ptr("w", "{w_dtype}"), _ptr("bias", nullable=True),
               _ptr("residual", nullable=True), _i64("ld_res"), _i64("T"))),
    Signature("qlinear", {"n": REQUIRED, "k": REQUIRED, "bits": REQUIRED, "group_size": REQUIRED,
                          "scale_dtype": "float16", "zero": "none", "zero_dtype": "uint8", "act_order": False,
                          "values": None, "super_group": 0, "bias": False, "residual": False},
              (*_OUT, *_mat("x"), *_QWEIGHT, _ptr("perm", "int32", nullable=True),
               _ptr("bias", nullable=True), _ptr("residual", nullable=True), _i64("ld_res"),
               _ptr("xq", "int8", "w"), _i64("T"))),
    Signature("qembedding", {"dim": REQUIRED, "bits": REQUIRED, "group_size": REQUIRED, "scale_dtype": "float16",
                             "zero": "none", "zero_dtype": "uint8", "values": None, "super_group": 0, "scale": 1.0},
              (*_OUT, *_QWEIGHT, _ptr("ids", "int32"), _i64("T"))),
    Signature("rope", {"num_heads": REQUIRED, "head_dim": REQUIRED, "rotary_dim": None, "style": "neox",
                       "inv_freq": REQUIRED, "scaling": 1.0},
              (*_OUT, *_mat("x"), _ptr("positions", "int32"), _i64("T"))),
    Signature("kv_append", {"num_layers": REQUIRED, "num_kv_heads": REQUIRED, "head_dim": REQUIRED,
                            "block_size": REQUIRED, "kv_dtype": "float32"},
              (_ptr("pool", "{kv_dtype}", "rw"), _i64("num_blocks"), _i64("layer"), *_mat("k"), *_mat("v"),
               _ptr("slot_mapping", "int32"), _i64("T"))),
    Signature("rope_kv_append", {"num_heads": REQUIRED, "num_kv_heads": REQUIRED, "head_dim": REQUIRED,
                                 "rotary_dim": None, "style": "neox", "inv_freq": REQUIRED, "scaling": 1.0,
                                 "num_layers": REQUIRED, "block_size": REQUIRED, "kv_dtype": "float32"},
              (*_OUT, *_mat("q"), *_mat("k"), *_mat("v"), _ptr("positions", "int32"),
               _ptr("pool", "{kv_dtype}", "rw"), _i64("num_blocks"), _i64("layer"), _ptr("slot_mapping", "int32"),
               _i64("T"))),
    Signature("paged_attention", {"num_heads": REQUIRED, "num_kv_heads": REQUIRED, "head_dim": REQUIRED,
                                  "block_size": REQUIRED, "scale": REQUIRED, "sliding_window": 0, "softcap": 0.0,
                                  "kv_dtype": "float32", "num_layers": 0},
              (*_OUT, *_mat("q"), _ptr("pool", "{kv_dtype}"), _i64("num_blocks"), _i64("layer"),
               _ptr("block_tables", "int32"), _i64("max_blocks"), _ptr("seq_lens", "int32"),
               _ptr("query_start_loc", "int32"), _i64("B"), _ptr("positions", "int32"), _i64("T"))),
    Signature("act_mul", {"dim": REQUIRED, "act": REQUIRED}, (*_OUT, *_mat("gate"), *_mat("up"), _i64("T"))),
    Signature("act", {"dim": REQUIRED, "act": REQUIRED}, (*_OUT, *_mat("x"), _i64("T"))),
    Signature("softcap", {"dim": REQUIRED, "cap": REQUIRED}, (*_OUT, *_mat("x"), _i64("T"))),
    Signature("gather_rows", {"dim": REQUIRED}, (*_OUT, *_mat("x"), _ptr("idx", "int32"), _i64("L"))),
    Signature("add", {"dim": REQUIRED}, (*_OUT, *_mat("a"), *_mat("b"), _i64("T"))),
    Signature("hadamard", {"dim": REQUIRED, "block": REQUIRED}, (*_OUT, *_mat("x"), _i64("T"))),
]
SIGNATURES: dict[str, Signature] = {s.kind: s for s in _SIGNATURES}


def softcap_param(params: dict, key: str, kind: str) -> float:
    """A kernel's soft-cap parameter (paged_attention's `softcap`, 0 or absent: none; softcap's `cap`,
    required) as a float; ValueError unless finite and > 0 (or 0 where it may be absent)."""
    optional = key == "softcap"
    cap = float(params.get(key) or 0.0) if optional else float(params[key])
    if not (0.0 < cap < float("inf") or (optional and cap == 0.0)):
        raise ValueError(f"{kind}: {key} must be finite and {'>= 0' if optional else '> 0'}, got {cap}")
    return cap


def qlinear_scratch_bytes(k: int, block: int) -> int:
    """Bytes of qlinear's `xq` scratch per row of x: k int8 values and two float32 per block of
    `block` values, rounded up to 64."""
    return -(-(k + 8 * (k // block)) // 64) * 64


def signature(kind: str, static: dict | None = None) -> Signature:
    """The signature of `kind`. Generic kernels (`g_*`) have one per operand count and dtypes,
    so theirs is built from their static params (`dtypes`, or the kind's fixed operand list)."""
    if kind in SIGNATURES:
        return SIGNATURES[kind]
    if kind.startswith("g_"):
        return _generic_signature(kind, static or {})
    raise ValueError(f"unknown kernel kind {kind!r}")


# Generic kernels: operand dtypes per kind (see targets/cpu/generic.py): {param} refers to a static param.
_GENERIC_OPERANDS = {
    "g_reduce": ("{dout}", "{din}"), "g_softmax": ("{dtype}", "{dtype}"), "g_cumsum": ("{dtype}", "{dtype}"),
    "g_matmul": ("{dtype}", "{dtype}", "{dtype}"), "g_range": ("{dtype}",), "g_affine": ("{dtype}",),
}


def _generic_signature(kind: str, static: dict) -> Signature:
    if kind in ("g_map", "g_contract"):
        operands = tuple(static["dtypes"])
    elif kind == "g_gather":
        scatter = static["mode"] != "gather"
        d, i = static["dtype"], static["itype"]
        operands = (d, d, i) if not scatter else (d, i, d)
    elif kind in _GENERIC_OPERANDS:
        operands = tuple(static[o[1:-1]] for o in _GENERIC_OPERANDS[kind])
    else:
        raise ValueError(f"unknown generic kernel kind {kind!r}")
    params = [Param("meta", "ptr", "int64"), _i64("T")]
    params += [Param(f"p{i}", "ptr", dtypes.dtype(d).name, "w" if i == 0 else "r", nullable=True)
               for i, d in enumerate(operands)]
    return Signature(kind, {k: static[k] for k in static}, tuple(params))
