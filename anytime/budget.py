"""Latency budgets and the online per-loop cost model that predicts whether one more loop fits."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How long a token may take. Any combination; the tightest applies. All None = unbounded.

    per_token_ms: wall time allowed per token, measured from the row's previous token.
    deadline_ms: wall time for the whole request (from the decoder's start, prefill included),
        spread evenly over the row's remaining tokens: token budget = time left / tokens left.
    loops: at most this many loops per token (1..T): emit from loop `loops`' head.
    """

    per_token_ms: float | None = None
    deadline_ms: float | None = None
    loops: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_token_ms", "deadline_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be a positive number of milliseconds, got {v!r}")
        if self.loops is not None and (not isinstance(self.loops, int) or isinstance(self.loops, bool) or self.loops < 1):
            raise ValueError(f"budget loops must be an integer >= 1, got {self.loops!r}")

    @property
    def timed(self) -> bool:
        return self.per_token_ms is not None or self.deadline_ms is not None

    def token_ms(self, elapsed_request_ms: float, tokens_left: int) -> float:
        """This token's time budget (inf when untimed), given the request's elapsed time and the row's tokens left (>= 1)."""
        out = math.inf
        if self.per_token_ms is not None:
            out = self.per_token_ms
        if self.deadline_ms is not None:
            out = min(out, max(self.deadline_ms - elapsed_request_ms, 0.0) / max(tokens_left, 1))
        return out


def make_budget(budget=None, *, budget_ms=None, deadline_ms=None, budget_loops=None) -> Budget | None:
    """Budget object from `budget` (a Budget or None) or the shorthands (budget_ms per token, deadline_ms, budget_loops)."""
    short = budget_ms is not None or deadline_ms is not None or budget_loops is not None
    if budget is not None and short:
        raise ValueError("pass either budget=Budget(...) or the budget_ms/deadline_ms/budget_loops shorthands, not both")
    if budget is not None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be an anytime.Budget or None, got {type(budget).__name__}")
        return budget
    if not short:
        return None
    return Budget(per_token_ms=budget_ms, deadline_ms=deadline_ms, loops=budget_loops)


class LoopCost:
    """Online cost of one decode iteration (one loop for every running row), in milliseconds.

    Keyed by (rows in the forward, positions per row, context-length bucket = kv_len.bit_length());
    each key keeps an exponential moving average of the measured iteration period (the forward,
    the head, the policy and the bookkeeping, from one decision point to the next). An unseen key
    falls back to the most recent measurement of any key, and to 0 (optimistic) before the first.
    """

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.ema: dict[tuple[int, int, int], float] = {}
        self.last_ms = 0.0

    @staticmethod
    def key(rows: int, width: int, kv_len: int) -> tuple[int, int, int]:
        return (rows, width, int(kv_len).bit_length())

    def update(self, key, ms: float) -> None:
        old = self.ema.get(key)
        self.ema[key] = ms if old is None else old + self.alpha * (ms - old)
        self.last_ms = ms

    def predict(self, key) -> float:
        return self.ema.get(key, self.last_ms)
