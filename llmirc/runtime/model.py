"""A loaded bundle: generation (batched, streaming), scoring. Scheduler + compiled forward + sampler.

A full-sequence bundle (an ONNX graph llmirc could not fully recognize, compiled with generic
kernels: `model.full_sequence` in the manifest, and the library agrees) has no incremental
decode: every step runs the whole sequence so far, one sequence at a time. Generation then
schedules a fresh one-token request per step (prompt + tokens so far, logits of the last row);
`score` is one step, as ever. Streaming and sampling are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmirc.artifact_format.reader import Bundle, open_bundle
from llmirc.errors import BundleError, LlmircError

from .cpu_executor import CpuExecutor
from .kv_cache import blocks_for
from .sampling import sample
from .scheduler import Event, Scheduler
from .tokenizer import Tokenizer

DEFAULT_KV_TOKENS = 16384


def load(path: str | Path, *, kv_cache_tokens: int | None = None, max_batched_tokens: int = 2048,
         max_num_seqs: int = 64, verify: bool = True, target: str | None = None, threads: int | None = None) -> Model:
    """Opens and verifies a bundle and loads its kernels for this host.

    `kv_cache_tokens` sizes the paged KV cache (tokens across all sequences; default: the
    model's context, capped at 16384). `target` picks a library by name (`llmirc inspect`
    lists them); by default the first that fits this host. `threads`: CPU threads the kernels
    use (default: the CPUs this process may run on)."""
    return Model(open_bundle(Path(path), verify=verify), kv_cache_tokens=kv_cache_tokens,
                 max_batched_tokens=max_batched_tokens, max_num_seqs=max_num_seqs, target=target, threads=threads)


class Model:
    def __init__(self, bundle: Bundle, *, kv_cache_tokens: int | None, max_batched_tokens: int, max_num_seqs: int,
                 target: str | None = None, threads: int | None = None):
        self.bundle = bundle
        m = bundle.manifest
        try:
            self.config = m["model"]
            kv, gen = m["kv_cache"], m["generation"]
            self.max_context = int(self.config["max_position_embeddings"])
            self.vocab_size = int(self.config["vocab_size"])
            self.block_size = int(kv["block_size"])
            self.eos_token_ids = [int(t) for t in gen.get("eos_token_ids") or [] if t is not None]
        except KeyError as e:
            raise BundleError(f"bundle {bundle.name}: manifest.json lacks the field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # the manifest is untrusted: a field of the wrong type
            raise BundleError(f"bundle {bundle.name}: manifest.json has a malformed model, kv_cache or generation "
                              f"field ({e})") from None
        if min(self.max_context, self.vocab_size, self.block_size) < 1:  # sizes the cache: never trust them
            raise BundleError(f"bundle {bundle.name}: manifest.json has a non-positive max_position_embeddings, "
                              "vocab_size or kv_cache block_size")
        tokens = kv_cache_tokens or min(self.max_context, DEFAULT_KV_TOKENS)
        if tokens < 1:
            raise LlmircError(f"kv_cache_tokens must be positive, got {kv_cache_tokens}")
        self.num_blocks = blocks_for(tokens, self.block_size)
        self.max_batched_tokens, self.max_num_seqs = max_batched_tokens, max_num_seqs
        self.executor = CpuExecutor(bundle, self.num_blocks, target, threads)
        tokenizer = m.get("tokenizer")
        # Through bundle.file: only a tokenizer.json listed in the manifest (so checksummed) is used.
        self.tokenizer = Tokenizer.from_bundle_dir(bundle.file(str(tokenizer)).parent) if tokenizer else None

    @property
    def full_sequence(self) -> bool:
        return self.executor.full_sequence

    def _scheduler(self) -> Scheduler:
        # A full-sequence step must hold the whole sequence: never chunked.
        budget = max(self.max_batched_tokens, self.max_context) if self.full_sequence else self.max_batched_tokens
        return Scheduler(self.num_blocks, self.block_size, self.max_context, eos_token_ids=self.eos_token_ids,
                         max_batched_tokens=budget, max_num_seqs=self.max_num_seqs, vocab_size=self.vocab_size)

    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        ignore_eos: bool = False) -> Iterator[Event]:
        """Runs all prompts as one continuous batch; yields an Event (request_id = prompt index,
        token, finished) for every generated token as soon as it is sampled."""
        rng = np.random.default_rng(seed)
        sched = self._scheduler()
        for i, prompt in enumerate(prompts):  # checks every request before anything runs
            sched.add_request([int(t) for t in prompt], max_new_tokens, request_id=i, ignore_eos=ignore_eos)
        if self.full_sequence:
            yield from self._full_sequence_stream(prompts, max_new_tokens, (temperature, top_k, top_p), rng,
                                                  ignore_eos)
            return
        while sched.has_work:
            step = sched.schedule()
            if step is None:
                raise LlmircError("the KV cache cannot hold any waiting request")  # add_request rules it out
            logits = self.executor.forward(*step.abi_inputs())
            tokens = sample(logits, temperature, top_k, top_p, rng)
            yield from sched.commit(step, tokens)

    def _full_sequence_stream(self, prompts, max_new_tokens: int, sampling: tuple, rng, ignore_eos: bool
                              ) -> Iterator[Event]:
        """One prompt after the other; each token is a one-step request over the whole sequence."""
        for i, prompt in enumerate(prompts):
            tokens = [int(t) for t in prompt]
            for n in range(max_new_tokens):
                sched = self._scheduler()
                sched.add_request(tokens, 1, request_id=i, ignore_eos=True)
                step = sched.schedule()
                token = int(sample(self.executor.forward(*step.abi_inputs()), *sampling, rng)[0])
                sched.commit(step, [token])  # frees the blocks: the next step rewrites the cache anyway
                tokens.append(token)
                stop = not ignore_eos and token in self.eos_token_ids
                done = stop or n + 1 == max_new_tokens
                yield Event(i, token, done, "stop" if stop else "length" if done else None)
                if done:
                    break

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 ignore_eos: bool = False) -> list[list[int]]:
        """The generated ids of each prompt (a stop token, when hit, is included, as in transformers)."""
        out: list[list[int]] = [[] for _ in prompts]
        for event in self.generate_stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos):
            out[event.request_id].append(event.token)
        return out

    def stream_text(self, prompt: list[int], **kwargs) -> Iterator[str]:
        """Text deltas of one prompt's continuation, as they are generated."""
        if self.tokenizer is None:
            raise LlmircError(f"bundle {self.bundle.name} has no tokenizer")
        detok = self.tokenizer.detokenizer(prompt)
        for event in self.generate_stream([prompt], **kwargs):
            if delta := detok.add(event.token):
                yield delta
        if tail := detok.finish():
            yield tail

    def score(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] at every position (for evaluation)."""
        rows = [self.executor.forward(*step.abi_inputs()) for step in self._scheduler().score_steps(token_ids)]
        return np.concatenate(rows, axis=0)
