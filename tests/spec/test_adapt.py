"""draft_loop="adaptive" (spec.adapt): the draft loop chosen online per request; lossless through every switch."""

import random
from collections import defaultdict

import pytest
import torch

import looplm
import spec.adapt
import spec.multi
import spec.pipeline
from spec.adapt import LoopChooser

from .conftest import acceptance, spec_model
from .test_accept import chi2_critical
from .test_multi import pair_map
from .test_no_recompute import record_layer_calls
from .test_sampling_e2e import WRONG_RULES, sampled_chi2


def _pairs(on: bool) -> dict:
    """Options for second drafts at loop 2 (a map with a second-token head there, which may read the
    first draft's token; loop 1 has no map, so first drafts alone run there), or none."""
    return {"draft_map": pair_map(32, token_scale=random.choice([None, 0.1])), "draft_tokens": 2} if on else {}


@pytest.fixture
def restless(monkeypatch):
    """Switch on the least evidence: the last token's scores, any cheaper loop (the decision rule's
    constants only; what is verified is unchanged)."""
    monkeypatch.setattr(spec.adapt, "WINDOW", 1)
    monkeypatch.setattr(spec.adapt, "MIN_SEEN", 1)
    monkeypatch.setattr(spec.adapt, "HYSTERESIS", 0.0)


def test_the_cost_model_and_the_choice():
    c = LoopChooser(4)
    assert c.loops == [1, 2] and c.best(2) == 2  # no evidence yet: keep the loop
    for _ in range(spec.adapt.MIN_SEEN):
        c.record({1: 0.5, 2: 0.75})
    # calls per token 1 + (1 - a)(T/j - 1), each of j loops: j=1 -> 2.5, j=2 -> 2.5
    assert c.cost(1) == 2.5 and c.cost(2) == 2.5 and c.best(2) == 2 and c.best(1) == 1
    for _ in range(spec.adapt.WINDOW):
        c.record({1: 1.0, 2: 1.0})
    assert c.cost(1) == 1.0 and c.cost(2) == 2.0 and c.best(2) == 1
    assert c.drain(2, tokens_left=5) and not c.drain(2, tokens_left=4)  # saving 1 per token against 2 x a refill of 2
    heavy = LoopChooser(4, call_cost=10.0)
    for _ in range(spec.adapt.WINDOW):
        heavy.record({1: 1.0, 2: 1.0})
    assert heavy.cost(1) == 11.0 and heavy.cost(2) == 12.0 and heavy.best(2) == 2  # under 10% cheaper: stay
    assert LoopChooser(6).loops == [1, 2, 3] and spec.adapt.start_loop(6, 2) == 2 and spec.adapt.start_loop(3, 2) == 1


@pytest.mark.parametrize("loops,pairs", [(4, False), (6, False), (4, True), (6, True)])
def test_greedy_equals_full_depth_through_switches(loops, pairs, restless):
    """Also with second drafts (draft_tokens=2): pairs at loop 2, first drafts alone elsewhere."""
    switched = paired = 0
    for _ in range(4):
        model = spec_model(loops=loops, max_pos=64)
        engine = looplm.Engine(model)
        prompts = [torch.randint(0, 64, (random.randint(1, 10),)).tolist() for _ in range(3)]
        full = engine.generate(prompts, max_new_tokens=40, stop=[])
        got = engine.generate(prompts, max_new_tokens=40, stop=[], mode="speculative", draft_loop="adaptive", fallback=False,
                              **_pairs(pairs))
        for f, g in zip(full, got):
            assert g.tokens == f.tokens
            assert g.loops == [loops] * len(g.tokens)
            sw = g.stats["loop_switches"]
            assert sw[0] == [0, spec.adapt.start_loop(loops, 2)]
            assert all(loops % k == 0 and k < loops for _, k in sw)
            assert [n for n, _ in sw] == sorted(n for n, _ in sw) and all(a[1] != b[1] for a, b in zip(sw, sw[1:]))
            assert g.stats["draft_loop"] == sw[-1][1]
            assert set(g.stats["loop_acceptance"]) == {str(j) for j in range(1, loops) if loops % j == 0}
            switched += len(sw) > 1
            paired += g.stats.get("pairs_emitted", 0)
            assert g.stats.get("draft_tokens", 1) == (2 if pairs else 1)
    assert switched and (paired > 0) == pairs


@pytest.mark.parametrize("pairs", [False, True])
def test_no_loop_is_computed_twice_across_switches(pairs, restless):
    """Per layer and position, the loops run are whole runs 0..j (a flushed draft stops early, a
    corrected token starts again at 0), never a repeat, whatever the draft loop was."""
    T, prompt = 4, [5, 9, 2, 7]
    for _ in range(20):
        model = spec_model(loops=T, step_scale=0.08)
        log, handles = record_layer_calls(model)
        gen = looplm.Engine(model).generate(prompt, max_new_tokens=30, stop=[], mode="speculative", draft_loop="adaptive",
                                            fallback=False, **_pairs(pairs))
        for h in handles:
            h.remove()
        if len(gen.stats["loop_switches"]) > 1:
            break
    assert len(gen.stats["loop_switches"]) > 1
    seqs = defaultdict(list)
    for layer, loop, b, pos in log:
        seqs[layer, pos].append(loop)
    for key, loops in seqs.items():
        run = []
        for lp in loops:
            if lp == 0:
                run = []
            run.append(lp)
            assert run == list(range(len(run))), (key, loops)
    assert len(log) == model.config.num_hidden_layers * gen.stats["token_loops"]


def test_a_model_whose_first_loop_decides_moves_to_loop_one_unless_calls_cost_more():
    """Loops that never move the state (zero step scale): every loop's draft is the target, so loop 1
    costs 1 pass per token against loop 2's 2; the decoder drains and switches once it has seen
    MIN_SEEN tokens, and halves its weight passes; with a call cost of 10 passes it stays at 2."""
    model = spec_model(loops=4, max_pos=128, step_scale=0.0)
    engine = looplm.Engine(model)
    prompt = torch.randint(0, 64, (5,)).tolist()
    full = engine.generate(prompt, max_new_tokens=64, stop=[])
    fixed = engine.generate(prompt, max_new_tokens=64, stop=[], mode="speculative", draft_loop=2)
    got = engine.generate(prompt, max_new_tokens=64, stop=[], mode="speculative", draft_loop="adaptive")
    heavy = engine.generate(prompt, max_new_tokens=64, stop=[], mode="speculative", draft_loop="adaptive", call_cost=10.0)
    assert got.tokens == fixed.tokens == heavy.tokens == full.tokens
    sw = got.stats["loop_switches"]
    assert len(sw) == 2 and sw[0] == [0, 2] and sw[1][1] == 1 and spec.adapt.MIN_SEEN < sw[1][0] < spec.adapt.MIN_SEEN + 4
    assert got.stats["loop_acceptance"] == {"1": 1.0, "2": 1.0}
    assert got.stats["weight_passes_per_token"] < 0.8 * fixed.stats["weight_passes_per_token"]
    assert heavy.stats["loop_switches"] == [[0, 2]]
    assert heavy.stats["weight_passes_per_token"] == fixed.stats["weight_passes_per_token"]


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("wrong_rule,post", WRONG_RULES[:1] + WRONG_RULES[2:3])
def test_sampled_tokens_follow_full_depth_through_switches(wrong_rule, post, pairs, restless, monkeypatch):
    """Also with second drafts at loop 2 (spec.multi), which then decides every draft."""
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    if wrong_rule is not None:
        monkeypatch.setattr(spec.multi if pairs else spec.pipeline, "accept_sampled", wrong_rule)
    opts = {"draft_map": pair_map(32, next_scale=0.3, first_scale=0.3, token_scale=0.5), "draft_tokens": 2} if pairs else {}
    stat, df, gens = sampled_chi2(model, [1, 3], post, n=3, draft_loop="adaptive", fallback=False, **opts)
    if wrong_rule is None:
        assert 0 < acceptance(gens) < 1
        if pairs:
            tested, won = (sum(g.stats[key] for g in gens) for key in ("seconds_tested", "seconds_accepted"))
            assert 0 < won < tested
        assert sum(len(g.stats["loop_switches"]) > 1 for g in gens) > len(gens) // 10  # many samples switched
        assert stat < chi2_critical(df), (stat, df)
    else:
        assert stat > chi2_critical(df), (stat, df)


@pytest.mark.parametrize("opts,option", [
    ({"draft_len": 3}, "draft_loop"), ({"pipeline": False}, "draft_loop"), ({"branch": 2}, "branch"),
    ({"call_cost": -1.0}, "call_cost"), ({"call_cost": "high"}, "call_cost"),
])
def test_invalid_combinations_name_the_option(opts, option):
    engine = looplm.Engine(spec_model(loops=4))
    with pytest.raises(ValueError, match=option):
        engine.generate([1, 2], max_new_tokens=3, mode="speculative", draft_loop="adaptive", **opts)
    with pytest.raises(ValueError, match="'adaptive'"):
        engine.generate([1, 2], max_new_tokens=3, mode="speculative", draft_loop="auto")
