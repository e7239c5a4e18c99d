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
  prepended unless `tokenizer.ggml.add_space_prefix` is false; bos is added unless
  `tokenizer.ggml.add_bos_token` is false.

Tokens of type CONTROL and UNKNOWN become special added tokens, USER_DEFINED ones plain added
tokens (llama.cpp matches all three whole in the text). bos/eos are added by the post-processor.
transformers' own GGUF conversion (`transformers.integrations.gguf`) builds the same models; it
differs only where it ignores `tokenizer.ggml.pre` names it does not know (e.g. "smollm", whose
digits llama.cpp splits one by one, as the original SmolLM2 tokenizer.json does).
"""

from __future__ import annotations

from llmirc.errors import CheckpointError

CONTROL, UNKNOWN, USER_DEFINED = 3, 2, 4  # gguf.TokenType

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (split regexes applied in turn, ignore_merges, add_bos default); llama-vocab.cpp.
PRE_TOKENIZERS = {
    "default": (_DEFAULT, False, False),
    **{name: ([_GPT2], False, False) for name in ("gpt-2", "mpt", "olmo", "phi-2", "roberta-bpe")},
    **{name: ([r"\p{N}", _GPT2], False, False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: ([_QWEN2], False, False) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan")},
    **{name: ([_LLAMA3], True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: ([_LLAMA3], False, False) for name in ("dbrx", "smaug-bpe")},
}


def build_tokenizer(meta: dict, source: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the file's `tokenizer.*` metadata.

    meta: the GGUF metadata as plain Python values; source names the file in errors.
    Raises CheckpointError for a tokenizer kind or pre-tokenizer llmirc does not convert."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, Regex

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
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                     prepend_scheme="first" if add_prefix_space else "never")
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)]
                                                 if add_prefix_space else []))
        add_bos_default = True
    else:
        raise CheckpointError(f"{source}: unsupported tokenizer.ggml.model {kind!r} "
                              "(llmirc converts 'gpt2' byte-level BPE and 'llama' SentencePiece)")

    specials = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])

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
