"""Budget logic driven by an injected clock, the online loop-cost model, and depth vs. budget/q."""

import math

import pytest

from anytime import Budget, LoopCost

from .conftest import FakeClock, clocked, random_prompts, spread_gate

T = 4
MS = 7.8125  # every loop costs exactly 2**-7 s on the fake clock (binary-exact; the prefill: T loops)


def run(engine, clock, prompt=None, n=8, **opts):
    prompt = prompt if prompt is not None else random_prompts(5, [6])[0]
    return engine.generate(prompt, max_new_tokens=n, stop=[], mode="anytime", clock=clock, **opts)


@pytest.mark.parametrize("budget,loops", [(4.5, 4), (4, 4), (3.5, 3), (3, 3), (2.5, 2), (1.5, 1), (1, 1)])
def test_per_token_budget_with_injected_clock(model, engine, budget, loops):
    budget_ms = budget * MS
    clock = FakeClock()
    clocked(model, clock, MS)
    g = run(engine, clock, budget_ms=budget_ms)
    first, rest = g.steps[0], g.steps[1:]
    assert first.latency_ms == T * MS and first.loops == T  # the prefill emits the first token
    # a loop runs only if the elapsed time plus one predicted loop (MS) fits the budget
    assert [s.exit_loop for s in rest] == [loops] * len(rest)
    assert [s.latency_ms for s in rest] == [loops * MS] * len(rest)
    assert all(s.reason == ("max_depth" if loops == T else "budget") for s in rest)
    assert all(s.info["budget_ms"] == budget_ms for s in rest)
    assert g.stats["budget_miss_rate"] == 0.0
    assert g.stats["p95_latency_ms"] == loops * MS
    assert set(g.stats["loop_cost_ms"].values()) == {MS}  # per (rows, width, context bucket)
    assert "rows=1,width=1,ctx<8" in g.stats["loop_cost_ms"]


def test_budget_below_one_loop_still_runs_one_loop_and_misses(model, engine):
    clock = FakeClock()
    clocked(model, clock, MS)
    g = run(engine, clock, budget_ms=0.5 * MS)
    assert [s.exit_loop for s in g.steps[1:]] == [1] * 7
    assert g.stats["budget_miss_rate"] == 1.0  # one loop > half a loop, for every decode token


def test_deadline_is_spread_over_remaining_tokens(model, engine):
    clock = FakeClock()
    clocked(model, clock, MS)
    # in loops: prefill 4; then 10 left for 4 tokens = 2.5 -> 2 loops (at 6); 8/3 = 2.67 -> 2 loops (at 8);
    # 6/2 = 3 -> 3 loops (at 11); 3/1 = 3 -> 3 loops, ending exactly at the deadline
    g = run(engine, clock, n=5, deadline_ms=14 * MS)
    assert [s.exit_loop for s in g.steps] == [4, 2, 2, 3, 3]
    assert [s.info.get("budget_ms") for s in g.steps[1:]] == pytest.approx([2.5 * MS, 8 / 3 * MS, 3 * MS, 3 * MS])
    assert clock.now * 1e3 == 14 * MS  # the last token's skipped loops are never run
    assert g.stats["budget_miss_rate"] == 0.0
    # per-token and deadline together: the tighter one applies
    g2 = run(engine, clock, n=5, budget=Budget(per_token_ms=1.5 * MS, deadline_ms=1e6))
    assert [s.exit_loop for s in g2.steps[1:]] == [1] * 4


def test_budget_always_wins_over_the_policy(engine):
    prompt = random_prompts(6, [5])[0]
    g = engine.generate(prompt, max_new_tokens=6, stop=[], mode="anytime", exit="static", threshold=3, budget_loops=2)
    assert [(s.exit_loop, s.reason) for s in g.steps] == [(2, "budget")] * 6
    g = engine.generate(prompt, max_new_tokens=6, stop=[], mode="anytime", exit="static", threshold=1, budget_loops=3)
    assert [(s.exit_loop, s.reason) for s in g.steps] == [(1, "policy")] * 6
    g = engine.generate(prompt, max_new_tokens=6, stop=[], mode="anytime", exit="static", threshold=9)
    assert [(s.exit_loop, s.reason) for s in g.steps] == [(T, "max_depth")] * 6


def test_mean_loops_fall_as_the_time_budget_tightens(model, engine):
    clock = FakeClock()
    clocked(model, clock, MS)
    prompt = random_prompts(7, [4])[0]
    means = []
    for budget in (1e9, 3.8, 2.8, 1.8, 0.8):
        g = run(engine, clock, prompt, n=10, budget_ms=budget * MS)
        means.append(sum(s.exit_loop for s in g.steps[1:]) / 9)
    assert means == [4, 3, 2, 1, 1]


@pytest.mark.parametrize("skip", ["exact", "copy"])
def test_mean_loops_fall_as_the_loop_budget_tightens(engine, skip):
    prompts = random_prompts(8, [4, 9])
    means = []
    for k in (4, 3, 2, 1):
        gens = engine.generate(prompts, max_new_tokens=8, stop=[], mode="anytime", budget_loops=k, skip=skip)
        means.append(gens[0].stats["mean_exit_loop"])
        assert sum(g.stats["exit_loop_counts"][k - 1] for g in gens) == 16  # each request counts its own 8
    assert means == [4, 3, 2, 1]


def test_mean_loops_fall_as_q_falls(model, engine):
    import torch

    spread_gate(model)  # different tokens exit at different loops
    prompts = random_prompts(9, [4, 7, 2])
    means = []
    for q in (1.0, 0.9, 0.5, 0.3, 0.05):
        gens = engine.generate(prompts, max_new_tokens=12, stop=[], mode="anytime", exit="q_exit", q=q)
        means.append(gens[0].stats["mean_exit_loop"])
    assert all(a >= b for a, b in zip(means, means[1:])), means
    assert means[0] == T and means[-1] < means[2] < means[0], means


def test_loop_cost_model():
    cost = LoopCost(alpha=0.5, safety=0.0)
    k1, k2 = cost.key(1, 1, 7), cost.key(1, 1, 9)
    assert k1 == (1, 1, 3) and k2 == (1, 1, 4)  # context-length buckets by powers of two
    assert cost.predict(k1) == 0.0 and cost.predict_emit() == 0.0  # nothing measured yet: optimistic
    cost.update(k1, 10.0)
    cost.update(k1, 20.0)
    assert cost.predict(k1) == 15.0  # EMA
    assert cost.predict(k2) == 20.0  # unseen key: the latest measurement
    cost.update(k2, 4.0)
    assert cost.predict(k2) == 4.0 and cost.predict(k1) == 15.0
    cost.safety = 2.0  # mean + 2 * mean absolute deviation
    assert cost.predict(k1) == 15.0 + 2 * 5.0 and cost.predict(k2) == 4.0
    cost.update_emit(1.0)
    cost.update_emit(3.0)
    assert cost.predict_emit() == 2.0 + 2 * 1.0


def test_safety_margin_under_jitter(model, engine):
    """Loops alternate 1 and 3 units: with safety 0 the mean (2) is the prediction, with safety 1 the mean plus deviation."""
    clock = FakeClock()
    inner = model.loop_body
    calls = []

    def loop_body(*args, **kwargs):  # one loop of a runner step
        out = inner(*args, **kwargs)
        calls.append(1)
        clock.advance_ms(MS * (1 if len(calls) % 2 else 3))
        return out

    model.loop_body = loop_body
    # skip="copy": every forward has one position per row, so one cost key sees the whole alternation
    careful = run(engine, clock, n=12, budget_ms=6 * MS, safety=1.0, skip="copy")
    bold = run(engine, clock, n=12, budget_ms=6 * MS, safety=0.0, skip="copy")
    assert careful.stats["budget_miss_rate"] <= bold.stats["budget_miss_rate"]
    assert careful.stats["mean_exit_loop"] <= bold.stats["mean_exit_loop"]
    assert careful.stats["budget_miss_rate"] == 0.0 < bold.stats["budget_miss_rate"]


def test_budget_validation(engine):
    with pytest.raises(ValueError, match="positive"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", budget_ms=-1)
    with pytest.raises(ValueError, match="integer"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", budget_loops=0)
    with pytest.raises(ValueError, match="either"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", budget=Budget(loops=2), budget_ms=3)
    with pytest.raises(ValueError, match="unknown exit policy"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", exit="nope")
    with pytest.raises(ValueError, match="unknown skip mode"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", skip="nope")
    with pytest.raises(ValueError, match=r"q_exit threshold must be a finite number in \[0, 1\]"):
        engine.generate([1, 2], max_new_tokens=2, mode="anytime", exit="q_exit", q=1.5)
    assert Budget(deadline_ms=100).token_ms(40.0, 3) == 20.0
    assert Budget(deadline_ms=100).token_ms(140.0, 3) == 0.0
    assert math.isinf(Budget(loops=2).token_ms(0.0, 1))
