"""Where a GPU step's time goes: every kernel of a decode step (batch 1 and 32) and of a prefill,
timed on the device inside the CUDA graph the executor would run (benchmarks/gpu_check.py's
`profile` stage; needs torch with CUDA for its profiler, which reads the kernels' device times
through CUPTI).

Per launch: the plan kernel it belongs to (symbol, kind), the compiled kernel's name, grid, its
device time and the idle time before the next kernel starts (the graph's launch gap); for
linears and qlinears the weight bytes they read (every weight argument of the call: the HBM
bytes a decode linear must move) with the bandwidth that gives, and for float linears their
TFLOP/s (2 x tokens x weight elements). Per kind: totals. The medians over `replays` graph
launches.

    python benchmarks/gpu_profile.py BUNDLE          # prints the per-kind summary as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

PROMPT = 2047


def decode_inputs(ex, batch: int, context: int = 128, steps: int = 1):
    """A decode step of `batch` sequences of `context` tokens (the flat-batch ABI), their block
    tables long enough for `steps` steps."""
    blocks = -(-(context + steps) // ex.block_size)
    tables = np.arange(batch * blocks, dtype=np.int32).reshape(batch, blocks)
    pos = context - 1
    slots = tables[:, pos // ex.block_size] * ex.block_size + pos % ex.block_size
    return (np.full(batch, 5, np.int32), np.full(batch, pos, np.int32), slots.astype(np.int32), tables,
            np.full(batch, context, np.int32), np.arange(batch + 1, dtype=np.int32), np.arange(batch, dtype=np.int32))


def _prefill_inputs(ex, tokens: int):
    blocks = -(-tokens // ex.block_size)
    t = np.arange(tokens, dtype=np.int32)
    return ((5 + 7 * t) % min(1000, ex.vocab_size), t, t, np.arange(blocks, dtype=np.int32)[None],
            np.array([tokens], np.int32), np.array([0, tokens], np.int32), np.array([tokens - 1], np.int32))


def call_costs(ex) -> dict:
    """{symbol: (kind, weight bytes, weight elements of a float `linear`'s w or 0)} of the plan's kernels."""
    kinds = {k["symbol"]: k["rule"]["kind"] for k in ex.target["kernels"]}
    out = {}
    for symbol, args in ex.program.steps:
        idx = [a["index"] for a in args.values() if isinstance(a, dict) and a.get("ptr") == "weight"]
        w = args.get("w")
        elems = ex.weights[w["index"]].size if kinds[symbol] == "linear" and isinstance(w, dict) else 0
        out[symbol] = (kinds[symbol], sum(ex.weights[i].nbytes for i in idx), elems)
    return out


def staged_launches(ex, inputs) -> tuple[list, int]:
    """Uploads `inputs` as GpuExecutor._step does and returns (the launches of that step, tokens)."""
    from llmirc.runtime.gpu_executor import GREEDY
    from llmirc.runtime.step_check import checked_inputs
    T, B, L, max_blocks, bucket = ex._stage(checked_inputs(ex.limits, *inputs), GREEDY)
    if bucket is not None:
        return list(ex._launches(bucket, bucket, bucket, ex.max_blocks)), T
    return list(ex._launches(T, B, L, max_blocks)), T


def per_launch(launches, names: dict, kernels: list, replays: int) -> list[dict]:
    """Medians per launch from the device's kernel records of `replays` runs of `launches`:
    `kernels` is [(name, start_us, end_us)] in start order, `names` {binary key: kernel name}.
    ValueError when the records do not line up with the launches."""
    n = len(launches)
    if len(kernels) != n * replays:
        raise ValueError(f"{len(kernels)} kernel records for {replays} x {n} launches")
    rows = []
    for i, ln in enumerate(launches):
        recs = [kernels[r * n + i] for r in range(replays)]
        if any(rec[0] != names[ln.kernel] for rec in recs):
            raise ValueError(f"launch {i}: recorded {recs[0][0]!r}, launched {names[ln.kernel]!r}")
        gaps = [kernels[r * n + i + 1][1] - rec[2] for r, rec in enumerate(recs) if i + 1 < n]
        rows.append({"symbol": ln.symbol, "kernel": names[ln.kernel], "grid": list(ln.grid),
                     "us": statistics.median(rec[2] - rec[1] for rec in recs),
                     "gap_us": statistics.median(gaps) if gaps else 0.0})
    return rows


def summarize(rows: list[dict], costs: dict, tokens: int) -> dict:
    """Totals per kind, and per launch bandwidth / TFLOP/s where the call reads weights."""
    by_kind: dict = {}
    for r in rows:
        kind, nbytes, elems = costs.get(r["symbol"], (r["symbol"], 0, 0))
        nbytes = nbytes if kind in ("linear", "qlinear") else 0  # (an embedding reads T rows of its table)
        r["kind"] = kind
        if nbytes:
            r["weight_gb_s"] = nbytes / (r["us"] * 1e3)
        if elems:
            r["tflop_s"] = 2 * tokens * elems / (r["us"] * 1e6)
        k = by_kind.setdefault(kind, {"launches": 0, "us": 0.0, "gap_us": 0.0, "weight_bytes": 0})
        k["launches"] += 1
        k["us"] += r["us"]
        k["gap_us"] += r["gap_us"]
        k["weight_bytes"] += nbytes
    for k in by_kind.values():
        if k["weight_bytes"]:
            k["weight_gb_s"] = k["weight_bytes"] / (k["us"] * 1e3)
    return {"kernels_us": sum(r["us"] for r in rows), "gaps_us": sum(r["gap_us"] for r in rows),
            "by_kind": by_kind}


def replay_us(driver, graph, stream, replays: int) -> float:
    """Host-timed microseconds per launch of an executable graph, after two untimed."""
    for _ in range(2):
        driver.call("graph_launch", graph, stream)
    driver.call("synchronize", stream)
    t0 = time.perf_counter()
    for _ in range(replays):
        driver.call("graph_launch", graph, stream)
    driver.call("synchronize", stream)
    return (time.perf_counter() - t0) / replays * 1e6


def profile_step(ex, inputs, replays: int = 5) -> dict:
    """One step's launches captured as a graph, replayed under torch's profiler (CUPTI)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.zeros(1, device="cuda")  # torch's CUDA state (the same primary context as the executor's)
    with ex.lock:
        ex.driver.make_current()
        launches, tokens = staged_launches(ex, inputs)
        graph = ex.driver.capture(ex.stream, lambda: [ex._launch(ln) for ln in launches])
        try:
            wall_us = replay_us(ex.driver, graph, ex.stream, 20)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    ex.driver.call("graph_launch", graph, ex.stream)
                    ex.driver.call("synchronize", ex.stream)
            torch.cuda.synchronize()
        finally:
            ex.driver.call("destroy_graph_exec", graph)
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[1])
    names = {key: b["symbol"] for key, b in ex.program.binaries.items()}
    rows = per_launch(launches, names, kernels, replays)
    out = {"tokens": tokens, "launches": len(launches), "graph_wall_us": wall_us}
    out |= summarize(rows, call_costs(ex), tokens)
    out["per_launch"] = rows
    return out


def profile_bundle(bundle, cases=("decode_b1", "decode_b32", "prefill")) -> dict:
    from llmirc.runtime.model import load
    model = load(bundle, max_num_batched_tokens=PROMPT, max_num_seqs=32, enable_prefix_caching=False)
    try:
        ex = model.executor
        out = {}
        for case in cases:
            inputs = _prefill_inputs(ex, PROMPT) if case == "prefill" else decode_inputs(ex, int(case[8:]))
            try:
                out[case] = profile_step(ex, inputs)
            except Exception as e:  # noqa: BLE001  (a case's failure is reported; the others still run)
                out[case] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        return out
    finally:
        model.close()


def brief(result: dict) -> dict:
    """The per-kind summary of profile_bundle's result (no per-launch rows)."""
    return {case: {k: v for k, v in r.items() if k != "per_launch"} for case, r in result.items()}


if __name__ == "__main__":
    print(json.dumps(brief(profile_bundle(sys.argv[1])), indent=1))
