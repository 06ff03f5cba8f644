"""Teacher-forced scoring against per-loop no-cache logits and against the anytime decoder's own exits."""

import pytest
import torch

import looplm
from looplm.harness.scoring import ExitRule, score

from ..anytime.conftest import random_prompts, tiny_model

T = 4


@pytest.fixture
def model():
    return tiny_model(seed=11)


def test_static_depth_equals_per_loop_logits(model):
    """Ragged rows in one right-padded batch score what each row's own per-loop logits say."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    rows = [(torch.randint(0, 64, (int(n),), generator=g).tolist(), int(k))
            for n, k in [(9, 3), (30, 1), (17, 16), (2, 1), (25, 7)]]
    for k in range(1, T + 1):
        got = score(model, rows, ExitRule.make(T, loops=k), batch_size=3)
        for (ids, n), s in zip(rows, got):
            logp = model.per_loop_logits(torch.tensor([ids[:-1]]))[k - 1, 0, -n:].float().log_softmax(-1)
            want = logp.gather(1, torch.tensor(ids[-n:])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs), want, rtol=0, atol=1e-5)
            assert s.greedy == (logp.argmax(-1) == torch.tensor(ids[-n:])).tolist()
            assert s.exit_loops == [k] * n


def test_shared_inputs_score_each_target(model):
    """Rows that differ only in their last token share a forward but keep their own targets."""
    ids = random_prompts(3, [12])[0]
    rows = [(ids[:-1] + [t], 1) for t in range(64)]
    got = score(model, rows, ExitRule.make(T), batch_size=4)
    logp = model.per_loop_logits(torch.tensor([ids[:-1]]))[-1, 0, -1].float().log_softmax(-1)
    torch.testing.assert_close(torch.tensor([s.logprobs[0] for s in got]), logp, rtol=0, atol=1e-5)
    assert [s.greedy[0] for s in got] == [t == int(logp.argmax()) for t in range(64)]


@pytest.mark.parametrize("exit,threshold,loops", [
    ("q_exit", 0.5, None), ("q_exit", 0.6, 2), ("confidence", 0.11, None), ("entropy", 3.55, None),
    ("kl", 0.3, None), ("delta", 0.75, None), ("static", 2, None),
])
def test_exit_loops_equal_anytime_decoder(model, exit, threshold, loops):
    """Each generated token, teacher-forced, exits where Engine.generate(mode="anytime", skip="exact")
    exited and is the argmax there."""
    engine = looplm.Engine(model)
    prompts = random_prompts(int(torch.randint(0, 2**31, ())), [5, 11, 3])
    opts = dict(exit=exit, threshold=threshold, skip="exact") | ({} if loops is None else {"budget_loops": loops})
    gens = engine.generate(prompts, max_new_tokens=24, stop=[], mode="anytime", **opts)
    rows = [(p + g.tokens, len(g.tokens)) for p, g in zip(prompts, gens)]
    got = score(model, rows, ExitRule.make(T, loops=loops, exit=exit, threshold=threshold), batch_size=2)
    decided = [s.exit_loop for g in gens for s in g.steps]
    assert len(set(decided)) > 1 or exit == "static"  # the comparison covers several exit loops
    for g, s in zip(gens, got):
        assert s.exit_loops == [st.exit_loop for st in g.steps]
        assert all(s.greedy)


@pytest.mark.parametrize("kw", [dict(loops=0), dict(loops=T + 1), dict(loops=1.5), dict(exit="nope"),
                                dict(threshold=0.5)])
def test_bad_rules_raise(kw):
    with pytest.raises(ValueError):
        ExitRule.make(T, **kw)


def test_bad_rows_raise(model):
    with pytest.raises(ValueError, match="row 1"):
        score(model, [([1, 2, 3], 1), ([1, 2], 2)], ExitRule.make(T))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        score(model, [(list(range(60)) * 3, 1)], ExitRule.make(T))
