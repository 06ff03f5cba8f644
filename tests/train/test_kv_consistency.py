"""The K/V consistency term: its values by hand, exact zero on loop-invariant K/V, gradients into
the K/V projections, the trainer option, and --init-from a run's ckpt.pt (tiny configs)."""

import json

import numpy as np
import pytest
import torch

from looplm.train.objectives import kv_consistency_loss, per_loop_ce, weighted_per_loop_loss
from looplm.train.shared_kv import per_loop_kv, shared_kv_logits, stacked_kv
from looplm.train.trainer import TrainConfig, build_model, stage1_loss, train

from .counting import VOCAB, tiny_config, write_counting_data


def tiny_model(loops: int = 3, seed: int = 0):
    tc = TrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, total_ut_steps=loops, max_position_embeddings=64, seed=seed)
    model = build_model(tc, VOCAB)
    with torch.no_grad():  # training's 0.02 init leaves the loops' K/V nearly equal; spread them
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model


@pytest.mark.parametrize("target", ["last", "mean"])
def test_zero_exactly_when_every_loop_is_equal(target):
    states = [torch.randn(1, 2, 3, 7, 5).expand(4, 2, 3, 7, 5) for _ in range(4)]  # T = 4 copies per state
    loss, per_loop = kv_consistency_loss(states, target)
    assert loss.item() == 0.0 and torch.equal(per_loop, torch.zeros(4))
    states[3] = states[3].clone()
    states[3][1, 0, 0, 0, 0] += 1e-3  # one element of one loop of one state
    loss, per_loop = kv_consistency_loss(states, target)
    assert loss.item() > 0.0 and per_loop[1] > 0.0


@pytest.mark.parametrize("target", ["last", "mean"])
def test_values_by_hand(target):
    T = 3
    states = [torch.randn(T, 2, 4, 6) * s for s in (0.5, 3.0)]
    loss, per_loop = kv_consistency_loss(states, target)
    want = torch.zeros(T, dtype=torch.float64)
    for x in states:
        x = x.double()
        ref = x[-1] if target == "last" else x.sum(0) / T
        for t in range(T):
            want[t] += ((x[t] - ref) ** 2).mean() / (ref ** 2).mean() / len(states)
    torch.testing.assert_close(per_loop.double(), want, rtol=1e-5, atol=1e-7)  # float32 against float64
    counted = want[:-1] if target == "last" else want
    torch.testing.assert_close(loss.double(), counted.mean(), rtol=1e-5, atol=1e-7)
    # scale free: every state times its own factor leaves the term unchanged
    scaled, _ = kv_consistency_loss([states[0] * 100.0, states[1] * 0.01], target)
    torch.testing.assert_close(scaled, loss)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="target"):
        kv_consistency_loss([torch.randn(3, 4)], "first")
    with pytest.raises(ValueError, match="loop counts"):
        kv_consistency_loss([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="at least one"):
        kv_consistency_loss([])


@pytest.mark.parametrize("target", ["last", "mean"])
def test_gradient_reaches_the_kv_projections_and_not_the_last_loop(target):
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    _, kvs = per_loop_kv(model, torch.randint(0, VOCAB, (2, 12)))
    states = stacked_kv(kvs)
    assert len(states) == 2 * 2 and states[0].shape == (3, 2, 1, 12, 16)
    assert torch.equal(states[3][1], kvs[(1, 1)][1])  # layer 1's V at loop 1
    loss, _ = kv_consistency_loss(states, target)
    assert loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        if "k_proj" in name or "v_proj" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if target == "last":  # the target is detached: the last loop's K/V get no gradient from the term
        x = torch.randn(3, 2, 5, 4, requires_grad=True)
        kv_consistency_loss([x], target)[0].backward()
        assert torch.equal(x.grad[-1], torch.zeros(2, 5, 4)) and (x.grad[:-1] != 0).all()


def _batch():
    x, y = torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (4, 16))
    y[-1, :-1] = -100  # one task row, answer-only loss
    return x, y


def test_without_the_option_the_losses_are_the_previous_ones_bit_for_bit():
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    x, y = _batch()
    args = (model, x, y, "weighted", (1.0, 2.0, 3.0), 0.1, 1, 2.0)
    loss, ce, task, kv = stage1_loss(*args)
    per_loop = per_loop_ce(model.loop_outputs(x).logits, y)
    want, want_ce = weighted_per_loop_loss(per_loop[:, :3], (1.0, 2.0, 3.0))
    task_loss, want_task = weighted_per_loop_loss(per_loop[:, 3:], (1.0, 2.0, 3.0), y[3:] != -100)
    assert torch.equal(loss, want + 2.0 * task_loss) and torch.equal(ce, per_loop[:, :3].mean(dim=(1, 2)))
    assert torch.equal(task, want_task) and kv is None
    zero = stage1_loss(*args, kv_consistency=0.0, kv_target="mean")
    assert torch.equal(zero[0], loss) and zero[3] is None
    # the shared-KV step as well: the same logits as shared_kv_logits, the same loss with W = 0
    shared, teacher = shared_kv_logits(model, x, "last")
    s_loss, s_ce, _, s_kv = stage1_loss(*args, shared_kv="last", shared_kl=0.5)
    assert torch.equal(s_ce, per_loop_ce(shared, y)[:, :3].mean(dim=(1, 2))) and s_kv is None


@pytest.mark.parametrize("shared", [None, "mean"])
def test_the_option_adds_w_times_the_term_of_the_per_loop_pass(shared):
    model = tiny_model(seed=int(torch.randint(0, 1000, ())))
    x, y = _batch()
    args = (model, x, y, "weighted", (1.0, 2.0, 3.0), 0.1, 1, 2.0)
    base = stage1_loss(*args, shared_kv=shared, shared_kl=0.5)[0]
    loss, _, _, kv = stage1_loss(*args, shared_kv=shared, shared_kl=0.5, kv_consistency=0.25, kv_target="last")
    term, want_kv = kv_consistency_loss(stacked_kv(per_loop_kv(model, x)[1]), "last")
    assert torch.equal(kv, want_kv) and kv[-1] == 0.0 and (kv[:-1] > 0).all()
    assert torch.equal(loss, base + 0.25 * term)
    with pytest.raises(ValueError, match="objective 'weighted'"):
        stage1_loss(model, x, y, "entropy", (1.0, 2.0, 3.0), 0.1, kv_consistency=1.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_counting_data(tmp_path_factory.mktemp("data"), 300)


def test_trainer_option_shrinks_the_kv_distance_and_init_from_a_ckpt(data_dir, tmp_path):
    out = tmp_path / "kvc"
    train(tiny_config(data_dir, out, kv_consistency=10.0, kv_consistency_target="mean", shared_kv_every=2))
    steps = [json.loads(line) for line in open(out / "log.jsonl") if '"loss"' in line]
    assert [r.get("kv") for r in steps] == [None, "last", None, "mean"] * 3
    dist = [np.mean(r["kv_dist_per_loop"]) for r in steps]
    assert len(steps[0]["kv_dist_per_loop"]) == 3 and np.mean(dist[-3:]) < np.mean(dist[:3]), dist
    # a run's ckpt.pt is an --init-from source: the next run starts from its float32 weights
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    model = build_model(TrainConfig(init_from=str(out / "ckpt.pt")), VOCAB)
    assert model.config.to_dict() == ckpt["model_config"]
    for name, w in model.state_dict().items():
        assert torch.equal(w, ckpt["model"][name]), name


@pytest.mark.parametrize("bad, match", [(dict(kv_consistency=-1.0), "kv-consistency"),
                                        (dict(kv_consistency=1.0, kv_consistency_target="first"), "kv-consistency-target"),
                                        (dict(kv_consistency=1.0, objective="entropy"), "objective weighted")])
def test_trainer_rejects_bad_kv_consistency_options(data_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(data_dir, tmp_path, **bad))
