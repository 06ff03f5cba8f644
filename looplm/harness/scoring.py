"""Teacher-forced scoring of token sequences at a static depth or under a per-token exit policy.

One no-cache forward of all T loops per batch gives every position's state after every loop. That
is exactly what the engine's exact anytime mode (skip="exact") computes for a token: its loops run
over a cache whose earlier positions were finished to depth T, so token i's logits are the LM
head after loop exit_loop(i) at position i, with exit_loop(i) chosen by the policy from the
states of loops 1..exit_loop(i) at position i. `exit_loops` replays the decoder's decision rule
(anytime/decoder.py): the first loop where the policy exits, the loop cap is reached, or t = T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anytime.policies import ExitPolicy, LoopObservation, make_policy
from looplm.model import LoopLM


@dataclass
class ExitRule:
    """Which loop's LM head scores each token.

    depth: a static depth k (1..T): every token is scored after loop k. Or policy: an exit
    policy (anytime.policies) applied per token, capped at max_loops (None: T).
    """

    depth: int | None = None
    policy: ExitPolicy | None = None
    max_loops: int | None = None

    @classmethod
    def make(cls, num_loops: int, loops: int | None = None, exit: str | None = None,
             threshold: float | None = None) -> "ExitRule":
        """loops alone: static depth; exit (+ threshold): that policy, capped at loops; neither: depth T."""
        if loops is not None and (int(loops) != loops or not 1 <= loops <= num_loops):
            raise ValueError(f"loops must be an integer in [1, {num_loops}], got {loops!r}")
        policy = make_policy(exit, threshold)
        if policy is None:
            return cls(depth=num_loops if loops is None else int(loops))
        return cls(policy=policy.bind(num_loops), max_loops=None if loops is None else int(loops))

    def describe(self) -> dict:
        if self.policy is None:
            return {"depth": self.depth}
        return {**self.policy.describe(), "max_loops": self.max_loops}


@dataclass
class Scored:
    """One sequence's scored tokens: log-probability of each, whether each is the argmax, its exit loop."""

    logprobs: list[float]
    greedy: list[bool]
    exit_loops: list[int]


def exit_loops(model: LoopLM, hidden: torch.Tensor, gates: torch.Tensor, rule: ExitRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit loop of every token and the logits there.

    Args:
        model: the looped model (its head turns hidden states into logits).
        hidden: (T, N, H) normed state after each loop at N scored positions.
        gates: (T, N) float32 lambda after each loop at those positions.
        rule: the static depth or exit policy.
    Returns:
        exit_loop (N,) long, 1-based; logits (N, V) of the head after that loop.
    """
    T, N, _ = hidden.shape
    if rule.policy is None:
        return torch.full((N,), rule.depth, dtype=torch.long, device=hidden.device), model.head(hidden[rule.depth - 1])
    cap = T if rule.max_loops is None else min(rule.max_loops, T)
    need_probs = rule.policy.needs_probs
    all_logits = model.head(hidden) if need_probs else None  # (T, N, V)
    chosen = torch.full((N,), T, dtype=torch.long, device=hidden.device)
    open_ = torch.ones(N, dtype=torch.bool, device=hidden.device)
    seen = torch.zeros(N, T, dtype=torch.float32, device=hidden.device)  # lambdas of loops 1..t, zeros after
    probs = prev_probs = None
    for t in range(1, T + 1):
        seen[:, t - 1] = gates[t - 1]
        if need_probs:
            prev_probs, probs = probs, all_logits[t - 1].float().softmax(-1)
        prev = hidden[t - 2] if t > 1 else torch.zeros_like(hidden[0])  # never read at loop 1
        obs = LoopObservation(torch.full((N,), t, device=hidden.device), hidden[t - 1], prev, seen.clone(),
                              probs, prev_probs if prev_probs is not None else probs)
        _, leave = rule.policy.decide(obs)
        leave = leave | (t >= cap)
        chosen = torch.where(open_ & leave, torch.full_like(chosen, t), chosen)
        open_ &= ~leave
        if not open_.any():
            break
    if all_logits is not None:
        logits = all_logits.gather(0, (chosen - 1)[None, :, None].expand(1, N, all_logits.shape[-1]))[0]
    else:
        logits = model.head(hidden.gather(0, (chosen - 1)[None, :, None].expand(1, N, hidden.shape[-1]))[0])
    return chosen, logits


@torch.no_grad()
def score(model: LoopLM, rows: list[tuple[list[int], int]], rule: ExitRule, batch_size: int = 16) -> list[Scored]:
    """Scores the last n tokens of each sequence given everything before them.

    Rows whose inputs (all tokens but the last) and n agree share one forward row: e.g. the choices
    of a multiple-choice question that differ only in their last token.

    Args:
        model: the looped model.
        rows: (ids, n) pairs: a sequence of token ids (at most max_position_embeddings + 1 long)
            and how many of its last tokens to score (1 <= n < len(ids)).
        rule: the static depth or exit policy.
        batch_size: forward rows per batch; rows are right-padded (attention is causal by position,
            so padding after a row never reaches its scored positions).
    Returns:
        One Scored per row, in order.
    """
    ctx = model.config.max_position_embeddings
    shared: dict[tuple, list[int]] = {}
    for i, (ids, n) in enumerate(rows):
        if not 1 <= n < len(ids):
            raise ValueError(f"row {i}: cannot score the last {n} of {len(ids)} tokens (need 1 <= n < length)")
        if len(ids) - 1 > ctx:
            raise ValueError(f"row {i}: {len(ids) - 1} input tokens exceed max_position_embeddings {ctx}")
        shared.setdefault((tuple(ids[:-1]), n), []).append(i)
    device = model.lm_head.weight.device
    keys = sorted(shared, key=lambda k: -len(k[0]))  # similar lengths share a batch
    out: list[Scored | None] = [None] * len(rows)
    for b in range(0, len(keys), batch_size):
        chunk = keys[b : b + batch_size]
        S = len(chunk[0][0])
        x = torch.zeros(len(chunk), S, dtype=torch.long)
        for j, (inp, _) in enumerate(chunk):
            x[j, : len(inp)] = torch.tensor(inp)
        x = x.to(device)
        res = model.forward_loops(model.embed(x), torch.arange(S, device=device))
        bi, pi = [], []
        for j, (inp, n) in enumerate(chunk):
            bi += [j] * n
            pi += range(len(inp) - n, len(inp))  # the input positions predicting the scored tokens
        bi, pi = torch.tensor(bi, device=device), torch.tensor(pi, device=device)
        loops, logits = exit_loops(model, res.hidden[:, bi, pi], res.gates[:, bi, pi], rule)
        logp = logits.float().log_softmax(-1)  # (N, V)
        best = logp.argmax(-1)
        k = 0
        for key in chunk:
            n = key[1]
            span = slice(k, k + n)
            for i in shared[key]:
                tgt = torch.tensor(rows[i][0][-n:], device=device)
                lp = logp[span].gather(1, tgt[:, None])[:, 0]
                out[i] = Scored(lp.tolist(), (best[span] == tgt).tolist(), loops[span].tolist())
            k += n
    return out
