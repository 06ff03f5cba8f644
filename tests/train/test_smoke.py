"""A few seconds of training on a tiny config: the loss goes down, resuming is exact, Stage II and
evaluation run end to end on the saved checkpoint."""

import json
import random

import numpy as np
import pytest
import torch

from looplm.train.data import phop_answer
from looplm.train.trainer import TrainConfig, train

from .counting import VOCAB, tiny_config, write_counting_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_counting_data(tmp_path_factory.mktemp("data"), 400)


def tiny(data_dir, out, **kw) -> TrainConfig:
    return tiny_config(data_dir, out, **{"steps": 30, "warmup_steps": 5, "eval_batches": 2, **kw})


def read_log(path):
    return [json.loads(line) for line in open(path) if '"loss"' in line]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train(tiny(data_dir, out))


def test_smoke_training_lowers_the_loss(trained):
    out, final = trained
    log = read_log(out / "log.jsonl")
    first = np.mean([r["loss"] for r in log[:3]])
    last = np.mean([r["loss"] for r in log[-3:]])
    assert last < first - 0.5, (first, last)
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()


def test_resume_is_exact(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "a", steps=8, save_every=4))
    train(tiny(data_dir, tmp_path / "b", steps=8, save_every=4, stop_at=4))  # "interrupted" after step 4
    train(tiny(data_dir, tmp_path / "b", steps=8, save_every=4))  # resumes from b's step-4 checkpoint
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_entropy_objective_trains_the_gate(data_dir, tmp_path):
    from looplm.train.trainer import load_model

    final = train(tiny(data_dir, tmp_path / "e", objective="entropy", steps=4))
    init = tiny(data_dir, tmp_path / "unused")
    from looplm.train.trainer import build_model

    before = build_model(init, VOCAB).model.early_exit_gate.weight
    after = load_model(final).model.early_exit_gate.weight
    assert not torch.allclose(before, after.float())


def test_stage2_and_evaluation_end_to_end(data_dir, trained, tmp_path):
    from looplm.checkpoint import save_pretrained
    from looplm.train.evaluate import evaluate
    from looplm.train.gate import train_gate
    from looplm.train.trainer import TokenData, load_model

    final = trained[1]
    model = load_model(final)
    stats = train_gate(model, TokenData(data_dir / "train.bin", 32), feature_batches=4, batch_size=8, steps=60)
    assert stats["loss_after"] < stats["loss_before"]
    assert all(not p.requires_grad for p in model.parameters())
    save_pretrained(model, tmp_path / "gate")
    r = evaluate(tmp_path / "gate", data_dir, tmp_path / "eval", {"untrained": final, "stage2": tmp_path / "gate"},
                 seq_len=32, batches=2, batch_size=8, text_file="val.bin", qs=(0.3, 0.6, 0.9))
    assert len(r["per_loop"]) == 3 and r["per_loop"][-1]["agreement_with_T"] == 1.0
    assert set(r["curves"]) == {"static", "untrained", "stage2"}
    for p in r["curves"]["stage2"]:
        assert 1.0 <= p["avg_loops"] <= 3.0 and sum(p["loop_histogram"]) == r["text_tokens"]
    assert (tmp_path / "eval" / "exit_curve.png").stat().st_size > 1000
    assert "| loop |" in (tmp_path / "eval" / "eval.md").read_text()


def test_phop_answer_by_hand():
    seq = list("abcadb")
    # 1 hop from the last 'b' (pos 5): previous 'b' at 1 -> pos 2 'c'
    assert phop_answer(seq, 1) == "c"
    # 2nd hop from 'c' (pos 2): no earlier 'c'
    assert phop_answer(seq, 2) is None
    seq = list("abcab")
    # b(4) -> prev b at 1 -> pos 2 'c'; c(2) has no earlier c
    assert phop_answer(seq, 1) == "c"
    seq = list("cabcab")
    # b(5) -> prev b(2) -> pos 3 'c'; c(3) -> prev c(0) -> pos 1 'a'
    assert phop_answer(seq, 2) == "a"


def test_release_ships_the_checkpoint_and_keeps_recommended_options(data_dir, trained, tmp_path):
    from looplm.train.release import SHIPPED, release

    import shutil

    from tokenizers import Tokenizer, models

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(run / "final" / "tokenizer.json"))
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.copyfile(data / "val.bin", data / "val_text.bin")  # the natural-text split the card reports on
    meta = {"vocab_size": VOCAB, "natural_docs": {"python_docs": 1, "stdlib": 1, "austen": 1}, "synthetic_fraction_chars": 0.3,
            "phop_share_of_synthetic": 0.6, "train_tokens": 10_000, "val_text_tokens": 2_000, "n_phop_val": 0}
    (data / "meta.json").write_text(json.dumps(meta))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "generation_config.json").write_text(json.dumps({"looplm": {"speculative": {"draft_loop": 2}}}))
    notes, stale = (f"note {random.random()}" for _ in range(2))  # a previous card: a hand-written section is kept
    (dest / "MODEL_CARD.md").write_text(f"# looplm default model\n\n### Reproduce\n\n{stale}\n\n## Notes\n\n{notes}\n")
    release(run, data, dest, gate_steps=3, feature_batches=2, eval_batches=2)
    assert all((dest / name).is_file() for name in SHIPPED + ("exit_curve.png", "MODEL_CARD.md"))
    card = (dest / "MODEL_CARD.md").read_text()  # the reproduce commands name this run's directories
    assert f"release --run {run} --data {data} --dest {dest}" in card and f"--checkpoint {run}/final" in card
    assert f"## Notes\n\n{notes}\n\n## Evaluation\n" in card and stale not in card  # kept after Reproduce, as before
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["looplm"] == {"speculative": {"draft_loop": 2}} and "eos_token_id" in gen
    import looplm

    engine = looplm.load(str(dest))
    assert engine.mode_defaults("speculative") == {"draft_loop": 2}


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(data_dir, tmp_path, monkeypatch, capsys, native):
    import looplm.train.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_bf16_native", lambda: native)
    train(tiny(data_dir, tmp_path, steps=1, bf16=True))
    err = capsys.readouterr().err
    assert ("--no-bf16 trains faster" in err) is (not native)
