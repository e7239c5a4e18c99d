"""Every GPU check and the GPU benchmark, in one run, on a host with an NVIDIA GPU (NOT YET RUN).

    OUT=/path/to/results python benchmarks/gpu_check.py [--model medium] [--quant int4,int8] [--kv fp8,int8]
        [--skip-tests]

1. Installs what the host lacks (xdsl, gguf, ...) from wheels taken along in `wheels/` (an
   ignored folder: `pip download -d wheels xdsl==0.74.0 ...` on a machine with a registry);
   nothing is fetched from the network.
2. Runs the GPU tests (tests/test_gpu_targets.py: greedy tokens of Llama, Qwen2 and Mistral
   checkpoints compiled for cuda against transformers, quantized bundles (int8, int4 with
   zero points, int4 with down_proj's input rotated) against transformers on their dequantized weights, and int8 and FP8 KV caches; they
   skip without a GPU,
   which this script reports as a failure) with a JUnit report in $OUT.
3. Benchmarks a benchmark checkpoint (benchmarks/models.py; `medium`: a ~1B-parameter bf16
   Llama) compiled for cuda at the device's architecture: prefill tok/s of a 2048-token prompt,
   batch-1 and batch-32 decode tok/s, against the HBM floor (weight bytes per decode step over
   the device-to-device copy bandwidth measured in the same run with torch); then the same
   checkpoint compiled with each `--quant` scheme (default int4: the qlinear kernels) and with each
   `--kv` KV cache type (default fp8: the quantized KV kernels).

Writes $OUT/gpu_check.json and $OUT/gpu_check.txt (what it printed). Record them, and the date,
in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "gpu_check.txt", "a") as f:
        f.write(text + "\n")


def install_missing(out: Path) -> None:
    missing = []
    for module in ("xdsl", "llvmlite", "gguf", "onnx", "click", "tokenizers", "cuda.bindings"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        log(out, f"installing from wheels/: missing {missing}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(ROOT / "wheels"),
                        "--no-deps", "xdsl", "gguf", "cuda-bindings", "cuda-pathfinder"], check=False)
    try:
        import llmirc.driver  # noqa: F401  (this checkout, installed)
    except ImportError:
        log(out, "installing this checkout (pip install -e, no network)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                        "-e", str(ROOT)], check=True, stdout=subprocess.DEVNULL)


def copy_bandwidth(gib: float = 1.0, repeat: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write), with torch."""
    import torch
    n = int(gib * 2**30)
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * n * repeat / (time.perf_counter() - t0)


def benchmark(out: Path, model_name: str, quant: str | None = None, kv: str = "auto") -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import models

    from llmirc.driver import CompileOptions, Progress, compile_model
    from llmirc.runtime.bench import decode_bytes_per_step
    from llmirc.runtime.gpu_drivers import CudaDriver
    from llmirc.runtime.model import load

    dev = CudaDriver().open()
    arch = "sm_%d%d" % dev["capability"]
    ckpt, work = models.resolve(model_name)
    bundle = work / f"{model_name}-cuda-{arch}{'-' + quant if quant else ''}-kv-{kv}.llmir"
    t0 = time.perf_counter()
    compile_model(ckpt, bundle, CompileOptions(targets=("cuda",), archs=(arch,), quant=quant or "none",
                                               kv_cache_dtype=kv), Progress())
    result = {"device": dev["name"], "arch": arch, "driver_version": dev["driver_version"], "model": model_name,
              "quant": quant, "kv_cache_dtype": kv, "compile_s": time.perf_counter() - t0}
    bw = copy_bandwidth()
    result["copy_bandwidth_gb_s"] = bw / 1e9
    prompt = list(range(5, 2048 + 5))
    model = load(bundle, max_batched_tokens=2048, max_num_seqs=32, enable_prefix_caching=False)
    assert model.executor.kind == "cuda", model.target_notes
    model.generate([prompt[:16]], 4, ignore_eos=True)  # kernels warm, graphs of bucket 1 captured
    t0 = time.perf_counter()
    model.generate([prompt], 1, ignore_eos=True)
    result["prefill_2048_tok_s"] = 2048 / (time.perf_counter() - t0)
    for batch in (1, 32):
        times = []
        for event in model.generate_stream([prompt[:128]] * batch, max_new_tokens=129, ignore_eos=True):
            if event.request_id == 0:
                times.append(time.perf_counter())
        step = (times[-1] - times[1]) / (len(times) - 2)  # after the first token
        result[f"decode_b{batch}_tok_s"] = batch / step
        result[f"decode_b{batch}_ms_per_step"] = step * 1e3
    weight_bytes = sum(v for k, v in decode_bytes_per_step(model, 192).items() if not k.startswith("kv"))
    floor = weight_bytes / (bw / 2)  # seconds per step if the weights are read once at copy speed
    result["weight_bytes_per_step"] = weight_bytes
    result["decode_b1_fraction_of_hbm_floor"] = floor / (result["decode_b1_ms_per_step"] / 1e3)
    result["decode_b32_over_b1"] = result["decode_b32_tok_s"] / result["decode_b1_tok_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="a benchmarks/models.py name or a checkpoint folder")
    parser.add_argument("--quant", default="int4", help="quantized variants to benchmark too (comma-separated; "
                                                           "'' for none)")
    parser.add_argument("--kv", default="fp8", help="KV cache types to benchmark the float model with too "
                                                   "(comma-separated; '' for none)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if "OUT" not in os.environ:
        print("gpu_check: set OUT to the folder for the results", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    log(out, f"gpu_check {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    install_missing(out)
    results: dict = {"date_utc": datetime.date.today().isoformat()}
    ok = True
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu_targets.py", "-q", "-rs",
                            "-k", "gpu_greedy or gpu_quantized", f"--junitxml={out / 'gpu_tests.xml'}"], cwd=ROOT,
                           capture_output=True, text=True)
        log(out, r.stdout[-4000:] + r.stderr[-2000:])
        ok = r.returncode == 0 and " skipped" not in r.stdout.splitlines()[-1]
        results["tests_passed"] = ok
    variants = [(None, "auto")] + [(q, "auto") for q in args.quant.split(",") if q] + \
        [(None, kv) for kv in args.kv.split(",") if kv]
    for quant, kv in variants:
        name = "benchmark" + (f"_{quant}" if quant else "") + (f"_kv_{kv}" if kv != "auto" else "")
        try:
            results[name] = benchmark(out, args.model, quant, kv)
        except Exception as e:  # noqa: BLE001  (recorded, not hidden)
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"
            ok = False
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    log(out, json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
