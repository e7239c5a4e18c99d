"""Latency of small requests to `llmirc serve` over one keep-alive connection, as API clients send them
(the openai client keeps its connections): /tokenize, a 1-token completion, a 1-token chat completion,
and a streamed completion's time to first and between tokens. Loopback, one request at a time.

    python benchmarks/serve_latency.py BUNDLE [--requests 20] [--port 0]

Prints the median and the worst of each, in milliseconds. The first request on a connection is left
out (a new connection's first round trips take other paths through TCP: its quick-ACK mode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import RunningServer  # noqa: E402

REQUESTS = {
    "/tokenize": {"prompt": "the quick brown fox"},
    "/v1/completions (1 token)": {"prompt": "the quick brown fox", "max_tokens": 1, "temperature": 0},
    "/v1/chat/completions (1 token)": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                       "temperature": 0},
}


def timed(client: httpx.Client, path: str, body: dict, n: int) -> list[float]:
    out = []
    for _ in range(n + 1):
        start = time.perf_counter()
        client.post(path.split(" ")[0], json=body).raise_for_status()
        out.append((time.perf_counter() - start) * 1e3)
    return out[1:]


def streamed(client: httpx.Client, n: int) -> tuple[list[float], list[float]]:
    """(time to first token, gaps between tokens) of n streamed 32-token completions, ms."""
    first, gaps = [], []
    for _ in range(n + 1):
        start, stamps = time.perf_counter(), []
        with client.stream("POST", "/v1/completions", json={"prompt": "the sea", "max_tokens": 32, "stream": True,
                                                             "ignore_eos": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
        first.append((stamps[0] - start) * 1e3)
        gaps += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return first[1:], gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    with RunningServer(args.bundle) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        rows = {path: timed(client, path, body, args.requests) for path, body in REQUESTS.items()}
        rows["streamed: time to first token"], rows["streamed: between tokens"] = streamed(client, args.requests)
    print(f"{'request (one keep-alive connection)':40s}{'median ms':>10s}{'worst ms':>10s}")
    for name, values in rows.items():
        print(f"{name:40s}{statistics.median(values):10.1f}{max(values):10.1f}")


if __name__ == "__main__":
    main()
