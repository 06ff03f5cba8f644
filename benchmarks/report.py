"""Renders benchmarks/RESULTS.md and its PNG plots from pytest-benchmark JSON files.

`python -m benchmarks.report [results.json ...]` (default: benchmarks/results.json and, when
present, benchmarks/results-cuda.json, one section each). Rows come from benchmarks that
recorded the conftest's `extra_info` (keys "mode" and "tokens_per_s"); other benchmarks of the
run are listed with their own extra_info.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODE_COLORS = {"full": "#4c72b0", "speculative": "#dd8452", "anytime": "#55a868"}
KV_COLOR = "#8172b3"


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _suffix(path: Path) -> str:
    stem = Path(path).stem  # results, results-cuda
    return stem[len("results"):] if stem.startswith("results") else "-" + stem


def rows_of(data: dict) -> list[dict]:
    """The decoder measurements: each benchmark's extra_info plus its test name."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info") or {}
        if "mode" in ei and "decode_tokens_per_s" in ei:
            rows.append({**ei, "test": b.get("fullname", b.get("name", "")), "name": b.get("name", "")})
    return rows


def others_of(data: dict) -> list[dict]:
    """Benchmarks that are neither decoder measurements nor concurrency measurements (own sections)."""
    return [b for b in data.get("benchmarks", []) if not ("mode" in (b.get("extra_info") or {}) and "decode_tokens_per_s" in b["extra_info"])
            and "concurrency" not in (b.get("extra_info") or {})]


def concurrency_of(data: dict) -> list[dict]:
    """The engine-concurrency measurements (benchmarks/test_concurrency.py): their extra_info."""
    return [b["extra_info"] for b in data.get("benchmarks", []) if "concurrency" in (b.get("extra_info") or {})]


def label(r: dict) -> str:
    o = dict(r.get("options") or {})
    kv = o.pop("kv", None)
    if r["mode"] == "speculative" and o.pop("pipeline", False):
        text = f"speculative k={o.pop('draft_loop', '?')} pipelined"
    elif r["mode"] == "speculative":
        text = f"speculative k={o.pop('draft_loop', '?')} g={o.pop('draft_len', '?')}"
    elif r["mode"] == "anytime":
        if "exit" in o:
            text = f"anytime {o.pop('exit')}" + (f" q={o.pop('q')}" if "q" in o else "")
        else:
            text = "anytime"
        if not o and text == "anytime":
            text += " (no budget)"
    else:
        text = r["mode"]
    extra = " ".join(f"{k}={v}" for k, v in o.items())
    text = f"{text} {extra}".strip()
    return f"{text} kv={kv}" if kv else text


def _fmt(x, digits: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}{unit}"
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _load_change(averages) -> str:
    """Load averages (1/5/15 min) in turn, e.g. before and after a run: "0.5/0.6/0.7 -> 0.9/0.8/0.7"."""
    return " -> ".join("/".join(f"{x:.1f}" for x in la) for la in averages)


def _bytes(x) -> str:
    if x is None:
        return "–"
    return f"{x / 1024:.1f} KiB" if x >= 1024 else f"{x:.0f} B"


def _reason(outcomes: list[dict], needle: str) -> str | None:
    for o in outcomes:
        if needle in o["test"] and o["outcome"] in ("skipped", "failed") and o["reason"]:
            return o["reason"]
    return None


# -- headlines ---------------------------------------------------------------------------------
def best_speculative(rows: list[dict], outcomes: list[dict]) -> str:
    spec = [r for r in rows if r["mode"] == "speculative" and "kv" not in (r.get("options") or {})]
    if not spec:
        why = _reason(outcomes, "test_speculative") or "no speculative benchmark ran"
        return f"not measured: {why}"
    lines = []
    for model in sorted({r["model"] for r in spec}):
        best = max((r for r in spec if r["model"] == model), key=lambda r: r.get("decode_ratio_to_full") or 0)
        lines.append(
            f"**{best.get('decode_ratio_to_full', 0):.2f}x** full-depth decode tokens/s on `{model}` "
            f"({label(best)}, batch {best['batch']}: {best['decode_tokens_per_s']:.1f} vs "
            f"{best.get('full_decode_tokens_per_s', float('nan')):.1f} tokens/s; "
            f"{best.get('ratio_to_full', float('nan')):.2f}x end to end with prefill; acceptance "
            f"{_fmt(best.get('acceptance_rate'))}, mean accepted length {_fmt(best.get('mean_accepted_length'))})"
        )
    return "; ".join(lines)


def spec_target(others: list[dict]) -> str | None:
    """The self-speculation speed target (benchmarks/test_spec_speedup.py: default model, CPU, batch 1,
    greedy, 128 new tokens, best setting of a sweep, alternating rounds), or None if it did not run."""
    b = next((b for b in others if b.get("name") == "test_speculative_best"), None)
    ei = (b or {}).get("extra_info") or {}
    if "ratio_to_full" not in ei:
        return None
    how = "pipelined" if ei.get("pipeline") else f"draft length {ei.get('draft_len')}"
    c = ", fitted draft map" if ei.get("draft") == "map" else f", extrapolate {ei['extrapolate']:g}" if ei.get("extrapolate") else ""
    per = ei.get("acceptance_per_prompt") or []
    spread = f" (per prompt {min(per):.2f}-{max(per):.2f})" if per else ""
    prompts = f"{ei['prompts']} prompts x " if ei.get("prompts") else ""
    return (f"**{ei['ratio_to_full']:.2f}x** full depth at k={ei.get('draft_loop')} ({how}{c}): "
            f"{ei['tokens_per_s']:.1f} vs {ei['full_tokens_per_s']:.1f} tokens/s, median of alternating rounds, "
            f"{prompts}{ei.get('new_tokens')} new tokens, batch {ei.get('batch')}; target {ei.get('target_ratio'):g}x "
            f"{'met' if ei.get('meets_target') else 'NOT met'}; draft acceptance {ei.get('acceptance_rate', float('nan')):.2f}{spread}")


def spec_fallback(others: list[dict]) -> str | None:
    """The 100M random model's speculation against full depth, with and without the fallback."""
    runs = {ei.get("fallback"): ei for b in others if b.get("name", "").startswith("test_speculation_with_useless_drafts")
            for ei in [b.get("extra_info") or {}] if "ratio_to_full" in ei}
    if True not in runs:
        return None
    on, off = runs[True], runs.get(False)
    text = (f"**{on['ratio_to_full']:.2f}x** full-depth tokens/s with the fallback to full depth (target >= {on['target_ratio']}x; "
            f"switched after {', '.join(str(x) for x in on['fallback_at'])} tokens, acceptance {on['token_acceptance']:.2f}, "
            f"{on['prompts']} prompts x {on['new_tokens']} tokens, median of paired rounds)")
    if off is not None:
        text += f"; {off['ratio_to_full']:.2f}x without it"
    return text


def cpu_load(others: list[dict]) -> str | None:
    """Tokens/s with a CPU hog running beside the engine (benchmarks/test_cpu_load.py), or None if it did not run."""
    runs = [b for b in others if b.get("name", "").startswith("test_cpu_load") and "ratio_loaded_to_quiet" in (b.get("extra_info") or {})]
    if not runs:
        return None
    parts = []
    for b in sorted(runs, key=lambda b: b["name"] != "test_cpu_load_chosen_threads"):
        ei = b["extra_info"]
        la = ei.get("load_average_before") or []
        load = f", load average {la[0]:.1f} at the start" if la else ""
        target = f" (target {ei['target_ratio']:g}: {'met' if ei.get('meets_target') else 'NOT met'})" if b["name"] == "test_cpu_load_chosen_threads" else ""
        parts.append(
            f"{ei.get('threads')} thread(s) ({ei.get('threads_from')}): **{ei['ratio_loaded_to_quiet']:.2f}x**{target}, "
            f"{ei['tokens_per_s_loaded']:.1f} vs {ei['tokens_per_s_quiet']:.1f} tokens/s with {ei.get('hogs')} busy process(es) "
            f"on {ei.get('cores')} cores{load}"
        )
    return "; ".join(parts)


def kv_savings(rows: list[dict], outcomes: list[dict]) -> str:
    kv = [r for r in rows if r["mode"] == "full" and (r.get("options") or {}).get("kv")]
    by = defaultdict(dict)
    for r in kv:
        by[(r["model"], r["batch"])][r["options"]["kv"]] = r
    lines = []
    for (model, batch), modes in sorted(by.items()):
        ref = modes.get("per_loop")
        if ref is None or not ref.get("kv_bytes_per_token"):
            continue
        for name in ("last", "mean"):
            r = modes.get(name)
            if r is None or not r.get("kv_bytes_per_token"):
                continue
            fold = ref["kv_bytes_per_token"] / r["kv_bytes_per_token"]
            mem = ""
            if ref.get("peak_mem_mb") is not None and r.get("peak_mem_mb") is not None:
                mem = f"; peak memory {r['peak_mem_mb']:.1f} vs {ref['peak_mem_mb']:.1f} MiB"
            lines.append(
                f"`{model}` batch {batch}, kv={name}: {_bytes(r['kv_bytes_per_token'])} vs "
                f"{_bytes(ref['kv_bytes_per_token'])} per token ({fold:.1f}x smaller, "
                f"{100 * (1 - 1 / fold):.0f}% saved{mem}; agreement with full depth "
                f"{100 * r.get('token_agreement_with_full', float('nan')):.0f}%, decode "
                f"{r.get('decode_ratio_to_full', float('nan')):.2f}x)"
            )
    if not lines:
        why = _reason(outcomes, "test_kv_modes") or "no KV-mode benchmark ran"
        return f"not measured: {why}"
    return "\n".join(f"  - {line}" for line in lines)


def anytime_summary(rows: list[dict], outcomes: list[dict]) -> str:
    any_rows = [r for r in rows if r["mode"] == "anytime" and "kv" not in (r.get("options") or {})]
    if not any_rows:
        why = _reason(outcomes, "test_anytime") or "no anytime benchmark ran"
        return f"not measured: {why}"
    parts = []
    for r in sorted(any_rows, key=lambda r: (r["model"], r["batch"], label(r))):
        if r["batch"] != 1:
            continue
        miss = r.get("budget_miss_rate", (r.get("stats") or {}).get("budget_miss_rate"))
        parts.append(
            f"`{r['model']}` {label(r)}: mean exit loop {_fmt(r.get('mean_exit_loop'))}, "
            f"{_fmt(r.get('decode_ratio_to_full'))}x decode tokens/s"
            + (f", {100 * miss:.0f}% of tokens over budget" if isinstance(miss, (int, float)) else "")
        )
    return "\n".join(f"  - {p}" for p in parts)


# -- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_by_mode(rows: list[dict], out: Path) -> bool:
    b1 = [r for r in rows if r["batch"] == 1]
    models = sorted({r["model"] for r in b1})
    if not models:
        return False
    plt = _plt()
    heights = [max(2.0, 0.28 * len([r for r in b1 if r["model"] == m]) + 1) for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rs = sorted((r for r in b1 if r["model"] == model), key=lambda r: (list(MODE_COLORS).index(r["mode"]) if r["mode"] in MODE_COLORS else 9, label(r)))
        y = range(len(rs))
        vals = [r["decode_tokens_per_s"] for r in rs]
        colors = [KV_COLOR if (r.get("options") or {}).get("kv") else MODE_COLORS.get(r["mode"], "#999999") for r in rs]
        ax.barh(list(y), vals, color=colors)
        ax.set_yticks(list(y), [label(r) for r in rs], fontsize=7)
        ax.invert_yaxis()
        for i, r in enumerate(rs):
            ax.text(vals[i], i, f" {r.get('decode_ratio_to_full', float('nan')):.2f}x", va="center", fontsize=7)
        full = [r for r in rs if r["mode"] == "full" and not r.get("options")]
        if full:
            ax.axvline(full[0]["decode_tokens_per_s"], color="k", lw=0.8, ls="--")
        ax.set_title(f"{model}, batch 1: decode tokens/s (x full depth, same run)", fontsize=9)
        ax.set_xlabel("new tokens/s (prefill excluded)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_by_batch(rows: list[dict], out: Path) -> bool:
    models = sorted({r["model"] for r in rows})
    series_of = {
        "full": lambda r: r["mode"] == "full" and not r.get("options"),
        "speculative (best k, g)": lambda r: r["mode"] == "speculative" and "kv" not in r.get("options", {}),
        "anytime q_exit q=0.5": lambda r: r["mode"] == "anytime" and r.get("options", {}).get("q") == 0.5 and "kv" not in r["options"],
        "full kv=last": lambda r: r["mode"] == "full" and r.get("options", {}).get("kv") == "last",
    }
    if not any(len({r["batch"] for r in rows if r["model"] == m}) > 1 for m in models):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for name, pick in series_of.items():
            best = {}
            for r in rows:
                if r["model"] == model and pick(r):
                    if r["batch"] not in best or r["decode_tokens_per_s"] > best[r["batch"]]:
                        best[r["batch"]] = r["decode_tokens_per_s"]
            if best:
                xs = sorted(best)
                ax.plot(xs, [best[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_spec(rows: list[dict], out: Path) -> bool:
    spec = [r for r in rows if r["mode"] == "speculative" and r["batch"] == 1 and "kv" not in r.get("options", {})]
    models = sorted({r["model"] for r in spec})
    if not models:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        by_k = defaultdict(list)
        for r in spec:
            if r["model"] == model:
                o = r["options"]
                g = "pipelined" + (f", c={o['extrapolate']}" if o.get("extrapolate") else "") if o.get("pipeline") else o["draft_len"]
                by_k[o["draft_loop"]].append((g, r.get("decode_ratio_to_full"), r.get("acceptance_rate")))
        for k, pts in sorted(by_k.items()):
            fixed = sorted(p for p in pts if isinstance(p[0], int))
            line = ax.plot([p[0] for p in fixed], [p[1] for p in fixed], marker="o", label=f"draft loop k={k}")[0]
            for p in pts:
                if not isinstance(p[0], int):  # adaptive draft length or pipelined: one level each
                    ls = ":" if p[0] == "adaptive" else "-."
                    ax.axhline(p[1], color=line.get_color(), ls=ls, lw=1, label=f"k={k}, {p[0]}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("draft length g")
        ax.set_ylabel("decode tokens/s / full depth")
        ax.set_title(f"{model}, batch 1: self-speculation speedup", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_anytime(rows: list[dict], out: Path) -> bool:
    rs = [r for r in rows if r["mode"] == "anytime" and r["batch"] == 1 and "kv" not in r.get("options", {})]
    panels = [
        ("budget_loops", "loop budget k", lambda o: o.get("budget_loops")),
        ("budget_ms", "budget per token (ms)", lambda o: o.get("budget_ms")),
        ("q", "Q-exit threshold q", lambda o: o.get("q") if o.get("exit") == "q_exit" else None),
    ]
    panels = [p for p in panels if any(p[2](r["options"]) is not None for r in rs)]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, xlabel, get) in zip(axes[0], panels):
        for model in sorted({r["model"] for r in rs}):
            pts = sorted((get(r["options"]), r.get("mean_exit_loop"), r.get("decode_loops_per_token")) for r in rs if r["model"] == model and get(r["options"]) is not None)
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}: mean exit loop")[0]
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls=":", color=line.get_color(), label=f"{model}: loops computed / token")
        ax.set_xlabel(xlabel)
        if key == "budget_loops":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("loops per token")
        ax.legend(fontsize=6)
    fig.suptitle("anytime decoding, batch 1: depth versus budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# -- the server under load (benchmarks/test_serve_load.py) ------------------------------------
CONCURRENCY_TICKS = (1, 8, 32, 64)


def serve_runs(others: list[dict]) -> list[dict]:
    """The serve load benchmarks' extra_info, one per mode (those with per-concurrency levels)."""
    return [b["extra_info"] for b in others if (b.get("extra_info") or {}).get("serve_levels")]


def plot_serve(others: list[dict], out: Path) -> bool:
    runs = serve_runs(others)
    if not runs:
        return False
    plt = _plt()
    panels = [("tokens/s (all streams)", [("tokens_per_s", "-")]),
              ("time to first token (ms)", [("ttft_p50_ms", "-"), ("ttft_p95_ms", ":")]),
              ("inter-token latency (ms)", [("itl_p50_ms", "-"), ("itl_p95_ms", ":")])]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for run in runs:
            levels = run["serve_levels"]
            xs = [lv["concurrency"] for lv in levels]
            for key, ls in series:
                ys = [lv.get(key) for lv in levels]
                ax.plot(xs, ys, marker="o", ls=ls, color=MODE_COLORS.get(run["serve_mode"], "#999999"),
                        label=f"{run['serve_mode']} {key.rsplit('_', 2)[-2] if key != 'tokens_per_s' else ''}".strip())
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY_TICKS), [str(c) for c in CONCURRENCY_TICKS])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(ylabel)
        if ylabel.endswith("(ms)"):
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.suptitle("looplm serve on loopback: streaming clients against concurrency", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def serve_lines(others: list[dict], plot_name: str | None) -> list[str]:
    """The "Server under load" subsection: the plot, one table row per mode and concurrency, and the
    budget-under-saturation case."""
    runs = serve_runs(others)
    if not runs:
        return []
    lines = ["### Server under load (`test_serve_load.py`)", ""]
    if plot_name:
        lines += [f"![looplm serve: throughput and latency against concurrency]({plot_name})", ""]
    lines += ["| mode | clients | requests | tokens | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for lv in run["serve_levels"]:
            name = " ".join([run["serve_mode"], *(f"{k}={v}" for k, v in (run.get("options") or {}).items())])
            lines.append(f"| {name} | {lv['concurrency']} | "
                         f"{lv['requests']} | {lv['tokens']} | {_fmt(lv['tokens_per_s'], 1)} | {_fmt(lv['ttft_p50_ms'], 1)} | "
                         f"{_fmt(lv['ttft_p95_ms'], 1)} | {_fmt(lv['itl_p50_ms'], 1)} | {_fmt(lv['itl_p95_ms'], 1)} |")
    first = runs[0]
    lines += ["", f"Streaming requests of {first.get('new_tokens')} greedy tokens over raw SSE; TTFT from sending the "
              "request to its first token chunk, ITL between a stream's token chunks (when the server or the one-process "
              "load generator falls behind, a stream's chunks arrive in bursts: ITL p50 then drops toward 0 while p95 "
              "keeps the gaps). Load average at the end of each mode: "
              + ", ".join(f"{r['serve_mode']} {r['load_average'][0]:.1f}" for r in runs if r.get("load_average")) + "."]
    sat = next((b["extra_info"] for b in others if (b.get("extra_info") or {}).get("serve_case")), None)
    if sat:
        lines += ["", f"- {sat['serve_case']}: budget {sat['budget_ms']:g} ms per token, p95 inter-token latency "
                  f"{_fmt(sat['budget_itl_p95_ms'], 1)} ms against budget + one loop = {sat['budget_ms'] + sat['one_loop_ms']:.1f} ms: "
                  f"{'met' if sat['within_budget_plus_one_loop'] else 'NOT met'}"
                  + (f" (p50 {_fmt(sat['budget_itl_p50_ms'], 1)} ms; one loop {sat['one_loop_ms']:.1f} ms and full depth "
                     f"{sat['idle_full_itl_p50_ms']:.1f} ms per token with {sat['timed_clients']} clients on the idle server, "
                     f"{sat['one_loop_ms_1_client']:.1f} / {sat['idle_full_itl_p50_ms_1_client']:.1f} ms with one)"
                     if "timed_clients" in sat else "") + "."]
    return lines + [""]


def trees_lines(others: list[dict]) -> list[str]:
    """The "Draft trees and the draft loop" subsection: per setting of each test_trees.py sweep, speed,
    weight passes, tokens and rows per forward, acceptance per tested position and per tree depth."""
    sweeps = [b for b in others if b.get("name", "").startswith("test_draft_trees") and (b.get("extra_info") or {}).get("rows")]
    if not sweeps:
        return []
    lines = ["### Draft trees and the draft loop (`test_trees.py`)", ""]
    for b in sweeps:
        e = b["extra_info"]
        kind = f"sampling at temperature {e['temperature']:g}" if "temperature" in e else "greedy, every output equal to full depth"
        lines += [f"{kind}; full depth {_fmt(e['full_tokens_per_s'], 1)} tokens/s, {_fmt(e['full_weight_passes_per_token'])} "
                  f"weight passes per token:", "",
                  "| draft loop k | branch b | tok/s | x full | weight passes/token | tokens/forward | rows/forward | acceptance | by tree depth | wins by rank |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            k = r["draft_loop"]
            if k == "adaptive":
                by_loop = ", ".join(f"{n} at loop {j}" for j, n in sorted(r.get("tokens_by_loop", {}).items()))
                k = f"adaptive, call cost {r['call_cost']:g} ({by_loop})"
            depth = " / ".join("–" if a is None else f"{a:.2f}" for a in r.get("acceptance_by_depth") or []) or "–"
            b = r["branch"]
            if r.get("draft_tokens", 1) == 2:  # spec.multi: second-token drafts
                t = r.get("second_threshold")
                at = "" if t is None else " chosen per request" if t == "adaptive" else f" at top-1 >= {t:g}"
                b = (f"{b}, second drafts{at}: {r['seconds_accepted']}/{r['seconds_tested']} "
                     f"passed, {r['pairs_emitted']} forwards emitted 2")
            lines.append(f"| {k} | {b} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_to_full'])} | "
                         f"{_fmt(r['weight_passes_per_token'])} | {_fmt(r['tokens_per_forward'])} | {_fmt(r['rows_per_forward'])} | "
                         f"{_fmt(r['token_acceptance'], 3)} | {depth} | {r.get('won_by_rank', '–')} |")
        lines.append("")
    lines += ["x full: best time of the setting against the best of its paired full-depth calls (16 prompts x "
              f"{sweeps[0]['extra_info'].get('new_tokens')} tokens, batch 1, 1 thread); acceptance: accepted over tested "
              "positions; by tree depth: positions 1..D-1 past the last emitted token with a winning candidate (1..2D-1 "
              "with second drafts, which sit one position past their pair's first); wins by rank: tested positions won "
              "by the top-1, top-2, ... candidate.", ""]
    return lines


def _row_cost(others: list[dict]) -> dict | None:
    """The extra_info of benchmarks/test_row_cost.py's run, if this run has one."""
    return next((b["extra_info"] for b in others if b.get("name", "").startswith("test_row_cost") and (b.get("extra_info") or {}).get("modes")), None)


def row_cost_headline(others: list[dict]) -> str | None:
    """One line for the headlines: what a row costs and the bound it puts on speculation."""
    e = _row_cost(others)
    if not e or not e.get("row_bound"):
        return None
    R = e["common_rows"]
    return (f"a loop over {R} rows costs **{_fmt(e['cost_ratio_by_rows'][str(R)])}x** one row, which bounds speculation in "
            f"{R}-row calls at **{_fmt(e['row_bound'])}x** full depth with perfect drafts; the recommended setting ran "
            f"{_fmt(e['ratio_to_full'])}x (decode tokens/s, batch 1, {e['threads']} thread)")


def fixed_step_headline(others: list[dict]) -> str | None:
    """One line for the headlines: the compiled fixed-shape step at batch 1 on the bundled model,
    for full depth and for anytime q_exit with finish="ahead" (benchmarks/test_kernels_decode.py)."""
    info = {b.get("name", ""): b.get("extra_info") or {} for b in others}
    full, ahead = info.get("test_full_depth_decode[compiled-default]"), info.get("test_anytime_ahead_decode[compiled]")
    plan = info.get("test_anytime_ahead_decode[eager]")
    parts = []
    if full and full.get("interleaved_speedup"):
        parts.append(f"full depth **{_fmt(full['interleaved_speedup'])}x** the runner's plan ({_fmt(full['tokens_per_s'], 1)} tokens/s)")
    if ahead and ahead.get("interleaved_speedup"):
        parts.append(f"anytime q_exit q=0.5 with finish=\"ahead\" **{_fmt(ahead['interleaved_speedup'])}x** its plan "
                     f"({_fmt(ahead['tokens_per_s'], 1)} tokens/s, mean exit loop {_fmt(ahead['mean_exit_loop'])}), "
                     f"{_fmt(ahead['x_full_same_step'])}x full depth compiled"
                     + (f" (with the plan: {_fmt(plan['x_full_same_step'])}x full depth's plan)" if plan else ""))
    if not parts:
        return None
    return "; ".join(parts) + " (decode tokens/s at batch 1, back-to-back pairs, median of 3; compiled once per bucket outside the timing)"


def _cheapest(e: dict) -> str:
    R = e.get("cheapest_rows")
    if R is None or str(R) not in e.get("cost_ratio_by_rows", {}):
        return ""
    return (f" The cheapest row-loop timed is at {R} rows: a decoder whose every call held {R} tokens that all "
            f"pass would be bounded at {_fmt(R / e['cost_ratio_by_rows'][str(R)])}x.")


def row_cost_lines(others: list[dict]) -> list[str]:
    """benchmarks/test_row_cost.py: where batch-1 decode time goes, full depth against speculation."""
    e = _row_cost(others)
    if not e:
        return []
    opts = e.get("mode_options") or {}
    lines = ["### Where decode time goes (`test_row_cost.py`)", "",
             f"Bundled model, batch 1, {e['threads']} thread, the first {e['prompts']} benchmark prompts x {e['new_tokens']} "
             f"new tokens, decode steps only (each prompt's prefill timed alone and taken out), best of {e['repeats']} "
             "repeats; every `loop_body` and `head` call timed and binned by its rows. Load average "
             + _load_change((e["load_average_before"], e["load_average_after"])) + ".", "",
             "| mode | decode tok/s | loop-body calls/token | row-loops/token | loop-body ms/token | head rows/token | head ms/token | rest ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in e["modes"].items():
        o = opts.get(mode)
        name = mode if o is None else f"{mode} (" + ", ".join(f"{k}={v}" for k, v in o.items()) + ")"
        lines.append(f"| {name} | {_fmt(m['decode_tokens_per_s'], 1)} | {_fmt(m['loop_calls_per_token'])} | "
                     f"{_fmt(m['row_loops_per_token'])} | {_fmt(m['loop_ms_per_token'])} | {_fmt(m['head_rows_per_token'])} | "
                     f"{_fmt(m['head_ms_per_token'])} | {_fmt(m['other_ms_per_token'])} |")
    cost = ", ".join(f"{R} row{'' if R == '1' else 's'} {_fmt(ms)} ms ({_fmt(e['cost_ratio_by_rows'].get(R))}x)" for R, ms in e["loop_ms_by_rows"].items())
    bound = e.get("row_bound")
    lines += ["", f"A loop-body call (one loop of the 2 layers over R rows) costs {cost}. The recommended speculative setting ran "
              f"{_fmt(e['ratio_to_full'])}x full depth's decode tokens/s. Speculation saves loop-body calls, not row-loops: every "
              f"token still runs its T loops on some row. The recommended setting's calls of {e['common_rows']} rows, its most common size, "
              + (f"bound its speed-up at {e['common_rows']} x c(1) / c({e['common_rows']}) = {_fmt(bound)}x, if drafts were "
                 "never rejected and heads, draft maps and bookkeeping cost nothing." if bound else "could not be timed apart.")
              + _cheapest(e)
              + " Weight passes per token track decode time only where an extra row is nearly free.", ""]
    return lines


def _spec_load(others: list[dict]) -> dict | None:
    """The extra_info of benchmarks/test_spec_load.py's run, if this run has one."""
    return next((b["extra_info"] for b in others if (b.get("extra_info") or {}).get("load_sweep")), None)


def spec_load_headline(others: list[dict]) -> str | None:
    """One line for the headlines: speculation at the most requests timed, drafting always and as recommended."""
    e = _spec_load(others)
    if not e:
        return None
    top = e["load_sweep"][-1]
    return (f"at {top['requests']} requests at once, speculative requests that always draft ran **{_fmt(top['always_ratio_to_full'])}x** "
            f"full depth's tokens/s, and **{_fmt(top['recommended_ratio_to_full'])}x** as recommended "
            f"(`full_depth_above={e['full_depth_above']}`: above it they switch to full depth"
            + ("; every one did, so that is full depth against itself, within the machine's noise)"
               if top["switched_for_load"] == top["requests"] else ")"))


def spec_load_lines(others: list[dict]) -> list[str]:
    """benchmarks/test_spec_load.py: speculative against full depth by requests sharing the engine's steps."""
    e = _spec_load(others)
    if not e:
        return []
    lines = ["### Speculation beside other requests (`test_spec_load.py`)", "",
             f"Bundled model, {e['threads']} thread, greedy, n requests submitted together (they share every step), "
             f"{e['new_tokens']} new tokens each; tokens/s over the call (prefill included), median of {e['repeats']} "
             "alternating rounds; every output equal to full depth. *always*: speculative with `full_depth_above=None`; "
             f"*recommended*: the checkpoint's `full_depth_above={e['full_depth_above']}` (above it a request switches to "
             "full depth at its first token). Load average "
             + _load_change((e["load_average_before"], e["load_average_after"])) + ".", "",
             "| requests | full tok/s | always tok/s | always x full | recommended tok/s | recommended x full | switched for load |",
             "|---|---|---|---|---|---|---|"]
    for r in e["load_sweep"]:
        lines.append(f"| {r['requests']} | {_fmt(r['full_tokens_per_s'], 1)} | {_fmt(r['always_tokens_per_s'], 1)} | "
                     f"{_fmt(r['always_ratio_to_full'])} | {_fmt(r['recommended_tokens_per_s'], 1)} | "
                     f"{_fmt(r['recommended_ratio_to_full'])} | {r['switched_for_load']} of {r['requests']} |")
    return lines + [""]


# -- markdown ----------------------------------------------------------------------------------
def machine_line(data: dict) -> tuple[str, dict]:
    mi = (data.get("machine_info") or {}).get("looplm") or {}
    if not mi:
        m = data.get("machine_info") or {}
        return f"{m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}", {}
    gpu = mi.get("gpu") or "no GPU"
    text = (
        f"{mi.get('cpu')}, {mi.get('cores')} cores (torch threads {mi.get('torch_threads')} in test_decoders.py, "
        f"OMP_WAIT_POLICY={mi.get('omp_wait_policy')}), {gpu}; device `{mi.get('device')}`; torch {mi.get('torch')}, "
        f"Python {mi.get('python')}"
    )
    return text, mi


def table(rows: list[dict]) -> list[str]:
    head = (
        "| model | batch | decoder | new tok/row | tok/s | decode tok/s | x full (decode) | x full (e2e) "
        "| mean exit loop | loops computed/token | accept rate | mean accepted | KV/token | peak mem MiB | = full |"
    )
    out = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    order = {"full": 0, "speculative": 1, "anytime": 2}

    def key(r):
        return (r["model"], r["batch"], bool((r.get("options") or {}).get("kv")), order.get(r["mode"], 9), label(r))

    for r in sorted(rows, key=key):
        out.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    str(r["batch"]),
                    label(r),
                    str(r.get("new_tokens_per_row")),
                    _fmt(r.get("tokens_per_s")),
                    _fmt(r.get("decode_tokens_per_s")),
                    _fmt(r.get("decode_ratio_to_full")),
                    _fmt(r.get("ratio_to_full")),
                    _fmt(r.get("mean_exit_loop")),
                    _fmt(r.get("decode_loops_per_token")),
                    _fmt(r.get("acceptance_rate")),
                    _fmt(r.get("mean_accepted_length")),
                    _bytes(r.get("kv_bytes_per_token")),
                    _fmt(r.get("peak_mem_mb"), 1),
                    _fmt(None if r.get("token_agreement_with_full") is None else 100 * r["token_agreement_with_full"], 0, "%"),
                ]
            )
            + " |"
        )
    return out


def other_table(others: list[dict]) -> list[str]:
    """The other benchmark files' results, one table per file, with their own scalar extra_info."""
    by_file = defaultdict(list)
    for b in others:
        by_file[b.get("fullname", b.get("name", "?")).split("::")[0]].append(b)
    out = []
    for file, bs in by_file.items():
        out += [f"#### `{file}`", "", "| benchmark | median | rounds | extra_info |", "|---|---|---|---|"]
        for b in bs:
            st = b.get("stats") or {}
            ei = {
                k: v
                for k, v in (b.get("extra_info") or {}).items()
                if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 40)
            }
            info = ", ".join(f"{k}={_fmt(v, 3) if isinstance(v, float) else v}" for k, v in ei.items())
            med = st.get("median")
            out.append(f"| `{b.get('name')}` | {_fmt(med * 1e3 if med else None, 1, ' ms')} | {st.get('rounds', '–')} | {info} |")
        out.append("")
    return out


def bandwidth_table(others: list[dict]) -> list[str]:
    """benchmarks/test_bandwidth.py: batch-1 full-depth decode against the memory-bandwidth bound."""
    runs = [b["extra_info"]["bandwidth"] for b in others if "bandwidth" in (b.get("extra_info") or {})]
    if not runs:
        return []
    out = [
        f"CPU bf16: {runs[0]['cpu_bf16']}. Load average (1/5/15 min) before and after each model: "
        + "; ".join(f"`{r['model']}` " + _load_change(r["load_average"]) for r in runs) + ".",
        "",
        "| model | dtype (loader default) | threads | bytes/token: weights/loop x loops + head + KV | matvec GB/s | bound tok/s | decode tok/s | of bound | bf16 / f32 | = f32 tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for x in r["results"]:
            b = x["bytes"]
            default = " (default)" if x["dtype"] == r["default_dtype"] else ""
            out.append(
                f"| {r['model']} | {x['dtype']}{default} | {x['threads']} | {b['weights_per_loop'] / 1e6:,.1f} MB x {b['loops']} + "
                f"{b['head'] / 1e6:,.1f} MB + {b['kv'] / 1e6:,.2f} MB = {b['total'] / 1e6:,.1f} MB | {x['matvec_gb_s']:.1f} | "
                f"{x['bound_tokens_per_s']:.2f} | {x['decode_tokens_per_s']:.2f} | {100 * x['fraction_of_bound']:.0f}% | "
                f"{_fmt(x.get('speedup_over_float32'))} | {_fmt(100 * x['token_agreement_with_float32'] if 'token_agreement_with_float32' in x else None, 0, '%')} |"
            )
    out += [
        "",
        "Bytes per decode step: every layer weight, the final norm and the exit gate once per loop, the LM head and one "
        "embedding row once, and the K/V of every (loop, layer) up to the step's position (mean over the steps). "
        "*matvec GB/s*: best of the rounds' `F.linear` of one row over a 256 MiB weight of that dtype, with that many threads, "
        "measured right before each decode call; *bound* = matvec rate / bytes per step; *decode tok/s*: best round of a "
        "greedy `Engine.generate(mode=\"full\")` call, batch 1, tokens after the first / their step latencies; "
        "*of bound* = decode / bound. Rounds alternate the dtypes and thread counts.",
        "",
    ]
    for r in runs:
        a = r.get("acceptance")
        if a:
            out.append(
                f"- **Acceptance** (`{r['model']}`, {a['threads']} threads): float32 at {100 * a['float32_fraction']:.0f}% of its bound, "
                f"bf16 at {100 * a['bfloat16_fraction']:.0f}%, bf16 {a['bf16_speedup']:.2f}x float32 tokens/s "
                f"(targets >= 75%, >= 75%, >= 1.4x): {'met' if a['met'] else 'NOT met'}."
            )
    return out + [""]


def _load(r: dict) -> str:
    la = r.get("load_average")
    return f"{la[0]:.1f}" if la else "–"


def concurrency_headline(conc: list[dict]) -> str | None:
    full = {(r["model"], r["requests"]): r for r in conc if r["concurrency"] == "full_vs_sequential"}
    anytime = [r for r in conc if r["concurrency"] == "anytime_vs_full"]
    parts = []
    for (model, n), r in sorted(full.items()):
        if n == 16:
            parts.append(f"**{r['ratio_to_sequential']:.2f}x** the tokens/s of the same 16 requests one after another on `{model}` "
                         f"({r['tokens_per_s']:.1f} vs {r['sequential_tokens_per_s']:.1f} tokens/s; target 6x on the bundled model)")
    for r in sorted(anytime, key=lambda r: (r["model"], str(r["options"]))):
        opts = " ".join(f"{k}={v}" for k, v in r["options"].items())
        parts.append(f"anytime {opts} at {r['requests']} requests on `{r['model']}`: **{r['ratio_to_full']:.2f}x** full depth "
                     f"(target 1.6x)")
    return "; ".join(parts) or None


def concurrency_tables(conc: list[dict]) -> list[str]:
    """Concurrent vs sequential full depth, and anytime vs full depth at the same concurrency."""
    full = sorted((r for r in conc if r["concurrency"] == "full_vs_sequential"), key=lambda r: (r["model"], r["requests"]))
    anytime = sorted((r for r in conc if r["concurrency"] == "anytime_vs_full"), key=lambda r: (r["model"], str(r["options"])))
    out = []
    if full:
        out += ["| model | requests | new tok/request | sequential tok/s | concurrent tok/s | x sequential | = sequential | load avg |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['requests']} | {r['new_tokens_per_request']} | {_fmt(r['sequential_tokens_per_s'])} | "
                f"{_fmt(r['tokens_per_s'])} | {_fmt(r['ratio_to_sequential'])} | {'yes' if r.get('same_tokens') else 'no'} | {_load(r)} |"
                for r in full]
        out.append("")
    if anytime:
        out += ["| model | requests | anytime options | new tok/request | full tok/s | anytime tok/s | x full | mean exit loop | "
                "loops computed/token | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['requests']} | {' '.join(f'{k}={v}' for k, v in r['options'].items())} | "
                f"{r['new_tokens_per_request']} | {_fmt(r['full_tokens_per_s'])} | {_fmt(r['tokens_per_s'])} | {_fmt(r['ratio_to_full'])} | "
                f"{_fmt(r.get('mean_exit_loop'))} | {_fmt(r.get('loops_computed_per_token'))} | {_load(r)} |" for r in anytime]
        out.append("")
    if out:
        out.append(
            "Requests are greedy, submitted together with `Engine.generate(list)` (the engine runs every live request in one "
            "runner step per engine step); *tok/s* = all new tokens / wall time of the whole set, fastest round; *x* = median "
            "over rounds of (the reference call's time / this call's time), the two made back to back; *sequential* runs the "
            "same requests one after another; *= sequential* = the concurrent tokens equal the sequential ones; *load avg* = "
            "1-minute load average when the benchmark ended (other jobs share this machine); 1 torch thread.")
        out.append("")
    return out


def not_passed(outcomes: list[dict]) -> list[str]:
    """Skipped and failed tests, grouped by file and reason."""
    groups = defaultdict(list)
    for o in outcomes:
        if o["outcome"] != "passed":
            file, _, name = o["test"].partition("::")
            groups[(o["outcome"], file, o["reason"])].append(name)
    out = []
    for (outcome, file, reason), names in groups.items():
        shown = ", ".join(f"`{n}`" for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        out.append(f"- {outcome}: {len(names)} in `{file}` ({shown}): {reason}")
    return out


def section(path: Path, data: dict, out_dir: Path) -> list[str]:
    suffix = _suffix(path)
    rows, others, conc = rows_of(data), others_of(data), concurrency_of(data)
    outcomes = data.get("looplm_outcomes") or []
    machine, mi = machine_line(data)
    device = mi.get("device", "cpu")
    commit = mi.get("commit") or (data.get("commit_info") or {}).get("id", "?")[:7]
    dirty = mi.get("dirty", (data.get("commit_info") or {}).get("dirty"))
    date = mi.get("date_utc") or data.get("datetime", "?")
    lines = [
        f"## {device.upper()}: {mi.get('gpu') or mi.get('cpu') or '?'}",
        "",
        f"- Machine: {machine}.",
        f"- Run: {date}, commit `{commit}`" + (" (with uncommitted changes to the measured code)" if dirty else " (clean)") + f", from `benchmarks/{path.name}`.",
    ]
    for rerun in data.get("looplm_reruns") or []:  # files measured again later and merged into this JSON
        la = rerun.get("load_average")
        load = f"load average {la:.1f}" if la is not None else "load average not recorded by this benchmark"
        if rerun.get("kept"):  # left out of this run: its rows come from an earlier one
            lines.append(f"- Not in this run: `{rerun['file']}`; its rows are from commit `{rerun['commit']}`, {rerun['date']} ({load}).")
        else:
            lines.append(f"- Rerun: `{rerun['file']}` at commit `{rerun['commit']}`, {rerun['date']} ({load}); its rows "
                         "replace the run's above.")
    if mi.get("load_average_at_start"):
        la = mi["load_average_at_start"]
        lines.append(f"- Load average when the run started: {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} (1/5/15 min; other jobs share this machine).")
    descs = {r["model"]: r.get("model_description", "") for r in rows}
    for name, desc in sorted(descs.items()):
        lines.append(f"- `{name}`: {desc}.")
    counts = defaultdict(int)
    for o in outcomes:
        counts[o["outcome"]] += 1
    if outcomes:
        lines.append(f"- Tests: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed.")
    lines += [
        "",
        "### Headlines",
        "",
        *([f"- **Self-speculation speed target** (`test_spec_speedup.py`): {spec_target(others)}"] if spec_target(others) else []),
        *([f"- **What a row costs** (`test_row_cost.py`): {row_cost_headline(others)}"] if row_cost_headline(others) else []),
        *([f"- **Speculation beside other requests** (`test_spec_load.py`): {spec_load_headline(others)}"] if spec_load_headline(others) else []),
        *([f"- **Speculation with useless drafts** (`test_spec_fallback.py`, random-100m): {spec_fallback(others)}"] if spec_fallback(others) else []),
        *([f"- **Under CPU load** (`test_cpu_load.py`, loaded / quiet tokens/s, median of paired rounds): {cpu_load(others)}"] if cpu_load(others) else []),
        *([f"- **Concurrent requests** (`test_concurrency.py`): {concurrency_headline(conc)}"] if concurrency_headline(conc) else []),
        *([f"- **Compiled fixed-shape step** (`test_kernels_decode.py`, `default`): {fixed_step_headline(others)}"] if fixed_step_headline(others) else []),
        f"- **Best speculative speedup** (`test_decoders.py`, 32 new tokens): {best_speculative(rows, outcomes)}",
        "- **Memory saved by KV sharing** (KV cache bytes per position and row; peak memory of one call):",
        kv_savings(rows, outcomes) if kv_savings(rows, outcomes).startswith("  ") else f"  {kv_savings(rows, outcomes)}",
        "- **Anytime decoding** (batch 1):",
        anytime_summary(rows, outcomes) if anytime_summary(rows, outcomes).startswith("  ") else f"  {anytime_summary(rows, outcomes)}",
        "",
    ]
    plots = [
        (f"tokens_per_s_by_mode{suffix}.png", "Decode tokens/s by mode (batch 1)", plot_by_mode),
        (f"tokens_per_s_by_batch{suffix}.png", "Decode tokens/s by batch size", plot_by_batch),
        (f"spec_speedup{suffix}.png", "Speculative speedup versus draft loop and draft length", plot_spec),
        (f"anytime_loops{suffix}.png", "Anytime: mean loops versus budget", plot_anytime),
    ]
    lines += ["### Plots", ""]
    for name, title, fn in plots:
        if fn(rows, out_dir / name):
            lines.append(f"![{title}]({name})")
            lines.append("")
        else:
            lines.append(f"- {title}: not measured in this run.")
    serve_plot = f"serve_load{suffix}.png"
    lines += serve_lines(others, serve_plot if plot_serve(others, out_dir / serve_plot) else None)
    lines += trees_lines(others)
    lines += row_cost_lines(others)
    lines += spec_load_lines(others)
    lines += ["### All decoder measurements", ""] + table(rows) + [""]
    lines += [
        "Columns: *tok/s* = new tokens (all rows) / wall time of one greedy `Engine.generate` call, fastest of "
        "the timed rounds (the machine is shared: noise only slows a run); *decode tok/s* excludes the prefill "
        "(`Generation.stats['prefill_ms']`, or `prefill` timed apart); *x full* = median over the timed rounds of "
        "(time of a full-depth call of the same model, batch and length, run right before the round) / "
        "(the round's time); "
        "*mean exit loop* = mean 1-based loop whose head emitted each token; *loops computed/token* = "
        "(position, loop) pairs of the requests' forwards (`Generation.stats['token_loops']`, summed) after "
        "their prefill per new token (rejected drafts and finished skipped loops included); "
        "*KV/token* = bytes of the KV cache per position and row, after decoding; *peak mem* = "
        + next((r["peak_mem_method"] for r in rows if r.get("peak_mem_method")), "not measured")
        + ", during the untimed warm-up call"
        + "; *= full* = fraction of tokens equal to full-depth greedy output.",
        "",
    ]
    bandwidth = bandwidth_table(others)
    if bandwidth:
        lines += ["### Bandwidth bound of batch-1 decoding (`test_bandwidth.py`)", ""] + bandwidth
    tables = concurrency_tables(conc)
    if tables:
        lines += ["### Engine concurrency", ""] + tables
    other = other_table([b for b in others if not {"bandwidth", "modes", "load_sweep"} & set(b.get("extra_info") or {})])
    if other:
        lines += ["### Other benchmarks in this run", ""] + other
    bad = not_passed(outcomes)
    if bad:
        lines += ["### Skipped or failed", ""] + bad + [""]
    return lines


def versus_section(v: dict) -> list[str]:
    """The batch-1 comparison of this engine with an earlier commit (benchmarks.versus)."""
    load = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    lines = [
        f"## Batch 1 against commit `{v['ref']}`",
        "",
        f"`python -m benchmarks.versus {v['ref']}` at `{v['this']}`, {v['date']}: both trees' engines in two processes "
        f"taking turns for {v['rounds']} rounds, each round the {v['prompts']} benchmark prompts generated alone for "
        f"{v['tokens']} new tokens, greedy, 1 torch thread; ratio = median over rounds of this / reference; "
        f"x full = median over rounds of the case's tokens/s over full depth's within the same tree and round. "
        f"Load average {load(v['load_average_start'])} at the start, {load(v['load_average_end'])} at the end.",
        "",
        "| case | this tree (tokens/s) | reference (tokens/s) | ratio | this tree x full | reference x full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    xf = lambda c, k: f"{c[k]:.3f}" if k in c else "–"  # noqa: E731
    for name, c in v["cases"].items():
        lines.append(f"| {name} | {c['this_tokens_per_s']:.1f} | {c['ref_tokens_per_s']:.1f} | {c['ratio']:.3f} "
                     f"| {xf(c, 'this_x_full')} | {xf(c, 'ref_x_full')} |")
    return lines + [""]


def render(paths: list[Path] | None = None, out: Path | None = None) -> Path:
    """Writes RESULTS.md (and the plots next to it) from the given pytest-benchmark JSON files."""
    if not paths:
        paths = [p for p in (HERE / "results.json", HERE / "results-cuda.json") if p.is_file()]
    out = out or HERE / "RESULTS.md"
    lines = [
        "# looplm benchmark results",
        "",
        "Generated by `python -m benchmarks` (pytest-benchmark, `benchmarks/test_*.py`) from the JSON named in each "
        "section; regenerate rather than edit. Every decoder runs greedy on the same model in the same process, "
        "with a warm-up call outside the timed rounds, and each benchmark asserts that what it timed is correct "
        "(speculative output equals full-depth output, and so on), never that it is fast.",
        "",
    ]
    if not paths:
        lines.append("not measured: no results JSON (run `python -m benchmarks`).")
    for p in paths:
        lines += section(Path(p), load(p), out.parent)
    gpu_json = HERE / "results-gpu.json"  # python -m benchmarks.gpu on a lent GPU
    if gpu_json.is_file():
        from .gpu import render_section

        lines += render_section(load(gpu_json))
    versus_json = HERE / "versus.json"  # python -m benchmarks.versus REF
    if versus_json.is_file():
        lines += versus_section(json.loads(versus_json.read_text()))
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


if __name__ == "__main__":
    print(render([Path(a) for a in sys.argv[1:]] or None))
