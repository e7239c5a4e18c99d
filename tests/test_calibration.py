"""GPTQ (`--quant-method gptq --calibration FILE`): the algorithm, the calibration forward, the
compile end to end.

* `quant.gptq` on fresh random data: with H = I it is round to nearest, code for code; with the
  Hessian of correlated inputs it lowers the output error ||X (W - Q)^T|| below round to
  nearest's, for every scheme (it minimizes exactly that, column by column).
* The calibration forward (NumPy, over the front end's full-sequence IR) against
  transformers: the input rows of every linear, captured with forward pre-hooks on the same
  windows, give the same Hessians (relative 1e-4), for llama, qwen2 (biases), mistral (a
  sliding window shorter than the windows) and gpt2 (LayerNorm, Conv1D, GELU).
* A GPTQ bundle: the IR gives each linear's quantize op its Hessian, and its logits on
  held-out text are closer to the float model's than the round-to-nearest bundle's.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import hf_logits, make_checkpoint, make_tokenizer
from llmirc import quant
from llmirc.calibration import _hessian, calibrate, read_token_ids, windows
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.frontend import open_source
from llmirc.passes.pipeline import make_context, run_passes
from llmirc.runtime import load
from llmirc.runtime.tokenizer import Tokenizer

SCHEMES = [quant.Scheme(4, 32), quant.Scheme(4, 64, "float16", "int"), quant.Scheme(8, 192, "float32"),
           quant.Scheme(4, 16, "bfloat16")]
CALIBRATION = Path(__file__).resolve().parents[1] / "DESIGN.md"   # English prose, for a tokenizer of 384 ids
HELD_OUT = Path(__file__).resolve().parents[1] / "README.md"


def make_tokenizer_dir(path: Path) -> Path:
    make_tokenizer(path, 384)
    return path


@pytest.fixture
def rng():
    seed = int(os.environ.get("LLMIRC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"LLMIRC_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gptq_with_identity_hessian_is_a_searched_round_to_nearest(rng, scheme):
    """H = I: nothing to spread; each group's scale is searched for the least squared error, so
    no group is worse than round to nearest's."""
    k = 192
    w = rng.standard_normal((24, k)).astype(np.float32)
    rtn, got = quant.quantize(w, scheme), quant.gptq(w, np.eye(k), scheme)
    assert rtn.keys() == got.keys() and all(got[p].shape == rtn[p].shape for p in rtn)
    group_error = lambda parts: ((quant.dequantize(parts, scheme, k) - w) ** 2).reshape(  # noqa: E731
        24, -1, scheme.group_size).sum(-1)
    assert np.all(group_error(got) <= group_error(rtn) * (1 + 1e-6))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gptq_lowers_the_output_error(rng, scheme):
    """Correlated inputs with channels of different scales (as LLM activations have), 192
    inputs: a partial last block of 128 columns."""
    k = 192
    x = rng.standard_normal((800, k)) @ rng.standard_normal((k, k)) * 0.2 + rng.standard_normal((800, k))
    x *= np.exp(rng.standard_normal(k))
    w = rng.standard_normal((40, k)).astype(np.float32)
    error = lambda parts: np.linalg.norm(x @ (quant.dequantize(parts, scheme, k) - w).T)  # noqa: E731
    assert error(quant.gptq(w, x.T @ x, scheme)) < 0.95 * error(quant.quantize(w, scheme))


def test_gptq_dead_inputs_and_errors(rng):
    """An input never seen (zero row and column of H) gets weight 0; a mis-shaped H is refused."""
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((200, 64))
    x[:, 5] = 0
    parts = quant.gptq(w, x.T @ x, quant.Scheme(4, 32))
    assert np.all(quant.dequantize(parts, quant.Scheme(4, 32), 64)[:, 5] == 0)
    with pytest.raises(ValueError, match="Hessian of shape"):
        quant.gptq(w, np.eye(32), quant.Scheme(4, 32))


@pytest.mark.parametrize("zero", quant.ZEROS)
@pytest.mark.parametrize("value, message", [(1e6, "overflow float16 scales"), (np.inf, "NaN or infinite"),
                                            (np.nan, "NaN or infinite")])
def test_weights_the_scales_cannot_hold_are_refused(rng, zero, value, message):
    """Round to nearest and GPTQ refuse what would be stored as NaN codes; float32 scales hold 1e6."""
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[2, 7] = value
    for quantize in (lambda s: quant.quantize(w, s), lambda s: quant.gptq(w, np.eye(64), s)):
        with pytest.raises(ValueError, match=message):
            quantize(quant.Scheme(4, 32, "float16", zero))
    if np.isfinite(value):
        s = quant.Scheme(4, 32, "float32", zero)
        assert np.isfinite(quant.dequantize(quant.quantize(w, s), s, 64)).all()


def test_windows():
    ids = list(range(1000))
    assert [len(w) for w in windows(ids[:600], 256)] == [256, 256, 88]
    assert [len(w) for w in windows(ids[:520], 256)] == [256, 256]  # a tail under 16 tokens is dropped
    assert [len(w) for w in windows(ids[:10], 256)] == [10]


def test_read_token_ids(tmp_path):
    """The first N ids of a file are those of the whole text, from a prefix of it (a huge file is
    not read whole); a file shorter than asked gives all its ids."""
    tokenizer = Tokenizer.from_bundle_dir(make_tokenizer_dir(tmp_path))
    text = CALIBRATION.read_text() * 8  # ~280 kB
    path = tmp_path / "text.txt"
    path.write_text(text)
    longest = []

    def encode(t: str) -> list[int]:
        longest.append(len(t))
        return tokenizer.encode(t, add_special_tokens=False)

    everything = tokenizer.encode(text, add_special_tokens=False)
    for n in (16, 1000, 5000):
        longest.clear()
        assert read_token_ids(path, encode, n) == everything[:n]
        assert max(longest) < len(text) / 4
    assert read_token_ids(path, encode, len(everything) + 5) == everything
    path.write_text("two words")
    assert read_token_ids(path, encode, 1000) == tokenizer.encode("two words", add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", {}), ("qwen3", dict(head_dim=32)),
                                            ("mistral", dict(sliding_window=40)), ("gpt2", {})])
def test_calibration_forward_matches_transformers(tmp_path, arch, overrides):
    model = make_checkpoint(tmp_path, arch, tokenizer=True, **overrides)
    linears = [m for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    assert check_hessians(model, tmp_path, tmp_path) == len(linears)


@pytest.mark.slow
def test_calibration_through_quantized_weights(tmp_path):
    """Weights a checkpoint keeps quantized (GGUF Q8_0/Q4_0 next to F16; a GPTQ checkpoint's
    packed linears) are dequantized for the forward; the float ones still get a Hessian."""
    import torch

    from gguf_files import write_gguf
    from test_gptq_awq import write_quantized

    model = make_checkpoint(tmp_path / "hf", "llama", tokenizer=True)
    write_gguf(model, tmp_path / "m.gguf", ("Q8_0", "Q4_0", "F16"))  # loads the stored values into model
    check_hessians(model, tmp_path / "m.gguf", tmp_path / "hf")
    model = make_checkpoint(tmp_path / "hf", "llama", tokenizer=True)
    weights = write_quantized(tmp_path / "hf", tmp_path / "gptq", "gptq", 4, 32, sym=True)
    with torch.no_grad():
        for prefix, (w, _, _) in weights.items():
            model.get_submodule(prefix).weight.copy_(torch.from_numpy(w))
    check_hessians(model, tmp_path / "gptq", tmp_path / "hf")


def check_hessians(model, path: Path, tokenizer_dir: Path) -> int:
    """The calibration forward of the checkpoint at `path` gives the Hessians of the inputs of
    `model`'s linears (the float linears: a packed one has none), on the same windows. Returns
    how many linears it checked."""
    import torch

    source = open_source(path)
    ids = Tokenizer.from_bundle_dir(tokenizer_dir).encode(CALIBRATION.read_text(), add_special_tokens=False)
    chunks = windows(ids[:250], 100)  # 100, 100, 50 tokens
    module = source.module()
    run_passes(module, "canonicalize,cse", prefix=source.lowering, tail="dce",
               ctx=make_context(read_weight=source.float32))
    cal = calibrate(module, source, chunks)
    rows: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: rows.setdefault(name, []).append(a[0][0]))
             for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    with torch.no_grad():
        for c in chunks:
            model(torch.tensor(c[None].astype(np.int64)))
    for h in hooks:
        h.remove()
    tied = [n for n in cal.by_weight if n.endswith(("wte.weight", "embed_tokens.weight"))]
    checked = 0
    for name, xs in rows.items():
        weight = f"{name}.weight" if f"{name}.weight" in cal.by_weight or not tied else tied[0]
        if weight not in cal.by_weight:  # packed
            continue
        want = _hessian(torch.cat(xs).double().numpy())
        got = np.asarray(cal.read(cal.hessian_for([weight])), np.float64)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
        checked += 1
    assert checked == len(cal.by_weight) >= 1  # every float linear, the LM head (tied or not) included
    cal.close()
    return checked


@pytest.mark.slow
def test_gptq_bundle(tmp_path):
    ckpt = tmp_path / "ckpt"
    model = make_checkpoint(ckpt, "llama", tokenizer=True, intermediate_size=576)
    emitted = io.StringIO()
    options = dict(quant="int4", quant_method="gptq", calibration=CALIBRATION, calibration_tokens=2048,
                   cpu_variants=("native",))
    compile_model(ckpt, tmp_path / "gptq.llmir", CompileOptions(**options), Progress(None))
    manifest = load(tmp_path / "gptq.llmir").bundle.manifest
    assert any(r.startswith("calibration (GPTQ): ") and "tokens of DESIGN.md" in r for r in manifest["rewrites"])
    assert manifest["calibration"] == {"text_sha256": hashlib.sha256(CALIBRATION.read_bytes()).hexdigest(),
                                       "tokens": 2048, "windows": 4}  # the text by its content, not its path
    compile_model(ckpt, None, CompileOptions(**options, emit="mlir"), Progress(None), stdout=emitted)
    ir = emitted.getvalue()
    # q|k|v, o, gate|up, down per layer and the LM head: each quantize op reads a Hessian
    assert ir.count('"llmir.quantize"(%') == 9 and ir.count('{weight = "calibration.hessian.') >= 9
    assert all(line.count("%") == 3 for line in ir.splitlines() if '"llmir.quantize"' in line)
    # int4 with GPTQ rotates down_proj's input by default, and its Hessian as the input: R H R
    # (hadamard, transpose, hadamard)
    chain = re.findall(r'%(\d+) = "llmir.weight"\(\) <\{weight = "calibration.hessian.\d+"\}> : \(\) -> '
                       r'tensor<576x576xf32>\n\s*%(\d+) = "llmir.hadamard"\(%\1\) <\{block = 64 : i64\}>.*\n'
                       r'\s*%(\d+) = "llmir.transpose"\(%\2\).*\n\s*%(\d+) = "llmir.hadamard"\(%\3\).*\n'
                       r'\s*%\d+ = "llmir.quantize"\(%\d+, %\4\)', ir)
    assert len(chain) == 2, ir  # both layers
    compile_model(ckpt, tmp_path / "rtn.llmir", CompileOptions(quant="int4", cpu_variants=("native",)),
                  Progress(None))
    compile_model(ckpt, tmp_path / "unrotated.llmir", CompileOptions(**options, quant_rotate=False), Progress(None))
    ids = Tokenizer.from_bundle_dir(ckpt).encode(HELD_OUT.read_text(), add_special_tokens=False)[:160]
    ref = hf_logits(model, ids)
    err = {m: np.sqrt(((load(tmp_path / f"{m}.llmir").score(ids) - ref) ** 2).mean() / (ref ** 2).mean())
           for m in ("gptq", "rtn", "unrotated")}
    assert err["gptq"] < 0.9 * err["rtn"] and err["unrotated"] < 0.9 * err["rtn"], err


@pytest.mark.parametrize("head", ["int4", "int8"])
def test_gptq_tied_table_and_head(tmp_path, head):
    """--quant-keep none on a tied model: with the LM head in the table's type they share one GPTQ
    copy (as round to nearest shares one); in another type the table rounds to nearest."""
    model = make_checkpoint(tmp_path, "llama", tokenizer=True, tie_word_embeddings=True)
    ir = {}
    for method in ("rtn", "gptq"):
        emitted = io.StringIO()
        options = CompileOptions(quant="int4", quant_keep=("none",), quant_lm_head=head, quant_method=method,
                                 calibration=CALIBRATION if method == "gptq" else None, calibration_tokens=512,
                                 emit="mlir")
        compile_model(tmp_path, None, options, Progress(None), stdout=emitted)
        ir[method] = [line for line in emitted.getvalue().splitlines() if '"llmir.quantize"' in line]
    assert len(ir["gptq"]) == len(ir["rtn"]) == (9 if head == "int4" else 10)
    table = model.model.embed_tokens.weight.shape
    of_table = [line for line in ir["gptq"] if f"tensor<{table[0]}x{table[1]}xf32>, tensor<{table[1]}x" in line
                or f"(tensor<{table[0]}x{table[1]}xf32>) ->" in line]
    assert [line.count("%") for line in of_table] == ([3] if head == "int4" else [2, 3])  # 3: with a Hessian
