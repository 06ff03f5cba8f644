"""Speculation beside other requests: when it stops paying, and `full_depth_above`.

At batch 1 on a CPU a forward call's fixed cost dominates, and speculation saves calls. In a step
shared by many requests that cost is spread over all their rows, and the rows drafts add (rejected
ones wasted) decide. This times the bundled model (CPU, one torch thread) on LOADS[i] greedy
requests submitted together (one `Engine.generate` of a list: they share every step), NEW_TOKENS
new tokens each, the benchmark prompts in turn, three ways: full depth; speculative with the
checkpoint's recommendation but `full_depth_above=None` (drafting whatever the load); speculative
as recommended (the generation_config's `full_depth_above`: above it each request switches to
full depth at its first token). Rounds alternate the three, REPEATS times; per load and way the
median tokens/s (every new token over the call's wall time, prefill included).

Asserts only what was timed: every output equals full depth; as recommended, requests switch for
load exactly where the load is above the recommended limit.

    python -m pytest benchmarks/test_spec_load.py --benchmark-only -s
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from benchmarks.conftest import TEXT_PROMPTS

LOADS = (1, 2, 3, 4, 6, 8, 16)
NEW_TOKENS = 64
REPEATS = 5
WAYS = {"full": {"mode": "full"}, "always": {"mode": "speculative", "full_depth_above": None},
        "recommended": {"mode": "speculative"}}


def test_spec_load(benchmark, engine, bench_device, bench_quick):
    if bench_device != "cpu":
        pytest.skip("measured on the CPU (the bundled model, one thread)")
    loads = LOADS[:3] if bench_quick else LOADS
    repeats = 1 if bench_quick else REPEATS
    limit = engine.mode_defaults("speculative").get("full_depth_above")
    prompts = [engine.encode(t) for t in TEXT_PROMPTS]
    load_before = os.getloadavg()
    for opts in WAYS.values():  # warm-up
        engine.generate(prompts[:2], max_new_tokens=8, stop=[], **opts)
    rates = {(n, way): [] for n in loads for way in WAYS}
    switched = {}
    for _ in range(repeats):
        for n in loads:
            batch = [prompts[i % len(prompts)] for i in range(n)]
            outs = {}
            for way, opts in WAYS.items():
                t0 = time.perf_counter()
                gens = engine.generate(batch, max_new_tokens=NEW_TOKENS, stop=[], **opts)
                rates[n, way].append(sum(len(g.tokens) for g in gens) / (time.perf_counter() - t0))
                outs[way] = gens
            want = [g.tokens for g in outs["full"]]
            for way in ("always", "recommended"):
                assert [g.tokens for g in outs[way]] == want, f"{way} at {n} requests differs from full depth"
            assert all(g.stats["fallback_reason"] != "load" for g in outs["always"])
            reasons = [g.stats["fallback_reason"] for g in outs["recommended"]]
            assert (reasons == ["load"] * n) if limit is not None and n > limit else ("load" not in reasons), (n, reasons)
            switched[n] = reasons.count("load")
    table = []
    for n in loads:
        med = {way: statistics.median(rates[n, way]) for way in WAYS}
        table.append({"requests": n, "switched_for_load": switched[n],
                      **{f"{way}_tokens_per_s": v for way, v in med.items()},
                      "always_ratio_to_full": med["always"] / med["full"],
                      "recommended_ratio_to_full": med["recommended"] / med["full"]})
    benchmark.extra_info.update({
        "load_sweep": table, "full_depth_above": limit, "new_tokens": NEW_TOKENS, "repeats": repeats,
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
    })
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
