"""Every GPU check and the GPU benchmark, in one run, on a host with an NVIDIA GPU.

    OUT=/path/to/results python benchmarks/gpu_check.py [--model medium] [--quant int4] [--kv fp8]
        [--budget SECONDS] [--skip-tests] [--diagnose]

1. Installs what the host lacks (xdsl and its needs, gguf) from wheels taken along in `wheels/`
   (an ignored folder: `pip download --no-deps -d wheels xdsl==0.74.0 immutabledict==4.3.1
   ordered-set==4.1.0 gguf` on a machine with a registry), then this checkout (pip install -e,
   no network).
2. `tests`: the GPU tests (tests/test_gpu_targets.py -m gpu: greedy tokens of Llama, Qwen2 and
   Mistral checkpoints compiled for cuda against transformers, bf16 logits over 256 positions,
   quantized bundles and int8/FP8 KV caches); they skip without a GPU, which counts as a failure
   here. Full output in $OUT/tests.txt, a JUnit report in $OUT/tests.xml.
3. `rates`: the device's ceilings, with torch: device-to-device copy bandwidth (bytes read +
   written) and the bf16 matrix product rate (8192^3 on random data).
4. `bench`: the benchmark checkpoint (`medium`: a 836M-parameter bf16 Llama, benchmarks/models.py,
   made here without a tokenizer) compiled for cuda at the device's architecture: 2047-token
   prefill tok/s and the linears' share of the matmul rate (their FLOPs over the whole prefill's
   time: a lower bound), batch-1 and batch-32 decode tok/s (decode_step_s: the prefills subtracted,
   every sequence decoding), batch 1 against the HBM floor (weight
   bytes per step over the copy bandwidth), the executor's own single steps and 64-step runs
   (multi-step decode), and `llmirc bench`'s run on the same bundle.
5. `profile` (with --diagnose): every kernel of a decode step (batch 1 and 32) and of the prefill, timed on the
   device inside the step's graph (benchmarks/gpu_profile.py: torch's profiler): per kind in the
   result, per launch (device time, the gap before the next kernel, weight GB/s, TFLOP/s) in
   $OUT/profile_none.json; after each `--quant` bench, its profile too. Without --diagnose the
   run is the issue's checks and benchmark, within its 8 minutes (480 s, the default budget).
6. `sweep` (with --diagnose): the linear kernel's tile configurations against each other and cuBLAS at the
   model's linear shapes, for batch-1 and batch-32 decode and the prefill
   (benchmarks/gpu_sweep.py): the best three per shape, every row in $OUT/sweep.json.
7. `peer`: transformers on the same checkpoint and GPU, bf16, static KV cache (with which
   generate compiles the decode step: torch.compile, mode reduce-overhead): batch-1 decode tok/s.
8. then each `--quant` bench (and its profile with --diagnose) and each `--kv` bench; last, with
   --diagnose, the bench of what is off by default until a GPU says it pays: `bench_pdl`, with
   programmatic dependent launch (CompileOptions.gpu_pdl, targets/triton/pdl.py), and
   `bench_fused`, with the GPU-only fusions (CompileOptions.gpu_fusions, fuse.py).

Each stage runs in a process of its own under a time limit (a hung kernel costs its stage, not
the run); stages that no longer fit `--budget` are skipped and say so. Writes $OUT/gpu_check.json
and $OUT/gpu_check.txt (what it printed). Record them, and the date, in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GPU_CHECK_WORK", Path(tempfile.gettempdir()) / "gpu_check"))
PROMPT = 2047  # prefill tokens: with the one token generated, the benchmark model's whole context
DECODE_PROMPT, DECODE_STEPS = 128, 128


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "gpu_check.txt", "a") as f:
        f.write(text + "\n")


def install_missing(out: Path) -> None:
    missing = []
    for module in ("xdsl", "gguf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        log(out, f"installing from wheels/: missing {missing}")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            *map(str, sorted((ROOT / "wheels").glob("*.whl")))], capture_output=True, text=True)
        log(out, (r.stdout + r.stderr)[-2000:])
    try:
        import llmirc.driver  # noqa: F401  (this checkout, installed)
    except ImportError:
        log(out, "installing this checkout (pip install -e, no network)")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True)
        log(out, (r.stdout + r.stderr)[-2000:])


# -- stages (each in its own process: `--stage NAME`, JSON on stdout's last line) --------------------
def stage_rates() -> dict:
    import torch
    n = 2 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def timed(fn, repeat):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat

    out["copy_bandwidth_gb_s"] = 2 * n / timed(lambda: b.copy_(a), 20) / 1e9
    del a, b
    x, y = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out["bf16_matmul_tflop_s"] = 2 * 8192**3 / timed(lambda: x @ y, 10) / 1e12
    return out


def make_checkpoint(model_name: str) -> Path:
    """The benchmark checkpoint (benchmarks/models.py's spec and weights), without a tokenizer:
    the benchmark times token ids."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import models
    if model_name not in models.MODELS:
        return Path(model_name).resolve()
    ckpt = WORK / model_name
    if not (ckpt / "config.json").is_file():
        models._make(models.MODELS[model_name], ckpt.with_suffix(".tmp"), with_tokenizer=False)
        os.replace(ckpt.with_suffix(".tmp"), ckpt)
    return ckpt


def compiled_bundle(model_name: str, quant: str, kv: str, target: str = "cuda",
                    option: str = "none") -> tuple[Path, dict]:
    """(bundle, facts) of the benchmark checkpoint compiled for `target` at this device's
    architecture (compiled once per process tree: a later stage finds it in WORK); `option`: a
    CompileOptions flag to turn on (gpu_fusions, gpu_pdl; `none`: the defaults)."""
    from llmirc.driver import CompileOptions, Progress, compile_model
    from llmirc.runtime.gpu_drivers import CudaDriver

    t0 = time.perf_counter()
    ckpt = make_checkpoint(model_name)
    result = {"model": model_name, "quant": quant, "kv_cache_dtype": kv, "checkpoint_s": time.perf_counter() - t0}
    dev = CudaDriver().open() if target == "cuda" else {"name": "cpu", "arch": None, "driver_version": None}
    bundle = WORK / f"{Path(model_name).name}-{target}-{dev['arch']}-{quant}-kv-{kv}-{option}.llmir"
    t0 = time.perf_counter()
    if not (bundle / "manifest.json").is_file():
        compile_model(ckpt, bundle, CompileOptions(targets=(target,), archs=(dev["arch"],) if dev["arch"] else (),
                                                   quant=quant, kv_cache_dtype=kv,
                                                   **({} if option == "none" else {option: True})),
                      Progress(sys.stderr))
    result |= {"device": dev["name"], "arch": dev["arch"], "driver_version": dev["driver_version"],
               "compile_s": time.perf_counter() - t0}
    return bundle, result


def stage_bench(model_name: str, quant: str, kv: str, target: str = "cuda", option: str = "none") -> dict:
    """`target` cpu: the same steps on the CPU target (a dry run of this script on a host without a GPU)."""
    from llmirc.runtime.bench import decode_bytes_per_step
    from llmirc.runtime.model import load

    bundle, result = compiled_bundle(model_name, quant, kv, target, option)
    result["option"] = option
    t0 = time.perf_counter()
    model = load(bundle, max_num_batched_tokens=PROMPT, max_num_seqs=32, enable_prefix_caching=False,
                 kv_cache_tokens=None if target == "cuda" else 32 * (DECODE_PROMPT + 2 * DECODE_STEPS))
    result["load_s"] = time.perf_counter() - t0
    assert model.executor.kind == target, model.target_notes
    prompt = [5 + (7 * i) % 31000 for i in range(PROMPT)]
    model.generate([prompt[:16]], 4, ignore_eos=True)  # kernels warm, the graph of bucket 1 captured
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.generate([prompt], 1, ignore_eos=True)
        times.append(time.perf_counter() - t0)
    prefill_s = min(times)
    result["prefill_tokens"], result["prefill_tok_s"] = PROMPT, PROMPT / prefill_s
    for batch in (1, 32):
        step = decode_step_s(model, [prompt[:DECODE_PROMPT]] * batch)
        result[f"decode_b{batch}_tok_s"] = batch / step
        result[f"decode_b{batch}_ms_per_step"] = step * 1e3
        if hasattr(model.executor, "forward_tokens"):  # the executor's step alone, without the engine around it
            result[f"decode_b{batch}_executor_ms_per_step"] = executor_step_s(model.executor, batch) * 1e3
        if getattr(model.executor, "supports_greedy_runs", False):  # and its multi-step decode, 64 steps a run
            result[f"decode_b{batch}_executor_run_ms_per_step"] = executor_step_s(model.executor, batch, 64, 5) * 1e3
    weight_bytes = sum(v for k, v in decode_bytes_per_step(model, DECODE_PROMPT).items() if not k.startswith("kv"))
    result["weight_bytes_per_step"] = weight_bytes
    if quant == "none":  # the prefill linears' FLOPs: 2 x tokens x their parameters (not the LM head)
        order = model.bundle.manifest["weights"]["order"]
        params = sum(w.size for n, w in zip(order, model.executor.weights)
                     if n.startswith("model.layers.") and "norm" not in n)
        result["prefill_linear_tflop"] = 2 * PROMPT * params / 1e12
        result["prefill_linear_tflop_s"] = result["prefill_linear_tflop"] / prefill_s
    model.close()
    if quant == "none" and kv == "auto" and option == "none":  # `llmirc bench`'s own run (floor: the copy probe)
        from llmirc.runtime.bench import run_bench
        r = run_bench(bundle, prompt_len=DECODE_PROMPT, new_tokens=64, repeat=2, target=target)
        result["llmirc_bench"] = {k: r[k] for k in ("bandwidth_gb_s", "decode_floor_ms_per_step")} | \
            {k: r["llmirc"][k] for k in ("decode_tok_s", "decode_ms_per_step", "fraction_of_floor", "prefill_tok_s")}
    return result


def stage_profile(model_name: str, quant: str) -> dict:
    """Every kernel of a decode step (batch 1, 32) and a prefill, timed on the device in the step's
    graph (benchmarks/gpu_profile.py): per kind here, per launch in $OUT/profile_<quant>.json."""
    import gpu_profile
    bundle, result = compiled_bundle(model_name, quant, "auto")
    full = gpu_profile.profile_bundle(bundle)
    (Path(os.environ["OUT"]) / f"profile_{quant}.json").write_text(json.dumps(full, indent=1))
    return result | gpu_profile.brief(full)


def stage_sweep(model_name: str) -> dict:
    """The linear kernel's tile configurations at the model's shapes (benchmarks/gpu_sweep.py):
    the best per case here, every row in $OUT/sweep.json."""
    import gpu_sweep
    path = Path(os.environ["OUT"]) / "sweep.json"
    full = gpu_sweep.sweep(model_name, log=lambda m: print(m, file=sys.stderr),
                           save=lambda partial: path.write_text(json.dumps(partial, indent=1)))
    path.write_text(json.dumps(full, indent=1))
    return gpu_sweep.best(full)


def decode_step_s(model, prompts: list) -> float:
    """Seconds per decode step of the engine with every one of `prompts` decoding: generate of 1 +
    DECODE_STEPS tokens less generate of 1 + DECODE_STEPS / 2 (the same prefills, which a batch's
    later sequences run while its first ones decode; the engine's runs of 8 steps end at both),
    the least of two tries each."""
    def generate_s(new_tokens):
        t0 = time.perf_counter()
        model.generate(prompts, new_tokens, ignore_eos=True)
        return time.perf_counter() - t0
    half = DECODE_STEPS // 2
    return (min(generate_s(1 + DECODE_STEPS) for _ in range(2)) - min(generate_s(1 + half) for _ in range(2))) / half


def executor_step_s(executor, batch: int, run: int = 1, repeat: int = 50) -> float:
    """Seconds per greedy decode step of `batch` sequences of DECODE_PROMPT tokens, calling the executor
    directly: single steps (forward_tokens: a graph launch, the inputs' upload and the token ids'
    copy back), or runs of `run` steps (forward_greedy: the multi-step decode the engine uses)."""
    import numpy as np
    from gpu_profile import decode_inputs
    inputs = decode_inputs(executor, batch, DECODE_PROMPT, run)
    sampling = (np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
                np.zeros(batch, np.int64), np.zeros(batch, np.int64))

    def once():
        return executor.forward_greedy(inputs, run) if run > 1 else executor.forward_tokens(inputs, *sampling)
    once()
    t0, steps = time.perf_counter(), 0
    for _ in range(repeat):
        tokens = once()
        steps += len(tokens) if run > 1 else 1
    return (time.perf_counter() - t0) / steps


def stage_peer(model_name: str, device: str = "cuda") -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    ckpt = make_checkpoint(model_name)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    # a static cache on a GPU: generate compiles the decode step itself (its compile_config: torch.compile,
    # mode reduce-overhead, fullgraph); a forward compiled by hand besides breaks on its CUDA graphs' outputs
    ids = torch.tensor([[5 + (7 * i) % 31000 for i in range(DECODE_PROMPT)]], device=device)
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)

    def run(n):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        assert out.shape[1] == DECODE_PROMPT + n
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    run(DECODE_STEPS + 1), run(1)  # compiles (prefill and decode shapes), captures
    warm = time.perf_counter() - t0
    step = (min(run(DECODE_STEPS + 1) for _ in range(2)) - min(run(1) for _ in range(2))) / DECODE_STEPS
    return {"peer": f"transformers {__import__('transformers').__version__}, static cache (generate's own "
            "torch.compile, reduce-overhead), bf16", "compiled": getattr(model, "_compiled_call", None) is not None,
            "warmup_s": warm, "decode_b1_tok_s": 1 / step, "decode_b1_ms_per_step": step * 1e3}


def run_stage(out: Path, name: str, argv: list[str], limit: float) -> dict | None:
    """Runs `--stage` argv in a child under `limit` seconds; its result (or error) as a dict."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--stage", *argv], capture_output=True, text=True,
                           timeout=limit, cwd=ROOT)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = _text(e.stdout), _text(e.stderr), "timeout"
    took = time.perf_counter() - t0
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        result = json.loads(last)
    except ValueError:
        result = {"error": f"exit {rc}", "stderr_tail": stderr[-3000:]}
    result["stage_s"] = round(took, 1)
    trace = result.pop("traceback", None) or result.pop("stderr_tail", None)
    log(out, f"--- {name} ({took:.0f}s): {json.dumps(result, indent=1)}")
    if trace:
        log(out, trace)
    return result


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def child(argv: list[str]) -> int:
    """One stage: prints its result as JSON on the last line (an error's traceback as the result)."""
    try:
        if argv[0] == "rates":
            result = stage_rates()
        elif argv[0] == "bench":
            result = stage_bench(*argv[1:])
        elif argv[0] == "profile":
            result = stage_profile(*argv[1:])
        elif argv[0] == "sweep":
            result = stage_sweep(*argv[1:])
        else:
            result = stage_peer(*argv[1:])
    except BaseException as e:  # noqa: BLE001  (reported, not hidden: the parent records it)
        result = {"error": f"{type(e).__name__}: {str(e)[:1000]}", "traceback": traceback.format_exc()[-3000:]}
    print("\n" + json.dumps(result, default=str), flush=True)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--stage"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="a benchmarks/models.py name or a checkpoint folder")
    parser.add_argument("--quant", default="int4", help="quantized variants to benchmark too (comma-separated; "
                                                           "'' for none)")
    parser.add_argument("--kv", default="fp8", help="KV cache types to benchmark the float model with too "
                                                   "(comma-separated; '' for none)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--diagnose", action="store_true", help="also the profile and sweep stages (a few minutes "
                        "more: give --budget to match)")
    args = parser.parse_args()
    if "OUT" not in os.environ:
        print("gpu_check: set OUT to the folder for the results", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    log(out, f"gpu_check {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                            "--format=csv,noheader"], capture_output=True, text=True)
        log(out, f"nvidia-smi: {r.stdout.strip() or r.stderr.strip()}")
    except FileNotFoundError:
        log(out, "nvidia-smi: not found")
    install_missing(out)
    results: dict = {"date_utc": datetime.date.today().isoformat()}
    ok = True
    if not args.skip_tests:
        limit = max(30.0, min(240.0, deadline - time.perf_counter() - 150))
        cmd = [sys.executable, "-m", "pytest", "tests/test_gpu_targets.py", "-m", "gpu", "-n", "0", "-q", "-rs",
               "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = _text(e.stdout) + _text(e.stderr) + f"\n(stopped after {limit:.0f}s)", "timeout"
        (out / "tests.txt").write_text(text)
        summary = text.strip().splitlines()[-1] if text.strip() else ""
        results["tests"] = {"exit": rc, "summary": summary, "s": round(time.perf_counter() - t0)}
        ok = rc == 0 and "skipped" not in summary
        log(out, f"--- tests ({time.perf_counter() - t0:.0f}s, exit {rc}): {summary}")
        if "short test summary" in text:
            log(out, text[text.index("short test summary"):][-3000:])
    stages = [("rates", ["rates"], 40), ("bench", ["bench", args.model, "none", "auto"], 200)]
    if args.diagnose:  # the kernels' times, the linear's tile configurations
        stages += [("profile", ["profile", args.model, "none"], 90)]
        stages += [("sweep", ["sweep", args.model], 180)] if args.model in __import__("models").MODELS else []
    stages += [("peer", ["peer", args.model], 150)]
    for q in filter(None, args.quant.split(",")):
        stages += [(f"bench_{q}", ["bench", args.model, q, "auto"], 150)]
        stages += [(f"profile_{q}", ["profile", args.model, q], 90)] if args.diagnose else []
    stages += [(f"bench_kv_{kv}", ["bench", args.model, "none", kv], 120) for kv in args.kv.split(",") if kv]
    if args.diagnose:  # what is off by default until measured: programmatic dependent launch, the fusions
        stages += [("bench_pdl", ["bench", args.model, "none", "auto", "cuda", "gpu_pdl"], 150)]
        stages += [("bench_fused", ["bench", args.model, "none", "auto", "cuda", "gpu_fusions"], 150)]
    for name, argv, limit in stages:
        left = deadline - time.perf_counter()
        if left < 30:
            results[name] = {"skipped": f"{left:.0f}s of the budget left"}
            log(out, f"--- {name}: skipped ({left:.0f}s of the budget left)")
            continue
        results[name] = run_stage(out, name, argv, min(limit, left))
        ok = ok and "error" not in results[name]
    if "decode_b1_ms_per_step" in results.get("bench", {}) and "copy_bandwidth_gb_s" in results.get("rates", {}):
        b, rates = results["bench"], results["rates"]
        floor_s = b["weight_bytes_per_step"] / (rates["copy_bandwidth_gb_s"] * 1e9)  # weights read once
        results["summary"] = {
            "decode_b1_fraction_of_hbm_floor": floor_s / (b["decode_b1_ms_per_step"] / 1e3),
            "decode_b1_executor_fraction_of_hbm_floor": floor_s / (b.get("decode_b1_executor_ms_per_step", 1e9) / 1e3),
            "decode_b32_over_b1": b["decode_b32_tok_s"] / b["decode_b1_tok_s"],
            "prefill_linears_fraction_of_matmul_rate": b.get("prefill_linear_tflop_s", 0) /
            rates["bf16_matmul_tflop_s"]}
        if "decode_b1_tok_s" in results.get("peer", {}):
            results["summary"]["decode_b1_over_peer"] = b["decode_b1_tok_s"] / results["peer"]["decode_b1_tok_s"]
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    log(out, "summary: " + json.dumps(results.get("summary", {}), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
