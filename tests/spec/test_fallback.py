"""Falling back to full depth when drafts stop paying (spec.fallback): exact, in time, and only then."""

import functools
import random
from collections import defaultdict

import pytest
import torch

import looplm
import spec.adapt
import spec.decoder
from spec.fallback import BAR, WINDOW, merge_stats, with_fallback

from .conftest import ragged_prompts, spec_model
from .test_accept import chi2_critical
from .test_no_recompute import record_layer_calls
from .test_sampling_e2e import sampled_chi2

CASES = ({"draft_loop": 2, "pipeline": True}, {"draft_loop": 1, "pipeline": True}, {"draft_loop": 1, "draft_len": 3},
         {"draft_loop": 2, "draft_len": "adaptive"})


def _useless_drafts_model(**opts):
    """Loops that move the state far (large sublayer norms), so early loops' heads rarely agree with
    loop T's: drawn until the drafts of `opts` (default: loop 2 in rounds of 3) pass less than a
    tenth of the time."""
    opts = opts or {"draft_loop": 2, "draft_len": 3}
    for _ in range(20):
        model = spec_model(loops=4, max_pos=96, step_scale=2.0)
        probe = looplm.Engine(model).generate([1, 2, 3], max_new_tokens=40, stop=[], mode="speculative", **opts,
                                              fallback=False)
        if probe.stats["token_acceptance"] < 0.1:
            return model
    raise AssertionError("no drawn model had useless drafts")


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_drafts_that_do_not_pay_hand_over_to_full_depth_exactly(opts):
    model = _useless_drafts_model(**opts)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    n = 40
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=n, stop=[])]
    T = model.num_loops
    switched = []
    for prompt, w in zip(prompts, want):
        log, handles = record_layer_calls(model)  # one request at a time: a log row is then its position
        g = engine.generate(prompt, max_new_tokens=n, stop=[], mode="speculative", **opts)
        for h in handles:
            h.remove()
        assert g.tokens == w
        at = g.stats["fallback_at"]
        # the switch comes at the first token where fewer than BAR of the last WINDOW were accepted drafts
        assert at == _switch_at(g.steps), (at, [s.reason for s in g.steps])
        switched.append(at is not None)
        if at is None:  # a random model can fall into a cycle its early loops predict: drafts pay there
            continue
        assert all(s.reason == "verify" and not s.info["draft"] for s in g.steps[at:])
        # full depth after the switch: T loops per token; the decoder's own count covers both parts
        assert g.stats["loops_per_token"] * n >= T * (n - at)
        # only drafts of the last token run some of its loops, when the switch comes at the last token
        # (seed 1320903478: at token 39 of 40, after a draft of token 39 ran loops 1-2)
        _assert_every_position_ran_its_loops(log, len(prompt) + n - 1, T)
    assert any(switched)


def _assert_every_position_ran_its_loops(log, last: int, T: int) -> None:
    """The hand-overs skip nothing and repeat nothing: per layer and position, the loops run come in
    runs 0, 1, .. (a rejected draft's run stops early) and the last run is all of 0..T-1, for every
    position but the request's last token's, whose loops are never needed."""
    seen = defaultdict(list)
    for layer, loop, _, pos in log:
        seen[layer, pos].append(loop)
    for (_, pos), loops in seen.items():
        starts = [i for i, t in enumerate(loops) if t == 0]
        runs = [loops[a:b] for a, b in zip(starts, starts[1:] + [len(loops)])]
        assert starts[:1] == [0] and all(r == list(range(len(r))) for r in runs), loops
        assert pos == last or runs[-1] == list(range(T)), (pos, loops)
    assert max(pos for _, pos in seen if pos != last) == last - 1  # every token but the last ran its loops


def test_seeded_sampling_through_the_switch_is_reproducible_and_batch_independent():
    model = _useless_drafts_model()
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    opts = dict(max_new_tokens=40, stop=[], mode="speculative", draft_loop=2, temperature=0.2, seed=1234)
    alone = [engine.generate(p, **{**opts, "seed": 1234 + i}) for i, p in enumerate(prompts)]  # prompt i of a list: seed + i
    together = engine.generate(prompts, **opts)
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert any(g.stats["fallback_at"] is not None for g in alone)
    assert all(0 <= t < model.config.vocab_size for g in alone for t in g.tokens)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_the_bundled_model_keeps_drafting(b):
    """Its drafts pay (acceptance ~0.9 with its draft map): no prompt falls back, the pipeline
    (b = 1) or draft trees, and tokens stay exact."""
    engine = looplm.load()
    texts = ["def fibonacci(n):", "It is a truth universally acknowledged", "class Stack:\n    def __init__(self):",
             "The os.path module implements"]
    prompts = [engine.encode(t) for t in texts]
    gens = engine.generate(prompts, max_new_tokens=48, stop=[], mode="speculative", branch=b, full_depth_above=None)
    assert [g.stats["fallback_at"] for g in gens] == [None] * len(prompts)
    assert [g.tokens for g in gens] == [g.tokens for g in engine.generate(prompts, max_new_tokens=48, stop=[])]


# -- draft trees (branch > 1, spec.trees): the same switch; side lanes alive then are dropped ------------
def _switch_at(steps) -> int | None:
    """The token count at which the switch must come: the first, before the request's last token,
    where fewer than BAR of the last WINDOW emitted tokens (the first, from the prefill, aside) were
    accepted drafts."""
    drafts = [s.reason == "draft" for s in steps]
    return next((i + 1 for i in range(WINDOW, len(steps) - 1) if sum(drafts[i + 1 - WINDOW : i + 1]) < BAR * WINDOW), None)


def _record_pool(engine):
    """Wraps the engine's runner: per runner step, (loops of each item, the pool's tables) as the
    step runs (after the scheduler applied the step's table operations)."""
    runner = engine.scheduler.runners["per_loop"]
    pool, run, log = runner.cache.pool, runner.run, []

    def recorded(items):
        log.append(([fwd.num_loops for _, fwd in items], {key: list(t) for key, t in pool.tables.items()}, pool.used))
        return run(items)

    runner.run = recorded
    return pool, log


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("b", [2, 3])
def test_useless_tree_drafts_hand_over_to_full_depth_exactly(b, k):
    """Greedy trees on a model whose drafts never pass: full depth's tokens, the switch when the
    window says, no side lane alive (and no block but the sequence's) once full depth runs, and an
    empty pool after each request."""
    opts = {"draft_loop": k, "branch": b}
    model = _useless_drafts_model(**opts)
    engine = looplm.Engine(model, block_size=4)  # small blocks: forks inside blocks (lane copies) and across them
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    n = 40
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=n, stop=[])]
    pool, log = _record_pool(engine)
    switched = []
    for prompt, w in zip(prompts, want):
        log.clear()
        g = engine.generate(prompt, max_new_tokens=n, stop=[], mode="speculative", **opts)
        assert g.tokens == w
        at = g.stats["fallback_at"]
        assert at == _switch_at(g.steps)
        assert pool.used == 0 and pool.tables == {} and pool._holders == {} and pool._lanes == {}
        switched.append(at is not None)
        if at is None:
            continue
        assert all(s.reason == "verify" and not s.info["draft"] for s in g.steps[at:])
        assert g.stats["forks"] > 0  # side lanes ran before the switch
        # runner steps: the prefill, the tree's k-loop steps (lanes among them), then full depth's
        # (T loops, None: the model's all): these hold the sequence's table alone, nothing else
        tail = [i for i, (loops, _, _) in enumerate(log) if i and loops == [None]]
        assert tail == list(range(len(log) - (n - at), len(log)))
        assert any(len(tables) > 1 for _, tables, _ in log[: tail[0]])
        for _, tables, used in log[tail[0]:]:
            (seq, table), = tables.items()  # the sequence's table alone, and every block taken is in it
            assert isinstance(seq, int) and used == len(table)
    assert any(switched)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_without_fallback_the_drafts_go_on(b):
    """On a prompt where the fallback switches, fallback=False drafts (and loses) to the end: the
    pipeline (b = 1) and trees alike."""
    model = _useless_drafts_model(draft_loop=2, branch=b)
    engine = looplm.Engine(model)
    opts = dict(max_new_tokens=40, stop=[], mode="speculative", draft_loop=2, branch=b)
    for prompt in ragged_prompts(5, model.config.vocab_size, 4, 8):  # a random model may cycle where drafts pay
        on = engine.generate(prompt, **opts)
        if on.stats["fallback_at"] is not None:
            break
    at = on.stats["fallback_at"]
    assert at is not None
    g = engine.generate(prompt, **opts, fallback=False)
    assert g.tokens == on.tokens == engine.generate(prompt, max_new_tokens=40, stop=[]).tokens
    assert g.stats["fallback_at"] is None
    assert [(s.reason, s.info) for s in g.steps[:at]] == [(s.reason, s.info) for s in on.steps[:at]]
    # the drafts go on past the switch (on a random model they may all pass there: rejected can tie)
    assert g.stats["drafted"] > on.stats["drafted"] and g.stats["rejected"] >= on.stats["rejected"], (at, g.stats, on.stats)
    assert sum(s.reason == "draft" for s in g.steps) == g.stats["accepted"]


@pytest.mark.parametrize("k", [1, 2])
def test_seeded_sampled_trees_through_the_switch_are_reproducible(k):
    for _ in range(5):  # fresh models until one switches (a flat sampled draft can pass on a random model)
        model = _useless_drafts_model(draft_loop=k, branch=3)
        engine = looplm.Engine(model, block_size=4)
        prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
        opts = dict(max_new_tokens=40, stop=[], mode="speculative", draft_loop=k, branch=3, temperature=0.1,
                    seed=random.randrange(2**32))
        first, again = engine.generate(prompts, **opts), engine.generate(prompts, **opts)
        if any(g.stats["fallback_at"] is not None for g in first):
            break
    assert [g.tokens for g in again] == [g.tokens for g in first]
    assert [g.stats["fallback_at"] for g in again] == [g.stats["fallback_at"] for g in first]
    assert any(g.stats["fallback_at"] is not None for g in first)
    assert all(g.stats["fallback_at"] == _switch_at(g.steps) for g in first)
    pool = engine.scheduler.runners["per_loop"].cache.pool
    assert pool.used == 0 and pool.tables == {} and pool._holders == {}


@pytest.mark.parametrize("k", [1, 2])
def test_a_never_forking_sampled_tree_through_the_switch_is_the_sampled_pipeline(k):
    """The tree draws a call's drafts before its Step, as the pipeline does: when the fallback
    closes both after the triggering Step, their full-depth tails start from the same generator
    state (drawn after the Step, seed by seed the tails differed from the switch on)."""
    for _ in range(5):  # fresh models until one switches
        model = _useless_drafts_model(draft_loop=k, pipeline=True).double()  # float64: as in test_trees' never-forking test
        engine = looplm.Engine(model)
        prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
        opts = dict(max_new_tokens=40, stop=[], mode="speculative", draft_loop=k, temperature=0.5,
                    seed=random.randrange(2**32))
        pipe = engine.generate(prompts, **opts, pipeline=True)
        if any(g.stats["fallback_at"] is not None for g in pipe):
            break
    assert any(g.stats["fallback_at"] is not None for g in pipe)
    flat = engine.generate(prompts, **opts, branch=3, branch_threshold=0.0)
    for p, f in zip(pipe, flat):
        assert f.tokens == p.tokens and f.stats["fallback_at"] == p.stats["fallback_at"]
        assert [(s.reason, s.info) for s in f.steps] == [(s.reason, s.info) for s in p.steps]
        assert f.stats["forks"] == 0


def test_sampled_trees_through_a_switch_follow_full_depth_distribution(monkeypatch):
    """A one-token window with bar 1 switches at the first tested position that no candidate won:
    seeded requests of 3 new tokens (vocab 5, as tests/spec/test_trees.py) that switch after the
    second token or never still have full depth's joint law."""
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=4, std=0.2, step_scale=1.0, max_pos=16)
    monkeypatch.setattr(spec.decoder, "with_fallback", functools.partial(with_fallback, window=1, bar=1.0))
    stat, df, gens = sampled_chi2(model, [1, 3], {"top_k": 4}, N=2000, draft_loop=2, branch=2)
    assert stat < chi2_critical(df), (stat, df)
    at = [g.stats["fallback_at"] for g in gens]
    assert 0 < at.count(2) < len(gens) and set(at) <= {2, None}
    assert sum(g.stats["forks"] for g in gens) > 0


def test_fallback_must_be_a_bool():
    engine = looplm.Engine(spec_model())
    with pytest.raises(ValueError, match="fallback"):
        engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", fallback="yes")


# -- a busy engine (full_depth_above): the same switch, when more requests are in the engine -----------
LOAD_CASES = ({"draft_loop": 2}, {"draft_loop": 1, "branch": 2}, {"draft_loop": 1, "draft_len": 3})


@pytest.mark.parametrize("opts", LOAD_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_busy_engine_decodes_at_full_depth_from_the_first_token(opts):
    """Requests submitted together see each other: above the limit each switches at its first
    token (from the prefill), so it never drafts; at the limit none does. Tokens are full depth's."""
    model = spec_model(max_pos=64)
    engine = looplm.Engine(model, block_size=4)
    n = random.randint(3, 5)
    prompts = ragged_prompts(n, model.config.vocab_size, 1, 12)
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=24, stop=[])]
    base = dict(max_new_tokens=24, stop=[], mode="speculative", fallback=False, **opts)
    busy = engine.generate(prompts, **base, full_depth_above=n - 1)
    assert [g.tokens for g in busy] == want
    assert [(g.stats["fallback_at"], g.stats["fallback_reason"], g.stats["drafted"]) for g in busy] == [(1, "load", 0)] * n
    assert all(s.reason == "verify" and not s.info["draft"] for g in busy for s in g.steps)
    calm = engine.generate(prompts, **base, full_depth_above=n)
    assert [g.tokens for g in calm] == want
    assert [(g.stats["fallback_at"], g.stats["fallback_reason"]) for g in calm] == [(None, None)] * n
    assert sum(g.stats["drafted"] for g in calm) > 0
    pool = engine.scheduler.runners["per_loop"].cache.pool
    assert pool.used == 0 and pool.tables == {}


@pytest.mark.parametrize("opts", LOAD_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_load_that_rises_mid_request_switches_at_the_next_token(opts):
    """The load is read after every emitted token: the request switches right after the first
    token at which it exceeds the limit, and full depth finishes it exactly."""
    model = spec_model(max_pos=64)
    engine = looplm.Engine(model, block_size=4)
    prompt = ragged_prompts(1, model.config.vocab_size, 1, 12)[0]
    want = engine.generate(prompt, max_new_tokens=30, stop=[]).tokens
    quiet = random.randint(1, 20)  # tokens emitted before the engine gets busy
    reads = []

    def load() -> int:
        reads.append(1)
        return 1 if len(reads) < quiet else 5

    engine.scheduler.load = load
    g = engine.generate(prompt, max_new_tokens=30, stop=[], mode="speculative", fallback=False, full_depth_above=2, **opts)
    assert g.tokens == want
    # read after every emitted token but the last: busy from the quiet-th on, so full depth to the end
    assert (g.stats["fallback_at"], g.stats["fallback_reason"], len(reads)) == (quiet, "load", 29)
    assert g.stats["load_spans"] == [[quiet, 30]]
    assert all(s.reason == "verify" for s in g.steps[quiet:])
    T = model.num_loops
    assert g.stats["loops_per_token"] * 30 >= T * (30 - quiet)


def _busy_spell(model, q: int, w: int, n: int = 40):
    """An engine whose scheduler reports 5 requests from the q-th load read for w reads, else 1;
    a prompt and full depth's n tokens for it. Returns (engine, prompt, tokens, the reads so far)."""
    engine = looplm.Engine(model, block_size=4)
    prompt = ragged_prompts(1, model.config.vocab_size, 1, 12)[0]
    want = engine.generate(prompt, max_new_tokens=n, stop=[]).tokens
    reads = []

    def load() -> int:
        reads.append(1)
        return 5 if q <= len(reads) < q + w else 1

    engine.scheduler.load = load
    return engine, prompt, want, reads


@pytest.mark.parametrize("opts", LOAD_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_speculation_resumes_when_the_load_falls(opts):
    """Busy from token q for w tokens: those run at full depth, then a new speculative decoder
    finishes the request from the last token (its prefill replaced by that token's T loops), exactly:
    full depth's tokens, every position's loops run once and in order, statistics that add up."""
    model = spec_model(max_pos=80)
    engine, prompt, want, reads = _busy_spell(model, q := random.randint(1, 12), w := random.randint(1, 10))
    n = len(want)
    log, handles = record_layer_calls(model)
    g = engine.generate(prompt, max_new_tokens=n, stop=[], mode="speculative", fallback=False, full_depth_above=2, **opts)
    for h in handles:
        h.remove()
    assert g.tokens == want
    assert [s.index for s in g.steps] == list(range(n)) and len(reads) == n - 1
    assert (g.stats["fallback_at"], g.stats["fallback_reason"], g.stats["load_spans"]) == (q, "load", [[q, q + w]])
    assert all(s.reason == "verify" and s.info["proposed"] == 0 for s in g.steps[q : q + w + 1])
    assert any(s.info["proposed"] > 0 for s in g.steps[q + w + 1 :])  # drafting again
    st = g.stats
    # every accepted verdict is a Step, except in rounds, where a switch inside a round drops the
    # round's verdicts not yet emitted (full depth finds the same tokens again)
    drafted_steps = sum(s.reason == "draft" for s in g.steps)
    assert drafted_steps <= st["accepted"] <= st["drafted"] and (drafted_steps == st["accepted"] or "draft_len" in opts)
    assert sum(i * c for i, c in enumerate(st["accepted_len_hist"])) == st["accepted"]
    assert st["acceptance_rate"] == st["accepted"] / max(st["drafted"], 1)
    if opts.get("branch", 1) == 1:  # (a tree runs sibling candidates of one position side by side)
        _assert_every_position_ran_its_loops(log, len(prompt) + n - 1, model.num_loops)
    pool = engine.scheduler.runners["per_loop"].cache.pool
    assert pool.used == 0 and pool.tables == {} and pool._holders == {}


@pytest.mark.parametrize("branch", [1, 2])
def test_adaptive_second_drafts_keep_their_history_through_a_load_switch(branch, monkeypatch):
    """second_threshold="adaptive" (spec.seconds): the decoder that resumes after a busy spell goes on
    with the request's one chooser, which has scores from before and after the spell; exact tokens."""
    import spec.multi
    import spec.seconds
    import spec.trees

    from .test_multi import pair_map

    made, scored_at = [], []

    class Recorded(spec.seconds.SecondChooser):
        def __init__(self, stages):
            super().__init__(stages)
            made.append(self)

        def score_first(self, score):
            scored_at.append(len(reads))
            super().score_first(score)

    for module in (spec.decoder, spec.multi, spec.trees):
        monkeypatch.setattr(module, "SecondChooser", Recorded)
    model = spec_model(max_pos=80, step_scale=0.05)
    engine, prompt, want, reads = _busy_spell(model, q := random.randint(8, 14), w := random.randint(1, 6))
    g = engine.generate(prompt, max_new_tokens=len(want), stop=[], mode="speculative", fallback=False, full_depth_above=2,
                        draft_loop=2, branch=branch, draft_map=pair_map(32), draft_tokens=2, second_threshold="adaptive")
    assert g.tokens == want
    assert g.stats["load_spans"] == [[q, q + w]] and g.stats["second_threshold"] == "adaptive"
    assert len(made) == 1  # one chooser for both speculative parts
    assert min(scored_at) < q and max(scored_at) >= q + w  # it scored drafts before the spell and after it


@pytest.mark.parametrize("pairs", [False, True])
def test_the_adaptive_draft_loop_resumes_where_it_was_after_a_load_switch(pairs):
    """draft_loop="adaptive" (spec.adapt): on a model whose every loop drafts right, the request moves
    from loop 2 to loop 1 once it has seen enough tokens; a busy spell after that runs at full depth,
    and the decoder that resumes drafts at loop 1 from its first token, not at the start loop 2
    (the request's one LoopChooser remembers where it drafted). Exact tokens."""
    from .test_adapt import _pairs

    model = spec_model(loops=4, max_pos=128, step_scale=0.0)
    seen = spec.adapt.MIN_SEEN
    engine, prompt, want, reads = _busy_spell(model, q := random.randint(seen + 30, seen + 34), w := random.randint(1, 5), n=80)
    g = engine.generate(prompt, max_new_tokens=len(want), stop=[], mode="speculative", draft_loop="adaptive",
                        fallback=False, full_depth_above=2, **_pairs(pairs))
    assert g.tokens == want
    assert g.stats["load_spans"] == [[q, q + w]]
    sw = g.stats["loop_switches"]
    assert len(sw) == 2 and sw[0] == [0, 2] and sw[1][1] == 1 and sw[1][0] < q, sw  # no return to loop 2
    assert g.stats["draft_loop"] == 1
    assert any(s.info["proposed"] > 0 for s in g.steps[q + w + 1 :])  # drafting again after the spell


def test_merged_statistics_add_up_over_the_parts():
    def part():
        hist = [random.randint(0, 9) for _ in range(random.randint(2, 4))]
        acc = sum(i * c for i, c in enumerate(hist))
        tested = [random.randint(0, 9) for _ in range(3)]
        return {"drafted": acc + random.randint(0, 9), "accepted": acc, "rejected": random.randint(0, 9), "rounds": random.randint(1, 50),
                "accepted_len_hist": hist, "rows_per_forward": random.uniform(1, 8), "max_rows": random.randint(1, 16),
                "tested_by_depth": tested, "acceptance_by_depth": [random.random() if t else None for t in tested],
                "won_by_rank": [random.randint(0, 9) for _ in range(2)], "forks": random.randint(0, 9)}

    first, rest = part(), [part() for _ in range(random.randint(1, 3))]
    merged = {k: (list(v) if isinstance(v, list) else v) for k, v in first.items()}
    merge_stats(merged, [(random.randint(1, 30), p) for p in rest])
    every = [first] + rest
    for key in ("drafted", "accepted", "rejected", "rounds", "forks"):
        assert merged[key] == sum(p[key] for p in every), key
    width = max(len(p["accepted_len_hist"]) for p in every)
    assert merged["accepted_len_hist"] == [sum(p["accepted_len_hist"][i] for p in every if i < len(p["accepted_len_hist"]))
                                           for i in range(width)]
    assert merged["max_rows"] == max(p["max_rows"] for p in every)
    assert merged["rows_per_forward"] == pytest.approx(sum(p["rows_per_forward"] * p["rounds"] for p in every) / merged["rounds"])
    for d in range(3):
        tested = sum(p["tested_by_depth"][d] for p in every)
        won = sum((p["acceptance_by_depth"][d] or 0) * p["tested_by_depth"][d] for p in every)
        assert merged["tested_by_depth"][d] == tested
        assert merged["acceptance_by_depth"][d] == (pytest.approx(won / tested) if tested else None)
    acc = merged["accepted"]
    assert merged["token_acceptance"] == acc / max(acc + merged["rejected"], 1)
    assert merged["mean_accepted_len"] == acc / max(sum(merged["accepted_len_hist"]), 1)


def test_seeded_samples_never_depend_on_the_load():
    """Sampled requests above the limit: with a seed they keep drafting (their samples equal the
    same requests run alone); without one they switch at their first token like greedy ones."""
    model = spec_model(max_pos=64)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(3, model.config.vocab_size, 1, 12)
    opts = dict(max_new_tokens=20, stop=[], mode="speculative", fallback=False, full_depth_above=1, temperature=0.8)
    seed = random.randrange(2**32)
    together = engine.generate(prompts, **opts, seed=seed)
    alone = [engine.generate(p, **opts, seed=seed + i) for i, p in enumerate(prompts)]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.stats["fallback_reason"] for g in together] == [None] * 3
    assert sum(g.stats["drafted"] for g in together) > 0
    unseeded = engine.generate(prompts, **opts)
    assert [(g.stats["fallback_at"], g.stats["fallback_reason"], g.stats["drafted"]) for g in unseeded] == [(1, "load", 0)] * 3
    assert all(0 <= t < model.config.vocab_size and len(g.tokens) == 20 for g in unseeded for t in g.tokens)


def test_the_bundled_model_speculates_alone_and_not_in_a_crowd():
    """Its generation_config recommends full_depth_above (measured: its speculative requests fell
    behind full depth from 4 at once): one request drafts, four submitted together do not."""
    engine = looplm.load()
    above = engine.mode_defaults("speculative")["full_depth_above"]
    prompts = [engine.encode(t) for t in ["def fibonacci(n):", "It is a truth", "class Stack:", "import os", "x = 1"]]
    crowd = prompts[: above + 1]
    gens = engine.generate(crowd, max_new_tokens=16, stop=[], mode="speculative")
    assert [g.tokens for g in gens] == [g.tokens for g in engine.generate(crowd, max_new_tokens=16, stop=[])]
    assert [(g.stats["fallback_at"], g.stats["fallback_reason"]) for g in gens] == [(1, "load")] * len(crowd)
    alone = engine.generate(prompts[0], max_new_tokens=16, stop=[], mode="speculative")
    assert alone.stats["fallback_reason"] is None and alone.stats["accepted"] > 0
    assert alone.tokens == gens[0].tokens


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_full_depth_above_must_be_a_positive_integer(bad):
    engine = looplm.Engine(spec_model())
    with pytest.raises(ValueError, match="full_depth_above"):
        engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", full_depth_above=bad)
    assert engine.usage()["running"] == 0 and engine.usage()["waiting"] == 0
