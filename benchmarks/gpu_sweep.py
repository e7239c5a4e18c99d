"""The linear kernel's tile configurations against each other on this GPU (benchmarks/gpu_check.py's
`sweep` stage): the kernels compiled ahead of time as a bundle's are (targets/triton/linear.py's
rule with its variant's configuration replaced, compile_kernels on every core), launched through
llmirc's own driver adapter inside a CUDA graph, at a benchmark model's linear shapes and the
token counts of batch-1 decode (T = 1), batch-32 decode (T = 32) and a prefill (T = 2047), with
the residual add in o_proj's and down_proj's epilogues as llmirc's plans have it. torch's own
bf16 linear (cuBLAS, no residual) on the same shapes is the reference.

A graph launches each kernel `REPEAT` times, each on another copy of the weights (copies enough
to overrun the L2 cache twice: a decode step reads every weight from HBM once). Figures: device
microseconds per launch (host-timed graph replays / launches), weight GB/s, TFLOP/s, and the
error of the last launch's output against torch in float32 (a configuration that computes wrong
results is never ranked).

    python benchmarks/gpu_sweep.py [medium]      # needs torch with CUDA, cuda-python, Triton
"""

from __future__ import annotations

import itertools
import json
import sys
import time

REPEAT, REPLAYS = 32, 10
L2_BYTES = 64 << 20  # H100/H200: 50 MB; MI300X: 256 MB of Infinity Cache, which this does not defeat
TOKENS = {"decode_b1": (1, 16), "decode_b32": (32, 128), "prefill": (2047, None)}  # T, the rule's T range
RESIDUAL = ("o_proj", "down_proj")  # the linears whose epilogue adds the residual stream in llmirc's plans


def model_shapes(name: str) -> dict[str, tuple[int, int]]:
    """{linear: (n, k)} of benchmarks/models.py's `name` (fused q/k/v and gate/up, as llmirc's plan)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import models
    c = models.MODELS[name]
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return {"qkv_proj": (h + 2 * kv, h), "o_proj": (h, h), "gate_up_proj": (2 * inter, h),
            "down_proj": (h, inter), "lm_head": (c.get("vocab_size", 32000), h)}


def candidates(t_max) -> list[dict]:
    """Tile configurations to try for one T range (the default is measured besides)."""
    if t_max == 16:
        grid = itertools.product([16], [32, 64], [128, 256], [1, 2, 4], [3, 5], [None, "x2"])
    elif t_max == 128:
        grid = itertools.product([16, 32], [64, 128, 256], [64, 128], [4], [3, 4], [None])
    else:
        grid = itertools.product([64, 128], [128, 256], [64, 128], [4, 8], [3, 4], [None])
    out = []
    for bm, bn, bk, warps, stages, split in grid:
        smem = stages * (bm * bk * 4 + bn * bk * 2)  # the f32 x tile and the bf16 weight tile per stage
        if smem <= 200 << 10:
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
                        **({"split_k": split} if split else {})})
    return out


def _rule(n: int, k: int, arch, t_max, cfg: dict | None, residual: bool = False):
    """The linear's rule with `cfg` for the T range `t_max` (split_k "x2": twice the split the rule
    chooses for that tile), its leading dimensions aligned as the benchmark models' are; `residual`:
    with the residual add in its epilogue (on sm_90 the 128 x 256 prefill tile spills there)."""
    from llmirc.targets.signatures import SIGNATURES
    from llmirc.targets.triton.kinds import triton_args
    from llmirc.targets.triton.linear import T_RANGES, rule_linear
    params = {"n": n, "k": k, "bias": False, "residual": residual, "w_dtype": "bfloat16"}
    args = triton_args(SIGNATURES["linear"], params)
    cfg = dict(cfg or {})
    if cfg.get("split_k") == "x2":
        auto = rule_linear(params, arch, args, {t_max: cfg | {"split_k": None}})
        cfg["split_k"] = 2 * auto.variants[T_RANGES.index(t_max)].launches[0].grid[1]
    rule = rule_linear(params, arch, args, {t_max: cfg} if cfg else None)
    aligned = {"out", "x", "w", "bias", "residual", "ld_out", "ld_x", "ld_res", "splitk_workspace"}
    return rule.with_aligned(aligned)


def sweep(model: str = "medium", arch_name: str | None = None, jobs: int = 16, log=print, save=None) -> dict:
    """Every configuration of `candidates` and the default at `model`'s shapes; `save(result)` is
    called after each case (so a run stopped by its time limit keeps the cases it finished)."""
    import torch

    from gpu_profile import replay_us

    from llmirc.runtime import launch_rules
    from llmirc.runtime.gpu_drivers import CudaDriver
    from llmirc.runtime.gpu_program import pack
    from llmirc.targets.triton.arch import get_arch
    from llmirc.targets.triton.compile import CompileError, compile_kernels
    from llmirc.targets.triton.linear import T_RANGES

    driver = CudaDriver()
    dev = driver.open()
    arch = get_arch(arch_name or dev["arch"])
    torch.zeros(1, device="cuda")
    stream = driver.create_stream()
    shapes = model_shapes(model)
    jobs_list = []  # (case, linear, cfg or None (the default), the kernel of that T range, rule)
    for case, (T, t_max) in TOKENS.items():
        for name, (n, k) in shapes.items():
            if name == "lm_head" and case == "prefill":  # (the LM head runs on the logits rows only)
                continue
            for cfg in [None, *candidates(t_max)]:
                try:
                    rule = _rule(n, k, arch, t_max, cfg, name in RESIDUAL)
                except ValueError:
                    continue
                spec = rule.variants[T_RANGES.index(t_max)].launches[0].kernel
                jobs_list.append((case, name, cfg, spec, rule))
    specs = {spec.key(): spec for *_, spec, _ in jobs_list}
    t0 = time.perf_counter()
    compiled = {}
    keys = list(specs)
    for i in range(0, len(keys), 64):  # a batch that fails is compiled one by one (shared memory)
        batch = keys[i:i + 64]
        try:
            compiled |= dict(zip(batch, compile_kernels([(specs[key], arch.name) for key in batch], jobs=jobs)))
        except CompileError:
            for key in batch:
                try:
                    compiled[key] = compile_kernels([(specs[key], arch.name)], jobs=1)[0]
                except CompileError:
                    pass
    log(f"sweep: {len(compiled)} of {len(specs)} kernels compiled in {time.perf_counter() - t0:.0f}s")

    modules, results = [], {}
    weights = {}
    done = lambda: {"device": dev["name"], "arch": arch.name, "model": model, "results": results}  # noqa: E731
    for i, (case, name, cfg, spec, rule) in enumerate(jobs_list):
        if i and case != jobs_list[i - 1][0]:
            _cublas(jobs_list[i - 1][0], shapes, weights, results)
            if save:
                save(done())
        T, t_max = TOKENS[case]
        n, k = shapes[name]
        c = compiled.get(spec.key())
        rj = rule.to_json()
        env = {"T": T}
        (ln,) = launch_rules.select(rj, env)
        row = {"config": cfg or "default", "grid": launch_rules.grid(ln, env)}
        results.setdefault(case, {}).setdefault(name, []).append(row)
        if c is None:
            row["error"] = "does not compile"
            continue
        if (n, k) not in weights:
            copies = max(1, -(-2 * L2_BYTES // (2 * n * k)))
            weights[(n, k)] = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ws = weights[(n, k)]
        x = torch.randn(T, k, device="cuda")
        out = torch.empty(T, n, device="cuda")
        res = torch.randn(T, n, device="cuda") if name in RESIDUAL else None
        scratch = torch.zeros(max(1, launch_rules.buffer_bytes(rj, env | {"T": t_max or T})["splitk_workspace"] // 4),
                              device="cuda")
        module, fn = driver.load(c.binary, c.metadata["symbol"], c.metadata["shared"], f"linear {name} {cfg}")
        modules.append(module)
        binary = {"params": c.metadata["params"], "kernel": c.kernel}
        cells = []

        def record():
            for r in range(REPEAT):
                values = {"out": out.data_ptr(), "ld_out": n, "x": x.data_ptr(), "ld_x": k,
                          "w": ws[r % len(ws)].data_ptr(), "bias": 0,
                          "residual": 0 if res is None else res.data_ptr(), "ld_res": n, "T": T,
                          "splitk_workspace": scratch.data_ptr()} | launch_rules.scalars(ln, env)
                params, keep = pack(binary, tuple(values[a] for a in ln["args"]) + (0, 0))
                cells.append((params, keep))
                driver.launch(fn, launch_rules.grid(ln, env), c.metadata["num_warps"] * arch.warp_size,
                              c.metadata["shared"], stream, params)
        try:
            graph = driver.capture(stream, record)
            us = replay_us(driver, graph, stream, REPLAYS) / REPEAT
            driver.call("destroy_graph_exec", graph)
        except Exception as e:  # noqa: BLE001  (a config that fails to launch is reported, the rest go on)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        ref = x.to(torch.bfloat16).float() @ ws[(REPEAT - 1) % len(ws)].float().T  # the last launch's
        ref = ref if res is None else ref + res
        row["max_rel_error"] = float((out - ref).abs().max() / ref.abs().max())
        row |= _figures(us, T, n, k)
    _cublas(jobs_list[-1][0], shapes, weights, results)
    for m in modules:
        driver.call("unload_module", m)
    driver.call("destroy_stream", stream)
    return done()


def _cublas(case: str, shapes: dict, weights: dict, results: dict) -> None:
    """torch's bf16 linear (cuBLAS) on `case`'s shapes, the same rotation of weight copies."""
    import torch
    T = TOKENS[case][0]
    for name, (n, k) in shapes.items():
        ws = weights.get((n, k))
        if not ws or name not in results[case]:  # (the prefill has no LM head row)
            continue
        x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.nn.functional.linear(x, ws[0])
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                for r in range(REPEAT):
                    torch.nn.functional.linear(x, ws[r % len(ws)])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPLAYS):
            g.replay()
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / (REPLAYS * REPEAT) * 1e6
        results[case][name].append({"config": "torch bf16 (cuBLAS)"} | _figures(us, T, n, k))


def _figures(us: float, T: int, n: int, k: int) -> dict:
    return {"us": round(us, 2), "weight_gb_s": round(2 * n * k / (us * 1e3), 1),
            "tflop_s": round(2 * T * n * k / (us * 1e6), 2)}


def best(result: dict, top: int = 3) -> dict:
    """Per case and linear: the default, cuBLAS and the `top` fastest configurations."""
    out = {}
    for case, by_name in result["results"].items():
        for name, rows in by_name.items():
            ok = sorted((r for r in rows if "us" in r and isinstance(r["config"], dict)
                         and r["max_rel_error"] < 1e-3), key=lambda r: r["us"])
            out.setdefault(case, {})[name] = {
                "default": next((r for r in rows if r["config"] == "default"), None),
                "cublas": next((r for r in rows if r["config"] == "torch bf16 (cuBLAS)"), None), "best": ok[:top],
                "wrong": sum(r.get("max_rel_error", 0) >= 1e-3 for r in rows)}
    return out


if __name__ == "__main__":
    print(json.dumps(best(sweep(*sys.argv[1:2])), indent=1))
