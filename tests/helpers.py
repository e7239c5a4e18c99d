"""Test checkpoints made by the tests themselves: random weights, fixed seed, real save_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCH_CONFIGS = {
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "phi3": "Phi3Config",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "smollm3": "SmolLM3Config",
}
ARCH_MODELS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}


def one_worker_each(group: str, params: list[str]) -> list:
    """Parameters of a module-scoped fixture whose tests all run on one pytest-xdist worker per
    value (`--dist loadgroup`, pyproject.toml), so the fixture is built once, not once per worker:
    a kernel library takes one to three minutes to compile."""
    import pytest  # (examples and benchmarks import this module without pytest's plugins in use)

    return [pytest.param(p, marks=pytest.mark.xdist_group(f"{group}-{p}")) for p in params]


SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "compilers turn programs into fast machine code",
    "héllo wörld, naïve café ✓ 日本語 text",
    "paged attention stores keys and values in blocks",
] * 8


def make_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a few sentences, saved as tokenizer.json (+ config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(path: Path, arch: str = "llama", *, seed: int = 0, dtype: str = "float32",
                    tokenizer: bool = False, init_std: float = 0.08, max_shard_size: str | None = None,
                    **overrides):
    """Builds a random model of `arch`, saves it to `path`, returns transformers' float32 model loaded
    back from `path` (the reference: rounded weights for half-precision checkpoints)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(SMALL, **overrides)
    if arch == "gpt2":  # GPT-2's own names; no grouped-query attention
        cfg["n_inner"] = cfg.pop("intermediate_size")
        cfg.pop("num_key_value_heads")
    if arch in ("phi3", "smollm3"):  # (their configs' pad ids, 32000 and 128004, are past a small vocabulary)
        cfg.setdefault("pad_token_id", 2)
    if arch in ("gemma2", "gemma3"):  # (their configs' head_dim is 256)
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("bos_token_id", 0)
    cfg.setdefault("eos_token_id", 1)
    config = getattr(transformers, ARCH_CONFIGS[arch])(**cfg, initializer_range=init_std)
    model = getattr(transformers, ARCH_MODELS[arch])(config).eval()
    # Norm weights are ones at init; random ones check that they are really applied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer(path, min(cfg["vocab_size"], 384))
    return getattr(transformers, ARCH_MODELS[arch]).from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, token_ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].double().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=None, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def check_greedy(model, prompt: list[int], ours: list[int], ref: list[int], margin: float = 1e-3) -> None:
    """Tokens equal; where they first differ, the reference's top two logits must be nearly tied."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            logits = hf_logits(model, prompt + ref[:i])[-1]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < margin * max(1.0, abs(top2[1])), \
                f"token {i}: ours {a}, reference {b}, reference margin {top2[1] - top2[0]:.3g}"
            return
    assert len(ours) == len(ref), (len(ours), len(ref))


def export_onnx(model, path: Path, *, with_mask: bool = False, with_past: bool = False, opset: int = 18,
                torchscript: bool = False) -> Path:
    """torch.onnx.export (dynamo) of the forward: input_ids [1, S] -> logits.

    with_mask adds attention_mask and position_ids inputs, as serving exports have; with_past
    adds past_key_values.N.key/value inputs and present.N.key/value outputs (optimum's layout).
    torchscript uses the older TorchScript exporter (input_ids + attention_mask, opset 17): it
    fails on transformers' mask code without an attention_mask input."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class Forward(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask=None, position_ids=None, *past):
            if not past:
                return self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    ids = torch.tensor([[0, 5, 9, 200, 17, 3]])
    S, P = ids.shape[1], 3 if with_past else 0
    seq = torch.export.Dim("seq", min=2, max=256)
    args, names, outputs = [ids], ["input_ids"], ["logits"]
    dynamic: dict = {"input_ids": {1: seq}}
    if with_mask or with_past:
        total = torch.export.Dim("total", min=3, max=512) if with_past else seq
        args += [torch.ones(1, P + S, dtype=torch.long), torch.arange(P, P + S)[None]]
        names += ["attention_mask", "position_ids"]
        dynamic.update(attention_mask={1: total}, position_ids={1: seq})
    if with_past:
        past_len = torch.export.Dim("past", min=1, max=256)
        kv, d = model.config.num_key_value_heads, model.config.head_dim
        args += [torch.randn(1, kv, P, d) for _ in range(2 * layers)]
        kinds = [(i, k) for i in range(layers) for k in ("key", "value")]
        names += [f"past_key_values.{i}.{k}" for i, k in kinds]
        outputs += [f"present.{i}.{k}" for i, k in kinds]
        dynamic["past"] = tuple({2: past_len} for _ in kinds)
    path.parent.mkdir(parents=True, exist_ok=True)
    if torchscript:
        torch.onnx.export(Forward(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
        return path
    torch.onnx.export(Forward(model).eval(), tuple(args), str(path), dynamo=True, input_names=names,
                      output_names=outputs, dynamic_shapes=dynamic, opset_version=opset, verbose=False)
    return path


def hf_logits_quantized(model, weights: dict, token_ids: list[int]) -> np.ndarray:
    """Logits of `model` in float64 with the linears named in `weights` ({module name: (weight
    [n, k] (GPT-2's Conv1D: [k, n]), input permutation or None, block[, rotation block])}) using
    those weights, their inputs quantized to int8 per block of `block` values (in the permuted
    order) as llmirc's quantized kernels do it (llmirc.quant.activation_block): the exact
    reference of a quantized bundle. A block of None rounds the inputs to bfloat16 instead (the
    GPU targets' contract, targets/signatures.py). With a rotation block, the input goes through
    llmir.hadamard first (the weight given is then the rotated one). Other modules named there
    (embeddings) only get the weight."""
    import copy

    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linears (weight [k, n])

    from llmirc import quant

    ref = copy.deepcopy(model).double()
    modules = dict(ref.named_modules())
    hooks = []

    def hook(perm, block, rotate):
        def quantize_input(module, args):
            x = args[0]
            if rotate:
                x = torch.from_numpy(quant.hadamard(x.numpy(), rotate))
            if block is None:
                return (x.to(torch.float32).to(torch.bfloat16).double(),)
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32).numpy()
            xp = flat[:, perm] if perm is not None else flat
            q, d = quant.activation_block(xp, block)
            xhat = np.empty(flat.shape)
            xhat[:, perm if perm is not None else slice(None)] = q * np.repeat(d.astype(np.float64), block, axis=1)
            return (torch.from_numpy(xhat).reshape(x.shape),)
        return quantize_input

    with torch.no_grad():
        for name, (w, perm, block, *rotate) in weights.items():
            modules[name].weight.copy_(torch.from_numpy(np.asarray(w, np.float64)))
            if isinstance(modules[name], (torch.nn.Linear, Conv1D)):
                hooks.append(modules[name].register_forward_pre_hook(hook(perm, block, rotate[0] if rotate else 0)))
        out = ref(torch.tensor([token_ids])).logits[0].numpy()
    for h in hooks:
        h.remove()
    return out


def generated_text(tokenizer, ids) -> str:
    """The text the engine gives for generated `ids` (byte-level BPE): their decode up to the last
    token after which it does not end in U+FFFD, as vLLM's detokenizer leaves out the character
    that tokens stopping mid-character leave incomplete."""
    k = len(ids)
    while k and tokenizer.decode(ids[:k]).endswith("\ufffd"):
        k -= 1
    return tokenizer.decode(ids[:k])


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`llmirc serve BUNDLE ARGS` in a subprocess on a free loopback port; stopped (by its pid) on close."""

    def __init__(self, bundle, *args, timeout: float = 120):
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(bundle).parent / f"serve-{self.port}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmirc.cli", "serve", str(bundle), "--port",
                                          str(self.port), "--log-level", "warning", *map(str, args)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
                time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# --- kernel tests: padded buffers and the paged-attention reference (CPU and GPU kernels)

def buf(rng, rows, cols, pad=3, fill=None):
    """A [rows+1, cols+pad] f32 buffer (random or `fill`) and its [rows, cols] view; the extra
    row and columns are guard space."""
    b = (np.full((rows + 1, cols + pad), fill, np.float32) if fill is not None
         else rng.standard_normal((rows + 1, cols + pad)).astype(np.float32))
    return b, b[:rows, :cols]


def check_guard(b, rows, cols):
    """Everything outside [:rows, :cols] must still be NaN."""
    mask = np.ones(b.shape, bool)
    mask[:rows, :cols] = False
    assert np.isnan(b[mask]).all(), "kernel wrote outside its output rows/columns"


def ld(b):
    return b.shape[1]


def make_batch(rng, seqs, bs, num_layers, G, hd, spare_blocks=3):
    """seqs: [(tokens already cached, new tokens)]. Returns the ABI arrays and a pool filled
    with random K/V in shuffled physical blocks."""
    B = len(seqs)
    lens = [c + n for c, n in seqs]
    need = [-(-s // bs) for s in lens]
    max_blocks = max(need) + 1
    nb = sum(need) + spare_blocks
    phys = rng.permutation(nb)
    bt = np.full((B, max_blocks), -1, np.int32)
    i = 0
    for b in range(B):
        bt[b, :need[b]] = phys[i:i + need[b]]
        i += need[b]
    pool = rng.standard_normal((num_layers, 2, nb, G, bs, hd)).astype(np.float32)
    qsl = np.zeros(B + 1, np.int32)
    qsl[1:] = np.cumsum([n for _, n in seqs])
    positions = np.concatenate([np.arange(c, c + n) for c, n in seqs]).astype(np.int32)
    return pool, nb, bt, max_blocks, np.asarray(lens, np.int32), qsl, positions


# (tokens cached, new tokens) of the sequences check_attention_batch_invariance checks: decoding
# with contexts of 2 to 12 key chunks of 256, and prefilling
INVARIANCE_TARGETS = [(300, 1), (700, 1), (1500, 1), (3000, 1), (0, 23), (270, 19)]


def check_attention_batch_invariance(step, seqs, bt, positions, q, set_threads, rng):
    """Check that paged attention gives each token the same outputs, bit for bit, whatever it is
    batched with, however many threads run the step and however its sequence's new tokens are cut
    into steps: a token a step (so a prompt token gets what a decoded one would) and uneven
    chunks. Split-K cuts long contexts in parts when a step has few units, not when it has many.

    seqs: (cached, new) tokens of a make_batch pool's sequences, INVARIANCE_TARGETS first, then 7
    others (the last one prefilling), that the targets are batched with. step(out, q, bt, lens,
    qsl, positions) runs the kernel on a step's ABI arrays and returns out. Yields, per target, its
    outputs alone on one thread and that step's arrays (for a check against a reference)."""
    starts = np.cumsum([0] + [n for _, n in seqs])

    def run(pieces):  # (i, a, n): new tokens a..a+n-1 of sequence i (its cache ending with a+n-1)
        rows = np.concatenate([np.arange(starts[i] + a, starts[i] + a + n) for i, a, n in pieces])
        qsl = np.concatenate([[0], np.cumsum([n for _, _, n in pieces])]).astype(np.int32)
        arrays = (np.ascontiguousarray(q[rows]), np.ascontiguousarray(bt[[i for i, _, _ in pieces]]),
                  np.asarray([seqs[i][0] + a + n for i, a, n in pieces], np.int32), qsl,
                  np.ascontiguousarray(positions[rows]))
        return step(np.full(arrays[0].shape, np.nan, np.float32), *arrays), arrays

    o = len(INVARIANCE_TARGETS)
    beside = [[], [o], [o, o + 1, o + 6], [o + 6], list(range(o, o + 7))]
    try:
        for t, (ctx, n) in enumerate(INVARIANCE_TARGETS):
            set_threads(1)
            alone, (sq, sbt, slens, sqsl, spos) = run([(t, 0, n)])
            cut = sorted({0, n, *rng.integers(1, n, 2).tolist()}) if n > 2 else [0, n]
            cuttings = [[(0, n)], [(a, 1) for a in range(n)], [(a, e - a) for a, e in zip(cut, cut[1:])]]
            for n_threads in (1, 2, 3, 8):
                set_threads(n_threads)
                for others in beside:
                    for cutting in cuttings[:1] if n == 1 else cuttings:
                        got = np.empty_like(alone)
                        for a, k in cutting:  # the target second when there are others
                            out, arrays = run([(i, 0, seqs[i][1]) for i in others[:1]] + [(t, a, k)] +
                                              [(i, 0, seqs[i][1]) for i in others[1:]])
                            row = arrays[3][1] if others else 0
                            got[a:a + k] = out[row:row + k]
                        np.testing.assert_array_equal(
                            got, alone, err_msg=f"context {ctx} + {n} new tokens in steps of "
                            f"{[k for _, k in cutting]}, {n_threads} threads, beside {len(others)}: not what "
                            "the tokens get alone")
            yield alone, (sbt, slens, sqsl, spos, sq)
    finally:
        set_threads(0)


def int8_pool(L, G, hd, bs, nb):
    """An int8 pool (codes [L, 2, nb, G, bs, hd], then float32 scales [L, 2, nb, G]) as one
    byte buffer, with numpy views of both parts."""
    ncodes = L * 2 * nb * G * bs * hd
    raw = np.zeros(ncodes + L * 2 * nb * G * 4, np.uint8)
    codes = raw[:ncodes].view(np.int8).reshape(L, 2, nb, G, bs, hd)
    scales = raw[ncodes:].view(np.float32).reshape(L, 2, nb, G)
    return raw, codes, scales


QMAX = {"int8": 127, "float8_e4m3fn": 448}


def fp8_values(codes: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes (uint8) as float64."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(codes).view(np.uint8)).view(torch.float8_e4m3fn).double().numpy()


def code_values(codes: np.ndarray, kv_dtype: str) -> np.ndarray:
    return codes.astype(np.float64) if kv_dtype == "int8" else fp8_values(codes)


def to_codes(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    """f32 values already divided by the scale as codes: rint (int8), round to nearest even (FP8)."""
    x = np.clip(x, -QMAX[kv_dtype], QMAX[kv_dtype]).astype(np.float32)
    if kv_dtype == "int8":
        return np.rint(x).astype(np.int8)
    import torch
    return torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def ref_kv_append_quantized(codes, scales, layer, k, v, slots, G, hd, bs, kv_dtype):
    """A quantized pool after one kv_append call, in the kernels' f32 arithmetic: per run of
    tokens into consecutive slots of one block, scale = max(old, max|run| / QMAX) (old = 0 for a
    run at offset 0), earlier codes (code * (old / scale)) rounded, the run's (x * (1 / scale))."""
    codes, scales = codes.copy(), scales.copy()
    f32 = np.float32
    t = 0
    while t < len(slots):
        s = slots[t]
        if s < 0:
            t += 1
            continue
        blk, off = divmod(int(s), bs)
        n = 1
        while t + n < len(slots) and off + n < bs and slots[t + n] == s + n:
            n += 1
        for kv, x in ((0, k), (1, v)):
            for g in range(G):
                rows = x[t:t + n, g * hd:(g + 1) * hd].astype(f32)
                old = scales[layer, kv, blk, g] if off else f32(0)
                new = max(old, f32(np.abs(rows).max()) / f32(QMAX[kv_dtype]))
                ratio = old / new if new > 0 else f32(0)
                inv = f32(1) / new if new > 0 else f32(0)
                c = codes[layer, kv, blk, g]
                c[:off] = to_codes(code_values(c[:off], kv_dtype).astype(f32) * ratio, kv_dtype)
                c[off:off + n] = to_codes(rows * inv, kv_dtype)
                scales[layer, kv, blk, g] = new
        t += n
    return codes, scales


def ref_attention(q, pool, layer, bt, qsl, positions, H, G, hd, bs, scale, win, softcap=0.0):
    """paged_attention's semantics (targets/signatures.py) in float64."""
    T = len(positions)
    out = np.zeros((T, H * hd))
    for t in range(T):
        b = np.searchsorted(qsl, t, side="right") - 1
        p = positions[t]
        lo = max(0, p - win + 1) if win else 0
        js = np.arange(lo, p + 1)
        blocks, offs = bt[b, js // bs], js % bs
        K = pool[layer, 0, blocks, :, offs].astype(np.float64)  # [keys, G, hd]
        V = pool[layer, 1, blocks, :, offs].astype(np.float64)
        qt = q[t].astype(np.float64).reshape(G, H // G, hd)
        s = scale * np.einsum("grd,jgd->grj", qt, K)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[t] = np.einsum("grj,jgd->grd", e / e.sum(-1, keepdims=True), V).reshape(-1)
    return out
