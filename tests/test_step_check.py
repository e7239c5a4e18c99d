"""Indices that reach compiled code, each one past its bound, through the API and the CLI; and the
context a bundle states, never more than its weights support (llmirc/frontend/context.py).

Bundles: a GPT-2 with a 32-row position table exported to ONNX without a config.json (the issue's
case: the context comes from the table) and small hand-built ONNX graphs whose positions go
through a Gather or a Slice of a constant table, or through no table at all (the default context).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import export_onnx, hf_logits, make_checkpoint
from onnx_graphs import Graph, save
from test_cli_errors import assert_user_error, llmirc
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import LlmircError, RuntimeLimitError
from llmirc.frontend.context import DEFAULT_CONTEXT
from llmirc.runtime import load
from llmirc.runtime.step_check import StepLimits, checked_inputs

# its module-scoped fixtures build once: the module runs on one xdist worker (pyproject.toml)
pytestmark = pytest.mark.xdist_group("step-check")

CONTEXT = 32


def compile_to(src, out, **options):
    compile_model(src, out, CompileOptions(cpu_variants=("native",), **options), Progress(None))
    return out


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(transformers model, bundle) of a GPT-2 with n_positions=32, exported without config.json."""
    root = tmp_path_factory.mktemp("gpt2")
    model = make_checkpoint(root / "hf", "gpt2", max_position_embeddings=CONTEXT)
    onnx_path = export_onnx(model, root / "onnx" / "model.onnx")
    assert not (onnx_path.parent / "config.json").exists()
    return model, compile_to(onnx_path, root / "m.llmir")


def test_context_comes_from_the_position_table(gpt2):
    model, bundle = gpt2
    info = json.loads((bundle / "manifest.json").read_text())["model"]
    assert info["max_position_embeddings"] == CONTEXT
    assert "position table" in info["context_from"] and f"{CONTEXT} rows" in info["context_from"]
    r = llmirc("inspect", bundle)
    assert r.returncode == 0 and f"context {CONTEXT} (position table" in r.stdout, r.stdout
    ids = [(7 * i + 3) % 380 for i in range(CONTEXT)]  # the whole context is right
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(load(bundle).score(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_requests_past_the_context_are_refused(gpt2):
    _, bundle = gpt2
    model = load(bundle)
    with pytest.raises(RuntimeLimitError, match=f"context of {CONTEXT} tokens"):
        model.score(list(range(CONTEXT + 1)))
    with pytest.raises(RuntimeLimitError, match=f"context of {CONTEXT} tokens"):
        model.generate([list(range(30))], max_new_tokens=3)
    assert len(model.generate([list(range(30))], max_new_tokens=2)[0]) == 2
    assert_user_error(llmirc("run", bundle, "--token-ids", ",".join(map(str, range(30))), "--max-new-tokens", "8",
                             "--json"), f"context of {CONTEXT} tokens")


# One past each bound of a forward step, straight into the executor (the scheduler never builds these).
# Each edit takes the step's arrays and the model; the bound itself (one less) must pass.
PAST_BOUND = {
    "token-id": (lambda s, m: s["token_ids"].__setitem__(-1, m.vocab_size), "embedding table's 384 rows"),
    "negative-token-id": (lambda s, m: s["token_ids"].__setitem__(0, -1), "token id -1 is negative"),
    "position": (lambda s, m: (s["positions"].__setitem__(-1, CONTEXT), s["seq_lens"].__setitem__(0, CONTEXT + 1)),
                 "context of 32 tokens"),
    "position-past-its-sequence": (lambda s, m: s["positions"].__setitem__(-1, 4), "not below its sequence"),
    "slot": (lambda s, m: s["slot_mapping"].__setitem__(-1, m.num_blocks * m.block_size), "KV cache's"),
    "block-table-entry": (lambda s, m: s["block_tables"].__setitem__((0, 0), m.num_blocks), "KV cache's"),
    "block-table-too-short": (lambda s, m: s.update(block_tables=s["block_tables"][:, :0]), "needs 1 blocks"),
    "seq-len": (lambda s, m: s["seq_lens"].__setitem__(0, CONTEXT + 1), r"sequence length \(seq_lens\) 33"),
    "logits-index": (lambda s, m: s["logits_indices"].__setitem__(-1, 4), "logits index 4"),
    "int32-overflow": (lambda s, m: s.update(token_ids=s["token_ids"].astype(np.int64) + 2**32),
                       "int32 range"),
}
AT_BOUND = {
    "token-id": lambda s, m: s["token_ids"].__setitem__(-1, m.vocab_size - 1),
    "position": lambda s, m: (s["positions"].__setitem__(-1, CONTEXT - 1), s["seq_lens"].__setitem__(0, CONTEXT),
                              s.update(block_tables=np.arange(2, dtype=np.int32)[None])),
    "slot": lambda s, m: s["slot_mapping"].__setitem__(-1, m.num_blocks * m.block_size - 1),
    "block-table-entry": lambda s, m: s["block_tables"].__setitem__((0, 0), m.num_blocks - 1),
    "negative-slot-is-padding": lambda s, m: s["slot_mapping"].__setitem__(-1, -1),
}


def _step(model) -> dict:
    step = next(model.scheduler.score_steps([1, 2, 3, 4]))
    return {k: np.array(getattr(step, k)) for k in ("token_ids", "positions", "slot_mapping", "block_tables",
                                                  "seq_lens", "query_start_loc", "logits_indices")}


def _forward(model, s: dict):
    return model.executor.forward(s["token_ids"], s["positions"], s["slot_mapping"], s["block_tables"],
                                  s["seq_lens"], s["query_start_loc"], s["logits_indices"])


@pytest.mark.parametrize("case", PAST_BOUND)
def test_index_past_its_bound_is_refused_before_the_call(gpt2, case):
    model = load(gpt2[1], kv_cache_tokens=CONTEXT)
    edit, needle = PAST_BOUND[case]
    s = _step(model)
    edit(s, model)
    with pytest.raises(LlmircError, match=needle) as e:
        _forward(model, s)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", AT_BOUND)
def test_index_at_its_bound_runs(gpt2, case):
    model = load(gpt2[1], kv_cache_tokens=CONTEXT)
    s = _step(model)
    AT_BOUND[case](s, model)
    assert np.isfinite(_forward(model, s)).all()


def test_token_id_past_the_vocabulary_through_the_api(gpt2):
    with pytest.raises(RuntimeLimitError, match="vocabulary of 384"):
        load(gpt2[1]).generate([[1, 384]], max_new_tokens=1)


# -- the step checks alone ----------------------------------------------------------------------

LIMITS = StepLimits(token_rows=10, token_what="the vocabulary", max_position=8, position_what="the context",
                    max_context=8, num_blocks=2, block_size=4)


def _inputs(**changes):
    s = dict(token_ids=[1, 2, 3], positions=[0, 1, 2], slot_mapping=[4, 5, 6], block_tables=[[1, 0]],
             seq_lens=[3], query_start_loc=[0, 3], logits_indices=[2])
    s.update(changes)
    return [np.asarray(v) for v in s.values()]


def test_consistent_inputs_pass_as_int32():
    out = checked_inputs(LIMITS, *_inputs())
    assert all(a.dtype == np.int32 and a.flags.c_contiguous for a in out)


INCONSISTENT = {
    "query-start-not-zero": (dict(query_start_loc=[1, 3]), "rise from 0"),
    "query-end-not-T": (dict(query_start_loc=[0, 2]), "rise from 0"),
    "query-decreasing": (dict(query_start_loc=[0, 3, 2, 3], seq_lens=[3, 1, 1], block_tables=[[1], [0], [0]]),
                         "rise from 0"),
    "more-new-tokens-than-seq-len": (dict(seq_lens=[2], positions=[0, 1, 1]), "new tokens but seq_lens 2"),
    "lengths-disagree": (dict(positions=[0, 1]), "one entry per token"),
    "block-rows": (dict(block_tables=[[1, 0], [0, 1]]), "block_tables must have a row"),
    "float-ids": (dict(token_ids=[1.0, 2.0, 3.0]), "token_ids must be integers"),
    "ids-2d": (dict(token_ids=[[1, 2, 3]]), "token_ids must be 1-D"),
    "seven-inputs": (None, "takes 7 inputs"),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_inconsistent_inputs_are_refused(case):
    changes, needle = INCONSISTENT[case]
    args = _inputs(**changes) if changes is not None else _inputs()[:6]
    with pytest.raises(LlmircError, match=needle):
        checked_inputs(LIMITS, *args)


@pytest.mark.parametrize("name,value,needle", [
    ("token_ids", [[1, 2], [3]], "token_ids is not an array of integers"),  # ragged: numpy cannot make an array
    ("block_tables", [[1, 0], "ab"], "block_tables is not an array of integers"),
    ("seq_lens", np.int32(3), r"seq_lens must be 1-D, got shape \[\]"),  # a scalar is not a 1-element array
    ("block_tables", np.int64(1), r"block_tables must be 2-D, got shape \[\]"),
])
def test_malformed_inputs_are_refused(name, value, needle):
    args = dict(zip(("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
                     "logits_indices"), _inputs()))
    args[name] = value
    with pytest.raises(LlmircError, match=needle) as e:
        checked_inputs(LIMITS, *args.values())
    assert "\n" not in str(e.value)


def test_only_the_blocks_a_sequence_uses_are_checked():
    # Past a sequence's length, block-table padding may hold anything (vLLM pads with -1 or 0).
    checked_inputs(LIMITS, *_inputs(block_tables=[[1, -1]]))
    with pytest.raises(RuntimeLimitError, match="block_tables entry -1 is negative"):
        checked_inputs(LIMITS, *_inputs(block_tables=[[-1, 1]]))


# -- the context a bundle states ------------------------------------------------------------------

def _graph(kind: str, rows: int = 20):
    """Tokens -> logits [1, S, 50] (no attention: compiled as a full-sequence model); positions added from a
    table of `rows` rows (Gather or Slice) or not."""
    g = Graph(C=50, inputs=("input_ids", "position_ids") if kind == "gather" else ("input_ids",))
    x = g.x
    if kind == "gather":
        x = g.op("Add", x, g.op("Gather", g.randn(rows, 50, scale=0.1), "position_ids", axis=0))
    elif kind == "slice":  # a precomputed table cut to the sequence length (old rotary caches, causal masks)
        s = g.op("Unsqueeze", g.seq_len(), g.i64(0))
        x = g.op("Add", x, g.op("Slice", g.randn(rows, 50, scale=0.1), g.i64(0), s, g.i64(0)))
    return g.model(g.matmul(g.op("Sin", x), 50, 50))  # Sin: no llmir kernel, a full-sequence model


@pytest.mark.parametrize("kind,context,why", [("gather", 20, "position table"), ("slice", 20, "position table"),
                                               ("none", DEFAULT_CONTEXT, "default")])
def test_onnx_context_without_config(tmp_path, kind, context, why):
    bundle = compile_to(save(_graph(kind), tmp_path), tmp_path / "m.llmir")
    info = json.loads((bundle / "manifest.json").read_text())["model"]
    assert info["max_position_embeddings"] == context and why in info["context_from"], info
    model = load(bundle)
    assert model.score(list(range(context)) if context < 100 else [1, 2]).shape[1] == 50
    with pytest.raises(RuntimeLimitError, match=f"context of {context}"):
        model.score([1] * (context + 1))


def test_config_cannot_state_more_than_the_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    bundle = compile_to(save(_graph("gather"), tmp_path), tmp_path / "m.llmir")
    info = json.loads((bundle / "manifest.json").read_text())["model"]
    assert info["max_position_embeddings"] == 20 and "config.json max_position_embeddings says 4096" in \
        info["context_from"]


def test_max_model_len(tmp_path):
    src = save(_graph("gather"), tmp_path)
    bundle = compile_to(src, tmp_path / "m.llmir", max_model_len=12)
    info = json.loads((bundle / "manifest.json").read_text())["model"]
    assert (info["max_position_embeddings"], info["context_from"]) == (12, "--max-model-len")
    with pytest.raises(RuntimeLimitError, match="context of 12"):
        load(bundle).score([1] * 13)
    out = tmp_path / "x.llmir"
    assert_user_error(llmirc("compile", src, "-o", out, "-q", "--max-model-len", "21"), "--max-model-len 21",
                      "20 tokens", "position table")
    assert not out.exists()
    assert_user_error(llmirc("compile", src, "-o", out, "-q", "--max-model-len", "0"), "--max-model-len")
    # Without a table, any length may be asked for; the default is only a default.
    bundle = compile_to(save(_graph("none"), tmp_path, "n.onnx"), tmp_path / "n.llmir", max_model_len=5000)
    assert json.loads((bundle / "manifest.json").read_text())["model"]["max_position_embeddings"] == 5000


def test_max_model_len_of_a_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "llama", max_position_embeddings=64)
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir", max_model_len=48)
    assert json.loads((bundle / "manifest.json").read_text())["model"]["max_position_embeddings"] == 48
    with pytest.raises(LlmircError, match="exceeds the 64 tokens .*config.json max_position_embeddings"):
        compile_to(tmp_path / "ckpt", tmp_path / "n.llmir", max_model_len=65)
    assert not (tmp_path / "n.llmir").exists()
