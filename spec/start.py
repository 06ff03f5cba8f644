"""The start both speculative decoders share: cache, prefill, and each row's first token."""

from __future__ import annotations

import time

from looplm.cache import LoopKVCache
from looplm.decoding import DecodeRequest, Step, Timer, prefill
from looplm.model import LoopLM
from looplm.sampling import choose


def start_request(model: LoopLM, req: DecodeRequest) -> tuple[LoopKVCache, Timer, list[int]]:
    """Allocates the request's cache, prefills every prompt (all T loops) and chooses each row's
    first new token from those full-depth logits (exact: no draft is involved).

    Records req.stats exact_cache, kv_bytes_per_token and prefill_ms.
    Returns (cache, per-row timer started before the prefill, first token per row).
    """
    cache = req.new_cache(model, req.cache_len())
    req.stats["exact_cache"] = not getattr(cache, "shared", False)
    req.stats["kv_bytes_per_token"] = cache.bytes_per_token()
    timer = Timer(req.batch_size)
    t0 = time.perf_counter()
    logits = prefill(model, cache, req.prompts).logits[-1, :, 0]  # (B, V)
    req.stats["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    return cache, timer, choose(logits, req.sampling, req.generator).tolist()


def first_step(row: int, token: int, loops: int, timer: Timer) -> Step:
    """The Step of a row's first token (chosen by full-depth logits, as after a rejection)."""
    return Step(row, 0, token, loops, loops, timer.lap(row), "verify", info={"draft": False, "accepted": 0, "proposed": 0})
