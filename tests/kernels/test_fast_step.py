"""The fixed-shape (compiled) decode step gives the eager decoder's tokens and compiles once; the
facade runs it with Engine.generate(step=...)."""

import pytest
import torch

import looplm
import kernels.fast_step
from kernels.fast_step import DecodeStep
from looplm import LoopConfig, LoopLM
from looplm.cache import cache_factory
from looplm.decoding import prefill


def tiny_model(seed):
    cfg = LoopConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, total_ut_steps=4, max_position_embeddings=128,
    )  # fmt: skip
    return LoopLM(cfg).init_weights(seed, std=0.2).eval()


def _tokens(model, prompts, new, kv="per_loop", step=None):
    """Greedy tokens through the facade (decode_full), eager or with a step."""
    gens = looplm.Engine(model).generate(prompts, max_new_tokens=new, stop=[], kv=kv, step=step)
    return torch.tensor([g.tokens for g in gens])


def _setup():
    model = tiny_model(int(torch.randint(0, 10_000, ())))
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (6, 2, 9)]
    return model, prompts


@pytest.mark.parametrize("kv", ["per_loop", "last"])
def test_fixed_shape_step_equals_eager_decoding(kv):
    model, prompts = _setup()
    new = 8
    engine_tokens = [g.tokens for g in looplm.Engine(model).generate(prompts, max_new_tokens=new, stop=[], kv=kv)]
    make = cache_factory(kv) or (lambda m, b, n: m.new_cache(b, n))
    step = DecodeStep(model, make(model, 3, 40), compile=False)
    before = model.token_loops
    got = _tokens(model, prompts, new, kv, step)
    assert got.tolist() == engine_tokens
    assert model.token_loops - before == 3 * 9 * 4 + 3 * (new - 1) * 4  # padded prefill + decode steps, 4 loops each


def test_compiled_step_traces_whole_and_never_recompiles():
    model, prompts = _setup()
    eager_cache, cache = model.new_cache(3, 24), model.new_cache(3, 24)
    want = _tokens(model, prompts, 6)
    assert torch.equal(_tokens(model, prompts, 6, step=DecodeStep(model, eager_cache, strategy="graph", compile=False)), want)
    step = DecodeStep(model, cache, strategy="graph", backend="aot_eager")  # fullgraph=True: a graph break fails
    step.warmup()  # writes only position 23, which no query below reaches
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _tokens(model, prompts, 6, step=step)
    assert torch.equal(got, want)
    n = 9 + 5  # longest prompt + decode steps: every written position matches the eager cache
    torch.testing.assert_close(cache.k[..., :n, :], eager_cache.k[..., :n, :], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv", ["per_loop", "mean"])
def test_compiled_layer_halves_match_eager_and_compile_once_for_all_layers_and_loops(kv):
    from kernels.fast_step import uncompile_layers

    model, prompts = _setup()
    make = cache_factory(kv) or (lambda m, b, n: m.new_cache(b, n))
    want = _tokens(model, prompts, 6, kv)
    cache = make(model, 3, 24)
    step = DecodeStep(model, cache, strategy="layers", backend="aot_eager")
    try:
        step.warmup()  # compiles the decode shapes: one graph per half, reused by 2 layers x 4 loops
        with torch.inference_mode():
            tok = prefill(model, cache, prompts).logits[-1, :, 0].argmax(-1)  # prefill shape: its own graphs
        pos, got = cache.lengths.clone(), [tok]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(5):
                tok = step(tok, pos).argmax(-1)
                pos, got = pos + 1, got + [tok]
        assert torch.equal(torch.stack(got, 1), want)
    finally:
        uncompile_layers(model)
    assert "before_attention" not in vars(model.model.layers[0])


@pytest.mark.parametrize("kv", ["per_loop", "last", "mean"])
def test_compiled_loop_graph_matches_eager_for_every_cache(kv):
    """One graph for all T loops (the CPU default): same tokens and same cache as eager decoding."""
    model, prompts = _setup()
    make = cache_factory(kv) or (lambda m, b, n: m.new_cache(b, n))
    eager_cache, cache = make(model, 3, 24), make(model, 3, 24)
    want = _tokens(model, prompts, 6, kv)
    assert torch.equal(_tokens(model, prompts, 6, kv, DecodeStep(model, eager_cache, strategy="loop", compile=False)), want)
    step = DecodeStep(model, cache, strategy="loop", backend="aot_eager")
    assert step.strategy == "loop"
    step.warmup()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _tokens(model, prompts, 6, kv, step)
    assert torch.equal(got, want)
    # the tokens are exact; the cache entries differ by float32 op order between graph and eager (the
    # same fixed-shape step uncompiled). In
    # a shared cache ("last", "mean") later positions read entries that already carry those rounding
    # differences, so they compound over the 6 steps x T loops: measured up to ~5e-5 on entries of
    # size ~1. The per-loop cache has no such feedback and keeps the 1e-5 bound.
    rtol = 1e-4 if kv in ("last", "mean") else 0
    torch.testing.assert_close(cache.k[..., :14, :], eager_cache.k[..., :14, :], rtol=rtol, atol=1e-5)
    torch.testing.assert_close(cache.v[..., :14, :], eager_cache.v[..., :14, :], rtol=rtol, atol=1e-5)


def test_mean_cache_is_refused_by_the_whole_step_graph():
    model, _ = _setup()
    with pytest.raises(ValueError, match="mean"):
        DecodeStep(model, cache_factory("mean")(model, 1, 8), strategy="graph", compile=False)


@pytest.mark.gpu
def test_cuda_graph_step_matches_eager_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA graphs (mode='reduce-overhead') are checked only on a GPU")
    model = tiny_model(0).cuda()
    prompts = [[1, 2, 3], [4, 5]]
    want = _tokens(model, prompts, 8)
    step = DecodeStep(model, model.new_cache(2, 32))
    step.warmup()
    assert torch.equal(_tokens(model, prompts, 8, step=step), want)


def test_engine_pools_fixed_shape_steps_per_shape():
    model, prompts = _setup()
    engine = looplm.Engine(model)
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[])]
    for _ in range(2):  # the second request reuses the first one's step (and cache)
        gens = engine.generate(prompts, max_new_tokens=7, stop=[], step="fixed")
        assert [g.tokens for g in gens] == want and gens[0].stats["step"] == "fixed"
    assert len(kernels.fast_step._POOL[model]) == 1
    assert engine.generate(prompts[0], max_new_tokens=7, stop=[], step="fixed").tokens == want[0]  # batch 1: a new step
    assert len(kernels.fast_step._POOL[model]) == 2
    shared = [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[], kv="last")]
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[], kv="last", step="fixed")] == shared
    assert len(kernels.fast_step._POOL[model]) == 3  # a KV mode is a shape of its own
    assert {getattr(s.cache, "kv", "per_loop") for s in kernels.fast_step._POOL[model].values()} == {"per_loop", "last"}
    with pytest.raises(ValueError, match="step"):
        engine.generate(prompts, max_new_tokens=3, step="warp")
    small = DecodeStep(model, model.new_cache(1, 8), compile=False)
    with pytest.raises(ValueError, match="needs 3 x"):
        engine.generate(prompts, max_new_tokens=3, step=small)
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=7, stop=[])] == want  # still usable


def test_engine_compiled_step_decodes_the_eager_tokens():
    """step="compiled": inductor, compiled once per shape, then reused without recompiling."""
    model, prompts = _setup()
    engine = looplm.Engine(model)
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=6, stop=[])]
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=6, stop=[], step="compiled")] == want
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert [g.tokens for g in engine.generate(prompts, max_new_tokens=6, stop=[], step="compiled")] == want
