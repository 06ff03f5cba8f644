"""Draft trees (spec.trees, issue 15): pipelined speculation with b candidates per position vs full depth.

Bundled default model (skipped when absent), CPU, batch 1, one torch thread, NEW_TOKENS new tokens
after each of the 16 benchmark prompts (benchmarks/conftest.py TEXT_PROMPTS), each generated alone.
Greedy: draft loop k in {1, 2} and branch b in {1, 2, 3} (b = 1 is spec.pipeline),
draft_loop="adaptive" (spec.adapt: the loop chosen online per request) with the checkpoint's
calibrated call cost and with call cost 0 (minimising weight passes), and second-token drafts
at k = 2 (draft_tokens=2, spec.multi: always, and only where the second head's top-1 probability
is at least 0.1), and trees at k = 2 whose top-1 candidate carries a second draft (b = 2, 3;
draft_tokens=2 with branch > 1, spec.trees); every output is checked equal to full depth.
Sampling (temperature SAMPLED_TEMPERATURE, a fixed seed per call): the recommended k = 2 with b in
{1, 2, 3}, the second-token drafts and the trees with second drafts against full-depth sampling (lossless by the chi-square
tests of tests/spec; outputs differ draw by draw). A "call" runs all prompts; every call of a
setting follows a full-depth call, REPEATS times in turn, and a setting's ratio is its best time
against the best of its own full-depth calls (the same number of samples on both sides, under the
same load). The model's recommended drafts apply (its draft map at k = 2; loop-1 drafts at k = 1,
which it has no map for).

Recorded per setting: tokens/s and its ratio to full depth (wall and process CPU time), weight
passes per token (loops of every forward, prefill included, per new token), tokens finished per
forward, rows per forward, acceptance per tested position and per tree depth, wins by candidate rank,
and for second-token drafts their acceptance and the forwards that emitted two tokens.

    python -m pytest benchmarks/test_trees.py --benchmark-only -s [-k sampling]
"""

from __future__ import annotations

import os

import pytest
import torch

from looplm.api import DEFAULT_MODEL

from benchmarks.conftest import TEXT_PROMPTS, generate_each

NEW_TOKENS = 128
REPEATS = 2
PAIRS = [(2, 1, (("draft_tokens", 2), ("second_threshold", t))) for t in (None, 0.1, 0.3, "adaptive")]
# trees whose top-1 candidate carries a second draft (spec.trees with draft_tokens=2)
TREE_PAIRS = [(2, b, (("draft_tokens", 2), ("second_threshold", t))) for b, t in ((2, None), (3, None), (2, "adaptive"))]
# (k, b, more options as (name, value) pairs); every setting names draft_tokens (1 unless given), so
# the checkpoint's recommended second drafts (generation_config.json) never change a row's meaning
SETTINGS = [(k, b, ()) for k in (1, 2) for b in (1, 2, 3)] + [("adaptive", 1, ()), ("adaptive", 1, (("call_cost", 0.0),))] + PAIRS + TREE_PAIRS
SAMPLED_SETTINGS = [(2, b, ()) for b in (1, 2, 3)] + PAIRS + TREE_PAIRS
SAMPLED_TEMPERATURE = 0.8


def _run(engine, prompts, **opts):
    return generate_each(engine, prompts, NEW_TOKENS, **opts)


def _pooled(gens) -> dict:
    """Totals over the prompts (ratios of sums, not means of per-prompt ratios)."""
    st = [g.stats for g in gens]
    tokens = sum(len(g.tokens) for g in gens)
    forwards = sum(s["forwards"] for s in st)
    out = {
        "weight_passes_per_token": sum(s["weight_passes_per_token"] * len(g.tokens) for s, g in zip(st, gens)) / tokens,
        "tokens_per_forward": tokens / forwards,
        "rows_per_forward": sum(s["rows_per_forward"] * s["rounds"] for s in st) / max(sum(s["rounds"] for s in st), 1)
        if "rows_per_forward" in st[0] else None,
        "token_acceptance": sum(s["accepted"] for s in st) / max(sum(s["accepted"] + s["rejected"] for s in st), 1),
    }
    if "seconds" in st[0]:
        out.update({key: sum(s[key] for s in st) for key in ("seconds", "seconds_tested", "seconds_accepted", "pairs_emitted")})
    if "won_by_rank" in st[0]:
        out["won_by_rank"] = [sum(s["won_by_rank"][r] for s in st) for r in range(len(st[0]["won_by_rank"]))]
        tested = [sum(s["tested_by_depth"][d] for s in st) for d in range(len(st[0]["tested_by_depth"]))]
        won = [sum(round((s["acceptance_by_depth"][d] or 0) * s["tested_by_depth"][d]) for s in st) for d in range(len(tested))]
        out["acceptance_by_depth"] = [w / t if t else None for w, t in zip(won, tested)]
    return out


def sweep(engine, prompts, repeats: int = REPEATS, settings=SETTINGS, **sampling) -> dict:
    """Times every (k, b) setting right after a full-depth call, `repeats` times in turn; each
    setting's ratio is its best time against the best of its own paired full-depth calls.
    `sampling` (temperature, seed) applies to both sides; greedy outputs must equal full depth."""
    _run(engine, prompts[:2], **sampling)  # warm-up
    _, full = _run(engine, prompts, **sampling)
    tokens = sum(len(g.tokens) for g in full)
    full_t: dict[tuple, list] = {s: [] for s in settings}
    times: dict[tuple, list] = {s: [] for s in settings}
    gens_of = {}
    for _ in range(repeats):
        for s in settings:
            k, b, more = s
            full_t[s].append(_run(engine, prompts, **sampling)[0])
            dt, gens = _run(engine, prompts, mode="speculative", draft_loop=k, branch=b, **{"draft_tokens": 1, **dict(more)},
                            **sampling)
            if not sampling:
                assert [g.tokens for g in gens] == [g.tokens for g in full], f"{s} differs from full depth"
            assert sum(len(g.tokens) for g in gens) == tokens  # stop=[]: every prompt runs to NEW_TOKENS
            times[s].append(dt)
            gens_of[s] = gens
    rows = []
    for s in settings:
        k, b, more = s
        wall, cpu = min(t[0] for t in times[s]), min(t[1] for t in times[s])
        f_wall, f_cpu = min(t[0] for t in full_t[s]), min(t[1] for t in full_t[s])
        st = gens_of[s][0].stats
        rows.append({"draft_loop": k, "branch": b, "call_cost": dict(more).get("call_cost", st.get("call_cost")),
                     "draft_tokens": st.get("draft_tokens", 1), "second_threshold": st.get("second_threshold"),
                     "tokens_per_s": tokens / wall, "ratio_to_full": f_wall / wall,
                     "tokens_per_s_cpu": tokens / cpu, "ratio_to_full_cpu": f_cpu / cpu, **_pooled(gens_of[s])})
        if k == "adaptive":  # tokens emitted per draft loop, over the prompts
            rows[-1]["tokens_by_loop"] = _tokens_by_loop(gens_of[s])
    every = [t for ts in full_t.values() for t in ts]
    return {"rows": rows, "full_tokens_per_s": tokens / min(t[0] for t in every),
            "full_tokens_per_s_cpu": tokens / min(t[1] for t in every),
            "full_weight_passes_per_token": sum(g.stats["weight_passes_per_token"] for g in full) / len(full),
            "load_avg": os.getloadavg()}


def _tokens_by_loop(gens) -> dict[str, int]:
    """draft_loop="adaptive": tokens emitted while drafting at each loop, summed over the prompts."""
    out: dict[str, int] = {}
    for g in gens:
        sw = g.stats["loop_switches"] + [[len(g.tokens), None]]
        for (n, k), (m, _) in zip(sw, sw[1:]):
            out[str(k)] = out.get(str(k), 0) + m - n
    return out


def _tag(r: dict) -> str:
    cost = f"_r{r['call_cost']:g}" if r["draft_loop"] == "adaptive" and r["call_cost"] is not None else ""
    t = r.get("second_threshold")
    pairs = "" if r.get("draft_tokens", 1) == 1 else "_pairs" + ("" if t is None else t if isinstance(t, str) else f"{t:g}")
    return f"k{r['draft_loop']}_b{r['branch']}{cost}{pairs}"


def print_table(result: dict) -> None:
    print(f"\nfull depth {result['full_tokens_per_s']:.1f} tok/s wall, {result['full_tokens_per_s_cpu']:.1f} CPU, "
          f"{result['full_weight_passes_per_token']:.2f} weight passes/token; load average {result['load_avg']}")
    print(" k  b   wall tok/s  ratio   CPU ratio  passes/tok  tok/fwd  rows/fwd  accept  by depth         won by rank")
    for r in result["rows"]:
        if r["draft_loop"] == "adaptive":
            print(f" adaptive (call cost {r['call_cost']}): {r['tokens_per_s']:.1f} tok/s, {r['ratio_to_full']:.2f}x, "
                  f"{r['weight_passes_per_token']:.2f} passes/tok, tokens by draft loop {r['tokens_by_loop']}")
            continue
        depth = " ".join("-" if a is None else f"{a:.2f}" for a in r.get("acceptance_by_depth", []))
        rows = "-" if r["rows_per_forward"] is None else f"{r['rows_per_forward']:.2f}"
        print(f" {r['draft_loop']}  {r['branch']}   {r['tokens_per_s']:9.1f}  {r['ratio_to_full']:5.2f}   {r['ratio_to_full_cpu']:8.2f}  "
              f"{r['weight_passes_per_token']:10.2f}  {r['tokens_per_forward']:7.2f}  {rows:>8}  {r['token_acceptance']:6.3f}  "
              f"{depth:<15}  {r.get('won_by_rank', '-')}")
        if r.get("draft_tokens", 1) == 2:
            print(f"    second-token drafts (threshold {r['second_threshold']}): {r['seconds']} made, {r['seconds_accepted']} of "
                  f"{r['seconds_tested']} tested passed, {r['pairs_emitted']} forwards emitted two tokens")


def _summary(result: dict) -> dict:
    """Scalar keys per setting (RESULTS.md's table of this file shows scalars only)."""
    out = {}
    for r in result["rows"]:
        tag = _tag(r)
        out[f"{tag}_ratio_to_full"] = r["ratio_to_full"]
        out[f"{tag}_weight_passes_per_token"] = r["weight_passes_per_token"]
    return out


def test_draft_trees_sweep(benchmark, engine):
    prompts = [engine.encode(t) for t in TEXT_PROMPTS]
    result = benchmark.pedantic(lambda: sweep(engine, prompts), rounds=1, iterations=1)
    print_table(result)
    benchmark.extra_info.update(model=f"default model ({DEFAULT_MODEL})", mode="speculative", batch=1, new_tokens=NEW_TOKENS,
                                prompts=len(prompts), torch_threads=torch.get_num_threads(), **result, **_summary(result))


def test_draft_trees_sampling_sweep(benchmark, engine):
    """Sampling at SAMPLED_TEMPERATURE: trees (multi-candidate rejection) and the plain pipeline
    (b = 1) at the recommended k against full-depth sampling."""
    prompts = [engine.encode(t) for t in TEXT_PROMPTS]
    sampling = {"temperature": SAMPLED_TEMPERATURE, "seed": 0}
    result = benchmark.pedantic(lambda: sweep(engine, prompts, settings=SAMPLED_SETTINGS, **sampling), rounds=1, iterations=1)
    print(f"\nsampling at temperature {SAMPLED_TEMPERATURE} (full depth and speculation alike)", end="")
    print_table(result)
    benchmark.extra_info.update(model=f"default model ({DEFAULT_MODEL})", mode="speculative", batch=1, new_tokens=NEW_TOKENS,
                                prompts=len(prompts), torch_threads=torch.get_num_threads(), **sampling, **result,
                                **_summary(result))
