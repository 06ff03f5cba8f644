"""Acceptance of drafted tokens: greedy prefix match, the Leviathan/Chen rejection rule, and its
multi-candidate form for draft trees (accept_candidates).

Every rule is vectorised over the batch (the first two also over the draft positions: no
per-token Python loop) and needs no host sync. The first two return the same thing, so the
decoders treat them alike:

    accepted (B,) long   number of leading drafts kept (0..limit[b])
    tokens   (B, G) long the row's emitted tokens in [0, accepted + (accepted < limit)):
                         the accepted drafts, then the target's own token where a draft was
                         rejected. Entries past a row's count are meaningless.

`limit[b]` (<= G) is how many drafts row b really proposed; drafts beyond it are padding for the
batched shapes and are treated as neither accepted nor rejected. When all `limit[b]` drafts pass
no extra token is emitted: the target's next-token logits would need the last draft's own forward,
which the next drafting round computes anyway (loops 1..k) and verifies (loops k+1..T).

accept_candidates verifies one position with several candidates (siblings of a draft tree, drawn
by draw_candidates) and returns the winning candidate's index and the emitted token per row.
"""

from __future__ import annotations

import torch

from looplm.sampling import sample


def emitted_counts(accepted: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """(B,) tokens emitted per row: the accepted drafts plus one target token after a rejection."""
    return accepted + (accepted < limit).long()


def _prefix_len(ok: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    # length of the leading run of True per row, capped by the row's real draft count
    return ok.long().cumprod(-1).sum(-1).minimum(limit)


def accept_greedy(drafts: torch.Tensor, target_ids: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance: keep the longest prefix of drafts equal to the target's argmax.

    Args:
        drafts: (B, G) drafted token ids; drafts[:, i] is the proposal for new position i.
        target_ids: (B, G) the full-depth argmax at the same positions (given the drafts before).
        limit: (B,) number of real drafts per row (<= G).
    Returns:
        accepted (B,) and tokens (B, G) as described in the module docstring. Since a rejected
        draft is replaced by the target's argmax, tokens[:, :count] always equals target_ids.
    """
    accepted = _prefix_len(drafts == target_ids, limit)
    return accepted, target_ids


def accept_sampled(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    limit: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
    token is drawn from norm(max(p_i - q_i, 0)). Each emitted token then follows the target
    distribution p given the tokens before it.

    Args:
        drafts: (B, G) drafted ids, drafts[:, i] ~ q[:, i].
        q: (B, G, V) float32 draft distributions (after the same post-processing as p).
        p: (B, G, V) float32 target distributions at the same positions.
        limit: (B,) number of real drafts per row (<= G).
        generator: random source for the accept test and the residual draw.
    Returns:
        accepted (B,) and tokens (B, G) as described in the module docstring.
    """
    B, G, _ = p.shape
    d = drafts[..., None]
    p_d, q_d = p.gather(-1, d)[..., 0], q.gather(-1, d)[..., 0]  # (B, G)
    u = torch.rand((B, G), generator=generator, device=p.device)
    accepted = _prefix_len(u * q_d < p_d, limit)  # u < p/q without dividing by q
    at = accepted.clamp(max=G - 1)[:, None]
    p_a = p.gather(1, at[..., None].expand(-1, -1, p.shape[-1]))[:, 0]  # (B, V) at the first rejection
    q_a = q.gather(1, at[..., None].expand(-1, -1, q.shape[-1]))[:, 0]
    resid = (p_a - q_a).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    # p == q leaves no residual mass; a rejection then has probability 0, but keep the draw valid
    resid = torch.where(mass > 0, resid / mass.clamp(min=torch.finfo(resid.dtype).tiny), p_a)
    fix = sample(resid, generator)  # (B,)
    tokens = drafts.scatter(1, at, fix[:, None])
    tokens = torch.where((accepted < limit)[:, None], tokens, drafts)
    return accepted, tokens


def pass_chance(p: torch.Tensor, q: torch.Tensor) -> float:
    """The chance that a draw from q (V,) passes the Leviathan/Chen test against the target p (any
    shape holding V entries): sum_v min(p(v), q(v))."""
    return torch.minimum(p.reshape(-1), q).sum().item()


def draw_candidates(q: torch.Tensor, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws m tokens per row from (B, V) distributions q without replacement, in draw order.

    The first is a plain sample of q; each next one a sample of q with the earlier ones removed
    and renormalised (the order of q / E for E ~ Exp(1): the exponential race of
    looplm.sampling.sample, continued). Returns (B, m) long; a row whose q has fewer than m
    tokens of positive mass has -1 after them.
    """
    race = torch.empty_like(q).exponential_(1.0, generator=generator)
    keys, ids = (q / race).topk(m, -1)
    return ids.masked_fill(keys <= 0, -1)


def _without(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, V) q with each row's token x removed and renormalised (zero where nothing is left)."""
    q = q.scatter(-1, x[:, None], 0.0)
    mass = q.sum(-1, keepdim=True)
    return q / mass.clamp(min=torch.finfo(q.dtype).tiny)


def _residual(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(r - q, 0)) per row; r itself where r <= q everywhere (then r == q and a rejection has probability 0)."""
    resid = (r - q).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    return torch.where(mass > 0, resid / mass.clamp(min=torch.finfo(resid.dtype).tiny), r)


def accept_candidates(
    cands: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    count: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling of several candidates drawn without replacement (draft trees).

    Candidates x_1, ..., x_m of one position are drawn from q without replacement (draw_candidates).
    With r_1 = p and q_1 = q, candidate i is accepted with probability min(1, r_i(x_i) / q_i(x_i));
    after a rejection r_{i+1} = norm(max(r_i - q_i, 0)) and q_{i+1} = q_i with x_i removed and
    renormalised. If all m are rejected the token is drawn from r_{m+1}. The emitted token follows
    p exactly: given the earlier rejections, x_i ~ q_i, and one test step emits x_i with
    probability min(r_i, q_i)(x_i) or else continues with a law that (by induction on the
    candidates left, whatever x_i was) is r_{i+1}; min(r_i, q_i) + (1 - sum min(r_i, q_i)) r_{i+1}
    = r_i. With m = 1 this is accept_sampled's rule (docs/design.md "Draft trees").

    Args:
        cands: (B, m) candidate ids in draw order; cands[b, :count[b]] must have q > 0 (the rest
            is padding and never read as a token).
        q: (B, V) float32 draft distribution the candidates were drawn from.
        p: (B, V) float32 target distribution (after the same post-processing as q).
        count: (B,) long, real candidates per row (0..m; 0: the token is a sample of p).
        generator: random source for the tests and the final draw.
    Returns:
        winner (B,) long: the index of the accepted candidate, count[b] if none was; tokens (B,)
        long: the emitted token of each row.
    """
    B, m = cands.shape
    safe = cands.clamp(min=0)
    u = torch.rand((B, m), generator=generator, device=p.device)
    winner = count.clone()
    r, qi = p, q
    for i in range(m):
        x = safe[:, i]
        testing = (winner == count) & (count > i)  # every earlier candidate of the row was rejected
        r_x, q_x = r.gather(-1, x[:, None])[:, 0], qi.gather(-1, x[:, None])[:, 0]
        ok = testing & (u[:, i] * q_x < r_x)  # u < r/q without dividing by q
        winner = torch.where(ok, i, winner)
        failed = (testing & ~ok)[:, None]
        r = torch.where(failed, _residual(r, qi), r)
        if i + 1 < m:  # the next candidate's q; none is tested after the last
            qi = torch.where(failed, _without(qi, x), qi)
    fix = sample(r, generator)  # r is the last residual where every candidate was rejected
    won = winner < count
    tokens = torch.where(won, safe.gather(-1, winner.clamp(max=m - 1)[:, None])[:, 0], fix)
    return winner, tokens
