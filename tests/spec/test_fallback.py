"""Falling back to full depth when drafts stop paying (spec.fallback): exact, in time, and only then."""

from collections import defaultdict

import pytest

import looplm
from spec.fallback import BAR, WINDOW

from .conftest import ragged_prompts, spec_model
from .test_no_recompute import record_layer_calls

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
        drafts = [s.reason == "draft" for s in g.steps]
        # the switch comes at the first token where fewer than BAR of the last WINDOW were accepted drafts
        first = next((i + 1 for i in range(WINDOW, n) if sum(drafts[i + 1 - WINDOW : i + 1]) < BAR * WINDOW), None)
        assert at == first, (at, drafts)
        switched.append(at is not None)
        if at is None:  # a random model can fall into a cycle its early loops predict: drafts pay there
            continue
        assert all(s.reason == "verify" and not s.info["draft"] for s in g.steps[at:])
        # full depth after the switch: T loops per token; the decoder's own count covers both parts
        assert g.stats["loops_per_token"] * n >= T * (n - at)
        # the hand-over skips nothing and repeats nothing: per layer and position, the loops run come
        # in runs 0, 1, .. (a rejected draft's run stops early) and the last run is all of 0..T-1
        seen = defaultdict(list)
        for layer, loop, _, pos in log:
            seen[layer, pos].append(loop)
        for loops in seen.values():
            starts = [i for i, t in enumerate(loops) if t == 0]
            runs = [loops[a:b] for a, b in zip(starts, starts[1:] + [len(loops)])]
            assert starts[:1] == [0] and all(r == list(range(len(r))) for r in runs) and runs[-1] == list(range(T)), loops
        assert max(pos for _, pos in seen) == len(prompt) + n - 2  # every token but the last ran its loops
    assert any(switched)


def test_without_fallback_the_drafts_go_on():
    model = _useless_drafts_model()
    engine = looplm.Engine(model)
    prompt = ragged_prompts(1, model.config.vocab_size, 4, 8)[0]
    g = engine.generate(prompt, max_new_tokens=40, stop=[], mode="speculative", draft_loop=2, fallback=False)
    assert g.tokens == engine.generate(prompt, max_new_tokens=40, stop=[]).tokens
    assert g.stats["fallback_at"] is None
    assert g.stats["rejected"] > WINDOW  # it kept drafting (and losing) to the end


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


def test_the_bundled_model_keeps_drafting():
    """Its drafts pay (acceptance ~0.9 with its draft map): no prompt falls back, tokens stay exact."""
    engine = looplm.load()
    texts = ["def fibonacci(n):", "It is a truth universally acknowledged", "class Stack:\n    def __init__(self):",
             "The os.path module implements"]
    prompts = [engine.encode(t) for t in texts]
    gens = engine.generate(prompts, max_new_tokens=48, stop=[], mode="speculative")
    assert [g.stats["fallback_at"] for g in gens] == [None] * len(prompts)
    assert [g.tokens for g in gens] == [g.tokens for g in engine.generate(prompts, max_new_tokens=48, stop=[])]


def test_fallback_must_be_a_bool():
    engine = looplm.Engine(spec_model())
    with pytest.raises(ValueError, match="fallback"):
        engine.generate([1, 2, 3], max_new_tokens=4, mode="speculative", fallback="yes")
