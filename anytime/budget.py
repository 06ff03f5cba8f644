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
    each key keeps an exponential moving average of the measured loop period (the forward, the
    policy and the bookkeeping, from the end of one iteration to the next decision) and of its
    absolute deviation. The prediction is mean + `safety` * deviation, so jittery timings (a shared
    machine) make the decoder more careful; with steady timings it is the mean. An unseen key falls
    back to the most recent measurement of any key, and to 0 (optimistic) before the first.
    `emit` tracks, the same way, the time from a decision to the token's emission (the LM head at
    the exit loop and the token choice), which a token pays once whichever loop it leaves at.
    """

    def __init__(self, alpha: float = 0.3, safety: float = 1.0):
        self.alpha, self.safety = alpha, safety
        self.ema: dict[tuple[int, int, int], float] = {}
        self.dev: dict[tuple[int, int, int], float] = {}
        self.last_ms = 0.0
        self.emit_ms = self.emit_dev = 0.0
        self._emit_seen = False

    @staticmethod
    def key(rows: int, width: int, kv_len: int) -> tuple[int, int, int]:
        return (rows, width, int(kv_len).bit_length())

    def _step(self, old: float, ms: float) -> float:
        return old + self.alpha * (ms - old)  # exact when ms == old

    def update(self, key, ms: float) -> None:
        old = self.ema.get(key)
        if old is None:
            self.ema[key], self.dev[key] = ms, 0.0
        else:
            self.dev[key] = self._step(self.dev[key], abs(ms - old))
            self.ema[key] = self._step(old, ms)
        self.last_ms = ms

    def update_emit(self, ms: float) -> None:
        if not self._emit_seen:
            self.emit_ms, self._emit_seen = ms, True
        else:
            self.emit_dev = self._step(self.emit_dev, abs(ms - self.emit_ms))
            self.emit_ms = self._step(self.emit_ms, ms)

    def predict(self, key) -> float:
        """Predicted milliseconds of one more loop (without the emission).

        An unseen key borrows the nearest measured width with the same rows and context bucket,
        scaled up in proportion when it is narrower (conservative: cost grows sublinearly in width).
        """
        if key in self.ema:
            return self.ema[key] + self.safety * self.dev[key]
        rows, width, bucket = key
        near = [k for k in self.ema if k[0] == rows and k[2] == bucket]
        if not near:
            return self.last_ms
        k = min(near, key=lambda k: (abs(k[1] - width), -k[1]))
        return (self.ema[k] + self.safety * self.dev[k]) * max(1.0, width / k[1])

    def predict_emit(self) -> float:
        return self.emit_ms + self.safety * self.emit_dev
