"""Peer engines for the benchmarks: convert a Hugging Face checkpoint for llama.cpp and
onnxruntime-genai, and time any engine (llmirc, transformers, llama.cpp, onnxruntime-genai) in
its own process on the same token ids and thread count.

The peers are optional (`pip install -e '.[bench]'`, and llama-cpp-python built for the host as
BENCHMARKS.md says); tests never need them. A peer that fails to convert, load or run is
reported as failed, with its error, and the others go on.

    python benchmarks/peers.py CHECKPOINT --work DIR [--engines llmirc,transformers,llama.cpp:F32,...]
        [--threads 2] [--prompt-tokens 32] [--new-tokens 128] [--prefill-tokens 512] [--repeat 3]

Engines: `llmirc` (compiles CHECKPOINT), `transformers` (eager, float32), `llama.cpp:KIND` with
KIND in F32, F16, BF16, Q8_0 (convert_hf_to_gguf.py --outtype) or Q4_0 (converted, then
llama.cpp's quantizer), `ort-genai:PRECISION` with PRECISION in fp32, int8, int4
(onnxruntime_genai.models.builder). Each run: prefill = one forward over `prefill` token ids;
decode = greedy generation of `new` tokens after `prompt`, timed from the first generated token
to the last (tokens/s over new - 1 steps); peak RSS of the whole process (loading included).
Runs alternate between engines; the table shows medians and whether each engine's greedy tokens
equal transformers' (the first difference otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GGUF_KINDS = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
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
    if kind == "Q4_0":  # llama.cpp quantizes from a float file, as its llama-quantize tool does
        source = to_gguf(checkpoint, out_dir, "F32" if _checkpoint_dtype(checkpoint) == "float32" else "BF16")
        code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
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


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise RuntimeError(f"{what} failed: {tail[0]}")


# -- one run of one engine, in its own process ----------------------------------------------------

def run_engine(engine: str, model: Path, prompt: list[int], new_tokens: int, prefill: list[int], threads: int,
               timeout: float = 1800) -> Result:
    """Times `engine` on `model` in a fresh process: prefill of the `prefill` ids, greedy decode of
    `new_tokens` after `prompt`. engine: llmirc | transformers | llama.cpp | ort-genai."""
    spec = json.dumps({"engine": engine, "model": str(model), "prompt": prompt, "new_tokens": new_tokens,
                       "prefill": prefill, "threads": threads})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # for the BLAS/OpenMP pools under the peers
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", spec], stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Result(engine, str(model), peak_rss_mb=usage.ru_maxrss / 1024)
        lines = out.read().strip().splitlines()
        if proc.returncode == 0 and lines:
            data = json.loads(lines[-1])
            result.ok = True
            result.prefill_tokens_per_s, result.decode_tokens_per_s = data["prefill"], data["decode"]
            result.tokens = data["tokens"]
        elif proc.returncode < 0:
            result.error = f"killed by {signal.Signals(-proc.returncode).name}" + (
                " (timeout)" if time.monotonic() > deadline else "")
        else:
            tail = err.read().strip().splitlines()
            result.error = tail[-1] if tail else f"exit {proc.returncode}"
        return result


def _worker(spec: dict) -> dict:
    engine, model, threads = spec["engine"], spec["model"], spec["threads"]
    prompt, new, prefill = spec["prompt"], spec["new_tokens"], spec["prefill"]
    return {"llmirc": _llmirc, "transformers": _transformers, "llama.cpp": _llama_cpp,
            "ort-genai": _ort_genai}[engine](model, prompt, new, prefill, threads)


def _rates(prefill_s: float, n_prefill: int, first: float, last: float, tokens: list[int]) -> dict:
    return {"prefill": n_prefill / prefill_s, "decode": (len(tokens) - 1) / (last - first), "tokens": tokens}


def _llmirc(model, prompt, new, prefill, threads):
    from llmirc.runtime import load

    m = load(model, kv_cache_tokens=max(len(prefill), len(prompt) + new) + 64, max_batched_tokens=len(prefill),
             max_num_seqs=1, threads=threads)
    m.generate([prefill], max_new_tokens=1)  # warm-up
    t = time.perf_counter()
    m.generate([prefill], max_new_tokens=1)  # the prefill, plus sampling one token
    prefill_s = time.perf_counter() - t
    tokens, stamps = [], []
    for event in m.generate_stream([prompt], max_new_tokens=new, ignore_eos=True):
        tokens.append(event.token)
        stamps.append(time.perf_counter())
    return _rates(prefill_s, len(prefill), stamps[0], stamps[-1], tokens)


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


# -- the comparison -------------------------------------------------------------------------------

def prepare(engine: str, checkpoint: Path, work: Path) -> tuple[str, Path]:
    """(engine kind, model path) for an --engines entry, converting CHECKPOINT as that engine needs."""
    kind, _, variant = engine.partition(":")
    if kind == "llmirc":
        bundle = work / f"{checkpoint.name}.llmir"
        if not bundle.is_dir():
            _run([sys.executable, "-m", "llmirc.cli", "compile", str(checkpoint), "-o", str(bundle), "-q"],
                 "llmirc compile")
        return kind, bundle
    if kind == "transformers":
        return kind, checkpoint
    if kind == "llama.cpp" and variant in GGUF_KINDS:
        return kind, to_gguf(checkpoint, work, variant)
    if kind == "ort-genai" and variant in ORT_PRECISIONS:
        return kind, to_onnx_genai(checkpoint, work, variant)
    raise ValueError(f"unknown engine {engine!r}")


def first_difference(tokens: list[int], reference: list[int], eos: set[int]) -> str:
    """Where greedy tokens first differ from the reference, and whether that is after the
    reference's first end-of-sequence token (engines differ in what follows it: onnxruntime-genai
    cannot choose it again before its min_length)."""
    diff = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if diff is None:
        return f"equal ({len(tokens)} tokens)" if len(tokens) == len(reference) else "shorter"
    end = next((i for i, b in enumerate(reference) if b in eos), None)
    return f"equal up to the eos at {end}, differ at {diff}" if end is not None and diff >= end \
        else f"differ at {diff}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="folder for the converted models (reused)")
    parser.add_argument("--engines", default="llmirc,transformers,llama.cpp:F32,llama.cpp:Q8_0,llama.cpp:Q4_0,"
                        "ort-genai:fp32,ort-genai:int8,ort-genai:int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prompt-text", help="decode after this text (tokenized with CHECKPOINT's tokenizer.json) "
                        "instead of --prompt-tokens synthetic ids")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print every run as JSON lines")
    args = parser.parse_args()

    config = json.loads((args.checkpoint / "config.json").read_text())
    vocab, eos = config["vocab_size"], config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_tokens)]
    if args.prompt_text is not None:
        from tokenizers import Tokenizer

        prompt = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json")).encode(args.prompt_text).ids
    prefill = [(11 * i + 5) % vocab for i in range(args.prefill_tokens)]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    prepared, runs = {}, {e: [] for e in engines}
    for engine in engines:
        try:
            prepared[engine] = prepare(engine, args.checkpoint, args.work)
        except Exception as e:  # a peer that cannot be converted is reported, not fatal
            runs[engine].append(Result(engine, "", error=f"{type(e).__name__}: {e}"))
    for _ in range(args.repeat):
        for engine, (kind, model) in prepared.items():
            r = run_engine(kind, model, prompt, args.new_tokens, prefill, args.threads)
            r.engine = engine
            runs[engine].append(r)
            if args.json:
                print(json.dumps(asdict(r)), flush=True)
    reference = next((r.tokens for r in runs.get("transformers", []) if r.ok), None)
    print(f"{args.checkpoint.name}: {args.threads} threads, prompt {len(prompt)}, {args.new_tokens} new tokens, "
          f"prefill {args.prefill_tokens}; median of {args.repeat}")
    print(f"{'engine':20s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'peak RSS MB':>11s}  greedy vs transformers")
    for engine, results in runs.items():
        ok = [r for r in results if r.ok]
        if not ok:
            print(f"{engine:20s} FAILED: {results[-1].error if results else 'not run'}")
            continue
        decode = statistics.median(r.decode_tokens_per_s for r in ok)
        prefill_rate = statistics.median(r.prefill_tokens_per_s for r in ok)
        rss = max(r.peak_rss_mb for r in ok)
        same = first_difference(ok[0].tokens, reference, eos) if reference else "-"
        failed = f" ({len(results) - len(ok)} runs failed: {results[-1].error})" if len(ok) < len(results) else ""
        print(f"{engine:20s} {decode:12.1f} {prefill_rate:13.1f} {rss:11.0f}  {same}{failed}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
