"""Choosing second drafts per request, online (draft_tokens=2, second_threshold="adaptive").

A fixed second_threshold is one model's calibration (`python -m spec.calibrate`); how often a
second draft passes moves with the text and with sampling. Here the decoder learns it per request,
as DEL (Zarch et al., "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
Decoding") learns a draft's exit layer and length from the acceptance observed so far.

When is a second draft worth making? Take the pipeline at draft loop k with D = T/k stages and a
token n whose first draft (n+1) passes. Without a second draft, token n+1 drafts n+2 one call
later, and that draft passes with the first drafts' rate a1. A second draft made now passes with
rate a2 (its pass rate given that the first passed). If it passes, n+2 finishes one call earlier
and so does everything behind it: one call saved. If it fails where the later first draft would
have passed, the pipeline refills behind n+2: D - 1 calls lost. Taking the second draft to fail
wherever the later first draft would (both fail on the hard tokens), that case has probability
a1 - a2, and the expected calls saved are

    a2 - (D - 1) (a1 - a2) = D a2 - (D - 1) a1,   worth it when a2 >= (D - 1) a1 / D.

a2 depends on the second-token head's confidence (its top-1 probability), so it is estimated per
confidence bin. Every draft step runs the head anyway, so every first draft that turns out right
scores the second draft made beside it, proposed or not (a shadow draft, as spec.adapt scores
other draft loops): once that first draft is verified, its exact logits give the target at n+2.
The score is greedy 1 when the second draft is the target's argmax, else 0; sampling the chance
sum_v min(p(v), q2(v)) that a draw from q2 passes the Leviathan/Chen test. First drafts are scored
the same way when they are tested. A bin's estimate is its mean score shrunk towards the request's
mean over all bins by PRIOR_WEIGHT pseudo-scores, and that mean towards PRIOR by as many: a bin
with few scores follows the request, and a request with few scores starts out making second
drafts (shadow scores cost nothing, so the estimates learn as fast whether drafts are made or not).

Lossless either way: whether a second draft is made depends only on tokens already verified and on
the head's own distribution, and a made draft is tested against the distribution it was drawn
from. The cost model counts calls only (an extra row in a call is taken as free, as at batch 1 on
an accelerator).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

EDGES = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # confidence bins: [0, 0.1), [0.1, 0.2), ..., [0.9, 1]
WINDOW = 32  # scores per bin (and first-draft scores) the estimates look back over
PRIOR_WEIGHT = 4  # pseudo-scores of each shrinkage (bin -> request, request -> PRIOR)
PRIOR = 0.9  # pass rate assumed, first and second drafts alike, before any is scored


class SecondChooser:
    """Per-request estimates of first- and second-draft pass rates, and the choice (module docstring)."""

    def __init__(self, stages: int):
        if stages < 2:
            raise ValueError(f"second drafts need at least 2 pipeline stages (T/k), got {stages}")
        self.stages = stages
        self.bins = [deque(maxlen=WINDOW) for _ in range(len(EDGES) + 1)]
        self.firsts: deque[float] = deque(maxlen=WINDOW)

    def _bin(self, sure: float) -> deque:
        return self.bins[bisect_right(EDGES, sure)]

    def bar(self) -> float:
        """The break-even second-draft pass rate, (D - 1) a1 / D."""
        a1 = sum(self.firsts) / len(self.firsts) if self.firsts else PRIOR
        return (self.stages - 1) * a1 / self.stages

    def estimate(self, sure: float) -> float:
        """The pass rate of a second draft at confidence `sure`: its bin's scores shrunk towards the request's."""
        n_all = sum(len(b) for b in self.bins)
        pooled = (sum(sum(b) for b in self.bins) + PRIOR_WEIGHT * PRIOR) / (n_all + PRIOR_WEIGHT)
        scores = self._bin(sure)
        return (sum(scores) + PRIOR_WEIGHT * pooled) / (len(scores) + PRIOR_WEIGHT)

    def wants(self, sure: float) -> bool:
        """Whether to make a second draft whose head puts top-1 probability `sure` on its token."""
        return self.estimate(sure) >= self.bar()

    def score_first(self, score: float) -> None:
        self.firsts.append(float(score))

    def score_second(self, sure: float, score: float) -> None:
        self._bin(sure).append(float(score))
