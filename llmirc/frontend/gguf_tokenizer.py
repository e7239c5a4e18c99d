"""A GGUF file's embedded tokenizer (`tokenizer.ggml.*`) -> a `tokenizers.Tokenizer` (tokenizer.json).

GGUF stores the vocabulary, not a tokenizer.json; llama.cpp's `llama-vocab.cpp` defines what it
means, and this conversion follows it:

* `tokenizer.ggml.model = "gpt2"`: byte-level BPE. Tokens are stored in the byte-level alphabet,
  merges as "left right" strings. The pre-tokenizer is the sequence of split regexes llama.cpp
  uses for `tokenizer.ggml.pre` (its `llm_tokenizer_bpe` table; an unknown name is refused, as
  llama.cpp refuses it), then the byte-level mapping. No bos is added unless
  `tokenizer.ggml.add_bos_token` says so (llama-3-style pre-tokenizers default to adding it).
* `tokenizer.ggml.model = "llama"`: SentencePiece BPE. Merges are rebuilt from the scores (a pair
  ranks by the score of the token it makes, as sentencepiece and llama.cpp's `llm_tokenizer_spm`
  merge), unknown characters fall back to the `<0xXX>` byte tokens, "▁" marks spaces and is
  prepended to every piece of text (the first and each after a special token) unless
  `tokenizer.ggml.add_space_prefix` is false; bos is added unless `tokenizer.ggml.add_bos_token` is false.

Tokens of type CONTROL and UNKNOWN become special added tokens, and so do those llama.cpp ends
generation at or takes as fill-in-the-middle tokens by their text (EOG_TEXTS, FIM_TEXTS: it makes them
control tokens), USER_DEFINED ones plain added
tokens (llama.cpp matches all three whole in the text; for a model whose general.name says Phi-3,
white space after them is dropped, but after <unk>, <s> and <|endoftext|>, as llama.cpp does).
bos/eos are added by the post-processor. transformers' own GGUF conversion
(`transformers.integrations.gguf`) builds the same models; it differs where it ignores
`tokenizer.ggml.pre` names it does not know (e.g. "smollm", whose digits llama.cpp splits one by
one, as the original SmolLM2 tokenizer.json does), and for SentencePiece it prefixes a space to the
first piece of text only, and none to a text that starts with one.
"""

from __future__ import annotations

from llmirc.errors import CheckpointError

CONTROL, UNKNOWN, USER_DEFINED = 3, 2, 4  # gguf.TokenType

# llama.cpp's end-of-generation tokens found by their text (llama-vocab.cpp, llama_vocab::impl::load, 0.3.36). It
# makes each a control token whatever its tokenizer.ggml.token_type ("control-looking token ... was not
# control-type ... its type will be overridden"), so a chat template's <end_of_turn> is one token there even in a
# file whose converter found no added_tokens_decoder (a tokenizer saved by transformers 5).
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["))

# llama.cpp's fill-in-the-middle tokens by their text, for each tokenizer.ggml.fim_*_token_id a file does not give
# (llama_vocab::impl::load, 0.3.36): the first token with one of these texts is that FIM token, made a control
# token whatever its type; the pad, repo and separator ones end generation too.
FIM_TEXTS = {
    "fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                         "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                         "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                         "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep_token_id": ("<|file_sep|>",),
}

_ALL_FIM_TEXTS = frozenset(t for texts in FIM_TEXTS.values() for t in texts)


def fim_tokens(meta: dict, tokens: list, vocab: int) -> dict[str, int]:
    """{tokenizer.ggml.fim_*_token_id key: token id} for the FIM tokens llama.cpp knows: the id the file gives,
    else the first token (lowest id: llama.cpp takes the first its hash map yields) with one of FIM_TEXTS."""
    first: dict[str, int] = {}  # FIM text -> its first token (one pass over a vocabulary of up to 262k)
    for i, t in enumerate(tokens[:vocab]):
        if isinstance(t, str) and t in _ALL_FIM_TEXTS:
            first.setdefault(t, i)
    found = {}
    for key, texts in FIM_TEXTS.items():
        given = meta.get("tokenizer.ggml." + key)
        if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < vocab:
            found[key] = given
        elif ids := [first[t] for t in texts if t in first]:
            found[key] = min(ids)
    return found


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # ASCII case only, as llama.cpp
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
# Letters split at case changes. llama.cpp's form of \p{Lu}... / \p{Ll}...: any letter but ASCII a-z counts as upper
# case and any but A-Z as lower case (std::regex has no \p{Lu}); the same pattern here gives its splits.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# deepseek-llm / deepseek-coder: character ranges that llama.cpp matches with std::wregex, which never sees a non-ASCII
# white space (llama.cpp turns each into \v first): hence "&&\S" in the ranges that hold some.
_DEEPSEEK_LETTERS = (r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}"
                     r"\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}"
                     r"\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}"
                     r"\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}"
                     r"\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}"
                     r"\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}"
                     r"\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}"
                     r"\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}"
                     r"\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}"
                     r"\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}"
                     r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}"
                     r"\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}"
                     r"\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}"
                     r"\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+")
_DEEPSEEK_PUNCTUATION = r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}&&\S]+"
_DEEPSEEK_CJK = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}&&\S]+"
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (split regexes applied in turn, ignore_merges, add_bos default), by llama-vocab.cpp's names and
# regexes, for the kinds of split converted here (tests/test_gguf.py checks each name against llama-cpp-python).
PRE_TOKENIZERS = {
    "default": (_DEFAULT, False, False),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "a.x-4.0",
                     "mellum", "gigachat", "roberta-bpe"), ([_GPT2], False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    ([r"\p{N}", _GPT2], False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo", "f2llmv2",
                     "solar-open"), ([_QWEN2], False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    ([_LLAMA3], True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ([_LLAMA3], False, False)),
    "seed-coder": ([_SEED_CODER], False, False),
    "tekken": ([_TEKKEN], True, True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie"), ([_GPT4O], False, False)),
    "deepseek-llm": ([r"[\r\n]", _DEEPSEEK_LETTERS, _DEEPSEEK_PUNCTUATION, r"\s+$", _DEEPSEEK_CJK, r"\p{N}+"],
                     False, False),
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"], False, False),
}


def build_tokenizer(meta: dict, source: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the file's `tokenizer.*` metadata.

    meta: the GGUF metadata as plain Python values; source names the file in errors.
    Raises CheckpointError for a tokenizer kind or pre-tokenizer llmirc does not convert."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, Regex

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as a tokenizer.json vocabulary must

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < len(tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.{key} {value!r} is not a token id")
        return value

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                 "padding_token_id"))
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(f"{source}: unsupported tokenizer.ggml.pre {pre!r} "
                                  f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        splits, ignore_merges, add_bos_default = PRE_TOKENIZERS[pre]
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or any(not isinstance(m, str) or m.count(" ") != 1 for m in merges):
            raise CheckpointError(f"{source}: tokenizer.ggml.merges must be a list of 'left right' strings")
        tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_prefix_space = False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise CheckpointError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
        unk_text = tokens[unk] if unk is not None else None
        tok = Tokenizer(models.BPE(vocab, _merges_from_scores(tokens, scores), unk_token=unk_text, fuse_unk=True,
                                   byte_fallback=True))
        add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
        # llama.cpp prefixes a space to every piece of text, the first and each after a special token
        # (llama_vocab::impl::tokenize); tokenizers normalizes each piece between added tokens on its own.
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if add_prefix_space else [])
                                              + [normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)]
                                                 if add_prefix_space else []))
        add_bos_default = True
    else:
        raise CheckpointError(f"{source}: unsupported tokenizer.ggml.model {kind!r} "
                              "(llmirc converts 'gpt2' byte-level BPE and 'llama' SentencePiece)")

    # llama.cpp's Phi-3 rule (by general.name): white space after a special token is dropped, but after these
    name = meta.get("general.name")
    phi3 = isinstance(name, str) and any(n in name.lower() for n in ("phi-3", "phi3"))

    def rstrip(i: int) -> bool:
        return phi3 and tokens[i] not in ("<unk>", "<s>", "<|endoftext|>")

    given = {meta.get("tokenizer.ggml." + key) for key in FIM_TEXTS}
    control = {i for key, i in fim_tokens(meta, tokens, len(tokens)).items()
               if i not in given}  # (found by text: llama.cpp makes them control; one the file names keeps its type)
    control |= {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    specials = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) or i in control]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False, rstrip=rstrip(i)) for i in specials])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False, rstrip=rstrip(i))
                    for i, t in enumerate(types) if t == USER_DEFINED and i not in control])

    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default) is True and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) is True and eos is not None
    template = (["$A"] if not add_bos else [tokens[bos], "$A"]) + ([tokens[eos]] if add_eos else [])
    if add_bos or add_eos:
        used = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(template), pair=" ".join(template + [t.replace("$A", "$B:1") for t in template]),
            special_tokens=list(dict.fromkeys(used)))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "add_prefix_space": add_prefix_space, "clean_up_tokenization_spaces": False}
    for name, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if i is not None:
            config[name] = tokens[i]
    return tok, config


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges from token scores: every split of a token into two tokens is a
    merge ranked by that token's score (higher first), ties by the longer left and then right piece,
    then in vocabulary order (transformers' `generate_merges`; sentencepiece's merge order)."""
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        merges += [(-float(score), -len(left), -len(right), n, left, right) for n, (left, right) in
                   enumerate(local, start=len(merges))]
    merges.sort(key=lambda m: m[:4])
    return [(left, right) for *_, left, right in merges]
