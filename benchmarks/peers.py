"""Peer engines for the benchmarks: convert a Hugging Face checkpoint for llama.cpp and
onnxruntime-genai, and time any engine (llmirc, transformers, llama.cpp, onnxruntime-genai) in
its own process on the same token ids and thread count. `benchmarks/compare.py` drives it.

The peers are optional (`pip install -e '.[bench]'`, and llama-cpp-python built for the host as
BENCHMARKS.md says); tests never need them. A peer that fails to convert, load or run is
reported as failed, with its error, and the others go on.

Engines: `llmirc[:VARIANT]` (compiles the checkpoint; VARIANT in LLMIRC_VARIANTS, none: weights
as the checkpoint has them; `gguf-KIND`: compiles the GGUF file `llama.cpp:KIND` runs, the same
file for both; `ort-PRECISION`: compiles the ONNX model `ort-genai:PRECISION` runs),
`transformers` (eager, float32), `llama.cpp:KIND` with KIND in F32, F16, BF16,
Q8_0 (convert_hf_to_gguf.py --outtype) or Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q2_K, Q3_K_M, IQ4_NL, IQ4_XS
(converted, then llama.cpp's quantizer), `ort-genai:PRECISION` with PRECISION in fp32, int8, int4
(onnxruntime_genai.models.builder). Each run: prefill = one forward over `prefill` token ids;
decode = greedy generation of `new` tokens after `prompt`, timed from the first generated token
to the last (tokens/s over new - 1 steps); peak RSS of the whole process (loading included).
llmirc also decodes `batch` sequences together (`batch_decode`: tokens/s of all of them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

QUANTIZED_KINDS = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K",  # made by llama.cpp's quantizer from a float file
                   "Q2_K", "Q3_K_M", "IQ4_NL", "IQ4_XS")
GGUF_KINDS = ("F32", "F16", "BF16", "Q8_0") + QUANTIZED_KINDS
ORT_PRECISIONS = ("fp32", "int8", "int4")
PEERS_CACHE = Path(os.environ.get("LLMIRC_PEERS_CACHE", Path.home() / ".cache" / "llmirc" / "peers"))


@dataclass
class Result:
    engine: str
    model: str
    ok: bool = False
    error: str = ""
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    tokens: list[int] = field(default_factory=list)  # the greedy tokens of the decode run
    batch_decode_tokens_per_s: float = 0.0  # llmirc: `batch` sequences decoded together, tokens/s of all
    threads: int = 0
    bytes_per_token: dict[str, int] = field(default_factory=dict)  # llmirc: bytes a decode step reads, by dtype


# -- conversions ----------------------------------------------------------------------------------

def convert_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the source distribution of the installed llama-cpp-python.

    Looked up in $LLAMA_CPP_CONVERT, then in unpacked sdists in $PEERS_DIR (/opt/peers) and the peers cache;
    otherwise the sdist of the installed version is fetched with `pip download` into the cache."""
    if os.environ.get("LLAMA_CPP_CONVERT"):
        return Path(os.environ["LLAMA_CPP_CONVERT"])
    from importlib.metadata import version

    name = f"llama_cpp_python-{version('llama-cpp-python')}"
    for root in (Path(os.environ.get("PEERS_DIR", "/opt/peers")), PEERS_CACHE):
        script = root / name / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        if script.is_file():
            return script
    PEERS_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version('llama-cpp-python')}", "-d", str(PEERS_CACHE)], check=True)
    with tarfile.open(PEERS_CACHE / f"{name}.tar.gz") as tar:
        tar.extractall(PEERS_CACHE, filter="data")
    return PEERS_CACHE / name / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def to_gguf(checkpoint: Path, out_dir: Path, kind: str) -> Path:
    """CHECKPOINT as a GGUF file of `kind` (GGUF_KINDS) in out_dir (reused when already there)."""
    out = out_dir / f"{checkpoint.name}-{kind}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind in QUANTIZED_KINDS:  # llama.cpp quantizes from a float file, as its llama-quantize tool does
        source = to_gguf(checkpoint, out_dir, "F32" if _checkpoint_dtype(checkpoint) == "float32" else "BF16")
        code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{kind}; "
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        _run([sys.executable, "-c", code, str(source), str(out) + ".tmp"], "llama.cpp quantize")
    else:
        _run([sys.executable, str(convert_script()), str(checkpoint), "--outtype", kind.lower(),
              "--outfile", str(out) + ".tmp"], "convert_hf_to_gguf.py")
    os.replace(str(out) + ".tmp", out)
    return out


def to_onnx_genai(checkpoint: Path, out_dir: Path, precision: str) -> Path:
    """CHECKPOINT as an onnxruntime-genai model folder (`precision` in ORT_PRECISIONS) for the CPU."""
    out = out_dir / f"{checkpoint.name}-ort-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as cache:
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
              "-p", precision, "-e", "cpu", "-c", cache], "onnxruntime_genai.models.builder")
    return out


def _checkpoint_dtype(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _run(cmd: list[str], what: str, timeout: float = 1800) -> Measured:
    r = run_measured(cmd, timeout)
    if r.returncode != 0:
        raise RuntimeError(r.error(what))
    return r


# -- one run of one engine, in its own process ----------------------------------------------------

@dataclass
class Measured:
    """A finished subprocess: exit status (negative: killed by that signal), output, wall time and
    peak RSS (the largest of the process and its waited-for children, as wait4 reports it)."""
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float
    timed_out: bool = False

    def error(self, what: str) -> str:
        if self.returncode < 0:
            timeout = " (timeout)" if self.timed_out else ""
            return f"{what} killed by {signal.Signals(-self.returncode).name}{timeout}"
        tail = (self.stderr or self.stdout).strip().splitlines()
        return f"{what} failed: {tail[-1] if tail else f'exit {self.returncode}'}"


def run_measured(cmd: list[str], timeout: float = 1800, env: dict | None = None) -> Measured:
    """Runs cmd to completion (killed after `timeout` seconds) and measures it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read(), err.read(), seconds, usage.ru_maxrss / 1024, timed_out)


def run_engine(engine: str, model: Path, prompt: list[int], new_tokens: int, prefill: list[int],
               threads: int | None, batch: int = 1, timeout: float = 1800) -> Result:
    """Times `engine` on `model` in a fresh process: prefill of the `prefill` ids, greedy decode of
    `new_tokens` after `prompt` (and, for llmirc with batch > 1, of `batch` sequences together).
    engine: llmirc | transformers | llama.cpp | ort-genai. threads None: the engine's default."""
    spec = json.dumps({"engine": engine, "model": str(model), "prompt": prompt, "new_tokens": new_tokens,
                       "prefill": prefill, "threads": threads, "batch": batch})
    env = dict(os.environ)
    if threads is not None:  # for the BLAS/OpenMP pools under the peers
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    run = run_measured([sys.executable, __file__, "--worker", spec], timeout, env)
    result = Result(engine, str(model), peak_rss_mb=run.peak_rss_mb)
    lines = run.stdout.strip().splitlines()
    if run.returncode == 0 and lines:
        data = json.loads(lines[-1])
        result.ok = True
        result.prefill_tokens_per_s, result.decode_tokens_per_s = data["prefill"], data["decode"]
        result.tokens = data["tokens"]
        result.batch_decode_tokens_per_s = data.get("batch_decode", 0.0)
        result.threads = data.get("threads", threads or 0)
        result.bytes_per_token = data.get("bytes_per_token", {})
    else:
        result.error = run.error(engine)
    return result


def _worker(spec: dict) -> dict:
    engine, model, threads = spec["engine"], spec["model"], spec["threads"]
    prompt, new, prefill = spec["prompt"], spec["new_tokens"], spec["prefill"]
    if engine == "llmirc":
        return _llmirc(model, prompt, new, prefill, threads, spec["batch"])
    return {"transformers": _transformers, "llama.cpp": _llama_cpp,
            "ort-genai": _ort_genai}[engine](model, prompt, new, prefill, threads)


def _rates(prefill_s: float, n_prefill: int, first: float, last: float, tokens: list[int]) -> dict:
    return {"prefill": n_prefill / prefill_s, "decode": (len(tokens) - 1) / (last - first), "tokens": tokens}


def _llmirc(model, prompt, new, prefill, threads, batch):
    from llmirc.runtime import load
    from llmirc.runtime.bench import decode_bytes_per_step

    m = load(model, kv_cache_tokens=max(len(prefill), batch * (len(prompt) + new)) + 64,
             max_num_batched_tokens=max(len(prefill), batch * len(prompt)), max_num_seqs=batch, threads=threads,
             enable_prefix_caching=False)  # else the timed prefill finds the warm-up's blocks and skips the work
    m.generate([prefill], max_new_tokens=1)  # warm-up
    t = time.perf_counter()
    m.generate([prefill], max_new_tokens=1)  # the prefill, plus sampling one token
    prefill_s = time.perf_counter() - t

    def decode(prompts):  # the tokens of sequence 0 and when each was sampled
        tokens, stamps = [], []
        for event in m.generate_stream(prompts, max_new_tokens=new, ignore_eos=True):
            if event.request_id == 0:
                tokens.append(event.token)
                stamps.append(time.perf_counter())
        return tokens, stamps

    tokens, stamps = decode([prompt])
    out = _rates(prefill_s, len(prefill), stamps[0], stamps[-1], tokens)
    if batch > 1:  # distinct prompts, decoded in lockstep: each step makes `batch` tokens
        _, stamps = decode([[(t + 1009 * j) % m.vocab_size for t in prompt] for j in range(batch)])
        out["batch_decode"] = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    out["threads"] = m.executor.threads
    out["bytes_per_token"] = decode_bytes_per_step(m, len(prompt) + new // 2)
    return out


def _transformers(model, prompt, new, prefill, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        m(torch.tensor([prefill[:8]]))  # warm-up
        t = time.perf_counter()
        m(torch.tensor([prefill]), use_cache=True)
        prefill_s = time.perf_counter() - t
        out = m(torch.tensor([prompt]), use_cache=True)
        tokens, stamps = [], []
        for _ in range(new):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            stamps.append(time.perf_counter())
            if len(tokens) < new:
                out = m(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return _rates(prefill_s, len(prefill), stamps[0], stamps[-1], tokens)


def _llama_cpp(model, prompt, new, prefill, threads):
    import llama_cpp
    import numpy as np

    n_ctx = max(len(prefill), len(prompt) + new) + 16
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=max(512, len(prefill)), n_ubatch=max(512, len(prefill)),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))

    llm.eval(prefill[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prefill)
    prefill_s = time.perf_counter() - t
    llm.reset()
    llm.eval(prompt)
    tokens, stamps = [], []
    for _ in range(new):
        tokens.append(int(np.argmax(last_logits())))
        stamps.append(time.perf_counter())
        if len(tokens) < new:
            llm.eval([tokens[-1]])
    return _rates(prefill_s, len(prefill), stamps[0], stamps[-1], tokens)


def _ort_genai(model, prompt, new, prefill, threads):
    import onnxruntime_genai as og

    config = og.Config(model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    m = og.Model(config)

    def generator(max_length):
        params = og.GeneratorParams(m)  # min_length: no stop at an end-of-sequence token, as the others
        params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False)
        return og.Generator(m, params)

    generator(16).append_tokens(prefill[:8])  # warm-up
    g = generator(len(prefill) + 1)
    t = time.perf_counter()
    g.append_tokens(prefill)
    prefill_s = time.perf_counter() - t
    g = generator(len(prompt) + new)
    g.append_tokens(prompt)
    tokens, stamps = [], []
    for _ in range(new):
        g.generate_next_token()
        tokens.append(int(g.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    return _rates(prefill_s, len(prefill), stamps[0], stamps[-1], tokens)


# -- preparing an engine's model ------------------------------------------------------------------

COMPILE_TIMEOUT = 4 * 3600  # seconds: an autoround compile of SmolLM2 takes half an hour on 2 idle cores
LLMIRC_VARIANTS = {  # `llmirc:VARIANT` -> `llmirc compile` options
    "": [], "f32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"], "f16": ["--dtype", "float16"],
    "int8": ["--quant", "int8"], "int4": ["--quant", "int4"],
    # a table the LM head is tied to kept in float with the head (the default before 2026-12-06: now stored as the head)
    "int8-table-float": ["--quant", "int8", "--quant-keep", "embedding=float"],
    "int4-table-float": ["--quant", "int4", "--quant-keep", "embedding=float"],
    # the LM head in the weights' 4-bit groups, or in 8 bits per output row (by default in 6-bit
    # groups of 32, as llama.cpp's Q4_0 files keep it in Q6_K, of that size)
    "int4-head4": ["--quant", "int4", "--quant-lm-head", "int4"],
    "int4-head8": ["--quant", "int4", "--quant-lm-head", "int8"],
    "int4-g128": ["--quant", "int4", "--quant-group-size", "128"],
    "int4-g128-zp": ["--quant", "int4", "--quant-group-size", "128", "--quant-zero-points"],
    # down_proj in 8 bits per output row (a mix like llama.cpp's Q4_K_M)
    "int4-g128-down8": ["--quant", "int4", "--quant-group-size", "128", "--quant-keep", "embedding,*.down_proj.*=int8"],
    # GPTQ, calibrated on calibration_text()
    "int8-gptq": ["--quant", "int8", "--quant-method", "gptq"],
    "int4-gptq": ["--quant", "int4", "--quant-method", "gptq"],
    "int4-g128-gptq": ["--quant", "int4", "--quant-group-size", "128", "--quant-method", "gptq"],
    "int4-g128-zp-gptq": ["--quant", "int4", "--quant-group-size", "128", "--quant-zero-points", "--quant-method",
                          "gptq"],
    # without the rotation of down_proj's input that int4 GPTQ does by default
    "int4-g128-gptq-unrotated": ["--quant", "int4", "--quant-group-size", "128", "--quant-method", "gptq",
                                 "--no-quant-rotate"],
    "int4-g128-down8-gptq": ["--quant", "int4", "--quant-group-size", "128", "--quant-keep",
                             "embedding,*.down_proj.*=int8", "--quant-method", "gptq"],
    # learned rounding from GPTQ's codes (about 30 minutes for SmolLM2 on 2 cores)
    "int4-g128-zp-autoround": ["--quant", "int4", "--quant-group-size", "128", "--quant-zero-points",
                               "--quant-method", "autoround"]}


def calibration_text(work: Path) -> Path:
    """The text `llmirc:*-gptq` and `*-autoround` variants calibrate on: the topics of the Python language reference
    (the standard library's pydoc_data; about 460 KB of English prose and code), unlike the
    perplexity benchmark's text (a licence)."""
    from pydoc_data.topics import topics

    path = work / "calibration-python-reference.txt"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(topics.values()), encoding="utf-8")
    return path


@dataclass
class Prepared:
    kind: str  # llmirc | transformers | llama.cpp | ort-genai
    model: Path
    compiled: Measured | None = None  # llmirc: the `llmirc compile` run
    source: Path | None = None  # llmirc: what it compiled (the checkpoint folder or a GGUF file)


def prepare(engine: str, checkpoint: Path, work: Path) -> Prepared:
    """The kind and model of an --engines entry, converting CHECKPOINT as that engine needs. The
    peers' conversions are kept in `work` and reused; llmirc compiles anew (it is what is measured)."""
    kind, _, variant = engine.partition(":")
    gguf = variant.removeprefix("gguf-") if variant.startswith("gguf-") else None
    ort = variant.removeprefix("ort-") if variant.startswith("ort-") else None
    if kind == "llmirc" and (variant in LLMIRC_VARIANTS or gguf in GGUF_KINDS or ort in ORT_PRECISIONS):
        bundle = work / f"{checkpoint.name}{'-' + variant if variant else ''}.llmir"
        shutil.rmtree(bundle, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        source, options = (to_gguf(checkpoint, work, gguf), []) if gguf else \
            (to_onnx_genai(checkpoint, work, ort) / "model.onnx", []) if ort else (checkpoint, LLMIRC_VARIANTS[variant])
        if "gptq" in options or "autoround" in options:
            options = [*options, "--calibration", str(calibration_text(work))]
        compiled = _run([sys.executable, "-m", "llmirc.cli", "compile", str(source), "-o", str(bundle), "-q",
                         *options], "llmirc compile", COMPILE_TIMEOUT)
        return Prepared(kind, bundle, compiled, source)
    if kind == "transformers" and not variant:
        return Prepared(kind, checkpoint)
    if kind == "llama.cpp" and variant in GGUF_KINDS:
        return Prepared(kind, to_gguf(checkpoint, work, variant))
    if kind == "ort-genai" and variant in ORT_PRECISIONS:
        return Prepared(kind, to_onnx_genai(checkpoint, work, variant))
    raise ValueError(f"unknown engine {engine!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("peers.py runs one engine for benchmarks/compare.py: peers.py --worker SPEC_JSON")
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
