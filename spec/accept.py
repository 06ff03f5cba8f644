"""Acceptance of drafted tokens: greedy prefix match and the Leviathan/Chen rejection rule.

Both rules are vectorised over the batch and the draft positions: no per-token Python loop and
no host sync. They return the same thing, so the decoder treats them alike:

    accepted (B,) long   number of leading drafts kept (0..limit[b])
    tokens   (B, G) long the row's emitted tokens in [0, accepted + (accepted < limit)):
                         the accepted drafts, then the target's own token where a draft was
                         rejected. Entries past a row's count are meaningless.

`limit[b]` (<= G) is how many drafts row b really proposed; drafts beyond it are padding for the
batched shapes and are treated as neither accepted nor rejected. When all `limit[b]` drafts pass
no extra token is emitted: the target's next-token logits would need the last draft's own forward,
which the next drafting round computes anyway (loops 1..k) and verifies (loops k+1..T).
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
