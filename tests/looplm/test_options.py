"""Typed mode options (looplm.options): the dataclasses mirror the decoders, and bad options fail at submit."""

import dataclasses
import inspect
import random

import pytest

import looplm
from looplm.decoding import MODES, resolve_mode
from looplm.options import OPTIONS, AnytimeOptions, FullOptions, OptionError, SpeculativeOptions

from .conftest import random_prompts, tiny_model


def mirror_mismatches(cls, decoder_fn) -> list[str]:
    """What differs between an options dataclass and its decoder's parameters after (model, request)."""
    params = list(inspect.signature(decoder_fn).parameters.values())[2:]
    fields = dataclasses.fields(cls)
    out = []
    if [p.name for p in params] != [f.name for f in fields]:
        out.append(f"names {[p.name for p in params]} != {[f.name for f in fields]}")
    for p, f in zip(params, fields):
        if p.name == f.name and (type(p.default) is not type(f.default) or p.default != f.default):
            out.append(f"{p.name}: default {p.default!r} != {f.default!r}")
    return out


def test_every_mode_has_a_dataclass_that_mirrors_its_decoder():
    assert set(OPTIONS) == set(MODES)
    for mode, cls in OPTIONS.items():
        assert cls.mode == mode
        assert mirror_mismatches(cls, resolve_mode(mode)) == [], mode


def test_the_mirror_check_sees_a_gained_a_lost_and_a_changed_parameter():
    """Negative controls: the comparison above fails when a decoder drifts from its dataclass."""
    def gained(model, req, step=None, fuse=False):
        yield from ()

    def lost(model, req):
        yield from ()

    def changed(model, req, step="eager"):
        yield from ()

    for fn in (gained, lost, changed):
        assert mirror_mismatches(FullOptions, fn), fn.__name__


def test_options_are_frozen_and_checked_when_built():
    opts = SpeculativeOptions(draft_loop=2, draft_len="adaptive")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.draft_loop = 3
    for cls, kw, option in [
        (SpeculativeOptions, {"draft_len": 0}, "draft_len"),
        (SpeculativeOptions, {"draft_len": "long"}, "draft_len"),
        (SpeculativeOptions, {"draft_loop": 0}, "draft_loop"),
        (SpeculativeOptions, {"draft_loop": 1.5}, "draft_loop"),
        (SpeculativeOptions, {"pipeline": "yes"}, "pipeline"),
        (SpeculativeOptions, {"extrapolate": -random.random()}, "extrapolate"),
        (SpeculativeOptions, {"draft_len": 2, "pipeline": True}, "draft_len"),
        (AnytimeOptions, {"budget_ms": 0}, "budget_ms"),
        (AnytimeOptions, {"deadline_ms": float("inf")}, "deadline_ms"),
        (AnytimeOptions, {"budget_loops": 0}, "budget_loops"),
        (AnytimeOptions, {"exit": "sometimes"}, "exit"),
        (AnytimeOptions, {"exit": "q_exit", "q": 1 + random.random()}, "q"),
        (AnytimeOptions, {"exit": "entropy", "threshold": 0.1, "q": 0.1}, "q"),
        (AnytimeOptions, {"threshold": 0.5}, "threshold"),
        (AnytimeOptions, {"skip": "sideways"}, "skip"),
        (AnytimeOptions, {"finish": "later"}, "finish"),
        (AnytimeOptions, {"finish": "ahead", "exit": "q_exit", "budget_ms": 1 + random.random()}, "finish"),
        (AnytimeOptions, {"finish": "ahead", "deadline_ms": 100 + random.random()}, "finish"),
        (AnytimeOptions, {"safety": -1}, "safety"),
        (AnytimeOptions, {"clock": 3.0}, "clock"),
        (AnytimeOptions, {"trace": 1}, "trace"),
        (AnytimeOptions, {"budget": 5}, "budget"),
        (FullOptions, {"step": "warp"}, "step"),
    ]:
        with pytest.raises(OptionError) as e:
            cls(**kw)
        assert e.value.option == option and e.value.mode == cls.mode, (kw, str(e.value))
        assert str(e.value).startswith(option) and f"(mode {cls.mode!r}" in str(e.value), str(e.value)


@pytest.fixture
def counted():
    """An engine over a random-depth tiny model, and a count of the loop bodies it ran."""
    model = tiny_model(loops=random.randint(2, 5))
    engine = looplm.Engine(model)
    calls = [0]
    inner = model.loop_body

    def loop_body(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    model.loop_body = loop_body
    return engine, calls


def test_bad_options_raise_at_submit_naming_option_and_mode_before_any_work(counted):
    engine, calls = counted
    T = engine.model.num_loops
    cases = [
        ("speculative", {"draft_loop": T}, "draft_loop", f"1..{T - 1}"),
        ("anytime", {"skip": "shared"}, "skip", "shared-KV"),
        ("anytime", {"skip": "copy", "kv": "last"}, "skip", "per-loop"),
        ("anytime", {"exit": "static", "threshold": 0}, "threshold", "static depth must be an integer >= 1"),
        ("anytime", {"budget_ms": -1.0}, "budget_ms", "positive"),
        ("anytime", {"budget_ms": 5.0, "budget": looplm_budget(2)}, "budget", "either"),
        ("full", {"step": "jit"}, "step", "eager"),
    ]
    undivided = [k for k in range(2, T) if T % k]
    if undivided:
        cases.append(("speculative", {"draft_loop": random.choice(undivided), "pipeline": True}, "pipeline", "must divide T"))
    for mode, kw, option, detail in cases:
        for submit in (engine.generate, engine.stream):
            with pytest.raises(ValueError) as e:
                submit([1, 2, 3], max_new_tokens=3, mode=mode, **kw)
            msg = str(e.value)
            assert msg.startswith(option) and f"(mode {mode!r}" in msg and detail in msg, msg
    assert calls[0] == 0  # nothing ran: every check fired before the request was queued
    assert engine.usage()["running"] == engine.usage()["waiting"] == 0
    assert len(engine.generate([1, 2, 3], max_new_tokens=3, stop=[]).tokens) == 3 and calls[0] > 0


def looplm_budget(loops):
    from anytime import Budget

    return Budget(loops=loops)


def test_an_option_of_another_mode_names_that_mode(engine):
    owner = {name: mode for mode, cls in OPTIONS.items() for name in (f.name for f in dataclasses.fields(cls))}
    name, mode = random.choice(sorted(owner.items()))
    other = random.choice([m for m in OPTIONS if m != mode])
    with pytest.raises(ValueError, match=f"unknown option '{name}' for mode '{other}'; it is an option of mode '{mode}'"):
        engine.generate([1, 2], max_new_tokens=2, mode=other, **{name: None})
    with pytest.raises(ValueError, match=f"unknown option 'colour' for mode '{other}'; mode '{other}' takes"):
        engine.generate([1, 2], max_new_tokens=2, mode=other, colour=None)


def test_a_bad_recommendation_says_it_came_from_the_checkpoint():
    model = tiny_model(loops=4)
    for rec, mine in [({"draft_loop": 4}, {"draft_loop": 2}), ({"extrapolate": 12.0}, {"extrapolate": 0.5})]:
        engine = looplm.Engine(model, generation_config={"looplm": {"speculative": rec}})
        with pytest.raises(ValueError) as e:
            engine.generate([1, 2], max_new_tokens=2, mode="speculative")
        msg = str(e.value)
        assert msg.startswith(next(iter(rec))) and "the checkpoint's, from generation_config.json" in msg, msg
        # the caller's own value replaces the recommendation
        assert len(engine.generate([1, 2], max_new_tokens=2, stop=[], mode="speculative", **mine).tokens) == 2
    engine = looplm.Engine(model, generation_config={"looplm": {"speculative": {"budget_ms": 1}}})
    with pytest.raises(ValueError, match=r"^unknown option 'budget_ms' \(from the checkpoint's generation_config.json\) "
                                         "for mode 'speculative'; it is an option of mode 'anytime'"):
        engine.generate([1, 2], max_new_tokens=2, mode="speculative")


def test_an_options_object_runs_as_its_keywords():
    model = tiny_model(loops=4)
    engine = looplm.Engine(model)
    prompts = random_prompts(2, model.config.vocab_size)
    seed = random.randrange(2**32)
    for opts in (SpeculativeOptions(draft_loop=random.randint(1, 3), draft_len=random.randint(1, 4)),
                 AnytimeOptions(budget_loops=random.randint(1, 4), skip=random.choice(["exact", "copy"])),
                 FullOptions()):
        kw = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
        typed = engine.generate(prompts, max_new_tokens=6, stop=[], options=opts, temperature=1.0, seed=seed)
        keyed = engine.generate(prompts, max_new_tokens=6, stop=[], mode=opts.mode, temperature=1.0, seed=seed, **kw)
        assert [g.tokens for g in typed] == [g.tokens for g in keyed]
        assert typed[0].stats["mode"] == opts.mode
    with pytest.raises(ValueError, match=r"options is a SpeculativeOptions \(mode 'speculative'\) but mode='anytime'"):
        engine.generate([1, 2], options=SpeculativeOptions(), mode="anytime")
    with pytest.raises(ValueError, match="option 'draft_len': pass mode options either in options= or"):
        engine.generate([1, 2], options=SpeculativeOptions(), draft_len=2)
    with pytest.raises(ValueError, match="options must be a looplm.options object"):
        engine.generate([1, 2], options={"draft_loop": 2})


def test_an_options_object_states_every_option_the_checkpoint_recommends_none():
    model = tiny_model(loops=4)
    c = round(random.uniform(0.1, 2.0), 3)
    engine = looplm.Engine(model, generation_config={"looplm": {"speculative": {"draft_loop": 2, "extrapolate": c}}})
    keyed = engine.generate([1, 2, 3], max_new_tokens=4, stop=[], mode="speculative")
    typed = engine.generate([1, 2, 3], max_new_tokens=4, stop=[], options=SpeculativeOptions(draft_loop=2))
    assert keyed.stats["extrapolate"] == c and keyed.stats["draft"] == "extrapolate"
    assert typed.stats["extrapolate"] == 0.0 and typed.stats["draft"] == "loop"


def test_loop_options_are_1_based_depths(engine):
    """draft_loop k drafts from the head after loops 1..k; budget_loops k and a static exit at k emit
    from the head after loop k (Step.exit_loop is 1-based), and T itself is allowed."""
    T = engine.model.num_loops
    k = random.randint(1, T)
    prompt = random_prompts(1, engine.config.vocab_size)[0]
    for kw in ({"budget_loops": k}, {"exit": "static", "threshold": k}):
        g = engine.generate(prompt, max_new_tokens=5, stop=[], mode="anytime", **kw)
        assert g.exit_loops == [k] * 5, (kw, g.exit_loops)
    g = engine.generate(prompt, max_new_tokens=5, stop=[], mode="speculative", draft_loop=T - 1)
    assert g.stats["draft_loop"] == T - 1
    with pytest.raises(ValueError, match=f"draft_loop must be an integer in 1..{T - 1}"):
        engine.generate(prompt, max_new_tokens=5, mode="speculative", draft_loop=T)


def test_a_registered_mode_without_a_dataclass_takes_its_decoders_parameters(monkeypatch, engine):
    from looplm import decoding

    monkeypatch.setitem(decoding.MODES, "echo", f"{__name__}:_echo_decoder")
    g = engine.generate([5, 6], max_new_tokens=3, stop=[], mode="echo", token=7)
    assert g.tokens == [7, 7, 7]
    with pytest.raises(ValueError, match="unknown option 'draft_loop' for mode 'echo'; it is an option of mode 'speculative'"):
        engine.generate([5, 6], max_new_tokens=3, mode="echo", token=7, draft_loop=2)
    with pytest.raises(ValueError, match="mode 'echo': .*token"):
        engine.generate([5, 6], max_new_tokens=3, mode="echo")


def _echo_decoder(model, req, *, token, times=None):
    from looplm.decoding import Step

    for i in range(req.max_new[0] if times is None else times):
        yield Step(0, i, token, 1, 1, 0.0, "echo")
