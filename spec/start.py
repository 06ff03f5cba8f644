"""The start both speculative decoders share: prefill and the first token."""

from __future__ import annotations

import time

from looplm.decoding import DecodeRequest, Step, Timer, prefill
from looplm.model import LoopLM
from looplm.paged import bytes_per_position
from looplm.sampling import choose


def start_request(model: LoopLM, req: DecodeRequest):
    """Prefills the prompt (all T loops; a generator: `timer, first = yield from start_request(...)`)
    and chooses the first new token from those full-depth logits (exact: no draft is involved).

    Records req.stats exact_cache, kv_bytes_per_token and prefill_ms.
    Returns (timer started before the prefill, [first token]).
    """
    p = model.lm_head.weight
    req.stats["exact_cache"] = not req.shared_kv
    req.stats["kv_bytes_per_token"] = bytes_per_position(model.config, req.kv, p.dtype)
    timer = Timer(req.batch_size)
    t0 = time.perf_counter()
    out = yield prefill(req, p.device, gates=False)
    logits = out.logits[-1, :, 0]  # (1, V)
    req.stats["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    return timer, choose(logits, req.sampling, req.generator).tolist()


def first_step(row: int, token: int, loops: int, timer: Timer) -> Step:
    """The Step of a row's first token (chosen by full-depth logits, as after a rejection)."""
    return Step(row, 0, token, loops, loops, timer.lap(row), "verify", info={"draft": False, "accepted": 0, "proposed": 0})
