"""Held-out evaluation of a looped LM, per loop and under exit policies (the paper's Figure 5).

Measures, on fixed windows of a held-out uint16 token array:
  - per-loop loss and next-token accuracy, and agreement of loop-t argmax with loop-T argmax;
  - p-hop induction accuracy per loop (and per hop count) on a held-out jsonl set;
  - loss/accuracy versus average loops for static exit at each depth and Q-exit at several q,
    for one or more gates (e.g. the untrained gate and the Stage-II gate). The gates are applied to
    the hidden states of the first checkpoint, so their curves share one LM.
Writes eval.json, eval.md (markdown tables) and exit_curve.png.

Usage:
    python -m looplm.train eval --checkpoint data/gate --gate untrained=data/run/final \
        --gate stage2=data/gate --data data --out data/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from looplm.exits import q_exit_loops
from looplm.model import LoopLM

from .objectives import per_loop_ce
from .trainer import TokenData, load_model

DEFAULT_QS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@torch.no_grad()
def token_stats(model: LoopLM, batches, gates: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Per-token, per-loop arrays over all batches (flattened to N tokens).

    Returns: ce [T, N], correct [T, N] (argmax == target), agree [T, N] (argmax == loop-T argmax),
    and "gate/<name>" [T, N] lambdas for every gate module given (default: the model's own, "own").
    """
    model.eval()
    gates = gates or {"own": model.model.early_exit_gate}
    ce, correct, agree, lam = [], [], [], {name: [] for name in gates}
    for x, y in batches:
        out = model.loop_outputs(x)
        T = out.logits.shape[0]
        pred = out.logits.argmax(dim=-1)  # [T, B, S]
        ce.append(per_loop_ce(out.logits, y).reshape(T, -1))
        correct.append((pred == y).reshape(T, -1))
        agree.append((pred == pred[-1:]).reshape(T, -1))
        for name, gate in gates.items():
            lam[name].append(torch.sigmoid(gate(out.hidden).float()).squeeze(-1).reshape(T, -1))
    stats = {"ce": torch.cat(ce, 1), "correct": torch.cat(correct, 1).float(), "agree": torch.cat(agree, 1).float()}
    stats.update({f"gate/{name}": torch.cat(v, 1) for name, v in lam.items()})
    return stats


def per_loop_table(stats: dict[str, torch.Tensor]) -> list[dict]:
    T = stats["ce"].shape[0]
    return [
        {
            "loop": t + 1,
            "loss": float(stats["ce"][t].mean()),
            "accuracy": float(stats["correct"][t].mean()),
            "agreement_with_T": float(stats["agree"][t].mean()),
        }
        for t in range(T)
    ]


def exit_curves(stats: dict[str, torch.Tensor], qs=DEFAULT_QS) -> dict[str, list[dict]]:
    """{"static": points at depth 1..T, "<gate>": Q-exit points at each q}; a point has avg_loops, loss, accuracy."""
    ce, correct = stats["ce"], stats["correct"]
    T = ce.shape[0]
    curves = {"static": [{"depth": t + 1, "avg_loops": float(t + 1), "loss": float(ce[t].mean()),
                          "accuracy": float(correct[t].mean())} for t in range(T)]}
    for key, lam in stats.items():
        if not key.startswith("gate/"):
            continue
        points = []
        for q in qs:
            loops = q_exit_loops(lam, q)  # [N], 1-based
            idx = (loops - 1)[None]
            points.append({"q": q, "avg_loops": float(loops.float().mean()),
                           "loss": float(ce.gather(0, idx).mean()), "accuracy": float(correct.gather(0, idx).mean()),
                           "loop_histogram": [int((loops == t + 1).sum()) for t in range(T)]})
        curves[key.removeprefix("gate/")] = points
    return curves


def interpolate(points: list[dict], avg_loops: float, key: str = "loss") -> float:
    """Piecewise-linear value of a curve at avg_loops (clamped to its ends)."""
    xs = np.array([p["avg_loops"] for p in points])
    ys = np.array([p[key] for p in points])
    order = np.argsort(xs, kind="stable")
    return float(np.interp(avg_loops, xs[order], ys[order]))


@torch.no_grad()
def phop_accuracy(model: LoopLM, tokenizer, path: str | Path, batch_size: int = 250, limit: int | None = None) -> dict:
    """Per-loop accuracy of the answer symbol on held-out p-hop problems, overall and per hop count.

    Each prompt is preceded by <|endoftext|> (id 0) as at a document start and scored at its last position.
    """
    model.eval()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:limit]
    by_len: dict[int, list] = {}
    for r in rows:
        ids = [0] + tokenizer.encode(r["prompt"])
        ans = tokenizer.encode(r["answer"])
        if len(ans) != 1:
            raise ValueError(f"answer {r['answer']!r} is not a single token")
        by_len.setdefault(len(ids), []).append((ids, ans[0], r["hops"]))
    correct, hops = [], []
    for items in by_len.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            x = torch.tensor([c[0] for c in chunk])
            logits = model.loop_outputs(x).logits[:, :, -1]  # [T, B, V]
            correct.append(logits.argmax(-1) == torch.tensor([c[1] for c in chunk]))
            hops += [c[2] for c in chunk]
    correct = torch.cat(correct, 1).float()  # [T, N]
    hops = torch.tensor(hops)
    out = {"n": int(correct.shape[1]), "per_loop": [float(v) for v in correct.mean(1)]}
    out["per_hops"] = {int(h): [float(v) for v in correct[:, hops == h].mean(1)] for h in sorted(set(hops.tolist()))}
    return out


def plot(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"static": dict(color="black", marker="s", linestyle="--")}
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red"])
    for ax, key, label in ((axes[0], "loss", "held-out loss (nats/token)"), (axes[1], "accuracy", "next-token accuracy")):
        for name, pts in curves.items():
            pts = sorted(pts, key=lambda p: p["avg_loops"])
            style = styles.get(name) or styles.setdefault(name, dict(color=next(colors), marker="o", linestyle="-"))
            ax.plot([p["avg_loops"] for p in pts], [p[key] for p in pts],
                    label="static exit" if name == "static" else f"Q-exit, {name} gate", **style, markersize=4)
        ax.set_xlabel("average loops per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["### Per-loop held-out evaluation", "",
             f"Held-out text: {result['text_tokens']} tokens. p-hop: {result['phop']['n']} held-out problems "
             "(chance 12.5%)." if result.get("phop") else f"Held-out text: {result['text_tokens']} tokens.", "",
             "| loop | loss (nats/token) | accuracy | argmax agreement with loop T | p-hop accuracy |",
             "|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["per_loop"]):
        ph = f"{result['phop']['per_loop'][i]:.3f}" if result.get("phop") else "-"
        lines.append(f"| {r['loop']} | {r['loss']:.4f} | {r['accuracy']:.4f} | {r['agreement_with_T']:.4f} | {ph} |")
    if result.get("phop"):
        lines += ["", "p-hop accuracy per loop by hop count:", "", "| hops | " +
                  " | ".join(f"loop {t + 1}" for t in range(len(result["per_loop"]))) + " |",
                  "|---:|" + "---:|" * len(result["per_loop"])]
        for h, accs in result["phop"]["per_hops"].items():
            lines.append(f"| {h} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    lines += ["", "### Exit policies: loss and accuracy versus average loops", "",
              "Static exit at each depth, and Q-exit (exit at the first loop whose exit CDF reaches q) with each gate. "
              "`static@same` is static exit linearly interpolated between the nearest depths at the same average loops.",
              "", "| policy | q | avg loops | loss | static@same loss | accuracy | static@same acc |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    static = result["curves"]["static"]
    for p in static:
        lines.append(f"| static depth {p['depth']} | - | {p['avg_loops']:.3f} | {p['loss']:.4f} | - | {p['accuracy']:.4f} | - |")
    for name, pts in result["curves"].items():
        if name == "static":
            continue
        for p in pts:
            lines.append(f"| Q-exit ({name} gate) | {p['q']} | {p['avg_loops']:.3f} | {p['loss']:.4f} | "
                         f"{interpolate(static, p['avg_loops']):.4f} | {p['accuracy']:.4f} | "
                         f"{interpolate(static, p['avg_loops'], 'accuracy'):.4f} |")
    if result.get("comparisons"):
        lines += ["", "### Summary at equal average loops", "",
                  "| gate | avg loops range compared | mean loss minus static@same | "
                  "mean loss minus other gate@same | mean acc minus static@same |", "|---|---|---:|---:|---:|"]
        for c in result["comparisons"]:
            lines.append(f"| {c['gate']} | {c['range'][0]:.2f}-{c['range'][1]:.2f} | {c['loss_vs_static']:+.4f} | "
                         f"{c['loss_vs_other'] if c['loss_vs_other'] is None else format(c['loss_vs_other'], '+.4f')} | "
                         f"{c['acc_vs_static']:+.4f} |")
    return "\n".join(lines) + "\n"


def compare(curves: dict[str, list[dict]], names: list[str]) -> list[dict]:
    """For each gate: mean (loss - static interpolated) over its Q-exit points, and against the other gate
    interpolated at the same average loops (only where both curves cover that average)."""
    static = curves["static"]
    T = len(static)
    out = []
    for name in names:
        pts = [p for p in curves[name] if 1.0 < p["avg_loops"] < T]
        pts = pts or curves[name]
        others = [n for n in names if n != name]
        vs_other = None
        if others:
            o = curves[others[0]]
            lo, hi = min(p["avg_loops"] for p in o), max(p["avg_loops"] for p in o)
            inside = [p for p in pts if lo <= p["avg_loops"] <= hi]
            if inside:
                vs_other = float(np.mean([p["loss"] - interpolate(o, p["avg_loops"]) for p in inside]))
        out.append({
            "gate": name,
            "range": (min(p["avg_loops"] for p in pts), max(p["avg_loops"] for p in pts)),
            "loss_vs_static": float(np.mean([p["loss"] - interpolate(static, p["avg_loops"]) for p in pts])),
            "acc_vs_static": float(np.mean([p["accuracy"] - interpolate(static, p["avg_loops"], "accuracy") for p in pts])),
            "loss_vs_other": vs_other,
        })
    return out


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    gates: dict[str, str | Path] | None = None,
    *,
    seq_len: int = 256,
    batches: int = 32,
    batch_size: int = 16,
    qs=DEFAULT_QS,
    text_file: str = "val_text.bin",
    phop_limit: int | None = None,
) -> dict:
    """Evaluates `checkpoint`; `gates` maps names to checkpoints whose early_exit_gate is compared."""
    import looplm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = looplm.load(str(checkpoint))
    model = engine.model.float().eval()
    gate_modules = {}
    for name, path in (gates or {"own": checkpoint}).items():
        gate_modules[name] = load_model(path).model.early_exit_gate.float() if str(path) != str(checkpoint) \
            else model.model.early_exit_gate
    data = Path(data)
    windows = TokenData(data / text_file, seq_len).fixed_batches(batches, batch_size)
    stats = token_stats(model, windows, gate_modules)
    result = {"checkpoint": str(checkpoint), "text_file": text_file, "text_tokens": int(stats["ce"].shape[1]),
              "per_loop": per_loop_table(stats), "curves": exit_curves(stats, qs)}
    if (data / "phop_val.jsonl").is_file() and engine.tokenizer is not None:
        result["phop"] = phop_accuracy(model, engine.tokenizer, data / "phop_val.jsonl", limit=phop_limit)
    result["comparisons"] = compare(result["curves"], list(gate_modules))
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(markdown(result))
    plot(result["curves"], out / "exit_curve.png", title=f"{Path(checkpoint).name}: held-out {text_file}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.train eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--gate", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a gate to compare (its checkpoint's early_exit_gate on this checkpoint's LM); repeatable")
    p.add_argument("--data", default="data")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-file", default="val_text.bin")
    p.add_argument("--phop-limit", type=int, default=None, help="evaluate only the first N p-hop problems")
    p.add_argument("--qs", type=float, nargs="+", default=list(DEFAULT_QS))
    a = p.parse_args(argv)
    gates = dict(g.split("=", 1) for g in a.gate) or None
    r = evaluate(a.checkpoint, a.data, a.out, gates, seq_len=a.seq_len, batches=a.batches, batch_size=a.batch_size,
                 qs=a.qs, text_file=a.text_file, phop_limit=a.phop_limit)
    print(markdown(r))


if __name__ == "__main__":
    main(sys.argv[1:])
