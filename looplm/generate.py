"""Full-depth generation: every token runs all T loops over the exact per-loop cache."""

from __future__ import annotations

import time

import torch

from .decoding import Decoder, DecodeRequest, Step, Timer, prefill
from .model import LoopLM
from .sampling import choose
from .work import FIXED_STEPS, Forward


STEPS = ("eager", *FIXED_STEPS)


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
    token = int(choose(out.logits[-1, :, 0], req.sampling, req.generator))
    yield Step(0, 0, token, T, T, timer.lap(0), "max_depth")
    yield from full_depth_tail(model, req, token, len(req.prompts[0]), 1, timer, step=fixed)


def full_depth_tail(model: LoopLM, req: DecodeRequest, token: int, pos: int, produced: int, timer: Timer, *,
                    step: str | None = None, reason: str = "max_depth", info: dict | None = None,
                    on_token=None) -> Decoder:
    """The rest of a one-sequence request at full depth, from its last emitted token `token` at
    position `pos` (not run yet; every position before it holds all T loops of K/V) after `produced`
    tokens: one Forward of T loops per token, then its Step (`reason`, a copy of `info`), until the
    request ends, or until `on_token(token)`, called after each Step with its token, returns True
    (a caller handing the request back to another decoder: spec.fallback). Used by decode_full
    after the prefill and by decoders that switch to full depth.
    """
    T = model.num_loops
    device = model.lm_head.weight.device
    while req.active(0, produced):
        out = yield Forward(torch.tensor([[token]], device=device), [[pos]], logits="last", step=step, gates=False)
        token = int(choose(out.logits[-1, :, 0], req.sampling, req.generator))
        yield Step(0, produced, token, T, T, timer.lap(0), reason, info=dict(info) if info else {})
        produced += 1
        pos += 1
        if on_token is not None and on_token(token):
            return
