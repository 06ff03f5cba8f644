"""Anytime decoding with finish="ahead" through full depth's fixed-shape step (step="fixed"):
the no-cache reference's tokens and exits, the full-depth cache, one fixed step per decode token;
a step that cannot apply is a clear error naming `step` that leaves the engine usable."""

import random

import pytest
import torch

import anytime
from looplm.decoding import DecodeRequest
from looplm.exits import q_exit_loops
from looplm.paged import PagedKVCache
from looplm.runner import Runner, drive
from looplm.sampling import SamplingParams

from .conftest import random_prompts, spread_gate
from .test_exactness import T, _ref_policy, _reference_cache, reference


@pytest.mark.parametrize("name,thr", [("q_exit", 0.5), ("confidence", 0.12)])  # the gate; the head after every loop
def test_fixed_step_gives_the_reference_exits_and_the_full_depth_cache(model, name, thr):
    spread_gate(model)
    n = 10
    seen = set()
    for p in random_prompts(random.randrange(10_000), [5, 2]):
        req = DecodeRequest([p], [n], SamplingParams(), torch.Generator().manual_seed(0), [False])
        runner = Runner(model, PagedKVCache(model.config, 16, 4))
        steps = list(drive(runner, 0, len(p) + n, anytime.decode(model, req, exit=name, threshold=thr, step="fixed")))
        ref, ref_loops = reference(model, p, n, _ref_policy(name, thr) if name != "q_exit"
                                   else lambda logits, gates, hidden: int(q_exit_loops(gates, thr)))
        assert [s.token for s in steps] == ref and [s.exit_loop for s in steps] == ref_loops
        assert req.stats["finish"] == "ahead" and req.stats["step"] == "fixed"  # finish None: "ahead"
        # every decode token (all but the prefill's) ran through the runner's one fixed step
        (key, fixed), = runner.fixed_steps.items()
        assert key[:1] == (1,) and not fixed.compiled and fixed.calls == n - 1
        seq = p + [s.token for s in steps]
        ck, cv = runner.cache.sequence(runner.cache.pool.tables[0], len(seq) - 1)
        rk, rv = _reference_cache(model, seq[:-1])  # the last token is emitted, not yet run
        assert torch.allclose(ck, rk, atol=1e-5) and torch.allclose(cv, rv, atol=1e-5)
        seen.update(ref_loops)
    assert len(seen) > 1  # not vacuous: tokens left at different loops


def test_fixed_step_through_the_engine_equals_the_plan(engine, model):
    spread_gate(model)
    prompts = random_prompts(random.randrange(10_000), [4, 9, 1])
    opts = dict(max_new_tokens=9, stop=[], mode="anytime", exit="q_exit", q=0.5, finish="ahead")
    plan = engine.generate(prompts, **opts)
    fixed = engine.generate(prompts, step="fixed", **opts)
    assert [g.tokens for g in fixed] == [g.tokens for g in plan]
    assert [g.exit_loops for g in fixed] == [g.exit_loops for g in plan]
    assert {g.stats["step"] for g in fixed} == {"fixed"} and {g.stats["step"] for g in plan} == {"eager"}


@pytest.mark.parametrize("opts,why", [
    ({"exit": "q_exit", "finish": "eager"}, "finish must be 'ahead'"),
    ({"exit": "q_exit", "finish": "lazy"}, "finish must be 'ahead'"),
    ({"exit": "q_exit", "budget_ms": 50.0}, "time budget"),
    ({"exit": "q_exit", "deadline_ms": 500.0}, "time budget"),
    ({"exit": "q_exit", "skip": "copy"}, "skip='copy'"),
    ({"exit": "q_exit", "kv": "last"}, "skip='shared'"),
    ({"budget_loops": 2}, "without an exit policy or trace"),
    ({}, "without an exit policy or trace"),
])
def test_a_fixed_step_that_cannot_apply_is_an_error_naming_step(engine, opts, why):
    prompt = random_prompts(random.randrange(10_000), [5])[0]
    with pytest.raises(ValueError, match=r"step 'fixed' runs each decode token .*" + why.replace("(", r"\(")) as e:
        engine.generate(prompt, max_new_tokens=4, stop=[], mode="anytime", step="fixed", **opts)
    assert e.value.option == "step"
    with pytest.raises(ValueError, match=r"step must be one of \('eager', 'fixed', 'compiled'\) or None, got 'jit'"):
        engine.generate(prompt, max_new_tokens=4, stop=[], mode="anytime", exit="q_exit", step="jit")
    # nothing was left behind: the engine decodes as before
    assert engine.usage()["running"] == 0
    ahead = dict(max_new_tokens=4, stop=[], mode="anytime", exit="q_exit", finish="ahead")
    assert engine.generate(prompt, step="fixed", **ahead).tokens == engine.generate(prompt, **ahead).tokens


def test_a_fixed_step_runs_one_row_requests(model):
    req = DecodeRequest(random_prompts(1, [3, 4]), [3, 3], SamplingParams(), None, [False, False])
    with pytest.raises(ValueError, match="step 'fixed' runs one-row requests \\(this one has 2 rows\\)"):
        next(anytime.decode(model, req, exit="q_exit", step="fixed"))
