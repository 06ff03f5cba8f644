"""Shared-KV steps in the trainer, the teacher KL term, and the kv_eval script end to end (tiny configs)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from looplm.train.kv_eval import kv_eval, load_checkpoint, main as kv_eval_main
from looplm.train.objectives import teacher_kl_loss
from looplm.train.trainer import TokenData, TrainConfig, load_model, train

from .counting import VOCAB, tiny_config, write_counting_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_counting_data(tmp_path_factory.mktemp("data"), 300, ood=True)


def tiny(data_dir, out, **kw) -> TrainConfig:
    return tiny_config(data_dir, out, **{"eval_every": 6, **kw})


def test_teacher_kl_matches_kl_div():
    logits, teacher = torch.randn(3, 2, 5, 11), torch.randn(3, 2, 5, 11)
    loss, per_loop = teacher_kl_loss(logits, teacher, [1.0, 2.0, 3.0])
    ref = [F.kl_div(F.log_softmax(logits[t], -1), F.log_softmax(teacher[t], -1), log_target=True,
                    reduction="sum") / 10 for t in range(3)]
    torch.testing.assert_close(per_loop, torch.stack(ref))
    torch.testing.assert_close(loss, (ref[0] + 2 * ref[1] + 3 * ref[2]) / 6)
    zero, _ = teacher_kl_loss(logits, logits.clone(), [1.0, 1.0, 1.0])
    assert abs(zero.item()) < 1e-6
    with pytest.raises(ValueError, match="2 weights"):
        teacher_kl_loss(logits, teacher, [1.0, 1.0])


@pytest.fixture(scope="module")
def shared_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared")
    final = train(tiny(data_dir, out, shared_kv_every=2, shared_kv_modes="last,mean", shared_kv_kl=1.0,
                       ood_val=str(data_dir / "ood.bin")))
    return out, final


def test_trainer_alternates_shared_kv_steps_and_logs_them(shared_run):
    out, final = shared_run
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r.get("kv") for r in steps] == [None, "last", None, "mean"] * 3
    evals = [r for r in records if "val_per_loop" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert len(r["val_last_per_loop"]) == len(r["val_mean_per_loop"]) == len(r["ood_per_loop"]) == 3
    first = np.mean([r["loss"] for r in steps[:4]])
    last = np.mean([r["loss"] for r in steps[-4:]])
    assert last < first, (first, last)
    assert (final / "model.safetensors").is_file()


@pytest.mark.parametrize("bad, match", [(dict(shared_kv_modes="last,first"), "shared-kv-modes"),
                                        (dict(shared_kv_every=-1), "shared-kv-every"),
                                        (dict(objective="entropy"), "objective weighted")])
def test_trainer_rejects_bad_shared_kv_options(data_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train(tiny(data_dir, tmp_path, **{"shared_kv_every": 2, **bad}))


def test_kv_eval_one_loop_model_loses_nothing(data_dir, tmp_path):
    """With T = 1 a shared cache holds exactly the per-loop cache's K/V: no loss, full agreement."""
    final = train(tiny(data_dir, tmp_path / "one", total_ut_steps=1, loop_weights=[1.0], steps=4, eval_every=1000))
    model = load_model(final)
    batches = TokenData(data_dir / "val.bin", 24).fixed_batches(1, 4)
    r = kv_eval(model, batches, prefill=8)
    assert r["tokens"] == 4 * 24 and r["kv_tokens"] == 4 * 16
    for mode in ("last", "mean"):
        assert abs(r[f"{mode}_minus_per_loop"]) < 1e-4 and r[f"{mode}_agree"] == 1.0
    assert r["agree_loop1_T"] == 1.0 and r["loopT_in_loop1_top4"] == 1.0


def test_kv_eval_cli_on_a_checkpoint(data_dir, shared_run, tmp_path, capsys):
    _, final = shared_run
    out = tmp_path / "r.json"
    kv_eval_main(["--checkpoint", str(final), "--text", str(data_dir / "val.bin"), "--text", str(data_dir / "ood.bin"),
                  "--windows", "6", "--seq-len", "24", "--batch-size", "4", "--prefill", "8", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    for r in results.values():
        assert r["tokens"] == 6 * 24 and r["kv_tokens"] == 6 * 16 and len(r["per_loop_ce"]) == 3
        assert 0.0 <= r["last_agree"] <= 1.0 and r["agree_loop1_T"] <= r["loopT_in_loop1_top4"]
    assert "kv='mean'" in capsys.readouterr().out
    # a run's resumable ckpt.pt: its float32 weights, which the final checkpoint holds in bf16
    ckpt = torch.load(final.parent / "ckpt.pt", weights_only=False)["model"]
    model, shipped = load_checkpoint(final.parent / "ckpt.pt"), load_model(final)
    for name, w in model.state_dict().items():
        assert torch.equal(w, ckpt[name]) and torch.equal(w.bfloat16().float(), shipped.state_dict()[name])
    with pytest.raises(ValueError, match="not a looplm.train checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.pt")
        kv_eval_main(["--checkpoint", str(tmp_path / "other.pt"), "--text", str(data_dir / "val.bin")])
    with pytest.raises(ValueError, match="prefill"):
        kv_eval_main(["--checkpoint", str(final), "--text", str(data_dir / "val.bin"), "--seq-len", "8", "--prefill", "8"])


def test_joint_shared_step_adds_the_per_loop_loss_of_the_same_batch():
    from looplm.train.trainer import build_model, stage1_loss

    model = build_model(TrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, total_ut_steps=3, max_position_embeddings=64), VOCAB)
    x, y = torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (4, 16))
    y[-1, :-1] = -100  # one task row, answer-only loss
    args = (model, x, y, "weighted", (1.0, 2.0, 3.0), 0.1, 1, 2.0)
    plain, plain_ce, _, _ = stage1_loss(*args)
    shared, shared_ce, _, _ = stage1_loss(*args, shared_kv="mean", shared_kl=0.5)
    joint, joint_ce, _, _ = stage1_loss(*args, shared_kv="mean", shared_kl=0.5, shared_joint=True)
    torch.testing.assert_close(joint, shared + plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(joint_ce, shared_ce) and not torch.allclose(shared_ce, plain_ce)
    model.zero_grad()
    joint.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (stage1_loss(*args, shared_kv="mean", shared_kl=0.5)[0] + stage1_loss(*args)[0]).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_trainer_joint_shared_kv_steps_train(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, shared_kv_every=2, shared_kv_joint=True, shared_kv_kl=1.0, steps=8, eval_every=1000))
    steps = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    assert [r.get("kv") for r in steps] == [None, "last", None, "mean"] * 2
    assert np.mean([r["loss"] for r in steps[-2:]]) < np.mean([r["loss"] for r in steps[:2]])


def test_shared_grad_step_has_the_same_loss_and_trains_the_kv_producers_too():
    from looplm.train.trainer import build_model, stage1_loss

    model = build_model(TrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, total_ut_steps=3, max_position_embeddings=64), VOCAB)
    x, y = torch.randint(0, VOCAB, (3, 16)), torch.randint(0, VOCAB, (3, 16))
    args = (model, x, y, "weighted", (1.0, 2.0, 3.0), 0.1)
    grads = []
    for shared_grad in (False, True):
        model.zero_grad()
        loss, ce, _, _ = stage1_loss(*args, shared_kv="last", shared_grad=shared_grad)
        loss.backward()
        grads.append((loss.detach(), ce, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, ce0, g0), (l1, ce1, g1) = grads
    assert torch.equal(l0, l1) and torch.equal(ce0, ce1)
    k_proj = [n for n in g1 if "k_proj" in n]
    assert k_proj and all(not torch.allclose(g0[n], g1[n]) for n in k_proj)
