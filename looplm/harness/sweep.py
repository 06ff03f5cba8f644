"""Sweeps static depths and exit-policy thresholds through lm-eval and plots accuracy versus average loops.

Every point is one lm-eval run of the "looplm" model; its x is the mean exit loop the model
recorded for the task (results["config"]["looplm"]), its y the task's accuracy (or, for rolling
loglikelihood, the loss in nats per token). Static exit at each depth is drawn as the reference
line, each exit policy as a curve over its thresholds (cf. Ouro's Figure 5).

Usage:
    python -m looplm.harness.sweep --tasks looplm_phop,looplm_text --include_path TASK_DIR \\
        --depths 1 2 3 4 --exit q_exit --thresholds 0.1 0.3 0.5 0.7 0.9 --metric looplm_text_card=loss --out sweep/
    python -m looplm.harness.sweep --plot-only --out sweep/ RESULTS.json ...   (any lm-eval outputs of looplm)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PREFERRED = ("acc,none", "acc_norm,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none")


def run_point(model_args: dict, tasks: list[str], include_path: str | None, limit: int | None,
              batch_size: int, num_fewshot: int | None = None) -> dict:
    """One lm-eval run of looplm with these model_args; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .model import LoopLMEval

    lm = LoopLMEval(batch_size=batch_size, **model_args)
    # a task directory alone skips indexing lm-eval's thousands of built-in task files
    tm = TaskManager(include_path=include_path, include_defaults=include_path is None)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=0, log_samples=False)
    results["config"]["model_args"] = model_args
    return results


def _task_stats(per_task: dict, task: str, subtasks: list[str]) -> dict | None:
    """The looplm tally of a task, or the token-weighted merge of its subtasks' (an lm-eval group)."""
    names = [task] + subtasks
    stats = [v for k, v in per_task.items() if k.split("/")[0] in names and v["tokens"]]
    if not stats:
        return None
    n = sum(s["tokens"] for s in stats)
    merged = {"tokens": n, "mean_exit_loop": sum(s["mean_exit_loop"] * s["tokens"] for s in stats) / n}
    if all("nats_per_token" in s for s in stats):
        merged["nats_per_token"] = sum(s["nats_per_token"] * s["tokens"] for s in stats) / n
    merged["rolling"] = any(k.endswith("/loglikelihood_rolling") and k.split("/")[0] in names for k in per_task)
    return merged


def points(results: dict, metrics: dict[str, str] | None = None) -> list[dict]:
    """(task, policy, threshold, avg loops, metric, value) for every task of one lm-eval results dict.

    metrics: task -> lm-eval metric key (e.g. "acc_norm,none") or "loss" (nats per token, from the
    looplm tally) to plot; default: "loss" for rolling loglikelihood, else the first of PREFERRED.
    """
    metrics = metrics or {}
    info = results.get("config", {}).get("looplm")
    if info is None:
        raise ValueError("these results do not come from the looplm model (no config.looplm)")
    rule = info["rule"]
    policy = "static" if "depth" in rule else rule["policy"]
    out = []
    groups = results.get("group_subtasks", {})
    for task, scores in results["results"].items():
        stats = _task_stats(info["per_task"], task, groups.get(task, []))
        if stats is None:
            continue
        want = metrics.get(task, "loss" if stats["rolling"] else None)
        if want == "loss":
            if "nats_per_token" not in stats:
                raise ValueError(f"{task}: no loss recorded (its requests were not scored)")
            metric, value = "loss (nats/token)", stats["nats_per_token"]
        else:
            metric = want or next((m for m in PREFERRED if isinstance(scores.get(m), (int, float))), None)
            if metric is None:
                continue
            if metric not in scores:
                raise ValueError(f"{task}: no metric {metric!r} in the results; it has {sorted(scores)}")
            value = scores[metric]
        out.append({"task": task, "policy": policy, "threshold": rule.get("depth", rule.get("threshold")),
                    "avg_loops": stats["mean_exit_loop"], "metric": metric, "value": float(value)})
    return out


def plot(pts: list[dict], path: str | Path, title: str = "") -> None:
    """One panel per task: static depths as the dashed reference, one curve per exit policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p["task"] for p in pts})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    style = {"static": dict(color="black", marker="s", linestyle="--")}
    for ax, task in zip(axes[0], tasks):
        mine = [p for p in pts if p["task"] == task]
        for policy in sorted({p["policy"] for p in mine}, key=lambda s: (s != "static", s)):
            curve = sorted((p for p in mine if p["policy"] == policy), key=lambda p: p["avg_loops"])
            st = style.get(policy) or style.setdefault(policy, dict(color=next(colors), marker="o", linestyle="-"))
            ax.plot([p["avg_loops"] for p in curve], [p["value"] for p in curve], markersize=4, **st,
                    label="static exit (depth k)" if policy == "static" else f"{policy} exit")
        ax.set_title(task)
        ax.set_xlabel("average exit loop per token")
        ax.set_ylabel(mine[0]["metric"])
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.harness.sweep", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="*", type=Path, help="with --plot-only: lm-eval results JSON files of looplm")
    p.add_argument("--pretrained", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--model-args", default="", help="more model_args for every point, e.g. dtype=bfloat16,device=cuda")
    p.add_argument("--tasks", default="looplm_card", help="comma-separated lm-eval tasks")
    p.add_argument("--include_path", "--include-path", dest="include_path", default=None,
                   help="task directory (python -m looplm.harness.tasks writes the local ones)")
    p.add_argument("--depths", type=int, nargs="*", default=None, help="static depths (default: 1..T; none when given empty)")
    p.add_argument("--exit", action="append", default=[], help="exit policy to sweep (repeatable), e.g. q_exit")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval --limit)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="directory for results_*.json, sweep.json, sweep.png")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help='what to plot for a task: an lm-eval metric key (e.g. "acc_norm,none") or "loss" '
                        "(nats per token); default: loss for rolling loglikelihood, else accuracy; repeatable")
    p.add_argument("--plot-only", action="store_true", help="only plot the given results files")
    a = p.parse_args(argv)
    bad = [m for m in a.metric if "=" not in m]
    if bad:
        raise ValueError(f"--metric takes TASK=METRIC, got {bad}")
    metrics = dict(m.split("=", 1) for m in a.metric)
    a.out.mkdir(parents=True, exist_ok=True)
    files = list(a.results)
    if not a.plot_only:
        from lm_eval.utils import simple_parse_args_string

        from looplm import load

        base = simple_parse_args_string(a.model_args) if a.model_args else {}
        if a.pretrained:
            base["pretrained"] = a.pretrained
        depths = a.depths if a.depths is not None else list(range(1, load(a.pretrained).model.num_loops + 1))
        configs = [(f"static_{k}", {"loops": k}) for k in depths]
        configs += [(f"{e}_{t:g}", {"exit": e, "threshold": t}) for e in a.exit for t in a.thresholds]
        for label, args in configs:
            res = run_point({**base, **args}, a.tasks.split(","), a.include_path, a.limit, a.batch_size, a.num_fewshot)
            path = a.out / f"results_{label}.json"
            path.write_text(json.dumps(res, indent=2, default=str))
            files.append(path)
            print(label, [(pt["task"], round(pt["avg_loops"], 3), round(pt["value"], 4)) for pt in points(res, metrics)],
                  flush=True)
    if not files:
        raise ValueError("no results to plot: run a sweep or pass lm-eval results files with --plot-only")
    pts = [pt for f in files for pt in points(json.loads(Path(f).read_text()), metrics)]
    (a.out / "sweep.json").write_text(json.dumps(pts, indent=2))
    plot(pts, a.out / "sweep.png", title=a.pretrained or "looplm default model")
    print(a.out / "sweep.png")


if __name__ == "__main__":
    main()
