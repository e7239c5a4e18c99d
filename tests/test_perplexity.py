"""`llmirc eval-ppl` against Hugging Face's perplexity guide computed with transformers."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import CORPUS, make_checkpoint
from llmirc.cli import cli
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import LlmircError, UsageError
from llmirc.runtime.perplexity import perplexity, windows


def test_windows_score_each_token_once():
    for n, context, stride in ((100, 16, 8), (100, 16, 16), (17, 16, 3), (5, 16, 8), (64, 2, 1)):
        scored = [t for _, end, first in windows(n, context, stride) for t in range(first, end)]
        assert len(scored) == len(set(scored)) and all(0 < t < n for t in scored)
        for begin, end, first in windows(n, context, stride):
            assert end - begin <= context and begin < first
            if stride < context and first > 1:
                assert first - begin >= context - stride  # enough context before each scored token
        if stride < context:
            assert sorted(scored) == list(range(1, n))


def hf_guide_perplexity(model, ids, context, stride):
    """The loop of Hugging Face's perplexity guide (labels -100 where not scored, loss per window)."""
    import torch

    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.slow
def test_eval_ppl_matches_the_hf_guide(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True)
    bundle = tmp_path / "m.llmir"
    compile_model(tmp_path / "ckpt", bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS[:12]), encoding="utf-8")
    from llmirc.runtime import load

    ids = load(bundle).tokenizer.encode(text.read_text())
    for context, stride in ((32, 16), (32, 32), (64, 5)):
        result = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", str(text), "--context", str(context),
                                          "--stride", str(stride), "--json"])
        assert result.exit_code == 0, result.output
        ours = json.loads(result.output)
        ref, count = hf_guide_perplexity(model, ids, context, stride)
        assert ours["tokens"] == count and ours["target"].startswith("cpu-")
        assert np.isclose(ours["perplexity"], ref, rtol=1e-4), (ours, ref)
    piped = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", "-", "--context", "64", "--stride", "5",
                                     "--json"], input=text.read_text())
    assert piped.exit_code == 0, piped.output
    piped = json.loads(piped.output)  # '-': standard input, the same text
    assert piped["text"] == "-" and ours["text"] == str(text.resolve()) and ours["bundle"] == str(bundle.resolve())
    assert {k: v for k, v in piped.items() if k not in ("text", "seconds")} == \
        {k: v for k, v in ours.items() if k not in ("text", "seconds")}
    assert ours["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest() and ours["seconds"] > 0
    short, whole = tmp_path / "short.llmir", 100
    compile_model(tmp_path / "ckpt", short, CompileOptions(cpu_variants=("native",), max_model_len=whole), Progress(None))
    default = CliRunner().invoke(cli, ["eval-ppl", str(short), "--text", str(text), "--json"])
    assert default.exit_code == 0 and json.loads(default.output)["context"] == whole, default.output
    too_long = CliRunner().invoke(cli, ["eval-ppl", str(short), "--text", str(text), "--context", str(whole + 1)])
    assert isinstance(too_long.exception, LlmircError) and "exceeds the model's context" in str(too_long.exception)
    absurd = CliRunner().invoke(cli, ["eval-ppl", str(short), "--text", str(text), "--context", str(10 ** 11)])
    assert str(absurd.exception) == f"--context {10 ** 11} exceeds the model's context of {whole} tokens"  # (not
    # a KV cache of 10^11 tokens that cannot be allocated)
    # a --stride longer than the window only because this model's context is short: exit 1, saying so
    stride = CliRunner().invoke(cli, ["eval-ppl", str(short), "--text", str(text), "--stride", str(whole + 1)])
    assert type(stride.exception) is LlmircError and str(stride.exception) == \
        f"--stride {whole + 1} exceeds the window of {whole} tokens (the model's context, shorter than --context's " \
        "default of 512)"
    bad = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", str(text), "--context", "64", "--stride", "128"])
    assert isinstance(bad.exception, UsageError) and \
        str(bad.exception) == "--stride 128 exceeds the window of 64 tokens (--context)", bad.output  # exit 2
    (tmp_path / "few.txt").write_text(CORPUS[0])  # fewer tokens than a window: said, as not comparable
    few = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", str(tmp_path / "few.txt"), "--context", "64"])
    assert few.exit_code == 0 and re.search(r"note: the text's (\d+) tokens are fewer than a window's 64: one window "
                                            r"of \1 tokens", few.output), few.output
    # fewer because --max-tokens kept fewer: said so (it blamed "the text's 8 tokens")
    cut = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", str(text), "--context", "64",
                                   "--max-tokens", "8"])
    assert cut.exit_code == 0 and "note: the 8 tokens of --max-tokens are fewer than a window's 64" in cut.output, \
        cut.output
    (tmp_path / "empty.txt").write_text("\n")
    empty = CliRunner().invoke(cli, ["eval-ppl", str(bundle), "--text", str(tmp_path / "empty.txt")])
    assert isinstance(empty.exception, LlmircError) and \
        str(empty.exception) == f"--text {tmp_path}/empty.txt: the text is empty"  # (not "1 token": a BOS)



def test_perplexity_past_float64_is_infinite():
    """A mean NLL past log(float64 max) (a model sure of the wrong tokens) gives an infinite
    perplexity, null in JSON; it was an OverflowError, an internal error."""
    row = np.zeros((1, 4), np.float32)
    row[0, 0] = 2000.0  # every target is token 1: NLL 2000 nats each
    result = perplexity(lambda ids: np.tile(row, (len(ids), 1)), [1, 1, 1, 1], 4, 2)
    assert result.perplexity == math.inf and result.nll == pytest.approx(2000.0)
    assert result.to_json()["perplexity"] is None and json.loads(json.dumps(result.to_json()))["nll"] > 709


def test_max_tokens_tokenizes_a_prefix_only():
    """eval-ppl --max-tokens N encodes a prefix of the text (cut at a line's end, well past N
    tokens), with the first N tokens the whole text's; without N, or with a short text, all of it."""
    from llmirc.cli import _first_tokens

    text = "".join(f"{' '.join(CORPUS[i % len(CORPUS)] for i in range(j, j + 9))}\n" for j in range(3000))
    calls = []

    def encode(s):
        calls.append(len(s))
        return [ord(c) for c in s.replace(" ", "")]  # (a stand-in: a token per non-space character)
    full = encode(text)
    for n in (2, 100, 5000, None, len(full) + 5):
        calls.clear()
        assert _first_tokens(encode, text, n) == full[:n]
        assert (max(calls) < len(text)) == (n is not None and n <= 5000), (n, calls)
