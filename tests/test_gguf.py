"""GGUF input: files the tests write with gguf's GGUFWriter (tests/gguf_files.py) from random
transformers models, compiled and compared against transformers in float32 on the values the file
holds; the NumPy dequantizers bit-exact against gguf.quants; the embedded tokenizer against
transformers' own GGUF tokenizer conversion and the original tokenizer.json; bad files refused
with one line naming the file."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

import gguf
from gguf_files import FLOAT_ONLY, QUANTIZED, bpe_tokenizer_metadata, spm_tokenizer_metadata, write_gguf
from helpers import CORPUS, make_checkpoint, make_tokenizer
from llmirc.errors import CheckpointError
from llmirc.frontend import open_source
from llmirc.frontend.gguf_checkpoint import split_files, unpermute_rows
from llmirc.frontend.gguf_tokenizer import PRE_TOKENIZERS
from llmirc.frontend.gguf_quants import FORMATS, dequantize, unpack
from test_models import check_model, compile_to

TEXTS = CORPUS[:4] + ["  leading spaces and 12345 digits 3.14", "Hello, world!! <s> inside </s>",
                      "tabs\tand\nnewlines\n\n end", "ünïcödé 😀 x", "", "I'm 'quoted' DON'T"]


# -- dequantization -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_is_bit_exact_with_gguf(name):
    fmt, qtype = FORMATS[name], gguf.GGMLQuantizationType[name]
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype] and fmt.type_id == int(qtype)
    rng = np.random.default_rng(fmt.type_id)
    rows, n = 7, 3 * fmt.block_size
    raw = rng.integers(0, 256, size=(rows, n // fmt.block_size * fmt.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.type_size)
    # Finite float16 super-scales of both signs (random bytes would also give inf/nan).
    scale_at = {"Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108]}.get(
        name, [0, 2] if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for at in scale_at:
        blocks[:, at:at + 2] = rng.normal(0, 0.01, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(fmt, raw, n, chunk_rows=3)
    assert ours.dtype == np.float32 and ours.shape == (rows, n)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    u = unpack(fmt, raw, n)
    lo, hi = {"Q8_0": (-128, 127), "Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q6_K": (-32, 31), "Q4_1": (0, 15),
              "Q4_K": (0, 15), "Q5_1": (0, 31), "Q5_K": (0, 31), "Q2_K": (0, 3), "Q3_K": (-4, 3),
              "IQ4_NL": (-127, 113), "IQ4_XS": (-127, 113)}[name]
    assert u.codes.dtype == np.int8 and lo <= u.codes.min() and u.codes.max() <= hi
    assert u.scales.shape == (rows, n // u.group)
    assert (u.offsets is None) == (name in ("Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS"))
    # The codes take every value the format allows (the bit unpacking reaches every bit).
    assert u.codes.min() == lo and u.codes.max() == hi


def test_unpermute_inverts_convert_hf_to_gguf_permute():
    from gguf_files import permute

    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)
    np.testing.assert_array_equal(unpermute_rows(permute(w, 4), 4), w)
    b = np.arange(16)
    np.testing.assert_array_equal(unpermute_rows(permute(b, 2), 2), b)


# -- whole models ---------------------------------------------------------------------------------

CASES = {
    "llama-f32-gqa": ("llama", "F32", {}),
    "llama-f16-mqa-headdim-bias-tied": ("llama", "F16", dict(num_key_value_heads=1, head_dim=32, attention_bias=True,
                                                             mlp_bias=True, tie_word_embeddings=True)),
    "llama-bf16-linear-rope": ("llama", "BF16", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-as-llama-f16": ("mistral", "F16", dict(sliding_window=None)),
    "qwen2-f32-tied-yarn": ("qwen2", "F32", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen3-f16-headdim": ("qwen3", "F16", dict(head_dim=32)),
    "gpt2-bf16": ("gpt2", "BF16", {}),
    # fused attn_qkv and ffn_up; partial rotary; longrope's factors as tensors, its attention factor as metadata
    "phi3-f16-longrope-partial-sliding": ("phi3", "F16", dict(
        partial_rotary_factor=0.5, sliding_window=9, original_max_position_embeddings=128, rope_parameters={
            "rope_type": "longrope", "short_factor": [1.0, 1.4, 2.1, 3.3], "long_factor": [1.5, 3.0, 6.0, 12.0],
            "rope_theta": 10000.0})),
    # q/k permuted as llama's; every 4th layer without rope (llama.cpp's fixed step); q/k/v/o biases
    "smollm3-bf16-nope-bias": ("smollm3", "BF16", dict(num_hidden_layers=4, attention_bias=True)),
    # norms stored as 1 + w, post_attention_norm / ffn_norm / post_ffw_norm, q/k norms; sliding layers with
    # rope.freq_base_swa, the full one with rope.freq_base and linear scaling (the pattern as flags)
    "gemma3-f16-sliding-local-rope": ("gemma3", "F16", dict(
        num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # Gemma 3's layer without q/k norms, every 2nd layer full, soft-capped scores and logits (caps that bend them)
    # (query_pre_attn_scalar: the head size, as llama.cpp scales queries)
    "gemma2-bf16-softcap-sliding": ("gemma2", "BF16", dict(num_hidden_layers=3, sliding_window=6,
                                                           query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                                                           final_logit_softcapping=2.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(tmp_path, case):
    """F16/BF16 tensors keep their type in the bundle; with an f32 KV cache the compiled model computes
    what transformers does in float32 on the same (exactly widened) values."""
    arch, kind, overrides = CASES[case]
    model = make_checkpoint(tmp_path / "ckpt", arch, **overrides)
    path = write_gguf(model, tmp_path / "m.gguf", kind)  # loads the stored (rounded) values into model
    bundle = compile_to(path, tmp_path / "m.llmir", kv_cache_dtype="float32")
    compiled = check_model(model, bundle, prompts=[[0, 5, 9, 200, 17], list(range(2, 30))])
    stored = compiled.bundle.manifest["weights"]["dtypes"]
    assert stored["transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"] == \
        {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[kind]


def test_original_context_defaults_to_the_context_length(tmp_path, monkeypatch):
    """A phi3 longrope file without rope.scaling.original_context_length: llama.cpp takes the trained context
    length (its n_ctx_orig_yarn default); it was refused as a missing key."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_scaling_orig_ctx_len", lambda self, value: None)
    model = make_checkpoint(tmp_path / "ckpt", "phi3", original_max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "rope_theta": 10000.0})
    src = open_source(write_gguf(model, tmp_path / "m.gguf"))
    assert src.config["original_max_position_embeddings"] == model.config.max_position_embeddings == 512
    src.close()


@pytest.mark.slow
def test_phi3_longrope_without_attn_factor_is_read_as_llama_cpp_reads_it(tmp_path, monkeypatch):
    """A phi3 file with longrope's factor tensors but no phi3.rope.scaling.attn_factor: llama.cpp scales
    by 1 (its default), not by transformers' sqrt(1 + ln(512 / 256) / ln(256)) from the context lengths.
    (llama.cpp's context, 128, is rounded up to 256: within original_max_position_embeddings, short factors.)"""
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_scaling_attn_factors", lambda self, value: None)
    model = make_checkpoint(tmp_path / "ckpt", "phi3", original_max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0, 1.4, 2.1, 3.3, 1.2, 1.1, 1.0, 1.5],
        "long_factor": [1.5, 3.0, 6.0, 12.0, 2.0, 2.0, 2.0, 2.0], "rope_theta": 10000.0})
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer=spm_tokenizer_metadata(CORPUS, model.config.vocab_size))
    src = open_source(path)
    assert "phi3.rope.scaling.attn_factor" not in src.meta and src.config["rope_scaling"]["attention_factor"] == 1.0
    src.close()
    llama_cpp = pytest.importorskip("llama_cpp")
    from llmirc.runtime import load

    tokens = [0, 5, 9, 200, 17, 3, 44, 91, 12, 7, 250, 300, 31, 64, 128, 2]
    got = load(compile_to(path, tmp_path / "m.llmir")).score(tokens)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    theirs = np.array(llm.scores[:len(tokens)], dtype=np.float64)
    assert np.abs(got - theirs).max() < 1e-2 * np.abs(theirs).max()


@pytest.mark.slow
def test_llama3_rope_freqs_tensor(tmp_path):
    # convert_hf_to_gguf writes llama3 rope scaling as per-frequency divisors in rope_freqs.weight.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = make_checkpoint(tmp_path / "ckpt", "llama", rope_theta=50000.0, rope_scaling=scaling)
    dim, base = model.config.head_dim, 50000.0
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 64 / 4.0, 1.0, np.where(wavelen > 64, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    path = write_gguf(model, tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": factors.astype(np.float32)})
    check_model(model, compile_to(path, tmp_path / "m.llmir"), prompts=[list(range(2, 60))])


@pytest.mark.slow
def test_quantized_file_with_dequantize(tmp_path):
    """Every block format in one file (round-robin over the weights), those llmirc reads as float only
    among them, --dequantize: the compiled model equals transformers on the dequantized values and
    transformers' own GGUF loading of the file."""
    import torch
    from transformers import AutoModelForCausalLM

    model = make_checkpoint(tmp_path / "ckpt", "llama", hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, init_std=0.03)
    path = write_gguf(model, tmp_path / "m.gguf", QUANTIZED + FLOAT_ONLY)
    src = open_source(path, dequantize=True)
    assert {src.dtype(n) for n in ("model.embed_tokens.weight", "lm_head.weight")} | {
        src.dtype(f"model.layers.{i}.{p}.weight") for i in range(2) for p in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")} == set(QUANTIZED + FLOAT_ONLY)
    src.close()
    bundle = compile_to(path, tmp_path / "m.llmir", dequantize=True)
    compiled = check_model(model, bundle, prompts=[[0, 5, 9, 200, 17]])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    seq = list(range(3, 40))
    with torch.no_grad():
        ref = theirs(torch.tensor([seq])).logits[0].double().numpy()
    np.testing.assert_allclose(compiled.score(seq), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# -- tokenizer ------------------------------------------------------------------------------------

def _gguf_with_tokenizer(tmp_path, meta: dict):
    model = make_checkpoint(tmp_path / "ckpt", "llama", vocab_size=len(meta["tokenizer.ggml.tokens"]))
    return write_gguf(model, tmp_path / "m.gguf", tokenizer=meta)


@pytest.mark.parametrize("kind", ["gpt-2", "qwen2", "llama-bpe", "spm"])
def test_tokenizer_matches_transformers_gguf_conversion(tmp_path, kind):
    from transformers import AutoTokenizer

    if kind == "spm":
        meta = spm_tokenizer_metadata(CORPUS, 400)
    else:
        make_tokenizer(tmp_path / "tok", 384)
        meta = bpe_tokenizer_metadata(tmp_path / "tok" / "tokenizer.json", kind)
    path = _gguf_with_tokenizer(tmp_path, meta)
    ours = open_source(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        if kind != "spm" or not (text.startswith(" ") or "<s>" in text):
            assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        # (else transformers' conversion prefixes a space to the first piece of text only, where llama.cpp
        # prefixes one to every piece: test_spm_tokenizer_matches_llama_cpp)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    # llama.cpp adds bos for SentencePiece and llama-3-style vocabularies unless the file says otherwise.
    bos = meta["tokenizer.ggml.bos_token_id"]
    assert (ours.encode("a").ids[0] == bos) == (kind in ("spm", "llama-bpe"))


@pytest.mark.parametrize("name", ["Tiny", "Phi 3.5 Mini", "Phi3 Medium"])
def test_spm_tokenizer_matches_llama_cpp(tmp_path, name):
    """SentencePiece files as llama.cpp tokenizes them: a space prefixed to every piece of text (the first and
    each after a special token), and for a model named Phi-3 (general.name, lower-cased, holding "phi-3" or
    "phi3"; not "Phi 3.5 Mini") white space after special tokens but <unk>, <s> and <|endoftext|> dropped."""
    llama_cpp = pytest.importorskip("llama_cpp")
    meta = spm_tokenizer_metadata(CORPUS, 300)
    extra = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
    meta["tokenizer.ggml.tokens"] += extra
    meta["tokenizer.ggml.scores"] += [-1000.0] * len(extra)
    meta["tokenizer.ggml.token_type"] += [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.USER_DEFINED)]
    meta["general.name"] = name
    path = _gguf_with_tokenizer(tmp_path, meta)
    ours = open_source(path).tokenizer
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS + ["<|user|>\nhi there<|end|>\n<|assistant|>\n", "a<|end|>b", "x <|endoftext|> y\n",
                         "<s>  two spaces</s>\t<unk> u", " ", "<|user|> \n\t"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs.tokenize(
            text.encode(), add_bos=False, special=True), text
        assert ours.encode(text).ids == theirs.tokenize(text.encode(), add_bos=True, special=True), text


def test_end_of_turn_tokens_are_special_whatever_their_type(tmp_path):
    """llama.cpp makes every token it ends generation at by its text a control token: a Gemma tokenizer saved
    by transformers 5 has no added_tokens_decoder, so convert_hf_to_gguf writes <start_of_turn> and
    <end_of_turn> as normal tokens, and llama.cpp still reads a chat template's <end_of_turn> as one token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    meta = spm_tokenizer_metadata(CORPUS, 300)
    # (and fill-in-the-middle tokens found by their text, when the file names none)
    extra = ["<start_of_turn>", "<end_of_turn>", "<|im_end|>", "<|fim_prefix|>", "<|fim_suffix|>"]
    meta["tokenizer.ggml.tokens"] += extra
    meta["tokenizer.ggml.scores"] += [0.0] * len(extra)
    meta["tokenizer.ggml.token_type"] += [int(gguf.TokenType.NORMAL)] * 2 + [int(gguf.TokenType.USER_DEFINED)] + \
        [int(gguf.TokenType.NORMAL)] * 2
    path = _gguf_with_tokenizer(tmp_path, meta)
    ours = open_source(path).tokenizer
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    end = meta["tokenizer.ggml.tokens"].index("<end_of_turn>")
    for text in ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "a<end_of_turn>b",
                 "x <|im_end|> y", "<|fim_prefix|>def f(<|fim_suffix|>)"]:
        assert ours.encode(text).ids == theirs.tokenize(text.encode(), add_bos=True, special=True), text
    assert end in ours.encode("a<end_of_turn>b").ids


def test_compile_notes_a_missing_tokenizer_only_when_the_file_has_none(tmp_path):
    """The embedded tokenizer counts: a note for a GGUF file without one only."""
    import io

    from llmirc.driver import CompileOptions, Progress, compile_model

    make_tokenizer(tmp_path / "tok", 384)
    with_tokenizer = _gguf_with_tokenizer(tmp_path, bpe_tokenizer_metadata(tmp_path / "tok" / "tokenizer.json",
                                                                           "gpt-2"))
    without = write_gguf(make_checkpoint(tmp_path / "plain", "llama"), tmp_path / "plain.gguf")
    for path, noted in ((with_tokenizer, False), (without, True)):
        log = io.StringIO()
        compile_model(path, tmp_path / f"{path.stem}.llmir", CompileOptions(cpu_variants=("native",)), Progress(log))
        assert (f"{path} holds no tokenizer (tokenizer.ggml.*)" in log.getvalue()) == noted, log.getvalue()


def test_a_broken_chat_template_is_named_by_the_file_and_key(tmp_path):
    """The template is checked from a scratch copy: the error names the GGUF file's metadata key, not that copy."""
    from llmirc.driver import CompileOptions, Progress, compile_model
    from llmirc.errors import LlmircError

    pytest.importorskip("jinja2")
    make_tokenizer(tmp_path / "tok", 384)
    meta = bpe_tokenizer_metadata(tmp_path / "tok" / "tokenizer.json", "gpt-2",
                                  **{"tokenizer.chat_template": "{% for %}"})
    path = _gguf_with_tokenizer(tmp_path, meta)
    with pytest.raises(LlmircError) as e:
        compile_model(path, tmp_path / "m.llmir", CompileOptions(cpu_variants=("native",)), Progress(None))
    assert str(e.value).startswith(f"{path}: tokenizer.chat_template: line 1: "), str(e.value)
    assert not (tmp_path / "m.llmir").exists()


def test_smollm_pre_tokenizer_splits_digits_like_the_original(tmp_path):
    """llama.cpp's "smollm" pre-tokenizer splits digits one by one before the GPT-2 regex, as the
    original SmolLM2 tokenizer.json does (transformers' GGUF conversion does not know the name)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + ["1234 5678 90 2024"] * 4, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    path = _gguf_with_tokenizer(tmp_path, bpe_tokenizer_metadata(tmp_path / "tokenizer.json", "smollm"))
    ours = open_source(path).tokenizer
    for text in TEXTS:
        assert ours.encode(text).ids == tok.encode(text).ids, text


# Texts where the pre-tokenizers differ: scripts, cases, digits, non-ASCII white space, contractions.
SPLIT_TEXTS = TEXTS + [
    "中文字符和日本語のテキスト 한국어 텍스트", "ＦＵＬＬ\u3000ｗｉｄｔｈ！？「」", "MixedCase CamelCaseWord HTTPServer iPhone",
    "x = f(a, b) + 3 * [1, 2, 3]; // comment\n\tif (y != 0) { return y; }", "trailing spaces   ", "  \n  \n",
    "µ À Ω ℃ 1,234,567.89 ١٢٣", "a\r\nb\rc", "\u00a0nbsp\u2003em", "..., !!! ??? --- ___", "Ελληνικά кириллица עברית",
    "e\u0301 combining", "1 22 333 4444 55555 666666", "path/to/file.txt https://x.y/z?q=1",
    "ΣΊΣΥΦΟΣ Ἀθῆναι ÉCOLE école",
    "it'ſx THE\u212a kelvin'S WE'LL", "\u3000\u2003lead \u2028 sep\u3000中文\u3000字", "ǅungla ǈ ǋx"]


@pytest.fixture(scope="module")
def split_vocab(tmp_path_factory):
    """A byte-level BPE trained on SPLIT_TEXTS without any pre-tokenizer split, so that its merges
    cross every boundary a pre-tokenizer could draw (a split drawn elsewhere changes the tokens),
    and a llama model of its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = tmp_path_factory.mktemp("split-vocab")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SPLIT_TEXTS * 4, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp / "tokenizer.json"))
    return tmp, make_checkpoint(tmp / "ckpt", "llama", vocab_size=tok.get_vocab_size())


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_pre_tokenizers_split_as_llama_cpp(split_vocab, pre):
    """Every tokenizer.ggml.pre llmirc converts gives llama.cpp's tokens (llama-cpp-python on the
    same file, the regexes of its llama-vocab.cpp) and its bos default."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tmp, model = split_vocab
    path = write_gguf(model, tmp / f"{pre}.gguf", tokenizer=bpe_tokenizer_metadata(tmp / "tokenizer.json", pre))
    ours = open_source(path).tokenizer
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in SPLIT_TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == theirs.tokenize(
            text.encode(), add_bos=False, special=True), text  # (<s> in a text: a special token, as llmirc reads it)
    assert ours.encode("a").ids == theirs.tokenize(b"a", add_bos=True)


@pytest.mark.slow
def test_bundle_tokenizer_chat_template_and_generation_ids(tmp_path):
    from llmirc.runtime import load

    make_tokenizer(tmp_path / "tok", 384)
    template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    meta = bpe_tokenizer_metadata(tmp_path / "tok" / "tokenizer.json", "gpt-2", **{
        "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": template})
    path = _gguf_with_tokenizer(tmp_path, meta)
    bundle = compile_to(path, tmp_path / "m.llmir")
    original = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert (bundle / "tokenizer" / "chat_template.jinja").read_text() == template
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["generation"] == {"bos_token_id": 0, "eos_token_ids": [1], "pad_token_id": None}
    assert manifest["source"]["kind"] == "gguf" and manifest["tokenizer"] == "tokenizer/tokenizer.json"
    model = load(bundle)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_str(json.dumps(original))  # its post-processor adds <s>, as add_bos_token asks
    for text in TEXTS:
        assert model.tokenizer.encode(text) == reference.encode(text).ids, text
    out = model.generate([model.tokenizer.encode("the quick brown")], max_new_tokens=4, ignore_eos=True)
    assert len(out[0]) == 4


@pytest.mark.parametrize("extra,ends", [
    # Phi-3's turn ends with <|end|>, its file's eos is <|endoftext|>; </s> and the FIM file separator end too
    (["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|file_sep|>"],
     ["</s>", "<|endoftext|>", "<|end|>", "<|file_sep|>"]),
    # gpt-oss's vocabulary: <|end|> is not an end there (<|return|> and <|call|> are)
    (["<|endoftext|>", "<|end|>", "<|return|>", "<|call|>"], ["</s>", "<|endoftext|>", "<|return|>", "<|call|>"]),
])
def test_end_of_generation_tokens_as_llama_cpp_finds_them(tmp_path, extra, ends):
    """Generation stops at every token llama.cpp ends it at, named by their text whatever eos_token_id says
    (a Phi-3 file converted by convert_hf_to_gguf has eos <|endoftext|>; its chat turns end with <|end|>)."""
    meta = spm_tokenizer_metadata(CORPUS, 300)
    base = len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"] += extra
    meta["tokenizer.ggml.scores"] += [-1000.0] * len(extra)
    meta["tokenizer.ggml.token_type"] += [int(gguf.TokenType.CONTROL)] * len(extra)
    meta["tokenizer.ggml.eos_token_id"] = base  # <|endoftext|>
    path = _gguf_with_tokenizer(tmp_path, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    src = open_source(path)
    got = sorted(src.generation_config()["eos_token_id"])
    src.close()
    assert [tokens[i] for i in got] == ends
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert [i for i in range(len(tokens)) if llama_cpp.llama_vocab_is_eog(vocab, i)] == got


# -- bad files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = make_checkpoint(tmp / "ckpt", "llama")
    return write_gguf(model, tmp / "good.gguf")


def _open_error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        open_source(path, **kw).module()
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _with_alignment(data: bytes, alignment: int) -> bytes:
    """A GGUF file's bytes with a general.alignment key (uint32) added before its other keys."""
    kv_count = struct.unpack_from("<Q", data, 16)[0]
    key = b"general.alignment"
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<II", gguf.GGUFValueType.UINT32, alignment)
    return data[:16] + struct.pack("<Q", kv_count + 1) + entry + data[24:]


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s info record (name length, name, dims...) in a GGUF header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key)
    return at + len(key)


def test_context_is_named_by_its_metadata_key(good_file):
    """compile and inspect say where the context comes from: a GGUF file has no config.json."""
    context = open_source(good_file).model_info()["context"]
    assert context.why == "good.gguf llama.context_length" and context.tokens == 512


def test_a_gguf_file_is_known_by_its_magic_whatever_its_name(tmp_path, good_file):
    """llama.cpp reads a GGUF file by its content: Ollama's model blobs are named sha256-<digest>."""
    blob = tmp_path / "sha256-6a0746a1ec1a"
    blob.write_bytes(good_file.read_bytes())
    src = open_source(blob)
    assert src.kind == "gguf" and src.arch == "llama"
    src.close()


def test_a_folder_of_gguf_files_names_them(tmp_path):
    """A folder as a Hugging Face repository of GGUF files comes: not a checkpoint, so which file to compile."""
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r": a folder of GGUF files \(other.gguf\), not a checkpoint \(no "
                                              rf"config.json\): compile one file, e.g. {tmp_path / 'other.gguf'}$"):
        open_source(tmp_path)


def test_a_split_model_is_read_from_its_first_file(tmp_path):
    """gguf-split's NAME-00001-of-0000N.gguf: the first file names the others, as llama.cpp loads them."""
    model = make_checkpoint(tmp_path / "ckpt", "llama")
    write_gguf(model, tmp_path / "m.gguf", "Q8_0", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*.gguf"))
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    src = open_source(parts[0])
    src.module()
    assert src.unused_tensors() == []
    reference = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(src.float32(name), reference[name].numpy())
    src.close()
    # (the compile's "reading m-00001-of-00003.gguf and 2 more (N MiB)" counts them all)
    assert split_files(parts[0]) == parts and split_files(parts[1]) == [parts[1]]
    assert "compile the first, m-00001-of-00003.gguf" in _open_error(parts[1])
    parts[2].rename(tmp_path / "elsewhere.gguf")
    assert "split 3 of 3 of the model, m-00003-of-00003.gguf, is missing" in _open_error(parts[0])


def test_bad_files_are_refused_with_one_line(tmp_path, good_file):
    data = good_file.read_bytes()

    def variant(name: str, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    # the gguf reader's own exceptions (numpy's words: arrays, axes, dtypes) put into the file's terms
    for name, content, why in [("magic.gguf", b"GGUX" + data[4:], "it begins with b'GGUX', not with GGUF's magic"),
                               ("version.gguf", data[:4] + struct.pack("<I", 99) + data[8:], "GGUF version 99"),
                               ("header.gguf", data[:200], "its header (metadata and tensor table) is truncated"),
                               ("truncated.gguf", data[:len(data) - 1000], "a tensor's data runs past the end"),
                               ("empty.gguf", b"", "it is empty"),
                               ("alignment.gguf", _with_alignment(data, 3),
                                "its general.alignment is not a power of two")]:
        message = _open_error(variant(name, content))
        assert f"not a readable GGUF file: {why}" in message, message
        assert not any(w in message for w in ("array", "axis", "dtype", "index")), message
    # The first tensor's data offset (after its dims and type) pointed past the end of the file.
    info = _tensor_info_offset(data, "token_embd.weight")
    n_dims = struct.unpack_from("<I", data, info)[0]
    at = info + 4 + 8 * n_dims + 4
    past = variant("offset.gguf", data[:at] + struct.pack("<Q", 1 << 40) + data[at + 8:])
    message = _open_error(past)
    assert "not a readable GGUF file" in message or "past the end" in message
    # ... or at the data of another tensor.
    overlap = variant("overlap.gguf", data[:at] + struct.pack("<Q", 7 * 32) + data[at + 8:])
    message = _open_error(overlap)
    assert "overlaps" in message and "'token_embd.weight'" in message
    # A dimension that disagrees with the metadata: blk.0.attn_q.weight [64, 64] claimed [64, 32] ...
    info = _tensor_info_offset(data, "blk.0.ffn_up.weight")
    shape = variant("shape.gguf", data[:info + 4] + struct.pack("<Q", 32) + data[info + 12:])
    message = _open_error(shape)
    assert "blk.0.ffn_up.weight" in message
    # A vector stored block-quantized (its 64 float32 read as two Q8_0 blocks): kept only for matrices.
    info = _tensor_info_offset(data, "blk.0.attn_norm.weight")
    at = info + 4 + 8 * struct.unpack_from("<I", data, info)[0]
    vector = variant("vector.gguf", data[:at] + struct.pack("<I", gguf.GGMLQuantizationType.Q8_0) + data[at + 4:])
    assert "'blk.0.attn_norm.weight' is Q8_0-quantized, which llmirc keeps for matrices only" in _open_error(vector)


def test_a_big_file_is_announced_before_it_is_parsed(tmp_path):
    """Parsing a file of tens of MiB takes seconds (the gguf reader): compile says so first."""
    from io import StringIO

    from llmirc.driver import CompileOptions, Progress, compile_model

    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + bytes(16 << 20))
    log = StringIO()
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        compile_model(big, tmp_path / "m.llmir", CompileOptions(), Progress(log))
    assert log.getvalue().splitlines()[-1].endswith("] reading big.gguf (16 MiB)"), log.getvalue()
    assert not (tmp_path / "m.llmir").exists()


def test_metadata_errors_name_the_key(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", "llama")
    path = write_gguf(model, tmp_path / "m.gguf")
    data = path.read_bytes()
    unknown = tmp_path / "falcon.gguf"
    length = struct.pack("<Q", 5)  # general.architecture's value: a 5-byte string
    unknown.write_bytes(data.replace(length + b"llama", length + b"bloom"))
    assert "unsupported GGUF architecture 'bloom'" in _open_error(unknown)
    for kind, raw in (("IQ2_XXS", np.zeros((384, 66), np.uint8)), ("Q8_K", np.zeros((384, 292), np.uint8))):
        quant = tmp_path / f"{kind}.gguf"
        w = gguf.GGUFWriter(str(quant), "llama")
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if kind == "IQ2_XXS":  # a format llmirc reads as float32 only
            assert "has type IQ2_XXS, which llmirc cannot keep quantized" in _open_error(quant)
            assert "compile with --dequantize" in _open_error(quant)
        else:  # one it cannot read at all (ggml's intermediate Q8_K, which no dequantizer reads)
            assert "has type Q8_K, which llmirc cannot read" in _open_error(quant, dequantize=True)
    # a size of 0, named by its own key (it failed later under config.json's names, or as a head size of 0)
    for key in ("llama.attention.head_count", "llama.context_length", "llama.embedding_length"):
        at = _tensor_info_offset(data, key)  # (a key is written as a name too) then its type, then the value
        assert struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.UINT32
        zero = tmp_path / f"{key}.gguf"
        zero.write_bytes(data[:at + 4] + struct.pack("<I", 0) + data[at + 8:])
        assert f"{key} is 0; it must be positive" in _open_error(zero)


def test_unknown_type_and_partial_blocks_are_named(good_file, tmp_path):
    """The gguf reader's refusals of a tensor type id it does not know, and of rows that are not a whole
    number of a block format's blocks, are put in those words (not as a truncated file)."""
    data = good_file.read_bytes()
    info = _tensor_info_offset(data, "token_embd.weight")
    at = info + 4 + 8 * struct.unpack_from("<I", data, info)[0]
    for type_id, why in [(99, "type id 99, which the gguf reader does not know"),
                         (int(gguf.GGMLQuantizationType.Q2_K),
                          "row size (64) is not a multiple of Q2_K block size (256)"),
                         (int(gguf.GGMLQuantizationType.IQ4_XS), "not a multiple of IQ4_XS block size (256)")]:
        p = tmp_path / f"type{type_id}.gguf"
        p.write_bytes(data[:at] + struct.pack("<I", type_id) + data[at + 4:])
        message = _open_error(p)
        assert "not a readable GGUF file: " in message and why in message and "truncated" not in message, message


def test_counts_and_lengths_past_the_end_of_the_file_are_refused_at_once(tmp_path):
    """Every count and length of the header must fit in the bytes after it (llama.cpp's reader checks
    them): the gguf package's reader trusts them, and an array declaring 2**63 one-byte items at the
    end of a 94-byte file had it loop without end, its memory growing (1.7 GB in 30 s)."""
    from fuzz_readers import time_limit

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    def header(tensors: int, keys: int) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, tensors, keys) + s("general.architecture") + \
            struct.pack("<I", gguf.GGUFValueType.STRING) + s("llama")

    array = struct.pack("<I", gguf.GGUFValueType.ARRAY)
    files = {
        "u8-array": (header(0, 2) + s("x") + array + struct.pack("<IQ", gguf.GGUFValueType.UINT8, 2**63),
                     "metadata key 'x' (9223372036854775808 items) needs 9223372036854775808 bytes at byte 94"),
        "string-array": (header(0, 2) + s("x") + array + struct.pack("<IQ", gguf.GGUFValueType.STRING, 2**40),
                         "metadata key 'x' (1099511627776 items)"),
        "string": (header(0, 2) + s("x") + struct.pack("<IQ", gguf.GGUFValueType.STRING, 2**62) + b"abc",
                   "metadata key 'x' needs 4611686018427387904 bytes"),
        "keys": (header(0, 2**63), "a metadata key count of 9223372036854775808"),
        "tensors": (header(2**40, 1), "a tensor count of 1099511627776"),
        "dimensions": (header(1, 1) + s("token_embd.weight") + struct.pack("<I", 2**31) + bytes(28),
                       "tensor 'token_embd.weight' (2147483648 dimensions)"),
        # within the file, but more items than a real file's (the gguf reader parses about a million a minute)
        "items": (header(0, 2) + s("x") + array + struct.pack("<IQ", gguf.GGUFValueType.UINT8, 2**22 + 1)
                  + bytes(2**22 + 1), "metadata key 'x' takes the metadata's arrays past 4194304 items in all"),
        "nested": (header(0, 2) + s("x") + array + struct.pack("<IQ", gguf.GGUFValueType.ARRAY, 1) * 200,
                   "metadata key 'x' has value type 9, arrays nested too deeply"),
        # the reader added it to where the data begins: wrapped around, with NumPy's warning on stderr
        "offset": (header(1, 1) + s("token_embd.weight") + struct.pack("<IQIQ", 1, 4, 0, 2**64 - 8) + bytes(48),
                   "tensor 'token_embd.weight' has its data at offset 18446744073709551608, past the end"),
    }
    for name, (data, why) in files.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with time_limit(20), warnings.catch_warnings():
            warnings.simplefilter("error")
            message = _open_error(path)
        assert "not a readable GGUF file: its header (metadata and tensor table) is truncated or corrupt: " in message
        assert why in message, message


def test_tensor_names_from_the_file_are_quoted_in_messages(good_file, tmp_path):
    """A name holding a newline (found by tests/fuzz_readers.py) made the error two lines."""
    bad = tmp_path / "newline.gguf"
    bad.write_bytes(good_file.read_bytes().replace(b"blk.0.ffn_gate.weight", b"blk\n0.ffn_gate.weight"))
    assert "tensor 'blk\\n0.ffn_gate.weight' is not part of a llama model" in _open_error(bad)
