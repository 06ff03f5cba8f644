"""Where batch-1 decode time goes: loop bodies by rows, LM head calls, the rest (issue 15's speed target).

Self-speculation cuts weight passes (loops per forward, summed), not row-loops: every emitted
token still runs its T loops on some row, and a pipelined forward runs rows at different loops
through one loop body. So the speed-up follows weight passes only where an extra row costs little
next to reading the weights (a GPU at batch 1, a CPU on a model larger than its caches). This
measures what a row costs here, inside real decodes: the bundled default model, CPU, batch 1, one
torch thread, NEW_TOKENS new tokens after each of the first PROMPTS benchmark prompts, full depth,
the checkpoint's recommended speculative setting and draft trees from loop 1 with three candidates
(up to 16 rows per call), in turn, REPEATS times. Every
`LoopLM.loop_body` and `LoopLM.head` call is timed (an instance attribute wraps the method for the
duration of the test; nothing else changes) and binned by its rows.

Recorded per mode, over the decode steps (the prefill of each prompt timed alone and taken out;
the best repeat by decode time): tokens/s; loop-body calls, row-loops and
milliseconds per token; head calls, rows and milliseconds per token; the rest (runner, cache,
decoder) per token; and the mean milliseconds of a loop-body call by its rows. From those, the
row-cost bound: a decoder that runs its row-loops in calls of R rows spends at least
T * c(R) / R per token in loop bodies, against full depth's T * c(1), so its speed-up is at most
R * c(1) / c(R) before heads and bookkeeping. Asserts only what was timed: speculative outputs equal
to full depth, T loops per full-depth token.

    python -m pytest benchmarks/test_row_cost.py --benchmark-only -s
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

from benchmarks.conftest import TEXT_PROMPTS

PROMPTS = 8
NEW_TOKENS = 128
REPEATS = 3
# the decoders timed: full depth, the checkpoint's recommended speculative setting, and draft trees
# from loop 1 with three candidates, whose many rows per call extend the cost curve to larger R
MODES = {"full": {"mode": "full"}, "speculative": {"mode": "speculative"},
         "trees": {"mode": "speculative", "draft_loop": 1, "branch": 3, "draft_tokens": 1}}


class _Calls:
    """Per rows: call count and seconds, for one method of the model."""

    def __init__(self):
        self.n: dict[int, int] = defaultdict(int)
        self.s: dict[int, float] = defaultdict(float)

    def wrap(self, fn):
        def timed(h, *args):
            t = time.perf_counter()
            out = fn(h, *args)
            rows = h.shape[:-1].numel()
            self.s[rows] += time.perf_counter() - t
            self.n[rows] += 1
            return out
        return timed


@contextmanager
def _timed(model, body: _Calls, head: _Calls):
    """Times every loop_body and head call of `model` while the block runs."""
    model.loop_body = body.wrap(type(model).loop_body.__get__(model))
    model.head = head.wrap(type(model).head.__get__(model))
    try:
        yield
    finally:
        del model.loop_body, model.head


def _decode_only(calls: _Calls, prefill: _Calls) -> _Calls:
    """The calls of the decode steps: those of the same prompts' prefills (timed alone) taken out."""
    out = _Calls()
    for r in calls.n:
        n = calls.n[r] - prefill.n.get(r, 0)
        if n:
            out.n[r], out.s[r] = n, max(calls.s[r] - prefill.s.get(r, 0.0), 0.0)
    return out


def _measure(engine, prompts, **opts) -> dict:
    """Each prompt generated alone; the decode steps' loop-body and head calls, by rows."""
    body, head, pre_body, pre_head = _Calls(), _Calls(), _Calls(), _Calls()
    wall = prefill_s = 0.0
    gens = []
    for p in prompts:
        with _timed(engine.model, pre_body, pre_head):  # the prefill alone: max_new_tokens=1
            t0 = time.perf_counter()
            engine.generate(p, max_new_tokens=1, stop=[], **opts)
            prefill_s += time.perf_counter() - t0
        with _timed(engine.model, body, head):
            t0 = time.perf_counter()
            gens.append(engine.generate(p, max_new_tokens=NEW_TOKENS, stop=[], **opts))
            wall += time.perf_counter() - t0
    body, head = _decode_only(body, pre_body), _decode_only(head, pre_head)
    steps = sum(len(g.tokens) - 1 for g in gens)  # the first token comes from the prefill
    decode_s = wall - prefill_s
    body_s, head_s = sum(body.s.values()), sum(head.s.values())
    return {
        "tokens": [g.tokens for g in gens], "wall_s": wall, "decode_s": decode_s, "decode_tokens_per_s": steps / decode_s,
        "loop_calls_per_token": sum(body.n.values()) / steps,
        "row_loops_per_token": sum(r * n for r, n in body.n.items()) / steps,
        "loop_ms_per_token": 1e3 * body_s / steps,
        "head_calls_per_token": sum(head.n.values()) / steps,
        "head_rows_per_token": sum(r * n for r, n in head.n.items()) / steps,
        "head_ms_per_token": 1e3 * head_s / steps,
        "other_ms_per_token": 1e3 * (decode_s - body_s - head_s) / steps,
        "loop_ms_by_rows": {r: 1e3 * body.s[r] / body.n[r] for r in sorted(body.n)},
        "loop_calls_by_rows": {r: body.n[r] for r in sorted(body.n)},
        "steps": steps,
    }


def test_row_cost(benchmark, engine, bench_device, bench_quick):
    if bench_device != "cpu":
        pytest.skip("measured on the CPU (the bundled model, batch 1, one thread)")
    prompts = TEXT_PROMPTS[:2 if bench_quick else PROMPTS]
    repeats = 1 if bench_quick else REPEATS
    T = engine.model.num_loops
    load_before = os.getloadavg()
    for opts in MODES.values():  # warm-up
        _measure(engine, prompts[:2], **opts)
    runs = {name: [] for name in MODES}
    for _ in range(repeats):
        for name, opts in MODES.items():
            runs[name].append(_measure(engine, prompts, **opts))
    best = {name: min(rs, key=lambda r: r["decode_s"]) for name, rs in runs.items()}
    full, spec = best["full"], best["speculative"]
    for name, r in best.items():
        assert r["tokens"] == full["tokens"], f"{name} output differs from full depth"
    assert full["row_loops_per_token"] == T  # every decode step runs one row through T loops
    # pooled over every repeat of every mode: the mean ms of a loop-body call of R rows
    by_rows = defaultdict(lambda: [0.0, 0])
    for rs in runs.values():
        for r in rs:
            for R, ms in r["loop_ms_by_rows"].items():
                by_rows[R][0] += ms * r["loop_calls_by_rows"][R]
                by_rows[R][1] += r["loop_calls_by_rows"][R]
    cost = {R: s / n for R, (s, n) in sorted(by_rows.items()) if n >= 20}  # rows with enough calls to time
    one = cost.get(1)
    # the rows a speculative loop body mostly ran, and the bound they imply
    common = max(spec["loop_calls_by_rows"], key=spec["loop_calls_by_rows"].get)
    for r in best.values():
        del r["tokens"]
    info = {
        "modes": best,
        "mode_options": {name: {k: v for k, v in engine.generate(prompts[0], max_new_tokens=2, **opts).stats.items()
                                if k in ("draft_loop", "branch", "draft_tokens", "second_threshold")}
                         for name, opts in MODES.items() if opts["mode"] == "speculative"},
        "loop_ms_by_rows": {str(R): ms for R, ms in cost.items()},
        "cost_ratio_by_rows": {str(R): ms / one for R, ms in cost.items()} if one else {},
        "common_rows": common,
        "row_bound": common * one / cost[common] if one and common in cost else None,
        # the cheapest row-loop timed, and the bound for a decoder whose every call held that many rows
        "cheapest_rows": min(cost, key=lambda R: cost[R] / R) if cost else None,
        "ratio_to_full": spec["decode_tokens_per_s"] / full["decode_tokens_per_s"],
        "prompts": len(prompts), "new_tokens": NEW_TOKENS, "repeats": repeats, "threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    for mode in info["modes"].values():  # JSON keys are strings
        mode["loop_ms_by_rows"] = {str(R): v for R, v in mode["loop_ms_by_rows"].items()}
        mode["loop_calls_by_rows"] = {str(R): v for R, v in mode["loop_calls_by_rows"].items()}
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
