"""Shared-KV training pass and the teacher-forced runner, against the model's own forward and the
engine's shared-KV decoding (Engine.generate(..., kv=...)) on tiny random models."""

import pytest
import torch

from looplm.api import Engine
from looplm.config import LoopConfig
from looplm.model import LoopLM
from looplm.train.shared_kv import per_loop_kv, shared_kv_logits, shared_pass_logits, shared_value, teacher_forced_shared

VOCAB = 64


def tiny_model(loops: int = 3, seed: int = 0, std: float = 0.3) -> LoopLM:
    cfg = LoopConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, total_ut_steps=loops, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    # a larger init than training's 0.02 makes the argmax well separated (no float ties)
    return LoopLM(cfg).init_weights(seed, std=std).eval()


def test_shared_value_last_and_mean():
    xs = [torch.randn(2, 2, 5, 8) for _ in range(3)]
    assert torch.equal(shared_value(xs, "last"), xs[-1])
    torch.testing.assert_close(shared_value(xs, "mean"), torch.stack(xs).mean(0), rtol=1e-6, atol=1e-6)
    half = [x.bfloat16() for x in xs]
    assert shared_value(half, "mean").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shared KV mode"):
        shared_value(xs, "first")


def test_per_loop_runner_equals_loop_outputs_exactly():
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, VOCAB, (3, 17))
    logits, kv = per_loop_kv(model, ids)
    assert torch.equal(logits, model.loop_outputs(ids).logits)
    assert len(kv) == 3 * 2 and kv[(2, 1)][0].shape == (3, 2, 17, 8)


@pytest.mark.parametrize("kv", ["last", "mean"])
def test_one_loop_shared_pass_is_the_per_loop_forward(kv):
    """With T = 1 the shared K/V of a position is its only loop's: the shared pass is the plain forward."""
    model = tiny_model(loops=1, seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, VOCAB, (2, 20))
    logits, teacher = shared_kv_logits(model, ids, kv)
    ref = model.loop_outputs(ids).logits
    assert torch.equal(teacher, ref)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", ["last", "mean"])
def test_shared_pass_reads_shared_kv_of_earlier_positions(kv):
    """The parallel pass at the last position equals the one-token call after a per-loop prefill of
    everything before it; position 0 sees only itself and equals the per-loop forward; the other
    positions differ from the per-loop forward (the pass really reads the shared K/V)."""
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, VOCAB, (2, 12))
    logits, teacher = shared_kv_logits(model, ids, kv)
    decoded = teacher_forced_shared(model, ids, kv, prefill=11)
    # different attention kernels (one masked call over 2S keys vs one call per position): float32
    # rounding grows over the loops to ~2e-5 on logits of magnitude ~10; a wrong key set is >1e-2 off
    torch.testing.assert_close(logits[:, :, -1], decoded[:, :, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, :, 0], teacher[:, :, 0], rtol=1e-4, atol=1e-4)
    assert (logits[1:, :, 1:] - teacher[1:, :, 1:]).abs().amax() > 1e-2


def test_shared_pass_gradients_flow_to_the_weights_not_through_the_shared_kv():
    model = tiny_model()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    logits, teacher = shared_kv_logits(model, ids, "last")
    assert logits.requires_grad and not teacher.requires_grad
    logits[-1, :, -1].logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "k_proj" in n or "q_proj" in n)


@pytest.mark.parametrize("kv", ["last", "mean"])
def test_kv_grad_carries_the_shared_pass_loss_into_the_kv_it_reads(kv):
    """With kv_grad the same logits come out, and the loss reaches exactly the K/V the shared cache
    keeps: the last loop's for "last" (earlier loops' K/V unused), every loop's for "mean" with
    1/T of the gradient the shared value gets; detached, it reaches none of them."""
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, VOCAB, (2, 9))
    T = model.num_loops
    _, kvs = per_loop_kv(model, ids)
    for layer in range(2):
        kvs[(T - 1, layer)] = tuple(x.detach().requires_grad_() for x in kvs[(T - 1, layer)])
        kvs[(0, layer)] = tuple(x.detach().requires_grad_() for x in kvs[(0, layer)])
    w = torch.randn(T, 2, 9, VOCAB)
    detached, grad = shared_pass_logits(model, ids, kvs, kv), shared_pass_logits(model, ids, kvs, kv, kv_grad=True)
    assert torch.equal(detached, grad)
    leaves = [kvs[(t, layer)][i] for t in (0, T - 1) for layer in range(2) for i in (0, 1)]
    assert torch.autograd.grad((detached * w).sum(), leaves, allow_unused=True) == (None,) * len(leaves)
    got = torch.autograd.grad((grad * w).sum(), leaves, allow_unused=True)
    first, last = got[:4], got[4:]
    assert all(g is not None and g.abs().sum() > 0 for g in last)
    if kv == "last":
        assert first == (None,) * 4
    else:
        for a, b in zip(first, last):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # each loop's share of the mean is 1/T


def test_kv_grad_step_trains_the_per_loop_pass_through_the_shared_kv():
    """shared_kv_logits(kv_grad=True) builds the per-loop pass with gradients even without teacher_grad."""
    model = tiny_model()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    logits, teacher = shared_kv_logits(model, ids, "mean", kv_grad=True)
    assert teacher.requires_grad
    assert torch.equal(logits, shared_kv_logits(model, ids, "mean")[0])


@pytest.mark.parametrize("kv", ["last", "mean"])
def test_teacher_forced_runner_reproduces_engine_decoding(kv):
    """Greedy Engine.generate(kv=...) tokens, fed back teacher-forced, are the runner's argmax at
    every decoded position; the prefill's logits are the per-loop forward's."""
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    engine = Engine(model)
    prefill, new = 9, 14
    prompts = torch.randint(1, VOCAB, (2, prefill)).tolist()
    for prompt in prompts:
        tokens = engine.generate(prompt, max_new_tokens=new, kv=kv, stop=[]).tokens
        ids = torch.tensor([prompt + tokens[:-1]])
        logits = teacher_forced_shared(model, ids, kv, prefill=prefill)
        assert logits[-1, 0, prefill - 1 :].argmax(-1).tolist() == tokens
        assert torch.equal(logits[:, :, :prefill], model.loop_outputs(ids[:, :prefill]).logits)
        # and it is not the per-loop cache's computation
        assert (logits[:, :, prefill:] - model.loop_outputs(ids).logits[:, :, prefill:]).abs().amax() > 1e-2


def test_teacher_forced_runner_rejects_bad_arguments():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="prefill"):
        teacher_forced_shared(model, ids, "last", prefill=8)
    with pytest.raises(ValueError, match="shared KV mode"):
        teacher_forced_shared(model, ids, "per_loop", prefill=4)
