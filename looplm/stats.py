"""One vocabulary of request statistics for every mode: `Generation.stats` is a `Stats`.

The engine (looplm.scheduler) fills the keys every mode carries when a request ends; a decoder adds
its mode's keys to `DecodeRequest.stats` as it runs (keys starting with "_" are the engine's own
bookkeeping and never reach `Generation.stats`). A plain dict at run time, read as `stats["key"]`;
this type lists every key a mode may emit, with its meaning (a test holds each mode to it).
Loops are 1-based depths here, as at the API: exit loop t is the head after loops 1..t.
"""

# (no `from __future__ import annotations`: TypedDict sees NotRequired only in evaluated annotations)
from typing import NotRequired, TypedDict


class BudgetStats(TypedDict):
    """anytime's budget in force (anytime.Budget's fields): None where not set."""

    per_token_ms: float | None
    deadline_ms: float | None
    loops: int | None


class Stats(TypedDict):
    """Statistics of one finished (or cancelled) request: the shared keys, then each mode's."""

    # -- every mode (the engine) -----------------------------------------------------------------
    mode: str  # "full", "speculative" or "anytime"
    kv: str  # the request's KV mode: "per_loop", "last" or "mean"
    finish_reason: str  # "stop", "length" or "context", as Generation.finish_reason
    new_tokens: int  # tokens emitted
    tokens_per_s: float  # new_tokens / wall time from submit to the end (queueing included)
    elapsed_ms: float  # wall time from submit to the end
    mean_exit_loop: float  # mean over tokens of the 1-based loop whose head chose the token
    mean_loops: float  # the same as mean_exit_loop (the older name)
    loops_computed_per_token: float  # (position, loop) pairs computed per new token: T for the prefill's token, every decode loop run
    weight_passes_per_token: float  # loops of every runner step the request took part in (prefill included) per new token
    forwards: int  # Forward work items the request's decoder yielded
    tokens_per_forward: float  # new_tokens / forwards (the prefill's Forward included)
    runner_steps: int  # engine steps that ran work of the request
    token_loops: int  # (position, loop) pairs of every Forward, prefill included
    # -- every decoder ---------------------------------------------------------------------------
    prefill_ms: NotRequired[float]  # wall time of the prompt's prefill (absent when cancelled before it ran)
    # -- full ------------------------------------------------------------------------------------
    step: NotRequired[str]  # how decode steps ran: "eager", "fixed" or "compiled"
    # -- speculative -----------------------------------------------------------------------------
    exact_cache: NotRequired[bool]  # the per-loop cache ran (lossless); False on a shared-KV cache
    kv_bytes_per_token: NotRequired[int]  # cache bytes per position of the request
    draft: NotRequired[str]  # what drafted: "map", "extrapolate" or "loop"
    draft_map_unused: NotRequired[str]  # why the checkpoint's recommended draft map did not draft
    pipeline: NotRequired[bool]  # drafts were pipelined (spec.pipeline) rather than in rounds
    draft_loop: NotRequired[int]  # the 1-based loop whose head drafted (draft_loop="adaptive": the last one)
    loop_switches: NotRequired[list[list[int]]]  # draft_loop="adaptive": [tokens emitted, draft loop from then on], from the start
    call_cost: NotRequired[float]  # draft_loop="adaptive": a forward call's fixed cost in loop passes (spec.adapt)
    loop_acceptance: NotRequired[dict[str, float]]  # draft_loop="adaptive": loop -> mean acceptance of its drafts (spec.adapt)
    draft_len: NotRequired[int | str]  # drafts per round (int or "adaptive"); pipelined: drafts in flight
    extrapolate: NotRequired[float]  # the extrapolation c used (0.0 when unused)
    drafted: NotRequired[int]  # drafts proposed
    accepted: NotRequired[int]  # drafts accepted
    rejected: NotRequired[int]  # tested drafts that failed (pipelined)
    acceptance_rate: NotRequired[float]  # accepted / drafted
    token_acceptance: NotRequired[float]  # accepted / (accepted + rejections): the chance a tested draft passes
    mean_accepted_len: NotRequired[float]  # accepted drafts per round (pipelined: per run of accepted drafts)
    accepted_len_hist: NotRequired[list[int]]  # rounds (runs) by number of accepted drafts 0, 1, ...
    rounds: NotRequired[int]  # draft rounds (pipelined: forwards)
    loops_per_token: NotRequired[float]  # (token, loop) pairs computed after the prefill per emitted token
    fallback_at: NotRequired[int | None]  # tokens emitted when full depth first took over (None: never)
    fallback_reason: NotRequired[str | None]  # why: "drafts" (they stopped paying, for good) or "load" (a busy engine; spec.fallback)
    load_spans: NotRequired[list[list[int]]]  # [first, end) token indices decoded at full depth for load (speculation resumed after each but an open last)
    branch: NotRequired[int]  # draft trees (spec.trees): candidates per position
    branch_unused: NotRequired[str]  # why the checkpoint's recommended draft tree did not run (the caller's options, tensor parallelism)
    branch_threshold: NotRequired[float | None]  # branch only below this top-1 draft probability (None: always)
    forks: NotRequired[int]  # positions given more than one candidate
    rows_per_forward: NotRequired[float]  # mean rows of the decode Forwards (tokens in flight, every lane)
    max_rows: NotRequired[int]  # most rows of one decode Forward
    acceptance_by_depth: NotRequired[list[float | None]]  # per depth 1..D-1 past the last emitted token: tested positions with a winner
    tested_by_depth: NotRequired[list[int]]  # tested positions per depth 1..D-1
    won_by_rank: NotRequired[list[int]]  # tested positions won by the top-1, top-2, ... candidate
    draft_tokens: NotRequired[int]  # 2: second-token drafts in the pipeline (spec.multi)
    draft_tokens_unused: NotRequired[str]  # why the checkpoint's recommended second-token drafts did not run (the caller's options, a batch)
    finish_unused: NotRequired[str]  # why the checkpoint's recommended anytime finish="ahead" did not run (a time budget)
    second_threshold: NotRequired[float | str | None]  # second drafts only at or above this top-1 probability (None: always; "adaptive")
    seconds: NotRequired[int]  # second drafts proposed (counted in drafted too)
    seconds_tested: NotRequired[int]  # second drafts tested at loop T
    seconds_accepted: NotRequired[int]  # second drafts that passed
    pairs_emitted: NotRequired[int]  # forwards that emitted two tokens
    # -- anytime ---------------------------------------------------------------------------------
    skip: NotRequired[str]  # what skipped loops became: "exact", "copy" or "shared"
    finish: NotRequired[str | None]  # "eager" or "lazy" with skip="exact", else None
    exit_loop_counts: NotRequired[list[int]]  # tokens per exit loop 1..T
    exit_reasons: NotRequired[dict[str, int]]  # tokens per reason: "max_depth", "policy", "budget"
    finish_loops: NotRequired[int]  # skipped (position, loop) pairs run later (skip="exact")
    copied_slots: NotRequired[int]  # (loop, layer) K/V slots filled by copy (skip="copy")
    budget: NotRequired[BudgetStats | None]  # the budget in force, or None
    budget_miss_rate: NotRequired[float | None]  # fraction of decode tokens over their time budget (None: untimed)
    p95_latency_ms: NotRequired[float]  # 95th percentile of decode tokens' latency (when any decode token)
    loop_cost_ms: NotRequired[dict[str, float]]  # the loop-cost model's mean per (rows, width, context bucket)
    emit_cost_ms: NotRequired[float]  # the cost model's mean time from a decision to the emission
    policy: NotRequired[dict]  # the exit policy's description and mean_signal_at_exit (when a policy ran)


SHARED_KEYS: frozenset[str] = Stats.__required_keys__
