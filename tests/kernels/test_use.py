"""Backends plugged into the model: same logits and tokens as the reference path; compile-friendly."""

import pytest
import torch

import kernels
import looplm
from looplm import LoopConfig, LoopLM
from looplm.paged import PagedKVCache
from looplm.runner import Runner
from looplm.work import Forward


def tiny_model(seed=0, std=0.2):
    cfg = LoopConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, total_ut_steps=4, max_position_embeddings=128,
    )  # fmt: skip
    return LoopLM(cfg).init_weights(seed, std=std).eval()


def _decode_logits(model, prompts, tokens):
    """Prefill ragged prompts, then one decode step per column of `tokens` (sequence i is fed
    `tokens[i]`, the same whatever the logits say, so two backends see the same inputs), every
    sequence in each runner step; every loop's logits of every call (the runner attends with
    `model.attention`)."""
    steps = len(tokens[0])
    runner = Runner(model, PagedKVCache(model.config, 16, 4))
    pool = runner.cache.pool

    def run(fwds):
        return runner.run([(pool.ensure(r, int(f.pos.max()) + 1), f) for r, f in enumerate(fwds)])

    for r, p in enumerate(prompts):
        pool.admit(r, len(p) + steps)
    outs = run([Forward(torch.tensor([p]), torch.arange(len(p))[None], logits="last", logits_loops="all") for p in prompts])
    logits = [o.logits for o in outs]
    pos = [len(p) for p in prompts]
    for j in range(steps):
        tok = [t[j] for t in tokens]
        outs = run([Forward(torch.tensor([[t]]), torch.tensor([[q]]), logits="last", logits_loops="all") for t, q in zip(tok, pos)])
        logits += [o.logits for o in outs]
        pos = [q + 1 for q in pos]
    return logits


@pytest.mark.parametrize("name", kernels.BACKENDS)
def test_model_with_backend_matches_reference_path(name):
    reason = kernels.unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (5, 9, 2)]
    tokens = torch.randint(0, 64, (len(prompts), 3)).tolist()
    with torch.inference_mode():
        kernels.use(model, "reference")
        want = _decode_logits(model, prompts, tokens)
        assert kernels.use(model, name) is kernels.get_backend(name)
        got = _decode_logits(model, prompts, tokens)
    # float32 summed in another order, through 2 layers x 4 loops and 4 calls: measured up to
    # 4e-6 of the largest logit (40 seeds, triton interpreted); 2e-5 of it leaves 5x margin
    scale = max(float(b.abs().max()) for b in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=0)


def test_use_accepts_an_engine_and_generation_is_unchanged(monkeypatch):
    engine = looplm.Engine(tiny_model())
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=6, stop=[])]
    calls = []

    def spy(*args):  # the reference backend, counting its calls: the engine's runner must attend with it
        calls.append(1)
        return reference(*args)

    reference = kernels.reference_attention
    monkeypatch.setattr(kernels, "reference_attention", spy)
    assert kernels.use(engine, "reference") is spy
    assert engine.model.attention is spy
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=6, stop=[])] == want
    assert calls
    with pytest.raises(TypeError):
        kernels.use(object(), "sdpa")


def test_triton_op_composes_with_torch_compile():
    reason = kernels.unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    from kernels.triton_attention import triton_attention

    def f(q, k, v, q_pos, k_pos):
        return triton_attention(q * 2, k, v, q_pos, k_pos) + 1

    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    q_pos, k_pos = torch.tensor([[5, 6, 7], [17, 18, 19]]), torch.arange(20).expand(2, -1)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want = kernels.reference_attention(q * 2, k, v, q_pos, k_pos) + 1
    torch.testing.assert_close(compiled(q, k, v, q_pos, k_pos), want, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(triton_attention, (q, k, v, q_pos, k_pos), test_utils=("test_schema", "test_faketensor"))
