"""Load benchmark of `llmirc serve`: concurrent streaming clients whose prompts share a system
prompt, beside llama-cpp-python's OpenAI server (`llama_cpp.server`) on the same model when it
is installed and a GGUF file is given. Loopback only, bounded in requests and time.

    python benchmarks/serve_load.py CHECKPOINT_DIR [--bundle B.llmir] [--gguf MODEL.gguf]
        [--clients 64] [--max-tokens 64] [--threads 2] [--timeout 900]

CHECKPOINT_DIR is a Hugging Face checkpoint (compiled into a temporary bundle unless --bundle
is given; its tokenizer gives the prompts). Each client sends one streaming request at the same
moment: a chat completion (a shared system prompt + its own question) when the model has a chat
template, else a completion of the same text. Greedy, `max_tokens` each.

Checked for llmirc, from its stream alone: every request finishes and ends with [DONE], the
token ids streamed (vLLM's `return_token_ids`) number exactly the engine's
`usage.completion_tokens` and decode to exactly the streamed text (no token lost or duplicated),
and the server still answers /health afterwards. Reported per server: output tokens/s over the
whole run (first request sent to last token received), and p50/p99 time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import RunningServer, free_port  # noqa: E402

SYSTEM = ("You are a careful assistant for a team that builds compilers for machine learning models. Answer in "
          "plain words, keep each answer short, do not repeat the question, and prefer concrete facts over "
          "general advice. When you are not sure, say so. ") * 2
QUESTIONS = ["What does a compiler do?", "Why are caches fast?", "What is a KV cache?", "Name a prime number.",
             "What is paged attention?", "How do GPUs run kernels?", "What is quantization?",
             "Why batch requests?"]


def prompts_for(clients: int) -> list[str]:
    return [f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})" for i in range(clients)]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> dict:
    start = time.perf_counter()
    first = None
    text, ids, usage, finish, done = "", [], None, None, False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                delta = choice.get("delta", {}).get("content") if chat else choice.get("text")
                if delta and first is None:
                    first = time.perf_counter() - start
                text += delta or ""
                ids += choice.get("token_ids") or []
                finish = choice.get("finish_reason") or finish
    return {"ttft": first, "end": time.perf_counter(), "text": text, "ids": ids, "usage": usage, "finish": finish,
            "done": done}


async def load(url: str, model_name: str, prompts: list[str], chat: bool, max_tokens: int, timeout: float) -> dict:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    bodies = []
    for p in prompts:
        body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if chat:
            body["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
        else:
            body["prompt"] = SYSTEM + "\n" + p + "\n"
        bodies.append(body)
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one_request(client, path, b, chat)) for b in bodies]
        await asyncio.wait(tasks, timeout=timeout)
        results = [({"error": repr(t.exception())} if t.exception() else t.result()) if t.done() else
                   {"error": f"not finished within --timeout {timeout:.0f} s"} for t in tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"start": start, "results": results}


def summarize(name: str, run: dict, tokenizer=None) -> dict:
    results = run["results"]
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    tokens = [r["usage"]["completion_tokens"] if r.get("usage") else len(r["ids"]) for r in ok]
    wall = max(r["end"] for r in ok) - run["start"] if ok else float("nan")
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    out = {"server": name, "requests": len(results), "completed": sum(1 for r in ok if r["done"] and r["finish"]),
           "errors": errors[:3], "output_tokens": int(sum(tokens)), "wall_s": wall,
           "output_tok_s": sum(tokens) / wall if ok else 0.0,
           "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
           "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None}
    if tokenizer is not None:  # integrity: ids streamed == engine's count, and decode to the streamed text
        bad = [i for i, r in enumerate(ok) if r.get("usage") is None or len(r["ids"]) != r["usage"]["completion_tokens"]
               or tokenizer.decode(r["ids"]) != r["text"]]
        out["integrity_failures"] = bad
    return out


def start_llama_cpp(gguf: Path, threads: int, clients: int, context: int):
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"llama-cpp-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", str(context),
                             # by default each new request interrupts the one being served
                             "--interrupt_requests", "False"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"llama_cpp.server did not start (see {log.name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("--bundle", type=Path, help="an llmirc bundle of CHECKPOINT (default: compile one)")
    ap.add_argument("--gguf", type=Path, help="the same model as GGUF, for llama_cpp.server")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds for each server's whole run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 1 <= args.max_tokens <= 1024:
        sys.exit("error: --clients must be in [1, 256] and --max-tokens in [1, 1024]")

    from llmirc.runtime import load as load_bundle

    tmp = tempfile.TemporaryDirectory()
    bundle = args.bundle
    if bundle is None:
        from llmirc.driver import CompileOptions, Progress, compile_model

        bundle = Path(tmp.name) / "model.llmir"
        compile_model(args.checkpoint, bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    model = load_bundle(bundle, kv_cache_tokens=1024)  # only for its tokenizer and template
    if model.tokenizer is None:
        sys.exit(f"error: {args.checkpoint} has no tokenizer: the benchmark sends text prompts")
    chat = model.chat_template is not None
    prompts = prompts_for(args.clients)
    longest = max(len(model.encode(SYSTEM + q)) for q in prompts) + 64
    context = longest + args.max_tokens
    rows = []

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with RunningServer(bundle, "--served-model-name", "model", "--max-num-seqs", args.clients,
                       "--max-num-batched-tokens", max(2048, args.clients), "--threads", args.threads,
                       "--kv-cache-tokens", args.clients * context + 1024) as server:
        run = asyncio.run(load(server.url, "model", prompts, chat, args.max_tokens, args.timeout))
        row = summarize("llmirc", run, model.tokenizer)
        row["server_alive"] = httpx.get(server.url + "/health").status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        row["prefix_cache_hit_rate"] = float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines()
                                                  if line.startswith("llmirc:prefix_cache_hit_rate")))
        rows.append(row)

    if importlib.util.find_spec("llama_cpp") is None:
        rows.append({"server": "llama_cpp.server", "status": "not installed"})
    elif args.gguf is None:
        rows.append({"server": "llama_cpp.server", "status": "no --gguf given"})
    else:
        proc, url = start_llama_cpp(args.gguf, args.threads, args.clients, context)
        try:
            run = asyncio.run(load(url, str(args.gguf), prompts, chat, args.max_tokens, args.timeout))
            rows.append(summarize("llama_cpp.server", run))
        finally:
            proc.terminate()
            proc.wait(30)

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.clients} concurrent streaming clients, {'chat' if chat else 'completion'} requests sharing a "
              f"{len(model.encode(SYSTEM))}-token system prompt, {args.max_tokens} tokens each, greedy, "
              f"{args.threads} threads")
        print(f"{'server':18s}{'done':>8s}{'out tok/s':>11s}{'TTFT p50':>10s}{'TTFT p99':>10s}  checks")
        for r in rows:
            if "status" in r:
                print(f"{r['server']:18s}  {r['status']}")
                continue
            checks = "" if "integrity_failures" not in r else (
                "tokens intact" if not r["integrity_failures"] else f"{len(r['integrity_failures'])} streams differ")
            if "server_alive" in r:
                checks += ", server up" if r["server_alive"] else ", SERVER DOWN"
                checks += f", prefix cache hit rate {100 * r['prefix_cache_hit_rate']:.0f}%"
            print(f"{r['server']:18s}{r['completed']:>4d}/{r['requests']:<3d}{r['output_tok_s']:11.1f}"
                  f"{1e3 * (r['ttft_p50_s'] or 0):8.0f}ms{1e3 * (r['ttft_p99_s'] or 0):8.0f}ms  {checks}")
            if r["errors"]:
                print("  errors:", *r["errors"], sep="\n    ")
        ours = next(r for r in rows if r["server"] == "llmirc")
        peer = next((r for r in rows if r["server"] == "llama_cpp.server" and "output_tok_s" in r), None)
        if peer and peer["output_tok_s"]:
            print(f"llmirc / llama_cpp.server: throughput {ours['output_tok_s'] / peer['output_tok_s']:.2f}x, "
                  f"p99 TTFT {ours['ttft_p99_s'] / peer['ttft_p99_s']:.2f}x")
    ours = rows[0]
    failed = ours["completed"] != ours["requests"] or ours["integrity_failures"] or not ours["server_alive"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
