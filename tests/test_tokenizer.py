"""The tokenizer wrapper against transformers, on tiny tokenizers trained here (no network)."""

import json
import sys

import numpy as np
import pytest

from llmirc.errors import LlmircError
from llmirc.runtime.tokenizer import TextStream, Tokenizer

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

CORPUS = ["hello world, this is a small test corpus.", "the quick brown fox jumps over the lazy dog",
          "tokenizers split words into pieces", "hello there! how are you today?", "numbers 123 and 4567 too"] * 3
TEXTS = ["hello world", "héllo wörld ✓ 日本", "  leading  spaces ", "", "the</s> lazy <s>dog", "日本✓✓ é"]


def sentencepiece_like():
    """Llama-2 style: ▁ for spaces, byte fallback for characters outside the vocab, bos by template."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # the corpus is ASCII: é, ✓, 日本 all fall back to <0xNN> byte tokens
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def byte_level():
    """GPT-2 style byte-level BPE; its post-processor adds nothing."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}


BUILDERS = {"sentencepiece": sentencepiece_like, "byte_level": byte_level}


def write(folder, tok, config):
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return folder


def hf_tokenizer(folder):
    import transformers
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("extra", [{}, {"add_bos_token": False}, {"add_bos_token": True}])
def test_encode_decode_match_transformers(tmp_path, kind, extra):
    tok, config = BUILDERS[kind]()
    folder = write(tmp_path, tok, {**config, **extra})
    ours, ref = Tokenizer.from_bundle_dir(folder), hf_tokenizer(folder)
    # The one documented difference: a post-processor without bos and "add_bos_token": true.
    prefix = [tok.token_to_id(config["bos_token"])] if kind == "byte_level" and extra.get("add_bos_token") else []
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.encode(text) == prefix + ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_add_bos_token_prepends_when_post_processor_does_not(tmp_path):
    tok, config = sentencepiece_like()
    bos = tok.token_to_id("<s>")
    plain = tok.encode("hello world", add_special_tokens=False).ids
    tok.post_processor = None
    ours = Tokenizer.from_bundle_dir(write(tmp_path / "a", tok, {**config, "add_bos_token": True}))
    assert ours.encode("hello world") == [bos] + plain
    assert ours.encode("hello world", add_special_tokens=False) == plain
    # transformers 5.24 drops add_bos_token when tokenizer.json exists; documented difference.
    assert hf_tokenizer(tmp_path / "a").encode("hello world") == plain
    ours = Tokenizer.from_bundle_dir(write(tmp_path / "b", tok, config))  # no add_bos_token: tokenizer.json decides
    assert ours.encode("hello world") == plain


def test_named_special_tokens_are_skipped_in_decode(tmp_path):
    tok, config = byte_level()
    tok.add_tokens(["<|im_end|>"])  # a plain added token in tokenizer.json ...
    folder = write(tmp_path, tok, {**config, "eos_token": "<|im_end|>"})  # ... made special by the config
    ours, ref = Tokenizer.from_bundle_dir(folder), hf_tokenizer(folder)
    ids = ref.encode("hi<|im_end|> there")
    assert ours.encode("hi<|im_end|> there") == ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "hi there"
    assert ours.decode(np.array(ids)) == "hi there"
    for bad in (["a"], None, "hi", [1.5]):  # (raw ValueError and TypeError)
        with pytest.raises(LlmircError, match="decode takes a list of integer token ids"):
            ours.decode(bad)
    with pytest.raises(LlmircError, match="token id -1 is negative"):  # (tokenizers: 'number too small to fit')
        ours.decode([5, -1])
    with pytest.raises(LlmircError, match="token id -2 is negative"):
        ours.token_text(-2)


def stream(tokenizer, ids, prompt_ids=()):
    detok, deltas = tokenizer.detokenizer(prompt_ids), []
    for i in ids:
        deltas.append(detok.add(i))
    return deltas


@pytest.mark.parametrize("kind", BUILDERS)
def test_streaming_deltas_concatenate_to_the_full_decode(tmp_path, kind):
    ours = Tokenizer.from_bundle_dir(write(tmp_path, *BUILDERS[kind]()))
    for text in TEXTS:
        ids = ours.encode(text)
        deltas = stream(ours, ids)
        full = ours.decode(ids)
        assert "".join(deltas) == full, text
        partial = ""
        for d in deltas:  # what a client sees at any time is a prefix of the final text, never U+FFFD
            partial += d
            assert full.startswith(partial) and "\ufffd" not in partial
    ids = ours.encode("héllo wörld ✓ 日本", add_special_tokens=False)
    assert "" in stream(ours, ids)[:-1]  # some token ended mid-character and was held back


@pytest.mark.parametrize("kind", BUILDERS)
def test_tokens_cut_mid_character_give_vllms_text(tmp_path, kind):
    """Generation that stops in the middle of a character leaves it out of the text, as vLLM does:
    its fast detokenizer is tokenizers' DecodeStream, whose steps hold such a tail back, and
    nothing flushes it (the text ended in U+FFFD)."""
    from tokenizers.decoders import DecodeStream

    tok, config = BUILDERS[kind]()
    ours = Tokenizer.from_bundle_dir(write(tmp_path, tok, config))
    cut = 0
    for text in TEXTS:
        ids = ours.encode(text)
        for k in range(1, len(ids) + 1):
            stream_ = DecodeStream(skip_special_tokens=True)
            vllm = "".join(stream_.step(tok, i) or "" for i in ids[:k])
            assert "".join(stream(ours, ids[:k])) == vllm, (text, k)
            if ours.decode(ids[:k]).endswith("\ufffd"):
                cut += 1
                assert not vllm.endswith("\ufffd"), (text, k)
    assert cut >= 3  # (the case: tokens that end mid-character)


@pytest.mark.parametrize("kind", BUILDERS)
def test_streaming_after_a_prompt_gives_vllms_text(tmp_path, kind):
    """After any prompt, the streamed text is what vLLM's fast detokenizer (tokenizers'
    DecodeStream, primed by stepping through the prompt) gives. The window of prompt ids began inside 本 of
    "日本✓✓ é", and the ✓✓ after it, byte-fallback tokens, came out as six U+FFFD; and a prompt
    ending inside a character (ids sent back after a cut) lost the character its first
    generated token completed (helper-61: "首都" then "で..." streamed without "で")."""
    from tokenizers.decoders import DecodeStream

    tok, config = BUILDERS[kind]()
    ours = Tokenizer.from_bundle_dir(write(tmp_path, tok, config))
    for text in TEXTS + ["日本語 ✓✓ 日本"]:
        ids = ours.encode(text)
        for p in range(len(ids)):
            for k in range(p + 1, len(ids) + 1):
                stream_ = DecodeStream(skip_special_tokens=True)
                for i in ids[:p]:
                    stream_.step(tok, i)
                vllm = "".join(stream_.step(tok, i) or "" for i in ids[p:k])
                assert "".join(stream(ours, ids[p:k], ids[:p])) == vllm, (text, p, k)


@pytest.mark.parametrize("kind", BUILDERS)
def test_streaming_after_a_prompt_keeps_leading_spaces(tmp_path, kind):
    tok, config = BUILDERS[kind]()
    ours = Tokenizer.from_bundle_dir(write(tmp_path, tok, config))
    eos = tok.token_to_id(config["eos_token"])
    full = ours.encode("hello there héllo wörld ✓ 日本 the lazy dog") + [eos]
    for k in range(1, len(full)):
        prompt, generated = full[:k], full[k:]
        if ours.decode(prompt).endswith("\ufffd"):  # (a prompt cut inside a character: the test above)
            continue
        expected = ours.decode(full)[len(ours.decode(prompt)):]
        assert "".join(stream(ours, generated, prompt)) == expected, k


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("include_stop", [False, True])
def test_text_stream_cuts_at_the_first_stop_string_and_never_takes_text_back(tmp_path, kind, include_stop):
    ours = Tokenizer.from_bundle_dir(write(tmp_path, *BUILDERS[kind]()))
    ids = ours.encode("hello world, this is a small test corpus. héllo wörld ✓ 日本 the lazy dog",
                      add_special_tokens=False)
    full = ours.decode(ids)
    cases = [["world"], ["is a"], ["lo w", "zzz"], ["日本"], ["✓ 日"], ["nothing here"], ["dog"], ["t", "tes"],
             [full[-3:]], ["x" * 40, "corpus."]]
    for stops in cases:
        text = TextStream(ours, (), stops, include_stop)
        seen = ""
        for i, token in enumerate(ids):
            seen += text.add(token)
            assert full.startswith(seen) and "\ufffd" not in seen
            if text.stopped:
                break
        seen += text.finish()
        hits = [(full.find(s), s) for s in stops if s in full]
        if hits:
            at, stop = min(hits)
            assert text.stopped == stop and seen == full[:at + (len(stop) if include_stop else 0)], stops
            assert ours.decode(ids[:i + 1]).find(stop) >= 0 and ours.decode(ids[:i]).find(stop) < 0  # no token later
        else:
            assert text.stopped is None and seen == full, stops


def test_text_stream_holds_back_only_a_possible_stop_prefix(tmp_path):
    ours = Tokenizer.from_bundle_dir(write(tmp_path, *byte_level()))
    text = TextStream(ours, (), ["the end"])
    ids = ours.encode("hello the", add_special_tokens=False)
    shown = "".join(text.add(t) for t in ids)
    assert shown == "hello " and text.finish() == "the"  # "the" may start "the end": held until the end


@pytest.mark.parametrize("min_tokens", [1, 3, 6, 9])
def test_text_stream_with_min_tokens_looks_for_stops_that_end_after_them(tmp_path, min_tokens):
    """vLLM's min_tokens: stop strings are not looked for in the first min_tokens tokens' text; one that
    ends later is cut there (found where it starts, even inside that text); nothing shown is taken back."""
    ours = Tokenizer.from_bundle_dir(write(tmp_path, *byte_level()))
    ids = ours.encode("ab ab cd ab cd ef ab", add_special_tokens=False)
    full = ours.decode(ids)
    for stops in (["ab"], ["cd"], ["b c", "ef"], ["zz"]):
        text = TextStream(ours, (), stops, min_tokens=min_tokens)
        seen = "".join(text.add(t) for t in ids) + text.finish()
        boundary = len(ours.decode(ids[:min_tokens]))
        ends = [(i, s) for s in stops for i in range(len(full)) if full.startswith(s, i) and i + len(s) > boundary]
        if ends:
            at, stop = min(ends)
            assert (text.stopped, seen) == (stop, full[:at]), (stops, seen)
        else:
            assert text.stopped is None and seen == full, (stops, seen)


def test_from_bundle_dir_finds_the_tokenizer_folder(tmp_path):
    write(tmp_path / "tokenizer", *byte_level())
    assert Tokenizer.from_bundle_dir(tmp_path).decode(Tokenizer.from_bundle_dir(tmp_path).encode("hi")) == "hi"


def test_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(LlmircError, match="no tokenizer.json"):
        Tokenizer.from_bundle_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmircError, match="tokenizer.json: cannot load"):
        Tokenizer.from_bundle_dir(tmp_path)
    write(tmp_path, *byte_level())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(LlmircError, match="tokenizer_config.json"):
        Tokenizer.from_bundle_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(LlmircError, match="pip install tokenizers"):
        Tokenizer.from_bundle_dir(tmp_path)


def test_tokenizer_errors_at_encode_time_are_one_line(tmp_path):
    # Found by tests/fuzz_readers.py: a tokenizer.json that loads but cannot encode (no unk token).
    write(tmp_path, tokenizers.Tokenizer(models.WordPiece({"a": 0, "##b": 1}, unk_token="[UNK]")), {})
    tok = Tokenizer.from_bundle_dir(tmp_path)
    assert tok.encode("ab") == [0, 1]
    with pytest.raises(LlmircError, match=r"tokenizer.json: cannot encode: .*UNK") as e:
        tok.encode("xyz")
    assert "\n" not in str(e.value)


def test_a_lone_surrogate_is_the_texts_fault_not_the_tokenizers(tmp_path):
    # JSON's "\ud800" decodes to a lone surrogate; the tokenizers library said "TextInputSequence
    # must be str", which _guarded blamed on tokenizer.json.
    write(tmp_path, *byte_level())
    tok = Tokenizer.from_bundle_dir(tmp_path)
    with pytest.raises(LlmircError, match=r"lone surrogate \(U\+D800\) at character 2") as e:
        tok.encode("hi\ud800!")
    assert "tokenizer.json" not in str(e.value)
    assert tok.decode(tok.encode("hi \U0001F600")) == "hi \U0001F600"  # a pair of surrogates in UTF-16, one here
    for bad in (5, None, b"hi", ["hi"]):  # the same message, for anything but text
        with pytest.raises(LlmircError, match="encode takes text") as e:
            tok.encode(bad)
        assert "tokenizer.json" not in str(e.value)
    for bad in ("a", 1.5, None):  # (int("a"): a raw ValueError)
        with pytest.raises(LlmircError, match="token_text takes an integer token id"):
            tok.token_text(bad)
    assert tok.token_text(np.int64(tok.encode("hi")[0])) == tok.token_text(tok.encode("hi")[0])


def test_guarded_wraps_the_librarys_errors_not_signals():
    """A long encode raises the CLI's SIGTERM exception (a BaseException) from its signal checks:
    it goes on as it is ("terminated", 143), not as "cannot encode: 15"."""
    from llmirc.runtime.tokenizer import _guarded

    class Terminated(BaseException):
        pass

    def fail(e):
        raise e
    with pytest.raises(LlmircError, match="tok.json: cannot encode: bad token"):
        _guarded("tok.json", "encode", fail, Exception("bad token"))
    for e in (Terminated(15), KeyboardInterrupt()):
        with pytest.raises(type(e)):
            _guarded("tok.json", "encode", fail, e)
