"""The anytime decoder: one loop at a time per token, emit when the budget or an exit policy says so."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch

from looplm.decoding import Decoder, DecodeRequest, Step, prefill
from looplm.generate import STEPS
from looplm.model import LoopLM
from looplm.sampling import choose
from looplm.work import FIXED_STEPS, Forward

from .budget import Budget, LoopCost, make_budget
from .capped import decode_capped
from .policies import ExitPolicy, LoopObservation, make_policy

SKIP_MODES = ("exact", "copy", "shared")
FINISH_MODES = ("eager", "lazy", "ahead")


def check_finish(finish: str | None, timed: bool) -> None:
    """Raises a ValueError for an unknown finish mode, or "ahead" under a time budget (`timed`)."""
    if finish not in (None, *FINISH_MODES):
        raise ValueError(f"finish must be one of {FINISH_MODES} or None, got {finish!r}")
    if finish == "ahead" and timed:
        raise ValueError("finish 'ahead' runs all T loops before the exit is decided, which a time budget cannot "
                         "wait for: use finish='eager' or 'lazy' (or None) with budget_ms / deadline_ms")


def check_step(step: str | None, finish: str | None, skip: str, timed: bool, whole: bool) -> None:
    """Raises a ValueError for an unknown step, or a fixed-shape step ("fixed", "compiled") where no
    decode token runs all T loops in one forward: it needs finish "ahead" (or None, which it turns
    into "ahead"), skip "exact", no time budget and something deciding between loops (an exit
    policy or trace; `whole`: nothing does)."""
    if step not in (None, *STEPS):
        raise ValueError(f"step must be one of {STEPS} or None, got {step!r}")
    if step in (None, "eager"):
        return
    why = ("finish must be 'ahead' (or None)" if finish not in (None, "ahead") else
           "a time budget (budget_ms / deadline_ms) decides between loops, which one forward per token cannot do" if timed else
           f"skip={skip!r} finishes no loops ahead (it needs skip='exact')" if skip != "exact" else
           "without an exit policy or trace each token already runs its loops in one forward (mode 'full' takes step= too)"
           if whole else None)
    if why is not None:
        raise ValueError(f"step {step!r} runs each decode token through all T loops in one fixed-shape forward "
                         f"(finish='ahead'): {why}")


def finish_mode(finish: str | None, skip: str, timed: bool, whole: bool, step: str | None = None) -> str:
    """The finish mode a request runs: `finish` (None: "eager", or "ahead" under a fixed-shape
    `step`), checked (`check_finish`, `check_step`). "ahead" runs ahead of exit decisions between
    loops: with a loop cap alone (`whole`) every exit is known before the token's loops run, and
    the capped path runs, as with "eager"."""
    check_finish(finish, timed)
    check_step(step, finish, skip, timed, whole)
    if finish is None and step in FIXED_STEPS:
        return "ahead"
    if finish is None or finish == "ahead" and (whole or skip != "exact"):
        return "eager"
    return finish


class _Row:
    """Per-row bookkeeping (pure Python; tensors are views of the last forward's outputs)."""

    def __init__(self):
        self.pos = 0  # position of the current item: the last emitted token, whose loops make the next one
        self.h: torch.Tensor | None = None  # (H,) input of the current item's next loop
        self.token = 0  # the current item's token id (finish="ahead" feeds it to loop 1)
        self.loop = 0  # loops computed so far for the current item
        self.pending: list[list] = []  # exact mode: [pos, next_loop, h] of earlier tokens' unfinished loops
        self.start = 0.0  # clock at the row's previous emission (or the request start)
        self.token_ms = math.inf  # this token's time budget
        self.produced = 0
        self.probs: list[torch.Tensor] = []  # (V,) per computed loop, when probabilities are computed
        self.signals: list[float] = []


def decode(
    model: LoopLM,
    req: DecodeRequest,
    *,
    budget: Budget | None = None,
    budget_ms: float | None = None,
    deadline_ms: float | None = None,
    budget_loops: int | None = None,
    exit: str | ExitPolicy | None = None,
    threshold: float | None = None,
    q: float | None = None,
    skip: str | None = None,
    finish: str | None = None,
    step: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    safety: float = 1.0,
    trace: bool = False,
) -> Decoder:
    """Anytime decoding (mode "anytime"): every token's loops run one at a time until it exits.

    Its options arrive checked (looplm.options.AnytimeOptions, when the engine submits the request).

    Args:
        model: the looped model.
        req: the validated batch (see looplm.decoding.DecodeRequest).
        budget: an anytime.Budget, or use the shorthands: budget_ms (per token), deadline_ms (whole
            request, spread over each row's remaining tokens), budget_loops (at most k loops).
        exit: None, a policy name ("q_exit", "confidence", "entropy", "kl", "delta", "static") or
            an ExitPolicy; threshold (alias q) sets its threshold (documented defaults otherwise).
        skip: what happens to the loops a token skipped: "exact" (finish them later, batched with
            the next token: the cache equals the full-depth cache), "copy" (copy the last computed
            loop's K/V into the skipped slots) or "shared" (read a shared-KV cache: the request's
            cache_factory, e.g. Engine.generate(..., kv="last"|"mean")). None (default): "shared"
            when the request's cache is shared, else "exact".
        finish: when "exact" runs a skipped loop: "eager" (one pending loop per iteration
            alongside the row's next token, so the cache soon equals the full-depth cache), "lazy"
            (only when a later token of the row reaches that loop and needs the slot, in the same
            forward; loops no later token reaches are never run) or "ahead" (before the exit is
            decided: every token runs all T loops in one forward, as full depth, and the exit is
            replayed over its per-loop outputs; not with a time budget; with a loop cap alone, as
            "eager"). Same tokens and exit loops in all three. None: "eager" ("ahead" under a
            fixed-shape step).
        step: how a finish="ahead" decode forward runs: None or "eager" (the runner's plan over the
            paged cache), "fixed" or "compiled" (full depth's fixed-shape step, kernels.fast_step,
            compiled once per (rows, context) bucket by the engine's runner; one-row requests).
            Needs what "ahead" needs (`check_step`).
        clock: callable returning seconds (default time.perf_counter); inject one to test budgets.
        safety: a time budget lets a loop start when elapsed + predicted loop + predicted emission
            <= budget, each predicted as moving mean + safety * moving absolute deviation
            (anytime.budget.LoopCost); 0 predicts with the means only.
        trace: also compute every loop's next-token distribution (the LM head at every loop) so each
            Step.info carries "probs", the chosen token's probability after each computed loop.
    Yields:
        Step(row, index, token, loops, exit_loop, latency_ms, reason in {"budget", "policy",
        "max_depth"}, info={"signal": [policy signal per loop], "probs": [...], "budget_ms": ...}).
        The first token of each row comes from the prefill, which runs all T loops (loops = T);
        its exit loop follows the policy and a loop budget (time budgets start with the second).
    """
    T, B = model.num_loops, req.batch_size
    plan = make_budget(budget, budget_ms=budget_ms, deadline_ms=deadline_ms, budget_loops=budget_loops)
    policy = make_policy(exit, threshold if threshold is not None else q)
    if policy is not None:
        policy.bind(T)
    max_loops = T if plan is None or plan.loops is None else min(plan.loops, T)
    timed = plan is not None and plan.timed
    req.timed = timed
    need_probs = trace or (policy is not None and policy.needs_probs)
    # nothing can end a token before its loop cap (no policy, no time budget, no per-loop trace):
    # each token's loops up to the cap run in one call instead of one call per loop
    whole = policy is None and not timed and not need_probs

    if skip is None:
        skip = "shared" if req.shared_kv else "exact"

    H = model.config.hidden_size
    device = model.lm_head.weight.device
    finish = finish_mode(finish, skip, timed, whole, step)
    lazy, ahead = finish == "lazy", finish == "ahead"
    fast = step if step in FIXED_STEPS else None
    if fast and B > 1:
        raise ValueError(f"step {step!r} runs one-row requests (this one has {B} rows): submit the prompts as separate "
                         "requests (Engine.generate with a list does)")
    rows = [_Row() for _ in range(B)]
    gates = torch.zeros(B, T, dtype=torch.float32, device=device)  # current item's lambdas so far
    prev_hidden = torch.zeros(B, H, dtype=model.lm_head.weight.dtype, device=device)
    prev_probs = torch.zeros(B, model.config.vocab_size, dtype=torch.float32, device=device) if need_probs else None
    cost = LoopCost(safety=safety)
    log = {"exit_loops": [], "reasons": [], "latency_ms": [], "budget_ms": [], "signal_at_exit": []}
    counts = {"finish_loops": 0, "copied_slots": 0, "decode_loops": 0}
    copies: list[tuple[int, int]] = []  # (position, loop) whose K/V fill the later loops' slots (skip="copy")
    loops = torch.arange(1, T + 1, device=device)  # 1-based loop of each replayed observation
    seen = (loops[None, :] <= loops[:, None]).float()[:, None]  # (t, 1, s): loop s is known after loop t

    def decide(idx: list[int], loop: torch.Tensor, hidden, probs, now: float, predicted_ms: float) -> list[str | None]:
        """Updates per-row signals; returns the exit reason (or None to continue) for each row in idx."""
        signal = exits = None
        if policy is not None:
            ix = torch.tensor(idx, device=device)
            obs = LoopObservation(loop, hidden, prev_hidden[ix], gates[ix], probs, prev_probs[ix] if need_probs else None)
            signal, exits = policy.decide(obs)
            signal, exits = signal.tolist(), exits.tolist()
        out = []
        for j, r in enumerate(idx):
            t, row = int(loop[j]), rows[r]
            if signal is not None:
                row.signals.append(signal[j])
            if t >= T:
                out.append("max_depth")
            elif exits is not None and exits[j]:
                out.append("policy")
            elif t >= max_loops:
                out.append("budget")
            elif timed and (now - row.start) * 1e3 + predicted_ms + cost.predict_emit() > row.token_ms:
                out.append("budget")
            else:
                out.append(None)
        return out

    def emit(idx: list[int], reasons: list[str], exit_loops: list[int], hidden, logits, first: bool, decided: float,
             ran_all: bool = False) -> Iterator[Step]:
        """Chooses the tokens of rows idx (hidden (R, H) at their exit loops), handles skipped loops, yields.

        first: tokens decided from the prefill's outputs (all T loops computed, nothing skipped);
        ran_all: decode tokens whose T loops all ran before the exit was decided (finish="ahead").
        """
        ran_all = ran_all or first
        if logits is None:
            logits = model.lm_head(hidden)
        tokens = choose(logits, req.sampling, req.generator)  # (R,)
        emb = None if ahead else model.embed(tokens[:, None])[:, 0]  # (R, H); "ahead" feeds token ids
        ids = tokens.tolist()
        now = clock()
        if not first:
            cost.update_emit((now - decided) * 1e3)
        for j, r in enumerate(idx):
            row = rows[r]
            t, exit_loop = (T if ran_all else row.loop), exit_loops[j]
            if ran_all and not first:
                counts["finish_loops"] += T - exit_loop
            if not ran_all and exit_loop < T:
                if skip == "exact":
                    row.pending.append([row.pos, exit_loop, hidden[j]])
                elif skip == "copy":  # slots (t', l) for t' >= exit_loop get slot (exit_loop - 1, l), every layer l
                    copies.append((row.pos, exit_loop - 1))  # done by the runner before the next Forward
                    counts["copied_slots"] += (T - exit_loop) * model.config.num_hidden_layers
            info = {}
            if policy is not None:
                info["signal"] = list(row.signals)
                info["policy"] = policy.name
                log["signal_at_exit"].append(row.signals[-1] if row.signals else math.nan)
            if row.probs:
                info["probs"] = torch.stack(row.probs)[:, ids[j]].tolist()
            if timed:
                info["budget_ms"] = row.token_ms
            latency = (now - row.start) * 1e3
            step = Step(r, row.produced, ids[j], t, exit_loop, latency, reasons[j], info=info)
            log["exit_loops"].append(exit_loop)
            log["reasons"].append(reasons[j])
            if not first:
                log["latency_ms"].append(latency)
                log["budget_ms"].append(row.token_ms)
            # the emitted token becomes the row's current item, starting at loop 0
            row.produced += 1
            row.pos += 1
            row.h, row.token, row.loop = None if emb is None else emb[j], ids[j], 0
            row.probs, row.signals = [], []
            gates[r] = 0
            row.start = now
            if timed:
                row.token_ms = plan.token_ms((now - t_start) * 1e3, req.max_new[r] - row.produced)
                req.token_ms = row.token_ms
            yield step

    def replay(running: list[int], hid, lam, logits_all, first: bool, now: float) -> Iterator[Step]:
        """The exit decisions over per-loop outputs computed at once: hid (T, R, H), lam (T, R) and
        logits_all (T, R, V) or None (emit applies the head) of the current tokens of rows `running`,
        after all T loops (the prefill's last prompt position, or a finish="ahead" decode forward).
        The policy sees, for every loop t and row, what the one-loop-per-forward path shows it after
        loop t (policies are per row), in one call over T * R observations; the rows then leave at
        the first loop that says so, in loop order. No time budget applies here: the prefill's token
        has none and "ahead" allows none."""
        R = len(running)
        ix = torch.tensor(running, device=device)
        probs = logits_all.float().softmax(-1) if need_probs else None  # (T, R, V)
        signal = exits = None
        if policy is not None:
            prev_h = torch.cat([prev_hidden[ix][None], hid[:-1]])
            obs = LoopObservation(
                loops[:, None].expand(T, R).reshape(-1), hid.reshape(T * R, -1), prev_h.reshape(T * R, -1),
                (lam.T[None] * seen).reshape(T * R, T),
                None if probs is None else probs.reshape(T * R, -1),
                None if probs is None else torch.cat([prev_probs[ix][None], probs[:-1]]).reshape(T * R, -1))
            signal, exits = (x.reshape(T, R).T.tolist() for x in policy.decide(obs))  # (R, T) lists
        leave = []  # (exit loop, reason) per row
        for j in range(R):
            for t in range(1, T + 1):
                why = "max_depth" if t >= T else "policy" if exits is not None and exits[j][t - 1] else \
                    "budget" if t >= max_loops else None
                if why is not None:
                    leave.append((t, why))
                    break
        for j, r in enumerate(running):
            t = leave[j][0]
            if signal is not None:
                rows[r].signals.extend(signal[j][:t])
            if need_probs:
                rows[r].probs.extend(probs[:t, j])
        at = torch.tensor([t for t, _ in leave], device=device) - 1
        jx = torch.arange(R, device=device)
        prev_hidden[ix] = hid[at, jx]  # what the next loop's observation calls the previous loop
        if need_probs:
            prev_probs[ix] = probs[at, jx]
        for t in range(1, T + 1):
            out = [j for j in range(R) if leave[j][0] == t]
            if out:
                sel = torch.tensor(out, device=device)
                yield from emit([running[j] for j in out], [leave[j][1] for j in out], [t] * len(out), hid[t - 1, sel],
                                None if logits_all is None else logits_all[t - 1, sel], first, now, ran_all=True)

    # a loop cap alone decides every exit: the capped loops run in one Forward per token (anytime.capped);
    # skipped loops finished eagerly ride along, up to k at a time
    eager = skip == "exact" and finish == "eager"
    capped = whole and B == 1
    t_start = clock()
    try:
        if capped:
            yield from decode_capped(model, req, max_loops, skip, eager, log, counts, clock)
            return
        # prefill: all T loops over every prompt (per-loop KV); the first token replays the exit
        # decision over the last prompt position's per-loop outputs
        lengths = [len(p) for p in req.prompts]
        out = yield prefill(req, device, logits_loops="all")
        last = torch.tensor(lengths, device=device) - 1
        ar = torch.arange(B, device=device)
        for r in range(B):
            rows[r].pos, rows[r].start = lengths[r] - 1, t_start
        now = clock()
        yield from replay(list(range(B)), out.hidden[:, ar, last], out.gates[:, ar, last], out.logits[:, :, 0], True, now)
        req.stats["prefill_ms"] = (now - t_start) * 1e3
        t_prev = clock()

        while ahead:
            # every running row's current token through all T loops in one forward (as full depth),
            # then the exit decision replayed over its per-loop outputs
            running = [r for r in range(B) if req.active(r, rows[r].produced)]
            if not running:
                return
            ids = torch.tensor([[rows[r].token] for r in running], device=device)  # (R, 1), embedded by the runner
            pos = torch.tensor([[rows[r].pos] for r in running], device=device)
            res = yield Forward(ids, pos, num_loops=T, logits="last" if need_probs else None, logits_loops="all", step=fast)
            counts["decode_loops"] += T * len(running)
            yield from replay(running, res.hidden[:, :, 0], res.gates[:, :, 0],
                              res.logits[:, :, 0] if need_probs else None, False, clock())

        while True:
            running = [r for r in range(B) if req.active(r, rows[r].produced)]
            if not running:
                return
            # one forward: every running row's unfinished earlier tokens (exact mode) and its current token
            # (lazy: only the pending loops the current token needs now, at its own loop)
            items = [
                [x for x in rows[r].pending if not lazy or x[1] == rows[r].loop] + [[rows[r].pos, rows[r].loop, rows[r].h]]
                for r in running
            ]
            width = max(len(it) for it in items)
            padded = [it + [it[-1]] * (width - len(it)) for it in items]  # duplicates rewrite the same slot
            h = torch.stack([torch.stack([x[2] for x in it]) for it in padded])  # (R, W, H)
            pos = torch.tensor([[x[0] for x in it] for it in padded], device=device)  # (R, W)
            start = torch.tensor([[x[1] for x in it] for it in padded], device=device)  # (R, W)
            bidx = torch.tensor(running, device=device)
            # loops in this call: the cap at once when nothing else rides along (every pending loop of a
            # capped run sits at the cap, so none falls due before it)
            n = max_loops if whole and width == 1 and all(rows[r].loop == 0 for r in running) else 1
            # the head at the current item (the last position of each row; padding repeats it), applied
            # by the engine batched over every request of the step, when the policy reads it after every
            # loop; else emit applies it to the rows that leave, and loops that decide nothing skip it
            res = yield Forward(h, pos, start_loop=start, num_loops=n, logits="last" if need_probs else None,
                                copy_slots=list(copies))
            copies.clear()
            n_items = sum(len(it) for it in items)
            counts["decode_loops"] += n_items * n
            counts["finish_loops"] += n_items - len(items)
            cur = torch.tensor([len(it) - 1 for it in items], device=device)
            ar = torch.arange(len(running), device=device)
            hidden = res.hidden[-1, ar, cur]  # (R, H) current items after this call's last loop
            next_width = 1
            for i, r in enumerate(running):
                row = rows[r]
                for j, x in enumerate(items[i][:-1]):  # the pending items just advanced by one loop
                    x[1], x[2] = x[1] + 1, res.hidden[0, i, j]
                row.pending = [x for x in row.pending if x[1] < T]
                row.loop += n
                row.h = hidden[i]
                due = sum(x[1] == row.loop for x in row.pending) if lazy else len(row.pending)
                next_width = max(next_width, 1 + due)
            for j in range(n):  # the lambdas of the loops just run
                gates[bidx, torch.tensor([rows[r].loop - n + j for r in running], device=device)] = res.gates[j, ar, cur]
            logits, probs = (res.logits[-1, :, 0] if need_probs else None), None  # (R, V) at the current items
            if need_probs:
                probs = logits.float().softmax(-1)
                for i, r in enumerate(running):
                    rows[r].probs.append(probs[i])
            now = clock()
            kv_len = int(pos.max()) + 1
            if n == 1:  # the loop-cost model times one-loop calls (what a budget decision predicts)
                cost.update(cost.key(len(running), width, kv_len), (now - t_prev) * 1e3)
            loops_now = torch.tensor([rows[r].loop for r in running], device=device)
            # the next loop's forward if every row goes on: as many rows, next_width positions per row
            predicted = cost.predict(cost.key(len(running), next_width, kv_len))
            reasons = decide(running, loops_now, hidden, probs, now, predicted)
            prev_hidden[bidx] = hidden
            if need_probs:
                prev_probs[bidx] = probs
            leaving = [i for i, why in enumerate(reasons) if why is not None]
            if leaving:
                jx = torch.tensor(leaving, device=device)
                yield from emit(
                    [running[i] for i in leaving],
                    [reasons[i] for i in leaving],
                    [rows[running[i]].loop for i in leaving],
                    hidden[jx],
                    None if logits is None else logits[jx],
                    False,
                    now,
                )
            t_prev = clock()
    finally:
        _stats(req, log, counts, T, policy, plan, skip, cost, finish, fast)


def _stats(req, log, counts, T, policy, plan, skip, cost, finish, step) -> None:
    n = len(log["exit_loops"])
    decode_tokens = len(log["latency_ms"])
    st = {
        "skip": skip,
        "finish": finish if skip == "exact" else None,
        "step": step or "eager",
        "mean_loops": sum(log["exit_loops"]) / n if n else 0.0,  # mean exit loop (the loops a token waited for)
        "mean_exit_loop": sum(log["exit_loops"]) / n if n else 0.0,  # the same (the facade overwrites mean_loops)
        "exit_loop_counts": [log["exit_loops"].count(t) for t in range(1, T + 1)],
        "exit_reasons": {k: log["reasons"].count(k) for k in ("max_depth", "policy", "budget")},
        # (token, loop) pairs per emitted token: T for prefill-emitted tokens, plus every decode loop run,
        # including exact mode's finishing of skipped loops
        "loops_computed_per_token": ((n - decode_tokens) * T + counts["decode_loops"]) / n if n else 0.0,
        "finish_loops": counts["finish_loops"],
        "copied_slots": counts["copied_slots"],
        "budget": None if plan is None else {"per_token_ms": plan.per_token_ms, "deadline_ms": plan.deadline_ms, "loops": plan.loops},
        "budget_miss_rate": None,
        "loop_cost_ms": {f"rows={k[0]},width={k[1]},ctx<{2 ** k[2]}": v for k, v in cost.ema.items()},
        "emit_cost_ms": cost.emit_ms,
    }
    if plan is not None and plan.timed and decode_tokens:
        miss = [lat > b for lat, b in zip(log["latency_ms"], log["budget_ms"])]
        st["budget_miss_rate"] = sum(miss) / decode_tokens
    if decode_tokens:
        lat = sorted(log["latency_ms"])
        st["p95_latency_ms"] = lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]
    if policy is not None:
        sig = [s for s in log["signal_at_exit"] if not math.isnan(s)]
        st["policy"] = {**policy.describe(), "mean_signal_at_exit": sum(sig) / len(sig) if sig else None}
    req.stats.update(st)
