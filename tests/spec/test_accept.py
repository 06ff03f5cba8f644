"""The acceptance rules on crafted distributions: mock always / never / sometimes accept, and the
Leviathan/Chen rule's output distribution (chi-square), with wrong rules as negative controls."""

import math

import pytest
import torch

from looplm.sampling import SamplingParams, probabilities
from spec import accept_greedy, accept_sampled, emitted_counts

PARAMS = SamplingParams(temperature=0.7, top_k=6)
from spec.schedule import DraftLength


def chi2_critical(df: int, alpha_z: float = 3.719) -> float:
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.719 is the one-sided 1e-4 level."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + alpha_z * math.sqrt(c)) ** 3


def chi2_stat(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of integer samples against probs (cells with expected < 5 pooled)."""
    n = samples.numel()
    obs = torch.bincount(samples, minlength=probs.numel()).double()
    exp = probs.double() * n
    small = exp < 5
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    if obs[~keep].sum() > 0:  # a sample where the distribution has no mass: reject outright
        return math.inf, int(keep.sum()) - 1
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def passes(samples, probs) -> bool:
    stat, df = chi2_stat(samples, probs)
    return stat < chi2_critical(df)


def _dists(g, G, V, spread=1.5):
    return (torch.randn(G, V, generator=g) * spread).softmax(-1), (torch.randn(G, V, generator=g) * spread).softmax(-1)


# -- wrong rules: the distribution test must reject them -----------------------------------------
def accept_without_ratio(drafts, q, p, limit, generator=None):
    """Keeps every draft: emits the draft distribution q."""
    return limit.clone(), drafts


def resample_from_target(drafts, q, p, limit, generator=None):
    """Right accept test, but a rejection draws from p instead of norm(max(p - q, 0))."""
    accepted, tokens = accept_sampled(drafts, q, p, limit, generator)
    at = accepted.clamp(max=drafts.shape[1] - 1)[:, None]
    p_a = p.gather(1, at[..., None].expand(-1, -1, p.shape[-1]))[:, 0]
    redraw = torch.multinomial(p_a, 1, generator=generator)
    return accepted, torch.where((accepted < limit)[:, None], tokens.scatter(1, at, redraw), tokens)


@pytest.mark.parametrize("rule,ok", [(accept_sampled, True), (accept_without_ratio, False), (resample_from_target, False)])
def test_speculative_sampling_emits_the_target_distribution(rule, ok):
    g = torch.Generator().manual_seed(1234)
    N, G, V = 60_000, 3, 6
    q, p = _dists(g, G, V)
    p[1, 0] = 0.0  # a token the target never emits but the draft may propose
    p[1] /= p[1].sum()
    drafts = torch.multinomial(q, N, replacement=True, generator=g).T.contiguous()  # (N, G), d_i ~ q_i
    Q, P = q.expand(N, G, V), p.expand(N, G, V)
    limit = torch.full((N,), G)
    accepted, tokens = rule(drafts, Q, P, limit, g)
    counts = emitted_counts(accepted, limit)
    assert bool((counts >= 1).all())
    # token i of a round is emitted when the drafts before it were accepted; given that, it must follow p_i
    verdicts = [passes(tokens[counts > i, i], p[i]) for i in range(G)]
    if ok:
        assert all(verdicts), [chi2_stat(tokens[counts > i, i], p[i]) for i in range(G)]
        # and the acceptance rate of each position is sum_x min(p, q)
        rate = (accepted[:, None] > torch.arange(G)).float().sum(0) / (accepted[:, None] >= torch.arange(G)).float().sum(0)
        torch.testing.assert_close(rate, torch.minimum(p, q).sum(-1), atol=0.01, rtol=0)
    else:
        assert not all(verdicts)


def test_mock_always_accept():
    g = torch.Generator().manual_seed(0)
    B, G, V = 5, 6, 11
    drafts = torch.randint(0, V, (B, G), generator=g)
    limit = torch.tensor([6, 3, 1, 6, 4])
    a, tok = accept_greedy(drafts, drafts.clone(), limit)
    assert a.tolist() == limit.tolist() and emitted_counts(a, limit).tolist() == limit.tolist()
    assert torch.equal(tok, drafts)
    draft_logits = torch.randn(B, G, V, generator=g)
    draft_logits.scatter_(-1, drafts[..., None], 5.0)  # the drafted token survives top-k
    target_logits = draft_logits.scatter_add(-1, drafts[..., None], torch.full((B, G, 1), 1.0))  # p(d) > q(d)
    q, p = probabilities(draft_logits, PARAMS), probabilities(target_logits, PARAMS)
    assert bool((p.gather(-1, drafts[..., None]) > q.gather(-1, drafts[..., None])).all())
    for _ in range(20):
        a, tok = accept_sampled(drafts, q, p, limit, g)
        assert a.tolist() == limit.tolist()
        assert torch.equal(tok, drafts)


def test_mock_never_accept():
    g = torch.Generator().manual_seed(1)
    B, G, V = 400, 4, 7
    drafts = torch.randint(0, V, (B, G), generator=g)
    target = (drafts + 1 + torch.randint(0, V - 1, (B, G), generator=g)) % V  # never equal
    limit = torch.full((B,), G)
    a, tok = accept_greedy(drafts, target, limit)
    assert a.tolist() == [0] * B and emitted_counts(a, limit).tolist() == [1] * B
    assert torch.equal(tok[:, 0], target[:, 0])
    q = probabilities(torch.randn(B, G, V, generator=g).scatter(-1, drafts[..., None], 5.0), PARAMS)
    p = probabilities(torch.randn(B, G, V, generator=g).scatter(-1, drafts[..., None], -1e9), PARAMS)  # p(d) = 0
    a, tok = accept_sampled(drafts, q, p, limit, g)
    assert a.tolist() == [0] * B
    resid = (p[:, 0] - q[:, 0]).clamp(min=0)
    assert bool((resid.gather(1, tok[:, :1]) > 0).all())  # the replacement comes from the residual's support


def test_mock_sometimes_accept_exact_prefix():
    g = torch.Generator().manual_seed(2)
    B, G, V = 64, 8, 9
    drafts = torch.randint(0, V, (B, G), generator=g)
    first_bad = torch.randint(0, G + 1, (B,), generator=g)  # G: nothing rejected
    bad = torch.arange(G) == first_bad[:, None]
    later = torch.arange(G) > first_bad[:, None]
    target = torch.where(bad, (drafts + 1) % V, drafts)
    target = torch.where(later, torch.randint(0, V, (B, G), generator=g), target)  # after a rejection: anything
    limit = torch.randint(1, G + 1, (B,), generator=g)
    a, tok = accept_greedy(drafts, target, limit)
    assert a.tolist() == torch.minimum(first_bad, limit).tolist()
    counts = emitted_counts(a, limit)
    for b in range(B):
        assert tok[b, : counts[b]].tolist() == target[b, : counts[b]].tolist()
    # sampled: p(d) >= q(d) before first_bad, p(d) = 0 at it
    draft_logits = torch.randn(B, G, V, generator=g).scatter(-1, drafts[..., None], 5.0)
    target_logits = draft_logits.scatter_add(-1, drafts[..., None], torch.ones(B, G, 1))  # p(d) > q(d) ...
    target_logits = torch.where(bad[..., None], target_logits.scatter(-1, drafts[..., None], -1e9), target_logits)  # ... but 0 at first_bad
    q, p = probabilities(draft_logits, PARAMS), probabilities(target_logits, PARAMS)
    a, tok = accept_sampled(drafts, q, p, limit, g)
    assert a.tolist() == torch.minimum(first_bad, limit).tolist()
    rejected = a < limit
    assert torch.equal(tok[~rejected], drafts[~rejected])
    assert bool((tok[rejected, a[rejected]] != drafts[rejected, a[rejected]]).all())


def test_accept_probability_is_the_ratio():
    g = torch.Generator().manual_seed(3)
    N, V = 200_000, 4
    drafts = torch.zeros(N, 1, dtype=torch.long)
    q = torch.tensor([0.5, 0.2, 0.2, 0.1]).expand(N, 1, V)
    p = torch.tensor([0.2, 0.4, 0.2, 0.2]).expand(N, 1, V)
    a, tok = accept_sampled(drafts, q, p, torch.ones(N, dtype=torch.long), g)
    assert abs(a.float().mean().item() - 0.4) < 0.005  # min(1, 0.2 / 0.5)
    rej = tok[a == 0, 0]
    # residual max(p - q, 0) = [0, .2, 0, .1] / .3
    assert passes(rej, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))


def test_no_host_sync_shapes_on_device_tensors():
    """Both rules return tensors (no Python lists), so the decoder needs one transfer per round."""
    drafts = torch.randint(0, 5, (2, 3))
    a, tok = accept_greedy(drafts, drafts, torch.tensor([3, 2]))
    assert isinstance(a, torch.Tensor) and tok.shape == (2, 3)


def test_adaptive_rule_tracks_acceptance():
    s = DraftLength("adaptive", draft_loop=1, num_loops=4)
    for _ in range(30):
        s.update(accepted=8, rejections=0)
    assert s.current == 8 and s.alpha > 0.95
    for _ in range(60):
        s.update(accepted=0, rejections=1)
    assert s.current == 1
    # the rule: g maximises (1 - a^g) / (1 - a) / (g k + T - k)
    s = DraftLength("adaptive", draft_loop=2, num_loops=4, prior=(3.0, 1.0))
    a = 0.75
    best = max(range(1, 9), key=lambda g: (1 - a**g) / (1 - a) / (2 * g + 2))
    assert s.current == best
    assert DraftLength(5, 1, 4).update(0, 1) == 5
