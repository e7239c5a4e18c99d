"""Learned rounding (`--quant-method autoround`, llmirc/autoround.py).

* Each vector-Jacobian product against central finite differences in float64 on fresh random
  data: RMSNorm, LayerNorm, causal grouped-query attention (with and without a sliding window,
  two sequences), every activation's derivative.
* A whole decoder layer's dL/dW for each linear weight (llama: rope, attention, act_mul, the
  residual adds; gpt2: layer_norm, split, GELU, biases, Conv1D's transposed weights) against
  finite differences of the loss.
* The learnable rounding starts at GPTQ's codes: with v = 0 its parts are GPTQ's and its
  weight is their dequantized value, rotated back.
* A bundle: each decoder linear reads its learned codes (llmir.packed_weight, format learned),
  its logits are closer to the float model's than round to nearest's, and the compile reports
  each layer's output error.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import export_onnx, hf_logits, make_checkpoint
from llmirc import dtypes, quant
from llmirc.autoround import (DERIVATIVE, Layer, Rounding, attention_vjp, layer_norm_vjp, normalized_error,
                              rms_norm_vjp, split_layers)
from llmirc.calibration import _attention, _weight, forward_inputs
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.frontend import open_source
from llmirc.passes.onnx_fuse_activation import REFERENCE
from llmirc.passes.pipeline import make_context, run_passes
from llmirc.passes.quantize_weights import source_names
from llmirc.runtime import load
from llmirc.runtime.tokenizer import Tokenizer

CALIBRATION = Path(__file__).resolve().parents[1] / "DESIGN.md"
HELD_OUT = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def rng():
    seed = int(os.environ.get("LLMIRC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"LLMIRC_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d x (f: array -> float) by central differences, entry by entry (rounding error about
    1e-16 |f| / h: 1e-8 for |f| ~ 100, hence the tests' atol of 1e-7)."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f(x)
        x[i] = old - h
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def test_norm_vjps(rng):
    x, g, dy = rng.normal(size=(5, 12)), rng.normal(size=12), rng.normal(size=(5, 12))

    def rms(a):
        return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-5) * g

    def ln(a):
        c = a - a.mean(-1, keepdims=True)
        return c / np.sqrt(np.mean(c * c, -1, keepdims=True) + 1e-5) * g

    for forward, vjp in ((rms, rms_norm_vjp), (ln, layer_norm_vjp)):
        want = numeric_grad(lambda a: float(np.sum(forward(a) * dy)), x.copy())
        np.testing.assert_allclose(vjp(x, g, 1e-5, dy), want, rtol=1e-6, atol=1e-7)


class _Attention:  # the attributes calibration's _attention reads
    def __init__(self, h, g, d, win, scale, softcap):
        box = lambda v: type("A", (), {"value": type("V", (), {"data": v})()})()  # noqa: E731
        self.num_heads, self.num_kv_heads, self.head_dim = box(h), box(g), box(d)
        self.sliding_window, self.scale = box(win), box(scale)
        self.softcap_value = lambda: softcap


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (4, 0.0), (4, 1.5)])
def test_attention_vjp(rng, window, softcap):
    h, g, d, starts = 4, 2, 3, np.array([0, 7, 12])
    q, k, v = rng.normal(size=(12, h * d)), rng.normal(size=(12, g * d)), rng.normal(size=(12, g * d))
    dout, op = rng.normal(size=(12, h * d)), _Attention(h, g, d, window, 0.6, softcap)

    def loss(q, k, v):
        return float(np.sum(_attention(op, q, k, v, starts) * dout))

    got = attention_vjp(q, k, v, dout, h, g, d, window, 0.6, starts, softcap)
    wants = (numeric_grad(lambda a: loss(a, k, v), q.copy()), numeric_grad(lambda a: loss(q, a, v), k.copy()),
             numeric_grad(lambda a: loss(q, k, a), v.copy()))
    for a, want in zip(got, wants):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-7)


def test_activation_derivatives(rng):
    assert set(DERIVATIVE) == set(REFERENCE)
    x = rng.normal(size=50) * 3
    x = x[np.abs(x) > 1e-3]  # (relu's kink)
    for act, f in REFERENCE.items():
        want = (f(x + 1e-6) - f(x - 1e-6)) / 2e-6
        np.testing.assert_allclose(DERIVATIVE[act](x), want, rtol=1e-5, atol=1e-7, err_msg=act)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_layer_weight_gradients(tmp_path, rng, arch):
    make_checkpoint(tmp_path, arch)
    source = open_source(tmp_path)
    module = source.module()
    run_passes(module, "canonicalize,cse", prefix=source.lowering, tail="dce",
               ctx=make_context(read_weight=source.float32))
    windows = [rng.integers(0, 256, n).astype(np.int32) for n in (9, 6)]
    ops, args, starts = forward_inputs(module, windows)
    groups = split_layers(ops, source_names)
    assert len(groups) == 4 and all(groups)  # embedding, 2 decoder layers, the final norm and LM head
    f64 = lambda v: _weight(v, source).astype(np.float64)  # noqa: E731
    env = dict(args)
    for group in groups[:2]:  # the embedding, then layer 0
        env.update(Layer(group, f64).forward(env, {}, starts))
    layer = Layer(groups[2], f64)
    assert {n.split(".")[2] for op in layer.linears for n in source_names(op.weight)} == {"1"}  # model.layers.1.
    inputs = {v: env[v].astype(np.float64) if env[v].dtype.kind == "f" else env[v] for v in layer.inputs}
    out = layer.forward(inputs, {}, starts)
    target = [out[o] + rng.normal(size=out[o].shape) * 0.1 for o in layer.outputs]
    weights = {op: layer.weights[op.weight].copy() for op in layer.linears}

    def loss(_=None):
        e = layer.forward(inputs, weights, starts)
        return normalized_error([e[o] for o in layer.outputs], target)[0]

    e = layer.forward(inputs, weights, starts, keep=True)
    _, grads = normalized_error([e[o] for o in layer.outputs], target)
    dws = layer.backward(e, dict(zip(layer.outputs, grads)), weights, starts, weights)
    assert len(dws) == len(layer.linears) >= 4
    for op, w in weights.items():
        for _ in range(3):
            i, j = rng.integers(w.shape[0]), rng.integers(w.shape[1])
            old = w[i, j]
            w[i, j] = old + 1e-6
            up = loss()
            w[i, j] = old - 1e-6
            down = loss()
            w[i, j] = old
            want = (up - down) / 2e-6
            assert abs(dws[op][i, j] - want) <= 1e-5 * abs(want) + 1e-10, (source_names(op.weight), want)


@pytest.mark.parametrize("scheme,block", [(quant.Scheme(4, 32, "float16", "int"), 0),
                                          (quant.Scheme(4, 64), 64), (quant.Scheme(8, 128, "float32"), 0)], ids=str)
def test_rounding_starts_at_gptq(rng, scheme, block):
    x = rng.normal(size=(256, 128)) * np.linspace(0.1, 3, 128)
    w = rng.normal(size=(24, 128)).astype(np.float32)
    h = (x.T @ x / len(x)).astype(np.float32)
    plain = quant.gptq(w, h, scheme)
    u = quant.unpack(plain["codes"], scheme.bits, scheme.sub_group, 128)
    r = Rounding(scheme, dict(plain), block, quant.hadamard(w, block) if block else w)
    assert all(np.array_equal(r.learned_parts()[p], plain[p]) for p in plain)
    want = quant.dequantize(plain, scheme, 128)
    assert r.weight().dtype == np.float32  # a float64 weight would turn the layer's whole backward float64
    np.testing.assert_allclose(r.weight(), quant.hadamard(want, block) if block else want, rtol=1e-5, atol=1e-6)
    r.step(rng.normal(size=w.shape).astype(np.float32), 0.6)  # every code free to move by one
    moved = quant.unpack(r.learned_parts()["codes"], scheme.bits, scheme.sub_group, 128).astype(int) - u
    assert np.abs(moved).max() == 1 and (moved != 0).mean() > 0.3


@pytest.mark.parametrize("scheme,block", [(quant.Scheme(4, 32, "float16", "int"), 0),
                                          (quant.Scheme(4, 64), 64), (quant.Scheme(8, 128, "float32"), 0)], ids=str)
def test_rounding_step_descends(rng, scheme, block):
    """Codes one off round to nearest, loss |W - w|^2: one small step brings them back (through
    symmetric schemes' negative scales too) and leaves the others."""
    w = rng.normal(size=(24, 128)).astype(np.float32)
    basis = quant.hadamard(w, block) if block else w
    parts = quant.quantize(basis, scheme)
    nearest = quant.unpack(parts["codes"], scheme.bits, scheme.sub_group, 128).astype(int)
    off = rng.choice([-1, 1], size=nearest.shape) * (rng.random(nearest.shape) < 0.2)
    off[(nearest + off < 0) | (nearest + off > (1 << scheme.bits) - 1)] = 0
    parts["codes"] = quant.pack((nearest + off).astype(np.uint8), scheme.bits, scheme.sub_group)
    if scheme.zero == "none":
        assert (dtypes.to_float32(parts["scales"], scheme.scale_dtype) < 0).any()
    r = Rounding(scheme, parts, block, basis)
    r.step(2 * (r.weight() - w), 0.01)
    codes = quant.unpack(r.learned_parts()["codes"], scheme.bits, scheme.sub_group, 128).astype(int)
    assert (codes == nearest)[off != 0].mean() > 0.9
    assert (codes != nearest + off)[off == 0].mean() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_autoround_bundle(tmp_path, arch, capsys):
    ckpt = tmp_path / "ckpt"
    model = make_checkpoint(ckpt, arch, tokenizer=True, intermediate_size=576)
    # (a context of 128: calibration windows that short, as attention's backward costs the square of their length)
    options = dict(quant="int4", calibration=CALIBRATION, calibration_tokens=1024, cpu_variants=("native",),
                   report=True, max_model_len=128)
    lines, report = io.StringIO(), io.StringIO()
    compile_model(ckpt, tmp_path / "autoround.llmir", CompileOptions(**options, quant_method="autoround",
                                                                     quant_iters=30), Progress(lines), stdout=report)
    layers = [line for line in lines.getvalue().splitlines() if "autoround: layer " in line]
    assert len(layers) == 2, lines.getvalue()
    # --report says which layers' codes are learned and which GPTQ's, as the progress lines do
    assert ("autoround: learned rounding" in report.getvalue()) == any(" -> " in line for line in layers)
    assert ("autoround: GPTQ's codes (learning did not" in report.getvalue()) == \
        any("GPTQ's codes kept" in line for line in layers), report.getvalue()
    emitted = io.StringIO()
    compile_model(ckpt, None, CompileOptions(**options, quant_method="autoround", quant_iters=0, emit="mlir"),
                  Progress(None), stdout=emitted)
    reported = capsys.readouterr().err
    assert "autoround: GPTQ's codes (--quant-iters 0)" in reported and "learned rounding" not in reported, reported
    ir = emitted.getvalue()
    learned = ir.count('format = "learned"')
    assert learned == (4 if arch == "gpt2" else 7) * 2, ir  # every decoder linear, per checkpoint tensor
    assert '"llmir.quantize"' in ir  # the LM head (GPT-2's tied to its table, stored as the head): GPTQ
    compile_model(ckpt, tmp_path / "rtn.llmir",
                  CompileOptions(quant="int4", cpu_variants=("native",), max_model_len=128), Progress(None))
    ids = Tokenizer.from_bundle_dir(ckpt).encode(HELD_OUT.read_text(), add_special_tokens=False)[:128]
    ref = hf_logits(model, ids)
    err = {m: np.sqrt(((load(tmp_path / f"{m}.llmir").score(ids) - ref) ** 2).mean() / (ref ** 2).mean())
           for m in ("autoround", "rtn")}
    assert err["autoround"] < 0.9 * err["rtn"], err


@pytest.mark.slow
@pytest.mark.parametrize("arch, expected", [("llama", "no decoder layers"), ("gpt2", "autoround: layer 2 of 2")])
def test_autoround_onnx(tmp_path, arch, expected):
    """A dynamo ONNX export of llama names its linears' weights val_N: no decoder layers, so GPTQ
    alone on the chain (q, k and v sharing their input's Hessian, as fuse-linears stacks them).
    GPT-2's keeps its weights' names but folds the layer norms' parameters into unnamed constants:
    those ops belong to the layer of their input (they were put after the layers, and the next
    linear "read a later layer's value")."""
    ckpt = tmp_path / "ckpt"
    model = make_checkpoint(ckpt, arch, tokenizer=True)
    export_onnx(model, tmp_path / "onnx" / "model.onnx")
    (tmp_path / "onnx" / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    lines = io.StringIO()
    compile_model(tmp_path / "onnx" / "model.onnx", tmp_path / "b.llmir",
                  CompileOptions(quant="int4", quant_method="autoround", quant_iters=10, calibration=CALIBRATION,
                                 calibration_tokens=1024, cpu_variants=("native",), max_model_len=128), Progress(lines))
    assert expected in lines.getvalue(), lines.getvalue()
    ids = list(range(3, 40))
    ref = hf_logits(model, ids)
    assert np.sqrt(((load(tmp_path / "b.llmir").score(ids) - ref) ** 2).mean() / (ref ** 2).mean()) < 0.4  # int4, g32
