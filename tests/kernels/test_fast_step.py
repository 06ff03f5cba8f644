"""The fixed-shape (compiled) decode step gives the eager decoder's tokens and compiles once per
bucket; the engine's runner keeps its steps (Engine.generate(step=...)), so engines and threads
never share one."""

import threading

import pytest
import torch

import looplm
from kernels.fast_step import FixedStep, bucket_ctx, bucket_rows, compile_layers, uncompile_layers
from looplm.generate import decode_full
from looplm.paged import PagedKVCache
from looplm.runner import Runner, drive

from .conftest import T, lockstep, request, tiny_model


def _setup():
    model = tiny_model(int(torch.randint(0, 10_000, ())))
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (6, 2, 9)]
    return model, prompts


def _tokens(model, prompts, new, kv="per_loop", step=None):
    """Greedy tokens through the facade (decode_full), eager or with a fixed step."""
    gens = looplm.Engine(model).generate(prompts, max_new_tokens=new, stop=[], kv=kv, step=step)
    return [g.tokens for g in gens]


def _runner(model, kv, rows=None, ctx=None, **fixed) -> Runner:
    """A fresh runner; with a bucket (rows, ctx), a FixedStep(**fixed) built by hand against its
    cache is the runner's step of that bucket."""
    runner = Runner(model, PagedKVCache(model.config, 24, 4, kv=kv))
    if rows is not None:
        step = FixedStep(model, runner.cache, rows, ctx, **fixed)
        runner.fixed_steps[(rows, ctx, step.compiled)] = step
    return runner


def _lockstep(runner, prompts, new, step=None):
    """The prompts decoded together over the runner (the same rows every round); returns (tokens,
    each sequence's cache K and V) and frees the sequences' blocks."""
    model, kv = runner.model, runner.cache.kv
    decoders = [decode_full(model, request(p, new, kv), step=step) for p in prompts]
    steps = lockstep(runner, decoders, [len(p) + new for p in prompts])
    n = [len(p) + new - 1 for p in prompts]  # the last token is never run
    pool = runner.cache.pool
    caches = [runner.cache.sequence(pool.tables[i], n[i]) for i in range(len(prompts))]
    for i in range(len(prompts)):
        pool.release(i)
    return [[s.token for s in st] for st in steps], caches


@pytest.mark.parametrize("kv", ["per_loop", "last"])
def test_fixed_shape_step_equals_eager_decoding(kv):
    model, prompts = _setup()
    new = 8
    want = _tokens(model, prompts, new, kv)
    engine = looplm.Engine(model)
    gens = engine.generate(prompts, max_new_tokens=new, stop=[], kv=kv, step="fixed")
    assert [g.tokens for g in gens] == want
    assert all(g.stats["step"] == "fixed" for g in gens)
    # every request's own work: its prompt's prefill and T loops per later token
    assert [g.stats["token_loops"] for g in gens] == [(len(p) + new - 1) * T for p in prompts]
    steps = engine.scheduler.runner(kv).fixed_steps
    assert steps and all(not s.compiled and s.cache is engine.scheduler.runner(kv).cache for s in steps.values())
    assert sum(s.calls for s in steps.values()) >= new - 1  # the decode steps really ran fixed


@pytest.mark.parametrize("kv", ["per_loop", "last", "mean"])
def test_compiled_loop_graph_matches_eager_for_every_cache_and_never_recompiles(kv):
    """One graph (fullgraph: a graph break fails) for all T loops of a bucket: the eager decoder's
    tokens and cache, with padded rows (3 sequences in a 4-row bucket)."""
    model, prompts = _setup()
    new = 6
    want, eager_cache = _lockstep(_runner(model, kv), prompts, new)
    rows, ctx = bucket_rows(len(prompts)), bucket_ctx(max(len(p) for p in prompts) + new)
    assert rows == 4
    assert _lockstep(_runner(model, kv, rows, ctx, compile=False), prompts, new, "fixed")[0] == want
    torch._dynamo.reset()  # other tests' graphs of the same code must not count as this one's recompiles
    runner = _runner(model, kv, rows, ctx, backend="aot_eager")
    step = runner.fixed_steps[(rows, ctx, True)]
    _lockstep(runner, prompts, 2, "compiled")  # compiles the bucket
    calls = step.calls
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, cache = _lockstep(runner, prompts, new, "compiled")
    assert got == want
    assert step.calls - calls == new - 1  # one call per decode round (the prefill runs eagerly)
    # the tokens are exact; the cache entries differ by float32 op order between graph and eager. In
    # a shared cache ("last", "mean") later positions read entries that already carry those rounding
    # differences, so they compound over the 6 steps x T loops: ~2e-6 on entries of size ~4 for
    # most seeds, but 2.5e-5 on an entry of size 0.014 for seed 1660909540; the error is absolute
    # (carried from larger entries), so the bound is too. The per-loop cache compounds less (a loop's
    # entries read only the same loop's), but not nothing: 1.04e-5 on an entry of size 0.78 for seed
    # 1578722811, so it is bounded relative to the entry as well.
    rtol, atol = (1e-4, 1e-4) if kv in ("last", "mean") else (1e-4, 1e-5)
    for (k, v), (ek, ev) in zip(cache, eager_cache):
        torch.testing.assert_close(k, ek, rtol=rtol, atol=atol)
        torch.testing.assert_close(v, ev, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kv", ["per_loop", "mean"])
def test_compiled_layer_halves_match_eager_and_compile_once_for_all_layers_and_loops(kv):
    model, prompts = _setup()
    want = _lockstep(_runner(model, kv), prompts, 6)[0]
    torch._dynamo.reset()
    compile_layers(model, backend="aot_eager")
    try:
        runner = _runner(model, kv)
        _lockstep(runner, prompts, 6)  # compiles each shape once: one graph per half, reused by 2 layers x 4 loops
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert _lockstep(runner, prompts, 6)[0] == want
    finally:
        uncompile_layers(model)
    assert "before_attention" not in vars(model.model.layers[0])


def test_engine_keeps_fixed_steps_per_bucket_and_per_engine():
    model, prompts = _setup()
    engine = looplm.Engine(model)
    want = _tokens(model, prompts, 7)
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[], step="fixed")] == want
    assert engine.generate(prompts[0], max_new_tokens=7, stop=[], step="fixed").tokens == want[0]
    steps = engine.scheduler.runner("per_loop").fixed_steps
    alone = steps[(1, 128, False)]  # a request alone decodes one row: bucket (1 row, 128 positions)
    calls = alone.calls
    for p, w in zip(prompts, want):  # later requests of the bucket reuse its step
        assert engine.generate(p, max_new_tokens=7, stop=[], step="fixed").tokens == w
    assert steps[(1, 128, False)] is alone and alone.calls == calls + 3 * 6
    shared = _tokens(model, prompts, 7, kv="last")
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[], kv="last", step="fixed")] == shared
    last = engine.scheduler.runner("last")
    assert last.fixed_steps and all(s.cache is last.cache for s in last.fixed_steps.values())  # a KV mode has steps of its own
    other = looplm.Engine(model)  # another engine over the same model shares nothing
    assert other.generate(prompts[0], max_new_tokens=7, stop=[], step="fixed").tokens == want[0]
    assert other.scheduler.runner("per_loop").fixed_steps[(1, 128, False)] is not alone
    with pytest.raises(ValueError, match="step"):
        engine.generate(prompts, max_new_tokens=3, step="warp")
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[])] == want  # still usable


def test_threads_generating_with_fixed_steps_on_one_engine_get_their_sequential_tokens():
    """Two threads calling generate(step="fixed") at once on one engine (the process-wide pool of
    steps and caches returned other tokens here in 5 of 5 trials)."""
    model, _ = _setup()
    engine = looplm.Engine(model)
    work = [[torch.randint(0, 64, (n,)).tolist() for n in sizes] for sizes in ((5, 8), (3, 11, 2), (7,), (4, 4))]
    want = [[g.tokens for g in engine.generate(p, max_new_tokens=10, stop=[])] for p in work]
    for _ in range(3):
        got: dict[int, list] = {}
        start = threading.Barrier(2)

        def worker(lane):
            start.wait()
            for i in range(lane, len(work), 2):
                got[i] = [g.tokens for g in engine.generate(work[i], max_new_tokens=10, stop=[], step="fixed")]

        threads = [threading.Thread(target=worker, args=(lane,)) for lane in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(work))] == want
    assert engine.usage()["caches"]["per_loop"]["blocks_used"] == 0


def test_engine_compiled_step_decodes_the_eager_tokens():
    """step="compiled": inductor, compiled once per bucket, then reused without recompiling."""
    model, prompts = _setup()
    engine = looplm.Engine(model)
    want = _tokens(model, prompts, 6)
    torch._dynamo.reset()
    assert engine.generate(prompts[0], max_new_tokens=6, stop=[], step="compiled").tokens == want[0]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a request alone: bucket (1, 128) every time
        assert [engine.generate(p, max_new_tokens=6, stop=[], step="compiled").tokens for p in prompts] == want
    assert list(engine.scheduler.runner("per_loop").fixed_steps) == [(1, 128, True)]


@pytest.mark.gpu
def test_compiled_step_matches_eager_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled step on a GPU is checked only there")
    model = tiny_model(0).cuda()
    prompts = [[1, 2, 3], [4, 5]]
    want = _tokens(model, prompts, 8)
    engine = looplm.Engine(model)
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=8, stop=[], step="compiled")] == want
    alone = drive(engine.scheduler.runner("per_loop"), 10_000, 12, decode_full(model, request([1, 2, 3], 8), step="compiled"))
    assert [s.token for s in alone] == want[0]
