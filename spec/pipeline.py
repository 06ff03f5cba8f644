"""Pipelined self-speculation: each forward drafts the next token and verifies an earlier one.

With draft loop k dividing T, a token's T loops are split into D = T / k stages of k loops. Every
call runs k loops over all tokens in flight, each at its own stage (rows at different loops, one
Forward, each row reading and writing its own loop's cache slots):

    call c:   token n+D-1 at loops 1..k  |  ...  |  token n at loops T-k+1..T

The token leaving stage 1 (loop k) drafts its successor with the shared head, which enters stage 1
in the next call; the token leaving stage D (loop T) has exact full-depth logits, which verify its
successor's draft (greedy: equal argmax; sampling: the Leviathan/Chen rule of spec.accept). On
acceptance nothing waits: in steady state one token is emitted per call of k loops instead of T.
On rejection the target's token replaces the draft, the drafts behind it are dropped (their cache
entries are overwritten later and never read), and the pipeline refills from the corrected token.

Exactness: each emitted token's logits come from all T loops over the exact K/V of its accepted
prefix: stage s of token n reads stage s of tokens < n, which ran one call earlier (token n-1 is
one stage ahead) or before. Nothing is computed twice: a token's loops 1..k run once when it
enters, loops k+1..T once each as it advances; a corrected token is a new token at that position.

Cost in loop passes per emitted token, with a the chance that a tested draft passes:
k + (1 - a) * (T - k) (a rejection costs a refill of D - 1 calls), against T at full depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from looplm.decoding import Decoder, DecodeRequest, Step
from looplm.model import LoopLM
from looplm.sampling import probabilities, sample
from looplm.work import Forward

from .accept import accept_sampled
from .adapt import LoopChooser, shadow_drafts
from .drafts import DraftMap, draft_state
from .start import first_step, start_request


@dataclass
class _Token:
    """A token in flight: its position, the stage it runs next, its state, its draft distribution."""

    index: int  # 0-based index among the row's new tokens
    token: int
    stage: int  # stages done so far; the next call runs loops [stage*k, stage*k + k)
    hidden: torch.Tensor | None = None  # (H,) state after loop stage*k (None before stage 0)
    q: torch.Tensor | None = None  # (V,) the distribution it was drafted from (sampling only)
    slot: int = -1  # its row in the current forward call
    shadow: dict = field(default_factory=dict)  # draft_loop="adaptive": loop j -> the draft of its successor from loop j (spec.adapt)


def count_run(hist: list[int], n: int) -> None:
    """Counts a run of n consecutive accepted drafts in `hist` (runs by length, grown as needed)."""
    hist.extend([0] * (n + 1 - len(hist)))
    hist[n] += 1


def pipeline_stats(k: int, D: int, extrapolate: float, drafted: int, accepted: int, rejected: int, hist: list[int],
                   calls: int, computed: int, emitted: int) -> dict:
    """The statistics every pipelined decoder reports (spec.pipeline, spec.trees)."""
    return dict(
        pipeline=True, draft_loop=k, draft_len=D - 1, extrapolate=extrapolate, drafted=drafted, accepted=accepted, rejected=rejected,
        acceptance_rate=accepted / max(drafted, 1), token_acceptance=accepted / max(accepted + rejected, 1),
        mean_accepted_len=accepted / max(sum(hist), 1), accepted_len_hist=list(hist),
        rounds=calls, loops_per_token=computed / max(emitted, 1),
    )


def decode_pipelined(model: LoopLM, req: DecodeRequest, k: int, extrapolate: float = 0.0,
                     draft_map: DraftMap | None = None, chooser: LoopChooser | None = None,
                     drafters: dict[int, tuple[float, DraftMap | None]] | None = None) -> Decoder:
    """Speculative decoding with the draft of token n+1 computed in the same forward as the
    remaining loops of token n (see the module docstring). `extrapolate` = c drafts from
    spec.drafts.draft_state (loop k's logits pushed c times further along their change from loop k-1);
    a `draft_map` (spec.drafts.DraftMap, checked by the caller) drafts instead. k divides T (checked
    at submit by looplm.options.SpeculativeOptions).

    With a `chooser` (draft_loop="adaptive", one sequence; spec.adapt) k is where drafting starts:
    every token's states at the loops in chooser.loops are headed as shadow drafts, scored when its
    successor is known, and the draft loop changes where one token that has run no loop is in
    flight; `drafters` maps each of those loops to its (extrapolate, draft map). Stats add
    loop_switches ([tokens emitted, draft loop] from the start) and loop_acceptance (loop -> mean
    score of its drafts).

    Same Steps and stats keys as spec.decode, with pipeline = True, draft_len = T/k - 1 (drafts in
    flight), rounds = forward calls, rejected = tested drafts that failed, and accepted_len_hist /
    mean_accepted_len over runs of consecutive accepted drafts (a run ends at a rejection or at
    the end of the row).
    """
    T, B = model.num_loops, req.batch_size
    params, gen = req.sampling, req.generator
    drafters = drafters if drafters is not None else {k: (extrapolate, draft_map)}
    if chooser is not None and B != 1:
        raise ValueError(f"draft_loop='adaptive' decodes one sequence per request, got a batch of {B}")
    if chooser is not None:
        k = chooser.resume(k)
    D = T // k
    switches = [[0, k]]  # draft_loop="adaptive": [tokens emitted, the draft loop from then on]
    draining = False  # stop drafting, to change the draft loop once the pipeline is empty
    timer, first = yield from start_request(model, req)
    device = model.lm_head.weight.device
    embed = model.model.embed_tokens  # drafted ids come from the head, so they need no range check
    plen = [len(p) for p in req.prompts]
    produced = [0] * B
    flight: list[list[_Token]] = [[] for _ in range(B)]  # oldest (deepest stage) first
    computed = n_acc = n_rej = n_prop = calls = emitted = 0
    run = [0] * B  # accepted drafts since the row's last rejection
    hist: list[int] = [0] * (D + 1)
    layouts: dict[tuple, tuple] = {}

    def close_run(row: int) -> None:
        """Counts the row's run of accepted drafts in the histogram and starts a new one."""
        count_run(hist, run[row])
        run[row] = 0

    def stats() -> None:
        req.stats.update(pipeline_stats(k, D, drafters[k][0], n_prop, n_acc, n_rej, hist, calls, computed, emitted))
        if chooser is not None:
            req.stats.update(loop_switches=[list(x) for x in switches], loop_acceptance=chooser.acceptance())

    stats()  # complete from the start: spec.fallback may close the decoder at its first Step
    for row in range(B):
        if req.active(row, 0):
            yield first_step(row, first[row], T, timer)
            produced[row] = 1
            emitted += 1
            if req.active(row, 1):
                flight[row].append(_Token(0, first[row], 0))
    try:
        while True:
            if chooser is not None and len(flight[0]) == 1 and flight[0][0].stage == 0:  # an exact switch point
                draining = False
                j = chooser.best(k)
                if j != k:
                    k, D = j, T // j
                    chooser.current = k
                    switches.append([emitted, k])
            # call rows ordered by stage, then by batch row: the rows at one loop are contiguous and,
            # with every sequence in flight, their cache rows too (attention reads views, no gather);
            # a single sequence's tokens sit at evenly spaced loops (one strided view of the cache)
            pairs = sorted(((t.stage, r), t) for r in range(B) for t in flight[r]) if B > 1 else \
                [((t.stage, 0), t) for t in reversed(flight[0])]
            if not pairs:
                break
            items = [t for _, t in pairs]
            for i, t in enumerate(items):
                t.slot = i
            rows = tuple(r for (_, r), _ in pairs)
            stages = tuple(t.stage for t in items)
            if (k, rows, stages) not in layouts:  # index tensors of a call layout, built once (few layouts recur)
                fresh_ = [i for i, st in enumerate(stages) if st == 0]
                stage_t = torch.tensor(stages, device=device)[:, None]
                layouts[k, rows, stages] = (torch.tensor(rows, device=device), stage_t * k, fresh_, stage_t == 0)
            rows_t, start, fresh, is_fresh = layouts[k, rows, stages]
            pos_list = [plen[r] + t.index for (_, r), t in pairs]
            h = call_inputs(embed, items, device)
            out = yield Forward(h[:, None], torch.tensor(pos_list, device=device)[:, None], start_loop=start, num_loops=k, gates=False)
            calls += 1
            computed += len(items) * k
            hidden = out.hidden[-1, :, 0]  # (N, H) each row's state after its last loop of the call
            extrapolate, draft_map = drafters[k]
            if chooser is not None:  # the other loops' drafts of each token's successor, from this call's states
                for t, sh in zip(items, shadow_drafts(model, out.hidden[:, :, 0], [t.hidden for t in items], stages, k,
                                                      chooser.loops, drafters, params)):
                    t.shadow.update(sh)
            state = hidden
            if (extrapolate or draft_map is not None) and fresh:  # rows leaving loop k draft from mapped states (spec.drafts)
                state = torch.where(is_fresh, draft_state(out.hidden[:, :, 0], extrapolate, draft_map), hidden)
            lg = model.head(state)  # (N, V): exact loop-T logits of the rows leaving loop T, drafts of fresh rows
            heads = [row for row in range(B) if flight[row] and flight[row][0].stage == D - 1]
            verdict: dict[int, tuple[int, bool]] = {}  # row -> (emitted token, was it the accepted draft)
            draft_tok: dict[int, int] = {}  # call slot of a token leaving loop k -> its successor's draft
            draft_q: dict[int, torch.Tensor] = {}
            if params.greedy:  # one argmax and one host transfer for the whole call
                ids = lg.argmax(-1).tolist()
                for r in heads:
                    tok = ids[flight[r][0].slot]
                    verdict[r] = (tok, len(flight[r]) > 1 and flight[r][1].token == tok)
                    if chooser is not None:
                        chooser.score(flight[r][0].shadow, tok)
                draft_tok = {i: ids[i] for i in fresh}
            else:
                # -- verify: a token leaving loop T tests its successor's draft (Leviathan/Chen) --------
                if heads:
                    succ = [flight[r][1] if len(flight[r]) > 1 else None for r in heads]
                    p = probabilities(lg[[flight[r][0].slot for r in heads]], params)[:, None]  # (n, 1, V)
                    q = torch.stack([s.q if s is not None else p[j, 0] for j, s in enumerate(succ)])[:, None]
                    drafts = torch.tensor([[s.token if s is not None else 0] for s in succ], device=device)
                    limit = torch.tensor([int(s is not None) for s in succ], device=device)
                    accepted, tokens = accept_sampled(drafts, q, p, limit, gen)
                    for r, a, tok in zip(heads, accepted.tolist(), tokens[:, 0].tolist()):
                        verdict[r] = (tok, bool(a))
                    if chooser is not None:
                        for n, r in enumerate(heads):
                            chooser.score(flight[r][0].shadow, verdict[r][0], p[n, 0])
                # -- draft: a token leaving loop k samples its successor from its loop-k head ----------
                if fresh:
                    qd = probabilities(lg[fresh], params)
                    draft_tok = dict(zip(fresh, sample(qd, gen).tolist()))
                    draft_q = dict(zip(fresh, qd))
            if chooser is not None:  # loop k's own draft of each fresh token's successor
                for i in fresh:
                    items[i].shadow[k] = draft_tok[i] if params.greedy else draft_q[i]

            # -- advance every row's pipeline and emit in order ----------------------------------------
            for row in range(B):
                toks = flight[row]
                for t in toks:
                    t.stage += 1
                    t.hidden = hidden[t.slot]
                if row in verdict:
                    head = toks.pop(0)  # ran its last loop
                    tok, ok = verdict[row]
                    if ok:
                        n_acc += 1
                        run[row] += 1
                        yield Step(row, produced[row], tok, T, T, timer.lap(row), "draft",
                                   info={"draft": True, "accepted": run[row], "proposed": run[row]})
                    else:
                        if toks:  # the successor was a tested draft, and failed
                            n_rej += 1
                            close_run(row)
                        toks.clear()  # drafts behind a rejection are void
                        yield Step(row, produced[row], tok, T, T, timer.lap(row), "verify",
                                   info={"draft": False, "accepted": run[row], "proposed": run[row] + 1})
                        toks.append(_Token(head.index + 1, tok, 0))
                    produced[row] += 1
                    emitted += 1
                    if not req.active(row, produced[row]):
                        toks.clear()
                        continue
                newest = toks[-1] if toks else None  # drafts if it has just left loop k
                if newest is not None and newest.stage == 1 and newest.slot in draft_tok and newest.index + 1 < req.max_new[row] \
                        and not draining:
                    toks.append(_Token(newest.index + 1, draft_tok[newest.slot], 0, q=draft_q.get(newest.slot)))
                    n_prop += 1
            if chooser is not None and not draining and flight[0]:
                draining = chooser.drain(k, req.max_new[0] - produced[0])
    finally:  # also when the consumer stops early (Stream.close): open runs count, then the stats
        for r in range(B):
            if run[r]:
                close_run(r)
        stats()


def call_inputs(embed, items, device) -> torch.Tensor:
    """(N, H) inputs of a call's rows in order: the saved state of a token that has run stages, the
    embedding of a fresh one (stage 0). One lookup for all fresh tokens: under tensor parallelism
    the lookup is a collective, so no row is read from the table directly."""
    fresh = [t.token for t in items if not t.stage]
    emb = iter(embed(torch.tensor(fresh, device=device)) if fresh else ())
    return torch.stack([t.hidden if t.stage else next(emb) for t in items])
