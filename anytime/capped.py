"""Anytime decoding when only a loop cap ends a token: every token runs its capped loops in one Forward.

With no exit policy, no time budget and no per-loop trace, nothing can stop a token before its cap
k, so there is nothing to decide between loops: the general decoder (anytime.decoder) would run one
loop at a time and ask, per loop, a question whose answer is known. This policy asks the engine for
the k loops at once, from the token id (the runner embeds every request's ids in one call), exactly
as full depth does with T loops. Same tokens, Steps and statistics as the general decoder; the
loop-cost model, which only a time budget reads, is not fed.

Skipped loops: "copy" fills slots (t >= k) of the token's position from loop k-1's K/V before the
next Forward; "shared" needs nothing (one slot per layer); "exact" with finish="lazy" never runs
them (no later token of a capped request reaches loop k). "exact" with finish="eager" finishes
them alongside later tokens: a token's loops [k, T) run up to k at a time in the Forwards of the
next tokens, each at its own start loop and with its own count (a Forward's per-position
num_loops: with k = 3 of T = 4, the new token runs loops 1-3 while the one before runs loop 4 in the
same Forward), which is what the general decoder does one loop per Forward. A newer token at loop
t < k reads an older one's loop-t K/V, written k loops earlier. Tokens never read loops >= k, so
only the cache and the loop counts show the difference between skip modes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from looplm.decoding import Decoder, DecodeRequest, Step, prefill
from looplm.model import LoopLM
from looplm.sampling import choose
from looplm.work import Forward


def decode_capped(model: LoopLM, req: DecodeRequest, cap: int, skip: str, eager: bool, log: dict, counts: dict,
                  clock: Callable[[], float]) -> Decoder:
    """One row, every token exits at loop `cap` (1-based; T = full depth); `eager`: skip="exact" with
    finish="eager".

    Fills `log` (exit_loops, reasons, latency_ms, budget_ms) and `counts` (decode_loops,
    copied_slots) for anytime.decoder's statistics.
    """
    T = model.num_loops
    layers = model.config.num_hidden_layers
    reason = "max_depth" if cap >= T else "budget"
    t_start = clock()
    out = yield prefill(req, device=model.lm_head.weight.device, logits_loops="all", gates=False)
    logits = out.logits[cap - 1, :, 0]  # (1, V): the last prompt position after loop `cap`
    now = clock()
    req.stats["prefill_ms"] = (now - t_start) * 1e3
    token = choose(logits, req.sampling, req.generator)  # (1,)
    log["exit_loops"].append(cap)
    log["reasons"].append(reason)
    yield Step(0, 0, int(token), T, cap, (now - t_start) * 1e3, reason, info={})
    produced, pos, start = 1, len(req.prompts[0]), now
    copies: list[tuple[int, int]] = []
    finish = eager and cap < T
    flight: list[list] = []  # [position, next loop, state] of earlier tokens whose skipped loops still run
    while req.active(0, produced):
        if flight:  # earlier tokens' next k loops first, the new token last (its logits are the row's last)
            states = torch.stack([x[2] for x in flight] + [model.embed(token[:, None])[0, 0]])[None]
            start_loops = torch.tensor([[x[1] for x in flight] + [0]], device=states.device)
            runs = [min(cap, T - x[1]) for x in flight]  # the new token's cap loops, at most as many for the others
            loops = cap if all(n == cap for n in runs) else torch.tensor([runs + [cap]], device=states.device)
            res = yield Forward(states, [[x[0] for x in flight] + [pos]], start_loop=start_loops, num_loops=loops, logits="last", gates=False)
            for j, x in enumerate(flight):  # hidden[-1]: each position's state after its own last loop
                x[1], x[2] = x[1] + runs[j], res.hidden[-1, 0, j]
            counts["finish_loops"] += sum(runs)
            counts["decode_loops"] += sum(runs)
            flight = [x for x in flight if x[1] < T]
        else:
            res = yield Forward(token[:, None], [[pos]], num_loops=cap, logits="last", copy_slots=copies, gates=False)
        counts["decode_loops"] += cap
        if finish:
            flight.append([pos, cap, res.hidden[-1, 0, -1]])
        token = choose(res.logits[-1, :, 0], req.sampling, req.generator)
        now = clock()
        latency = (now - start) * 1e3
        copies = []
        if skip == "copy" and cap < T:  # slots (t, l), t >= cap, of this position take loop cap-1's K/V
            copies = [(pos, cap - 1)]
            counts["copied_slots"] += (T - cap) * layers
        for key, value in (("exit_loops", cap), ("reasons", reason), ("latency_ms", latency), ("budget_ms", math.inf)):
            log[key].append(value)
        yield Step(0, produced, int(token), cap, cap, latency, reason, info={})
        produced, pos, start = produced + 1, pos + 1, now
