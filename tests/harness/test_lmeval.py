"""The lm-eval model on the bundled checkpoint: the card's p-hop scoring, rolling loglikelihood,
generate_until against Engine.generate, and the sweep's plot."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import looplm  # noqa: E402
from looplm.harness import sweep, tasks  # noqa: E402
from looplm.harness.model import LoopLMEval  # noqa: E402
from looplm.train.data import PHOP_ALPHABET, copy_document, modarith_document  # noqa: E402
from looplm.train.evaluate import phop_accuracy  # noqa: E402

N_PHOP = 240  # CI subset of the card's 2000 held-out problems (the full set runs by hand: README)


@pytest.fixture(scope="module")
def engine():
    return looplm.load()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    tasks.write_phop_tasks(out, tasks.heldout_phop(N_PHOP))
    return out


def evaluate(lm, names, task_dir, **kw):
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=names, task_manager=tm, bootstrap_iters=0, **kw)


def test_phop_matches_card_scoring(engine, task_dir):
    """acc of looplm_phop_argmax at depth k is the card's per-loop p-hop accuracy (looplm.train.evaluate's
    argmax of the answer over the whole vocabulary) on the same problems; multiple choice over the 8
    symbols is the argmax over those 8 logits only."""
    card = phop_accuracy(engine.model, engine.tokenizer, task_dir / "phop.jsonl")["per_loop"]
    problems = [json.loads(line) for line in (task_dir / "phop.jsonl").read_text().splitlines()]
    ids = torch.tensor([[0] + engine.encode(p["prompt"]) for p in problems])  # all one length
    sym = torch.tensor([engine.encode(f" {c}")[0] for c in PHOP_ALPHABET])
    with torch.no_grad():
        last = torch.cat([engine.model.per_loop_logits(ids[i : i + 80])[:, :, -1] for i in range(0, len(ids), 80)], 1)
    labels = torch.tensor([p["label"] for p in problems])
    for k in (1, 4):
        lm = LoopLMEval(loops=k, batch_size=64)
        res = evaluate(lm, ["looplm_phop", "looplm_phop_argmax"], task_dir)
        # the card's accuracy is a float32 mean: 1e-6 still tells one problem (1 / N_PHOP) apart
        assert res["results"]["looplm_phop_argmax"]["acc,none"] == pytest.approx(card[k - 1], abs=1e-6)
        mc = (last[k - 1][:, sym].argmax(-1) == labels).float().mean().item()
        assert res["results"]["looplm_phop"]["acc,none"] == pytest.approx(mc, abs=1e-6)
        stats = res["config"]["looplm"]["per_task"]
        assert stats["looplm_phop_argmax/loglikelihood"]["tokens"] == N_PHOP
        assert stats["looplm_phop/loglikelihood"]["tokens"] == 8 * N_PHOP  # one token per choice
        assert stats["looplm_phop/loglikelihood"]["exit_loop_counts"][k - 1] == 8 * N_PHOP
    assert card[3] > card[0] + 0.05  # depth helps on this subset too, as on the card's 2000


def test_heldout_problems_equal_the_data_build():
    """The regenerated problems are data/phop_val.jsonl of `python -m looplm.train.data` (seed 0)."""
    path = Path(__file__).resolve().parents[2] / "data" / "phop_val.jsonl"
    if not path.is_file():
        pytest.skip("no data/phop_val.jsonl in this checkout (python -m looplm.train.data --out data/)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == tasks.heldout_phop(len(rows))


def test_rolling_loglikelihood_equals_per_loop_ce(engine, tmp_path):
    """loglikelihood_rolling over documents longer than max_length L: disjoint windows of L predicted
    tokens, each given the L tokens before its end (the first after <|endoftext|>), at depth k."""
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    docs = [modarith_document(rng, 6) + "\n" + copy_document(rng, 3) for _ in range(5)]
    windows = [engine.encode(d) for d in docs]
    tasks.write_text_task(tmp_path, windows, engine.tokenizer, name="looplm_synth")
    L, k = 48, 2
    res = evaluate(LoopLMEval(loops=k, max_length=L, batch_size=4), ["looplm_synth"], tmp_path)
    total, n = 0.0, 0
    for w in windows:
        assert engine.encode(engine.decode(w)) == w
        assert len(w) > 2 * L  # several windows
        seq = [0] + w  # seq[i + 1] = w[i] is predicted from seq[: i + 1]
        for start in range(0, len(w), L):
            end = min(start + L, len(w))
            inp = seq[max(0, end - L) : end]
            with torch.no_grad():
                logp = engine.model.per_loop_logits(torch.tensor([inp]))[k - 1, 0, -(end - start):].float().log_softmax(-1)
            total += float(logp.gather(1, torch.tensor(w[start:end])[:, None]).sum())
            n += end - start
    assert any(len(w) % L for w in windows)  # a partial last window, given more than its own tokens
    st = res["config"]["looplm"]["per_task"]["looplm_synth/loglikelihood_rolling"]
    assert st["tokens"] == n and st["mean_exit_loop"] == k
    assert st["nats_per_token"] == pytest.approx(-total / n, rel=1e-5)
    # the _card task: tokens 2..n of each window given its first token, no prefix token (the card's windows)
    card = evaluate(LoopLMEval(loops=k), ["looplm_synth_card"], tmp_path)["config"]["looplm"]["per_task"]
    want = []
    for w in windows:
        with torch.no_grad():
            logp = engine.model.per_loop_logits(torch.tensor([w[:-1]]))[k - 1, 0].float().log_softmax(-1)
        want += logp.gather(1, torch.tensor(w[1:])[:, None])[:, 0].tolist()
    assert card["looplm_synth_card/loglikelihood"]["tokens"] == len(want)
    assert card["looplm_synth_card/loglikelihood"]["nats_per_token"] == pytest.approx(-sum(want) / len(want), rel=1e-5)
    nbytes = sum(len(d.encode()) for d in docs)
    bpb = res["results"]["looplm_synth"]["bits_per_byte,none"]
    assert bpb * math.log(2) * nbytes == pytest.approx(-total, rel=1e-5)


PROMPTS = ["def parse(", "It is a truth universally", "mod 7: 3 + 5 * 2 =", "class Foo:\n    def __init__(self"]


@pytest.mark.parametrize("args,mode,opts", [
    ({}, "full", {}),
    ({"exit": "q_exit", "q": 0.5}, "anytime", {"exit": "q_exit", "threshold": 0.5, "skip": "exact"}),
    ({"loops": 2}, "anytime", {"budget_loops": 2, "skip": "exact"}),
    ({"mode": "speculative"}, "speculative", {}),
])
def test_generate_until_equals_engine(engine, args, mode, opts):
    lm = LoopLMEval(batch_size=3, **args)
    until = ["\n", ". ", ", self"]
    reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 40}), i, ("t", i, 1))
            for i, p in enumerate(PROMPTS)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    stops = until + engine.default_stop_ids()
    want = [engine.generate(p, max_new_tokens=40, mode=mode, stop=stops, **opts) for p in PROMPTS]
    assert got == [g.text for g in want]
    assert sum(g.finish_reason == "stop" for g in want) >= 3 and not any(s in t for t in got for s in until)
    st = lm.get_model_info()["looplm"]["per_task"]["t/generate_until"]
    steps = [s for g in want for s in g.steps]
    assert st["tokens"] == len(steps)
    assert st["mean_exit_loop"] == pytest.approx(sum(s.exit_loop for s in steps) / len(steps))


def test_bad_model_args():
    with pytest.raises(ValueError, match="mode=anytime"):
        LoopLMEval(mode="full", loops=2)
    with pytest.raises(ValueError, match="unknown model_args"):
        LoopLMEval(exit="q_exit", colour=3)
    with pytest.raises(ValueError, match="max_length"):
        LoopLMEval(max_length=5000)
    lm = LoopLMEval(budget_ms=5.0)
    with pytest.raises(ValueError, match="generate_until only"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)])


def test_sweep_draws_the_plot(task_dir, tmp_path):
    sweep.main(["--include_path", str(task_dir), "--tasks", "looplm_phop", "--depths", "1", "4",
                "--exit", "q_exit", "--thresholds", "0.5", "--limit", "40", "--out", str(tmp_path)])
    pts = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["policy"], p["threshold"]) for p in pts] == [("static", 1), ("static", 4), ("q_exit", 0.5)]
    assert [p["avg_loops"] for p in pts[:2]] == [1.0, 4.0] and 1.0 < pts[2]["avg_loops"] < 4.0
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
