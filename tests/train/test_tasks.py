"""Synthetic task rows: targets only at p-hop answers, the answers right, held-out problems never drawn."""

import json
import random

import torch

from looplm.tokenizer import Tokenizer
from looplm.train.data import EOT_ID, phop_answer, phop_problem
from looplm.config import LoopConfig
from looplm.model import LoopLM
from looplm.train.objectives import IGNORE_INDEX, per_loop_ce, weighted_per_loop_loss
from looplm.train.tasks import PhopRows
from looplm.train.trainer import stage1_loss


def _tokenizer(tmp_path):
    """A word-level tokenizer over the p-hop vocabulary (no training data needed)."""
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    words = ["<|endoftext|>", "hop", ":", "=", "1", "2", "3", "4"] + list("abcdefgh")
    hf = HF(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer.from_file(path), words


def test_rows_target_exactly_the_answers(tmp_path):
    tok, words = _tokenizer(tmp_path)
    rows = PhopRows(tok, seq_len=100, max_hops=4)
    x, y = rows.batch(3, seed=int(torch.randint(0, 10**6, ())))
    assert x.shape == y.shape == (3, 100)
    for r in range(3):
        targets = (y[r] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(targets) >= 2
        for t in targets:
            # the input at t is "=", the target is the next input token, and it solves the problem
            assert words[int(x[r, t])] == "="
            if t + 1 < 100:
                assert x[r, t + 1] == y[r, t]
            start = max(i for i in range(t) if x[r, i] == EOT_ID)
            toks = [words[i] for i in x[r, start + 1 : t].tolist()]  # hop, N, :, symbols...
            assert toks[0] == "hop"
            assert words[int(y[r, t])] == phop_answer(toks[3:], int(toks[1]))
        assert sum(words[i] == "=" for i in x[r].tolist()) == len(targets)  # every problem in the row is scored


def test_same_seed_same_rows_and_held_out_problems_excluded(tmp_path):
    tok, _ = _tokenizer(tmp_path)
    seed = random.randrange(10**6)
    a = PhopRows(tok, seq_len=64).batch(2, seed)
    assert all(torch.equal(u, v) for u, v in zip(a, PhopRows(tok, seq_len=64).batch(2, seed)))
    # hold out the first problems this seed would draw: they must then never appear
    rng = random.Random(seed)
    held = [phop_problem(rng, rng.randint(1, 4))[0] for _ in range(3)]
    val = tmp_path / "phop_val.jsonl"
    val.write_text("".join(json.dumps({"prompt": p, "answer": " a", "hops": 1}) + "\n" for p in held))
    rows = PhopRows(tok, seq_len=64, exclude_file=val)
    x, _ = rows.batch(2, seed)
    text = " ".join(tok.decode(r.tolist()) for r in x)
    for p in held:
        assert " ".join(p.split()) not in " ".join(text.split())


def test_task_rows_enter_as_their_own_weighted_term():
    cfg = LoopConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, total_ut_steps=2, max_position_embeddings=32)
    model = LoopLM(cfg).init_weights(int(torch.randint(0, 1000, ())), std=0.3)
    x = torch.randint(0, 16, (3, 8))
    y = torch.randint(0, 16, (3, 8))
    y[2] = IGNORE_INDEX
    y[2, 5] = 7
    with torch.no_grad():
        loss, per_loop, task, _ = stage1_loss(model, x, y, "weighted", (1.0, 3.0), 0.0, task_rows=1, task_weight=2.0,
                                           task_loop_weights=(0.0, 1.0))
        ce = per_loop_ce(model.loop_outputs(x).logits, y)
    text_loss, want_per_loop = weighted_per_loop_loss(ce[:, :2], [1.0, 3.0])
    torch.testing.assert_close(per_loop, want_per_loop)
    torch.testing.assert_close(task, ce[:, 2, 5])
    torch.testing.assert_close(loss, text_loss + 2.0 * ce[1, 2, 5])


def test_training_with_task_rows_and_distillation_runs_and_reports(tmp_path):
    """Smoke: task rows and loop distillation train end to end and log per-loop answer CE and accuracy."""
    import numpy as np

    from looplm.train.trainer import TrainConfig, train

    tok, words = _tokenizer(tmp_path)
    rng = random.Random(0)
    val = [phop_problem(rng, 1 + i % 4) for i in range(8)]
    (tmp_path / "phop_val.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a, "hops": 1 + i % 4}) + "\n"
                                                     for i, (p, a) in enumerate(val)))
    np.random.default_rng(0).integers(0, len(words), 4000).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.random.default_rng(1).integers(0, len(words), 1000).astype(np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": len(words)}))
    tc = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, total_ut_steps=2,
                     max_position_embeddings=128, loop_weights=[1.0, 2.0], seq_len=64, batch_size=4, steps=4,
                     phop_rows=2, phop_loop_weights=[0.0, 1.0], distill_weights=[1.0, 0.0], lr=1e-3, warmup_steps=1,
                     eval_every=2, eval_batches=1, save_every=1000, log_every=1)
    final = train(tc)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "val_per_loop" in r]
    assert len(steps) == 4 and all(len(r["phop_per_loop"]) == 2 for r in steps)
    assert len(evals) == 2 and all(len(r["phop_acc_per_loop"]) == 2 and r["agree_with_T"][-1] == 1.0 for r in evals)
    assert (final / "model.safetensors").is_file()
