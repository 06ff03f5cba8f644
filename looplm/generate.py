"""Full-depth generation: every token runs all T loops over the exact per-loop cache."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from .decoding import DecodeRequest, Step, Timer, prefill
from .model import LoopLM
from .sampling import choose

STEPS = ("eager", "fixed", "compiled")


@torch.inference_mode()
def decode_full(model: LoopLM, req: DecodeRequest, step: str | Callable | None = None) -> Iterator[Step]:
    """The reference decoder: greedy or sampled, batch of ragged prompts, all T loops per token.

    Args:
        step: how each decode step runs. None or "eager": `forward_loops` over the cache prefix.
            "compiled": a fixed-shape step compiled once per (model, batch, cache bucket, KV mode)
            and reused by later requests (kernels.fast_step.pooled_step; the first request pays
            the compilation, seconds on a CPU); "fixed": the same fixed-shape step uncompiled.
            Or a `kernels.fast_step.DecodeStep` (anything with `.cache` and `(tokens, pos) ->
            logits`): its cache is used, so it must hold this batch.
    """
    T, B = model.num_loops, req.batch_size
    fn = None
    if step is None or step == "eager":
        cache = req.new_cache(model, req.cache_len())
    elif isinstance(step, str):
        if step not in STEPS:
            raise ValueError(f"step must be one of {STEPS} or a DecodeStep, got {step!r}")
        from kernels.fast_step import pooled_step  # kernels builds on looplm: imported only when asked for

        fn = pooled_step(model, req, compile=step == "compiled")
        cache = fn.cache
    else:
        fn, cache = step, step.cache
        if cache.batch_size != B or cache.max_len < req.cache_len():
            raise ValueError(f"the step's cache holds {cache.batch_size} rows x {cache.max_len} positions; "
                             f"this request needs {B} x {req.cache_len()}")
    req.stats["step"] = step if isinstance(step, str) else ("eager" if step is None else type(step).__name__)
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
        if fn is not None:  # a fixed-shape step: finished rows keep computing at a clamped position
            logits = fn(tokens, pos.clamp(max=limit))
        elif all(req.active(row, produced) for row in range(B)):
            out = model.forward_loops(model.embed(tokens[:, None]), pos[:, None], cache, logits="last")
            logits = out.logits[-1, :, 0]
        else:  # only the rows still generating; the others keep their last logits (same sampling draws)
            rows = torch.tensor([r for r in range(B) if req.active(r, produced)], device=pos.device)
            out = model.forward_loops(model.embed(tokens[rows, None]), pos[rows, None], cache, batch_idx=rows, logits="last")
            logits = logits.index_copy(0, rows, out.logits[-1, :, 0])
        pos += 1
