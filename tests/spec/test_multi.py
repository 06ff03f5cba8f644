"""Second-token drafts in the pipeline (spec.multi, draft_tokens=2): greedy exact, sampling lossless
(chi-square against full depth, with wrong rules as negative controls), the pipeline when no second
draft is made, clear errors."""

import random

import pytest
import torch

import looplm
import spec.multi
from looplm.options import OptionError
from looplm.sampling import SamplingParams, probabilities
from spec.drafts import DraftMap

from .conftest import ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_sampling_e2e import accept_without_ratio, sampled_chi2


def pair_map(H: int, k: int = 2, next_scale: float | None = 0.0, first_scale: float = 0.0,
             token_scale: float | None = None) -> DraftMap:
    """A loop-k map whose first map is [0, I] (the plain loop-k draft) plus `first_scale` noise and
    whose second-token head is the same map plus `next_scale` noise (it drafts token n+2 as what
    token n drafts for n+1: right where the text repeats a token); next_scale None: a zero
    second-token head (uniform logits, top-1 probability 1/V). With `token_scale` the head is
    conditioned on the first draft's token: its embedding enters through random weights of that scale."""
    w = torch.cat([torch.zeros(H, H), torch.eye(H)], 1)
    p = {"weight": w + first_scale * torch.randn(H, 2 * H), "bias": first_scale * torch.randn(H)}
    if next_scale is None:
        p.update({"next.weight": torch.zeros(H, 2 * H), "next.bias": torch.zeros(H)})
    else:
        p.update({"next.weight": w + next_scale * torch.randn(H, 2 * H), "next.bias": next_scale * torch.randn(H)})
    if token_scale is not None:
        p["next.weight"] = torch.cat([p["next.weight"], token_scale * torch.randn(H, H)], 1)
    return DraftMap({k: p})


def _blocks_used(engine) -> int:
    return sum(c["blocks_used"] for c in engine.usage()["caches"].values())


@pytest.mark.parametrize("conditioned", [False, True])
def test_greedy_pairs_equal_full_depth_and_return_every_block(conditioned):
    """Fresh models until second drafts both pass and fail and some forward emits two tokens; rows
    run into the context limit; the pool is empty afterwards. Also with a second-token head that
    reads the first draft's token."""
    for _ in range(10):
        model = spec_model(loops=4, max_pos=40)
        engine = looplm.Engine(model, block_size=4)
        prompts = ragged_prompts(4, model.config.vocab_size, 1, 12)
        full = engine.generate(prompts, max_new_tokens=1000, stop=[])
        dmap = pair_map(32, token_scale=0.1 if conditioned else None)
        assert dmap.next_conditioned(2) == conditioned
        two = engine.generate(prompts, max_new_tokens=1000, stop=[], mode="speculative", draft_loop=2,
                              draft_map=dmap, draft_tokens=2, fallback=False)
        for f, t in zip(full, two):
            assert t.tokens == f.tokens
            assert t.finish_reason == f.finish_reason == "context"
        assert _blocks_used(engine) == 0
        won = sum(g.stats["seconds_accepted"] for g in two)
        if won and sum(g.stats["seconds_tested"] for g in two) > won:
            break
    assert sum(g.stats["pairs_emitted"] for g in two) > 0
    assert sum(g.stats["seconds_tested"] - g.stats["seconds_accepted"] for g in two) > 0
    for g in two:
        st = g.stats
        assert st["draft_tokens"] == 2 and st["second_threshold"] is None
        assert st["seconds_accepted"] <= st["seconds_tested"] <= st["seconds"] <= st["drafted"]
        assert st["pairs_emitted"] <= st["seconds_accepted"]
        assert st["accepted"] == sum(n * c for n, c in enumerate(st["accepted_len_hist"]))
        assert st["tokens_per_forward"] == len(g.tokens) / st["forwards"] and st["forwards"] == st["rounds"] + 1  # + the prefill
        # a forward that emits two tokens is what lets tokens outnumber decode forwards
        assert len(g.tokens) - 1 <= st["rounds"] - 1 + st["pairs_emitted"]


@pytest.mark.parametrize("branch", [1, 2])
def test_stops_and_limits_inside_a_pair_are_full_depth_s(branch):
    """max_new and stop tokens that fall on either token of a pair: the same tokens and finish; also
    for a draft tree whose top-1 candidate carries the pair (spec.trees)."""
    for _ in range(10):
        model = spec_model(loops=4, max_pos=64)
        engine = looplm.Engine(model)
        prompt = ragged_prompts(1, model.config.vocab_size, 2, 8)
        ref = engine.generate(prompt, max_new_tokens=30, stop=[])[0].tokens
        opts = dict(mode="speculative", draft_loop=2, branch=branch, draft_map=pair_map(32), draft_tokens=2, fallback=False)
        if engine.generate(prompt, max_new_tokens=30, stop=[], **opts)[0].stats["pairs_emitted"]:
            break
    for n in range(1, 12):
        assert engine.generate(prompt, max_new_tokens=n, stop=[], **opts)[0].tokens == ref[:n]
    for i in random.sample(range(1, 30), 6):
        stop = ref[i]
        full = engine.generate(prompt, max_new_tokens=30, stop=[stop])[0]
        two = engine.generate(prompt, max_new_tokens=30, stop=[stop], **opts)[0]
        assert two.tokens == full.tokens and two.finish_reason == full.finish_reason == "stop"


@pytest.mark.parametrize("sampled", [False, True])
def test_without_second_drafts_it_is_the_pipeline(sampled):
    """A second-token head never confident enough (zero head: top-1 probability 1/V, threshold
    0.5): the pipeline's tokens, decisions and counts, and when sampling the pipeline's draws for a
    seed, also through a switch to full depth (the fallback is on). In float64: the two decoders head
    different sets of rows, whose float32 rounding could move a draw across a boundary."""
    model = spec_model(loops=4, max_pos=64).double()
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    dmap = pair_map(32, next_scale=None, first_scale=0.05)
    post = random.choice([{"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0.7, "top_k": 8}]) if sampled else {}
    seed = random.randrange(2**32)
    pipe = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=2, draft_map=dmap, seed=seed, **post)
    two = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=2, draft_map=dmap, seed=seed,
                          draft_tokens=2, second_threshold=0.5, **post)
    assert sum(p.stats["rejected"] for p in pipe) > 0
    same = ("drafted", "accepted", "rejected", "rounds", "accepted_len_hist", "token_acceptance", "forwards", "fallback_at")
    for p, t in zip(pipe, two):
        assert t.tokens == p.tokens
        assert [(s.reason, s.info) for s in t.steps] == [(s.reason, s.info) for s in p.steps]
        assert {key: t.stats[key] for key in same} == {key: p.stats[key] for key in same}
        assert t.stats["seconds"] == 0 and t.stats["second_threshold"] == 0.5


def _accept_always(drafts, q, p, limit, generator=None):
    return limit.clone(), drafts.clone()


SAMPLED_CASES = [  # (wrong rule, post-processing, samples, second-token head conditioned on the first draft)
    (None, {"top_k": 4}, 3000, False),
    (None, {"top_p": 0.85, "temperature": 0.8}, 2000, False),
    (accept_without_ratio, {"top_k": 4}, 1000, False),
    (_accept_always, {"top_k": 4}, 1000, False),
    (None, {"top_k": 4}, 3000, True),
    (accept_without_ratio, {"top_k": 4}, 1000, True),
]


@pytest.mark.parametrize("wrong,post,N,conditioned", SAMPLED_CASES)
def test_sampled_pairs_follow_full_depth_distribution(wrong, post, N, conditioned, monkeypatch):
    """N seeded requests of 3 new tokens (vocab 5): tokens 1 and 2 are drafted together (2 by the
    second-token head, which may read token 1's draft) and tested at loop T; their joint law with
    token 0 is full depth's. A rule that accepts without the ratio test, or every draft, fails the
    same test."""
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    prompt, params = [1, 3], SamplingParams(**{"temperature": 1.0, **post})
    dmap = pair_map(32, next_scale=0.3, first_scale=0.3, token_scale=0.5 if conditioned else None)
    with torch.no_grad():  # the second draft must differ from the target for the test to have power
        out = model.loop_outputs(torch.tensor([prompt + [0]]))
        e = model.model.embed_tokens(torch.tensor([0])) if conditioned else None  # token 1 drafted as 0
        q2 = probabilities(model.head(dmap.next_state(out.hidden[:2, 0, -2:-1], 2, e))[0], params)
        p = probabilities(model.head(out.hidden[-1, 0, -1]), params)
    assert 0.5 * (p - q2).abs().sum() > 0.15
    if wrong is not None:
        monkeypatch.setattr(spec.multi, "accept_sampled", wrong)
    stat, df, gens = sampled_chi2(model, prompt, post, N=N, draft_loop=2, draft_map=dmap, draft_tokens=2, fallback=False)
    if wrong is None:
        assert stat < chi2_critical(df), (stat, df)
        tested, won = (sum(g.stats[key] for g in gens) for key in ("seconds_tested", "seconds_accepted"))
        assert 0 < won < tested  # second drafts were tested, and some passed and some failed
    else:
        assert stat > chi2_critical(df), (stat, df)


def test_bad_options_get_errors_naming_them():
    model = spec_model(loops=4, max_pos=32)
    engine = looplm.Engine(model)
    prompt = [[1, 2, 3]]
    base = dict(max_new_tokens=4, mode="speculative")
    dmap = pair_map(32)
    cases = [
        (dict(draft_tokens=3), "draft_tokens", "1 or 2"),
        (dict(draft_tokens=2.0), "draft_tokens", "1 or 2"),
        (dict(second_threshold=0.5), "second_threshold", "needs draft_tokens=2"),
        (dict(draft_tokens=2, second_threshold=1.5, draft_map=dmap), "second_threshold", "second_threshold"),
        (dict(draft_tokens=2, draft_loop=1, draft_map=dmap), "draft_tokens", "draft_loop must be >= 2"),
        (dict(draft_tokens=2, draft_loop=3, draft_map=dmap), "draft_tokens", "divide T = 4"),
        (dict(draft_tokens=2, pipeline=False, draft_map=dmap), "draft_tokens", "pipeline"),
    ]
    for opts, option, words in cases:
        with pytest.raises(OptionError, match=words) as e:
            engine.generate(prompt, **base, **opts)
        assert e.value.option == option
    plain = DraftMap({2: {n: t for n, t in dmap.params[2].items() if not n.startswith("next.")}})
    for opts, words in [(dict(draft_map=plain), "no draft map with a second-token head for draft_loop=2"),
                        (dict(draft_map=None), "no draft map with a second-token head"),
                        (dict(draft_map=plain, draft_loop="adaptive"), "no draft map with a second-token head for any draft loop"),
                        (dict(draft_map=dmap, extrapolate=0.5), None)]:
        if words is None:  # a map with the head: runs (the extrapolation is unused, as with any map)
            assert engine.generate(prompt, **base, draft_tokens=2, **opts)[0].stats["draft_tokens"] == 2
            continue
        with pytest.raises(ValueError, match=words):
            engine.generate(prompt, **base, draft_tokens=2, **opts)
    assert engine.generate(prompt, **base)[0].tokens  # the engine still serves after the errors
