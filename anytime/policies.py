"""Exit policies: after each loop, a per-token signal and whether the token may leave there.

Every policy reads one signal per token after loop t (1-based) and says "exit" when it crosses the
threshold. The decoder asks the policy only while a budget still allows another loop (the budget
always wins) and never after the last loop T (that exit is "max_depth"). Signals that need the LM
head at every loop (`needs_probs`) cost one (H x V) head product per loop per token; the others
read what every loop computes anyway (the gate, the hidden state) and need the head only at exit.
Probabilities are the model's own distribution: softmax of the raw logits in float32 (no
temperature/top-k/top-p), so signals do not depend on the sampling settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from looplm.exits import exit_cdf
from looplm.validate import number_in


@dataclass
class LoopObservation:
    """What the policies may read after a loop, for R tokens (one per row) at possibly different loops.

    loop: (R,) long, the 1-based loop just computed for each token.
    hidden: (R, H) normed hidden state after that loop; prev_hidden: (R, H) after the previous loop
        (meaningless where loop == 1).
    gates: (R, T) float32 lambda of loops 1..loop (zeros after loop).
    probs / prev_probs: (R, V) float32 softmax of this / the previous loop's logits, or None when no
        policy asked for them.
    """

    loop: torch.Tensor
    hidden: torch.Tensor
    prev_hidden: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor | None = None
    prev_probs: torch.Tensor | None = None


class ExitPolicy:
    """Base class: `decide(obs) -> (signal (R,) float32, exit (R,) bool)`.

    A decision reads its own row of the observation only and keeps no state between calls: the
    decoder may pass the observations after every loop of one token as rows of one call (a
    replay over loops computed at once: the prefill's token, finish="ahead")."""

    name = "none"
    needs_probs = False  # needs the LM head after every loop
    default_threshold: float = math.nan
    threshold_range: tuple[float, float] = (-math.inf, math.inf)  # closed interval a threshold must lie in

    def __init__(self, threshold: float | None = None):
        if threshold is not None:
            number_in(f"{self.name} threshold", threshold, *self.threshold_range)
        self.threshold = float(self.default_threshold if threshold is None else threshold)

    def bind(self, num_loops: int) -> "ExitPolicy":
        """Resolves defaults that depend on the model's depth T; returns self."""
        return self

    def decide(self, obs: LoopObservation) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"policy": self.name, "threshold": self.threshold}


class QExit(ExitPolicy):
    """Ouro's Q-exit (Algorithm 1): exit at the first loop t with CDF(t) = 1 - prod_{s<=t}(1 - lambda_s) >= q.

    Signal: the exit CDF after loop t (looplm.exits.exit_cdf over lambdas 1..t). Cost: the gate
    (an H-vector dot product), which every loop computes anyway; no LM head before the exit.
    Default q = 0.5. q = 1.0 runs every token to depth T (up to float rounding of the CDF).
    """

    name, default_threshold, threshold_range = "q_exit", 0.5, (0.0, 1.0)

    def decide(self, obs):
        cdf = exit_cdf(obs.gates.T)  # (T, R); entries up to each token's loop use only lambdas 1..loop
        signal = cdf.gather(0, (obs.loop - 1)[None]).squeeze(0)
        return signal, signal >= self.threshold


class Confidence(ExitPolicy):
    """Exit when the most likely next token's probability is >= threshold (default 0.9).

    Cost: the LM head and a softmax after every loop.
    """

    name, needs_probs, default_threshold, threshold_range = "confidence", True, 0.9, (0.0, 1.0)

    def decide(self, obs):
        signal = obs.probs.max(-1).values
        return signal, signal >= self.threshold


class Entropy(ExitPolicy):
    """Exit when the next-token entropy (nats) is <= threshold (default 1.0).

    Cost: the LM head and a softmax after every loop.
    """

    name, needs_probs, default_threshold, threshold_range = "entropy", True, 1.0, (0.0, math.inf)

    def decide(self, obs):
        p = obs.probs
        signal = -(p * p.clamp_min(1e-30).log()).sum(-1)
        return signal, signal <= self.threshold


class KLExit(ExitPolicy):
    """Exit when KL(p_t || p_{t-1}) between successive loops' next-token distributions is <= threshold (default 0.01 nats).

    Never exits at loop 1 (no previous loop; signal NaN). Cost: the LM head and a softmax after
    every loop, and one extra (R, V) distribution kept per row.
    """

    name, needs_probs, default_threshold, threshold_range = "kl", True, 0.01, (0.0, math.inf)

    def decide(self, obs):
        p, q = obs.probs, obs.prev_probs
        kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)
        signal = torch.where(obs.loop > 1, kl, torch.full_like(kl, math.nan))
        return signal, (obs.loop > 1) & (kl <= self.threshold)


class HiddenDelta(ExitPolicy):
    """Exit when ||h_t - h_{t-1}|| / ||h_t|| < eps (default 0.05) on the normed loop outputs.

    Never exits at loop 1 (loop 0's input is the raw embedding; signal NaN). Cost: two norms of an
    H-vector per loop; no LM head before the exit.
    """

    name, default_threshold, threshold_range = "delta", 0.05, (0.0, math.inf)

    def decide(self, obs):
        h, h0 = obs.hidden.float(), obs.prev_hidden.float()
        delta = (h - h0).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)
        signal = torch.where(obs.loop > 1, delta, torch.full_like(delta, math.nan))
        return signal, (obs.loop > 1) & (delta < self.threshold)


class StaticDepth(ExitPolicy):
    """Exit at a fixed loop k (default ceil(T / 2)). Signal: the loop. Cost: nothing."""

    name = "static"

    def __init__(self, threshold: int | None = None):
        if threshold is not None:
            number_in("static depth", threshold, 1, integer=True)
        self.threshold = None if threshold is None else int(threshold)

    def bind(self, num_loops):
        if self.threshold is None:
            self.threshold = math.ceil(num_loops / 2)
        return self

    def decide(self, obs):
        return obs.loop.float(), obs.loop >= self.threshold


POLICIES: dict[str, type[ExitPolicy]] = {
    "q_exit": QExit,
    "confidence": Confidence,
    "entropy": Entropy,
    "kl": KLExit,
    "delta": HiddenDelta,
    "static": StaticDepth,
}


def make_policy(exit: str | ExitPolicy | None, threshold: float | None = None) -> ExitPolicy | None:
    """Builds a policy from its name ("q_exit", "confidence", "entropy", "kl", "delta", "static") and threshold.

    A None threshold takes the policy's documented default; an ExitPolicy instance is returned as is.
    """
    if exit is None:
        if threshold is not None:
            raise ValueError("a threshold needs an exit policy (exit='q_exit', 'confidence', ...)")
        return None
    if isinstance(exit, ExitPolicy):
        if threshold is not None:
            raise ValueError("pass the threshold to the policy object, not alongside it")
        return exit
    if exit not in POLICIES:
        raise ValueError(f"unknown exit policy {exit!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[exit]
    return cls() if threshold is None else cls(threshold)
