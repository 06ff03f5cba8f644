"""Load: 64 concurrent streaming clients x 4 requests each, mixed modes, through the openai client.

Every one of the 256 requests must complete, each stream's chunks must all belong to it (its own
id, one chunk per token, the exit loops of its own decode) and its greedy text must equal the
same request decoded alone with Engine.generate.
"""

from __future__ import annotations

import asyncio
import random
import time

import openai

from .conftest import MODEL, PROMPTS, metric

CLIENTS, REQUESTS_EACH, MAX_TOKENS = 64, 4, 8
MODES = [("full", {}), ("speculative", {}), ("anytime", {"budget_loops": 1}), ("anytime", {"budget_loops": 2}),
         ("anytime", {"budget_loops": 3})]
TIMEOUT_S = 240  # the whole test; it took 60 s at load average 6 and 110 s at 12 on 2 shared CPU cores


def test_64_streaming_clients_mixed_modes(server, engine):
    rng = random.Random(random.randrange(2**31))
    plan = [[(rng.randrange(len(PROMPTS)), rng.randrange(len(MODES))) for _ in range(REQUESTS_EACH)] for _ in range(CLIENTS)]
    solo = {}
    for p, m in {key for reqs in plan for key in reqs}:
        mode, options = MODES[m]
        solo[p, m] = engine.generate(PROMPTS[p], max_new_tokens=MAX_TOKENS, mode=mode, temperature=0, **options)
    tokens_before = sum(metric(server, "looplm_generated_tokens_total", {"mode": mo}, default=0.0) for mo in {"full", "speculative", "anytime"})

    async def one_client(client: openai.AsyncOpenAI, requests: list[tuple[int, int]]) -> list[tuple]:
        out = []
        for p, m in requests:
            mode, options = MODES[m]
            stream = await client.completions.create(model=MODEL, prompt=PROMPTS[p], max_tokens=MAX_TOKENS, temperature=0,
                                                     stream=True, extra_body={"looplm": {"mode": mode, **options}})
            chunks = [c async for c in stream]
            out.append((p, m, chunks))
        return out

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one_client(client, reqs) for reqs in plan)), TIMEOUT_S)
        finally:
            await client.close()

    start = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - start
    done = [r for per_client in results for r in per_client]
    assert len(done) == CLIENTS * REQUESTS_EACH
    ids = set()
    for p, m, chunks in done:
        want = solo[p, m]
        assert len({c.id for c in chunks}) == 1  # no chunk of another stream
        ids.add(chunks[0].id)
        token_chunks = [c for c in chunks if c.choices[0].model_extra["looplm"]["exit_loops"]]
        assert len(token_chunks) == len(want.tokens)  # no chunk lost, none duplicated
        assert [c.choices[0].model_extra["looplm"]["exit_loops"][0] for c in token_chunks] == [s.exit_loop for s in want.steps]
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(ids) == CLIENTS * REQUESTS_EACH
    tokens_after = sum(metric(server, "looplm_generated_tokens_total", {"mode": mo}, default=0.0) for mo in {"full", "speculative", "anytime"})
    assert tokens_after - tokens_before == sum(len(solo[p, m].tokens) for p, m, _ in done)
    assert metric(server, "looplm_requests_running") == 0 and metric(server, "looplm_requests_waiting") == 0
    print(f"\n{len(done)} streaming requests from {CLIENTS} clients in {elapsed:.1f} s")
