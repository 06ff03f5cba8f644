"""The acceptance rules on crafted distributions: mock always / never / sometimes accept, the
Leviathan/Chen rule's output distribution (chi-square), and the multi-candidate rule of draft trees
(exact law by enumeration, chi-square of the implementation), with wrong rules as negative controls."""

import math

import pytest
import torch

import spec.accept
from looplm.sampling import SamplingParams, probabilities
from spec import accept_greedy, accept_sampled, emitted_counts
from spec.accept import accept_candidates, draw_candidates
from spec.schedule import DraftLength

PARAMS = SamplingParams(temperature=0.7, top_k=6)


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


# -- several candidates per position (draft trees): recursive rejection without replacement -------
def _renorm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum() if x.sum() > 0 else x


def _right_residual(r, qi, p, q):
    d = (r - qi).clamp(min=0)
    return d / d.sum() if d.sum() > 0 else r


def exact_multi_law(q, p, m, residual=_right_residual):
    """Exact float64 law of the emitted token (V,) and of the winning candidate (m + 1,: the last
    entry is "none won"), enumerating every draw without replacement and every test outcome of the
    rule as stated: candidate i ~ q_i is accepted with probability min(1, r_i / q_i); a rejection
    sets r_{i+1} = residual(r_i, q_i, p, q) and q_{i+1} = q_i without x_i; after m rejections
    (or when q_i has no mass left) the token is drawn from r."""
    V = q.numel()

    def law(r, qi, i):
        out, win = torch.zeros(V, dtype=torch.float64), torch.zeros(m + 1, dtype=torch.float64)
        if i == m or qi.sum() <= 0:
            win[m] = 1.0
            return r, win
        for x in range(V):
            if qi[x] <= 0:
                continue
            a = min(1.0, float(r[x] / qi[x]))
            out[x] += qi[x] * a
            win[i] += qi[x] * a
            rest = qi.clone()
            rest[x] = 0
            sub, sub_win = law(residual(r, qi, p, q), _renorm(rest), i + 1)
            out += qi[x] * (1 - a) * sub
            win += qi[x] * (1 - a) * sub_win
        return out, win

    return law(p, q, 0)


def _multi_dists(seed: int, V: int = 5):
    """A draft q and target p in float64 that disagree, with a token only q proposes and one only p emits."""
    g = torch.Generator().manual_seed(seed)
    q, p = (torch.randn(2, V, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    q[0], p[1] = 0.0, 0.0
    return _renorm(q), _renorm(p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_candidate_rule_is_exactly_lossless(seed):
    """The rule's exact law is p for every candidate count (1 .. more than q's support); two wrong
    residual updates are not."""
    q, p = _multi_dists(seed)
    for m in (1, 2, 3, 4, 5):
        law, win = exact_multi_law(q, p, m)
        torch.testing.assert_close(law, p, atol=1e-12, rtol=0)
        assert abs(float(win.sum()) - 1) < 1e-12
        if m == 1:  # one candidate: Leviathan/Chen, accepted with probability sum min(p, q)
            assert abs(float(win[0]) - float(torch.minimum(p, q).sum())) < 1e-12
    keep = exact_multi_law(q, p, 3, residual=lambda r, qi, p, q: r)[0]  # a rejection leaves the target as it was
    first = exact_multi_law(q, p, 3, residual=lambda r, qi, p, q: _renorm((p - q).clamp(min=0)))[0]  # no recursion
    assert (keep - p).abs().max() > 0.05
    assert (first - p).abs().max() > 0.01


def test_draw_candidates_is_sampling_without_replacement():
    """Pairs (x_1, x_2) follow q(x_1) q(x_2) / (1 - q(x_1)); rows with fewer than m tokens of mass pad with -1."""
    g = torch.Generator().manual_seed(8)
    V, N = 5, 200_000
    q = _multi_dists(4)[0].float()
    c = draw_candidates(q.expand(N, V).contiguous(), 3, g)
    assert bool((c[:, :2] >= 0).all()) and bool((c[:, 0] != c[:, 1]).all())
    pair = q[:, None] * q[None, :] / (1 - q[:, None])
    pair.fill_diagonal_(0.0)
    assert passes(c[:, 0] * V + c[:, 1], pair.reshape(-1))
    few = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0]])
    out = draw_candidates(few, 4, g)[0].tolist()
    assert sorted(out[:2]) == [1, 3] and out[2:] == [-1, -1]


def _wrong_keep_target(r, q):
    return r


def _wrong_full_q(q, x):
    return q


@pytest.mark.parametrize("wrong", [None, ("_residual", _wrong_keep_target), ("_without", _wrong_full_q)])
def test_accept_candidates_emits_the_target_distribution(wrong, monkeypatch):
    """N rows, each with 0..3 candidates drawn without replacement from q: the emitted tokens of
    every candidate count follow p (chi-square) and the winning ranks' rates are the exact law's.
    Negative controls: a rejection that leaves the target as it was, tests against q without the
    earlier candidates removed."""
    if wrong is not None:
        monkeypatch.setattr(spec.accept, *wrong)
    g = torch.Generator().manual_seed(9)
    V, N, m = 5, 240_000, 3
    q, p = _multi_dists(3, V)
    count = torch.randint(0, m + 1, (N,), generator=g)
    cands = draw_candidates(q.float().expand(N, V).contiguous(), m, g)
    winner, tokens = accept_candidates(cands, q.float().expand(N, V), p.float().expand(N, V), count, g)
    assert bool((winner <= count).all())
    won = winner < count
    assert torch.equal(tokens[won], cands[won, winner[won]])
    verdicts, rates = [], []
    for c in range(m + 1):
        rows = count == c
        verdicts.append(passes(tokens[rows], p.float()))
        if c:
            got = torch.stack([(winner[rows] == i).double().mean() for i in range(c)])
            rates.append(float((got - exact_multi_law(q, p, c)[1][:c]).abs().max()))
    if wrong is None:
        assert all(verdicts), [chi2_stat(tokens[count == c], p.float()) for c in range(m + 1)]
        assert max(rates) < 0.01, rates
    else:
        assert verdicts[0] and not all(verdicts[2:])  # no candidate: a sample of p either way
