"""A loaded bundle: generation (batched, streaming), chat templates, scoring.

`Model` holds the executor (the compiled forward), a `Scheduler` and the `Engine` that owns
both; `generate`, `generate_stream` and `stream_text` run their requests through that engine,
as the server does. Prompts are token id lists or, when the bundle has a tokenizer, text.

A full-sequence bundle (an ONNX graph llmirc could not fully recognize, compiled with generic
kernels: `model.full_sequence` in the manifest, and the library agrees) has no incremental
decode: the scheduler runs its sequences one at a time, recomputing the whole sequence each step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from llmirc.artifact_format.reader import Bundle, open_bundle
from llmirc.errors import BundleError, LlmircError

from . import structured
from .chat_template import ChatTemplate
from .cpu_executor import CpuExecutor
from .engine import Engine, RequestOutput, SamplingParams
from .kv_cache import blocks_for
from .scheduler import Scheduler
from .tokenizer import Tokenizer

DEFAULT_KV_TOKENS = 16384


def load(path: str | Path, *, kv_cache_tokens: int | None = None, max_num_batched_tokens: int = 2048,
         max_num_seqs: int = 64, verify: bool = True, target: str | None = None, threads: int | None = None,
         enable_prefix_caching: bool = True, max_model_len: int | None = None,
         gpu_memory_utilization: float = 0.9, num_scheduler_steps: int = 8) -> Model:
    """Opens a bundle and loads its kernels for this host.

    `verify` checks every file's sha256, once per unchanged bundle (the result is remembered,
    see `artifact_format.reader`). `kv_cache_tokens` sizes the paged KV cache (tokens across all
    sequences; default: the model's context, capped at 16384). `max_num_batched_tokens` bounds one
    step (longer prompts are prefilled in chunks), `max_num_seqs` the sequences per step.
    `max_model_len` lowers the context the model accepts (never above the bundle's). `target`
    picks a target by name (`llmirc inspect` lists them) or the best of a kind (cpu, cuda, hip);
    by default the best this host runs: a GPU target first (see `pick_executor`), then the CPU
    library that fits needing the most CPU features (`cpu_executor.pick_cpu_target`). `threads`:
    CPU threads the kernels use (default: the CPUs this process may run on).
    `gpu_memory_utilization`: the share of GPU memory the model may use, in (0, 1], the KV cache
    taking what the weights and buffers leave (vLLM's option; a GPU target without kv_cache_tokens).
    `num_scheduler_steps`: greedy decode steps one native call may run (vLLM's multi-step
    scheduling; CPU targets, when every running request is greedy without logprobs or stop strings
    and none waits; 1: one step per call). Streamed tokens then come in bursts of up to this many.
    Raises BundleError for a bad bundle, LlmircError for bad options. `Model.close()` (or a
    `with` block) frees the KV cache and the weights."""
    if not isinstance(path, (str, os.PathLike)):
        raise LlmircError(f"load takes a bundle's path (str or Path), got {path!r:.60}")
    for name, flag in (("verify", verify), ("enable_prefix_caching", enable_prefix_caching)):
        if not isinstance(flag, (bool, np.bool_)):  # "no" would act as True
            raise LlmircError(f"{name} must be True or False, got {flag!r}")
    return Model(open_bundle(Path(path), verify=verify, remember=True), kv_cache_tokens=kv_cache_tokens,
                 max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, target=target,
                 threads=threads, enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                 gpu_memory_utilization=gpu_memory_utilization, num_scheduler_steps=num_scheduler_steps)


def declared_model(path: str | Path) -> dict:
    """The `model` object of a bundle's manifest, read without loading the bundle (bench and
    eval-ppl size their runs from it). Its values are untrusted: each user checks what it reads.
    BundleError when the bundle cannot be opened or `model` is not an object."""
    model = open_bundle(Path(path), verify=False).manifest.get("model")
    if not isinstance(model, dict):
        raise BundleError(f"bundle {path}: manifest.json has a malformed model field (not an object)")
    return model


def pick_executor(bundle: Bundle, *, target: str | None, kv_cache_tokens: int | None, max_context: int,
                  block_size: int, max_num_batched_tokens: int, max_num_seqs: int, threads: int | None,
                  gpu_memory_utilization: float) -> tuple[object, list[str]]:
    """(executor, notes): the executor of the best target this host runs, a GPU target first, and
    one line per GPU kind of the bundle that could not be used (cuda tried first, then hip), saying
    why (no cuda-python / hip-python, no driver, no kernels or PTX for this GPU, too little
    memory). `target`, a target's name or a kind (cpu, cuda, hip), restricts the choice to it, and
    its failure is the error. A bundle with no cpu target that no GPU here can run: GpuUnavailable
    with those lines."""
    from .gpu_drivers import DRIVERS
    from .gpu_executor import GpuExecutor
    from .gpu_program import GpuUnavailable

    targets = bundle.manifest.get("targets") or []
    if not isinstance(targets, list) or any(not isinstance(t, dict) or not isinstance(t.get("kind"), str)
                                            for t in targets):
        raise BundleError(f"bundle {bundle.name}: manifest.json: targets must be a list of objects with a kind "
                          "(a string)")
    kinds = list(dict.fromkeys(t.get("kind") for t in targets))
    named = next((t for t in targets if t.get("name") == target), None)
    if target is not None and named is None and target not in kinds:
        raise BundleError(f"bundle {bundle.name}: no target {target!r} (its targets: "
                          f"{', '.join(str(t.get('name')) for t in targets) or 'none'}; kinds: "
                          f"{', '.join(map(str, kinds)) or 'none'})")
    if target is not None:
        kinds = [named.get("kind") if named else target]
    name = named.get("name") if named else None  # a kind: the best target of that kind
    notes = []
    for kind in ("cuda", "hip"):
        if kind not in kinds:
            continue
        try:
            return GpuExecutor(bundle, DRIVERS[kind](), max_context=max_context,
                               max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                               kv_cache_tokens=kv_cache_tokens,
                               gpu_memory_utilization=gpu_memory_utilization, target=name), notes
        except GpuUnavailable as e:
            if target is not None:
                raise
            notes.append(str(e))
    if notes and "cpu" not in kinds:
        raise GpuUnavailable(f"bundle {bundle.name}: no target this host can run ({'; '.join(notes)})")
    tokens = kv_cache_tokens or min(max_context, DEFAULT_KV_TOKENS)
    return CpuExecutor(bundle, blocks_for(tokens, block_size), name, threads), notes


class Model:
    """A loaded bundle (made by `load`): its kernels, paged KV cache and engine.

    Attributes: `max_context` (tokens a sequence may hold: prompt + generated), `vocab_size`,
    `block_size` (KV cache block, tokens), `num_blocks`, `eos_token_ids` (generation stops at
    these unless ignore_eos: generation_config.json's and the tokenizer's eos_token), `tokenizer`
    (llmirc.runtime.tokenizer.Tokenizer, None when the bundle has none: prompts are then token ids),
    `chat_template` (ChatTemplate or None), `engine`.
    Generation: `generate` (token ids), `generate_stream` (RequestOutput events: token, text,
    finish_reason, logprob as TokenLogprob(token, logprob, top)...; llmirc.runtime.engine),
    `stream_text`; `score` (logits of a sequence). Its methods may be called from several threads
    at once; Ctrl-C in a call leaves the model usable."""

    def __init__(self, bundle: Bundle, *, kv_cache_tokens: int | None, max_num_batched_tokens: int, max_num_seqs: int,
                 target: str | None = None, threads: int | None = None, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, num_scheduler_steps: int = 8):
        kv_cache_tokens, max_model_len, threads, max_num_batched_tokens, max_num_seqs = (
            _count(name, value) for name, value in (
                ("kv_cache_tokens", kv_cache_tokens), ("max_model_len", max_model_len), ("threads", threads),
                ("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)))
        # checked on every host, as vLLM does (a GPU target compared "0.5" with 0: a TypeError)
        share = gpu_memory_utilization
        if isinstance(share, bool) or not isinstance(share, (int, float, np.integer, np.floating)) or \
                not 0 < share <= 1:
            raise LlmircError(f"gpu_memory_utilization must be a number in (0, 1], got {share!r}")
        self.bundle = bundle
        m = bundle.manifest
        try:
            self.config = m["model"]
            kv, gen = m["kv_cache"], m["generation"]
            self.max_context = _whole(self.config["max_position_embeddings"], "model.max_position_embeddings")
            self.vocab_size = _whole(self.config["vocab_size"], "model.vocab_size")
            self.block_size = _whole(kv["block_size"], "kv_cache.block_size")
            self.eos_token_ids = [_whole(t, "generation.eos_token_ids") for t in gen.get("eos_token_ids") or []
                                  if t is not None]
        except KeyError as e:
            raise BundleError(f"bundle {bundle.name}: manifest.json lacks the field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # the manifest is untrusted: a field of the wrong type
            raise BundleError(f"bundle {bundle.name}: manifest.json has a malformed model, kv_cache or generation "
                              f"field ({e})") from None
        if min(self.max_context, self.vocab_size, self.block_size) < 1:  # sizes the cache: never trust them
            raise BundleError(f"bundle {bundle.name}: manifest.json has a non-positive max_position_embeddings, "
                              "vocab_size or kv_cache block_size")
        if max_model_len is not None:
            if not 1 <= max_model_len <= self.max_context:
                raise LlmircError(f"max_model_len (--max-model-len) {max_model_len} must be between 1 and the "
                                  f"bundle's context of {self.max_context} tokens")
            self.max_context = max_model_len
        self.executor, self.target_notes = pick_executor(
            bundle, target=target, kv_cache_tokens=kv_cache_tokens, max_context=self.max_context,
            block_size=self.block_size, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            threads=threads, gpu_memory_utilization=gpu_memory_utilization)
        try:  # (a GPU executor holds device memory, most of it for its KV cache, until closed)
            self.num_blocks = self.executor.num_blocks
            self.scheduler = Scheduler(self.num_blocks, self.block_size, self.max_context,
                                       eos_token_ids=self.eos_token_ids, max_num_batched_tokens=max_num_batched_tokens,
                                       max_num_seqs=max_num_seqs, vocab_size=self.vocab_size,
                                       enable_prefix_caching=enable_prefix_caching,
                                       full_sequence=self.executor.full_sequence)
            self.tokenizer, self.chat_template = None, None
            if tokenizer := m.get("tokenizer"):
                # Only files the manifest lists beside tokenizer.json (so inside the bundle, checksummed) are read.
                file, folder = bundle.file(str(tokenizer)), PurePosixPath(str(tokenizer)).parent
                listed = {PurePosixPath(f).name for f in bundle.files if PurePosixPath(f).parent == folder}
                self.tokenizer = Tokenizer.from_bundle_dir(file.parent, listed)
                self.chat_template = ChatTemplate.from_folder(self.tokenizer.folder, self.tokenizer.special_tokens_map,
                                                              listed)
                eos = self.tokenizer.eos_token_id
                if eos is not None and eos not in self.eos_token_ids:  # (vLLM's request.eos_token_id: the
                    # tokenizer's eos_token ends a sequence whatever generation_config.json lists, as a ChatML
                    # fine-tune's <|im_end|>)
                    self.eos_token_ids.append(eos)
                    self.scheduler.eos_token_ids |= {eos}
            self.engine = Engine(self.executor, self.scheduler, self.tokenizer, num_scheduler_steps)
        except BaseException:
            if hasattr(self.executor, "close"):
                with contextlib.suppress(LlmircError):  # the error that stopped the load says more
                    self.executor.close()
            raise

    @property
    def generation_config(self) -> dict:
        """The checkpoint's generation_config.json as the bundle keeps it ({} when it has none): the
        model maker's recommended sampling (temperature, top_p, ...). BundleError when it is not a
        JSON object."""
        if "generation_config.json" not in self.bundle.files:
            return {}
        from llmirc.small_files import parse_json, read_small_text

        try:
            config = parse_json(read_small_text(self.bundle.file("generation_config.json"), BundleError))
        except ValueError as e:
            raise BundleError(f"bundle {self.bundle.name}: generation_config.json is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise BundleError(f"bundle {self.bundle.name}: generation_config.json is not a JSON object")
        return config

    def close(self) -> None:
        """Ends the requests in flight (finish_reason "abort"), stops the engine and frees the KV
        cache and the weights (GPU memory on a GPU target) once no step runs. Generation and
        scoring afterwards (or racing with it, from other threads) raise LlmircError; encode and
        the tokenizer still work. Closing twice does nothing. `with load(path) as model:` closes
        on leaving the block."""
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def full_sequence(self) -> bool:
        """Whether the bundle recomputes the whole sequence each step (no incremental decode: see the
        module's docstring); its sequences then run one at a time."""
        return self.executor.full_sequence

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt as token ids: text is encoded with the bundle's tokenizer (adding bos as it does)
        after `check_text_length`."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LlmircError(f"bundle {self.bundle.name} has no tokenizer: give prompts as token id lists")
            self.check_text_length(prompt)
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple, np.ndarray)) or getattr(prompt, "ndim", 1) != 1 or \
                any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in prompt):
            raise LlmircError(f"a prompt must be text or a list of integer token ids, got {prompt!r:.60}")
        return [int(t) for t in prompt]

    def check_text_length(self, text: str) -> None:
        """Raises LlmircError for text with more characters than the context's tokens can stand
        for, before it is tokenized (a 60 MB prompt took 82 s and 8 GB of memory to be refused
        after). Each token stands for at most `tokenizer.max_token_chars` characters; the bound
        allows four times as many, as a normalizer may shorten the text (NFC composes characters)."""
        if len(text) > 4 * self.max_context * self.tokenizer.max_token_chars:
            raise LlmircError(f"text of {len(text)} characters, more than this model's maximum context length of "
                              f"{self.max_context} tokens can hold")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs) -> list[int] | str:
        """The token ids of a conversation ([{"role": "user", "content": "..."}, ...]; content a
        string, as the template expects it) rendered with the bundle's chat template as transformers
        renders it (`ChatTemplate.render`): `add_generation_prompt` ends with the assistant's turn
        opened; keyword arguments are the template's variables, among them `tools`, `documents` and
        `continue_final_message` (leave the last assistant message open). Special tokens come from
        the text only (none added). `tokenize=False` returns the rendered text instead, as
        transformers does (give generate the ids: encoding the text adds bos before the template's
        own). Raises LlmircError when the bundle has no chat template, for a template error or one
        past the sandbox's limits (jinja_sandbox.py), and for text longer than the context can hold
        (`check_text_length`)."""
        for name, flag in (("add_generation_prompt", add_generation_prompt), ("tokenize", tokenize)):
            if not isinstance(flag, (bool, np.bool_)):  # "no" would act as True
                raise LlmircError(f"{name} must be True or False, got {flag!r}")
        if self.chat_template is None:
            raise LlmircError(f"bundle {self.bundle.name} has no chat template (its tokenizer_config.json has no "
                              "chat_template and there is no chat_template.jinja)")
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        self.check_text_length(text)
        return self.tokenizer.encode(text, add_special_tokens=False) if tokenize else text

    def _prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
                (prompts and all(isinstance(t, (int, np.integer)) for t in prompts)):
            raise LlmircError("prompts must be a list of prompts, each text or a list of token ids "
                              "(e.g. ['hello'] or [[1, 2, 3]])")
        return [self.encode(p) for p in prompts]

    def generate_stream(self, prompts: list[str | list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        ignore_eos: bool = False, stop_token_ids: tuple[int, ...] = (),
                        stop: str | tuple[str, ...] = (), logprobs: int | None = None, *, min_p: float = 0.0,
                        repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                        frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                        min_tokens: int = 0, allowed_token_ids: list[int] | None = None, bad_words: list[str] = (),
                        structured_outputs: dict | None = None) -> Iterator[RequestOutput]:
        """Runs all prompts as one continuous batch; yields a RequestOutput (request_id = prompt
        index, token, text, finished, finish_reason, logprob...) for every token as soon as it is
        sampled. Bad arguments raise LlmircError here, not at the first `next`.

        With a seed, prompt i samples from its own generator seeded `seed + i` (vLLM's rule for
        n > 1), so runs are reproducible. `stop` strings end a sequence (and its text, which
        leaves them out). `logprobs` n adds each token's logprob and the n most likely. `min_p`, the
        penalties, `logit_bias` ({token id: bias}), `min_tokens`, `allowed_token_ids` and `bad_words` as
        vLLM's (engine.SamplingParams);
        `structured_outputs` as vLLM's ({"json": schema}, {"regex": ...}, {"choice": [...]}, {"grammar":
        EBNF or Lark}, {"structural_tag": ...} or {"json_object": True}, with disable_any_whitespace,
        whitespace_pattern, disable_additional_properties: the text follows it; structured.py). Closing
        the generator early aborts the rest (their KV blocks are freed)."""
        ids = self._prompts(prompts)
        stop, stop_token_ids = _items(stop, "stop"), tuple(map(_plain, _items(stop_token_ids, "stop_token_ids")))
        max_new_tokens, top_k, seed, logprobs = map(_plain, (max_new_tokens, top_k, seed, logprobs))
        offset = isinstance(seed, int) and not isinstance(seed, bool)  # else SamplingParams names the bad seed
        guided = structured.structured_outputs(structured_outputs)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed + i if offset else seed, stop_token_ids=stop_token_ids, stop=stop,
                                 ignore_eos=ignore_eos, logprobs=logprobs, min_p=min_p,
                                 repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, logit_bias=_bias_pairs(logit_bias),
                                 min_tokens=_plain(min_tokens), guided=guided, bad_words=_items(bad_words, "bad_words"),
                                 allowed_token_ids=None if allowed_token_ids is None else
                                 tuple(map(_plain, _items(allowed_token_ids, "allowed_token_ids"))))
                  for i in range(len(ids))]
        return self.engine.generate(ids, params)

    def generate(self, prompts: list[str | list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 ignore_eos: bool = False, stop_token_ids: tuple[int, ...] = (), stop: str | tuple[str, ...] = (),
                 **penalties) -> list[list[int]]:
        """The generated ids of each prompt (a stop token, when hit, is included, as in transformers;
        so are the tokens of a stop string, which `generate_stream`'s text leaves out). Arguments
        as `generate_stream`'s (`penalties`: its keyword-only ones); LlmircError when `close()` ends
        the call from another thread."""
        prompts = self._prompts(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for event in _unless_closed(self.generate_stream(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                                         ignore_eos, stop_token_ids, stop, **penalties)):
            if event.token is not None:
                out[event.request_id].append(event.token)
        return out

    def stream_text(self, prompt: str | list[int], max_new_tokens: int, **kwargs) -> Iterator[str]:
        """Text deltas of one prompt's continuation, as they are generated. Keyword arguments as
        `generate_stream` (e.g. `stop` strings, left out of the text). LlmircError when `close()`
        ends it from another thread."""
        if self.tokenizer is None:
            raise LlmircError(f"bundle {self.bundle.name} has no tokenizer")
        events = self.generate_stream([prompt], max_new_tokens, **kwargs)
        return (event.text for event in _unless_closed(events) if event.text)

    def score(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] float32 at every position (for evaluation): row i scores the
        token after token_ids[:i + 1], as transformers' `model(ids).logits[0]` (no bos is added).
        Raises LlmircError for anything but a list (or 1-D array) of token ids, RuntimeLimitError
        for an id outside the vocabulary or more tokens than the context or the free KV cache hold."""
        if isinstance(token_ids, str):
            raise LlmircError("score takes token ids, not text: encode it first (Model.encode)")
        token_ids = self.encode(token_ids)

        def run():
            # (closed here, not when collected: a forward that raises, Ctrl-C too, frees the blocks at once, even
            # while a notebook keeps the exception and with it the generator; the next score found the cache full)
            with contextlib.closing(self.scheduler.score_steps(token_ids)) as steps:
                return [self.executor.forward(*step.abi_inputs()) for step in steps]
        return np.concatenate(self.engine.call(run), axis=0)


def _unless_closed(events: Iterator[RequestOutput]) -> Iterator[RequestOutput]:
    """generate_stream's events, with LlmircError in place of one that `close()` aborted: generate
    and stream_text give no finish_reason, so their shortened result would pass for a whole one.
    (A failed step raises in generate_stream already.)"""
    with contextlib.closing(events):  # (a consumer leaving early aborts the rest at once)
        for event in events:
            if event.finish_reason == "abort":
                raise LlmircError("the model was closed")
            yield event


def _whole(value, field: str) -> int:
    """A manifest field that must be a JSON integer ("16" or 16.5 are not: the library checks the
    field as written). Raises TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} is {value!r}, not a whole number")
    return value


def _count(name: str, value) -> int | None:
    """A size option (None: the default) as a Python int >= 1 (a NumPy integer of a narrow type
    would wrap around in the sizes computed from it). Raises LlmircError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise LlmircError(f"{name} must be an integer >= 1, got {value!r}")
    return None if value is None else int(value)


def _plain(value):
    """A NumPy integer as a Python int (anything else as it is, for SamplingParams to check)."""
    return int(value) if isinstance(value, np.integer) else value


def _items(value, name: str) -> tuple:
    """A sequence argument as a tuple: None is none, one string alone is one item (`stop="\\n"`,
    as OpenAI's API takes both)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray)):
        raise LlmircError(f"{name} must be a list, got {value!r}")
    try:
        return tuple(value)
    except TypeError:
        raise LlmircError(f"{name} must be a list, got {value!r}") from None


def _bias_pairs(logit_bias) -> tuple:
    """{token id: bias} as SamplingParams' (id, bias) pairs (None: none); SamplingParams checks them."""
    if logit_bias is None:
        return ()
    if not isinstance(logit_bias, dict):
        raise LlmircError(f"logit_bias must be a dict of token id to bias, got {logit_bias!r}")
    return tuple((_plain(t), float(b) if isinstance(b, np.floating) else b) for t, b in logit_bias.items())
