"""Full-depth generation: every token runs all T loops over the exact per-loop cache."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .decoding import DecodeRequest, Step, Timer, prefill
from .model import LoopLM
from .sampling import choose


@torch.inference_mode()
def decode_full(model: LoopLM, req: DecodeRequest) -> Iterator[Step]:
    """The reference decoder: greedy or sampled, batch of ragged prompts, all T loops per token."""
    T, B = model.num_loops, req.batch_size
    cache = req.new_cache(model, req.cache_len())
    timer = Timer(B)
    t0 = time.perf_counter()
    logits = prefill(model, cache, req.prompts).logits[-1, :, 0]  # (B, V)
    req.stats["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    pos = cache.lengths.clone()  # next position per row
    limit = cache.max_len - 1
    produced = 0
    while True:
        tokens = choose(logits, req.sampling, req.generator)  # (B,)
        ids = tokens.tolist()
        for row in range(B):
            if req.active(row, produced):
                yield Step(row, produced, ids[row], T, T, timer.lap(row), "max_depth")
        produced += 1
        if not any(req.active(row, produced) for row in range(B)):
            return
        # rows that are finished keep computing (cheap, keeps shapes fixed) at a clamped position
        out = model.forward_loops(model.embed(tokens[:, None]), pos[:, None].clamp(max=limit), cache, logits="last")
        pos += 1
        logits = out.logits[-1, :, 0]
