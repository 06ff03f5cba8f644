"""Second drafts inside draft trees (spec.trees with draft_tokens=2): the top-1 candidate of the
sequence's lane carries a second draft, so a tree can finish two tokens in one forward. Greedy
exact, sampling lossless (chi-square against full depth, with a wrong test of the second draft as
the negative control), the plain tree when no second draft is made, blocks returned."""

import random

import pytest
import torch

import looplm
import spec.trees
from looplm.sampling import SamplingParams, probabilities

from .conftest import ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_multi import pair_map
from .test_sampling_e2e import sampled_chi2


def _blocks_used(engine) -> int:
    return sum(c["blocks_used"] for c in engine.usage()["caches"].values())


def _side_wins(gens) -> int:
    return sum(sum(g.stats["won_by_rank"][1:]) for g in gens)


@pytest.mark.parametrize("T,k,b,threshold", [(4, 2, 2, None), (4, 2, 3, "adaptive"), (6, 2, 2, None), (6, 3, 3, 0.05)])
def test_greedy_tree_pairs_equal_full_depth_and_return_every_block(T, k, b, threshold):
    """Fresh models until side lanes win, second drafts pass and fail, and some forward emits two
    tokens; rows run into the context limit; the pool is empty afterwards."""
    for _ in range(12):
        model = spec_model(loops=T, max_pos=40)
        engine = looplm.Engine(model, block_size=4)
        prompts = ragged_prompts(4, model.config.vocab_size, 1, 12)
        full = engine.generate(prompts, max_new_tokens=1000, stop=[])
        dmap = pair_map(32, k=k, next_scale=0.0, token_scale=random.choice([None, 0.1]))
        tree = engine.generate(prompts, max_new_tokens=1000, stop=[], mode="speculative", draft_loop=k, branch=b,
                               draft_map=dmap, draft_tokens=2, second_threshold=threshold, fallback=False)
        for f, t in zip(full, tree):
            assert t.tokens == f.tokens
            assert t.finish_reason == f.finish_reason == "context"
        assert _blocks_used(engine) == 0
        pool = engine.scheduler.runners["per_loop"].cache.pool
        assert pool.free == pool.num_blocks and pool.tables == {}
        won = sum(g.stats["seconds_accepted"] for g in tree)
        if _side_wins(tree) and won and sum(g.stats["seconds_tested"] for g in tree) > won \
                and sum(g.stats["pairs_emitted"] for g in tree):
            break
    assert _side_wins(tree) > 0  # a side lane became the sequence
    assert sum(g.stats["seconds_tested"] - g.stats["seconds_accepted"] for g in tree) > 0  # seconds failed
    assert sum(g.stats["pairs_emitted"] for g in tree) > 0  # and forwards emitted two tokens
    D = T // k
    for g in tree:
        st = g.stats
        assert st["draft_tokens"] == 2 and st["second_threshold"] == threshold and st["branch"] == b
        assert st["seconds_accepted"] <= st["seconds_tested"] <= st["seconds"] <= st["drafted"]
        assert st["pairs_emitted"] <= st["seconds_accepted"]
        assert sum(st["won_by_rank"]) == st["accepted"]
        assert st["accepted"] == sum(n * c for n, c in enumerate(st["accepted_len_hist"]))
        assert sum(st["tested_by_depth"]) == st["accepted"] + st["rejected"]
        assert len(st["tested_by_depth"]) == 2 * D - 1
        assert st["tokens_per_forward"] == len(g.tokens) / st["forwards"] and st["forwards"] == st["rounds"] + 1
        assert len(g.tokens) - 1 <= st["rounds"] - 1 + st["pairs_emitted"]  # two tokens in a forward: more tokens than calls


@pytest.mark.parametrize("sampled", [False, True])
def test_a_tree_without_second_drafts_is_the_plain_tree(sampled):
    """A second-token head never confident enough (zero head: top-1 probability 1/V, threshold
    0.5): the plain tree's tokens, decisions and counts, and when sampling its draws for a seed,
    also through a switch to full depth. In float64 (see test_trees' never-forking test)."""
    model = spec_model(loops=4, max_pos=64).double()
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    dmap = pair_map(32, next_scale=None, first_scale=0.05)
    post = random.choice([{"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}]) if sampled else {}
    seed = random.randrange(2**32)
    opts = dict(max_new_tokens=30, stop=[], mode="speculative", draft_loop=2, branch=2, draft_map=dmap, seed=seed, **post)
    tree = engine.generate(prompts, **opts)
    two = engine.generate(prompts, **opts, draft_tokens=2, second_threshold=0.5)
    assert sum(t.stats["forks"] for t in tree) > 0
    same = ("drafted", "accepted", "rejected", "rounds", "accepted_len_hist", "won_by_rank", "forks", "forwards", "fallback_at")
    for t, w in zip(tree, two):
        assert w.tokens == t.tokens
        assert [(s.reason, s.info) for s in w.steps] == [(s.reason, s.info) for s in t.steps]
        assert {key: w.stats[key] for key in same} == {key: t.stats[key] for key in same}
        assert w.stats["seconds"] == 0


def _flat_q2(real):
    """A wrong test of second drafts: drawn from q2, tested as if drawn from the uniform distribution."""

    def second_draft(*args, **kwargs):
        tok, q2, shadow = real(*args, **kwargs)
        return tok, None if q2 is None else torch.full_like(q2, 1 / q2.numel()), shadow

    return second_draft


@pytest.mark.parametrize("wrong,N", [(False, 3000), (True, 1500)])
def test_sampled_tree_pairs_follow_full_depth_distribution(wrong, N, monkeypatch):
    """N seeded requests of 3 new tokens (vocab 5): token 1's candidates are tested by multi-candidate
    rejection, token 2 (the top-1's second draft) by the Leviathan/Chen test with its q2; the joint
    law is full depth's. Testing the second draft against the wrong distribution fails the same test."""
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    post = {"top_k": 4}
    prompt, params = [1, 3], SamplingParams(temperature=1.0, **post)
    dmap = pair_map(32, next_scale=0.3, first_scale=0.3, token_scale=0.5)
    with torch.no_grad():  # the second draft must differ from the target for the test to have power
        out = model.loop_outputs(torch.tensor([prompt + [0]]))
        e = model.model.embed_tokens(torch.tensor([0]))
        q2 = probabilities(model.head(dmap.next_state(out.hidden[:2, 0, -2:-1], 2, e))[0], params)
        p = probabilities(model.head(out.hidden[-1, 0, -1]), params)
    assert 0.5 * (p - q2).abs().sum() > 0.15
    if wrong:
        monkeypatch.setattr(spec.trees, "second_draft", _flat_q2(spec.trees.second_draft))
    stat, df, gens = sampled_chi2(model, prompt, post, N=N, draft_loop=2, branch=2, draft_map=dmap, draft_tokens=2,
                                  fallback=False)
    if wrong:
        assert stat > chi2_critical(df), (stat, df)
        return
    assert stat < chi2_critical(df), (stat, df)
    tested, won = (sum(g.stats[key] for g in gens) for key in ("seconds_tested", "seconds_accepted"))
    assert 0 < won < tested  # second drafts were tested, and some passed and some failed
    assert _side_wins(gens) > 0  # and side lanes won at token 1


def test_tree_pairs_need_a_head_and_a_pipeline():
    model = spec_model(loops=4, max_pos=32)
    engine = looplm.Engine(model)
    with pytest.raises(ValueError, match="second-token head"):
        engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", branch=2, draft_tokens=2)
    with pytest.raises(ValueError, match="draft_loop must be >= 2") as e:
        engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", branch=2, draft_tokens=2, draft_loop=1,
                        draft_map=pair_map(32))
    assert e.value.option == "draft_tokens"
    assert _blocks_used(engine) == 0
