"""How many tokens to draft per round: a fixed number, or an adaptive choice from a cost model.

Adaptive rule. Per-token acceptance is estimated as alpha = S / (S + F) from decayed counts of
accepted drafts (S) and rejections (F) over past rounds (decay 0.9 per round, prior 4:1, i.e.
alpha = 0.8 before any evidence). A round with g drafts emits on average
E[g] = (1 - alpha^g) / (1 - alpha) tokens and costs about g*k + (T - k) loop passes (g drafts of k
loops, one verification of T - k loops whose width barely matters at decode sizes), so the rule
picks g in 1..max_len maximising E[g] / (g*k + T - k): tokens per loop pass.
"""

from __future__ import annotations

ADAPTIVE_MAX = 8


class DraftLength:
    """Draft length per round; `update` feeds back what a round accepted."""

    def __init__(self, spec: int | str, draft_loop: int, num_loops: int, *, decay: float = 0.9, prior: tuple[float, float] = (4.0, 1.0)):
        self.adaptive = spec == "adaptive"
        if not self.adaptive and (isinstance(spec, bool) or not isinstance(spec, int) or spec < 1):
            raise ValueError(f"draft_len must be an integer >= 1 or 'adaptive', got {spec!r}")
        self.max = ADAPTIVE_MAX if self.adaptive else spec
        self.k, self.T, self.decay = draft_loop, num_loops, decay
        self.succ, self.fail = prior
        self.current = self._best() if self.adaptive else spec

    @property
    def alpha(self) -> float:
        return self.succ / (self.succ + self.fail)

    def _best(self) -> int:
        a = min(self.alpha, 1 - 1e-6)
        rate = [((1 - a**g) / (1 - a)) / (g * self.k + self.T - self.k) for g in range(1, self.max + 1)]
        return 1 + max(range(self.max), key=rate.__getitem__)

    def update(self, accepted: int, rejections: int) -> int:
        """Records one round (summed over rows) and returns the next round's draft length."""
        if self.adaptive:
            self.succ = self.decay * self.succ + accepted
            self.fail = self.decay * self.fail + rejections
            self.current = self._best()
        return self.current
