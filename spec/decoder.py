"""Self-speculative decoding: draft with the shared head at loop k, verify with loops k+1..T.

A round, per row, starting from the last emitted token x (which has no loops computed yet):

    draft   for i in 0..g-1: run token i of [x, d_1, .., d_{g-1}] through loops 1..k
            (one Forward per draft token); its loop-k head proposes d_{i+1}; its
            loop-1..k K/V stay in the cache and its loop-k hidden state is kept.
    verify  one Forward over those g positions with start_loop=k: loops k+1..T from
            the saved loop-k states, writing loops k+1..T of the cache. Its logits at position i
            are the exact full-depth next-token logits given the drafted prefix.
    accept  greedy prefix match or the Leviathan/Chen rule (spec.accept); a row emits its
            accepted drafts plus, after a rejection, the target's own token. The last emitted
            token starts the next round.

Every position that enters a round thus gets loops 1..k once (drafting) and loops k+1..T once
(verification): nothing is recomputed. The cache is never rolled back: positions after a
rejection hold stale K/V that the next round overwrites before any query can see them.

Exactness: lossless against the exact per-loop cache: every emitted token's logits come from all
T loops over exact per-loop K/V of its prefix. Greedy output equals `mode="full"` token for token
up to floating-point reassociation (a multi-position verification may round differently from a
one-position step; only a near-exact tie could flip an argmax, and the tests never see one). A
shared-KV cache (Engine.generate(kv="last" | "mean")) runs but is not lossless: drafted tokens
read loop-k K/V where full depth reads the shared value; req.stats["exact_cache"] says which ran.

One request is one sequence (row 0); the engine runs the Forwards of concurrent requests together.
A request drafts at most as many tokens as it may still emit, so its positions stay within the
cache positions it reserved (prompt plus new tokens).
"""

from __future__ import annotations

import functools

import torch

from looplm.decoding import Decoder, DecodeRequest, Step
from looplm.model import LoopLM
from looplm.sampling import probabilities, sample
from looplm.work import Forward

from .accept import accept_greedy, accept_sampled
from .adapt import LoopChooser, start_loop
from .drafts import DraftMap, draft_state, resolve_draft_map
from .fallback import with_fallback
from .multi import decode_pairs
from .pipeline import decode_pipelined
from .schedule import DraftLength
from .seconds import SecondChooser
from .start import first_step, start_request
from .trees import decode_tree

# Defaults measured on the bundled default model (d256, 2 layers x 4 loops) at batch 1 on a CPU,
# greedy, 128 new tokens after each of 16 prompts (benchmarks/test_spec_speedup.py; numbers in
# benchmarks/RESULTS.md): pipelined (spec.pipeline) k=2 is fastest, ~1.5x full depth with the
# model's fitted draft map (spec.fit_draft; 91% of drafts accepted) against ~1.4x with drafts
# extrapolated from loops 1-2 (80%) and ~1.35x from loop 2 alone; draft rounds peak at ~1.2x.
# The model's generation_config.json recommends k=2 and its draft map. k=2 is the default draft
# loop; pipelining is the default whenever k divides T and no draft length is asked for.
DEFAULT_DRAFT_LOOP = 2
DEFAULT_DRAFT_LEN: int | str = 3


def decode(
    model: LoopLM,
    req: DecodeRequest,
    *,
    draft_loop: int | None = None,
    draft_len: int | str | None = None,
    pipeline: bool | None = None,
    extrapolate: float = 0.0,
    draft_map: "DraftMap | str | None" = None,
    branch: int = 1,
    branch_threshold: float | None = None,
    draft_tokens: int = 1,
    second_threshold: float | str | None = None,
    fallback: bool = True,
    full_depth_above: int | None = None,
    call_cost: float = 0.0,
) -> Decoder:
    """Self-speculative decoder (mode "speculative"): lossless, drafts from loop `draft_loop`.

    Its options arrive checked (looplm.options.SpeculativeOptions, when the engine submits the
    request); the draft map is loaded and checked here (spec.drafts.resolve_draft_map).

    Args:
        model: the looped model (T = model.num_loops >= 2).
        req: the validated batch (ragged prompts, per-row max_new, sampling params).
        draft_loop: 1-based loop k in 1..T-1 whose LM head drafts (default
            min(DEFAULT_DRAFT_LOOP, T-1)), or "adaptive": pipelined, one sequence, starting at the
            largest divisor of T up to DEFAULT_DRAFT_LOOP and moving between the divisors of T
            from the acceptance each loop's drafts would have had (spec.adapt); each loop drafts
            with the draft map's map for it if it has one, else as `extrapolate` says.
        draft_len: tokens drafted per round, an int >= 1, or "adaptive" (spec.schedule: picks
            g in 1..8 maximising expected tokens per loop pass from the running acceptance rate).
        pipeline: draft token n+1 in the same forward that runs token n's remaining loops
            (spec.pipeline; k must divide T, and the draft length is then T/k - 1 tokens in flight).
            None (default): pipelined when draft_len is not given and k divides T (it was faster
            than every fixed or adaptive draft length on the default model), else draft rounds.
        extrapolate: c in [0, 10]; drafts come from z_k + c (z_k - z_{k-1}) (spec.drafts). For
            k = 1 there is no earlier loop: drafts are loop 1's and stats["extrapolate"] is 0.0.
        draft_map: a fitted spec.drafts.DraftMap (or the path of one; `python -m spec.fit_draft`)
            whose map of the loop k-1 and k states drafts instead (extrapolate is then unused),
            when it has a map for loop k (else it is not used). stats["draft"] says what
            drafted: "map", "extrapolate" or "loop".
        branch: b >= 1; b > 1 runs draft trees in the pipeline (spec.trees): a token leaving its
            draft loop proposes b successors (greedy: its draft's top-b; sampling: b draws without
            replacement), the siblings run as lanes on forked block tables and the one full depth
            accepts continues (multi-candidate rejection when sampling). 1: spec.pipeline.
        branch_threshold: with branch > 1, branch only where the draft's top-1 probability is
            below this value in [0, 1] (None: always).
        draft_tokens: 1, or 2: the token leaving loop k also drafts the token after its successor
            with the draft map's second-token head (spec.multi; one sequence, pipelined, the map
            must have a second-token head for loop k); the two run as a pair, so one forward can
            finish two tokens. With branch > 1 the top-1 candidate of the tree's sequence lane
            carries the pair (spec.trees); with draft_loop="adaptive" pairs run at the loops whose
            map has the head (spec.multi). Not in a batch (a recommended draft_tokens=2 then gives way to the
            plain pipeline, and stats["draft_tokens_unused"] says why).
        second_threshold: with draft_tokens=2, draft the second token only where its head's
            top-1 probability is at least this value (None: always; "adaptive": where second
            drafts at that confidence have paid in this request so far, spec.seconds).
        call_cost: with draft_loop="adaptive", a forward call's fixed cost in loop passes (>= 0;
            0: decode time follows weight passes), the r of spec.adapt's cost model.
        fallback: switch a one-sequence request (every branch b; draft trees are one sequence) to
            full depth for the rest of the request once drafts stop paying (fewer than a quarter
            of the last 12 tokens were accepted drafts; spec.fallback); stats["fallback_at"] says
            when (None: never). A tree's side lanes still alive at the switch are dropped by the
            first full-depth Forward (looplm.lanes.end_lanes).
        full_depth_above: decode a one-sequence request at full depth while more than this many
            requests are in the engine (req.load, read after every emitted token; a sampled request
            with a seed never switches), speculating again once the load falls (spec.fallback);
            stats["fallback_reason"] says which rule switched first ("drafts" or "load"),
            stats["load_spans"] which tokens ran at full depth for load. None: never.
    Yields:
        Steps with loops = exit_loop = T (every token is exact); reason "draft" for an accepted
        draft, "verify" for a token chosen by full-depth logits (after a rejection, or the first
        token from the prefill); info = {"draft": bool, "accepted": a, "proposed": g} for the round.
    Stats (req.stats): draft_loop, draft_len, acceptance_rate (accepted / proposed drafts),
        token_acceptance (accepted / (accepted + rejections): the chance a tested draft passes,
        the alpha of (1 - alpha^(g+1)) / (1 - alpha), docs/design.md "Self-speculation"; drafts after a rejection are untested),
        mean_accepted_len (accepted drafts per row-round), accepted_len_hist (count of row-rounds
        by accepted drafts 0..g_max), rounds, drafted / accepted (draft totals), loops_per_token
        ((token, loop) pairs computed after the prefill / tokens emitted; includes rows that already
        finished, which keep computing so that shapes stay fixed), prefill_ms, exact_cache,
        kv_bytes_per_token (cache bytes per row and position).
    """
    T, B = model.num_loops, req.batch_size
    p = model.lm_head.weight
    recommended = "draft_map" in req.recommended
    threshold = second_threshold if second_threshold in (None, "adaptive") else float(second_threshold)
    if draft_loop == "adaptive":  # options checked: pipelined, one candidate per position
        chooser = LoopChooser(T, call_cost)
        maps = {j: resolve_draft_map(draft_map, model.config.hidden_size, j, p.dtype, p.device, recommended=True)
                for j in chooser.loops}
        drafters = {j: (0.0 if j < 2 or m is not None else float(extrapolate), m) for j, m in maps.items()}
        k = start_loop(T, DEFAULT_DRAFT_LOOP)
        req.stats.update(draft=_draft_kind(*drafters[k]), fallback_at=None, fallback_reason=None, call_cost=float(call_cost))  # draft: at the start loop
        if draft_tokens == 2:  # second drafts at the loops whose map has a second-token head
            why = (f"it decodes one sequence per request, got a batch of {B}" if B != 1 else
                   "no draft map with a second-token head for any draft loop (`python -m spec.fit_draft --next`)"
                   if not any(m is not None and m.has_next(j) for j, m in maps.items()) else None)
            draft_tokens = _pairs_or_why(req, why)
        if draft_tokens == 2:
            seconds = SecondChooser(T // k) if threshold == "adaptive" else None
            build = functools.partial(decode_pairs, model, k=k, draft_map=None, threshold=threshold, chooser=seconds,
                                      loops=chooser, drafters=drafters)  # one chooser of each kind throughout
        else:
            build = functools.partial(decode_pipelined, model, k=k, chooser=chooser, drafters=drafters)  # one chooser throughout
        yield from _watched(model, req, build, fallback, full_depth_above)
        return
    k = min(DEFAULT_DRAFT_LOOP, T - 1) if draft_loop is None else draft_loop
    if k < 2:
        extrapolate = 0.0  # loop 1 has no earlier loop to extrapolate from (stats say 0.0)
    dmap = resolve_draft_map(draft_map, model.config.hidden_size, k, p.dtype, p.device, recommended=recommended)
    if draft_map is not None and dmap is None:  # the checkpoint's map has no map for this loop: said, not silent
        req.stats["draft_map_unused"] = f"the checkpoint's recommended draft map has no map for draft_loop={k}"
    if dmap is not None:
        extrapolate = 0.0
    req.stats["draft"] = _draft_kind(extrapolate, dmap)
    req.stats.update(fallback_at=None, fallback_reason=None)
    if pipeline is None:
        pipeline = draft_len is None and T % k == 0
    if branch > 1 and getattr(model, "tp", None) is not None:  # lanes copy cache positions outside the runner step rank 0 broadcasts
        if "branch" not in req.recommended:
            raise ValueError(f"branch={branch} (draft trees) does not run under tensor parallelism yet; use branch=1")
        req.stats["branch_unused"] = f"the checkpoint's recommended branch={branch} (draft trees) does not run under tensor parallelism yet"
        branch = 1
    if draft_tokens == 2:  # options and the pipeline requirement: looplm.options.SpeculativeOptions
        why = (f"it decodes one sequence per request, got a batch of {B}" if B != 1 else
               f"no draft map with a second-token head for draft_loop={k} (`python -m spec.fit_draft --next`)"
               if dmap is None or not dmap.has_next(k) else None)
        draft_tokens = _pairs_or_why(req, why)
    # one chooser for every part of the request: a decoder restarted after a load switch keeps its history
    seconds = SecondChooser(T // k) if draft_tokens == 2 and threshold == "adaptive" else None
    if branch > 1:  # options, ranges and the pipeline requirement: looplm.options.SpeculativeOptions
        if branch > model.config.vocab_size:
            raise ValueError(f"branch must be at most the vocabulary size {model.config.vocab_size}, got {branch}")
        if B != 1:
            raise ValueError(f"branch={branch} (draft trees) decodes one sequence per request, got a batch of {B}")
        build = functools.partial(decode_tree, model, k=k, branch=branch, extrapolate=float(extrapolate), draft_map=dmap,
                                  threshold=None if branch_threshold is None else float(branch_threshold),
                                  seconds=draft_tokens == 2, second_threshold=threshold, chooser=seconds)
    elif draft_tokens == 2:
        build = functools.partial(decode_pairs, model, k=k, draft_map=dmap, threshold=threshold, chooser=seconds)
    elif pipeline:
        build = functools.partial(decode_pipelined, model, k=k, extrapolate=float(extrapolate), draft_map=dmap)
    else:
        build = functools.partial(_decode_rounds, model, k=k, draft_len=draft_len, extrapolate=extrapolate, dmap=dmap)
    yield from _watched(model, req, build, fallback, full_depth_above)


def _pairs_or_why(req: DecodeRequest, why: str | None) -> int:
    """draft_tokens for a request that asked for 2: 2 unless `why` (what rules pairs out here) is
    given; then a caller's request raises and the checkpoint's recommendation gives way (1)."""
    if why is not None and "draft_tokens" not in req.recommended:
        raise ValueError(f"draft_tokens=2: {why}")
    if why is not None:  # the checkpoint's recommendation gives way: first drafts only
        req.stats["draft_tokens_unused"] = f"the checkpoint's recommended draft_tokens=2 does not run here: {why}"
        return 1
    return 2


def _watched(model: LoopLM, req: DecodeRequest, build, fallback: bool, full_depth_above: int | None) -> Decoder:
    """The speculative decoder `build(req)`, watched by spec.fallback where a rule applies (one
    sequence); a load switch restarts `build` on the rest of the request once the load falls."""
    inner = build(req)
    if req.batch_size != 1 or not (fallback or full_depth_above is not None):
        return (yield from inner)
    return (yield from with_fallback(model, req, inner, drafts=fallback, load_above=full_depth_above, restart=build))


def _draft_kind(extrapolate: float, dmap: DraftMap | None) -> str:
    """stats["draft"]: what drafts at a loop with this extrapolation and draft map."""
    return "map" if dmap is not None else "extrapolate" if extrapolate else "loop"


def _decode_rounds(model: LoopLM, req: DecodeRequest, k: int, draft_len: int | str | None, extrapolate: float,
                   dmap: DraftMap | None) -> Decoder:
    """Draft rounds (the module docstring): g drafts at loop k, one verifying Forward, accept."""
    T, B = model.num_loops, req.batch_size
    schedule = DraftLength(DEFAULT_DRAFT_LEN if draft_len is None else draft_len, k, T)
    params, gen = req.sampling, req.generator

    timer, last = yield from start_request(model, req)  # last: the row's last emitted token, which starts the next round
    device = model.lm_head.weight.device
    steps_ar = torch.arange(schedule.max, device=device)
    embed = model.model.embed_tokens  # drafted ids come from the head, so they need no range check
    computed = 0  # (token, loop) pairs this request ran after prefill
    produced, pos = [0] * B, [len(p) for p in req.prompts]  # pos: position of the row's last token
    hist = [0] * (schedule.max + 1)
    n_acc = n_prop = n_rej = n_rounds = emitted = 0

    def stats():
        req.stats.update(
            pipeline=False,
            draft_loop=k,
            draft_len=draft_len if draft_len is not None else DEFAULT_DRAFT_LEN,
            extrapolate=extrapolate,
            drafted=n_prop,
            accepted=n_acc,
            acceptance_rate=n_acc / max(n_prop, 1),
            rejected=n_rej,
            token_acceptance=n_acc / max(n_acc + n_rej, 1),
            mean_accepted_len=n_acc / max(sum(hist), 1),
            accepted_len_hist=list(hist),
            rounds=n_rounds,
            loops_per_token=computed / max(emitted, 1),
        )

    stats()  # complete from the start: spec.fallback may close the decoder at its first Step
    for row in range(B):
        if req.active(row, 0):
            yield first_step(row, last[row], T, timer)
            produced[row] = 1
    emitted = sum(produced)
    # On a CPU a small model is bound by per-op dispatch, not arithmetic: a round builds its index
    # tensors once, keeps the drafted ids on the device, and moves data to the host once.
    try:
        while True:
            g = schedule.current
            g_rows = [min(g, req.max_new[r] - produced[r]) if req.active(r, produced[r]) else 0 for r in range(B)]
            G = max(g_rows)
            if G == 0:
                break
            state = torch.tensor([last, pos, g_rows], device=device)  # (3, B): one transfer per round
            inp, limit = state[0, :, None], state[2]  # inp (B, 1): the token each draft call embeds
            v_pos = state[1, :, None] + steps_ar[:G]  # (B, G) positions of the round

            # -- draft: one k-loop call per draft token, keeping loop-k hidden states -----------
            hs, drafts, qs = [], [], []
            for i in range(G):
                out = yield Forward(embed(inp), v_pos[:, i : i + 1], num_loops=k, gates=False)
                hs.append(out.hidden[-1])  # (B, 1, H) loop-k state of token i
                computed += B * k
                z = model.head(draft_state(out.hidden, extrapolate, dmap))  # (B, 1, V) draft logits
                if params.greedy:
                    inp = z.argmax(-1)  # (B, 1)
                else:
                    q = probabilities(z[:, 0], params)  # (B, V)
                    qs.append(q)
                    inp = sample(q, gen)[:, None]
                drafts.append(inp)
            drafts_t = torch.cat(drafts, 1)  # (B, G)

            # -- verify: loops k+1..T over all G positions in one call --------------------------
            target = (yield Forward(torch.cat(hs, 1), v_pos, start_loop=k, logits="all", gates=False)).logits[-1]  # (B, G, V)
            computed += B * G * (T - k)
            if params.greedy:
                accepted, tokens = accept_greedy(drafts_t, target.argmax(-1), limit)
            else:
                accepted, tokens = accept_sampled(drafts_t, torch.stack(qs, 1), probabilities(target, params), limit, gen)

            # -- emit: one host transfer per round ----------------------------------------------
            host = torch.cat([tokens, accepted[:, None]], 1).tolist()
            n_rounds += 1
            # the round's verdicts count before its Steps: spec.fallback may close the decoder at any of them
            rejections = sum(1 for r in range(B) if g_rows[r] and host[r][-1] < g_rows[r])
            n_rej += rejections
            schedule.update(sum(host[r][-1] for r in range(B) if g_rows[r]), rejections)
            for row in range(B):
                if g_rows[row] == 0:
                    continue
                *toks, a = host[row]
                m = a + (a < g_rows[row])  # accepted drafts, plus the target's token after a rejection
                pos[row] += m
                last[row] = toks[m - 1]
                hist[a] += 1
                n_acc, n_prop = n_acc + a, n_prop + g_rows[row]
                info = {"draft": True, "accepted": a, "proposed": g_rows[row]}
                for j in range(m):
                    if not req.active(row, produced[row]):
                        break
                    is_draft = j < a
                    yield Step(row, produced[row], toks[j], T, T, timer.lap(row), "draft" if is_draft else "verify",
                               info=info if is_draft else {**info, "draft": False})
                    produced[row] += 1
                    emitted += 1
            stats()
    finally:  # also when closed mid-round (spec.fallback): the verified rounds count
        stats()
