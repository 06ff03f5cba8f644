"""Falling back to full depth when drafts stop paying, or when the engine is busy.

A speculative decoder whose drafts are mostly rejected computes more per token than full depth: at
acceptance 0 the bundled shapes' pipeline ran 0.6x full depth's tokens/s. `with_fallback` runs a
speculative decoder (one sequence) and watches the tokens it emits: once WINDOW tokens have been
emitted, whenever fewer than BAR of the last WINDOW were accepted drafts, it closes the
speculative decoder and decodes the rest of the request at full depth (one Forward of T loops per
token, as `looplm.generate.decode_full`), for good.

Exact, greedy or sampled: every token up to the switch is the speculative decoder's (lossless), and
the switch happens between two emitted tokens, where the cache holds every loop of every position
before the last emitted token (each emitted token's logits came from all T loops over them); full
depth then runs that last token's T loops and goes on. Which decoder produces a token depends only
on tokens already emitted, so each token's law given the past is the target's either way, and a
seeded request stays reproducible.

The inner decoder may be pipelined, in rounds, or draft trees (spec.trees): a tree's verdicts emit
"draft" for a winning candidate and "verify" otherwise, as the pipeline's do. Closing a tree leaves
its side lanes (and any drop or adoption it had decided) in the block pool; the first full-depth
Forward, a plain one, drops them before it runs (looplm.lanes.end_lanes), and the sequence's own
table is the one that holds every loop of the positions before the last emitted token.

A busy engine is the other reason (`load_above`): in a step shared by many requests a forward
call's fixed cost is spread over all their rows, so what speculation saves (calls) shrinks while
what it adds (the rows of drafts, rejected ones wasted) does not. On the bundled model on a 2-core
CPU, speculative requests ran 1.3-1.6x full depth with 1-3 at once, about even from 4 to 8
(0.8-1.4x between runs) and 0.55-0.78x at 16. So while more than `load_above` requests are in the
engine (req.load(): running and waiting), the request switches at its next emitted token, the
first (from the prefill) included, so a request that arrives at a busy engine never drafts.

Unlike the drafts' switch this one is undone: after every full-depth token the load is read again,
and once it is at most `load_above` a new speculative decoder (`restart`) takes over the rest of
the request. It needs no second prefill: it starts on a request whose prompt is the sequence so
far, and its prefill Forward is replaced by the last emitted token's T loops at its own position,
the one Forward full depth would have run next (every earlier position already holds all T
loops); its first token comes from those logits, as after any prefill. Its statistics are added to
the request's (`merge_stats`), and stats["load_spans"] lists the [first, end) token indices
decoded at full depth for load.

The load depends on what runs beside the request, so a seeded sampled request never switches for
it: its samples must equal those of the same request run alone. A greedy one's tokens are full
depth's either way, and an unseeded one's law is the target's given the past whichever decoder
runs (the load never looks at the draws).

The break-even acceptance on the bundled model is about 0.4 (pipelined k=2 ran 0.6x full depth at
acceptance 0 and 1.5x at 0.9); BAR = 0.25 falls back only where speculation clearly loses, and a
12-token window costs a model whose drafts never pass about 7% of a 128-token request.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from itertools import zip_longest

import torch

from looplm.decoding import Decoder, DecodeRequest, Step, Timer
from looplm.generate import full_depth_tail
from looplm.model import LoopLM
from looplm.work import Forward

WINDOW = 12  # emitted tokens the decision looks back over
BAR = 0.25  # fall back when fewer than this share of them were accepted drafts


def with_fallback(model: LoopLM, req: DecodeRequest, inner: Decoder, window: int = WINDOW, bar: float = BAR, *,
                  drafts: bool = True, load_above: int | None = None,
                  restart: Callable[[DecodeRequest], Decoder] | None = None) -> Decoder:
    """Runs the speculative decoder `inner` of a one-sequence request, switching to full depth for
    the rest of the request when its drafts stop paying (`drafts`), and while more than
    `load_above` requests are in the engine, after which `restart(sub_request)` speculates again
    (without `restart`, a load switch is for good too; see the module docstring).

    Yields what the speculative decoders yield (their Steps indexed within the whole request) and
    Steps with reason "verify" (full-depth tokens) with their Forwards. Stats (req.stats):
    fallback_at, the number of tokens emitted at the first switch (None: none), and
    fallback_reason, "drafts" or "load"; load_spans; after a switch loops_per_token counts every
    part, and the speculative counts add up over the speculative parts.
    """
    T = model.num_loops
    device = model.lm_head.weight.device
    plen = len(req.prompts[0])
    tokens: list[int] = []  # emitted so far
    computed = 0  # (token, loop) pairs of every Forward after the prefill
    spans: list[list[int]] = []
    parts: list[tuple[int, dict]] = []  # (tokens emitted at its start, stats) of each restarted speculative part
    req.stats.update(fallback_at=None, fallback_reason=None, load_spans=spans)
    watch_load = load_above is not None and (req.sampling.greedy or not req.seeded)  # req.load: set when submitted

    def busy() -> bool:
        return watch_load and req.load is not None and req.load() > load_above

    def last_token() -> Forward:
        """The last emitted token's T loops at its position (every earlier position holds all of them)."""
        return Forward(torch.tensor([[tokens[-1]]], device=device), [[plen + len(tokens) - 1]], logits="last", gates=False)

    start, first, value = 0, True, None  # start: tokens emitted when the running speculative part began
    try:
        while True:
            last: deque[bool] = deque(maxlen=window)  # was each of the part's last emitted tokens an accepted draft
            reason, fresh = None, start > 0  # fresh: a restarted part's next Forward is its prefill
            while reason is None:
                try:
                    item = inner.send(value)
                except StopIteration:
                    return
                value = None
                if isinstance(item, Step):
                    if start:
                        item = dataclasses.replace(item, index=item.index + start)
                    tokens.append(item.token)
                    if item.index > start:  # a part's first token comes from full-depth logits, not a draft
                        last.append(item.reason == "draft")
                    yield item
                    if not req.active(0, len(tokens)):
                        continue  # the inner decoder ends the request itself
                    if drafts and len(last) == window and sum(last) < bar * window:
                        reason = "drafts"
                    elif busy():
                        reason = "load"
                else:
                    if fresh:
                        item, fresh = last_token(), False
                    if first:
                        first = False  # the request's prefill
                    else:
                        computed += item.inputs.shape[0] * item.inputs.shape[1] * (
                            item.num_loops if item.num_loops is not None else T - _min_start(item))
                    value = yield item
            inner.close()
            if req.stats["fallback_at"] is None:
                req.stats.update(fallback_at=len(tokens), fallback_reason=reason)
            if reason == "load":
                spans.append([len(tokens), len(tokens)])

            def full_depth_token(token: int) -> bool:
                """Counts a full-depth token; True hands the rest back to a new speculative decoder."""
                nonlocal computed
                tokens.append(token)
                computed += T  # its Forward: one position through T loops
                if reason != "load":
                    return False
                spans[-1][1] = len(tokens)
                return restart is not None and req.active(0, len(tokens)) and not busy()

            yield from full_depth_tail(model, req, tokens[-1], plen + len(tokens) - 1, len(tokens), Timer(1), reason="verify",
                                       info={"draft": False, "accepted": 0, "proposed": 0}, on_token=full_depth_token)
            if not req.active(0, len(tokens)):
                return
            start = len(tokens)  # the load fell: speculate again on the rest of the request
            sub = dataclasses.replace(req, prompts=[req.prompts[0] + tokens], max_new=[req.max_new[0] - start], stats={})
            parts.append((start, sub.stats))
            inner = restart(sub)
    finally:  # also when the consumer stops early: the running part writes its statistics, then they add up
        inner.close()
        merge_stats(req.stats, parts)
        if req.stats["fallback_at"] is not None:
            req.stats["loops_per_token"] = computed / max(len(tokens), 1)


SUMMED = ("drafted", "accepted", "rejected", "rounds", "forks", "seconds", "seconds_tested", "seconds_accepted", "pairs_emitted")
"""Speculative counts that add up over the parts of a request (spec.pipeline, spec.multi, spec.trees, rounds)."""
ELEMENTWISE = ("accepted_len_hist", "tested_by_depth", "won_by_rank")


def merge_stats(stats: dict, parts: list[tuple[int, dict]]) -> None:
    """Adds the statistics of restarted speculative parts (each with the tokens emitted when it
    began) to the request's `stats` (the first part's): counts and histograms add up, the ratios
    are computed again from the sums, draft trees' rows per forward and acceptance by depth are
    weighted by forwards and tested positions, the adaptive draft loop's switches are placed in
    the whole request, and its loop acceptance (one chooser for every part) is the latest."""
    for begin, p in parts:
        if "rows_per_forward" in p:  # weighted by forwards, before the rounds add up
            rows = stats["rows_per_forward"] * stats["rounds"] + p["rows_per_forward"] * p["rounds"]
            stats["rows_per_forward"] = rows / max(stats["rounds"] + p["rounds"], 1)
            stats["max_rows"] = max(stats["max_rows"], p["max_rows"])
            won = [(a or 0) * t + (b or 0) * u for a, t, b, u in
                   zip_longest(stats["acceptance_by_depth"], stats["tested_by_depth"], p["acceptance_by_depth"],
                               p["tested_by_depth"], fillvalue=0)]
            tested = [t + u for t, u in zip_longest(stats["tested_by_depth"], p["tested_by_depth"], fillvalue=0)]
            stats["acceptance_by_depth"] = [w / t if t else None for w, t in zip(won, tested)]
        for key in SUMMED:
            if key in p:
                stats[key] = stats.get(key, 0) + p[key]
        for key in ELEMENTWISE:
            if key in p:
                stats[key] = [a + b for a, b in zip_longest(stats.get(key, []), p[key], fillvalue=0)]
        if "loop_switches" in p:  # a part that resumes at the loop drafting last ran at changes nothing
            resumed = p["loop_switches"][p["loop_switches"][0][1] == stats["loop_switches"][-1][1]:]
            stats["loop_switches"] = stats["loop_switches"] + [[at + begin, k] for at, k in resumed]
            stats["loop_acceptance"] = p["loop_acceptance"]
    if parts:
        acc, drafted = stats.get("accepted", 0), stats.get("drafted", 0)
        stats["acceptance_rate"] = acc / max(drafted, 1)
        stats["token_acceptance"] = acc / max(acc + stats.get("rejected", 0), 1)
        stats["mean_accepted_len"] = acc / max(sum(stats.get("accepted_len_hist", [])), 1)


def _min_start(fwd: Forward) -> int:
    s = fwd.start_loop
    return int(s.min()) if isinstance(s, torch.Tensor) else int(s)
