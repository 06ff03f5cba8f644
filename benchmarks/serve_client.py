"""The serve benchmarks' load generator: streaming clients over raw SSE (httpx, no retries).

`level(url, options, concurrency, requests)` runs `concurrency` clients sharing `requests`
completions and returns throughput, time to first token and inter-token latency (p50/p95). Also a
command, so that a second process can keep a server busy without its chunks delaying the
timestamps of the clients being measured in this one:

    python -m benchmarks.serve_client URL OPTIONS_JSON CONCURRENCY REQUESTS MAX_TOKENS

prints the level's result as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

MODEL = "looplm-default"
PROMPTS = [
    "def fibonacci(n):", "It is a truth universally acknowledged, that a single man", "class Stack:\n    def __init__(self):",
    "Elizabeth was", "for i in range(10):\n    if i % 2 == 0:", "Mr. Darcy said nothing, but", "def quicksort(items):",
    "The os.path module implements", "She had never", "while True:\n    line = f.readline()",
]
LEVEL_TIMEOUT_S = 600


def _pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-int(p * len(xs)) // 100) - 1))]


async def request(client, url: str, prompt: str, options: dict, max_tokens: int) -> dict:
    """One streaming completion: its time to first token, inter-token gaps (s) and token count."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "looplm": options}
    t0 = time.perf_counter()
    times, done = [], False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                times += [time.perf_counter()] * len(chunk["choices"][0]["looplm"]["exit_loops"])
    assert done and times, "a request ended without [DONE] or without tokens"
    return {"ttft": times[0] - t0, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": len(times)}


async def level(url: str, options: dict, concurrency: int, requests: int, max_tokens: int = 12) -> dict:
    """`concurrency` clients share `requests` requests, each client sending its next when one ends."""
    todo = list(range(requests))
    results = []

    async def client_loop(client):
        while todo:
            i = todo.pop()
            results.append(await request(client, url, PROMPTS[i % len(PROMPTS)], options, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=LEVEL_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(concurrency))), LEVEL_TIMEOUT_S)
        wall = time.perf_counter() - t0
    assert len(results) == requests
    ttft = [r["ttft"] * 1e3 for r in results]
    gaps = [g * 1e3 for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall, "ttft_p50_ms": _pct(ttft, 50), "ttft_p95_ms": _pct(ttft, 95),
        "itl_p50_ms": _pct(gaps, 50) if gaps else None, "itl_p95_ms": _pct(gaps, 95) if gaps else None,
    }



def main(argv: list[str]) -> int:
    url, options, concurrency, requests, max_tokens = argv
    out = asyncio.run(level(url, json.loads(options), int(concurrency), int(requests), int(max_tokens)))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
