"""The exit distribution over loops defined by the gate's lambdas (docs/design.md, "Looped language models")."""

from __future__ import annotations

import torch


def exit_distribution(gates: torch.Tensor) -> torch.Tensor:
    """p(t) = lambda_t * S_{t-1} for t < T and p(T) = S_{T-1}, with S_0 = 1, S_t = S_{t-1} (1 - lambda_t).

    Args:
        gates: [T, ...] lambda_t per loop (the last loop's lambda is not used).
    Returns:
        [T, ...] probabilities that sum to 1 over the first dim.
    """
    survive = torch.cumprod(1 - gates.float(), dim=0)  # S_1..S_T
    before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]])  # S_0..S_{T-1}
    p = gates.float() * before
    return torch.cat([p[:-1], before[-1:]])


def exit_cdf(gates: torch.Tensor) -> torch.Tensor:
    """CDF(t) = 1 - S_t for t < T and 1 at T. [T, ...] -> [T, ...]."""
    cdf = 1 - torch.cumprod(1 - gates.float(), dim=0)
    cdf[-1] = 1.0
    return cdf


def q_exit_loops(gates: torch.Tensor, q: float) -> torch.Tensor:
    """The paper's Algorithm 1: the first 1-based loop t with CDF(t) >= q. [T, ...] -> long [...]."""
    reached = exit_cdf(gates) >= q
    return reached.long().argmax(dim=0) + 1
