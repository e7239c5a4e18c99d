"""Whole models against Hugging Face transformers (float32) on checkpoints the tests make.

For each architecture and each config option that changes the math: greedy tokens equal for
32 new tokens on a batch of prompts of different lengths (a divergence only where the
reference's top two logits are nearly tied), and `score` logits within 1e-4 relative.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from helpers import check_greedy, hf_greedy, hf_logits, make_checkpoint
from llmirc.driver import CompileOptions, Progress, compile_model
from llmirc.errors import RuntimeLimitError
from llmirc.runtime import load
from llmirc.runtime.tokenizer import TextStream

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
PROMPTS = [[0, 5, 9, 200, 17], list(range(2, 19)), [0] + [(7 * i + 3) % 380 for i in range(40)]]

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-headdim-bias": ("llama", dict(num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True)),
    "llama-tied-linear-rope": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("llama", dict(rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-yarn-gelu": ("llama", dict(hidden_act="gelu_pytorch_tanh", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    # Phi-3 style: original_max_position_embeddings at the top level, where transformers reads it first.
    "llama-yarn-original-top-level": ("llama", dict(original_max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})),
    "mistral-sliding": ("mistral", dict(sliding_window=8)),
    "gpt2": ("gpt2", {}),
    "gpt2-untied-relu-layer-scaled": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu",
                                                   scale_attn_by_inverse_layer_idx=True)),
    "qwen2-tied-sliding": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                                         max_window_layers=1)),
    # q_norm and k_norm; head_dim 32 (not hidden / heads), as Qwen3's checkpoints set it
    "qwen3-tied-headdim": ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
    "qwen3-bias-sliding": ("qwen3", dict(attention_bias=True, use_sliding_window=True, sliding_window=6,
                                         max_window_layers=1)),
    # fused qkv_proj and gate_up_proj; Phi-3-mini-4k's sliding window on every layer
    "phi3-sliding": ("phi3", dict(sliding_window=7)),
    # Phi-4-mini's kind: partial rotary, longrope (its short factors: the context stops at 128), tied head
    "phi3-longrope-partial-tied": ("phi3", dict(partial_rotary_factor=0.5, tie_word_embeddings=True,
                                                original_max_position_embeddings=128, rope_parameters={
                                                    "rope_type": "longrope", "short_factor": [1.0, 1.4, 2.1, 3.3],
                                                    "long_factor": [1.5, 3.0, 6.0, 12.0], "rope_theta": 10000.0})),
    # (1 + w) norms, sandwich norms, q/k norms, the scaled embedding and tied head, query_pre_attn_scalar (256, not
    # head_dim), a local rotary table on the sliding layers and a global linear-scaled one on the full layer
    "gemma3-sliding-local-rope": ("gemma3", dict(num_hidden_layers=3, sliding_window=5, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Gemma 2: Gemma 3's layer without q/k norms, sliding and full layers alternating, soft-capped attention scores
    # and logits (caps small enough to bend this model's scores and logits: the test fails without them)
    "gemma2-softcap-sliding": ("gemma2", dict(num_hidden_layers=3, sliding_window=5, attn_logit_softcapping=1.0,
                                              final_logit_softcapping=2.0)),
    # Gemma 3 with both caps set: transformers 5.24 caps its logits but not its attention scores (Gemma3Attention
    # reads attn_logit_softcapping and never applies it), as llama.cpp's gemma3 does; a cap of 1 would bend them
    "gemma3-softcaps": ("gemma3", dict(num_hidden_layers=2, sliding_window=5, attn_logit_softcapping=1.0,
                                       final_logit_softcapping=2.0)),
    # NoPE layers (every 2nd: no rotary embedding), sliding there (use_sliding_window), q/k/v/o and MLP biases, tied
    "smollm3-nope-sliding-bias": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=2,
                                                  use_sliding_window=True, sliding_window=5, attention_bias=True,
                                                  mlp_bias=True)),
    # sliding_attention layers without use_sliding_window: SmolLM3Model's masks still slide there
    "smollm3-layer-types-without-use": ("smollm3", dict(num_hidden_layers=4, sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "full_attention", "sliding_attention"])),
}


def compile_to(ckpt, out, **options):
    compile_model(ckpt, out, CompileOptions(cpu_variants=("native",), **options), Progress(None))
    return out


def check_model(model, bundle, prompts=PROMPTS, **load_options):
    compiled = load(bundle, **load_options)
    ours = compiled.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, got in zip(prompts, ours):
        check_greedy(model, prompt, got, hf_greedy(model, prompt, NEW_TOKENS))
    seq = prompts[-1] + ours[-1]
    ref = hf_logits(model, seq)
    got = compiled.score(seq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    return compiled


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    model = make_checkpoint(tmp_path / "ckpt", arch, **overrides)
    compiled = check_model(model, compile_to(tmp_path / "ckpt", tmp_path / "m.llmir"))
    facts = compiled.bundle.manifest["model"]  # (what inspect shows)
    if arch == "gemma2":
        assert (facts["attention_softcap"], facts["logits_softcap"]) == (1.0, 2.0)
    if case == "smollm3-nope-sliding-bias":  # (every 2nd layer without rope)
        assert (facts["rope_layers"], facts["num_layers"]) == (2, 4)


def test_longrope_tables_by_the_bundles_context(tmp_path):
    """Phi-3's longrope: a bundle within original_max_position_embeddings (the default context) has the
    short factors' table, one of a longer --max-model-len the long factors' (llama.cpp's choice by its
    context); each equals transformers where transformers takes the same table (by the sequence's
    length: short up to 64 tokens here, long past them)."""
    model = make_checkpoint(tmp_path / "ckpt", "phi3", original_max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.9, 2.8, 4.0, 5.6, 7.7, 10.0],
        "long_factor": [1.5, 2.9, 5.1, 9.0, 15.0, 26.0, 44.0, 70.0]})
    short = load(compile_to(tmp_path / "ckpt", tmp_path / "short.llmir"))
    long = load(compile_to(tmp_path / "ckpt", tmp_path / "long.llmir", max_model_len=256))
    assert (short.max_context, long.max_context) == (64, 256)
    for compiled, n in ((short, 60), (long, 200)):
        seq = [(13 * i + 7) % 380 for i in range(n)]
        ref = hf_logits(model, seq)
        np.testing.assert_allclose(compiled.score(seq), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    seq = list(range(3, 63))  # (within 64 tokens the long table is not transformers')
    assert np.abs(long.score(seq) - hf_logits(model, seq)).max() > 1e-2


def test_gemma3_multimodal_checkpoint_compiles_as_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (gemma-3-4b and larger): the text model under the names transformers
    saves it with (language_model.model.*), its config from text_config; the same logits as the whole model's
    on text, and a note that the image model is left out."""
    import torch
    import transformers

    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                         sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                         initializer_range=0.08)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=383, boi_token_index=381, eoi_token_index=382)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # (zeros at init: 1 + w would not show w applied)
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ckpt")
    notes = io.StringIO()
    options = CompileOptions(cpu_variants=("native",), kv_cache_dtype="float32")
    compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", options, Progress(None, notes))
    assert "multimodal checkpoint: compiled as its text model (34 tensors of the image model left out" in \
        notes.getvalue(), notes.getvalue()
    seq = [2] + [(7 * i + 3) % 380 for i in range(30)]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
    got = load(tmp_path / "m.llmir").score(seq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_greedy_decode_runs_match_single_steps(tmp_path):
    """Multi-step decode in the library (runtime.c's llmir_greedy_decode, 8 steps a call by default)
    against one step per call: the same tokens for a batch whose sequences cross KV blocks, and for
    lengths that end runs early; the runs happen."""
    make_checkpoint(tmp_path / "ckpt", "llama")
    compiled = load(compile_to(tmp_path / "ckpt", tmp_path / "m.llmir"))
    calls = []
    greedy = compiled.executor.forward_greedy
    compiled.executor.forward_greedy = lambda inputs, steps: calls.append(steps) or greedy(inputs, steps)
    prompts, lengths = PROMPTS + [list(range(30, 44))], (9, 23, 31, 3)
    compiled.engine.num_scheduler_steps = 1
    alone = [compiled.generate([p], max_new_tokens=40, ignore_eos=True)[0] for p in prompts]
    assert calls == []
    compiled.engine.num_scheduler_steps = 8
    assert compiled.generate(prompts, max_new_tokens=40, ignore_eos=True) == alone and max(calls) == 8
    assert [compiled.generate([p], max_new_tokens=n, ignore_eos=True)[0] for p, n in zip(prompts, lengths)] == \
        [a[:n] for a, n in zip(alone, lengths)]
    # the last step's inputs are checked too: position 16 needs a second block this table lacks
    bs = compiled.executor.block_size
    one_block = ([5], [bs - 1], [bs - 1], [[0]], [bs], [0, 1], [0])
    assert len(greedy(one_block, 1)) == 1
    with pytest.raises(RuntimeLimitError, match="blocks"):
        greedy(one_block, 2)


def test_a_failed_generate_leaves_the_model_usable(tmp_path, monkeypatch):
    """Model.generate and generate_stream step the engine in the caller's thread: a failure past the forward
    (the scheduler's commit, the detokenizer and its stop-string check) raises from that call, aborts its
    requests and frees their KV blocks, and the next generate gives a fresh model's tokens (every later call
    raised "commit() the previous step"). Leaving a stream early (break, the consumer's exception) frees its
    blocks too."""
    make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True)
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")
    prompts = ["the quick brown fox", "compilers turn programs"]
    with load(bundle) as fresh:
        want = fresh.generate(prompts, max_new_tokens=12, ignore_eos=True)
    model = load(bundle, kv_cache_tokens=256, num_scheduler_steps=1)
    free = model.scheduler.allocator.num_available
    commit, add = model.scheduler.commit, TextStream.add

    def failing(original, exc):
        calls = []

        def call(*args):
            calls.append(1)
            if len(calls) == 3:
                raise exc
            return original(*args)
        return call
    for name, target, fault, run in (
            ("commit", model.scheduler, failing(commit, KeyError("commit bug")),
             lambda: model.generate(prompts, max_new_tokens=12, ignore_eos=True)),
            ("add", TextStream, failing(add, ValueError("detokenizer bug")),
             lambda: list(model.generate_stream(prompts, max_new_tokens=12, ignore_eos=True, stop=["zz"])))):
        monkeypatch.setattr(target, name, fault)
        with pytest.raises((KeyError, ValueError), match="bug"):
            run()
        monkeypatch.undo()
        assert model.engine.error is None and model.engine.num_requests == 0, name
        assert model.scheduler.allocator.num_available == free, name
        assert model.generate(prompts, max_new_tokens=12, ignore_eos=True) == want, name
    for _ in model.generate_stream(prompts, max_new_tokens=12, ignore_eos=True):
        break
    assert model.engine.num_requests == 0 and model.scheduler.allocator.num_available == free
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in model.generate_stream(prompts, max_new_tokens=12, ignore_eos=True):
            raise RuntimeError("consumer")
    assert model.engine.num_requests == 0 and model.scheduler.allocator.num_available == free
    assert model.generate(prompts, max_new_tokens=12, ignore_eos=True) == want


def test_a_sequence_gets_the_same_logprobs_whatever_its_batch(tmp_path):
    """Batch invariance end to end (README): a 700-token sequence (3 key chunks of attention) sampled
    with a seed gets the same tokens and logprobs, bit for bit, alone on one thread (decode attention
    splits its keys in parts) as beside 3 others that arrive with it, on 2 threads with a 24-token
    step budget (its prompt is then prefilled in other chunks, decode steps mix with other prompts'
    chunks, and 4 sequences decoding are enough units not to split); logprobs are compared, since
    equal tokens could hide a drift. (The KV cache fits all four: with the default, one context's
    worth, the others would wait.) Before fixed key chunks, it differed from context 512 on."""
    make_checkpoint(tmp_path / "ckpt", "llama", max_position_embeddings=1024)
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")
    target = [(11 * i + 5) % 380 for i in range(90)]
    params = dict(max_new_tokens=610, temperature=0.8, seed=7, ignore_eos=True, logprobs=1)

    def run(prompts, **options):
        with load(bundle, **options) as model:
            events = [e for e in model.generate_stream(prompts, **params) if e.token is not None]
        return [(e.token, e.logprob) for e in events if e.request_id == prompts.index(target)]
    alone = run([target], threads=1)
    assert len(alone) == 610
    # the other prompts' seeds are seed + their index; the target's is seed + 0 in both runs
    crowd = run([target, [0, 3, 9], list(range(40, 97)), [5] * 200], threads=2, max_num_batched_tokens=24,
                max_num_seqs=4, kv_cache_tokens=4096)
    assert crowd == alone


def test_repetition_penalty_matches_transformers(tmp_path):
    """Greedy decoding with a repetition penalty (over the prompt and the output, as generate()'s
    RepetitionPenaltyLogitsProcessor over its input_ids) gives transformers' tokens, three prompts in one
    batch beside a plain greedy one (which keeps its own tokens); where a token differs, the reference's
    penalized top two must be nearly tied."""
    import torch

    from llmirc.runtime.sampling import penalize

    model = make_checkpoint(tmp_path / "ckpt", "llama")
    prompts = [[5, 9, 9, 9, 200], list(range(2, 19)), [(7 * i + 3) % 380 for i in range(40)]]
    with load(compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")) as compiled:
        ours = compiled.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.5)
        plain = compiled.generate(prompts[:1], max_new_tokens=NEW_TOKENS, ignore_eos=True)[0]
    assert ours[0] != plain  # the penalty changed something
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 repetition_penalty=1.5, min_new_tokens=NEW_TOKENS, pad_token_id=None,
                                 eos_token_id=None)[0, len(prompt):].tolist()
        for i, (a, b) in enumerate(zip(got, ref)):
            if a != b:
                row = penalize(hf_logits(model, prompt + ref[:i])[-1].astype(np.float32), prompt, ref[:i], 1.5)
                top2 = np.sort(row)[-2:]
                assert top2[1] - top2[0] < 1e-3 * max(1.0, abs(top2[1])), f"token {i}: ours {a}, reference {b}"
                break


def test_greedy_decode_run_ends_after_a_whole_step_past_the_embedding(tmp_path):
    """runtime.c's llmir_greedy_decode with a stand-in forward: sequence 0's token of step 1 lies past
    the embedding's rows, so the run ends after step 1, with every sequence's token of that step
    written (the engine commits them all) and the next step's inputs advanced by step 0 only."""
    import ctypes

    make_checkpoint(tmp_path / "ckpt", "llama")
    ex = load(compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")).executor
    B, vocab, rows, bs = 3, 8, 6, ex.block_size
    winners, calls = [[1, 2, 3], [7, 4, 5], [1, 1, 1]], []
    logits = np.zeros((B, vocab), np.float32)

    @ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p))
    def forward(dims, ptrs):
        logits[:] = 0
        logits[np.arange(B), winners[len(calls)]] = 1
        calls.append(len(calls))
    ids, pos, lens = np.array([9, 9, 9], np.int32), np.array([4, 4, 4], np.int32), np.array([5, 5, 5], np.int32)
    tables = np.arange(B, dtype=np.int32)[:, None]
    slots = tables[:, 0] * bs + 4
    ptrs = (ctypes.c_void_p * 12)()
    for i, a in enumerate((ids, pos, slots, tables, lens)):
        ptrs[i] = a.ctypes.data
    ptrs[9] = logits.ctypes.data
    out = np.full((3, B), -1, np.int32)
    done = ex._greedy(ctypes.cast(forward, ctypes.c_void_p), (ctypes.c_int64 * 5)(B, B, B, 1, B), ptrs, 3, vocab,
                      rows, bs, out.ctypes.data)
    assert done == 2 and calls == [0, 1] and out[:2].tolist() == winners[:2] and out[2].tolist() == [-1] * B
    assert ids.tolist() == winners[0] and pos.tolist() == [5] * B and lens.tolist() == [6] * B


HALF_CASES = [(arch, dtype) for arch in ("llama", "qwen2", "qwen3", "mistral", "gpt2") for dtype in ("bfloat16", "float16")]
HALF_CASES.append(("gemma3", "bfloat16"))  # Gemma's norm weights: 1 + w computed in float32 from the bf16 w
HALF_KV_TOP1 = 0.99     # top-1 agreement with a bf16/f16 KV cache over 256 positions, at least
HALF_KV_LOGITS = 0.03   # and logits within this fraction of the largest reference logit


@pytest.mark.parametrize("arch,dtype", HALF_CASES)
def test_half_precision_checkpoints(tmp_path, arch, dtype):
    """bf16/f16 checkpoints keep their precision in the bundle (the reference is transformers in
    float32 on the same, exactly widened, weights). With an f32 KV cache the model computes what
    the reference does (1e-4); with the default half KV cache, K/V are rounded once."""
    overrides = dict(sliding_window=8) if arch == "mistral" else {}
    model = make_checkpoint(tmp_path / "ckpt", arch, dtype=dtype, **overrides)
    exact = compile_to(tmp_path / "ckpt", tmp_path / "f32kv.llmir", kv_cache_dtype="float32")
    compiled = check_model(model, exact, prompts=PROMPTS[:1])
    assert compiled.bundle.manifest["weights"]["dtypes"]["model.embed_tokens.weight" if arch != "gpt2"
                                                         else "transformer.wte.weight"] == dtype
    seq = [int(t) for t in np.random.default_rng(0).integers(0, 384, 256)]
    ref = hf_logits(model, seq)  # (a 256-token prefill: bf16 linears take AMX tiles where the host has them)
    np.testing.assert_allclose(compiled.score(seq), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    half = load(compile_to(tmp_path / "ckpt", tmp_path / "m.llmir"))
    assert half.bundle.manifest["kv_cache"]["dtype"] == dtype
    got = half.score(seq)
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= HALF_KV_TOP1
    np.testing.assert_allclose(got, ref, atol=HALF_KV_LOGITS * np.abs(ref).max())


def test_dtype_options(tmp_path):
    """--dtype bfloat16 on an f32 checkpoint stores the matrices (linear, embedding) in bf16, rounded
    as torch rounds them, and norm weights in f32; --dtype float32 on a bf16 checkpoint widens them."""
    import torch

    model = make_checkpoint(tmp_path / "f32", "llama")
    bundle = load(compile_to(tmp_path / "f32", tmp_path / "a.llmir", dtype="bfloat16", kv_cache_dtype="float32"))
    assert set(bundle.bundle.manifest["weights"]["dtypes"].values()) == {"bfloat16", "float32"}
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.bfloat16).float())
    check_model(model, bundle.bundle.root, prompts=PROMPTS[:1])

    model = make_checkpoint(tmp_path / "bf16", "llama", dtype="bfloat16")
    bundle = load(compile_to(tmp_path / "bf16", tmp_path / "b.llmir", dtype="float32"))
    assert set(bundle.bundle.manifest["weights"]["dtypes"].values()) == {"float32"}
    assert bundle.bundle.manifest["kv_cache"]["dtype"] == "float32"
    check_model(model, bundle.bundle.root, prompts=PROMPTS[:1])


def test_sharded_checkpoint_chunked_prefill_small_cache(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "qwen2", max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")
    # A token budget smaller than the prompts forces chunked prefill mixed with decode steps;
    # a cache of 8 blocks of 16 tokens forces the third prompt to wait for the first two.
    check_model(model, bundle, max_num_batched_tokens=8, max_num_seqs=4, kv_cache_tokens=128)


def test_without_fusion_passes_same_result(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "llama")
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir", passes="canonicalize,paged-kv{block-size=4}")
    compiled = check_model(model, bundle, prompts=PROMPTS[1:2])
    assert compiled.block_size == 4


def test_baseline_cpu_library_matches(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "mistral", sliding_window=8)
    bundle = tmp_path / "m.llmir"
    compile_model(tmp_path / "ckpt", bundle, CompileOptions(cpu_variants=("baseline",)), Progress(None))
    check_model(model, bundle, prompts=PROMPTS[2:])


def test_a_bundle_recompiled_in_place_loads_its_new_library(tmp_path):
    """A process maps a library path once: loading, recompiling another model to the same path and
    loading again must run the new kernels (the library is named by its content), not fail on the
    old library's shapes or run its code."""
    make_checkpoint(tmp_path / "a", "llama")
    first = load(compile_to(tmp_path / "a", tmp_path / "m.llmir"))
    model = make_checkpoint(tmp_path / "b", "llama", seed=1, num_hidden_layers=3)
    second = check_model(model, compile_to(tmp_path / "b", tmp_path / "m.llmir"), prompts=PROMPTS[:1])
    assert first.executor.lib._handle != second.executor.lib._handle


def test_two_loads_of_a_bundle_keep_their_own_thread_counts(tmp_path):
    """Both map the same library, whose thread count is global: each call runs with its own."""
    make_checkpoint(tmp_path / "ckpt", "llama")
    bundle = compile_to(tmp_path / "ckpt", tmp_path / "m.llmir")
    one, two = load(bundle, threads=1), load(bundle, threads=2)
    assert one.executor.lib._handle == two.executor.lib._handle  # one library in memory
    assert (one.executor.threads, two.executor.threads) == (1, 2)
    for model, want in ((one, 1), (two, 2), (one, 1)):
        model.score(PROMPTS[0])
        assert model.executor.lib.llmir_num_threads() == want
