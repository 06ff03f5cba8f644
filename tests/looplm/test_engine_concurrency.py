"""The engine core under concurrency: batch independence, the paged cache's accounting, admission."""

import gc
import random
import resource
import threading
import time

import pytest
import torch

import looplm

from .conftest import tiny_model

# (mode, options) of every decoding mode the engine runs
MIXED = [
    ("full", {}),
    ("speculative", {"draft_loop": 1, "draft_len": 2}),  # rounds
    ("speculative", {"draft_loop": 2, "pipeline": True}),  # pipelined (k divides T = 4)
    ("anytime", {"budget_loops": 2}),
    ("anytime", {"exit": "q_exit", "q": 0.5}),
    ("anytime", {"exit": "confidence", "threshold": 0.1, "skip": "copy"}),
    ("anytime", {"exit": "confidence", "threshold": 0.1, "finish": "lazy"}),
    ("full", {"kv": "last"}),
    ("anytime", {"budget_loops": 3, "kv": "mean"}),
]


def _requests(n: int, vocab: int):
    """n requests of mixed modes, prompt lengths, lengths, greedy and seeded sampling."""
    out = []
    for i in range(n):
        mode, opts = MIXED[i % len(MIXED)]
        opts = dict(opts)
        if i % 3 == 2:
            opts.update(temperature=0.9, top_k=20, seed=random.randrange(10_000))
        prompt = torch.randint(0, vocab, (random.randint(1, 20),)).tolist()
        out.append((prompt, random.randint(4, 16), mode, opts))
    return out


def record_steps(engine, record, kvs=("per_loop",)) -> list:
    """Wraps the runners of the KV modes `kvs`: each runner step first appends
    `record(items, running requests)` to the returned list."""
    steps = []
    for kv in set(kvs):
        runner = engine.scheduler.runner(kv)

        def counted(items, run=runner.run):
            steps.append(record(items, engine.scheduler.running))
            return run(items)
        runner.run = counted
    return steps


def test_mixed_requests_from_threads_equal_each_request_alone():
    model = tiny_model(loops=4, max_pos=64)
    engine = looplm.Engine(model)
    reqs = _requests(24, model.config.vocab_size)
    alone = [engine.generate(p, max_new_tokens=n, stop=[], mode=m, **o).tokens for p, n, m, o in reqs]
    got: dict[int, list[int]] = {}
    errors = []
    order = list(range(len(reqs)))
    random.shuffle(order)
    chunks = [order[i::8] for i in range(8)]

    def worker(idx):
        try:
            for i in idx:
                time.sleep(random.uniform(0, 0.02))  # submitted at random moments while others run
                p, n, m, o = reqs[i]
                if i % 2:  # half stream, half generate
                    s = engine.stream(p, max_new_tokens=n, stop=[], mode=m, **o)
                    got[i] = [step.token for step in s]
                else:
                    got[i] = engine.generate(p, max_new_tokens=n, stop=[], mode=m, **o).tokens
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [got[i] for i in range(len(reqs))] == alone
    assert engine.usage()["running"] == 0
    assert all(c["blocks_used"] == 0 for c in engine.usage()["caches"].values())


def test_a_list_of_prompts_is_several_requests_sharing_forwards():
    model = tiny_model(loops=3)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 9, 5, 1)]
    batch = engine.generate(prompts, max_new_tokens=8, stop=[])
    steps_batched = engine.scheduler.runner("per_loop").steps
    for p, g in zip(prompts, batch):
        assert engine.generate(p, max_new_tokens=8, stop=[]).tokens == g.tokens
    steps_alone = engine.scheduler.runner("per_loop").steps - steps_batched
    assert steps_batched == 8 and steps_alone == 4 * 8  # one prefill step and 7 decode steps, together


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def test_thousand_requests_with_cancellations_leave_no_blocks_and_flat_memory():
    model = tiny_model(loops=4, max_pos=96)
    engine = looplm.Engine(model, cache_bytes=2**20, block_size=8)
    vocab = model.config.vocab_size

    def wave(n):
        streams = []
        for i in range(n):
            prompt = torch.randint(0, vocab, (random.randint(1, 30),)).tolist()
            mode, opts = MIXED[i % 4]
            streams.append(engine.stream(prompt, max_new_tokens=random.randint(1, 40), stop=[], mode=mode, **opts))
        for i, s in enumerate(streams):
            if i % 5 == 0:  # cancelled mid-stream: read a token or two, then close
                for _ in zip(range(i % 3), s):
                    pass
                s.close()
            else:
                assert len(list(s)) >= 1

    wave(100)  # warm-up: allocator pools and the cache are touched
    gc.collect()
    before = _rss_kb()
    for _ in range(9):
        wave(100)
    deadline = time.time() + 10
    while engine.usage()["running"] + engine.usage()["waiting"] and time.time() < deadline:
        time.sleep(0.01)
    usage = engine.usage()
    assert usage["running"] == 0 and usage["waiting"] == 0
    assert all(c["blocks_used"] == 0 for c in usage["caches"].values())
    gc.collect()
    assert _rss_kb() - before < 20_000  # flat: under 20 MB of growth over 900 requests


def test_a_request_larger_than_the_cache_is_refused_at_submit_and_others_wait_for_room():
    model = tiny_model(loops=3, max_pos=200)
    per_block = 8 * 2 * 3 * 2 * 2 * 8 * 4  # positions x K,V x T x L x Hkv x D x float32
    engine = looplm.Engine(model, cache_bytes=12 * per_block, block_size=8)
    assert engine.scheduler.num_blocks("per_loop") == 12
    with pytest.raises(ValueError, match="whole per_loop cache holds 12 blocks"):
        engine.generate(torch.randint(0, 61, (60,)).tolist(), max_new_tokens=40, stop=[])  # 100 positions
    assert engine.usage()["running"] == engine.usage()["waiting"] == 0  # nothing was queued
    prompts = [torch.randint(0, 61, (40,)).tolist() for _ in range(4)]  # 40 + 40 positions: 10 blocks each
    alone = [engine.generate(p, max_new_tokens=40, stop=[]).tokens for p in prompts]
    peak = []
    streams = engine.stream(prompts, max_new_tokens=40, stop=[])  # only one fits at a time: the others wait
    for _ in streams:
        peak.append(engine.usage()["waiting"])
    assert [g.tokens for g in streams.generations] == alone
    assert max(peak) >= 1  # some request really waited for room
    assert engine.usage()["caches"]["per_loop"]["blocks_used"] == 0


def test_long_prompts_join_in_chunks_and_decode_exactly():
    model = tiny_model(loops=3, max_pos=96)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (50, 3, 23)]
    whole = looplm.Engine(model, prefill_chunk=96)
    chunked = looplm.Engine(model, prefill_chunk=8)
    for mode, opts in [("full", {}), ("anytime", {"exit": "confidence", "threshold": 0.1}),
                       ("speculative", {"draft_loop": 1, "draft_len": 2})]:
        want = whole.generate(prompts, max_new_tokens=10, stop=[], mode=mode, **opts)
        got = chunked.generate(prompts, max_new_tokens=10, stop=[], mode=mode, **opts)
        assert [g.tokens for g in got] == [g.tokens for g in want], mode
        # the 50-token prompt ran as 7 chunks of 3 loops, not one Forward of 3 (the same decode after it;
        # compared with another prompt, an anytime request's decode loops could make up the difference)
        assert got[0].stats["weight_passes_per_token"] > want[0].stats["weight_passes_per_token"], mode


def test_a_decoding_request_keeps_going_while_a_long_prompt_is_chunked():
    model = tiny_model(loops=3, max_pos=200)
    engine = looplm.Engine(model, prefill_chunk=4, max_step_tokens=5)
    short = engine.stream([1, 2], max_new_tokens=30, stop=[])
    first = next(short)  # running
    runner = engine.scheduler.runner("per_loop")
    before = runner.steps
    long = engine.stream(torch.randint(0, 61, (120,)).tolist(), max_new_tokens=2, stop=[])
    rest = [first] + list(short)
    assert len(rest) == 30 and len(list(long)) == 2
    # the 120-token prompt took 30 chunk steps; the short request decoded during them (a budget of 5
    # positions fits one chunk of 4 and one decode row per step)
    assert runner.steps - before < 30 + 29
    assert [s.token for s in rest] == engine.generate([1, 2], max_new_tokens=30, stop=[]).tokens


def test_a_timed_request_makes_every_step_one_loop_and_outputs_stay_exact():
    """While a request keeps a time budget, many-loop Forwards run one loop per step (so the
    timed request decides after every loop); resuming a loop range is exact, so nothing changes."""
    model = tiny_model(loops=4, max_pos=64)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 9, 2)]
    modes = [("full", {}), ("speculative", {"draft_loop": 1, "draft_len": 2}), ("anytime", {"budget_loops": 3})]
    alone = [engine.generate(p, max_new_tokens=12, stop=[], mode=m, **o).tokens for p, (m, o) in zip(prompts, modes)]
    timed_alone = engine.generate([3, 4], max_new_tokens=12, stop=[], mode="anytime", budget_ms=1e6).tokens
    runner = engine.scheduler.runner("per_loop")
    steps = runner.steps
    streams = [engine.stream(p, max_new_tokens=12, stop=[], mode=m, **o) for p, (m, o) in zip(prompts, modes)]
    timed = engine.stream([3, 4], max_new_tokens=12, stop=[], mode="anytime", budget_ms=1e6)  # never binding
    assert [[s.token for s in st] for st in streams] == alone
    assert [s.token for s in timed] == timed_alone  # = full depth: the budget never binds
    assert runner.steps - steps >= 4 * 11  # the timed request's 11 decode tokens took a step per loop
    full = streams[0].generation.stats
    assert full["forwards"] == 12 and full["runner_steps"] > full["forwards"]  # its 4-loop Forwards ran a loop per step


@pytest.mark.parametrize("joining", [{"mode": "anytime", "budget_ms": 1e6}, {"kv": "last"}, {"kv": "mean"}])
def test_a_prompt_joining_beside_a_timed_request_runs_a_loop_per_step_and_stays_exact(joining):
    """A prompt longer than T positions (a second timed request's, or an untimed one on a shared-KV
    cache) that joins while a timed request decodes runs one loop per step, so the decoding request
    still gets a step per loop rather than one step holding the whole prompt's T loops; resuming a
    loop range is exact (the prompt's positions attend to each other within each loop's step)."""
    model = tiny_model(loops=4, max_pos=96)
    T = model.num_loops
    engine = looplm.Engine(model)
    first, second = (torch.randint(0, 61, (n,)).tolist() for n in (random.randint(2, 6), random.randint(T + 2, 20)))
    alone = [engine.generate(first, max_new_tokens=12, stop=[]).tokens,
             engine.generate(second, max_new_tokens=12, stop=[], kv=joining.get("kv", "per_loop")).tokens]
    def record(items, running):  # whether a timed token was out, and the loops of each Forward
        return (any(r.req.timed and r.generation.tokens for r in running),
                [f.num_loops if f.num_loops is not None else T - f.start_loop for _, f in items])

    steps = record_steps(engine, record, ("per_loop", joining.get("kv", "per_loop")))
    a = engine.stream(first, max_new_tokens=12, stop=[], mode="anytime", budget_ms=1e6)  # never binding: full depth
    out_a = [next(a).token]
    b = engine.stream(second, max_new_tokens=12, stop=[], **joining)
    out_a += [s.token for s in a]
    assert [out_a, [s.token for s in b]] == alone
    beside = [loops for decoding, loops in steps if decoding]
    assert len(beside) >= 4 * 11 and all(n == 1 for loops in beside for n in loops)


def test_steps_beside_a_timed_request_shrink_to_its_budget_and_everyone_stays_exact():
    """A budget no step can meet (1 us per token) leaves one untimed position per step beside the
    timed request (they take turns); once it ends, the untimed requests run together again."""
    model = tiny_model(loops=4, max_pos=96)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 9, 2, 7, 3, 4)]
    alone = [engine.generate(p, max_new_tokens=10, stop=[]).tokens for p in prompts]
    # (Forwards in the step, whether the timed request is running)
    steps = record_steps(engine, lambda items, running: (len(items), any(r.req.timed for r in running)))
    timed = engine.stream([3, 4], max_new_tokens=30, stop=[], mode="anytime", budget_ms=1e-3)
    next(timed)  # its prompt is in: the next tokens are budgeted
    streams = [engine.stream(p, max_new_tokens=10, stop=[]) for p in prompts]
    n_timed = 1 + len(list(timed))
    assert [[s.token for s in st] for st in streams] == alone
    assert n_timed == 30
    assert all(s.exit_loop == 1 for s in timed.generation.steps[1:])
    beside = [n for n, timed_running in steps if timed_running]
    # the first step beside it runs everyone and sets the cap; from then on the timed request and at most one other
    assert len(beside) >= 20 and max(beside[2:]) <= 2
    assert max(n for n, timed_running in steps if not timed_running) > 2  # the others share steps again


def test_the_first_timed_request_starts_beside_one_untimed_request_and_the_cap_grows_with_room():
    """Before any step beside a timed token was measured, a timed request's steps run at most one
    untimed position (not every untimed request); with a budget no step can miss, the cap grows
    until every untimed request runs beside it again; outputs stay exact."""
    model = tiny_model(loops=4, max_pos=128)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 9, 2, 7, 3, 4)]
    alone = [engine.generate(p, max_new_tokens=80, stop=[]).tokens for p in prompts]
    timed_prompt = torch.randint(0, 61, (4,)).tolist()
    # alone on an engine of its own: this one must not have run a timed request yet
    timed_alone = looplm.Engine(model).generate(timed_prompt, max_new_tokens=12, stop=[], mode="anytime", budget_ms=1e6).tokens
    steps = record_steps(engine, lambda items, running: (len(items), any(r.req.timed for r in running)))
    streams = [engine.stream(p, max_new_tokens=80, stop=[]) for p in prompts]
    deadline = time.monotonic() + 30
    while len(steps) < 3 and time.monotonic() < deadline:  # the untimed requests are decoding
        time.sleep(0.001)
    timed = engine.generate(timed_prompt, max_new_tokens=12, stop=[], mode="anytime", budget_ms=1e6)
    assert timed.tokens == timed_alone
    assert [[s.token for s in st] for st in streams] == alone
    beside = [n for n, has_timed in steps if has_timed]
    assert beside[0] <= 2  # the timed request and at most one other
    assert max(beside) == 7  # later, all six untimed requests beside it


def test_the_next_timed_request_starts_from_the_cap_the_last_one_left():
    """The cap on untimed positions outlives a timed request: a timed request that joins later
    starts from it, so its first steps (its prompt included) do not run every untimed request."""
    model = tiny_model(loops=4, max_pos=128)
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 9, 2, 7, 3, 4)]
    alone = [engine.generate(p, max_new_tokens=60, stop=[]).tokens for p in prompts]
    # per step: the Forwards in it, and the ids of the timed requests running
    steps = record_steps(engine, lambda items, running: (len(items), {r.id for r in running if r.req.timed}))
    streams = [engine.stream(p, max_new_tokens=60, stop=[]) for p in prompts]
    first = engine.stream([3, 4], max_new_tokens=10, stop=[], mode="anytime", budget_ms=1e-3)  # no step meets it: cap 1
    list(first)
    deadline = time.monotonic() + 30
    while steps[-1][1] and time.monotonic() < deadline:  # untimed steps run again before the next timed request
        time.sleep(0.001)
    assert not steps[-1][1]
    second = engine.stream(torch.randint(0, 61, (6,)).tolist(), max_new_tokens=10, stop=[], mode="anytime", budget_ms=1e-3)
    list(second)
    assert [[s.token for s in st] for st in streams] == alone
    first_id = next(min(ids) for _, ids in steps if ids)
    beside_second = [n for n, ids in steps if ids - {first_id}]
    assert len(beside_second) >= 10 and max(beside_second) <= 2  # from its first step: it and at most one other
    assert 2 in beside_second  # the untimed requests were still running beside it
