"""Second drafts chosen online (second_threshold="adaptive", spec.seconds): the break-even rule on
fresh scores, second drafts made where they pass and dropped where they fail, greedy exact and the
sampled joint law full depth's."""

import random

import pytest
import torch

import looplm
import spec.seconds
from looplm.options import OptionError
from looplm.sampling import SamplingParams
from spec.seconds import EDGES, WINDOW, SecondChooser

from .conftest import ragged_prompts, spec_model
from .test_accept import chi2_critical, chi2_stat
from .test_multi import pair_map
from .test_sampling_e2e import exact_joint


def _in_bin(b: int) -> float:
    """A random confidence inside bin b."""
    lo, hi = ([0.0] + list(EDGES))[b], (list(EDGES) + [1.0])[b]
    return random.uniform(lo, hi - 1e-9)


@pytest.mark.parametrize("stages", [2, 3])
def test_the_chooser_drafts_where_the_observed_pass_rate_beats_the_break_even(stages):
    chooser = SecondChooser(stages)
    assert all(chooser.wants(_in_bin(b)) for b in range(len(EDGES) + 1))  # no scores: optimistic prior, drafts
    firsts = [random.uniform(0.6, 1) for _ in range(WINDOW + 5)]
    for s in firsts:
        chooser.score_first(s)
    a1 = sum(firsts[-WINDOW:]) / WINDOW  # the window keeps the last WINDOW
    bar = (stages - 1) * a1 / stages
    assert chooser.bar() == pytest.approx(bar, rel=1e-12)
    # full bins whose pass rates lie well clear of the bar decide by their own rate (shrinkage moves
    # an estimate by at most PRIOR_WEIGHT / (WINDOW + PRIOR_WEIGHT) = 0.11)
    rates = {b: random.choice([random.uniform(0, bar - 0.15), random.uniform(bar + 0.15, 1)]) for b in range(len(EDGES) + 1)}
    for b, rate in rates.items():
        for _ in range(WINDOW):
            chooser.score_second(_in_bin(b), float(random.random() < rate))
    for b in rates:
        mean = sum(chooser.bins[b]) / WINDOW
        if abs(mean - bar) > 0.12:  # the drawn scores' mean, not the rate, is what the window holds
            assert chooser.wants(_in_bin(b)) == (mean > bar), (b, mean, bar)
    for _ in range(WINDOW):  # old scores leave the window: a bin of failures turns off, one of passes on
        chooser.score_second(_in_bin(0), 0.0)
        chooser.score_second(_in_bin(len(EDGES)), 1.0)
    assert not chooser.wants(_in_bin(0)) and chooser.wants(_in_bin(len(EDGES)))
    with pytest.raises(ValueError, match="at least 2 pipeline stages"):
        SecondChooser(1)


def test_a_request_whose_second_drafts_fail_stops_making_them_in_every_bin():
    """A few failures anywhere pull every bin down (bins shrink towards the request's rate)."""
    chooser = SecondChooser(2)
    for _ in range(8):
        chooser.score_second(_in_bin(random.randrange(len(EDGES) + 1)), 0.0)
    assert not any(chooser.wants(_in_bin(b)) for b in range(len(EDGES) + 1))


def _speculative(engine, prompts, threshold, dmap, new=120):
    return engine.generate(prompts, max_new_tokens=new, stop=[], mode="speculative", draft_loop=2, draft_map=dmap,
                           draft_tokens=2, second_threshold=threshold, fallback=False)


def test_second_drafts_that_pass_are_made_below_the_prior_threshold():
    """A model whose logits are all zero writes token 0 forever and every draft passes; its zero
    second-token head has top-1 probability 1/V, below every fixed threshold > 1/V. The adaptive
    rule sees those drafts pass (shadow scores) and keeps making them: pairs, exact."""
    model = spec_model(loops=4, max_pos=160)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = looplm.Engine(model)
    prompts = ragged_prompts(2, model.config.vocab_size, 1, 12)
    full = engine.generate(prompts, max_new_tokens=120, stop=[])
    dmap = pair_map(32, next_scale=None)
    fixed = _speculative(engine, prompts, 0.3, dmap)
    adaptive = _speculative(engine, prompts, "adaptive", dmap)
    for f, x, a in zip(full, fixed, adaptive):
        assert a.tokens == x.tokens == f.tokens == [0] * 120
        assert x.stats["seconds"] == 0
        assert a.stats["second_threshold"] == "adaptive"
        assert a.stats["seconds_accepted"] == a.stats["seconds_tested"] > 50
        assert a.stats["forwards"] < 0.65 * x.stats["forwards"]  # about two tokens per forward against one


def test_second_drafts_that_fail_are_dropped():
    """A second-token head that is wrong (large random weights) beside good first drafts: threshold 0
    makes a second draft at every draft step, and they fail and refill; the adaptive rule makes far
    fewer (the break-even, half the first drafts' recent pass rate, is mostly far above theirs).
    Output exact either way."""
    for _ in range(20):
        model = spec_model(loops=4, max_pos=200)
        engine = looplm.Engine(model)
        prompts = ragged_prompts(2, model.config.vocab_size, 1, 12)
        dmap = pair_map(32, next_scale=30.0)
        pipe = engine.generate(prompts, max_new_tokens=150, stop=[], mode="speculative", draft_loop=2, draft_map=dmap,
                               draft_tokens=1, fallback=False)
        always = _speculative(engine, prompts, 0.0, dmap, new=150)
        if all(p.stats["token_acceptance"] >= 0.6 and x.stats["seconds_tested"] > 30
               and x.stats["seconds_accepted"] < 0.1 * x.stats["seconds_tested"] for p, x in zip(pipe, always)):
            break
    else:
        pytest.fail("no drawn model had good first drafts and failing second drafts")
    full = engine.generate(prompts, max_new_tokens=150, stop=[])
    adaptive = _speculative(engine, prompts, "adaptive", dmap, new=150)
    for f, x, a in zip(full, always, adaptive):
        assert a.tokens == x.tokens == f.tokens
    # far fewer (where the text makes first drafts fail for a while, the bar drops with them and
    # some second drafts come back: 44 of 147 in the worst request of 12 seeds measured)
    made, made_always = (sum(g.stats["seconds"] for g in gens) for gens in (adaptive, always))
    assert made < made_always / 2
    assert sum(g.stats["rejected"] for g in adaptive) < sum(g.stats["rejected"] for g in always)


def test_sampled_adaptive_pairs_follow_full_depth_distribution(monkeypatch):
    """6 new tokens (vocab 5), seconds chosen from scores that weigh in fast (PRIOR_WEIGHT patched to
    1; the first choice with a score behind it drafts tokens 4 and 5): the law of tokens 3-5 is full
    depth's marginal, and the rule both made and declined second drafts after seeing scores."""
    monkeypatch.setattr(spec.seconds, "PRIOR_WEIGHT", 1)
    decided = []
    wants = SecondChooser.wants

    def recording(self, sure):
        out = wants(self, sure)
        if any(self.bins):
            decided.append(out)
        return out

    monkeypatch.setattr(SecondChooser, "wants", recording)
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    dmap = pair_map(32, next_scale=1.0, first_scale=0.3)  # seconds that often fail: some bins turn off
    prompt, post, n, N = [1, 3], {"temperature": 1.0, "top_k": 4}, 6, 4000
    marginal = exact_joint(model, prompt, n, SamplingParams(**post)).reshape((5,) * n).sum((0, 1, 2)).flatten()
    gens = looplm.Engine(model).generate([prompt] * N, max_new_tokens=n, stop=[], mode="speculative", seed=3,
                                         draft_loop=2, draft_map=dmap, draft_tokens=2, second_threshold="adaptive",
                                         fallback=False, **post)
    last = torch.tensor([g.tokens[3:] for g in gens])
    stat, df = chi2_stat((last * torch.tensor([25, 5, 1])).sum(-1), marginal.float())
    assert stat < chi2_critical(df), (stat, df)
    assert True in decided and False in decided
    tested, won = (sum(g.stats[key] for g in gens) for key in ("seconds_tested", "seconds_accepted"))
    assert 0 < won < tested


def test_bad_threshold_values_are_named():
    engine = looplm.Engine(spec_model(loops=4, max_pos=32))
    for bad in ["adapt", "ADAPTIVE", float("nan"), -0.1, True]:
        with pytest.raises(OptionError, match="second_threshold must be a number in \\[0, 1\\] or 'adaptive'") as e:
            engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", draft_tokens=2, draft_map=pair_map(32),
                            second_threshold=bad)
        assert e.value.option == "second_threshold"
