"""Anytime decoding against full-depth decoding and against no-cache references built from per-loop outputs."""

import pytest
import torch

import anytime
import looplm
from looplm.checkpoint import save_pretrained
from looplm.decoding import DecodeRequest, prefill
from looplm.paged import PagedKVCache
from looplm.runner import Runner, drive
from looplm.exits import q_exit_loops
from looplm.sampling import SamplingParams

from .conftest import random_prompts, spread_gate

T = 4


def reference(model, prompt, n, exit_loop_of):
    """No-cache greedy reference: token i = argmax of loop k_i's logits at the last position of the
    growing sequence, where k_i = exit_loop_of(per-loop outputs at that position); state from all T loops."""
    seq, toks, loops = list(prompt), [], []
    for _ in range(n):
        out = model.loop_outputs(torch.tensor([seq]))
        k = exit_loop_of(out.logits[:, 0, -1], out.gates[:, 0, -1], out.hidden[:, 0, -1])
        tok = int(out.logits[k - 1, 0, -1].argmax())
        toks.append(tok)
        loops.append(k)
        seq.append(tok)
    return toks, loops


@pytest.mark.parametrize("skip", ["exact", "copy"])
def test_unbounded_equals_full_depth(engine, skip):
    prompts = random_prompts(1, [5, 2, 9])
    full = engine.generate(prompts, max_new_tokens=14, stop=[])
    any_ = engine.generate(prompts, max_new_tokens=14, stop=[], mode="anytime", skip=skip)
    for f, a in zip(full, any_):
        assert a.tokens == f.tokens
        assert all(s.exit_loop == T and s.loops == T and s.reason == "max_depth" for s in a.steps)
    assert any_[0].stats["finish_loops"] == 0 and any_[0].stats["copied_slots"] == 0


def test_unbounded_single_prompt_equals_full_depth(engine):
    prompt = random_prompts(2, [7])[0]
    full = engine.generate(prompt, max_new_tokens=20, stop=[])
    assert engine.generate(prompt, max_new_tokens=20, stop=[], mode="anytime").tokens == full.tokens


def test_shared_without_shared_cache_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="shared-KV cache"):
        engine.generate([1, 2, 3], max_new_tokens=2, stop=[], mode="anytime", skip="shared")
    with pytest.raises(ValueError, match="per-loop cache"):
        engine.generate([1, 2, 3], max_new_tokens=2, stop=[], mode="anytime", skip="exact", kv="last")


@pytest.mark.parametrize("kv", ["last", "mean"])
def test_shared_unbounded_equals_full_depth_on_the_same_shared_cache(engine, kv):
    prompts = random_prompts(3, [6, 2])
    full = engine.generate(prompts, max_new_tokens=12, stop=[], kv=kv)
    per_loop = engine.generate(prompts, max_new_tokens=12, stop=[])
    assert [g.tokens for g in full] != [g.tokens for g in per_loop]  # sharing really changes the output here
    for skip in (None, "shared"):
        gens = engine.generate(prompts, max_new_tokens=12, stop=[], mode="anytime", kv=kv, skip=skip)
        assert [g.tokens for g in gens] == [g.tokens for g in full]
        assert gens[0].stats["skip"] == "shared"


def test_shared_with_a_budget_runs_and_skips_nothing_extra(engine):
    prompts = random_prompts(4, [5, 3])
    gens = engine.generate(prompts, max_new_tokens=8, stop=[], mode="anytime", kv="last", budget_loops=2)
    assert all(s.exit_loop == 2 for g in gens for s in g.steps)
    assert gens[0].stats["finish_loops"] == 0 and gens[0].stats["copied_slots"] == 0
    assert gens[0].stats["loops_computed_per_token"] == pytest.approx((2 * T + 14 * 2) / 16)


@pytest.mark.parametrize("finish", ["eager", "lazy", "ahead"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_loop_budget_exact_equals_static_exit_reference(model, engine, k, finish):
    prompts = random_prompts(10 + k, [6, 3])
    n = 10
    gens = engine.generate(prompts, max_new_tokens=n, stop=[], mode="anytime", budget_loops=k, finish=finish)
    full = engine.generate(prompts, max_new_tokens=n, stop=[])
    for p, g, f in zip(prompts, gens, full):
        ref, _ = reference(model, p, n, lambda logits, gates, hidden: k)
        assert g.tokens == ref
        assert [s.exit_loop for s in g.steps] == [k] * n
        assert [s.reason for s in g.steps] == ["budget" if k < T else "max_depth"] * n
        # the first token comes from the prefill; with a cap alone "ahead" runs as "eager"
        assert [s.loops for s in g.steps] == [T] + [k] * (n - 1)
        assert g.stats["finish"] == ("eager" if finish == "ahead" else finish)
        if k < T:
            assert g.tokens != f.tokens  # the test model's early loops really disagree with the last
    # the same depth as a static policy
    static = engine.generate(prompts, max_new_tokens=n, stop=[], mode="anytime", exit="static", threshold=k)
    assert [g.tokens for g in static] == [g.tokens for g in gens]


@pytest.mark.parametrize("finish", ["eager", "lazy", "ahead"])
@pytest.mark.parametrize("q", [0.3, 0.5, 0.9])
def test_q_exit_exact_equals_no_cache_reference(model, engine, q, finish):
    spread_gate(model)  # different tokens exit at different loops
    prompts = random_prompts(20, [4, 8, 1])
    n = 12
    gens = engine.generate(prompts, max_new_tokens=n, stop=[], mode="anytime", exit="q_exit", q=q, finish=finish)
    seen = set()
    for p, g in zip(prompts, gens):
        ref, ref_loops = reference(model, p, n, lambda logits, gates, hidden: int(q_exit_loops(gates, q)))
        assert g.tokens == ref
        assert [s.exit_loop for s in g.steps] == ref_loops
        assert all(s.reason == ("max_depth" if s.exit_loop == T else "policy") for s in g.steps)
        seen.update(ref_loops)
    assert len(seen) > 1  # not vacuous: tokens left at different loops


@pytest.mark.parametrize("finish", ["eager", "ahead"])
@pytest.mark.parametrize("trace", [False, True])
def test_q_exit_applies_the_head_only_where_a_token_leaves(model, engine, trace, finish):
    """The gate decides q_exit: the LM head runs for the prefill's T loops and once per emitted
    token, not after every loop (trace=True reads it after every loop computed before the exit:
    the exit loops with "eager", all T with "ahead"); same tokens."""
    spread_gate(model)  # different tokens exit at different loops
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    prompt, n = random_prompts(21, [6])[0], 12
    try:
        g = engine.generate(prompt, max_new_tokens=n, stop=[], mode="anytime", exit="q_exit", q=0.5, trace=trace,
                            finish=finish)
    finally:
        hook.remove()
    ref, ref_loops = reference(model, prompt, n, lambda logits, gates, hidden: int(q_exit_loops(gates, 0.5)))
    assert g.tokens == ref and [s.exit_loop for s in g.steps] == ref_loops
    assert sum(ref_loops[1:]) > n - 1  # not vacuous: some tokens ran more than one loop
    traced = sum(ref_loops[1:]) if finish == "eager" else T * (n - 1)
    assert sum(rows) == T + (traced if trace else n - 1)
    if trace:  # the chosen token's probability after each loop up to its exit
        assert [len(s.info["probs"]) for s in g.steps] == ref_loops


@pytest.mark.parametrize("name,thr", [("q_exit", 0.5), ("confidence", 0.12), ("delta", 0.75)])
def test_finish_ahead_runs_one_forward_per_token_and_leaves_the_full_depth_cache(model, engine, name, thr):
    """finish="ahead": every decode token runs its T loops in one Forward and the exit is replayed
    over them; the exits and tokens are the no-cache reference's, and the cache equals the one a
    prefill of the whole sequence writes, in every slot, at once (nothing is left pending)."""
    spread_gate(model)
    n = 10
    for p in random_prompts(60, [5, 2]):
        steps, req, ck, cv = _run(model, p, n, exit=name, threshold=thr, finish="ahead")
        ref, ref_loops = reference(model, p, n, _ref_policy(name, thr) if name != "q_exit"
                                   else lambda logits, gates, hidden: int(q_exit_loops(gates, thr)))
        assert [s.token for s in steps] == ref and [s.exit_loop for s in steps] == ref_loops
        assert [s.loops for s in steps] == [T] * n
        assert req.stats["finish"] == "ahead" and req.stats["loops_computed_per_token"] == T
        assert req.stats["finish_loops"] == sum(T - k for k in ref_loops[1:])
        seq = p + [s.token for s in steps]
        rk, rv = _reference_cache(model, seq[:-1])  # the last token is emitted, not yet run
        m = len(seq) - 1
        assert torch.allclose(ck[..., :m, :], rk, atol=1e-5) and torch.allclose(cv[..., :m, :], rv, atol=1e-5)
        g = engine.generate(p, max_new_tokens=n, stop=[], mode="anytime", exit=name, threshold=thr, finish="ahead")
        assert g.tokens == ref and g.stats["forwards"] == n  # the prefill and one Forward per later token


def test_finish_comes_from_the_checkpoint_and_a_recommended_ahead_gives_way_to_a_time_budget(tmp_path, model):
    prompts = random_prompts(61, [4, 2])
    path = tmp_path / "ckpt"
    save_pretrained(model, path, generation_config={"looplm": {"anytime": {"finish": "ahead"}}})
    recommends, plain = looplm.load(path), looplm.Engine(model)
    cases = [({"exit": "q_exit"}, "ahead"), ({"exit": "confidence", "trace": True}, "ahead"),
             ({"budget_loops": 2, "trace": True}, "ahead"), ({"budget_loops": 2}, "eager"),
             ({"exit": "q_exit", "budget_ms": 1e4}, "eager"), ({"exit": "q_exit", "finish": "lazy"}, "lazy"),
             ({"exit": "q_exit", "skip": "copy"}, None)]
    for opts, finish in cases:
        gens = recommends.generate(prompts, max_new_tokens=4, stop=[], mode="anytime", **opts)
        base = plain.generate(prompts, max_new_tokens=4, stop=[], mode="anytime", **opts)
        assert [g.stats["finish"] for g in gens] == [finish] * 2, opts
        assert [g.stats["finish"] for g in base] == [None if "skip" in opts else opts.get("finish", "eager")] * 2, opts
        assert [g.tokens for g in gens] == [g.tokens for g in base], opts
        assert ("finish_unused" in gens[0].stats) == ("budget_ms" in opts), opts
    assert gens[0].stats.get("finish_unused") is None
    timed = recommends.generate(prompts[0], max_new_tokens=4, stop=[], mode="anytime", exit="q_exit", deadline_ms=1e5)
    assert timed.stats["finish"] == "eager"
    assert timed.stats["finish_unused"].startswith("the checkpoint's recommended finish='ahead' does not run")
    with pytest.raises(ValueError, match="^finish"):  # asked for by the caller, it is an error
        plain.generate(prompts[0], max_new_tokens=4, mode="anytime", exit="q_exit", budget_ms=5.0, finish="ahead")
    with pytest.raises(ValueError, match="finish"):
        next(anytime.decode(model, DecodeRequest([prompts[0]], [2], SamplingParams(), None, [False]),
                            budget_ms=5.0, finish="ahead"))


def _ref_policy(name, thr):
    def exit_loop_of(logits, gates, hidden):
        p = logits.float().softmax(-1)  # (T, V)
        for t in range(1, T):
            if name == "confidence" and p[t - 1].max() >= thr:
                return t
            if name == "entropy" and -(p[t - 1] * p[t - 1].clamp_min(1e-30).log()).sum() <= thr:
                return t
            if name == "kl" and t > 1:
                kl = (p[t - 1] * (p[t - 1].clamp_min(1e-30).log() - p[t - 2].clamp_min(1e-30).log())).sum()
                if kl <= thr:
                    return t
            if name == "delta" and t > 1:
                if (hidden[t - 1] - hidden[t - 2]).norm() / hidden[t - 1].norm() < thr:
                    return t
        return T

    return exit_loop_of


@pytest.mark.parametrize("finish", ["eager", "lazy", "ahead"])
@pytest.mark.parametrize("name,thr", [("confidence", 0.12), ("entropy", 3.5), ("kl", 0.3), ("delta", 0.75)])
def test_policies_exact_equal_no_cache_reference(model, engine, name, thr, finish):
    prompts = random_prompts(30, [5, 3])
    n = 12
    gens = engine.generate(prompts, max_new_tokens=n, stop=[], mode="anytime", exit=name, threshold=thr, finish=finish)
    seen = set()
    for p, g in zip(prompts, gens):
        ref, ref_loops = reference(model, p, n, _ref_policy(name, thr))
        assert [s.exit_loop for s in g.steps] == ref_loops
        assert g.tokens == ref
        seen.update(ref_loops)
    assert len(seen) > 1, f"{name} at {thr} exits every token at the same loop: pick another threshold"


@pytest.mark.parametrize("finish", ["eager", "lazy", "ahead"])
def test_batch_equals_each_prompt_alone(engine, finish):
    prompts = random_prompts(40, [3, 10, 6])
    opts = dict(max_new_tokens=10, stop=[], mode="anytime", exit="confidence", threshold=0.12, finish=finish)
    batch = engine.generate(prompts, **opts)
    for p, b in zip(prompts, batch):
        alone = engine.generate(p, **opts)
        assert b.tokens == alone.tokens
        assert [s.exit_loop for s in b.steps] == [s.exit_loop for s in alone.steps]


def _run(model, prompt, n, **opts):
    """Runs anytime.decode for one prompt alone over a fresh paged cache (looplm.runner.drive);
    returns (steps, request, the sequence's cache K and V (T, L, Hkv, positions, D))."""
    req = DecodeRequest([prompt], [n], SamplingParams(), torch.Generator().manual_seed(0), [False])
    runner = Runner(model, PagedKVCache(model.config, 16, 4))
    steps = list(drive(runner, 0, len(prompt) + n, anytime.decode(model, req, **opts)))
    k, v = runner.cache.sequence(runner.cache.pool.tables[0], len(prompt) + n)
    return steps, req, k, v


def _reference_cache(model, seq):
    """The full-depth cache of a sequence: one prefill of all of it."""
    runner = Runner(model, PagedKVCache(model.config, 16, 4))
    runner.cache.pool.admit(0, len(seq))
    runner.run([(runner.cache.pool.ensure(0, len(seq)), prefill(DecodeRequest([seq], [1], SamplingParams(), None, [False]), "cpu"))])
    return runner.cache.sequence(runner.cache.pool.tables[0], len(seq))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_mode_cache_equals_full_depth_cache(model, k):
    n = 12
    for p in random_prompts(50 + k, [5, 2]):
        steps, _, ck, cv = _run(model, p, n, budget_loops=k)
        seq = p + [s.token for s in steps]
        rk, rv = _reference_cache(model, seq)
        done = len(seq) - T  # the last tokens' skipped loops were never needed, so never finished
        torch.testing.assert_close(ck[..., :done, :], rk[..., :done, :], rtol=0, atol=1e-5)
        torch.testing.assert_close(cv[..., :done, :], rv[..., :done, :], rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lazy_finishing_writes_only_needed_slots_and_they_equal_full_depth(model, k):
    n = 12
    for p in random_prompts(55 + k, [5, 2]):
        steps, req, ck, _ = _run(model, p, n, budget_loops=k, finish="lazy")
        assert req.stats["finish_loops"] == 0  # every token left at loop k: no later token needed loops > k
        assert req.stats["loops_computed_per_token"] == pytest.approx((T + (n - 1) * k) / n)
        seq = p + [s.token for s in steps]
        rk, _ = _reference_cache(model, seq)
        m = len(seq) - 1  # the last token never ran
        torch.testing.assert_close(ck[:k, ..., :m, :], rk[:k, ..., :m, :], rtol=0, atol=1e-5)
        torch.testing.assert_close(ck[k:, ..., : len(p), :], rk[k:, ..., : len(p), :], rtol=0, atol=1e-5)
        assert not ck[k:, ..., len(p) : m, :].any()  # never computed: no query needed them


@pytest.mark.parametrize("k", [1, 3])
def test_copy_mode_fills_skipped_slots_from_the_exit_loop(model, k):
    n = 9
    for p in random_prompts(60 + k, [4, 7]):
        _, req, ck, cv = _run(model, p, n, budget_loops=k, skip="copy")
        assert req.stats["copied_slots"] == (n - 1) * (T - k) * model.config.num_hidden_layers
        # positions whose token ran its loops at decode time and whose slots a later token reads (the
        # copy is made before the next Forward: the last token's skipped slots are never needed)
        for pos in range(len(p), len(p) + n - 2):
            for t in range(k, T):
                assert torch.equal(ck[t, ..., pos, :], ck[k - 1, ..., pos, :])
                assert torch.equal(cv[t, ..., pos, :], cv[k - 1, ..., pos, :])
            assert ck[k - 1, ..., pos, :].abs().min() > 0  # the copied source was really computed


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("opts", [dict(skip="copy"), dict(skip="exact", finish="lazy"), dict(kv="last", skip="shared"),
                                  dict(skip="copy", temperature=0.9, seed=5), dict(skip="exact"),
                                  dict(skip="exact", temperature=0.9, seed=6)],
                         ids=["copy", "lazy", "shared", "copy-sampled", "eager", "eager-sampled"])
def test_a_loop_cap_alone_runs_each_token_in_one_forward_with_the_per_loop_decoders_results(engine, k, opts):
    """With only a loop cap, a token's capped loops run as one Forward (anytime.capped); trace=True
    forces the one-loop-per-Forward decoder, which must emit the same tokens, exits and costs."""
    prompts = random_prompts(70 + k, [6, 3])
    run = dict(max_new_tokens=10, stop=[], mode="anytime", budget_loops=k, **opts)
    capped = engine.generate(prompts, **run)
    per_loop = engine.generate(prompts, trace=True, **{"finish": "eager", **run})  # not "ahead", the default with a trace
    for c, p in zip(capped, per_loop):
        assert c.tokens == p.tokens
        assert [(s.loops, s.exit_loop, s.reason) for s in c.steps] == [(s.loops, s.exit_loop, s.reason) for s in p.steps]
        for key in ("loops_computed_per_token", "copied_slots", "finish_loops", "exit_loop_counts", "exit_reasons"):
            assert c.stats[key] == p.stats[key], key
        assert c.stats["forwards"] == 10  # the prefill and one Forward per later token
        assert p.stats["forwards"] == 1 + 9 * k
