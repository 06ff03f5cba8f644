"""Draft trees in the pipelined decoder (spec.trees): greedy exact and sampling lossless (chi-square
against full depth, with wrong rules as negative controls), blocks returned, independent of other requests."""

import random

import pytest
import torch

import looplm
import spec.accept
import spec.trees
from looplm.api import DEFAULT_MODEL
from looplm.sampling import SamplingParams, probabilities

from .conftest import ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_sampling_e2e import sampled_chi2

# keys that describe one run's timing, not its decisions
TIMING = {"tokens_per_s", "elapsed_ms", "prefill_ms"}


def _blocks_used(engine) -> int:
    return sum(c["blocks_used"] for c in engine.usage()["caches"].values())


def _side_wins(gens) -> int:
    return sum(sum(g.stats["won_by_rank"][1:]) for g in gens)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("b", [2, 3])
def test_greedy_trees_equal_full_depth_and_return_every_block(k, b):
    """Fresh models until side lanes both win and lose, rows run into the context limit (lanes
    forked at its last positions), and the pool is empty afterwards."""
    for _ in range(10):
        model = spec_model(loops=4, max_pos=40)
        engine = looplm.Engine(model, block_size=4)
        prompts = ragged_prompts(4, model.config.vocab_size, 1, 12)
        full = engine.generate(prompts, max_new_tokens=1000, stop=[])
        # the tree's own statistics: without the fallback to full depth, which a random model can trigger
        tree = engine.generate(prompts, max_new_tokens=1000, stop=[], mode="speculative", draft_loop=k, branch=b, fallback=False)
        for f, t in zip(full, tree):
            assert t.tokens == f.tokens
            assert t.finish_reason == f.finish_reason == "context"
        assert _blocks_used(engine) == 0
        pool = engine.scheduler.runners["per_loop"].cache.pool
        assert pool.free == pool.num_blocks and pool.tables == {} and pool._holders == {}
        if _side_wins(tree) and sum(g.stats["rejected"] for g in tree):
            break
    assert _side_wins(tree) > 0  # a lane forked off the sequence became the sequence
    assert sum(g.stats["rejected"] for g in tree) > 0  # and positions where no candidate won
    D = 4 // k
    for g in tree:
        st = g.stats
        assert st["branch"] == b and st["draft_loop"] == k and len(st["won_by_rank"]) == b
        assert sum(st["won_by_rank"]) == st["accepted"]
        assert st["accepted"] == sum(n * c for n, c in enumerate(st["accepted_len_hist"]))
        assert 1 <= st["max_rows"] <= D + (b - 1) * D * (D - 1) // 2
        assert len(st["acceptance_by_depth"]) == len(st["tested_by_depth"]) == D - 1
        assert sum(st["tested_by_depth"]) == st["accepted"] + st["rejected"]
        assert st["tokens_per_forward"] == len(g.tokens) / st["forwards"] and st["forwards"] == st["rounds"] + 1  # + the prefill
    assert max(g.stats["max_rows"] for g in tree) > D  # lanes ran as extra rows


def test_branch_one_is_the_pipeline_and_a_never_branching_tree_matches_it():
    model = spec_model(loops=4, max_pos=64, step_scale=0.06).double()  # float64: see the never-forking sampled test
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    for k in (1, 2):
        # (without the fallback to full depth, which would end the drafting at a low acceptance)
        pipe = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=k, pipeline=True, fallback=False)
        one = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=k, branch=1, fallback=False)
        for p, o in zip(pipe, one):
            assert [(s.token, s.reason, s.info) for s in o.steps] == [(s.token, s.reason, s.info) for s in p.steps]
            assert {key: v for key, v in o.stats.items() if key not in TIMING} == \
                {key: v for key, v in p.stats.items() if key not in TIMING}
        # the tree decoder with a threshold no draft is below: no forks, the pipeline's decisions and counts
        flat = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=k, branch=3, branch_threshold=0.0,
                               fallback=False)
        for p, f in zip(pipe, flat):
            assert f.tokens == p.tokens
            assert [(s.reason, s.info) for s in f.steps] == [(s.reason, s.info) for s in p.steps]
            same = ("drafted", "accepted", "rejected", "rounds", "loops_per_token", "accepted_len_hist", "mean_accepted_len",
                    "token_acceptance", "weight_passes_per_token", "forwards")
            assert {key: f.stats[key] for key in same} == {key: p.stats[key] for key in same}
            assert f.stats["forks"] == 0 and f.stats["max_rows"] <= 4 // k and f.stats["won_by_rank"][1:] == [0, 0]


def test_the_threshold_branches_only_on_unsure_drafts():
    model = spec_model(loops=4, max_pos=64, step_scale=0.06)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    full = engine.generate(prompts, max_new_tokens=40, stop=[])
    forks = []
    thresholds = (None, 0.5, 0.2, 0.1, 0.05, 0.03, 0.0)  # a 64-token vocabulary's uniform top-1 is 0.016
    for threshold in thresholds:
        opts = {} if threshold is None else {"branch_threshold": threshold}
        tree = engine.generate(prompts, max_new_tokens=40, stop=[], mode="speculative", draft_loop=1, branch=2, fallback=False, **opts)
        assert [t.tokens for t in tree] == [f.tokens for f in full]
        forks.append(sum(t.stats["forks"] for t in tree))
        assert all(t.stats["branch_threshold"] == threshold for t in tree)
    # branching everywhere forks, a bar of 0 never does; the counts between need not fall monotonically
    # (which siblings win changes which positions are tested next: seed 1211527899 gave 156 forks
    # always against 159 below 0.5)
    assert forks[-1] == 0 and forks[0] > 0
    assert any(0 < f < forks[0] for f in forks)  # some drafts were sure enough, some not


def test_concurrent_tree_requests_equal_their_solo_runs():
    """Trees beside plain pipelines, full depth, rounds and a timed anytime request (which makes
    the scheduler slice other Forwards into single loops): each tree request gives its solo tokens."""
    model = spec_model(loops=4, max_pos=64)
    engine = looplm.Engine(model, block_size=4)
    V = model.config.vocab_size
    reqs = []
    for i in range(10):
        prompt = torch.randint(0, V, (int(torch.randint(1, 16, ())),)).tolist()
        opts = [{"mode": "speculative", "draft_loop": 1 + i % 2, "branch": 2 + i % 2},
                {"mode": "speculative", "draft_loop": 2, "pipeline": True}, {"mode": "full"},
                {"mode": "speculative", "draft_loop": 1, "branch": 3, "branch_threshold": 0.7},
                {"mode": "speculative", "draft_loop": 1, "draft_len": 2}][i % 5]
        reqs.append((prompt, int(torch.randint(5, 30, ())), opts))
    solo = [engine.generate(p, max_new_tokens=n, stop=[], **o).tokens for p, n, o in reqs]
    streams = [engine.stream(p, max_new_tokens=n, stop=[], **o) for p, n, o in reqs]
    timed = engine.stream([1, 2, 3], max_new_tokens=30, stop=[], mode="anytime", budget_ms=1e6)
    together = [list(s) for s in streams]
    list(timed)
    assert [[s.token for s in steps] for steps in together] == solo
    assert _blocks_used(engine) == 0


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason=f"default model not present in {DEFAULT_MODEL}")
def test_default_model_trees_equal_full_depth():
    engine = looplm.load()
    texts = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "The history of the city", "import numpy as np\n"]
    prompts = [engine.encode(t) for t in texts]
    full = engine.generate(prompts, max_new_tokens=48, stop=[])
    wins = 0
    for k in (1, 2):
        for b in (2, 3):
            tree = engine.generate(prompts, max_new_tokens=48, stop=[], mode="speculative", draft_loop=k, branch=b)
            assert [t.tokens for t in tree] == [f.tokens for f in full], (k, b)
            assert all(t.stats["draft"] == ("map" if k == 2 else "loop") for t in tree)
            wins += _side_wins(tree)
    assert wins > 0
    assert _blocks_used(engine) == 0


def test_bad_tree_options_fail_cleanly_and_leave_the_engine_usable():
    model = spec_model(loops=4, max_pos=32)
    engine = looplm.Engine(model)
    cases = [
        ({"branch": 0}, "branch must be"),
        ({"branch": True}, "branch must be"),
        ({"branch": 2.0}, "branch must be"),
        ({"branch": 65}, "branch must be"),
        ({"branch": 2, "draft_len": 3}, "branch=2.*pipeline"),
        ({"branch": 2, "pipeline": False}, "branch=2.*pipeline"),
        ({"branch": 2, "draft_loop": 3}, "branch=2.*divide"),
        ({"branch_threshold": 0.5}, "branch_threshold"),
        ({"branch": 2, "branch_threshold": 1.5}, "branch_threshold"),
        ({"branch": 2, "branch_threshold": "high"}, "branch_threshold"),
    ]
    for opts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.generate([1, 2, 3], max_new_tokens=5, mode="speculative", **opts)
    assert _blocks_used(engine) == 0
    full = engine.generate([1, 2, 3], max_new_tokens=12, stop=[])
    assert engine.generate([1, 2, 3], max_new_tokens=12, stop=[], mode="speculative", branch=2).tokens == full.tokens


def test_trees_are_refused_under_tensor_parallelism():
    """Lanes copy cache positions outside the runner step that rank 0 broadcasts, so a tree request
    on a tensor-parallel model would leave the other ranks' lanes stale: it is refused instead."""
    model = spec_model(loops=4, max_pos=32)
    engine = looplm.Engine(model)
    model.tp = (0, 2)  # what looplm.tp.connect marks a sharded model with
    with pytest.raises(ValueError, match="tensor parallelism"):
        engine.generate([1, 2, 3], max_new_tokens=5, mode="speculative", branch=2)
    assert _blocks_used(engine) == 0


# -- sampling: multi-candidate rejection (spec.accept.accept_candidates) -------------------------
def _first_candidate_always(cands, q, p, count, generator=None):
    """A wrong rule: keeps the first candidate whenever there is one (emits the draft distribution)."""
    won, tokens = spec.accept.accept_candidates(cands, q, p, count, generator)
    return torch.where(count > 0, 0, won), torch.where(count > 0, cands[:, 0], tokens)


def _keep_target(r, q):
    """A wrong residual update: a rejected candidate leaves the target distribution as it was."""
    return r


SAMPLED_CASES = [  # (wrong rule, post-processing, draft_loop, branch, samples)
    (None, {"top_k": 4}, 1, 3, 3000),
    (None, {"top_p": 0.85, "temperature": 0.8}, 2, 2, 2000),
    ((spec.accept, "_residual", _keep_target), {"top_k": 4}, 1, 3, 1000),
    ((spec.trees, "accept_candidates", _first_candidate_always), {"top_k": 4}, 2, 2, 1000),
]


@pytest.mark.parametrize("wrong,post,k,b,N", SAMPLED_CASES)
def test_sampled_trees_follow_full_depth_distribution(wrong, post, k, b, N, monkeypatch):
    """N seeded requests of 3 new tokens (vocab 5): the joint law of the tokens is full depth's
    (positions 1 and 2 are tested: at forks, and after a side lane won); a rejection that does not
    update the target, or a rule that keeps the first candidate, fails the same test."""
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    prompt, params = [1, 3], SamplingParams(**{"temperature": 1.0, **post})
    with torch.no_grad():  # the draft (loop k) must differ from the target for the test to have power
        ll = model.per_loop_logits(torch.tensor([prompt + [0]]))[:, 0, -1]
    assert 0.5 * (probabilities(ll[-1], params) - probabilities(ll[k - 1], params)).abs().sum() > 0.15
    if wrong is not None:
        monkeypatch.setattr(*wrong)
    stat, df, gens = sampled_chi2(model, prompt, post, N=N, draft_loop=k, branch=b)
    if wrong is None:
        assert stat < chi2_critical(df), (stat, df)
        assert sum(g.stats["forks"] for g in gens) > 0
        assert _side_wins(gens) > 0 and sum(g.stats["rejected"] for g in gens) > 0  # side lanes won, and no candidate did
    else:
        assert stat > chi2_critical(df), (stat, df)


@pytest.mark.parametrize("k", [1, 2])
def test_a_never_forking_sampled_tree_is_the_sampled_pipeline(k):
    """With a threshold no draft is below, a seeded sampled tree draws as spec.pipeline does (the
    verdict's draws, then the drafts', both before the Step): the same tokens, decisions and counts,
    also after a switch to full depth (spec.fallback closes each decoder after the triggering Step).
    In float64: the two decoders head different sets of rows, and float32 rounding of those products
    moved a residual draw across a boundary now and then (seed 270146889)."""
    model = spec_model(loops=4, max_pos=64).double()
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    post = random.choice([{"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0.7, "top_k": 8}])
    seed = random.randrange(2**32)
    pipe = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=k, pipeline=True, seed=seed,
                           **post)
    flat = engine.generate(prompts, max_new_tokens=30, stop=[], mode="speculative", draft_loop=k, branch=3,
                           branch_threshold=0.0, seed=seed, **post)
    assert sum(p.stats["rejected"] for p in pipe) > 0  # the draws of rejections (residuals) are covered too
    same = ("drafted", "accepted", "rejected", "rounds", "accepted_len_hist", "token_acceptance", "forwards")
    for p, f in zip(pipe, flat):
        assert f.tokens == p.tokens
        assert [(s.reason, s.info) for s in f.steps] == [(s.reason, s.info) for s in p.steps]
        assert {key: f.stats[key] for key in same} == {key: p.stats[key] for key in same}
        assert f.stats["forks"] == 0


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_trees_are_seeded_and_return_every_block(k):
    """Rows run into the context limit with side lanes winning and losing: a seed replays the same
    tokens, and the pool is empty afterwards. A threshold above every draft's top-1 probability
    is no threshold (the same draws); lower ones fork at some positions only."""
    for _ in range(10):
        model = spec_model(loops=4, max_pos=40)
        engine = looplm.Engine(model, block_size=4)
        prompts = ragged_prompts(4, model.config.vocab_size, 1, 12)
        opts = dict(max_new_tokens=1000, stop=[], mode="speculative", draft_loop=k, branch=3, temperature=0.9, seed=random.randrange(2**32),
                    fallback=False)
        tree = engine.generate(prompts, **opts)
        assert [t.tokens for t in engine.generate(prompts, **opts)] == [t.tokens for t in tree]
        assert all(t.finish_reason == "context" for t in tree)
        assert _blocks_used(engine) == 0
        pool = engine.scheduler.runners["per_loop"].cache.pool
        assert pool.free == pool.num_blocks and pool.tables == {} and pool._holders == {}
        if _side_wins(tree) and sum(g.stats["rejected"] for g in tree):
            break
    assert _side_wins(tree) > 0 and sum(g.stats["rejected"] for g in tree) > 0
    for g in tree:
        st = g.stats
        assert sum(st["won_by_rank"]) == st["accepted"] and sum(st["tested_by_depth"]) == st["accepted"] + st["rejected"]
        assert 1 <= st["max_rows"] <= 4 // k + 2 * (4 // k) * (4 // k - 1) // 2
    forks = sum(g.stats["forks"] for g in tree)
    above = engine.generate(prompts, **{**opts, "branch_threshold": 1.0})  # q of a 64-token vocabulary at temperature 0.9 is never one-hot
    assert [g.tokens for g in above] == [g.tokens for g in tree] and sum(g.stats["forks"] for g in above) == forks
    some = [sum(g.stats["forks"] for g in engine.generate(prompts, **{**opts, "branch_threshold": t})) for t in (0.1, 0.05, 0.03, 0.02)]
    assert any(0 < f < forks for f in some), (some, forks)
    assert _blocks_used(engine) == 0


def test_concurrent_sampled_tree_requests_equal_their_solo_runs():
    """Seeded sampled trees (temperature, top-p, top-k, a threshold) beside greedy trees, sampled
    pipelines, full depth and a timed anytime request: each seeded request gives its solo tokens."""
    model = spec_model(loops=4, max_pos=64)
    engine = looplm.Engine(model, block_size=4)
    V = model.config.vocab_size
    reqs = []
    for i in range(10):
        prompt = torch.randint(0, V, (int(torch.randint(1, 16, ())),)).tolist()
        opts = [{"mode": "speculative", "draft_loop": 1 + i % 2, "branch": 2 + i % 2, "temperature": 0.8},
                {"mode": "speculative", "draft_loop": 1, "branch": 3, "temperature": 1.0, "top_p": 0.9, "branch_threshold": 0.5},
                {"mode": "speculative", "draft_loop": 2, "branch": 2},
                {"mode": "speculative", "draft_loop": 2, "pipeline": True, "temperature": 0.8},
                {"mode": "full", "temperature": 0.9, "top_k": 8}][i % 5]
        reqs.append((prompt, int(torch.randint(5, 30, ())), {**opts, "seed": random.randrange(2**32)}))
    solo = [engine.generate(p, max_new_tokens=n, stop=[], **o).tokens for p, n, o in reqs]
    streams = [engine.stream(p, max_new_tokens=n, stop=[], **o) for p, n, o in reqs]
    timed = engine.stream([1, 2, 3], max_new_tokens=30, stop=[], mode="anytime", budget_ms=1e6)
    together = [list(s) for s in streams]
    list(timed)
    assert [[s.token for s in steps] for steps in together] == solo
    assert _blocks_used(engine) == 0
