"""Pipelined self-speculation (spec.pipeline): exact, lossless in distribution, nothing computed twice."""

from collections import defaultdict

import pytest
import torch

import looplm
import spec.pipeline
from spec.drafts import draft_state

from .conftest import acceptance, ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_no_recompute import logged_run
from .test_sampling_e2e import WRONG_RULES, sampled_chi2


@pytest.mark.parametrize("loops,k", [(2, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_full_depth_up_to_the_context_limit(loops, k, batch):
    model = spec_model(loops=loops, max_pos=30)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(batch, model.config.vocab_size, 1, 10)
    full = engine.generate(prompts, max_new_tokens=1000, stop=[])  # runs into the context limit
    spec_ = engine.generate(prompts, max_new_tokens=1000, stop=[], mode="speculative", draft_loop=k, pipeline=True)
    for f, s in zip(full, spec_):
        assert s.finish_reason == f.finish_reason == "context"
        assert s.tokens == f.tokens
        assert s.loops == [loops] * len(s.tokens)
    st = spec_[0].stats
    assert st["pipeline"] is True and st["draft_loop"] == k and st["draft_len"] == loops // k - 1
    assert st["accepted"] == sum(n * c for n, c in enumerate(st["accepted_len_hist"]))


def test_both_outcomes_and_stop_tokens_and_ragged_lengths():
    """Fresh models until one both accepts and rejects; rows end at the context, at max_new, at a stop token."""
    for _ in range(20):
        model = spec_model(loops=4, max_pos=32, step_scale=0.06)
        engine = looplm.Engine(model)
        prompts = [torch.randint(0, 64, (n,)).tolist() for n in (29, 3, 17, 30, 31)]
        full = engine.generate(prompts, max_new_tokens=20, stop=[])
        spec_ = engine.generate(prompts, max_new_tokens=20, stop=[], mode="speculative", draft_loop=2, pipeline=True)
        if 0 < acceptance(spec_) < 1:
            break
    assert 0 < acceptance(spec_) < 1
    assert [s.tokens for s in spec_] == [f.tokens for f in full]
    assert [len(s.tokens) for s in spec_] == [3, 20, 15, 2, 1]
    stop = full[1].tokens[6]
    full = engine.generate(prompts, max_new_tokens=20, stop=[stop])
    spec_ = engine.generate(prompts, max_new_tokens=20, stop=[stop], mode="speculative", draft_loop=1, pipeline=True)
    assert [s.tokens for s in spec_] == [f.tokens for f in full]
    assert [s.finish_reason for s in spec_] == [f.finish_reason for f in full]


@pytest.mark.parametrize("k", [1, 2])
def test_each_token_runs_each_loop_once(k):
    """Per layer and position the loops run are whole runs 0..T-1 (a corrected token restarts at 0),
    and the count of runs is the prompt plus every token that entered the pipeline."""
    T, prompt = 4, [5, 9, 2, 7]
    model, log, gen = logged_run(T, prompt, draft_loop=k, pipeline=True)
    st = gen.stats
    assert 0 < st["token_acceptance"] < 1
    L = model.config.num_hidden_layers
    seqs = defaultdict(list)
    for layer, loop, b, pos in log:
        seqs[layer, pos].append(loop)
    entered = 0
    for (layer, pos), loops in seqs.items():
        # a flushed draft stops mid-way: its loops are a prefix 0..j of a run, never a repeat
        runs, cur = [], []
        for lp in loops:
            if lp == 0 and cur:
                runs.append(cur)
                cur = []
            cur.append(lp)
        runs.append(cur)
        for r in runs:
            assert r == list(range(len(r))), (layer, pos, loops)
        if layer == 0 and pos >= len(prompt):
            entered += len(runs)
    assert len(log) == L * gen.stats["token_loops"]
    # tokens entering loop 0 after the prompt: the first token, every draft, and every correction
    # but a final one (the row is done, so it needs no loops)
    final_correction = gen.steps[-1].reason == "verify"
    assert entered == 1 + st["drafted"] + st["rejected"] - final_correction
    assert st["accepted"] + st["rejected"] <= st["drafted"]  # drafts behind a rejection are never tested
    assert st["loops_per_token"] * len(gen.tokens) == pytest.approx(gen.stats["token_loops"] - T * len(prompt))


@pytest.mark.parametrize("wrong_rule,post", WRONG_RULES)
def test_sampled_tokens_follow_full_depth_distribution(wrong_rule, post, monkeypatch):
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=2, std=0.2, step_scale=1.0, max_pos=16)
    if wrong_rule is not None:
        monkeypatch.setattr(spec.pipeline, "accept_sampled", wrong_rule)
    stat, df, gens = sampled_chi2(model, [1, 3], post, draft_loop=1, pipeline=True)
    if wrong_rule is None:
        assert 0 < acceptance(gens) < 1
        assert stat < chi2_critical(df), (stat, df)
    else:
        assert stat > chi2_critical(df), (stat, df)


def test_invalid_options():
    engine = looplm.Engine(spec_model(loops=4))
    with pytest.raises(ValueError, match="divide"):
        engine.generate([1, 2], max_new_tokens=3, mode="speculative", draft_loop=3, pipeline=True)
    with pytest.raises(ValueError, match="draft length"):
        engine.generate([1, 2], max_new_tokens=3, mode="speculative", draft_loop=2, draft_len=3, pipeline=True)
    assert len(engine.generate([1, 2], max_new_tokens=3, stop=[], mode="speculative", draft_loop=2, pipeline=True).tokens) == 3


def test_draft_state_is_logit_extrapolation():
    model = spec_model(loops=4)
    h = torch.randn(2, 3, 1, model.config.hidden_size)  # (loops, rows, 1, H)
    c = float(torch.rand(()) * 2)
    want_logits = model.head(h[1]) + c * (model.head(h[1]) - model.head(h[0]))  # z_k + c (z_k - z_{k-1})
    torch.testing.assert_close(model.head(draft_state(h, c)), want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(draft_state(h, 0.0), h[-1])
    with pytest.raises(ValueError, match="two loops"):
        draft_state(h[:1], 0.5)


@pytest.mark.parametrize("pipeline", [True, False])
def test_extrapolated_drafts_stay_exact(pipeline):
    model = spec_model(loops=4, max_pos=40)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 10)
    full = engine.generate(prompts, max_new_tokens=25, stop=[])
    opts = {"pipeline": True} if pipeline else {"draft_len": 3}
    for c in (0.5, 2.0):
        spec_ = engine.generate(prompts, max_new_tokens=25, stop=[], mode="speculative", draft_loop=2, extrapolate=c, **opts)
        assert [s.tokens for s in spec_] == [f.tokens for f in full]
        assert spec_[0].stats["extrapolate"] == c
    # loop 1 has nothing to extrapolate from: the option is a no-op there
    one = engine.generate(prompts, max_new_tokens=25, stop=[], mode="speculative", draft_loop=1, extrapolate=0.5, **opts)
    plain = engine.generate(prompts, max_new_tokens=25, stop=[], mode="speculative", draft_loop=1, **opts)
    assert one[0].stats["extrapolate"] == 0.0 and [g.stats["drafted"] for g in one] == [g.stats["drafted"] for g in plain]


def test_sampling_with_extrapolated_drafts_follows_full_depth():
    """Extrapolation changes the draft distribution q; the emitted distribution must not change."""
    torch.manual_seed(5)
    model = spec_model(seed=13, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    stat, df, gens = sampled_chi2(model, [2, 4], {"top_k": 4}, draft_loop=2, pipeline=True, extrapolate=1.0)
    assert 0 < acceptance(gens) < 1
    assert stat < chi2_critical(df), (stat, df)
