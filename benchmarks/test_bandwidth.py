"""Batch-1 full-depth decoding against the memory-bandwidth bound, per model, dtype and thread count.

For each model (the bundled default model, the in-memory random 100M one, and the cached random
checkpoint of Ouro-1.4B's shape, benchmarks/checkpoints.py) in float32 and bfloat16, with 1 and 2
threads, in rounds that alternate the configurations (so drifting machine load hits all alike):
- the matrix-vector read rate of that dtype (benchmarks.bandwidth.matvec_read_rate), and right after
- one greedy `Engine.generate(prompt, mode="full")` call, batch 1, whose decode steps (the tokens
  after the first, which the prefill's logits give) are timed as (wall - prefill) / steps.
Bytes per decode step come from benchmarks.bandwidth.bytes_per_token; the bound is rate / bytes,
and the recorded fraction is the best round's decode tokens/s over the best round's bound.
Asserts only that what was timed is right: all T loops per token, every token produced, and
the same tokens in every round of a configuration.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

import looplm
from benchmarks.bandwidth import bytes_per_token, matvec_read_rate
from benchmarks.checkpoints import random_checkpoint
from benchmarks.conftest import RANDOM_100M, build_random_100m
from looplm.api import DEFAULT_MODEL
from looplm.dtypes import cpu_bf16_reason, default_dtype

DTYPES = ("float32", "bfloat16")
THREADS = (1, 2)
# (new tokens per call, rounds) per model, full and --bench-quick
RUNS = {"default": ((32, 3), (16, 2)), "random-100m": ((16, 3), (8, 2)), "random-1.4b": ((8, 2), (4, 1))}
TARGET_FRACTION, TARGET_BF16_SPEEDUP = 0.75, 1.4  # issue 17's acceptance on the 1.4B-shaped model


def _engine(name: str, dtype: str) -> looplm.Engine:
    if name == "default":
        return looplm.load(dtype=dtype)
    if name == "random-100m":
        return build_random_100m("cpu", quick=True, dtype=dtype).engine
    return looplm.load(random_checkpoint("random-1.4b"), dtype=dtype)


def _config(name: str):
    if name == "default":
        return looplm.checkpoint.read_config(DEFAULT_MODEL)
    if name == "random-100m":
        return RANDOM_100M
    from benchmarks.checkpoints import SHAPES

    return SHAPES["random-1.4b"]


@pytest.mark.parametrize("name", list(RUNS))
def test_bandwidth(name, bench_device, bench_quick, benchmark):
    if bench_device != "cpu":
        pytest.skip("the bandwidth accounting measures the CPU (benchmarks/gpu.py measures a GPU)")
    if name == "default" and not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"the bundled default model is not in {DEFAULT_MODEL} yet")
    new_tokens, rounds = RUNS[name][bench_quick]
    engines = {dt: _engine(name, dt) for dt in DTYPES}
    vocab = engines["float32"].config.vocab_size
    prompt = torch.randint(1, vocab, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    configs = [(dt, th) for dt in DTYPES for th in THREADS]
    runs = {c: {"rate": [], "decode": [], "tokens": []} for c in configs}
    load = [os.getloadavg()]

    def one_round():
        for dt, th in configs:
            r = runs[(dt, th)]
            r["rate"].append(matvec_read_rate(getattr(torch, dt), th))
            torch.set_num_threads(th)
            gen = engines[dt].generate(prompt, max_new_tokens=new_tokens, mode="full", stop=[])
            r["decode"].append((gen.stats["prefill_ms"], sum(s.latency_ms for s in gen.steps[1:])))
            r["tokens"].append(list(gen.tokens))
            assert all(n == engines[dt].model.num_loops for n in gen.loops), "full depth runs all T loops"

    for dt in DTYPES:  # warm-up: first-call allocations and kernel selection, untimed
        engines[dt].generate(prompt, max_new_tokens=2, mode="full", stop=[])
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    load.append(os.getloadavg())

    steps = new_tokens - 1
    positions = list(range(len(prompt), len(prompt) + steps))
    results = []
    for (dt, th), r in runs.items():
        assert all(len(t) == new_tokens for t in r["tokens"]), "every call must produce all its tokens (stop=[])"
        assert all(t == r["tokens"][0] for t in r["tokens"]), "greedy decoding gives the same tokens every round"
        acc = bytes_per_token(engines[dt].model, positions)
        decode_tps = max(steps / (ms / 1e3) for _, ms in r["decode"])
        rate = max(r["rate"])
        bound = rate / acc["total"]
        per_round = [steps / (ms / 1e3) * acc["total"] / rt for (_, ms), rt in zip(r["decode"], r["rate"])]
        results.append({
            "dtype": dt, "threads": th, "bytes": acc, "matvec_gb_s": rate / 1e9, "matvec_gb_s_rounds": [x / 1e9 for x in r["rate"]],
            "bound_tokens_per_s": bound, "decode_tokens_per_s": decode_tps, "fraction_of_bound": decode_tps / bound,
            "fraction_per_round_median": statistics.median(per_round), "prefill_ms": min(p for p, _ in r["decode"]),
            "tokens": r["tokens"][0],
        })
    by = {(x["dtype"], x["threads"]): x for x in results}
    for th in THREADS:
        f32, b16 = by[("float32", th)], by[("bfloat16", th)]
        b16["speedup_over_float32"] = b16["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
        b16["token_agreement_with_float32"] = sum(a == b for a, b in zip(b16["tokens"], f32["tokens"])) / new_tokens
    best = max(THREADS, key=lambda th: by[("float32", th)]["decode_tokens_per_s"])
    cfg = _config(name)
    benchmark.extra_info.update({
        "bandwidth": {
            "model": name,
            "params": sum(p.numel() for p in engines["float32"].model.parameters()),
            "new_tokens": new_tokens, "decode_steps": steps, "prompt_len": len(prompt), "rounds": rounds,
            "results": results, "load_average": load, "cpu_bf16": cpu_bf16_reason(),
            "default_dtype": str(default_dtype(cfg, "cpu")).removeprefix("torch."), "config_dtype": cfg.torch_dtype,
            "acceptance": None if name != "random-1.4b" else {
                "threads": best,
                "float32_fraction": by[("float32", best)]["fraction_of_bound"],
                "bfloat16_fraction": by[("bfloat16", best)]["fraction_of_bound"],
                "bf16_speedup": by[("bfloat16", best)]["speedup_over_float32"],
                "met": by[("float32", best)]["fraction_of_bound"] >= TARGET_FRACTION
                and by[("bfloat16", best)]["fraction_of_bound"] >= TARGET_FRACTION
                and by[("bfloat16", best)]["speedup_over_float32"] >= TARGET_BF16_SPEEDUP,
            },
        }
    })
