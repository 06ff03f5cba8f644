"""One statistics vocabulary (looplm.stats.Stats): every mode carries the shared keys, emits only declared keys."""

import random
import types
import typing

import pytest

import looplm
from looplm.stats import SHARED_KEYS, Stats
from spec.drafts import DraftMap

from .conftest import random_prompts, tiny_model

HINTS = typing.get_type_hints(Stats)


def mismatches(value, hint, where: str) -> list[str]:
    """Where `value` does not have type `hint` (a float hint takes an int, as in PEP 484; never a bool)."""
    if hint is typing.Any:
        return []
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return [] if any(not mismatches(value, a, where) for a in args) else [f"{where}: {value!r} is not {hint}"]
    if hint is type(None):
        return [] if value is None else [f"{where}: {value!r} is not None"]
    if typing.is_typeddict(hint):
        if not isinstance(value, dict) or set(value) != set(typing.get_type_hints(hint)):
            return [f"{where}: {value!r} is not a {hint.__name__}"]
        return [m for k, h in typing.get_type_hints(hint).items() for m in mismatches(value[k], h, f"{where}.{k}")]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [m for i, v in enumerate(value) for m in mismatches(v, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not a dict"]
        return [m for k, v in value.items() for m in mismatches(k, args[0], where) + mismatches(v, args[1], f"{where}[{k!r}]")]
    if isinstance(value, bool) and hint is not bool:
        return [f"{where}: {value!r} is a bool, not {hint.__name__}"]
    ok = isinstance(value, (int, float)) if hint is float else isinstance(value, hint)
    return [] if ok else [f"{where}: {value!r} is not {hint.__name__}"]


def check(gen: looplm.Generation, mode: str) -> None:
    stats = gen.stats
    assert SHARED_KEYS <= set(stats), sorted(SHARED_KEYS - set(stats))
    assert set(stats) <= set(HINTS), f"undeclared keys {sorted(set(stats) - set(HINTS))}"
    assert [m for k, v in stats.items() for m in mismatches(v, HINTS[k], k)] == []
    assert stats["mode"] == mode and stats["new_tokens"] == len(gen.tokens)
    assert stats["finish_reason"] == gen.finish_reason
    if gen.tokens:
        assert stats["mean_exit_loop"] == stats["mean_loops"] == sum(gen.exit_loops) / len(gen.tokens)


def test_the_vocabulary_declares_the_engine_keys_as_shared():
    assert SHARED_KEYS == {"mode", "kv", "finish_reason", "new_tokens", "tokens_per_s", "elapsed_ms", "mean_exit_loop",
                           "mean_loops", "loops_computed_per_token", "weight_passes_per_token", "forwards", "tokens_per_forward",
                           "runner_steps", "token_loops"}


def test_the_type_check_catches_a_wrong_type():
    """Negative controls for `mismatches`, which the other tests rely on."""
    assert mismatches(True, int, "x") and mismatches(1.5, int, "x") and mismatches("a", float | None, "x")
    assert mismatches([1, "a"], list[int], "x") and mismatches({"a": "b"}, dict[str, int], "x")
    assert mismatches({"per_token_ms": 1.0, "deadline_ms": None}, HINTS["budget"], "x")  # a key missing
    assert not mismatches(3, float, "x") and not mismatches(None, float | None, "x")


def modes(T: int):
    """(mode, options) covering every decoder path that writes statistics (2 <= T)."""
    k = random.randint(1, T - 1)
    divisor = random.choice([d for d in range(1, T) if T % d == 0])
    yield "full", {}
    yield "full", {"kv": random.choice(["last", "mean"])}
    yield "speculative", {"draft_loop": k, "draft_len": random.choice([1, 3, "adaptive"])}
    yield "speculative", {"draft_loop": divisor, "pipeline": True, "extrapolate": random.uniform(0, 1)}
    yield "speculative", {"draft_loop": divisor, "branch": random.choice([2, 3]), "branch_threshold": random.choice([None, 0.5])}
    yield "speculative", {"draft_loop": "adaptive", "call_cost": random.uniform(0, 4)}
    yield "anytime", {"budget_loops": random.randint(1, T), "skip": random.choice(["exact", "copy"]),
                      "finish": random.choice(["eager", "lazy", "ahead"])}
    yield "anytime", {"exit": "q_exit", "q": random.random(), "budget_ms": 1e4, "trace": True}
    yield "anytime", {"exit": "confidence", "finish": "ahead", "trace": random.choice([False, True])}
    yield "anytime", {"exit": "entropy", "deadline_ms": 1e5, "kv": "last"}


@pytest.mark.parametrize("sampled", [False, True])
def test_every_mode_carries_the_shared_keys_and_only_declared_keys(sampled):
    model = tiny_model(loops=random.randint(2, 4))
    engine = looplm.Engine(model)
    prompts = random_prompts(2, model.config.vocab_size)
    sampling = {"temperature": 1.0, "top_k": 8, "seed": random.randrange(2**32)} if sampled else {}
    seen = set()
    for mode, opts in modes(model.num_loops):
        for gen in engine.generate(prompts, max_new_tokens=random.randint(2, 6), stop=[], mode=mode, **sampling, **opts):
            check(gen, mode)
            seen |= set(gen.stats)
    # second-token drafts (spec.multi) need a draft loop >= 2 that divides T: a 4-loop model, a map with the head
    four = tiny_model(loops=4)
    first = DraftMap.extrapolation(four.config.hidden_size, [2]).params[2]
    pairs = DraftMap({2: {**first, "next.weight": first["weight"].clone(), "next.bias": first["bias"].clone()}})
    for gen in looplm.Engine(four).generate(random_prompts(2, four.config.vocab_size), max_new_tokens=random.randint(2, 6), stop=[],
                                            mode="speculative", draft_loop=2, draft_tokens=2, draft_map=pairs,
                                            second_threshold=random.choice([None, 0.1, "adaptive"]), **sampling):
        check(gen, "speculative")
        seen |= set(gen.stats)
    # together the runs reach every declared key but the notes of an unused recommended draft map, draft tree, second
    # draft or finish mode
    assert set(HINTS) - seen == {"draft_map_unused", "branch_unused", "draft_tokens_unused", "finish_unused"}


def test_a_cancelled_request_carries_the_shared_keys():
    model = tiny_model(loops=3)
    engine = looplm.Engine(model)
    for mode in ("full", "speculative", "anytime"):
        stream = engine.stream([1, 2, 3], max_new_tokens=40, stop=[], mode=mode)
        next(stream)
        stream.close()
        engine.scheduler.shutdown()  # waits for the engine's loop, which ends the cancelled request
        assert stream._request.finished
        check(stream.generation, mode)
