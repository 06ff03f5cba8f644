"""The shared-KV trade-off of several checkpoints in one picture, from their kv_eval results.

For each held-out token file the runs have in common, one panel: x is the loop 1 -> T gain of
the per-loop cross-entropy (does depth help?), y the cross-entropy a shared cache adds over the
per-loop cache (filled marker `kv="last"`, hollow `kv="mean"`). The shaded corner is where both
targets of a shared-KV-friendly model hold (gain >= --min-gain, added loss <= --max-loss), so a
run that reaches it by making its loops equal shows up far to the left.

Usage: python -m looplm.train.kv_eval --checkpoint A --text data/val_text.bin --json a.json  (per run)
       python -m looplm.train.kv_plot --run bundled=a.json --run "consistency 3=b.json" --out tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

KEYS = ("per_loop_ce", "last_minus_per_loop", "mean_minus_per_loop")


@dataclass(frozen=True)
class Point:
    """One run on one token file: the loop 1 -> T gain and what each shared cache adds (nats)."""

    gain: float
    last: float
    mean: float


def load_points(path: Path) -> dict[str, Point]:
    """{token file: Point} from a `kv_eval --json` file; errors name the file and the missing key."""
    try:
        results = json.loads(Path(path).read_text())["results"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such kv_eval result (write one with kv_eval --json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a kv_eval --json result ({type(e).__name__}: {e})") from None
    points = {}
    for text, res in results.items():
        missing = [k for k in KEYS if k not in res]
        if missing:
            raise ValueError(f"{path}: result for {text} lacks {', '.join(missing)}")
        ce = res["per_loop_ce"]
        points[text] = Point(ce[0] - ce[-1], res["last_minus_per_loop"], res["mean_minus_per_loop"])
    return points


def parse_pair(spec: str, option: str = "--run", form: str = "LABEL=kv_eval.json") -> tuple[str, str]:
    """'LEFT=RIGHT' -> (LEFT, RIGHT), split at the first '='."""
    left, sep, right = spec.partition("=")
    if not sep or not left or not right:
        raise ValueError(f"{option} {spec!r}: expected {form}")
    return left, right


def plot(runs: list[tuple[str, dict[str, Point]]], out: Path, min_gain: float = 0.15, max_loss: float = 0.03,
         titles: dict[str, str] | None = None) -> list[str]:
    """Writes the figure (one panel per token file every run has); returns those files in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to plot")
    texts = [t for t in runs[0][1] if all(t in pts for _, pts in runs)]
    if not texts:
        raise ValueError("the runs share no token file: " + "; ".join(f"{label}: {sorted(p)}" for label, p in runs))
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, text in zip(axes[0], texts):
        top = max(max(p[text].last, p[text].mean) for _, p in runs)
        right = max(max(p[text].gain for _, p in runs), min_gain) * 1.15
        ax.fill_between([min_gain, right], 0, max_loss, color="tab:green", alpha=0.15, lw=0,
                        label=f"targets: gain >= {min_gain}, added <= {max_loss}")
        for i, (label, pts) in enumerate(runs):
            p, c = pts[text], colours(i % 10)
            ax.plot([p.gain, p.gain], [p.last, p.mean], color=c, lw=0.8, alpha=0.6)
            ax.scatter([p.gain], [p.last], color=c, s=36, zorder=3, label=label)
            ax.scatter([p.gain], [p.mean], facecolors="none", edgecolors=[c], s=36, zorder=3)
        ax.set_xlim(min(0.0, *(p[text].gain for _, p in runs)) - 0.01, right)
        ax.set_ylim(min(0.0, *(min(p[text].last, p[text].mean) for _, p in runs)) - 0.01, top * 1.1 + 0.01)
        ax.set_xlabel("loop 1 -> T gain, per-loop cache (nats/token)")
        ax.set_ylabel("added by a shared cache (nats/token)")
        ax.set_title((titles or {}).get(text, Path(text).name) + "  (filled: last, hollow: mean)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return texts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.train.kv_plot", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="LABEL=kv_eval.json, one per run, in legend order")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--min-gain", type=float, default=0.15)
    p.add_argument("--max-loss", type=float, default=0.03)
    p.add_argument("--title", action="append", default=[], help="TOKEN_FILE=panel title (default: the file name)")
    a = p.parse_args(argv)
    runs = [(label, load_points(Path(path))) for label, path in map(parse_pair, a.run)]
    titles = dict(parse_pair(t, "--title", "TOKEN_FILE=title") for t in a.title)
    texts = plot(runs, a.out, a.min_gain, a.max_loss, titles)
    print(f"wrote {a.out}: {len(runs)} runs on {', '.join(texts)}")


if __name__ == "__main__":
    main(sys.argv[1:])
