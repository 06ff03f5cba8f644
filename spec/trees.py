"""Draft trees in the pipelined decoder: a token leaving its draft stage proposes b candidate successors.

The pipeline of spec.pipeline (D = T/k stages of k loops, one Forward per call, rows at different
loops) keeps one chain of drafts in flight; a rejection empties it and costs D - 1 calls of
refill. Here the chain is lane 0 of the sequence, and every token of lane 0 that leaves its draft
stage proposes up to b candidates for the next position (greedy: its draft's top-b; sampling: b
draws from its draft distribution q without replacement; only one when the draft is confident:
top-1 probability >= `threshold`). The first candidate (top-1, or the first draw) continues
lane 0; each other candidate starts a side lane, a fork of the sequence's block table
(looplm.lanes) holding the accepted prefix plus that candidate, which keeps drafting one
successor per token (greedy: its top-1; sampling: a sample of q) and runs in the same Forwards
(extra rows). Side lanes never branch, so at most one fork is in flight per stage: rows per
Forward <= D + (b - 1) * D * (D - 1) / 2.

When the token before a fork leaves loop T its exact logits choose among the candidates. Greedy:
the candidate equal to their argmax. Sampling: spec.accept.accept_candidates tests them in draw
order, candidate i accepted with probability min(1, r_i(x_i) / q_i(x_i)) (r_1 = p, the target
distribution; after a rejection r_{i+1} = norm(max(r_i - q_i, 0)) and q_{i+1} is q_i without x_i,
renormalised); when all fail the token is drawn from the last residual, so it follows p exactly
(docs/design.md "Draft trees"). A position with one candidate (a side lane's own drafts) is the
pipeline's Leviathan/Chen test. Lane 0's candidate: the fork's side lanes are dropped. A
side lane's: its table becomes the sequence's, its tokens (already through some stages) become
lane 0, every other lane is dropped. None: every side lane is dropped and the pipeline refills from
the target's token, as in spec.pipeline. Exactness is the pipeline's: each lane's K/V are those
of its own prefix (shared blocks for the accepted prefix, its own blocks past the fork), so every
emitted token's logits come from all T loops over the exact K/V of the emitted prefix.

Sampled drafts are drawn from the request's generator after the verdict's draws and before its
Step, in the pipeline's order, so a tree that never forks emits the sampled pipeline's tokens for a
seed, also through a switch to full depth (spec.fallback closes the decoder after a Step).

Second drafts in the tree (draft_tokens=2, a draft map with a second-token head for loop k): when
lane 0's newest token n leaves loop k, its top-1 candidate for n+1 (the one that continues lane 0)
also gets a second draft for n+2 from the head, as in spec.multi (conditioned on that candidate's
token where the head reads it; made where `second_threshold` or spec.seconds says so). The two run
as a pair in lane 0, adjacent rows at the same loops, so the second reads the first's same-loop
K/V. The side candidates for n+1 carry none: a second draft conditioned on each would cost a head
call per candidate for the less likely winners. When n leaves loop T its logits choose among the
candidates for n+1 as above; if the top-1 wins, one call later the pair leaves loop T together:
the first's logits test the second (one candidate: the Leviathan/Chen test with q2 when sampling),
and if it passes, the second's logits choose among the candidates for n+3 (lane 0's next and the
side lanes forked there). So one call can emit two tokens. A side lane that wins drops the pair with
the rest of lane 0; a failed second draft voids everything behind it, side lanes included. Second
drafts are drawn after the candidates (a seeded tree whose head never makes one draws as the plain
tree). Side lanes write at most D - 1 positions as before; the second drafts write lane 0's
positions, which the request reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looplm.decoding import Decoder, DecodeRequest, Step
from looplm.lanes import LaneForward
from looplm.model import LoopLM
from looplm.sampling import SamplingParams, probabilities

from .accept import accept_candidates, draw_candidates, pass_chance
from .drafts import DraftMap, draft_state
from .pipeline import count_run, pipeline_stats
from .multi import second_draft
from .seconds import SecondChooser
from .start import first_step, start_request


@dataclass
class _Token:
    """A token in flight: its index among the new tokens, the stages it has run, its state."""

    index: int
    token: int
    stage: int
    depth: int  # positions past the last emitted token when it was drafted (0: a target token)
    rank: int = 0  # its place among its parent's candidates (0: the top-1, or the first draw)
    hidden: torch.Tensor | None = None  # (H,) state after loop stage*k (None before stage 0)
    q: torch.Tensor | None = None  # (V,) the draft distribution it was drawn from (sampling only; shared by siblings)
    slot: int = -1  # its row in the current forward call
    second: bool = False  # drafted by the second-token head (the second of lane 0's pair)
    shadow: tuple | None = None  # lane 0's top-1 candidate: (confidence, second draft or q2) beside it, for SecondChooser


def _propose(lg: torch.Tensor, rows: list[int], ids: dict[int, int], branch: int, threshold: float | None,
             params: SamplingParams, gen: torch.Generator) -> tuple[dict[int, int], dict[int, torch.Tensor], dict[int, list[int]]]:
    """The candidates that the tokens leaving their draft stage propose for their successors.

    Args:
        lg: (len(rows), V) draft logits of those tokens (call rows `rows`).
        ids: greedy: each call row's argmax (unused when sampling).
        branch, threshold, params, gen: as decode_tree; the request's sampling and generator.
    Returns:
        draft_tok: row -> its successor (greedy: the argmax; sampling: a sample of q); draft_q:
        row -> q (V,), sampling only; alts: row -> up to branch - 1 more candidates (greedy: the
        next of the top-b; sampling: the next draws without replacement), only for rows whose
        draft is unsure (top-1 probability below the threshold) and has more candidates.
    """
    if not rows:
        return {}, {}, {}
    if params.greedy:
        draft_tok, draft_q = {s: ids[s] for s in rows}, {}
        top = lg.topk(branch, -1).indices.tolist()
        sure = torch.softmax(lg, -1).amax(-1)
    else:
        q = probabilities(lg, params)
        top = draw_candidates(q, branch, gen).tolist()  # the first is a plain sample of q
        draft_tok, draft_q = {s: cands[0] for s, cands in zip(rows, top)}, dict(zip(rows, q))
        sure = q.amax(-1)
    ok = [True] * len(rows) if threshold is None else (sure < threshold).tolist()
    alts = {}
    for s, cands, go in zip(rows, top, ok):
        more = [c for c in cands if c != draft_tok[s] and c >= 0][: branch - 1]  # -1: q has no more mass
        if go and more:
            alts[s] = more
    return draft_tok, draft_q, alts


def decode_tree(model: LoopLM, req: DecodeRequest, k: int, branch: int, threshold: float | None = None,
                extrapolate: float = 0.0, draft_map: DraftMap | None = None, seconds: bool = False,
                second_threshold: float | str | None = None, chooser: SecondChooser | None = None) -> Decoder:
    """Pipelined self-speculation with draft trees (see the module docstring).

    Args:
        model, req: as spec.decode (one sequence; greedy or sampling, req.generator draws).
        k: the draft loop; it divides T (D = T/k stages).
        branch: b >= 1 candidates per position proposed by lane 0's tokens.
        threshold: None (always b candidates), or branch only when the draft's top-1 probability
            is below it (greedy: softmax of the draft logits; sampling: the draft distribution q
            after temperature, top-k and top-p).
        extrapolate, draft_map: what drafts are computed from (spec.drafts).
        seconds: lane 0's top-1 candidate carries a second draft (draft_tokens=2, "Second drafts in
            the tree" in the module docstring); `draft_map` has a second-token head for loop k.
        second_threshold: with seconds, as spec.multi.decode_pairs' threshold (None: always; a
            number: where the head's top-1 probability is at least it; "adaptive": spec.seconds).
        chooser: with "adaptive", the request's spec.seconds.SecondChooser (as spec.multi.decode_pairs').
    Yields:
        LaneForwards and Steps as spec.pipeline.decode_pipelined.
    Stats (req.stats): spec.pipeline's keys (drafted counts every candidate, so acceptance_rate
        falls with b; token_acceptance is the chance that a tested position has a winning
        candidate), plus branch, branch_threshold, forks (positions that got more than one
        candidate), rows_per_forward (mean rows of the decode calls) and max_rows,
        acceptance_by_depth (per depth d = 1.. of the tested position past the last emitted token
        when it was drafted: the fraction with a winning candidate; tested_by_depth: how many were
        tested) and won_by_rank (tested positions won by the top-1, top-2, ... candidate). With
        seconds also spec.multi's draft_tokens = 2, second_threshold, seconds, seconds_tested,
        seconds_accepted and pairs_emitted.
    """
    T = model.num_loops
    D = T // k
    side_max = (branch - 1) * (D - 1)  # side lanes alive at once: one fork per stage 1..D-1
    req.stats["_lanes"] = (side_max, D - 1)  # the scheduler reserves their blocks (a lane writes <= D - 1 positions)
    timer, first = yield from start_request(model, req)
    device = model.lm_head.weight.device
    params, gen = req.sampling, req.generator
    table = model.model.embed_tokens.weight  # a row of the embedding table is the embedding
    plen = len(req.prompts[0])
    max_new = req.max_new[0]
    chooser = (chooser if chooser is not None else SecondChooser(D)) if seconds and second_threshold == "adaptive" else None
    lanes: dict[int, list[_Token]] = {0: []}  # lane -> its tokens in flight, oldest first; 0 is the sequence
    fork_at: dict[int, int] = {}  # side lane -> index of its first token
    next_lane = 1
    drop: list[int] = []
    adopt: int | None = None
    forks: list[tuple[int, int]] = []
    produced = emitted = computed = calls = rows_total = max_rows = 0
    n_acc = n_rej = n_prop = n_forks = run = 0
    n_seconds = seconds_tested = seconds_won = pairs = 0
    hist = [0] * (D + 1)
    depths = 2 * D - 1 if seconds else D - 1  # a second draft sits one position past its pair's first
    tested_at = [0] * (depths + 1)  # by depth 1..depths (index 0 unused: a target token is never tested)
    won_at = [0] * (depths + 1)
    won_rank = [0] * branch

    def close_run() -> None:
        nonlocal run
        count_run(hist, run)
        run = 0

    def stats() -> None:
        req.stats.update(
            pipeline_stats(k, D, extrapolate, n_prop, n_acc, n_rej, hist, calls, computed, emitted),
            branch=branch, branch_threshold=threshold, forks=n_forks,
            rows_per_forward=rows_total / max(calls, 1), max_rows=max_rows,
            acceptance_by_depth=[w / t if t else None for w, t in zip(won_at[1:], tested_at[1:])], tested_by_depth=tested_at[1:],
            won_by_rank=list(won_rank),
        )
        if seconds:
            req.stats.update(draft_tokens=2, second_threshold=second_threshold, seconds=n_seconds,
                             seconds_tested=seconds_tested, seconds_accepted=seconds_won, pairs_emitted=pairs)

    stats()  # complete from the start: spec.fallback may close the decoder at its first Step
    if req.active(0, 0):
        yield first_step(0, first[0], T, timer)
        produced = emitted = 1
        if req.active(0, 1):
            lanes[0].append(_Token(0, first[0], 0, 0))
    try:
        while lanes[0]:
            # rows: lane by lane (lane 0 first), newest stage first within a lane; a pair's two tokens
            # (one stage) adjacent in position order, so the runner runs them as one causal group
            items = [t for lane in lanes.values() for t in sorted(lane, key=lambda t: (t.stage, t.index))]
            lane_of = [lane for lane, toks in lanes.items() for _ in toks]
            for i, t in enumerate(items):
                t.slot = i
            stages = torch.tensor([t.stage for t in items], device=device)[:, None]
            pos = torch.tensor([plen + t.index for t in items], device=device)[:, None]
            h = torch.stack([t.hidden if t.stage else table[t.token] for t in items])  # (N, H)
            newest = {id(toks[-1]) for toks in lanes.values() if toks and toks[-1].stage == 0}
            fresh = [i for i, t in enumerate(items) if id(t) in newest]  # they draft (a pair's first does not)
            out = yield LaneForward(h[:, None], pos, start_loop=stages * k, num_loops=k, lanes=lane_of,
                                    drop=drop, adopt=adopt, forks=forks, gates=False)
            drop, adopt, forks = [], None, []
            calls += 1
            computed += len(items) * k
            rows_total += len(items)
            max_rows = max(max_rows, len(items))
            hidden = out.hidden[-1, :, 0]  # (N, H) each row's state after its last loop of the call
            # logits only where needed: drafts of the fresh rows (first), loop T of lane 0's heads (last)
            head_rows = [t.slot for t in lanes[0] if t.stage == D - 1]  # oldest first; two for a pair
            fresh_t = torch.tensor(fresh, device=device)
            drafts = draft_state(out.hidden[:, fresh_t, 0], extrapolate, draft_map) if fresh else hidden[:0]
            lg = model.head(torch.cat([drafts, hidden[head_rows]]))  # (len(fresh) + len(head_rows), V)
            # full depth's tie rule; one host transfer
            ids = dict(zip(fresh + head_rows, lg.argmax(-1).tolist())) if params.greedy else {}
            for toks in lanes.values():
                for t in toks:
                    t.stage += 1
                    t.hidden = hidden[t.slot]

            # -- verify: lane 0's heads left loop T (two for a pair, oldest first); each one's logits choose
            # among the next position's candidates, until one has no winner or a side lane wins
            steps: list[Step] = []
            toks = lanes[0]
            for j in range(len(head_rows)):
                head = toks.pop(0)
                row = len(fresh) + j
                cands = ([(0, toks[0])] if toks else []) + [(lane, lanes[lane][0]) for lane, at in fork_at.items() if at == head.index + 1]
                cands.sort(key=lambda c: c[1].rank)  # draw order: the rule tests them in turn
                if params.greedy:  # the candidate equal to the argmax
                    tok = ids[head.slot]
                    winner = next((lane for lane, t in cands if t.token == tok), None)
                else:  # multi-candidate rejection (spec.accept.accept_candidates): the token follows p exactly
                    p = probabilities(lg[row : row + 1], params)  # (1, V)
                    q = cands[0][1].q[None] if cands else p
                    ids_t = torch.tensor([[t.token for _, t in cands] or [0]], device=device)
                    won, tok_t = accept_candidates(ids_t, q, p, torch.tensor([len(cands)], device=device), gen)
                    w, tok = torch.cat([won, tok_t]).tolist()  # one host transfer
                    winner = cands[w][0] if w < len(cands) else None
                if chooser is not None:  # head is verified: its logits are the target at the next position
                    if head.shadow is not None:  # the second draft made (or not) beside head as lane 0's top-1
                        conf, second = head.shadow
                        chooser.score_second(conf, second == tok if params.greedy else pass_chance(p, second))
                    if toks and not toks[0].second:
                        chooser.score_first(toks[0].token == tok if params.greedy else pass_chance(p, toks[0].q))
                if cands:
                    depth = cands[0][1].depth
                    tested_at[depth] += 1
                    won_at[depth] += winner is not None
                    if toks and toks[0].second:
                        seconds_tested += 1
                        seconds_won += winner == 0
                if winner is not None:
                    n_acc += 1
                    run += 1
                    won_rank[(toks[0] if winner == 0 else lanes[winner][0]).rank] += 1
                    reason, info = "draft", {"draft": True, "accepted": run, "proposed": run}
                else:
                    if cands:
                        n_rej += 1
                        close_run()
                    reason, info = "verify", {"draft": False, "accepted": run, "proposed": run + 1}
                if winner is None:  # every lane is void; the target's token refills lane 0
                    gone = list(fork_at)
                    toks.clear()
                    toks.append(_Token(head.index + 1, tok, 0, 0))
                elif winner == 0:  # the fork's side lanes lost
                    gone = [lane for lane, at in fork_at.items() if at == head.index + 1]
                else:  # a side lane won: it becomes the sequence; lane 0 and its later forks are void
                    gone = [lane for lane in fork_at if lane != winner]
                    lanes[0] = toks = lanes.pop(winner)
                    del fork_at[winner]
                    adopt = winner
                for lane in gone:
                    del lanes[lane], fork_at[lane]
                drop += gone
                steps.append(Step(0, produced + j, tok, T, T, 0.0, reason, info=info))
                if winner != 0:  # the next head, if any, was lane 0's: void
                    break

            # -- draft: each lane's newest token that just left loop k proposes its successor(s). Sampled
            # drafts are drawn after the verdicts' draws and before their Steps, in spec.pipeline's order: a
            # tree that never forks consumes the request's generator as the pipeline does, also when the
            # consumer closes it after a Step (spec.fallback)
            draft_tok, draft_q, alts = _propose(lg[: len(fresh)], fresh, ids, branch, threshold, params, gen)
            n0 = lanes[0][-1] if lanes[0] and lanes[0][-1].stage == 1 else None  # lane 0's newest, if it drafts now
            second = None  # (its second draft or None, q2, shadow): lane 0's top-1 candidate carries it
            if seconds and n0 is not None and n0.index + 2 < max_new:
                second = second_draft(model, draft_map, out.hidden[:, n0.slot : n0.slot + 1, 0], k, draft_tok[n0.slot],
                                       params, gen, second_threshold, chooser)
            for j, step in enumerate(steps):
                step.latency_ms = timer.lap(0)
                yield step
                pairs += j == 1
                produced += 1
                emitted += 1
                if not req.active(0, produced):
                    break
            if not req.active(0, produced):
                break
            for lane in list(lanes):
                newest = lanes[lane][-1] if lanes[lane] else None
                if newest is None or newest.stage != 1 or newest.index + 1 >= max_new:
                    continue
                depth = newest.index + 1 - produced + 1
                q = draft_q.get(newest.slot)
                shadow = second[2] if lane == 0 and second is not None else None
                lanes[lane].append(_Token(newest.index + 1, draft_tok[newest.slot], 0, depth, q=q, shadow=shadow))
                n_prop += 1
                if lane == 0 and second is not None and second[0] is not None:
                    lanes[0].append(_Token(newest.index + 2, second[0], 0, depth + 1, q=second[1], second=True))
                    n_prop += 1
                    n_seconds += 1
                for rank, c in enumerate(alts.get(newest.slot, []) if lane == 0 else [], 1):
                    lanes[next_lane] = [_Token(newest.index + 1, c, 0, depth, rank, q=q)]
                    fork_at[next_lane] = newest.index + 1
                    forks.append((next_lane, plen + newest.index + 1))
                    next_lane += 1
                    n_prop += 1
                n_forks += lane == 0 and newest.slot in alts
    finally:  # also when the consumer stops early (Stream.close): the open run counts, then the stats
        if run:
            close_run()
        stats()
