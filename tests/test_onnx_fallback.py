"""ONNX graphs llmirc does not fully recognize compile as full-sequence models (generic kernels for
the ONNX ops left) and compute what onnxruntime computes on the same .onnx: at every step of
greedy generation (the logits each step produced) and for `score`.

(a) a hand-built decoder whose attention is bidirectional (no mask: not an LLM attention);
(b) a torch decoder exported with torch.onnx (dynamo) whose layer 0 is plain causal attention
    (fused: paged attention, its cache rewritten each step), layer 1 soft-caps the scores
    (tanh(s / c) * c) and layer 2 adds an ALiBi bias: both left generic; and a transformers
    Gemma-2 export (soft-capped scores and logits, sliding window);
(c) an "op zoo": one graph whose branches exercise the generic rules (indexing with run-time
    indices, scatter, cumsum, reductions, layout views, integer arithmetic, the ONNX inputs).
"""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from onnx_graphs import Graph, save
from test_cli_errors import llmirc
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import BundleError
from llmirc.runtime import inspect, load

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
STEPS = 12


def onnxruntime_logits(model_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    # past_key_values.*: empty ([1, kv heads, 0, head dim]), as llmirc reads them
    past = {i.name: np.zeros([1 if j == 0 else 0 if isinstance(d, str) or d is None else d
                              for j, d in enumerate(i.shape)], np.float32)
            for i in sess.get_inputs() if i.name.startswith("past")}

    def run(ids: list[int]) -> np.ndarray:
        S = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, S), np.int64),
                 "position_ids": np.arange(S, dtype=np.int64)[None], **past}
        return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0][0].astype(np.float64)
    return run


def assert_close(got, want, what=""):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), err_msg=what)


def check_against_onnxruntime(bundle, model_path, prompt: list[int]) -> None:
    """Greedy generation: each step's logits (as the compiled forward returned them) and token
    match onnxruntime's on the same tokens; then `score` of the whole sequence does."""
    ref = onnxruntime_logits(model_path)
    compiled = load(bundle)
    assert compiled.full_sequence
    steps = []
    forward = compiled.executor.forward
    compiled.executor.forward = lambda *a: steps.append(forward(*a)) or steps[-1]
    tokens = compiled.generate([prompt], max_new_tokens=STEPS, ignore_eos=True)[0]
    assert len(tokens) == len(steps) == STEPS
    seq = list(prompt)
    for i, (token, logits) in enumerate(zip(tokens, steps)):
        want = ref(seq)[-1]
        assert logits.shape == (1, want.size)
        assert_close(logits[0], want, f"step {i}")
        top2 = np.sort(want)[-2:]
        assert token == int(np.argmax(want)) or top2[1] - top2[0] < 1e-4 * abs(top2[1]), f"step {i}"
        seq.append(token)
    assert_close(compiled.score(seq), ref(seq), "score")
    assert_close(compiled.score(seq[:1]), ref(seq[:1]), "score of one token")


# -- (a) bidirectional attention -------------------------------------------------------------------------

def bidirectional_decoder(layers=2, C=32, H=4, vocab=64) -> onnx.ModelProto:
    D = C // H
    g = Graph(C, vocab=vocab, seed=1)

    def rms(t):
        ms = g.op("ReduceMean", g.op("Mul", t, t), g.i64(-1), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, np.float32(1e-6))))
        return g.op("Mul", g.op("Mul", t, inv), g.randn(C, scale=0.1, shift=1.0))

    def heads(t):
        return g.op("Transpose", g.op("Reshape", t, g.i64(1, -1, H, D)), perm=[0, 2, 1, 3])

    x = g.x
    for _ in range(layers):
        h = rms(x)
        q, k, v = (heads(g.matmul(h, C, C)) for _ in range(3))
        s = g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), np.float32(math.sqrt(D)))
        p = g.op("Softmax", s, axis=-1)  # no causal mask: every token sees the whole sequence
        o = g.op("Reshape", g.op("Transpose", g.op("MatMul", p, v), perm=[0, 2, 1, 3]), g.i64(1, -1, C))
        x = g.op("Add", x, g.matmul(o, C, C))
        x = g.op("Add", x, g.matmul(g.op("Relu", g.matmul(rms(x), C, 2 * C)), 2 * C, C))
    return g.model(g.matmul(rms(x), C, vocab), shape=[1, "S", vocab])


def test_bidirectional_attention(tmp_path):
    path = save(bidirectional_decoder(), tmp_path)
    bundle = tmp_path / "m.llmir"
    r = llmirc("compile", path, "-o", bundle, "--cpu-variants", "native")
    assert r.returncode == 0, r.stderr
    assert "full-sequence model (ONNX ops left generic: " in r.stderr and "correct but slow" in r.stderr
    assert "Softmax x2" in r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["full_sequence"] is True and manifest["model"]["generic_ops"]["Softmax"] == 2
    assert manifest["kv_cache"]["num_layers"] == 0  # no attention recognized: no cache
    text = inspect.describe(inspect.summary(bundle))
    assert "full-sequence model (ONNX ops left generic: " in text and "correct but slow" in text
    check_against_onnxruntime(bundle, path, [3, 17, 5, 60, 2])


# -- (b) an exported decoder with soft-capping and ALiBi ------------------------------------------------------

class _Decoder:
    """Built lazily: torch is imported only by the tests that export."""

    @staticmethod
    def make(vocab=96, C=32, H=4, cap=5.0):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class Decoder(nn.Module):
            kinds = ("causal", "softcap", "alibi")

            def __init__(self):
                super().__init__()
                self.H, self.D = H, C // H
                self.embed = nn.Embedding(vocab, C)
                self.blocks = nn.ModuleList(nn.ModuleDict(dict(
                    n1=nn.RMSNorm(C, eps=1e-6), qkv=nn.Linear(C, 3 * C), o=nn.Linear(C, C, bias=False),
                    n2=nn.RMSNorm(C, eps=1e-6), gate=nn.Linear(C, 2 * C), up=nn.Linear(C, 2 * C),
                    down=nn.Linear(2 * C, C))) for _ in self.kinds)
                self.norm = nn.RMSNorm(C, eps=1e-6)
                self.head = nn.Linear(C, vocab, bias=False)
                slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])
                self.register_buffer("slopes", slopes[:, None, None], persistent=False)
                with torch.no_grad():
                    for p in self.parameters():
                        p.add_(torch.randn_like(p) * 0.05)

            def attend(self, x, blk, kind):
                S = x.shape[1]
                q, k, v = (t.view(1, S, self.H, self.D).transpose(1, 2)
                           for t in blk["qkv"](x).split(self.H * self.D, dim=-1))
                s = q @ k.transpose(-1, -2) / math.sqrt(self.D)
                if kind == "softcap":  # Gemma-2 style logit soft-capping
                    s = torch.tanh(s / cap) * cap
                elif kind == "alibi":  # a per-head linear bias on the distance
                    pos = torch.arange(S)
                    s = s + self.slopes * (pos[None, :] - pos[:, None])
                s = s + torch.triu(torch.full((S, S), float("-inf")), 1)
                o = torch.softmax(s, dim=-1) @ v
                return blk["o"](o.transpose(1, 2).reshape(1, S, self.H * self.D))

            def forward(self, input_ids):
                x = self.embed(input_ids)
                for blk, kind in zip(self.blocks, self.kinds):
                    x = x + self.attend(blk["n1"](x), blk, kind)
                    h = blk["n2"](x)
                    x = x + blk["down"](F.silu(blk["gate"](h)) * blk["up"](h))
                return self.head(self.norm(x))

        torch.manual_seed(0)
        return Decoder().eval()


@pytest.fixture(scope="module")
def exported_decoder(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("decoder") / "model.onnx"
    seq = torch.export.Dim("seq", min=2, max=256)
    torch.onnx.export(_Decoder.make(), (torch.tensor([[1, 5, 9, 3]]),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"], dynamic_shapes={"input_ids": {1: seq}},
                      opset_version=18, verbose=False)
    return path


def test_exported_decoder_with_softcap_and_alibi(exported_decoder, tmp_path):
    """The soft-capped layer is recognized (llmir.attention's softcap, Gemma 2's), the ALiBi one is not: it keeps the
    model a full-sequence one."""
    bundle, log, report = tmp_path / "m.llmir", io.StringIO(), io.StringIO()
    compile_model(exported_decoder, bundle, CompileOptions(cpu_variants=("native",), report=True), Progress(log),
                  stdout=report)
    assert "full-sequence model (ONNX ops left generic: " in log.getvalue()
    assert "onnx-fuse-attention: attention (no rope, 4/4 heads, softcap 5)" in report.getvalue()
    assert "  left generic: Add x" in report.getvalue()
    optimized = (bundle / "ir" / "optimized.mlir").read_text()
    assert optimized.count('"llmir.paged_attention"') == 2  # layers 0 and 1: recognized, on the paged cache
    assert '"onnx.Tanh"' not in optimized and '"onnx.Softmax"' in optimized
    check_against_onnxruntime(bundle, exported_decoder, [1, 5, 9, 3, 77, 40, 12])


# -- (c) the op zoo ---------------------------------------------------------------------------------------

def op_zoo(C=8, vocab=40) -> onnx.ModelProto:
    """Branches [1, S, C] summed, then a head: every ONNX op here stays generic."""
    g = Graph(C, vocab=vocab, inputs=("input_ids", "attention_mask", "position_ids"), seed=3)
    x, i64 = g.x, g.i64
    pos = g.op("Unsqueeze", "position_ids", i64(-1))  # [1, S, 1]
    seq_len = g.seq_len()
    rng = g.op("Range", np.int64(0), seq_len, np.int64(1))  # [S]
    branches = [
        # indexing with run-time indices: a table read at ids + 1 (not the embedding spelling)
        g.op("Gather", g.randn(vocab + 1, C), g.op("Add", "input_ids", np.int64(1)), axis=0),
        g.op("GatherElements", x, g.op("Mod", g.op("Add", pos, i64(*range(C))), np.int64(C)), axis=2),
        g.op("Unsqueeze", g.op("GatherND", g.op("Squeeze", x, i64(0)), g.op("Concat", g.op(
            "Unsqueeze", rng, i64(1)), g.op("Unsqueeze", g.op("Mod", rng, np.int64(C)), i64(1)), axis=1)), i64(0, 2)),
        g.op("ScatterElements", x, g.op("Mod", g.op("Add", pos, i64(*range(C))), np.int64(C)),
             g.op("Mul", x, np.float32(2)), axis=2),
        g.op("ScatterND", x, np.zeros((1, 1, 2), np.int64), g.randn(1, 1, C)),
        # along the sequence: running mean, LayerNormalization over [S, C], log-softmax masked
        g.op("Div", g.op("CumSum", x, np.int64(1)), g.op("Add", g.op("Cast", pos, to=FLOAT), np.float32(1))),
        g.op("LayerNormalization", x, g.randn(1, C), g.randn(1, C), axis=1),
        g.op("Mul", g.op("LogSoftmax", x, axis=1), g.op("Cast", g.op("Unsqueeze", "attention_mask", i64(-1)),
                                                          to=FLOAT)),
        g.op("Sub", x, g.op("ReduceMax", x, i64(1), keepdims=1)),
        g.op("Mul", x, g.op("ReduceL2", x, i64(-1), keepdims=1)),
        g.op("Cast", g.op("Equal", g.op("ArgMax", x, axis=2, keepdims=1), g.op(
            "Range", np.int64(0), np.int64(C), np.int64(1))), to=FLOAT),
        # layout: reversed sequence, pad, tile, split and concat, gemm over rows, causal row mixing
        g.op("Slice", x, i64(-1), i64(-(2 ** 62)), i64(1), i64(-1)),
        g.op("Pad", g.op("Slice", x, i64(0), i64(C // 2), i64(2)), i64(0, 0, 1, 0, 0, C // 2 - 1),
             np.float32(0.25)),
        g.op("Tile", g.op("Slice", x, i64(1), i64(C), i64(2), i64(2)), i64(1, 1, 2)),
        g.op("Concat", *reversed(g.op("Split", x, i64(3, C - 3), axis=2, outputs=2)), axis=-1),
        g.op("Unsqueeze", g.op("Gemm", g.op("Flatten", x, axis=2), g.randn(C, C), g.randn(C), alpha=0.5,
                               transB=1), i64(0)),
        g.op("MatMul", g.op("Trilu", g.op("MatMul", x, g.op("Transpose", x, perm=[0, 2, 1])), upper=0), x),
        g.op("Mul", g.op("Einsum", g.op("Einsum", x, x, equation="bsc,btc->bst"), x, equation="bst,btc->bsc"),
             np.float32(0.02)),
        # integers and elementwise odds and ends
        g.op("Cast", g.op("Add", g.op("Div", g.op("Cast", g.op("Mul", x, np.float32(10)), to=INT64), np.int64(3)),
                          g.op("Mod", g.op("Cast", g.op("Mul", x, np.float32(10)), to=INT64), np.int64(4))), to=FLOAT),
        g.op("Where", g.op("Greater", x, np.float32(0)), g.op("Pow", x, np.float32(2)), g.op("Erf", x)),
        g.op("Max", g.op("Clip", x, np.float32(-0.5), np.float32(0.5)), g.op("Sigmoid", x), g.op("Neg", x)),
        g.op("Mean", x, g.op("Abs", x)),
        g.op("Expand", g.op("Cast", g.op("Unsqueeze", g.op("Unsqueeze", seq_len, i64(0)), i64(0, 1)), to=FLOAT),
             i64(1, 1, C)),
        # an explicit past (read as empty) concatenated with this step's keys, as cache exports do
        g.op("Reshape", g.op("Transpose", g.op("Concat", "past_key_values.0.key", g.op(
            "Transpose", g.op("Reshape", x, i64(1, -1, 2, C // 2)), perm=[0, 2, 1, 3]), axis=2), perm=[0, 2, 1, 3]),
            i64(1, -1, C)),
    ]
    g.inputs.append(onnx.helper.make_tensor_value_info("past_key_values.0.key", FLOAT, [1, 2, "P", C // 2]))
    total = branches[0]
    for i, b in enumerate(branches[1:]):
        total = g.op("Add", total, g.op("Mul", b, np.float32(0.5 + 0.1 * i)))
    y = g.op("MatMul", total, g.randn(C, vocab, scale=0.3))
    return g.model(y, shape=[1, "S", vocab])


def test_op_zoo(tmp_path):
    path = save(op_zoo(), tmp_path)
    bundle = tmp_path / "m.llmir"
    compile_model(path, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    ref, compiled = onnxruntime_logits(path), load(bundle)
    generic = json.loads((bundle / "manifest.json").read_text())["model"]["generic_ops"]
    for op in ("GatherElements", "GatherND", "ScatterND", "CumSum", "LayerNormalization", "Tile", "Pad", "Gemm",
               "Einsum"):
        assert op in generic
    rng = np.random.default_rng()
    for S in (1, 2, 3, 9, 21):
        ids = rng.integers(0, 40, S).tolist()
        assert_close(compiled.score(ids), ref(ids), f"S={S}, ids={ids}")


def function_zoo(C=8, heads=2, vocab=40) -> onnx.ModelProto:
    """Standard operators the ONNX standard defines as functions, at opset 23, each used in a way the
    fusions do not recognize (so their bodies stay generic), and a model-local function."""
    g = Graph(C, vocab=vocab, inputs=("input_ids", "position_ids"), seed=4)
    x, d = g.x, C // heads
    local = onnx.helper.make_function("zoo.local", "ScaledTanh", ["X"], ["Y"], [
        onnx.helper.make_node("Constant", [], ["c"], value_float=0.5),
        onnx.helper.make_node("Mul", ["X", "c"], ["h"]), onnx.helper.make_node("Tanh", ["h"], ["Y"])],
        [onnx.helper.make_opsetid("", 23)])
    branches = [
        g.op("Mish", x),
        g.op("Celu", x, alpha=0.7),
        g.op("RMSNormalization", x, g.randn(C), axis=-1, epsilon=1e-3),
        g.op("RMSNormalization", x, g.randn(1, C), axis=1),  # over [S, C]: not a row norm
        # interleaved rotation read from a [max positions, d/2] cache at position_ids
        g.op("RotaryEmbedding", x, g.randn(64, d // 2), g.randn(64, d // 2), "position_ids", interleaved=1,
             num_heads=heads),
        # bidirectional grouped-query attention on [1, S, C] inputs (no mask: not an LLM attention)
        g.op("Attention", x, g.matmul(x, C, d), g.matmul(x, C, d), q_num_heads=heads, kv_num_heads=1),
    ]
    g.nodes.append(onnx.helper.make_node("ScaledTanh", [x], ["local_out"], domain="zoo.local"))
    total = "local_out"
    for i, b in enumerate(branches):
        total = g.op("Add", total, g.op("Mul", b, np.float32(0.5 + 0.1 * i)))
    y = g.op("MatMul", total, g.randn(C, vocab, scale=0.3))
    return g.model(y, shape=[1, "S", vocab], opset=23, functions=[local])


def test_function_ops_expanded(tmp_path):
    """Function operators (opset 23's fused LLM operators among them) compute onnxruntime's numbers."""
    path = save(function_zoo(), tmp_path)
    bundle = tmp_path / "m.llmir"
    compile_model(path, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    ref, compiled = onnxruntime_logits(path), load(bundle)
    rng = np.random.default_rng()
    for S in (1, 2, 5, 17):
        ids = rng.integers(0, 40, S).tolist()
        assert_close(compiled.score(ids), ref(ids), f"S={S}, ids={ids}")


def test_function_ops_inside_model_local_functions(tmp_path):
    """Model-local functions whose bodies call operators the standard defines as functions (Mish and
    RMSNormalization in a function called by another, Celu in one that imports opset 13) are expanded
    all the way down, not left for the importer to refuse."""
    C, vocab = 8, 40
    g = Graph(C, vocab=vocab, seed=5)
    opsets = [onnx.helper.make_opsetid("", 23), onnx.helper.make_opsetid("loc", 1)]
    inner = onnx.helper.make_function("loc", "Inner", ["X"], ["Y"], [onnx.helper.make_node("Mish", ["X"], ["Y"])],
                                      opsets[:1])
    outer = onnx.helper.make_function("loc", "Outer", ["X", "w"], ["Y"], [
        onnx.helper.make_node("Inner", ["X"], ["a"], domain="loc"),
        onnx.helper.make_node("RMSNormalization", ["a", "w"], ["Y"], axis=-1, epsilon=1e-3)], opsets)
    old = onnx.helper.make_function("loc", "Old", ["X"], ["Y"],
                                    [onnx.helper.make_node("Celu", ["X"], ["Y"], alpha=0.5)],
                                    [onnx.helper.make_opsetid("", 13)])
    g.nodes += [onnx.helper.make_node("Outer", [g.x, g.randn(C)], ["outer_out"], domain="loc"),
                onnx.helper.make_node("Old", [g.x], ["old_out"], domain="loc")]
    y = g.op("Add", g.op("Add", "outer_out", "old_out"), g.op("CumSum", g.x, np.array(1, np.int64)))
    model = g.model(g.op("MatMul", y, g.randn(C, vocab)), shape=[1, "S", vocab], opset=23,
                    functions=[inner, outer, old])
    path = save(model, tmp_path)
    bundle = tmp_path / "m.llmir"
    r = llmirc("compile", path, "-o", bundle, "--cpu-variants", "native", "--report")
    assert r.returncode == 0, r.stderr
    assert "expanded into their ONNX function bodies: Celu x1, Mish x1, RMSNormalization x1" in r.stdout, r.stdout
    ref, compiled = onnxruntime_logits(path), load(bundle)
    for ids in ([3], [3, 1, 4, 1, 5, 9, 2]):
        assert_close(compiled.score(ids), ref(ids), f"ids={ids}")


def test_table_computed_from_the_length_read_at_position_ids(tmp_path):
    """A table computed from the sequence length (cos(range(S) * f)) read at position_ids is no weight:
    neither as a Gather (opset 18) nor as RotaryEmbedding's cache (opset 23), which the standard lets be
    any [positions, d/2] value, is it an embedding of positions."""
    C, vocab = 8, 40
    for opset in (18, 23):
        g = Graph(C, vocab=vocab, inputs=("input_ids", "position_ids"), seed=1)
        angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", g.positions(), to=FLOAT), g.i64(-1)),
                      g.init(np.linspace(0.1, 1, C if opset == 18 else C // 2)))
        if opset == 18:
            y = g.op("Add", g.x, g.op("Gather", g.op("Cos", angles), "position_ids", axis=0))
        else:
            y = g.op("RotaryEmbedding", g.op("Reshape", g.x, g.i64(1, 1, -1, C)), g.op("Cos", angles),
                     g.op("Sin", angles), "position_ids")
            y = g.op("Reshape", y, g.i64(1, -1, C))
        y = g.op("Add", y, g.op("CumSum", g.x, np.array(1, np.int64)))  # each token reads the ones before
        path = save(g.model(g.op("MatMul", y, g.randn(C, vocab)), shape=[1, "S", vocab], opset=opset), tmp_path,
                    f"m{opset}.onnx")
        bundle = tmp_path / f"m{opset}.llmir"
        compile_model(path, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
        ref, compiled = onnxruntime_logits(path), load(bundle)
        for ids in ([3], [3, 1, 4, 1, 5, 9, 2]):
            assert_close(compiled.score(ids), ref(ids), f"opset {opset}, ids={ids}")


# -- what stays as it was, and what the loader refuses ----------------------------------------------------------

def test_fully_recognized_graph_stays_incremental(tmp_path):
    from test_onnx_fusions import attention_graph, lower

    from llmirc import dialect as L
    from llmirc.passes.func_args import forward_func

    module, _ = lower(attention_graph(), tmp_path)
    assert L.FULL_SEQUENCE not in forward_func(module).attributes


def test_manifest_cannot_turn_off_full_sequence(tmp_path):
    path = save(bidirectional_decoder(layers=1), tmp_path)
    bundle = tmp_path / "m.llmir"
    compile_model(path, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    tampered = tmp_path / "t.llmir"
    shutil.copytree(bundle, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["model"]["full_sequence"] = False  # would run incremental steps on a whole-sequence library
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="full_sequence"):
        load(tampered)
