"""Two drafted tokens per pipeline stage: a draft map's second-token head lets one forward finish two tokens.

spec.pipeline finishes at most one token per call of k loops: the token leaving loop k drafts one
successor, so drafting at loop k saves at most a factor T/k of weight passes. Here the token n
leaving loop k drafts token n+1 with the draft map (as the pipeline does) and token n+2 with the
map's second-token head (spec.drafts.DraftMap.next_state, fitted by `python -m spec.fit_draft
--next`; a head fitted with `--next-token` also reads the embedding of the token just drafted for
n+1, so it runs once that token is chosen) when that head is confident (top-1 probability >=
`threshold`). Both drafts enter
loop 1 together as a pair of rows at the same loops of the same Forward (positions of one
sequence run together at one loop see each other causally, looplm.work.Forward) and advance
together:

    call c:   pair (n+3, n+4) at loops 1..k  |  ...  |  pair (n+1, n+2) at loops T-k+1..T

When a pair leaves loop T, the first token's exact logits test the second; if it passes, the
second token's logits (now exact: its prefix is verified) test the next token in flight. One call
can so emit two tokens, and weight passes per token fall towards k/2 when both drafts pass.

A tested draft passes as in the pipeline (greedy: equal argmax; sampling: the Leviathan/Chen rule
of spec.accept with the distribution it was drawn from, q1 for a first draft and q2 for a second).
A rejection voids every token behind it (their cache slots are overwritten before they are read
again) and the pipeline refills from the target's token. Exactness is the pipeline's: each emitted
token's logits come from all T loops over the K/V of its verified prefix.

With a threshold no second draft reaches, the decoder makes the pipeline's decisions and, when
sampling, the pipeline's draws from the request's generator (verdict first, then the draft of the
token leaving loop k, then the second draft, all before the call's Steps are yielded).

With draft_loop="adaptive" (spec.adapt) the loop moves as in spec.pipeline: every token's states
at the candidate loops are headed as shadow drafts and scored when its successor is verified, and
the loop changes where one token that has run no loop is in flight (so a pair never straddles two
loops). Pairs are drafted at the loops whose draft map has a second-token head, first drafts alone
at the others. Loop k's own score comes from the tokens that draft at it (not a pair's first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from looplm.decoding import Decoder, DecodeRequest, Step
from looplm.model import LoopLM
from looplm.sampling import SamplingParams, probabilities, sample
from looplm.work import Forward

from .accept import accept_sampled, pass_chance
from .adapt import LoopChooser, shadow_drafts
from .drafts import DraftMap, draft_state
from .pipeline import call_inputs, count_run, pipeline_stats
from .seconds import SecondChooser
from .start import first_step, start_request


@dataclass
class _Token:
    """A token in flight: its index among the new tokens, the stages it has run, its state."""

    index: int
    token: int
    stage: int
    second: bool = False  # drafted by the second-token head
    hidden: torch.Tensor | None = None  # (H,) state after loop stage*k (None before stage 0)
    q: torch.Tensor | None = None  # (V,) the distribution it was drawn from (sampling only)
    slot: int = -1  # its row in the current forward call
    shadow: tuple | None = None  # a first draft's (confidence, second draft or q2) beside it, for SecondChooser
    loop_shadow: dict = field(default_factory=dict)  # draft_loop="adaptive": loop j -> its draft of the successor (spec.adapt)


def second_draft(model: LoopLM, draft_map: DraftMap, per_loop: torch.Tensor, k: int, first_tok: int,
                 params: SamplingParams, gen: torch.Generator, threshold: float | str | None,
                 chooser: SecondChooser | None, lg2: torch.Tensor | None = None,
                 top: int | None = None) -> tuple[int | None, torch.Tensor | None, tuple | None]:
    """The second draft (token n+2) of token n, whose states at loops 1..k are `per_loop` (k, 1, H),
    after its first draft `first_tok` (read by a conditioned head), where `threshold` (or the
    spec.seconds `chooser`, for "adaptive") wants one. Shared by spec.multi and spec.trees.

    Args:
        lg2: (1, V) the second-token head's logits, when the caller computed them with its other
            rows (an unconditioned head); top: their argmax, when already on the host (greedy).
    Returns:
        (the second draft, or None where it is not made; q2 when sampling, else None; the shadow
        (confidence, second draft or q2) for the chooser, else None). A sampled second draft is
        drawn from the request's generator only when it is made.
    """
    if lg2 is None:
        e = model.model.embed_tokens(torch.tensor([first_tok], device=per_loop.device)) if draft_map.next_conditioned(k) else None
        lg2 = model.head(draft_map.next_state(per_loop, k, e))  # (1, V)
    q2 = None
    if params.greedy:
        tok = int(lg2[0].argmax()) if top is None else top
        sure = torch.softmax(lg2[0], -1).amax().item() if threshold is not None else None
    else:
        q2 = probabilities(lg2, params)[0]
        sure = q2.amax().item()
    made = chooser.wants(sure) if chooser is not None else threshold is None or sure >= threshold
    if made and not params.greedy:
        tok = int(sample(q2[None], gen)[0])
    shadow = (sure, tok if params.greedy else q2) if chooser is not None else None
    return (tok if made else None), q2, shadow


def decode_pairs(model: LoopLM, req: DecodeRequest, k: int, draft_map: DraftMap | None,
                 threshold: float | str | None = None, chooser: SecondChooser | None = None,
                 loops: LoopChooser | None = None,
                 drafters: dict[int, tuple[float, DraftMap | None]] | None = None) -> Decoder:
    """Pipelined self-speculation with second-token drafts (see the module docstring).

    Args:
        model, req: as spec.decode; one sequence.
        k: the draft loop; it divides T and `draft_map` has a map with a second-token head for it.
        draft_map: the checked spec.drafts.DraftMap (model dtype and device), with a second-token
            head for loop k (spec.decode checks it at submit).
        threshold: draft the second token only where the second-token head's top-1 probability
            (greedy: softmax of its logits; sampling: its distribution q2 after temperature, top-k
            and top-p) is at least this; None: always; "adaptive": where second drafts at that
            confidence have passed often enough in this request to pay (spec.seconds).
        chooser: with "adaptive", the request's spec.seconds.SecondChooser (a new one when None;
            spec.decode passes one that outlives a switch to full depth and back).
        loops, drafters: draft_loop="adaptive" (spec.adapt): the request's LoopChooser, with k the
            loop drafting starts at, and each candidate loop's (extrapolate, draft map). The loop
            moves as in spec.pipeline.decode_pipelined (where one token that has run no loop is in
            flight, draining first when that pays); at a loop whose map has a second-token head
            the decoder drafts pairs, at the others first drafts only. `draft_map` is then unused.
    Yields:
        Forwards and Steps as spec.pipeline.decode_pipelined.
    Stats (req.stats): spec.pipeline's keys (drafted counts second drafts too), plus draft_tokens = 2,
        second_threshold, seconds (second drafts proposed), seconds_tested, seconds_accepted, and
        pairs_emitted (calls that emitted two tokens); with `loops` also loop_switches and
        loop_acceptance as spec.pipeline.decode_pipelined.
    """
    T = model.num_loops
    if loops is not None:
        k = loops.resume(k)
    D = T // k
    drafters = drafters if drafters is not None else {k: (0.0, draft_map)}
    switches = [[0, k]]  # draft_loop="adaptive": [tokens emitted, the draft loop from then on]
    draining = False  # stop drafting, to change the draft loop once the pipeline is empty
    params, gen = req.sampling, req.generator
    timer, first = yield from start_request(model, req)
    device = model.lm_head.weight.device
    embed = model.model.embed_tokens  # drafted ids come from the head, so they need no range check
    chooser = (chooser if chooser is not None else SecondChooser(D)) if threshold == "adaptive" else None
    if chooser is not None:
        chooser.stages = D  # a resumed request may start at another loop than the chooser was made for
    plen, max_new = len(req.prompts[0]), req.max_new[0]
    flight: list[_Token] = []  # oldest first
    produced = emitted = computed = calls = 0
    n_acc = n_rej = n_prop = run = 0
    seconds = seconds_tested = seconds_won = pairs = 0
    hist = [0] * (D + 1)

    def close_run() -> None:
        nonlocal run
        count_run(hist, run)
        run = 0

    def stats() -> None:
        req.stats.update(pipeline_stats(k, D, drafters[k][0], n_prop, n_acc, n_rej, hist, calls, computed, emitted),
                         draft_tokens=2, second_threshold=threshold, seconds=seconds, seconds_tested=seconds_tested,
                         seconds_accepted=seconds_won, pairs_emitted=pairs)
        if loops is not None:
            req.stats.update(loop_switches=[list(x) for x in switches], loop_acceptance=loops.acceptance())

    stats()  # complete from the start: spec.fallback may close the decoder at its first Step
    if req.active(0, 0):
        yield first_step(0, first[0], T, timer)
        produced = emitted = 1
        if req.active(0, 1):
            flight.append(_Token(0, first[0], 0))
    try:
        while flight:
            if loops is not None and len(flight) == 1 and flight[0].stage == 0:  # an exact switch point
                draining = False
                j = loops.best(k)
                if j != k:
                    k, D = j, T // j
                    loops.current = k
                    switches.append([emitted, k])
                    if chooser is not None:
                        chooser.stages = D
            extrapolate, dmap = drafters[k]
            two = dmap is not None and dmap.has_next(k)  # second drafts at this loop
            conditioned = two and dmap.next_conditioned(k)  # its second-token head reads the first draft's token
            # rows by stage (newest first), a pair's two tokens adjacent in position order: one group per loop
            items = sorted(flight, key=lambda t: (t.stage, t.index))
            for i, t in enumerate(items):
                t.slot = i
            stage_t = torch.tensor([t.stage for t in items], device=device)[:, None]
            pos = torch.tensor([plen + t.index for t in items], device=device)[:, None]
            h = call_inputs(embed, items, device)
            out = yield Forward(h[:, None], pos, start_loop=stage_t * k, num_loops=k, gates=False)
            calls += 1
            computed += len(items) * k
            hidden = out.hidden[-1, :, 0]  # (N, H) each row's state after its last loop of the call
            if loops is not None:  # the other loops' drafts of each token's successor, from this call's states
                for t, sh in zip(items, shadow_drafts(model, out.hidden[:, :, 0], [t.hidden for t in items],
                                                      tuple(t.stage for t in items), k, loops.loops, drafters, params)):
                    t.loop_shadow.update(sh)
            newest = flight[-1] if flight[-1].stage == 0 else None  # leaves loop k now: it drafts
            heads = [t for t in flight if t.stage == D - 1]  # leave loop T now (oldest first)
            for t in items:
                t.stage += 1
                t.hidden = hidden[t.slot]
            # logits: the newest token's drafts (first; second unless its head reads the first's token),
            # then the heads' exact loop-T logits
            states = [hidden[[t.slot for t in heads]]]
            n_draft = 0
            if newest is not None:
                per_loop = out.hidden[:, newest.slot : newest.slot + 1, 0]  # (k, 1, H)
                draft_states = [draft_state(per_loop, extrapolate, dmap)] + ([dmap.next_state(per_loop, k)] if two and not conditioned else [])
                states = draft_states + states
                n_draft = len(draft_states)
            lg = model.head(torch.cat(states))
            ids = lg.argmax(-1).tolist() if params.greedy else None  # one host transfer

            # -- verify: each head's exact logits test its successor; a rejection voids the rest ------------
            steps: list[Step] = []
            for j, head in enumerate(heads):
                assert flight[0] is head
                flight.pop(0)
                succ = flight[0] if flight else None
                if params.greedy:
                    tok = ids[n_draft + j]
                    ok = succ is not None and succ.token == tok
                else:
                    p = probabilities(lg[n_draft + j : n_draft + j + 1], params)[:, None]  # (1, 1, V)
                    q = (succ.q if succ is not None else p[0, 0])[None, None]
                    drafts = torch.tensor([[succ.token if succ is not None else 0]], device=device)
                    accepted, tokens = accept_sampled(drafts, q, p, torch.tensor([int(succ is not None)], device=device), gen)
                    ok, tok = bool(accepted.item()), int(tokens[0, 0])
                if loops is not None:  # each loop's draft of this successor, scored
                    loops.score(head.loop_shadow, tok, None if params.greedy else p)
                if chooser is not None:  # head is verified: its logits are the target at its successor's position
                    if head.shadow is not None:  # the second draft made (or not) beside head as a first draft
                        conf, second = head.shadow
                        chooser.score_second(conf, second == tok if params.greedy else pass_chance(p, second))
                    if succ is not None and not succ.second:
                        chooser.score_first(ok if params.greedy else pass_chance(p, succ.q))
                if succ is not None and succ.second:
                    seconds_tested += 1
                    seconds_won += ok
                if ok:
                    n_acc += 1
                    run += 1
                    steps.append(Step(0, produced + j, tok, T, T, 0.0, "draft",
                                      info={"draft": True, "accepted": run, "proposed": run}))
                    continue
                if succ is not None:  # a tested draft failed
                    n_rej += 1
                    close_run()
                steps.append(Step(0, produced + j, tok, T, T, 0.0, "verify",
                                  info={"draft": False, "accepted": run, "proposed": run + 1}))
                flight.clear()  # drafts behind a rejection are void; the head after this one was its successor
                flight.append(_Token(head.index + 1, tok, 0))
                break

            # -- draft: the newest token, if it survived, drafts its successor and maybe the one after.
            # Sampled drafts are drawn whether or not it survived (the pipeline's order of draws)
            if newest is not None:
                q1 = None if params.greedy else probabilities(lg[:1], params)[0]
                first_tok = ids[0] if params.greedy else int(sample(q1[None], gen)[0])
                if loops is not None:  # loop k's own draft of the successor
                    newest.loop_shadow[k] = first_tok if params.greedy else q1
                second_tok = q2 = shadow = None
                if two and newest.index + 2 < max_new and not draining:  # an unconditioned head's logits came with the first's (row 1)
                    second_tok, q2, shadow = second_draft(model, dmap, per_loop, k, first_tok, params, gen, threshold, chooser,
                                                          lg2=None if conditioned else lg[1:2],
                                                          top=ids[1] if params.greedy and not conditioned else None)
                if flight and flight[-1] is newest and newest.index + 1 < max_new and not draining:
                    flight.append(_Token(newest.index + 1, first_tok, 0, q=q1, shadow=shadow))
                    n_prop += 1
                    if second_tok is not None:
                        flight.append(_Token(newest.index + 2, second_tok, 0, second=True, q=q2))
                        n_prop += 1
                        seconds += 1
            for j, step in enumerate(steps):
                step.latency_ms = timer.lap(0)
                yield step
                pairs += j == 1
                produced += 1
                emitted += 1
                if not req.active(0, produced):
                    flight.clear()
                    break
            if loops is not None and not draining and flight:
                draining = loops.drain(k, max_new - produced)
    finally:  # also when the consumer stops early (Stream.close): the open run counts, then the stats
        if run:
            close_run()
        stats()

