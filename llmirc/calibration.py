"""Calibration: what every linear op's input is on sample text, for GPTQ (Hessians X^T X / N)
and SmoothQuant (each channel's max |x|).

`llmirc compile ... --quant int4 --quant-method gptq --calibration FILE` (or `--quant-smooth
ALPHA`) tokenizes FILE with the checkpoint's tokenizer, cuts the ids into windows of `context`
tokens (at most `max_tokens` in all), and runs the front end's full-sequence forward (llmir
ops before paged-kv: causal attention within each window) once over all windows in float32
NumPy. At each linear op it takes X [N, k], the rows of its input over all windows, and
keeps max_i |X_ij| per channel j (without each window's first row) and, for GPTQ, stores
H = X^T X / N (float32 [k, k]) in a file of a temporary folder, read back memory-mapped when
the bundle writer quantizes that weight (llmirc/quant.py `gptq`). The quantize-weights pass
names each Hessian as a weight (`calibration.hessian.<i>`) and gives it to the
`llmir.quantize` op; the smooth pass derives its scales from the maxima
(`calibration.smooth.<i>`, passes/smooth.py).

`--quant-method autoround` runs the same ops decoder layer by layer instead, through the layers
already quantized, and learns their codes (llmirc/autoround.py; its tensors
`calibration.learned.*` are kept here too).

This is compile-time analysis, not an execution path: the bundle's kernels are what run the
model. The statistics come from the float model in one pass (the GPTQ reference feeds each layer
the outputs of the layers already quantized: on SmolLM2 that did worse, DESIGN.md "GPTQ");
a weight read by several linears (a tied LM head) gets the sum of their Hessians and the
largest of their maxima. Models that keep ONNX ops (full-sequence models) are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from llmirc import dialect as L
from llmirc.errors import LlmircError
from llmirc.passes.func_args import arg_names, forward_func
from llmirc.passes.onnx_fuse_activation import REFERENCE
from llmirc.passes.quantize_weights import source_names
from llmirc.passes.smooth import float_value
from llmirc.quant import Scheme
from llmirc.scratch import scratch_dir

PREFIX = "calibration."
HESSIAN = PREFIX + "hessian."  # + input index: float32 [k, k]
LEARNED = PREFIX + "learned."  # + checkpoint weight name + "." + part: codes learned by autoround


class Calibration:
    """What calibration found about the linears' inputs: per input, its Hessian (GPTQ; in a
    scratch folder in TMPDIR, removed by `close`, or by the next compile on this host when the
    process was killed: llmirc.scratch) and each channel's max |x| (SmoothQuant), and the
    tensors a pass derives from them (`add`: the `smooth` pass's scales). Tensors are named `<PREFIX><kind>.<i>`
    for input i; passes read them through `llmir.weight` ops of those names."""

    def __init__(self, tokens: int, windows: int, hessians: bool = True):
        self.tokens, self.windows, self.hessians = tokens, windows, hessians
        self._dir = scratch_dir("calibration")
        self.by_weight: dict[str, int] = {}   # checkpoint tensor of a linear's weight -> its input's index
        self.maxima: list[np.ndarray] = []    # per input: max |x_j| (f32 [k]), each window's first token left out
        self._tensors: dict[str, np.ndarray] = {}  # added by passes (small)
        self._files: dict[str, Path] = {}  # Hessians and learned codes, in the scratch folder
        self.learned: dict[str, Scheme] = {}  # checkpoint weight -> the scheme of its learned codes (autoround)
        self.origins: dict[str, str] = {}  # checkpoint weight -> where autoround's codes came from (--report)

    def hessian_for(self, weights: list[str]) -> str | None:
        """The name of the Hessian of a weight made of the checkpoint tensors `weights` (stacked
        along the outputs, as fuse-linears does): theirs when they all have the same one, else None."""
        i = self._input_of(weights)
        return f"{HESSIAN}{i}" if i is not None and self.hessians else None

    def maximum_for(self, weights: list[str]) -> tuple[int, np.ndarray] | None:
        """(input index, max |x_j| f32 [k]) of the input of the linears reading `weights`, when
        they all read the same one; else None."""
        i = self._input_of(weights)
        return None if i is None else (i, self.maxima[i])

    def _input_of(self, weights: list[str]) -> int | None:
        found = {self.by_weight.get(n) for n in weights}
        return found.pop() if len(found) == 1 else None

    def add(self, name: str, value: np.ndarray) -> None:
        """Keeps a tensor a pass derived (f32), for `read`."""
        self._tensors[name] = np.asarray(value, np.float32)

    def add_learned(self, weight: str, parts: dict[str, np.ndarray], scheme: Scheme, origin: str) -> None:
        """Keeps the parts (llmirc/quant.py) autoround learned for the checkpoint tensor `weight`
        (the linear's [n, k] weight, in the rotated basis when its input is rotated), read as
        `<LEARNED><weight>.<part>` (frontend/packed.py, format learned); `origin` says for
        --report whether the codes are learned or GPTQ's, and why."""
        for part, value in parts.items():
            self._save(f"{LEARNED}{weight}.{part}", value, "learned codes")
        self.learned[weight] = scheme
        self.origins[weight] = origin

    def has(self, name: str) -> bool:
        """Whether `name` is one of this calibration's tensors (else a checkpoint's)."""
        return name in self._tensors or name in self._files

    def read(self, name: str) -> np.ndarray:
        """Tensor `name`: one `add` kept, or a Hessian (float32 [k, k]) or learned codes,
        memory-mapped."""
        return self._tensors[name] if name in self._tensors else np.load(self._files[name], mmap_mode="r")

    def _save(self, name: str, value: np.ndarray, what: str) -> None:
        """Writes tensor `name` to the scratch folder (files named by number: the name comes from
        the checkpoint). Raises LlmircError when it cannot."""
        path = self._files.get(name) or Path(self._dir.name) / f"{len(self._files)}.npy"
        try:
            np.save(path, value)
        except OSError as e:  # (numpy's short write has no errno: say what it is)
            raise LlmircError(f"--calibration: cannot write {what} ({value.nbytes / 2**20:.0f} MiB) to "
                              f"{path.parent} (TMPDIR): {e.strerror or 'short write: no space left?'}") from None
        self._files[name] = path

    def _add(self, weights: list[str], x: np.ndarray, first: np.ndarray, known: int | None) -> int:
        """Records input rows x [N, k] of the linear reading `weights` (`first`: the rows that
        begin a window) under `known` (the index of the same input, recorded for another linear)
        or a new index. Returns the index."""
        i = next((self.by_weight[n] for n in weights if n in self.by_weight), None)
        if i is not None and i != known:  # one weight read by linears of different inputs: statistics merge
            self.maxima[i] = np.maximum(self.maxima[i], _absmax(x, first))
            h = self.read(f"{HESSIAN}{i}") + _hessian(x) if self.hessians else None
        elif known is not None:
            i, h = known, None
        else:
            i = len(self.maxima)
            self.maxima.append(_absmax(x, first))
            h = _hessian(x) if self.hessians else None
        if not np.isfinite(self.maxima[i]).all() or (h is not None and not np.isfinite(h).all()):
            raise LlmircError(f"--calibration: the inputs of the linear reading {weights[0]} overflow float32")
        if h is not None:
            self._save(f"{HESSIAN}{i}", h, "a Hessian")
        for n in weights:
            self.by_weight[n] = i
        return i

    def close(self) -> None:
        self._dir.cleanup()


def _hessian(x: np.ndarray) -> np.ndarray:
    """X^T X / N (float32 [k, k]) of rows x [N, k], each row first scaled to the rows' median
    norm. A few tokens (the first of each window, as attention sinks) carry activations
    hundreds of times larger than the rest; unscaled, they decide H, and GPTQ then serves them
    at the others' cost: on SmolLM2-135M (int4, groups of 64/128) perplexity 15.37 against the
    scaled rows' 14.01 (round to nearest: 15.28; DESIGN.md, "GPTQ")."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x * np.divide(np.median(norms), norms, out=np.zeros_like(norms), where=norms > 0)
    return (x.T @ x / np.float32(len(x))).astype(np.float32)


def _absmax(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """max |x_j| (float32 [k]) over the rows of x [N, k] but the `first` rows of each window
    (where there are others): the first token of a window, an attention sink, carries
    activations many times larger than the rest in a few channels (Xiao et al. 2023, "Efficient
    Streaming Language Models with Attention Sinks"), which smoothing must not be sized by."""
    keep = np.ones(len(x), bool)
    keep[first] = False
    return np.abs(x[keep] if keep.any() else x).max(0).astype(np.float32)


def read_token_ids(path: Path, encode: Callable[[str], list[int]], max_tokens: int) -> list[int]:
    """The first `max_tokens` token ids of the UTF-8 text file `path` (`encode`: text -> ids),
    tokenizing a prefix of it that ends at a space or newline: 8 characters per token at first,
    twice as many while that gives no more than max_tokens ids, so that a huge file is not read
    whole. Raises OSError and UnicodeDecodeError (for the part read)."""
    with open(path, encoding="utf-8") as f:
        text, size = "", 8 * max_tokens
        while chunk := f.read(size - len(text)):
            text += chunk
            cut = max(text.rfind(" "), text.rfind("\n"))
            ids = encode(text[:cut]) if cut > 0 else []
            if len(ids) > max_tokens:
                return ids[:max_tokens]
            size *= 2
    return encode(text)[:max_tokens]


def windows(ids: list[int], context: int) -> list[np.ndarray]:
    """Consecutive windows of `context` ids; the last may be shorter, and is dropped when under
    16 ids unless it is the only one."""
    out = [np.asarray(ids[i:i + context], np.int32) for i in range(0, len(ids), context)]
    return out if len(out) == 1 or len(out[-1]) >= 16 else out[:-1]


def calibrate(module: ModuleOp, source, token_windows: list[np.ndarray],
              progress: Callable[[str], None] = lambda s: None, hessians: bool = True) -> Calibration:
    """Runs the forward of `module` (full-sequence llmir ops) on the windows and collects, for
    the input of every linear op with a float weight, each channel's max |x| and (`hessians`)
    its Hessian. `source`: the checkpoint the module was
    built from (its `float32(name)` gives a weight as float32, its `read(name)` a packed
    weight's tensors as stored). Raises LlmircError for an op it cannot run (ONNX ops, a paged
    KV cache)."""
    ops, args, starts = forward_inputs(module, token_windows)
    cal = Calibration(int(starts[-1]), len(token_windows), hessians)
    consumed = _consumed(ops)
    last_use = {v: i for i, op in enumerate(ops) for v in op.operands}
    env: dict[SSAValue, np.ndarray] = dict(args)
    linears = sum(isinstance(op, L.LinearOp) for op in ops)
    seen, shown = 0, time.monotonic()
    by_input: dict[SSAValue, int] = {}  # q, k and v (gate and up) share their input's statistics
    try:
        with np.errstate(all="ignore"):  # an overflow shows as a Hessian not finite: one error line
            for i, op in enumerate(ops):
                if op not in consumed or L.is_weight_op(op):
                    continue
                if isinstance(op, L.LinearOp):
                    x = _get(env, op.input, source)
                    if L.is_float(op.weight.type.element_type):
                        by_input[op.input] = cal._add(source_names(op.weight), x, starts[:-1], by_input.get(op.input))
                    seen += 1
                    if time.monotonic() - shown > 5:
                        shown = time.monotonic()
                        progress(f"  calibration: {seen} of {linears} linears")
                    if op.result in consumed:
                        env[op.result] = linear(op, x, _weight(op.weight, source), lambda v: _get(env, v, source))
                else:
                    env.update(zip(op.results, _run(op, env, source, starts)))
                for v in set(op.operands):
                    if last_use.get(v) == i:
                        env.pop(v, None)
    except BaseException:
        cal.close()
        raise
    if hessians:
        size = sum(len(m) ** 2 * 4 for m in cal.maxima)
        progress(f"calibration: {len(cal.maxima)} Hessians ({size / 2**20:.1f} MiB in {cal._dir.name})")
    return cal


def forward_inputs(module: ModuleOp, token_windows: list[np.ndarray]):
    """(ops, args, starts): the forward function's ops, its arguments' values for the windows
    concatenated ({token_ids value: int32 [N], positions value: int32 [N]}) and where each
    window starts (int [windows + 1]). Raises LlmircError for ops left in ONNX form."""
    f = forward_func(module)
    ops = list(f.body.block.ops)
    generic = sorted({op.name for op in ops if op.name.startswith("onnx.")})
    if generic:
        raise LlmircError(f"--calibration: cannot calibrate a full-sequence model (ONNX ops left generic: "
                          f"{', '.join(generic[:4])}{', ...' if len(generic) > 4 else ''}); calibration needs every "
                          "op to have an llmir kernel")
    values = {"token_ids": np.concatenate(token_windows),
              "positions": np.concatenate([np.arange(len(w), dtype=np.int32) for w in token_windows])}
    args = {a: values[n] for a, n in zip(f.args, arg_names(f)) if n in values}
    return ops, args, np.cumsum([0] + [len(w) for w in token_windows])


def _consumed(ops: list[Operation]) -> set:
    """Ops (and values) whose results something other than the return needs, and every linear
    (its input is what calibration is for)."""
    consumed: set = set()
    for op in reversed(ops):
        if isinstance(op, func.ReturnOp):
            continue
        needed = [r for r in op.results if any(u.operation in consumed for u in r.uses)]
        if needed or isinstance(op, L.LinearOp):
            consumed.add(op)
            consumed.update(needed)
    return consumed


def _weight(v: SSAValue, source) -> np.ndarray:
    """A weight value as float32 (computed per use: weights are not kept)."""
    value = float_value(v, source.float32, packed=lambda w: _dequantized(w, source))
    if value is None:
        raise LlmircError(f"--calibration: cannot calibrate through {v.owner.name}")
    return value


def _dequantized(v: SSAValue, source) -> np.ndarray:
    """A checkpoint's quantized weight (llmir.packed_weight) as float32."""
    from llmirc import quant
    from llmirc.frontend.packed import repack
    from llmirc.targets.plan import quant_scheme

    op = v.owner
    scheme, k = quant_scheme(v.type.element_type), L.shape_of(v)[1]
    parts = repack(op.format.data, op.weight.data, scheme, k, source.read)
    return quant.dequantize(parts, scheme, k).astype(np.float32)


def _get(env: dict, v: SSAValue, source) -> np.ndarray:
    if v in env:
        return env[v]
    if isinstance(v.owner, Operation) and L.is_weight_op(v.owner):
        return _weight(v, source)
    raise LlmircError(f"--calibration: cannot calibrate: the forward reads {v.name_hint or 'an argument'} "
                      "(only token_ids and positions are known)")


def linear(op: L.LinearOp, x: np.ndarray, w: np.ndarray, get: Callable[[SSAValue], np.ndarray]) -> np.ndarray:
    """x [N, k] @ w [n, k]^T, plus op's bias and residual (`get`: a value's array)."""
    y = x @ w.T
    if op.bias is not None:
        y += get(op.bias)
    if op.residual is not None:
        y += get(op.residual)
    return y


def _run(op: Operation, env: dict, source, starts: np.ndarray) -> list[np.ndarray]:
    get = lambda v: _get(env, v, source)  # noqa: E731
    if isinstance(op, L.EmbeddingOp):
        return [get(op.table)[get(op.token_ids)] * np.float32(op.factor)]
    if isinstance(op, L.RMSNormOp):
        x = get(op.input)
        x = x.reshape(len(x), op.heads, -1)  # (each head on its own: Qwen3's q_norm and k_norm)
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + np.float32(op.eps.value.data)) * get(op.weight)
        return [y.reshape(len(y), -1)]
    if isinstance(op, L.LayerNormOp):
        x = get(op.input)
        x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + np.float32(op.eps.value.data)) * get(op.weight)
        return [y + get(op.bias) if op.bias is not None else y]
    if isinstance(op, L.RopeOp):
        return [_rope(op, get(op.input), get(op.positions))]
    if isinstance(op, L.AttentionOp):
        return [_attention(op, get(op.q), get(op.k), get(op.v), starts)]
    if isinstance(op, L.ActMulOp):
        return [REFERENCE[op.act.data](get(op.gate)) * get(op.up)]
    if isinstance(op, L.ActOp):
        return [REFERENCE[op.act.data](get(op.input))]
    if isinstance(op, L.SoftcapOp):
        cap = np.float32(op.cap.value.data)
        return [cap * np.tanh(get(op.input) / cap)]
    if isinstance(op, L.AddOp):
        return [get(op.lhs) + get(op.rhs)]
    if isinstance(op, L.SplitOp):
        x = get(op.input)
        edges = np.cumsum(op.sizes.get_values())[:-1]
        return np.split(x, edges, axis=1)
    raise LlmircError(f"--calibration: cannot calibrate a forward holding {op.name} "
                      "(calibration needs a model whose ops all have llmir kernels)")


def _rope(op: L.RopeOp, x: np.ndarray, pos: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """Rotary embedding of x [N, heads*head_dim] at positions pos [N]; sign -1 rotates back
    (the transpose: rope's vector-Jacobian product, llmirc/autoround.py)."""
    h, d = op.num_heads.value.data, op.head_dim.value.data
    inv = np.asarray(op.inv_freq.get_values(), np.float32)
    half = len(inv)
    ang = pos.astype(np.float32)[:, None] * inv[None, :]
    c = (np.cos(ang) * op.scaling.value.data)[:, None, :].astype(x.dtype)
    s = (sign * np.sin(ang) * op.scaling.value.data)[:, None, :].astype(x.dtype)
    x = x.reshape(len(x), h, d)
    out = x.copy()
    # the rotated pairs: halves (neox) or neighbours (gpt-j), as views (fancy indexing copies)
    i1, i2 = (slice(0, half), slice(half, 2 * half)) if op.style.data == "neox" else \
        (slice(0, 2 * half, 2), slice(1, 2 * half, 2))
    x1, x2 = x[:, :, i1], x[:, :, i2]
    out[:, :, i1], out[:, :, i2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out.reshape(len(x), h * d)


def _attention(op: L.AttentionOp, q: np.ndarray, k: np.ndarray, v: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Causal attention within each window (grouped-query; a sliding window when set)."""
    h, g, d = (a.value.data for a in (op.num_heads, op.num_kv_heads, op.head_dim))
    win, scale, cap = op.sliding_window.value.data, op.scale.value.data, op.softcap_value()
    out = np.empty_like(q)
    for a, b in zip(starts[:-1], starts[1:]):
        n = b - a
        qs = q[a:b].reshape(n, g, h // g, d).transpose(1, 2, 0, 3)   # [g, r, n, d]
        ks = k[a:b].reshape(n, g, d).transpose(1, 0, 2)[:, None]       # [g, 1, n, d]
        vs = v[a:b].reshape(n, g, d).transpose(1, 0, 2)[:, None]
        s = (qs @ ks.transpose(0, 1, 3, 2)) * np.float32(scale)        # [g, r, n, n]
        if cap:  # (Gemma 2)
            s = np.float32(cap) * np.tanh(s / np.float32(cap))
        o = causal_softmax(s, win) @ vs                                 # [g, r, n, d]
        out[a:b] = o.transpose(2, 0, 1, 3).reshape(n, h * d)
    return out


def causal_softmax(s: np.ndarray, window: int) -> np.ndarray:
    """softmax over the last axis of scores s [..., n, n] (query i, key j), keys j > i and, with a
    sliding `window`, i - j >= window masked out; in place (s is returned, overwritten)."""
    n = s.shape[-1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    s += np.where((j <= i) & ((i - j < window) if window else True), np.float32(0), -np.inf).astype(s.dtype)
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s
