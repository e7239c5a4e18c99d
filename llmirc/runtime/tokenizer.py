"""Text <-> token ids for a bundle, through the `tokenizers` library (imported only when used).

`tokenizer.json` does the work, including adding bos/eos through its post-processor.
`tokenizer_config.json`, when present, is read for two things only:

* the named special tokens (bos/eos/unk/pad) are marked special, so `decode` skips them even
  where tokenizer.json has them as plain added tokens (transformers 5.24 does the same);
* `"add_bos_token": true` prepends the bos token when the post-processor does not add it
  already. transformers 5.24 ignores add_bos_token whenever tokenizer.json exists, so only in
  that case (a post-processor without bos, a config asking for one) our ids differ from it:
  they match transformers 4.x and sentencepiece, i.e. what the model was trained on.
  `"add_bos_token": false` never strips a bos the post-processor adds (transformers 5.24 agrees).

`decode` never applies `clean_up_tokenization_spaces` (transformers 5 defaults it to off).

`TextStream` turns generated ids into text deltas and cuts the text at stop strings, as vLLM
does; the chat template (`chat_template.py`) reads the same folder.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Collection
from pathlib import Path

from llmirc.errors import LlmircError
from llmirc.small_files import check_small_file, parse_json, present, read_small_text

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The named special tokens transformers passes to chat templates as strings (SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, backend, bos_token_id: int | None = None, add_bos_token: bool = False,
                 special_tokens_map: dict[str, str] | None = None, folder: Path | None = None,
                 source: str = "tokenizer.json"):
        """`backend` is a `tokenizers.Tokenizer`; `add_bos_token` prepends bos unless its post-processor adds it.

        `special_tokens_map`: the named special tokens as strings (what chat templates see);
        `folder`: where the tokenizer files are (for the chat template). A tokenizer.json that
        loads may still fail to encode or decode (an unknown token without `unk_token`, a Rust
        panic): LlmircError naming `source`."""
        self.backend, self.source = backend, source
        self.bos_token_id = bos_token_id
        self.special_tokens_map = dict(special_tokens_map or {})
        self.folder = folder
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id: int | None = backend.token_to_id(eos) if isinstance(eos, str) else None
        first = _guarded(source, "encode", backend.encode, "a", add_special_tokens=True).ids[:1]
        adds_bos = bos_token_id is not None and first == [bos_token_id]
        self.prepend_bos = bool(add_bos_token) and bos_token_id is not None and not adds_bos

    @classmethod
    def from_bundle_dir(cls, path, listed: Collection[str] | None = None) -> Tokenizer:
        """Load from a folder holding tokenizer.json, or its parent (a checkpoint's or bundle's
        folder with a `tokenizer/` folder). `listed`: the only file names of the folder `path`
        that may be read (a bundle gives those its manifest lists, which the reader has checked:
        inside the bundle, checksummed); None: any file there. Raises LlmircError."""
        path = Path(path)
        if listed is None:
            inner = path / "tokenizer" / "tokenizer.json"
            folder = inner.parent if present(inner) else path
        else:
            folder = path
        file = readable(folder, "tokenizer.json", listed)
        if file is None:
            where = f"looked in {path / 'tokenizer'} and {path}" if listed is None else "the manifest lists none there"
            raise LlmircError(f"{path}: no tokenizer.json ({where})")
        tokenizers = _import_tokenizers()
        try:  # (read here: Tokenizer.from_file takes a str path, and fails on one that is not UTF-8)
            data = file.read_bytes()
        except OSError as e:
            raise LlmircError(f"{file}: cannot read it: {e.strerror or e}") from None
        backend = _guarded(file, "load the tokenizer", tokenizers.Tokenizer.from_buffer, data)
        config = _read_config(folder, "tokenizer_config.json", listed)
        specials = [t for t in (_token_text(config.get(k)) for k in _SPECIAL_KEYS) if t]
        if specials:
            _guarded(file, "add the special tokens of tokenizer_config.json", backend.add_special_tokens,
                     [tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
        bos = _token_text(config.get("bos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        legacy = _read_config(folder, "special_tokens_map.json", listed)  # older checkpoints keep them here
        named = {k: _token_text(config.get(k)) or _token_text(legacy.get(k)) for k in TEMPLATE_TOKEN_KEYS}
        return cls(backend, bos_id, config.get("add_bos_token") is True, {k: v for k, v in named.items() if v},
                   folder, str(file))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, release_gil: bool = False) -> list[int]:
        """Token ids of `text` (bos first where the tokenizer adds it). Raises LlmircError for text
        that is not Unicode scalar values (a lone surrogate, as JSON's "\\ud800" decodes to).
        `release_gil`: through the backend's batch call, which lets other threads run while it
        works (its one-text call holds the GIL: a server thread tokenizing 2 MB stopped the event
        loop and the engine for seconds); its thread pool makes tokenizers warn if the process
        forks afterwards, so only for a process that does not (the server)."""
        if not isinstance(text, str):  # (the library's "TextInputSequence must be str" blamed tokenizer.json)
            raise LlmircError(f"encode takes text (a str), got {text!r:.60}")
        if m := _SURROGATE.search(text):
            raise LlmircError(f"the text holds a lone surrogate (U+{ord(m[0]):04X}) at character {m.start()}: "
                              "not Unicode text that can be encoded")
        if release_gil:
            ids = _guarded(self.source, "encode", self.backend.encode_batch, [text],
                           add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = _guarded(self.source, "encode", self.backend.encode, text, add_special_tokens=add_special_tokens).ids
        return [self.bos_token_id] + ids if add_special_tokens and self.prepend_bos else ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest vocabulary entry, added
        tokens included (byte-level BPE writes each byte of the text as one character of an entry;
        SentencePiece's entries are the text's characters, its byte fallback `<0xE3>` six for one)."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids, release_gil: bool = False, skip_special_tokens: bool = True) -> str:
        """The text of token ids (a list or 1-D array of integers), special tokens left out unless
        `skip_special_tokens` is false (`release_gil`: as for `encode`). Raises LlmircError for anything else."""
        try:
            if isinstance(ids, (str, bytes)):
                raise TypeError
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise LlmircError(f"decode takes a list of integer token ids, got {ids!r:.60}") from None
        if negative := next((i for i in ids if i < 0), None):  # (ids past the vocabulary decode to '', as HF's)
            raise LlmircError(f"decode: token id {negative} is negative")
        if release_gil:
            return _guarded(self.source, "decode", self.backend.decode_batch, [ids],
                            skip_special_tokens=skip_special_tokens)[0]
        return _guarded(self.source, "decode", self.backend.decode, ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (as OpenAI logprobs show tokens)."""
        try:
            token_id = operator.index(token_id)
        except TypeError:
            raise LlmircError(f"token_text takes an integer token id, got {token_id!r:.60}") from None
        if token_id < 0:
            raise LlmircError(f"token_text: token id {token_id} is negative")
        return _guarded(self.source, "decode", self.backend.decode, [token_id], skip_special_tokens=False)

    def detokenizer(self, prompt_ids=()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas for streaming.

    Decoding a token alone is wrong twice over: a multi-byte character split across tokens
    decodes to U+FFFD, and sentencepiece decoders drop the leading space of the first token.
    So each step decodes a short window ending at the new token, compares it with the same
    window without it, and emits the new suffix only once it no longer ends in U+FFFD; a suffix
    that still does when generation ends (tokens that stopped mid-character) is left out, not
    shown as U+FFFD, as vLLM leaves it out (its slow path's `detokenize_incrementally` and its
    fast path's `DecodeStream.step`, from tokenizers, both hold it back; nothing flushes it).
    The prompt's last ids prime the window, as vLLM primes its DecodeStream: stepped through
    from a suffix that decodes without U+FFFD (of CONTEXT to 24 ids), so the first generated
    token gets its leading space and a character the prompt ends inside of (ids sent back after a
    cut) is emitted whole once generated ids complete it. Where no such suffix is found (a prompt
    that ends inside a character, or holds a U+FFFD of its own), the last PRIME_MAX ids: vLLM
    steps through the whole prompt, which would cost a long prompt O(length) decodes. (A window
    cannot start just anywhere: with byte-fallback tokens, as Llama-2's, a run of byte tokens
    that a window cuts decodes to one U+FFFD per byte, the generated ones too.)
    """

    CONTEXT = 5      # the shortest prompt suffix tried (vLLM: 4)
    CLEAN_MAX = 24   # the longest (vLLM's)
    PRIME_MAX = 512  # prompt ids stepped through when no suffix decodes cleanly

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been emitted as text
        ids = [int(i) for i in prompt_ids]
        start = max(len(ids) - self.PRIME_MAX, 0)
        for n in range(self.CONTEXT, min(len(ids), self.CLEAN_MAX) + 1):
            if "\ufffd" not in tokenizer.decode(ids[-n:]):
                start = len(ids) - n
                break
        for i in ids[start:]:  # (the prompt's text is not emitted)
            self.add(i)

    def add(self, token_id: int) -> str:
        """Append one id; returns the text it completes (may be empty)."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read])
        new_text = decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop ids that are fully emitted and no longer needed as context.
        del self.ids[:self._read]
        self._prefix, self._read = 0, len(self.ids)
        return new_text[len(prefix_text):]


class TextStream:
    """The text of one generated sequence, delta by delta, cut at the first stop string.

    vLLM's semantics: the output ends just before the first occurrence of any stop string
    (with it, when `include_stop`); the generated tokens still count the ones that completed
    it. While streaming, text that could be the start of a stop string is held back until it
    is known not to be one, so no delta ever has to be taken back. With `min_tokens`, stop strings
    are looked for only once more tokens than that are out, and only those ending in the text of
    the later tokens (vLLM's detokenizer searches each step's new text)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), stop=(), include_stop: bool = False,
                 min_tokens: int = 0):
        self.detokenizer = tokenizer.detokenizer(prompt_ids)
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.text = ""  # all text so far (cut at the stop string once matched)
        self.stopped: str | None = None  # the stop string matched
        self._emitted = 0
        self._tokens, self._min_tokens = 0, min_tokens
        self._checked_from = 0  # a stop string must end past this many characters (min_tokens' text)

    def add(self, token_id: int) -> str:
        """Append one generated id; returns the text that can be shown now (may be empty)."""
        if self.stopped is None:
            self.text += self.detokenizer.add(token_id)
            self._tokens += 1
            if self._tokens <= self._min_tokens:
                self._checked_from = len(self.text)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back, at the end of generation (not the detokenizer's: an
        incomplete character, left out)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        end = len(self.text)
        if self.stopped is None and self.stop:
            # (within min_tokens no search; the tail that could start a stop string is still held back)
            hits = [(i, s) for s in self.stop if (i := self._find(s)) >= 0] if self._tokens > self._min_tokens else []
            if hits:
                at, self.stopped = min(hits)
                self.text = self.text[:at + (len(self.stopped) if self.include_stop else 0)]
                end = len(self.text)
            elif not final:  # hold back the longest tail that starts a stop string
                end -= held_tail(self.text, self.stop, self._emitted)
        delta, self._emitted = self.text[self._emitted:end], max(self._emitted, end)
        return delta

    def _find(self, stop: str) -> int:
        """The first occurrence of `stop` not yet shown that ends past min_tokens' text (-1: none)."""
        return self.text.find(stop, max(self._emitted, self._checked_from - len(stop) + 1))


def held_tail(text: str, tags, start: int = 0) -> int:
    """The length of the longest end of text[start:] that is the beginning of one of `tags`: text a stream
    holds back, since what comes next may make it a tag (a stop string, a reasoning or tool-call tag)."""
    longest = max(map(len, tags)) - 1
    return next((k for k in range(min(longest, len(text) - start), 0, -1)
                 if any(t.startswith(text[len(text) - k:]) for t in tags)), 0)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _guarded(source, what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), a call into the tokenizers library, whose errors become one-line LlmircErrors
    naming `source`: it raises plain Exception (bad JSON, an unknown model, an unknown token without
    unk_token) and, on a Rust panic, pyo3's PanicException, a BaseException. Other BaseExceptions
    (Ctrl-C, the CLI's SIGTERM, which a long encode raises from its signal checks) go on as they are."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise LlmircError(f"{source}: cannot {what}: {' '.join(str(e).split())[:300]}") from None


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise LlmircError("the `tokenizers` package is needed to encode/decode text: pip install tokenizers") from None
    return tokenizers


def readable(folder: Path, name: str, listed: Collection[str] | None) -> Path | None:
    """folder / name if that file may be read: it is among `listed`, or (listed None) it is there
    (a FIFO, a device or a huge file there: LlmircError, small_files.check_small_file)."""
    file = folder / name
    if listed is not None:
        return file if name in listed else None
    if not present(file):
        return None
    check_small_file(file)
    return file


def _read_config(folder: Path, name: str, listed: Collection[str] | None) -> dict:
    file = readable(folder, name, listed)
    if file is None:
        return {}
    try:
        config = parse_json(read_small_text(file))
    except ValueError as e:
        raise LlmircError(f"{file}: cannot read it: {e}") from None
    if not isinstance(config, dict):
        raise LlmircError(f"{file}: expected a JSON object")
    return config


def _token_text(token) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None
