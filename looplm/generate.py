"""Full-depth generation: every token runs all T loops over the exact per-loop cache."""

from __future__ import annotations

import time

import torch

from .decoding import Decoder, DecodeRequest, Step, Timer, prefill
from .model import LoopLM
from .sampling import choose
from .work import Forward


STEPS = ("eager", "fixed", "compiled")


def decode_full(model: LoopLM, req: DecodeRequest, step: str | None = None) -> Decoder:
    """The reference decoder: greedy or sampled, all T loops per token, one Forward per token.

    Its options arrive checked (looplm.options.FullOptions, when the engine submits the request).

    Args:
        step: how each decode step runs. None or "eager": the runner's plan over the paged cache.
            "fixed": the runner's fixed-shape step (rows and keys padded to buckets, masked by
            position); "compiled": the same step compiled once per (rows, context) bucket by the
            engine's runner and reused by later steps and requests (kernels.fast_step.FixedStep;
            the first step of a bucket pays the compilation, seconds on a CPU).
    Yields the prefill Forward, then per token a Step and the Forward of that token's T loops.
    Stats: prefill_ms, step.
    """
    req.stats["step"] = step or "eager"
    fixed = None if step == "eager" else step
    T = model.num_loops
    device = model.lm_head.weight.device
    timer = Timer(1)
    t0 = time.perf_counter()
    out = yield prefill(req, device, gates=False)
    req.stats["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    logits = out.logits[-1, :, 0]  # (1, V)
    pos = len(req.prompts[0])  # position of the next token
    produced = 0
    while True:
        token = choose(logits, req.sampling, req.generator)  # (1,)
        yield Step(0, produced, int(token), T, T, timer.lap(0), "max_depth")
        produced += 1
        if not req.active(0, produced):
            return
        out = yield Forward(token[:, None], [[pos]], logits="last", step=fixed, gates=False)
        logits = out.logits[-1, :, 0]
        pos += 1
