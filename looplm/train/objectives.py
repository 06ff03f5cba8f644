"""Training objectives for looped LMs (docs/design.md, "Training objectives").

All functions take per-loop tensors with the loop index first ([T, ...]) and reduce over the
tokens selected by an optional boolean mask (True = counted); losses are float32 scalars.

- Stage I, entropy-regularised (the negative ELBO with a uniform prior over exit steps):
      L = mean_tokens[ sum_t p(t|x) CE_t(x) - beta * H(p(.|x)) ]
- Stage I, plain per-loop cross-entropy with loop weights w_t (1:2:3:4 separates loops early):
      L = sum_t w_t mean_tokens[CE_t] / sum_t w_t
- Loop distillation (optional, for draft quality): loop t's head learns loop T's distribution,
      L = sum_t d_t mean_tokens[ KL(stopgrad(p_T) || p_t) ] / sum_t d_t   (d_T is ignored)
- Teacher KL (shared-KV training): loop t of a pass reading shared K/V learns the same loop of the
  per-loop pass (a fixed teacher),  L = sum_t w_t mean_tokens[ KL(stopgrad(q_t) || p_t) ] / sum_t w_t
- K/V consistency (shared-KV training): every loop's K and V of a layer move toward the one value a
  shared cache keeps (the last loop's, or the mean over loops), relative to its mean square,
      L = mean_{layers, K and V, loops t} mean[(x_t - stopgrad(x*))^2] / stopgrad(mean[x*^2])
  over loops t < T for x* = x_T, every loop for x* = mean_t x_t
- Stage II (gate only; the LM's losses enter detached):
      I_t = max(0, CE_{t-1} - CE_t),  w_t = sigmoid(k (I_t - gamma))   (target "continue")
      loss_t = -mean_tokens[ w_t log(1 - lambda_t) + (1 - w_t) log lambda_t ]
      L = (1/T) sum_{t=2..T} loss_t
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from looplm.exits import exit_distribution

IGNORE_INDEX = -100


def per_loop_ce(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy of every loop's logits, in float32.

    Args:
        logits: [T, B, S, V] the shared head's logits after every loop.
        targets: [B, S] next-token ids; `ignore_index` entries get CE 0 (mask them out downstream).
    Returns:
        [T, B, S] CE_t per token.
    """
    T, B, S, V = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(T * B * S, V),
        targets.expand(T, B, S).reshape(T * B * S),
        ignore_index=ignore_index,
        reduction="none",
    )
    return ce.view(T, B, S)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all elements of x [...] (or those where mask is True)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def exit_entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """H(p) = -sum_t p_t log p_t over the loop dim. [T, ...] -> [...]; 0 log 0 counts as 0."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=0)


def entropy_regularized_loss(
    ce: torch.Tensor, gates: torch.Tensor, beta: float = 0.1, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage I: mean over tokens of sum_t p(t|x) CE_t - beta * H(p(.|x)).

    Args:
        ce: [T, ...] per-token CE of every loop (differentiable: the LM is trained).
        gates: [T, ...] lambda_t = sigmoid(gate(h_t)) (differentiable: the gate is trained too).
        beta: entropy weight (0.1 early in training, 0.05 later).
        mask: [...] tokens to count.
    Returns:
        (loss, stats) where stats holds the detached expected CE and mean entropy.
    """
    p = exit_distribution(gates)
    expected_ce = (p * ce.float()).sum(dim=0)
    entropy = exit_entropy(p)
    loss = _masked_mean(expected_ce - beta * entropy, mask)
    stats = {"expected_ce": _masked_mean(expected_ce, mask).detach(), "entropy": _masked_mean(entropy, mask).detach()}
    return loss, stats


def weighted_per_loop_loss(
    ce: torch.Tensor, loop_weights: Sequence[float] | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-loop CE: sum_t w_t mean(CE_t) / sum_t w_t.

    Args:
        ce: [T, ...] per-token CE.
        loop_weights: T non-negative weights (default equal).
        mask: [...] tokens to count.
    Returns:
        (loss, per_loop) where per_loop [T] holds the detached mean CE of each loop.
    """
    T = ce.shape[0]
    w = torch.ones(T) if loop_weights is None else torch.as_tensor(loop_weights, dtype=torch.float32)
    if w.numel() != T:
        raise ValueError(f"{w.numel()} loop weights for {T} loops")
    per_loop = torch.stack([_masked_mean(ce[t].float(), mask) for t in range(T)])
    w = w.to(per_loop.device)
    return (w * per_loop).sum() / w.sum(), per_loop.detach()


def loop_distillation_loss(
    logits: torch.Tensor, weights: Sequence[float], mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL from the last loop's (detached) next-token distribution to each earlier loop's.

    Raises the agreement of early loops with the last one (what self-speculation's drafts need)
    without a label: the last loop is the teacher and gets no gradient from this term.

    Args:
        logits: [T, ...,  V] every loop's logits.
        weights: T non-negative weights d_t; the last one is ignored (KL of loop T to itself is 0).
        mask: [...] tokens to count.
    Returns:
        (loss, per_loop) with loss = sum_t d_t mean(KL_t) / sum_{t<T} d_t and per_loop [T] the
        detached mean KL_t of each loop (0 for loop T).
    """
    T = logits.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.numel() != T:
        raise ValueError(f"{w.numel()} distillation weights for {T} loops")
    logp = F.log_softmax(logits.float(), dim=-1)
    teacher = logp[-1].detach()
    kl = (teacher.exp() * (teacher - logp)).sum(-1)  # [T, ...]
    per_loop = torch.stack([_masked_mean(kl[t], mask) for t in range(T)])
    w = w.to(per_loop.device)
    w[-1] = 0.0
    return (w * per_loop).sum() / w.sum().clamp_min(1e-12), per_loop.detach()


def teacher_kl_loss(
    logits: torch.Tensor, teacher: torch.Tensor, weights: Sequence[float], mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL from a fixed teacher's per-loop distributions to the student's, loop for loop.

    Used by shared-KV training: the teacher is the per-loop-KV pass of the same weights (computed
    without gradients), the student the pass that reads shared K/V.

    Args:
        logits: [T, ..., V] the student's logits.
        teacher: [T, ..., V] the teacher's logits (detached here).
        weights: T non-negative loop weights.
        mask: [...] tokens to count.
    Returns:
        (loss, per_loop) with loss = sum_t w_t mean(KL_t) / sum_t w_t and per_loop [T] the detached mean KL_t.
    """
    T = logits.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.numel() != T or teacher.shape != logits.shape:
        raise ValueError(f"{w.numel()} weights, teacher {tuple(teacher.shape)} for student logits {tuple(logits.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    target = F.log_softmax(teacher.detach().float(), dim=-1)
    kl = (target.exp() * (target - logp)).sum(-1)  # [T, ...]
    per_loop = torch.stack([_masked_mean(kl[t], mask) for t in range(T)])
    w = w.to(per_loop.device)
    return (w * per_loop).sum() / w.sum().clamp_min(1e-12), per_loop.detach()


def kv_consistency_loss(states: Sequence[torch.Tensor], target: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """How far every loop's K (or V) is from the one a shared cache keeps, scale free.

    For each state x ([T, ...]: one layer's K or V after every loop), the target x* is the last
    loop's (target "last") or the mean over loops ("mean"), as `kv="last"` / `kv="mean"` decoding
    stores it; D_t = mean[(x_t - x*)^2] / mean[x*^2] with x* and its mean square detached, so the
    term moves the loops toward the stored value and cannot shrink itself by rescaling x*.

    Args:
        states: one [T, ...] tensor per (layer, K or V), all with the same T.
        target: "last" (the loss averages loops t < T; D_T is 0) or "mean" (it averages all T).
    Returns:
        (loss, per_loop) with loss the mean of D_t over the states and the averaged loops, and
        per_loop [T] the detached mean D_t over the states.
    """
    if target not in ("last", "mean"):
        raise ValueError(f"K/V consistency target must be 'last' or 'mean', got {target!r}")
    if not states:
        raise ValueError("K/V consistency needs at least one [T, ...] state")
    T = states[0].shape[0]
    if any(x.shape[0] != T for x in states):
        raise ValueError(f"K/V states with different loop counts: {[x.shape[0] for x in states]}")
    per_state = []
    for x in states:
        x = x.float()
        # the mean as loop 0 plus the mean deviation from it: exactly loop 0 when all loops are equal
        ref = (x[-1] if target == "last" else x[0] + (x - x[0]).mean(dim=0)).detach()
        d = (x - ref).pow(2).flatten(1).mean(dim=1)  # [T]
        per_state.append(d / ref.pow(2).mean().clamp_min(1e-12))
    per_loop = torch.stack(per_state).mean(dim=0)  # [T]
    counted = per_loop[:-1] if target == "last" else per_loop
    return counted.mean() if counted.numel() else per_loop.sum() * 0.0, per_loop.detach()


def stage2_targets(ce: torch.Tensor, k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """"Continue" targets for loops 2..T: w_t = sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma)).

    Args:
        ce: [T, ...] per-token CE (detached here).
    Returns:
        [T-1, ...] w_t for t = 2..T.
    """
    ce = ce.detach().float()
    improvement = (ce[:-1] - ce[1:]).clamp_min(0.0)
    return torch.sigmoid(k * (improvement - gamma))


def stage2_gate_loss(
    gate_logits: torch.Tensor,
    ce: torch.Tensor,
    k: float = 50.0,
    gamma: float = 0.005,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II: (1/T) sum_{t=2..T} -mean[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t].

    Takes the gate's logits z_t (lambda_t = sigmoid(z_t)) so the logs are computed stably.

    Args:
        gate_logits: [T, ...] z_t; only these carry gradients.
        ce: [T, ...] per-token CE of the frozen LM (detached here).
        k, gamma: slope and threshold of the improvement targets.
        mask: [...] tokens to count.
    Returns:
        (loss, per_step) where per_step [T-1] holds the detached loss_t for t = 2..T.
    """
    T = gate_logits.shape[0]
    w = stage2_targets(ce, k, gamma)
    z = gate_logits[1:].float()
    bce = -(w * F.logsigmoid(-z) + (1 - w) * F.logsigmoid(z))  # [T-1, ...]
    per_step = torch.stack([_masked_mean(bce[i], mask) for i in range(T - 1)])
    return per_step.sum() / T, per_step.detach()
