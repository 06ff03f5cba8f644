"""What the anytime decoder reports: steps, per-loop probabilities, stats, streaming, stops and sampling."""

import pytest
import torch

from .conftest import random_prompts

T = 4


@torch.no_grad()
def test_trace_probs_and_signals_match_no_cache_per_loop_outputs(model, engine):
    prompt = random_prompts(70, [6])[0]
    g = engine.generate(prompt, max_new_tokens=8, stop=[], mode="anytime", exit="delta", threshold=0.75, trace=True)
    seq = list(prompt)
    for s in g.steps:
        out = model.loop_outputs(torch.tensor([seq]))
        probs = out.logits[:, 0, -1].float().softmax(-1)  # (T, V)
        assert len(s.info["probs"]) == s.exit_loop == len(s.info["signal"])
        torch.testing.assert_close(torch.tensor(s.info["probs"]), probs[: s.exit_loop, s.token], rtol=0, atol=1e-5)
        h = out.hidden[:, 0, -1]
        for t in range(2, s.exit_loop + 1):
            ref = float((h[t - 1] - h[t - 2]).norm() / h[t - 1].norm())
            assert s.info["signal"][t - 1] == pytest.approx(ref, abs=1e-5)
        assert s.info["policy"] == "delta"
        seq.append(s.token)


def test_rows_of_a_batch_exit_at_different_loops(engine):
    prompts = random_prompts(71, [3, 8, 5, 1])
    gens = engine.generate(prompts, max_new_tokens=10, stop=[], mode="anytime", exit="confidence", threshold=0.12)
    per_index = [{g.steps[i].exit_loop for g in gens} for i in range(10)]
    assert any(len(s) > 1 for s in per_index)
    assert sum(sum(g.stats["exit_loop_counts"]) for g in gens) == 40
    assert sum(g.stats["exit_reasons"]["policy"] + g.stats["exit_reasons"]["max_depth"] for g in gens) == 40
    for g in gens:  # each request reports its own statistics
        st = g.stats
        assert st["mean_exit_loop"] == pytest.approx(sum(s.exit_loop for s in g.steps) / 10)
        # exact mode finishes the skipped loops: nearly T loops computed per token in the end
        assert st["mean_exit_loop"] <= st["loops_computed_per_token"] <= T
        assert st["policy"]["policy"] == "confidence" and st["policy"]["threshold"] == 0.12
        assert st["budget_miss_rate"] is None
    assert any(g.stats["mean_exit_loop"] < g.stats["loops_computed_per_token"] for g in gens)


def test_copy_mode_computes_only_the_exit_loops(engine):
    prompts = random_prompts(72, [4, 6])
    gens = engine.generate(prompts, max_new_tokens=9, stop=[], mode="anytime", budget_loops=2, skip="copy")
    st = gens[0].stats
    # first tokens come from the prefill (T loops each); then 2 loops per token and nothing more
    assert st["loops_computed_per_token"] == pytest.approx((2 * T + 16 * 2) / 18)
    assert st["finish_loops"] == 0


def test_stream_yields_steps_in_order_with_stops(engine):
    prompts = random_prompts(73, [5, 4])
    ref = engine.generate(prompts, max_new_tokens=10, stop=[], mode="anytime", budget_loops=2)
    stop = ref[0].tokens[3]
    gens = engine.generate(prompts, max_new_tokens=10, stop=[stop], mode="anytime", budget_loops=2)
    first = ref[0].tokens.index(stop)
    assert gens[0].tokens == ref[0].tokens[: first + 1] and gens[0].finish_reason == "stop"
    if stop not in ref[1].tokens:
        assert gens[1].tokens == ref[1].tokens
    steps = list(engine.stream(prompts, max_new_tokens=6, stop=[], mode="anytime", budget_loops=3))
    ref3 = engine.generate(prompts, max_new_tokens=6, stop=[], mode="anytime", budget_loops=3)
    for row in range(2):
        mine = [s for s in steps if s.row == row]
        assert [s.index for s in mine] == list(range(6))
        assert [s.token for s in mine] == ref3[row].tokens
        assert all(s.exit_loop == 3 and s.latency_ms >= 0 for s in mine)


def test_sampling_at_full_depth_equals_full_decoder_at_batch_1(engine):
    prompt = random_prompts(74, [5])[0]
    opts = dict(max_new_tokens=15, stop=[], temperature=0.9, top_k=20, seed=123)
    full = engine.generate(prompt, **opts)
    assert engine.generate(prompt, mode="anytime", **opts).tokens == full.tokens
    a = engine.generate(prompt, mode="anytime", budget_loops=1, **opts)
    b = engine.generate(prompt, mode="anytime", budget_loops=1, **opts)
    assert a.tokens == b.tokens and all(0 <= t < 64 for t in a.tokens)


@pytest.mark.parametrize("finish", ["eager", "lazy"])
def test_prompts_at_the_context_limit_and_single_tokens(engine, finish):
    long, short = random_prompts(75, [126, 3])
    opts = dict(stop=[], mode="anytime", budget_loops=1, finish=finish)
    gens = engine.generate([long, short], max_new_tokens=5, **opts)
    assert len(gens[0].tokens) == 2 and gens[0].finish_reason == "context"  # 128 positions in all
    assert len(gens[1].tokens) == 5
    full = engine.generate([long, short], max_new_tokens=5, stop=[], mode="anytime", budget_loops=1, skip="copy")
    assert [g.tokens for g in full] == [g.tokens for g in gens]  # at 1 loop per token the K/V of loops > 1 are never read
    one = engine.generate(short, max_new_tokens=1, **opts)
    assert len(one.tokens) == 1 and one.steps[0].loops == T and one.stats["budget_miss_rate"] is None
