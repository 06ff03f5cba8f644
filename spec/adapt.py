"""Choosing the draft loop per request, online (draft_loop="adaptive").

DEL (Zarch et al., "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
Decoding") picks a layer-skipping draft's exit layer per request from the acceptance each layer's
drafts would have had on the tokens verified so far. A looped model makes this nearly free: every
token runs every loop anyway, so when a token passes loop j (any j dividing T, a draft loop the
pipeline can run) the decoder heads that state too (a shadow draft: loop j's draft map or
extrapolation where it has one, as the pipeline at k = j would draft) and, once the token's
successor is known, scores it: greedy, 1 when its argmax is the successor; sampling, the sum of
min(p, q_j), the chance that a draft from q_j passes the Leviathan/Chen test against the target p.

Cost per emitted token of the pipeline at draft loop j with acceptance a (spec.pipeline: steady
state one token per call, a rejection costs a refill of T/j - 1 calls):

    calls_j = 1 + (1 - a) (T/j - 1),    cost_j = calls_j * (j + r)

in loop passes, where r = `call_cost` is a forward call's fixed cost in loop passes (0: decode
time follows weight passes, as at batch 1 on a GPU or for a model larger than the CPU's caches;
on a CPU where per-call work dominates a small model, r is large and fewer calls win;
`python -m spec.calibrate` fits r per model and device).

The pipeline changes its loop only where one token is in flight and it has run no loop (after a
rejection, or after draining on purpose): every position before it holds all T loops, so the
switch is exact, and drafting at another loop never changes what full depth verifies (lossless,
greedy and sampled). It drains on purpose, stopping new drafts until the pipeline is empty, when
the expected saving over the tokens left outweighs twice the cost of a refill.
"""

from __future__ import annotations

from collections import deque

import torch

from looplm.sampling import SamplingParams, probabilities

from .accept import pass_chance
from .drafts import DraftMap, draft_state

WINDOW = 32  # scores per loop the estimate looks back over
MIN_SEEN = 16  # scores every candidate loop needs before the decoder may switch
HYSTERESIS = 0.1  # switch only to a loop at least this much cheaper (a 32-token estimate is noisy)


def divisors_below(T: int) -> list[int]:
    """The draft loops the pipeline can run: the divisors of T below T."""
    return [j for j in range(1, T) if T % j == 0]


def start_loop(T: int, preferred: int) -> int:
    """The adaptive decoder's first draft loop: the largest divisor of T below T, at most `preferred`."""
    return max(j for j in divisors_below(T) if j <= max(preferred, 1))


class LoopChooser:
    """Acceptance estimates per candidate draft loop, and the choice among them (module docstring)."""

    def __init__(self, T: int, call_cost: float = 0.0, window: int | None = None):
        self.T, self.call_cost = T, float(call_cost)
        self.loops = divisors_below(T)
        self.scores = {j: deque(maxlen=window or WINDOW) for j in self.loops}
        self.totals = {j: [0.0, 0] for j in self.loops}  # over the whole request: sum of scores, count
        self.current: int | None = None  # the loop the request's decoder drafts at (kept across its parts)

    def resume(self, k: int) -> int:
        """The loop a decoder of this request starts drafting at: where the request's last decoder
        drafted when one ran before (speculation resuming after a busy spell at full depth), else k."""
        if self.current is None:
            self.current = k
        return self.current

    def record(self, scores: dict[int, float]) -> None:
        """One verified token's scores, loop -> acceptance of the draft loop j made from it."""
        for j, s in scores.items():
            self.scores[j].append(s)
            self.totals[j][0] += s
            self.totals[j][1] += 1

    def score(self, shadow: dict, target: int, p: torch.Tensor | None = None) -> None:
        """Records a verified token's shadow drafts of its successor (loop j -> the draft, greedy;
        or its distribution q_j, sampling) against the successor: greedy (p None) 1 where the draft
        is `target`, else 0; sampling the chance sum(min(p, q_j)) that a draft from q_j passes."""
        self.record({j: float(d == target) if p is None else pass_chance(p, d) for j, d in shadow.items()})

    def cost(self, j: int) -> float:
        """Expected loop passes per emitted token at draft loop j (module docstring)."""
        a = sum(self.scores[j]) / len(self.scores[j])
        return (1 + (1 - a) * (self.T // j - 1)) * (j + self.call_cost)

    def best(self, k: int) -> int:
        """The loop to draft at from now on: k until every loop has MIN_SEEN scores, then the
        cheapest when it beats k's cost by HYSTERESIS."""
        if any(len(s) < min(MIN_SEEN, s.maxlen) for s in self.scores.values()):
            return k
        j = min(self.loops, key=self.cost)
        return j if self.cost(j) < (1 - HYSTERESIS) * self.cost(k) else k

    def drain(self, k: int, tokens_left: int) -> bool:
        """Stop drafting to switch now (without waiting for a rejection): when the expected
        saving over the tokens left exceeds twice a refill (T/k - 1 calls of k loops)."""
        j = self.best(k)
        if j == k:
            return False
        refill = (self.T // k - 1) * (k + self.call_cost)
        return tokens_left * (self.cost(k) - self.cost(j)) > 2 * refill

    def acceptance(self) -> dict[str, float]:
        """Mean score per loop over the request (the stats' loop_acceptance; keys are the loops, as text)."""
        return {str(j): s / n for j, (s, n) in self.totals.items() if n}


def shadow_drafts(model, per_loop: torch.Tensor, before: list, stages: tuple, k: int, loops: list[int],
                  drafters: dict[int, tuple[float, DraftMap | None]], params: SamplingParams) -> list[dict]:
    """The shadow drafts of one pipeline call: per call row, loop j -> the draft of the row's
    successor that loop j makes (greedy: its argmax; sampling: its distribution), for every
    candidate loop j the row passed in this call, except loop k of a fresh row (the real draft).

    Args:
        per_loop: (k, N, H) the call's states (row i, at stage s, ran loops s*k+1 .. s*k+k).
        before: each row's state before the call (None for a fresh row).
        stages: each row's stage in the call; drafters: loop -> (extrapolate, draft map).
    """
    groups: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
    for i, s in enumerate(stages):
        for j in loops:
            if s * k < j <= s * k + k and not (s == 0 and j == k):
                at = j - s * k - 1  # loop j's index in the call
                groups.setdefault(j, []).append((i, per_loop[at, i], per_loop[at - 1, i] if at else before[i]))
    out: list[dict] = [{} for _ in stages]
    for j, rows in groups.items():
        extrapolate, dmap = drafters[j]
        h = torch.stack([r[1] for r in rows])
        if j >= 2 and (extrapolate or dmap is not None):  # from the states of loops j-1 and j, as the pipeline at k = j
            h = draft_state(torch.stack([torch.stack([r[2] for r in rows]), h]), extrapolate, dmap, loop=j)
        lg = model.head(h)
        drafts = lg.argmax(-1).tolist() if params.greedy else probabilities(lg, params)
        for n, (i, _, _) in enumerate(rows):
            out[i][j] = drafts[n]
    return out
