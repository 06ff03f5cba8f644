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
CPU, speculative requests ran 1.3-1.6x full depth with 1-3 at once, about even from 4 to 8 (0.8-1.4x
between runs) and 0.55-0.78x at 16. So while more than `load_above` requests are in the engine (req.load(): running and waiting),
the request switches at its next emitted token, the first (from the prefill) included, so a request
that arrives at a busy engine never drafts. The switch is the same one, for good. The load does
depend on what runs beside the request, so a seeded sampled request never switches for it: its
samples must equal those of the same request run alone. A greedy one's tokens are full depth's
either way, and an unseeded one's law is the target's given the past whichever decoder runs.

The break-even acceptance on the bundled model is about 0.4 (pipelined k=2 ran 0.6x full depth at
acceptance 0 and 1.5x at 0.9); BAR = 0.25 falls back only where speculation clearly loses, and a
12-token window costs a model whose drafts never pass about 7% of a 128-token request.
"""

from __future__ import annotations

from collections import deque

import torch

from looplm.decoding import Decoder, DecodeRequest, Step, Timer
from looplm.generate import full_depth_tail
from looplm.model import LoopLM
from looplm.work import Forward

WINDOW = 12  # emitted tokens the decision looks back over
BAR = 0.25  # fall back when fewer than this share of them were accepted drafts


def with_fallback(model: LoopLM, req: DecodeRequest, inner: Decoder, window: int = WINDOW, bar: float = BAR, *,
                  drafts: bool = True, load_above: int | None = None) -> Decoder:
    """Runs the speculative decoder `inner` of a one-sequence request, switching to full depth for
    the rest of the request when its drafts stop paying (`drafts`) or when more than `load_above`
    requests are in the engine (see the module docstring).

    Yields what `inner` yields, then Steps with reason "verify" (a full-depth token) and their
    Forwards. Stats (req.stats): fallback_at, the number of tokens emitted when the switch
    happened (None: it never did), and fallback_reason, "drafts" or "load" (None); after a switch
    loops_per_token counts both parts.
    """
    T = model.num_loops
    last: deque[bool] = deque(maxlen=window)  # was each of the last emitted tokens an accepted draft
    emitted, computed, token, value = 0, 0, None, None
    first_forward = True
    req.stats.update(fallback_at=None, fallback_reason=None)
    watch_load = load_above is not None and (req.sampling.greedy or not req.seeded)  # req.load: set when submitted
    reason = None
    while True:
        try:
            item = inner.send(value)
        except StopIteration:
            return
        if isinstance(item, Step):
            emitted += 1
            token = item.token
            if item.index > 0:  # the first token comes from the prefill, not a draft
                last.append(item.reason == "draft")
            value = None
            yield item
            if not req.active(0, emitted):
                continue  # the inner decoder ends the request itself
            if drafts and len(last) == window and sum(last) < bar * window:
                reason = "drafts"
            elif watch_load and req.load is not None and req.load() > load_above:
                reason = "load"
            if reason is not None:
                break
        else:
            if not first_forward:
                computed += item.inputs.shape[0] * item.inputs.shape[1] * (item.num_loops if item.num_loops is not None else T - _min_start(item))
            first_forward = False
            value = yield item
    inner.close()
    req.stats.update(fallback_at=emitted, fallback_reason=reason)
    pos = len(req.prompts[0]) + emitted - 1  # the last emitted token's position: its loops are not computed yet
    switched = emitted

    def count(produced: int) -> None:  # every token after the switch ran T loops
        req.stats["loops_per_token"] = (computed + T * (produced - switched)) / produced

    yield from full_depth_tail(model, req, token, pos, emitted, Timer(1), reason="verify",
                               info={"draft": False, "accepted": 0, "proposed": 0}, on_token=count)


def _min_start(fwd: Forward) -> int:
    s = fwd.start_loop
    return int(s.min()) if isinstance(s, torch.Tensor) else int(s)
