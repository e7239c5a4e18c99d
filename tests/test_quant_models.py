"""Quantized models end to end (`--quant`, `--kv-cache-dtype int8`) against transformers.

Two references, on checkpoints the tests make:

* Exact: transformers in float64 with the bundle's quantized weights dequantized
  (llmirc.quant, the same round to nearest) and, before each quantized linear, the input
  quantized per block of 32 as the kernels do it (forward pre-hooks). The bundle then differs
  by f32 rounding, typically 1e-4 relative, but an activation whose f32 value lies next to a
  rounding tie may round the other way (one step d of one value of a row, carried on to later
  positions through attention): relative RMS difference of the logits below 1%, none off by
  more than 2% of the largest, the same top-1 token at 95% of the positions or more.
* The float model: int8 weights stay close (relative RMS error of the logits below 3%, top-1
  agreement at least 90% of the positions), int4 is looser (below 40% on these random-weight
  models, whose weights are the worst case for 4 bits); an int8 KV cache below 2%.
"""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest

from helpers import hf_logits, hf_logits_quantized, make_checkpoint
from llmirc import quant
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.passes.pipeline import IRPrinting
from llmirc.passes.pipeline import parse_passes
from llmirc.passes.quantize_weights import QuantizeWeights
from llmirc.runtime import load

pytestmark = pytest.mark.slow

# down_proj reads 576 inputs: a full super-block and a tail; the other linears 64
OVERRIDES = dict(intermediate_size=576)
TOKENS = [0, 5, 9, 200, 17, 3, 44, 91, 12, 7, 250, 300, 31, 64, 128, 2, 8, 99, 150, 42] * 2
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "ckpt"
    model = make_checkpoint(path, "llama", **OVERRIDES)
    return path, model


def compile_to(ckpt, out, **options):
    """Compile with an f32 KV cache unless told (auto would be f16 here: the references keep K/V
    in f32)."""
    options = {"cpu_variants": ("native",), "kv_cache_dtype": "float32", **options}
    compile_model(ckpt, out, CompileOptions(**options), Progress(None))
    return out


def rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def emulated(model, schemes, head_scheme, quantize_embedding: bool, ids, block=32, int8=(), rotated=False,
             embedding_scheme=None):
    """The exact reference (module docstring): the weights the bundle stores, its activation
    quantization (block None: the GPU targets' bf16 inputs). `schemes(k)`: the scheme of a weight
    of k inputs; `head_scheme(k)`: the LM head's (None: float); `int8`: the linears (last name
    part) stored in 8 bits per output row instead; `rotated`: down_proj's input and weight
    rotated as --quant-rotate does; `embedding_scheme`: the table's where it is not `schemes`."""
    weights = {}
    for name, mod in model.named_modules():
        last = name.split(".")[-1]
        head = name == "lm_head" and head_scheme is not None
        if last in LINEARS or head or (quantize_embedding and last == "embed_tokens"):
            w = mod.weight.detach().numpy()
            s = (head_scheme if head else PER_ROW_INT8 if last in int8 else
                 embedding_scheme if last == "embed_tokens" and embedding_scheme else schemes)(w.shape[1])
            r = 0
            if rotated and last == "down_proj":
                r = 64  # the largest power of two up to 128 dividing its 576 inputs
                w = quant.hadamard(w, r).astype(np.float32)
            weights[name] = (quant.dequantize(quant.quantize(w, s), s, w.shape[1]), None, block, r)
    return hf_logits_quantized(model, weights, ids)


PER_ROW_INT8 = lambda k: quant.Scheme(8, k, "float32")  # noqa: E731 - the LM head's with --quant int8
INT6 = lambda k: quant.Scheme(6, 32)  # noqa: E731 - the LM head's with --quant int4


CASES = {  # name -> (compile options, the LM head's scheme (None: float), embedding quantized[, int8 linears])
    "int8": (dict(quant="int8"), PER_ROW_INT8, False),
    "int4": (dict(quant="int4", cpu_variants=("native", "baseline")), INT6, False),
    "int4-lm-head-kept": (dict(quant="int4", quant_keep=("embedding", "lm_head")), None, False),
    "int4-lm-head-int4": (dict(quant="int4", quant_lm_head="int4"), lambda k: quant.Scheme(4, 32), False),
    "int4-lm-head-int8": (dict(quant="int4", quant_lm_head="int8"), PER_ROW_INT8, False),
    "int4-g64-zero-points-all": (dict(quant="int4", quant_group_size=64, quant_symmetric=False, quant_keep=()),
                                 INT6, True),
    "int4-down-proj-int8": (dict(quant="int4", quant_group_size=64, quant_keep=("embedding", "*.down_proj.*=int8")),
                            INT6, False, ("down_proj",)),
    "int4-rotated": (dict(quant="int4", quant_rotate=True), INT6, False, (), True),
}


def case_of(name: str) -> tuple:
    """(options, head scheme, embedding quantized, int8 linears, rotated) of CASES[name], with the
    optional fields filled in."""
    return (*CASES[name], (), False)[:5]


def pass_of(options: dict) -> QuantizeWeights:
    """The quantize-weights pass the options run (its `scheme(k)` says how a weight is stored)."""
    (p,) = [p for p in parse_passes(CompileOptions(**options).quantize_pass())]
    return p


@pytest.mark.parametrize("case", CASES)
def test_quantized_bundle_matches_emulation(tmp_path, checkpoint, case):
    ckpt, model = checkpoint
    options, head, embedding, int8, rotated = case_of(case)
    bundle = compile_to(ckpt, tmp_path / "q.llmir", **options)
    schemes = pass_of(options).scheme
    ref = emulated(model, schemes, head, embedding, TOKENS, int8=int8, rotated=rotated)
    float_ref = hf_logits(model, TOKENS)
    for target in [t["name"] for t in load(bundle).bundle.manifest["targets"]]:
        compiled = load(bundle, target=target)
        got = compiled.score(TOKENS)
        assert rel_rms(got, ref) < 1e-2 and np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max(), target
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, target
        # against the float model: stated tolerances (module docstring)
        err, agree = rel_rms(got, float_ref), (got.argmax(-1) == float_ref.argmax(-1)).mean()
        if case == "int8":
            assert err < 0.03 and agree >= 0.9, (err, agree)
        else:
            assert err < 0.4, err
        # decode (one token per step, the decode kernels) continues the prompt as score predicts
        out = compiled.generate([TOKENS[:12]], max_new_tokens=6, ignore_eos=True)[0]
        step = compiled.score(TOKENS[:12] + out[:-1])
        assert out == [int(t) for t in step[11:].argmax(-1)]
    manifest = load(bundle).bundle.manifest
    kinds = {k["kind"] for t in manifest["targets"] for k in t["kernels"]}
    assert "qlinear" in kinds and ("qembedding" in kinds) == embedding and ("hadamard" in kinds) == bool(rotated)


def test_auto_kv_cache_follows_the_checkpoint_not_the_codes(tmp_path, checkpoint):
    """--kv-cache-dtype auto with every linear quantized: a bf16 checkpoint keeps a bf16 cache (the
    quantized weights count as the float weights they were made from), an f32 one gets float16,
    llama.cpp's cache type."""
    make_checkpoint(tmp_path / "bf16", "llama", dtype="bfloat16", **OVERRIDES)
    for ckpt, want in ((tmp_path / "bf16", "bfloat16"), (checkpoint[0], "float16")):
        bundle = compile_to(ckpt, tmp_path / f"{want}.llmir", quant="int4", quant_keep=(), kv_cache_dtype="auto")
        assert load(bundle).bundle.manifest["kv_cache"]["dtype"] == want


@pytest.mark.parametrize("checkpoint_dtype,dtype,keep,want", [
    ("bfloat16", "float32", ("embedding",), "f16"),  # as an f32 checkpoint's (was bf16)
    ("bfloat16", "float16", ("embedding",), "f16"),  # (was bf16, the weights kept float being f16)
    ("bfloat16", "float16", (), "f16"),
    ("float32", "bfloat16", (), "bf16"),  # (was f16: the codes counted as the f32 checkpoint's)
    ("bfloat16", "auto", (), "bf16"),
])
def test_auto_kv_cache_follows_dtype(tmp_path, checkpoint_dtype, dtype, keep, want):
    """--kv-cache-dtype auto with --dtype and --quant: the quantized weights count as what --dtype
    stores the float ones in, not as the checkpoint's type."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, "llama", dtype=checkpoint_dtype)
    emitted = io.StringIO()
    compile_model(ckpt, None, CompileOptions(quant="int4", quant_keep=keep, dtype=dtype, emit="mlir"), Progress(None),
                  stdout=emitted)
    pools = set(re.findall(r"!llmir.kv_pool<[^>]*, (\w+)>", emitted.getvalue()))
    assert pools == {want}, pools


def test_int8_kv_cache(tmp_path, checkpoint):
    """Float weights, an int8 KV cache: long enough to fill several blocks (scales requantized
    as a block fills) in prefill, chunked prefill and decode."""
    ckpt, model = checkpoint
    bundle = compile_to(ckpt, tmp_path / "kv8.llmir", kv_cache_dtype="int8")
    compiled = load(bundle, max_num_batched_tokens=13, max_num_seqs=2)  # prefill in chunks of 13 tokens
    assert compiled.bundle.manifest["kv_cache"]["dtype"] == "int8"
    seq = TOKENS + TOKENS[::-1]
    ref = hf_logits(model, seq)
    got = compiled.score(seq)
    assert rel_rms(got, ref) < 0.02 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    prompts = [TOKENS[:5], TOKENS[:23]]
    outs = compiled.generate(prompts, max_new_tokens=20, ignore_eos=True)
    for prompt, out in zip(prompts, outs):  # decode agrees with scoring the same sequence
        step = compiled.score(prompt + out[:-1])
        agree = np.mean(np.array(out) == step[len(prompt) - 1:].argmax(-1))
        assert agree >= 0.9, agree


def test_quantized_ir(tmp_path, checkpoint, capsys):
    """The types show in the IR (--emit mlir, --print-ir-after-all); keep chooses what stays float."""
    ckpt, _ = checkpoint
    emitted = io.StringIO()
    plan = compile_model(ckpt, None, CompileOptions(quant="int4", emit="mlir", print_ir=IRPrinting(after_all=True),
                                                    quant_keep=("lm_head", "*.down_proj.*")), Progress(None),
                         stdout=emitted)
    out, err = emitted.getvalue(), capsys.readouterr().err
    assert "IR Dump After quantize-weights" in err
    qtype = "!llmir.quant<bits = 4, group_size = 32, scale = f16, zero = none>"
    assert qtype in out and '"llmir.quantize"' in out
    kinds = [c.kind for c in plan.calls]
    # per layer: q|k|v, o_proj, gate|up quantized; down_proj (x2) and the LM head kept
    assert kinds.count("qlinear") == 6 and kinds.count("linear") == 3
    assert "qembedding" in kinds
    names = [w.name for w in plan.weights]
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight.codes" in names
    assert "model.layers.0.mlp.down_proj.weight" in names


@pytest.mark.parametrize("tied,options,line", [
    (False, dict(), "LM head -> int6"),  # auto with --quant int4
    (False, dict(quant_lm_head="int4"), "LM head -> int4"),
    (False, dict(quant_lm_head="int8"), "LM head -> int8"),
    (False, dict(quant_keep=("embedding", "lm_head"), quant_lm_head="int4"), "LM head kept"),
    # the table the head is tied to is stored as the head (one copy), by default in 6-bit groups
    (True, dict(), "LM head -> int6"),
    (True, dict(quant_lm_head="int4"), "LM head -> int4"),
    (True, dict(quant_keep=("embedding=float",), quant_lm_head="int4"),
     "LM head tied to a kept embedding table: float"),
    (True, dict(quant_keep=(), quant_lm_head="int4"), "LM head -> int4"),  # one int4 copy, shared
])
def test_report_says_how_the_lm_head_is_stored(tmp_path, capsys, tied, options, line):
    """--report (and so inspect) names the LM head's storage (and a table tied to it stored so); a tied head
    that stays float is a note."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, "llama", tie_word_embeddings=tied)
    emitted = io.StringIO()
    compile_model(ckpt, None, CompileOptions(quant="int4", report=True, emit="mlir", **options),
                  Progress(sys.stderr), stdout=emitted)
    err = capsys.readouterr().err
    assert f"quantize-weights: {line} " in err, err
    assert ("note: the LM head is tied to the embedding table" in err) == ("tied to" in line)
    assert ("--quant-lm-head int4 changes nothing" in err) == ("tied to" in line)  # given, and ignored
    shared = tied and "keep" not in str(options)  # (the default keep: the table stored as the head)
    assert ("embedding table tied to the LM head -> int" in err) == shared, err
    assert err.count("LM head") == 1 + ("tied to" in line) + shared


def test_report_names_the_keep_item_of_each_kept_weight(tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", "llama")
    compile_model(tmp_path / "ckpt", None, CompileOptions(quant="int4", report=True, emit="mlir",
                                                          quant_keep=("embedding", "*.down_proj.*=int8", "*.o_proj.*")),
                  Progress(sys.stderr), stdout=io.StringIO())
    err = capsys.readouterr().err
    for line, count in (("float (keep embedding)", 1), ("weight -> int8 (keep *.down_proj.*=int8)", 2),
                        ("float (keep *.o_proj.*)", 2), ("weight -> int4", 4)):
        assert re.search(rf"quantize-weights: {re.escape(line)} +x{count}\n", err), err
    assert not re.search(r"weight -> int8 +x", err), err  # the kept ones are not counted twice


@pytest.mark.parametrize("quant,scheme", [("int4", INT6), ("int8", lambda k: quant.Scheme(8, 32))])
def test_table_tied_to_the_lm_head_is_stored_as_the_head(tmp_path, quant, scheme):
    """By default (--quant-keep embedding) a table the LM head is tied to is stored as the head (6-bit groups
    with int4, 8-bit groups of 32 with int8, as Q8_0), one copy read by both, as llama.cpp quantizes a tied
    token_embd with its output matrix's type: it stayed in float, 63% of Gemma 3 270M's weights read each step."""
    model = make_checkpoint(tmp_path / "ckpt", "llama", tie_word_embeddings=True, **OVERRIDES)
    compiled = load(compile_to(tmp_path / "ckpt", tmp_path / "q.llmir", quant=quant))
    names = compiled.bundle.manifest["weights"]["order"]
    assert [n for n in names if "embed_tokens" in n or "lm_head" in n] == \
        ["model.embed_tokens.weight.codes", "model.embed_tokens.weight.scales"]
    kinds = [k["kind"] for t in compiled.bundle.manifest["targets"] for k in t["kernels"]]
    assert "qembedding" in kinds and "embedding" not in kinds
    ref = emulated(model, pass_of(dict(quant=quant)).scheme, scheme, True, TOKENS, embedding_scheme=scheme)
    got = compiled.score(TOKENS)
    assert rel_rms(got, ref) < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, rel_rms(got, ref)
    kept = load(compile_to(tmp_path / "ckpt", tmp_path / "f.llmir", quant=quant, quant_keep=("embedding=float",)))
    assert "model.embed_tokens.weight" in kept.bundle.manifest["weights"]["order"]  # (float, one copy)


def test_int8_keep_items_are_stored_as_the_lm_head(tmp_path):
    """An item ending in =int8 stores its weights as --quant int8 stores an LM head (symmetric, a
    float32 scale per output row) whatever --quant-zero-points says: the LM head tied to a table
    kept so shares its codes (one copy; --quant-lm-head auto follows the table), down_proj has no
    zero points; the bundle matches the emulation."""
    model = make_checkpoint(tmp_path / "ckpt", "llama", tie_word_embeddings=True, **OVERRIDES)
    options = dict(quant="int4", quant_symmetric=False, quant_keep=("embedding=int8", "*.down_proj.*=int8"))
    compiled = load(compile_to(tmp_path / "ckpt", tmp_path / "q.llmir", **options))
    names = compiled.bundle.manifest["weights"]["order"]
    assert [n for n in names if "embed_tokens" in n or "lm_head" in n] == \
        ["model.embed_tokens.weight.codes", "model.embed_tokens.weight.scales"]
    assert [n for n in names if "down_proj" in n] == [f"model.layers.{i}.mlp.down_proj.weight.{part}"
                                                     for i in (0, 1) for part in ("codes", "scales")]
    ref = emulated(model, pass_of(options).scheme, PER_ROW_INT8, True, TOKENS, int8=("down_proj", "embed_tokens"))
    got = compiled.score(TOKENS)
    assert rel_rms(got, ref) < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, rel_rms(got, ref)


def test_group_size_halved_where_it_does_not_divide(checkpoint, capsys):
    """hidden 64 and down_proj's 576 inputs do not split into groups of 128: groups of 64 there
    (576 = 9 x 64), said in --report, nothing left in float."""
    ckpt, _ = checkpoint
    emitted = io.StringIO()
    plan = compile_model(ckpt, None, CompileOptions(quant="int4", quant_group_size=128, quant_keep=(), report=True,
                                                    emit="mlir"), Progress(None), stdout=emitted)
    report = capsys.readouterr().err  # with --emit, the report goes to stderr
    assert "groups of 64 for 576 inputs (not a multiple of 128)" in report
    assert "groups of 64 for 64 inputs (not a multiple of 128)" in report
    kinds = [c.kind for c in plan.calls]
    assert "linear" not in kinds and "embedding" not in kinds
    assert {c.params["group_size"] for c in plan.calls if c.kind == "qlinear" and c.params["bits"] == 4} == {64}


def test_parameters_count_the_logical_weights(tmp_path):
    """inspect and bench count a quantized weight's n x k elements, not its packed bytes: the same
    figures (parameters, a prefill's matmul FLOPs) for every storage of one checkpoint."""
    from llmirc.runtime.bench import prefill_flops
    from llmirc.runtime.inspect import summary

    model = make_checkpoint(tmp_path / "ckpt", "llama", tie_word_embeddings=True, **OVERRIDES)
    expected = sum(p.numel() for p in model.parameters())  # the tied table once
    cases = {"float": {},
             "int4-zp": dict(quant="int4", quant_symmetric=False, quant_keep=("none",), quant_lm_head="int4"),
             "int8-mix": dict(quant="int4", quant_keep=("embedding=int8", "*.down_proj.*=int8")),
             "head-copy": dict(quant="int4", quant_keep=("none",))}  # table int4, head int6: two copies
    flops = set()
    for name, options in cases.items():
        bundle = compile_to(tmp_path / "ckpt", tmp_path / f"{name}.llmir", **options)
        assert summary(bundle)["weights"]["parameters"] == expected, name
        flops.add(prefill_flops(load(bundle), 16))
    assert len(flops) == 1
