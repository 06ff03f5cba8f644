"""Speculative sampling through the decoder follows the full-depth sampling distribution."""

import itertools

import pytest
import torch

import looplm
import spec.decoder
from looplm.sampling import SamplingParams, probabilities

from .conftest import acceptance, spec_model
from .test_accept import accept_without_ratio, chi2_critical, chi2_stat, resample_from_target


def exact_joint(model, prompt, n, params) -> torch.Tensor:
    """Full-depth probability of every n-token continuation, flattened (V**n,), from no-cache forwards."""
    V = model.config.vocab_size
    seqs = torch.tensor([prompt + list(c) for c in itertools.product(range(V), repeat=n - 1)])  # (V^(n-1), P+n-1)
    with torch.no_grad():
        logits = model.per_loop_logits(seqs)[-1]  # (V^(n-1), S, V)
    probs = probabilities(logits[:, len(prompt) - 1 :], params)  # (V^(n-1), n, V)
    joint = torch.ones(1, dtype=torch.float64)
    for i in range(n):
        # rows of seqs whose first i new tokens are each prefix: stride V^(n-1-i)
        step = probs[:: V ** (n - 1 - i), i].double()  # (V^i, V)
        joint = (joint[:, None] * step).reshape(-1)
    return joint


WRONG_RULES = [(None, {"top_k": 4}), (None, {"top_p": 0.85, "temperature": 0.8}), (accept_without_ratio, {"top_k": 4}),
               (resample_from_target, {"top_k": 4})]


def sampled_chi2(model, prompt, post: dict, n: int = 3, N: int = 6_000, **opts):
    """N speculative samples of n tokens (batch N, vocab 5) against the exact full-depth joint:
    (chi-square statistic, degrees of freedom, the generations)."""
    post = {"temperature": 1.0, **post}
    joint = exact_joint(model, prompt, n, SamplingParams(**post))
    gens = looplm.Engine(model).generate([prompt] * N, max_new_tokens=n, stop=[], mode="speculative", seed=3, **opts, **post)
    toks = torch.tensor([g.tokens for g in gens])  # (N, n)
    code = (toks * (5 ** torch.arange(n - 1, -1, -1))).sum(-1)
    stat, df = chi2_stat(code, joint.float())
    print(f"chi2 {stat:.1f} on {df} df, critical {chi2_critical(df):.1f}")
    return stat, df, gens


@pytest.mark.parametrize("wrong_rule,post", WRONG_RULES)
def test_sampled_tokens_follow_full_depth_distribution(wrong_rule, post, monkeypatch):
    torch.manual_seed(7)
    model = spec_model(seed=11, vocab=5, loops=3, std=0.2, step_scale=1.0, max_pos=16)
    prompt, params = [1, 3], SamplingParams(**{"temperature": 1.0, **post})
    # the draft (loop 1) must differ from the target for the test to have power
    with torch.no_grad():
        ll = model.per_loop_logits(torch.tensor([prompt + [0]]))[:, 0, -1]
    q, p = probabilities(ll[0], params), probabilities(ll[-1], params)
    assert 0.5 * (p - q).abs().sum() > 0.15
    if wrong_rule is not None:
        monkeypatch.setattr(spec.decoder, "accept_sampled", wrong_rule)
    stat, df, gens = sampled_chi2(model, prompt, post, draft_loop=1, draft_len=2)
    if wrong_rule is None:
        assert 0 < acceptance(gens) < 1
        assert stat < chi2_critical(df), (stat, df)
    else:
        assert stat > chi2_critical(df), (stat, df)
