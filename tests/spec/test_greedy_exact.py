"""Invariant: greedy self-speculative output equals greedy full-depth output, token for token."""


import pytest
import torch

import looplm
from looplm.api import DEFAULT_MODEL

from .conftest import ragged_prompts, spec_model


def _both(engine, prompts, max_new, **opts):
    full = engine.generate(prompts, max_new_tokens=max_new, stop=[])
    spec = engine.generate(prompts, max_new_tokens=max_new, stop=[], mode="speculative", **opts)
    return full, spec


@pytest.mark.parametrize("loops", [2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_draft_loop_and_length_up_to_the_context_limit(loops, batch):
    model = spec_model(loops=loops, max_pos=30)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(batch, model.config.vocab_size, 1, 10)
    accepted = rejected = 0
    full = engine.generate(prompts, max_new_tokens=1000, stop=[])  # runs into the context limit
    for k in range(1, loops):
        for g in range(1, 9):
            spec = engine.generate(prompts, max_new_tokens=1000, stop=[], mode="speculative", draft_loop=k, draft_len=g)
            for f, s in zip(full, spec):
                assert s.finish_reason == f.finish_reason == "context"
                assert len(s.tokens) == 30 - len(s.prompt_tokens)
                assert s.tokens == f.tokens, (k, g)
                assert s.loops == [loops] * len(s.tokens)
            st = spec[0].stats
            assert (st["draft_loop"], st["draft_len"]) == (k, g)
            accepted += sum(a * n for a, n in enumerate(st["accepted_len_hist"]))
            rejected += st["rounds"] * batch - st["accepted_len_hist"][g]
    assert accepted > 0 and rejected > 0  # both paths of the acceptance rule were exercised


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_draft_length_is_exact(batch):
    model = spec_model(loops=4, max_pos=64)
    engine = looplm.Engine(model)
    prompts = ragged_prompts(batch, model.config.vocab_size, 1, 10)
    for k in (1, 2, 3):
        full, spec = _both(engine, prompts, 40, draft_loop=k, draft_len="adaptive")
        assert [s.tokens for s in spec] == [f.tokens for f in full]
        assert spec[0].stats["draft_len"] == "adaptive"


def test_rows_finish_at_different_lengths_and_stop_tokens():
    """Ragged max lengths (prompts near the limit) and a stop token inside an accepted run."""
    model = spec_model(loops=3, max_pos=32, step_scale=0.05)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (29, 3, 17, 30, 31)]  # the last row has room for one token
    full, spec = _both(engine, prompts, 20, draft_loop=1, draft_len=5)
    assert [s.tokens for s in spec] == [f.tokens for f in full]
    assert [s.finish_reason for s in spec] == ["context", "length", "context", "context", "context"]
    assert [len(s.tokens) for s in spec] == [3, 20, 15, 2, 1]
    stop = full[1].tokens[6]  # a token the greedy run emits: it must end rows at the same place
    full = engine.generate(prompts, max_new_tokens=20, stop=[stop])
    spec = engine.generate(prompts, max_new_tokens=20, stop=[stop], mode="speculative", draft_loop=2, draft_len=6)
    assert [s.tokens for s in spec] == [f.tokens for f in full]
    assert [s.finish_reason for s in spec] == [f.finish_reason for f in full]


def test_stream_steps_describe_drafts_and_verifications():
    model = spec_model(loops=4, step_scale=0.05)
    engine = looplm.Engine(model)
    steps = list(engine.stream([[1, 2, 3], [4]], max_new_tokens=30, stop=[], mode="speculative", draft_loop=2, draft_len=4))
    for row in (0, 1):
        mine = [s for s in steps if s.row == row]
        assert [s.index for s in mine] == list(range(30))
        assert all(s.loops == 4 and s.exit_loop == 4 for s in mine)
        assert all(s.info["draft"] == (s.reason == "draft") for s in mine)
        assert {s.reason for s in mine} == {"draft", "verify"}


def test_a_single_new_token_needs_no_round():
    model = spec_model(loops=3, max_pos=16)
    engine = looplm.Engine(model)
    full = engine.generate([1, 2, 3], max_new_tokens=1, stop=[])
    spec = engine.generate([1, 2, 3], max_new_tokens=1, stop=[], mode="speculative")
    assert spec.tokens == full.tokens and spec.stats["rounds"] == 0 and spec.stats["drafted"] == 0


def test_invalid_options():
    engine = looplm.Engine(spec_model(loops=4))
    for bad in ({"draft_loop": 0}, {"draft_loop": 4}, {"draft_loop": 1.5}, {"draft_len": 0}, {"draft_len": "long"}):
        with pytest.raises(ValueError):
            engine.generate([1, 2], max_new_tokens=3, mode="speculative", **bad)


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason=f"default model not present in {DEFAULT_MODEL}")
def test_default_model_greedy_exact_near_the_context_limit():
    engine = looplm.load()
    T, ctx = engine.model.num_loops, engine.config.max_position_embeddings
    torch.manual_seed(0)
    text = engine.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    prompts = [text, (text * (ctx // max(len(text), 1) + 1))[: ctx - 24], text[:3]]  # one row runs into the limit
    for k in range(1, T):
        full, spec = _both(engine, prompts, 32, draft_loop=k, draft_len=4)
        assert [s.tokens for s in spec] == [f.tokens for f in full], k
        assert spec[1].finish_reason == "context"
        if T % k == 0:  # pipelined, with the model's recommended extrapolation where k >= 2
            _, pipe = _both(engine, prompts, 32, draft_loop=k, pipeline=True)
            assert [s.tokens for s in pipe] == [f.tokens for f in full], k
            assert pipe[0].stats["pipeline"] and pipe[1].finish_reason == "context"
