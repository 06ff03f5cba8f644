"""The cross-mode matrix: every decoder on the same models, in the same process, against full depth.

Each benchmark times greedy `Engine.generate` calls (warm-up outside the timed rounds, see
conftest.measure), records its numbers in `extra_info`, and asserts that what it timed is
correct — never that it is fast:
- full depth: every row gets its tokens at depth T, and a batched row equals the row alone;
- speculative: output equals full-depth output token for token (lossless);
- anytime: no budget equals full depth; a loop budget of k and Q-exit at q equal "emit from the
  exit loop's head, state from all T loops", recomputed without a cache (exact skip mode, float32);
  budgets in milliseconds emit at a loop in 1..T and record how often a token missed its budget;
- KV modes: "per_loop" equals full depth exactly; "last"/"mean" run end to end and record their
  agreement with full depth and their KV bytes per token.
Modes and options that have not landed yet are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import BenchModel, Measurement, mode_available
from looplm.exits import q_exit_loops

BATCHES = (1, 4, 16)

# (model, draft loop k, draft length g, batch); k >= the model's T is skipped. Drafts use the model's
# recommended options (the default model: its fitted map at k=2, extrapolate 0.5 at k=3)
SPEC_CASES = (
    [("default", k, g, 1) for k in (1, 2, 3) for g in (2, 4, 8, "adaptive")]
    + [("default", k, 4, b) for k in (1, 2) for b in (4, 16)]
    + [("random-100m", k, 4, 1) for k in (1, 2, 3)]
    + [("random-100m", 2, 4, 4)]
)

# (model, options, batch): pipelined self-speculation (spec.pipeline) with plain, extrapolated and
# (the default model's recommendation) fitted-map drafts; draft_map=None turns the recommended map off
PIPELINE_CASES = (
    [("default", {"draft_loop": k, "pipeline": True, "extrapolate": 0.0, "draft_map": None}, 1) for k in (1, 2)]
    + [("default", {"draft_loop": 2, "pipeline": True, "extrapolate": 0.5, "draft_map": None}, 1)]
    # the pipeline with the checkpoint's recommended draft map; draft_tokens=1 whatever else it recommends
    + [("default", {"draft_loop": 2, "pipeline": True, "draft_tokens": 1}, b) for b in (1, 4, 16)]
    + [("random-100m", {"draft_loop": 2, "pipeline": True, "extrapolate": 0.0}, 1)]
)

# (model, options, batch); budget_ms_frac is a fraction of the same run's full-depth ms per token
ANYTIME_CASES = (
    [("default", {}, 1)]
    + [("default", {"budget_loops": k}, 1) for k in (1, 2, 3)]
    + [("default", {"budget_ms_frac": f}, 1) for f in (0.25, 0.5, 0.75)]
    + [("default", {"exit": "q_exit", "q": q}, 1) for q in (0.3, 0.5, 0.7, 0.9)]
    + [("default", {"exit": "q_exit", "q": 0.5}, b) for b in (4, 16)]
    # the bundled model recommends finish="ahead" (the rows above); the loop-by-loop decoder beside it
    + [("default", {"exit": "q_exit", "q": 0.5, "finish": "eager"}, b) for b in (1, 16)]
    + [("random-100m", {"budget_loops": 2}, 1), ("random-100m", {"exit": "q_exit", "q": 0.5}, 1),
       ("random-100m", {"exit": "q_exit", "q": 0.5, "finish": "ahead"}, 1)]
)

# (model, kv mode, decoder mode, decoder options, batch)
KV_CASES = (
    [("default", kv, "full", {}, b) for kv in ("per_loop", "last", "mean") for b in (1, 16)]
    + [("default", "last", "speculative", {"draft_loop": 1, "draft_len": 4}, 1)]
    + [("default", "last", "anytime", {"exit": "q_exit", "q": 0.5}, 1)]
    + [("random-100m", kv, "full", {}, 1) for kv in ("per_loop", "last", "mean")]
)


def _case_id(model: str, options: dict, batch: int) -> str:
    opts = "-".join(f"{k}={v}" for k, v in options.items()) or "nobudget"
    return f"{model}-{opts}-b{batch}"


@pytest.fixture(scope="session")
def _availability() -> dict:
    return {}


@pytest.fixture
def require(_availability):
    """`require(bm, mode, **options)`: skips (once probed, cached per option names) when not landed."""

    def check(bm: BenchModel, mode: str, **options) -> None:
        key = (bm.name, mode, tuple(sorted(options)))
        if key not in _availability:
            _availability[key] = mode_available(bm, mode, **options)
        if _availability[key] is not None:
            pytest.skip(_availability[key])

    return check


@pytest.fixture
def get_model(request):
    def get(name: str) -> BenchModel:
        return request.getfixturevalue({"default": "default_model", "random-100m": "random_model"}[name])

    return get


def _assert_lengths(m: Measurement, bm: BenchModel) -> None:
    n = m.new_tokens // m.batch
    assert [len(o) for o in m.outputs] == [n] * m.batch, "every row must get all its new tokens (stop=[])"


@torch.inference_mode()
def _static_exit_reference(bm: BenchModel, prompts, outputs, exit_loops_of) -> tuple[list[list[int]], list[list[int]]]:
    """Per row, without a cache: the token each position's exit loop emits when every position's
    state comes from all T loops (the reference implementation's static/Q-exit semantics).

    exit_loops_of: (T, n) gates of the n positions that predict new tokens -> (n,) 1-based loops.
    """
    tokens, loops = [], []
    device = bm.model.lm_head.weight.device
    for p, out in zip(prompts, outputs):
        ids = torch.tensor([p + out[:-1]], device=device)
        o = bm.model.loop_outputs(ids)
        first = len(p) - 1  # the position predicting the first new token
        e = exit_loops_of(o.gates[:, 0, first:])  # (n,)
        logits = o.logits[:, 0, first:]  # (T, n, V)
        tokens.append(logits[e - 1, torch.arange(len(out), device=device)].argmax(-1).tolist())
        loops.append(e.tolist())
    return tokens, loops


# -- full depth --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", BATCHES)
def test_full_depth(bench_model, batch, measure, baselines):
    m = measure(bench_model, batch, "full")
    _assert_lengths(m, bench_model)
    T = bench_model.num_loops
    assert all(n == T for g in m.gens for n in g.loops), "full depth runs all T loops for every token"
    if batch > 1:  # a batch of ragged prompts gives each prompt's tokens alone
        assert m.outputs[0] == baselines.get(bench_model, 1).outputs[0]


# -- speculative -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_name,draft_loop,draft_len,batch", SPEC_CASES, ids=[f"{m}-k{k}-g{g}-b{b}" for m, k, g, b in SPEC_CASES]
)
def test_speculative(model_name, draft_loop, draft_len, batch, get_model, require, measure, baselines):
    bm = get_model(model_name)
    if draft_loop >= bm.num_loops:
        pytest.skip(f"draft loop {draft_loop} >= the model's {bm.num_loops} loops")
    # extrapolate=0: plain loop-k drafts here, whatever the checkpoint recommends (pipelined cases below)
    require(bm, "speculative", draft_loop=draft_loop, draft_len=draft_len, extrapolate=0.0)
    m = measure(bm, batch, "speculative", draft_loop=draft_loop, draft_len=draft_len, extrapolate=0.0)
    _assert_lengths(m, bm)
    assert m.outputs == baselines.get(bm, batch).outputs, "greedy speculative output must equal full depth"


@pytest.mark.parametrize("model_name,options,batch", PIPELINE_CASES, ids=[_case_id(*c) for c in PIPELINE_CASES])
def test_speculative_pipelined(model_name, options, batch, get_model, require, measure, baselines):
    bm = get_model(model_name)
    if bm.num_loops % options["draft_loop"]:
        pytest.skip(f"draft loop {options['draft_loop']} does not divide the model's {bm.num_loops} loops")
    require(bm, "speculative", **options)
    m = measure(bm, batch, "speculative", **options)
    _assert_lengths(m, bm)
    assert m.outputs == baselines.get(bm, batch).outputs, "greedy speculative output must equal full depth"


# -- anytime -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,options,batch", ANYTIME_CASES, ids=[_case_id(*c) for c in ANYTIME_CASES])
def test_anytime(model_name, options, batch, get_model, require, measure, baselines, benchmark):
    bm = get_model(model_name)
    options = dict(options)
    budget_ms = None
    if "budget_ms_frac" in options:  # a budget between one loop's and the full depth's cost
        base = baselines.get(bm, 1)
        full_ms_per_token = 1e3 / base.decode_tokens_per_s
        budget_ms = options.pop("budget_ms_frac") * full_ms_per_token
        options["budget_ms"] = round(budget_ms, 3)
    require(bm, "anytime", **options)
    m = measure(bm, batch, "anytime", **options)
    _assert_lengths(m, bm)
    steps = [s for g in m.gens for s in g.steps]
    T = bm.num_loops
    assert all(1 <= s.exit_loop <= T and s.exit_loop <= s.loops <= T for s in steps)
    if not options:
        assert m.outputs == baselines.get(bm, batch).outputs, "anytime with no budget must equal full depth"
    if "budget_loops" in options:
        assert all(s.exit_loop <= options["budget_loops"] for s in steps), "a loop budget of k emits at loop <= k"
    exact = bm.model.lm_head.weight.dtype == torch.float32 and options.get("skip", "exact") == "exact"
    if exact and set(options) <= {"budget_loops", "exit", "q", "finish"} and options.get("exit", "q_exit") == "q_exit" and options:
        k = min(options.get("budget_loops", T), T)
        q = options.get("q")

        def exit_loops_of(gates):
            e = torch.full(gates.shape[1:], k, dtype=torch.long, device=gates.device)
            return e if q is None else torch.minimum(e, q_exit_loops(gates, q))

        want_tokens, want_loops = _static_exit_reference(bm, bm.prompts(batch), m.outputs, exit_loops_of)
        assert m.outputs == want_tokens, "exact-mode anytime must emit the exit loop's token of the full-state model"
        assert [[s.exit_loop for s in g.steps] for g in m.gens] == want_loops
    if budget_ms is not None:
        missed = [s.latency_ms > budget_ms for g in m.gens for s in g.steps[1:]]  # first token carries prefill
        benchmark.extra_info["budget_ms"] = budget_ms
        benchmark.extra_info["budget_miss_rate"] = sum(missed) / max(len(missed), 1)
        latencies = sorted(s.latency_ms for g in m.gens for s in g.steps[1:])
        if latencies:
            benchmark.extra_info["p95_latency_ms"] = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]


# -- KV modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_name,kv,mode,options,batch",
    KV_CASES,
    ids=[f"{m}-{kv}-{mode}-b{b}" for m, kv, mode, _, b in KV_CASES],
)
def test_kv_modes(model_name, kv, mode, options, batch, get_model, require, measure, baselines):
    bm = get_model(model_name)
    if mode != "full":
        require(bm, mode, **options)
    require(bm, mode, kv=kv, **options)
    m = measure(bm, batch, mode, kv=kv, **options)
    _assert_lengths(m, bm)
    if kv == "per_loop":
        assert m.outputs == baselines.get(bm, batch).outputs, "the per-loop cache is the exact one"
