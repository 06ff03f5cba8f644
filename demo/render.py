"""Pure rendering for the demo: steps -> coloured HTML, a table, summary stats and a plot.

Nothing here imports gradio, so the tests can check the markup directly. Every generated token
becomes one `<span class="tok" data-loops=.. data-token-id=..>`; the number of loops it used picks
its colour (legend 1..T) and is shown as a small superscript label.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display; Figure objects are built without pyplot (thread-safe enough per request)
from matplotlib import colormaps
from matplotlib.figure import Figure

from looplm.decoding import Step

TABLE_HEADERS = ["#", "token", "id", "loops", "exit loop", "latency ms", "reason"]

CSS = """
.looplm-out { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; line-height: 2.1;
  white-space: pre-wrap; word-break: break-word; font-size: 15px; }
.looplm-out .prompt { color: #666; }
.looplm-out .tok { border-radius: 3px; padding: 1px 1px; margin: 0 1px; }
.looplm-out .tok::after { content: attr(data-loops); font-size: 0.6em; vertical-align: super; opacity: 0.75;
  margin-left: 1px; }
.looplm-out .tok.draft { box-shadow: inset 0 -3px 0 #1b9e3e; }
.looplm-out .tok.verify { outline: 2px solid #d62728; }
.looplm-legend { font-size: 13px; margin-bottom: 6px; }
.looplm-legend .legend-item { display: inline-block; min-width: 1.6em; text-align: center; border-radius: 3px;
  margin-right: 2px; }
.looplm-legend .key { margin-left: 10px; padding: 0 4px; }
.looplm-legend .key.draft { box-shadow: inset 0 -3px 0 #1b9e3e; }
.looplm-legend .key.verify { outline: 2px solid #d62728; }
.looplm-stats { font-size: 14px; padding: 6px 0; }
.looplm-stats .stat { display: inline-block; margin-right: 16px; }
.looplm-stats .extra { color: #666; font-size: 12px; }
.looplm-message.error { color: #a40000; background: #fdecea; border: 1px solid #f5c2c0; border-radius: 4px;
  padding: 6px 10px; }
"""


def loop_colour(loops: int, num_loops: int) -> tuple[str, str]:
    """(background, text) hex colours for a token that used `loops` of `num_loops` loops.

    Shallow tokens are pale yellow, full-depth tokens deep purple (matplotlib's "plasma_r").
    """
    frac = 0.0 if num_loops <= 1 else (min(max(loops, 1), num_loops) - 1) / (num_loops - 1)
    r, g, b, _ = colormaps["plasma_r"](0.08 + 0.84 * frac)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    bg = "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))
    return bg, "#000000" if luminance > 0.5 else "#ffffff"


def legend_html(num_loops: int, speculative: bool = False) -> str:
    """The colour key 1..T (and, for speculative mode, the accepted-draft / verified keys)."""
    items = []
    for k in range(1, num_loops + 1):
        bg, fg = loop_colour(k, num_loops)
        items.append(f'<span class="legend-item" data-loops="{k}" style="background:{bg};color:{fg}">{k}</span>')
    keys = ""
    if speculative:
        keys = ('<span class="key draft">accepted draft</span>'
                '<span class="key verify">chosen by verification</span>')
    return f'<div class="looplm-legend">depth (loop read out): {"".join(items)}{keys}</div>'


def _visible(text: str) -> str:
    if not text:
        return "\u00b7"  # a token that added no text yet (e.g. half a character)
    return html.escape(text).replace("\n", "\u21b5")  # a visible mark; the break itself follows the span


def step_title(step: Step) -> str:
    return (f"#{step.index} id {step.token}: {step.loops} loop{'s' if step.loops != 1 else ''} computed, "
            f"exit at loop {step.exit_loop} ({step.reason}), {step.latency_ms:.1f} ms")


def tokens_html(prompt: str, steps: Sequence[Step], num_loops: int, *, mode: str = "full", state: str = "done") -> str:
    """The prompt followed by one coloured span per generated token.

    Args:
        prompt: the prompt text, shown uncoloured.
        steps: the generated tokens in order (one row).
        num_loops: T, the model's loops per token (for the colour scale).
        mode: the decoding mode; "speculative" marks draft vs verify tokens.
        state: "running" while streaming, "done" at the end (exposed as data-state).
    Returns:
        An HTML string; each token is `<span class="tok" data-loops="k" ...>`, coloured and labelled
        by k = its depth: the loop whose head read it out (Step.exit_loop; T in full and speculative
        modes). Anytime decoding may compute more loops for a token than that depth (its skipped
        loops, finished later or, with finish="ahead", before the exit is decided): the title says.
    """
    spans = []
    for s in steps:
        bg, fg = loop_colour(s.exit_loop, num_loops)
        kind = f" {s.reason}" if s.reason in ("draft", "verify") else ""
        spans.append(
            f'<span class="tok{kind}" data-loops="{s.exit_loop}" data-index="{s.index}" '
            f'data-token-id="{s.token}" data-reason="{html.escape(s.reason)}" title="{html.escape(step_title(s))}" '
            f'style="background:{bg};color:{fg}">{_visible(s.text)}</span>' + "\n" * s.text.count("\n")
        )
    return (
        f'{legend_html(num_loops, mode == "speculative")}'
        f'<div class="looplm-out" data-mode="{html.escape(mode)}" data-state="{state}" data-count="{len(steps)}">'
        f'<span class="prompt">{html.escape(prompt)}</span>{"".join(spans)}</div>'
    )


def table_rows(steps: Sequence[Step]) -> list[list]:
    """One row per token: TABLE_HEADERS."""
    return [[s.index, repr(s.text), s.token, s.loops, s.exit_loop, round(s.latency_ms, 2), s.reason] for s in steps]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def summary(steps: Sequence[Step], num_loops: int, elapsed_s: float, stats: dict | None = None) -> dict:
    """Summary numbers: tokens, tokens/s, mean exit loop (the loop whose head chose each token), loops
    computed per token (when the run finished: the engine's count, skipped loops finished later
    included), mean latency, acceptance rate (when the decoder reports it).

    `stats` is Generation.stats when the run finished (its tokens/s is the engine's own measure);
    while streaming it is None and tokens/s is measured here.
    """
    stats = stats or {}
    n = len(steps)
    out = {
        "tokens": n,
        "tokens_per_s": stats.get("tokens_per_s", n / elapsed_s if elapsed_s > 0 else 0.0),
        "mean_exit_loop": sum(s.exit_loop for s in steps) / n if n else 0.0,
        "num_loops": num_loops,
        "mean_latency_ms": sum(s.latency_ms for s in steps) / n if n else 0.0,
    }
    if _number(stats.get("loops_computed_per_token")) is not None:
        out["loops_computed_per_token"] = float(stats["loops_computed_per_token"])
    accept = next((stats[k] for k in ("acceptance_rate", "accept_rate", "acceptance") if _number(stats.get(k)) is not None), None)
    if accept is not None:
        out["acceptance_rate"] = float(accept)
    drafts = sum(s.reason == "draft" for s in steps)
    if drafts or any(s.reason == "verify" for s in steps):
        out["draft_share"] = drafts / n  # emitted tokens that were accepted drafts
    return out


def stats_html(summ: dict, *, mode: str, state: str, stats: dict | None = None, options: dict | None = None) -> str:
    """The summary as HTML (`div.looplm-stats` with data-state, data-mode and data-tokens).

    `options` (the sampling and mode options the run used) are listed under the numbers.
    """
    parts = [
        f'<span class="stat" data-key="tokens">{summ["tokens"]} tokens</span>',
        f'<span class="stat" data-key="tokens_per_s">{summ["tokens_per_s"]:.1f} tokens/s</span>',
        f'<span class="stat" data-key="mean_exit_loop">mean exit loop {summ["mean_exit_loop"]:.2f} / {summ["num_loops"]}</span>',
        f'<span class="stat" data-key="mean_latency_ms">{summ["mean_latency_ms"]:.1f} ms/token</span>',
    ]
    if "loops_computed_per_token" in summ:
        parts.append(f'<span class="stat" data-key="loops_computed_per_token">loops computed per token '
                     f'{summ["loops_computed_per_token"]:.2f}</span>')
    if "acceptance_rate" in summ:
        parts.append(f'<span class="stat" data-key="acceptance_rate">acceptance {summ["acceptance_rate"]:.1%}</span>')
    if "draft_share" in summ:
        parts.append(f'<span class="stat" data-key="draft_share">{summ["draft_share"]:.0%} of tokens from drafts</span>')
    if stats and isinstance(stats.get("finish_reason"), str):
        parts.append(f'<span class="stat" data-key="finish_reason">finish: {html.escape(stats["finish_reason"])}</span>')
    extra = ""
    if stats:  # whatever else the decoder reported, compactly
        shown = {"tokens_per_s", "mean_loops", "mean_exit_loop", "loops_computed_per_token", "new_tokens", "mode", "acceptance_rate"}
        items = [f"{html.escape(k)}={v:.3g}" for k, v in stats.items() if k not in shown and _number(v) is not None]
        if items:
            extra = f'<div class="extra">{" · ".join(items)}</div>'
    if options:
        extra += f'<div class="extra options">options: {html.escape(", ".join(f"{k}={v!r}" for k, v in options.items()))}</div>'
    label = {"running": "generating…", "done": "done", "error": "error"}.get(state, state)
    return (f'<div class="looplm-stats" data-state="{state}" data-mode="{html.escape(mode)}" data-tokens="{summ["tokens"]}">'
            f'<b>{html.escape(mode)}</b> ({label}): {" ".join(parts)}{extra}</div>')


def chosen_probs(step: Step) -> list[float] | None:
    """The per-loop probability of the chosen token, if the decoder put it in step.info.

    Looks for the first info entry whose key mentions "prob" and whose value is a flat sequence
    of numbers (one per computed loop).
    """
    for key, value in step.info.items():
        if "prob" not in key:
            continue
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and value and all(_number(v) is not None for v in value):
            return [float(v) for v in value]
    return None


def loops_figure(steps: Sequence[Step], num_loops: int, probs: Sequence[Sequence[float]] | None = None) -> Figure | None:
    """Bar chart of each token's depth (its exit loop), plus a heat map of the chosen token's per-loop probability when known.

    Args:
        steps: the generated tokens.
        num_loops: T.
        probs: per token, the chosen token's probability at each loop; None to read them from
            step.info (the decoder's own, for the loops it computed).
    Returns:
        A matplotlib Figure, or None without steps.
    """
    if not steps:
        return None
    from_info = probs is None
    probs = [chosen_probs(s) for s in steps] if from_info else list(probs)
    has_probs = any(p is not None for p in probs)
    fig = Figure(figsize=(7, 3.6 if has_probs else 2.2), dpi=90, layout="constrained")
    axes = fig.subplots(2 if has_probs else 1, 1, sharex=True, squeeze=False)[:, 0]
    x = [s.index for s in steps]
    colours = [loop_colour(s.exit_loop, num_loops)[0] for s in steps]
    axes[0].bar(x, [s.exit_loop for s in steps], color=colours, width=0.85, edgecolor="#444", linewidth=0.3)
    axes[0].set_ylim(0, num_loops + 0.3)
    axes[0].set_yticks(range(0, num_loops + 1))
    axes[0].set_ylabel("exit loop")
    if has_probs:
        grid = [[math.nan] * len(steps) for _ in range(num_loops)]
        for j, p in enumerate(probs):
            for t, v in enumerate((p or [])[:num_loops]):
                grid[t][j] = v
        im = axes[1].imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                            extent=(x[0] - 0.5, x[-1] + 0.5, 0.5, num_loops + 0.5))
        axes[1].set_ylabel("loop")
        axes[1].set_yticks(range(1, num_loops + 1))
        fig.colorbar(im, ax=axes[1], label="p(token)" if from_info else "p(token), no-cache", pad=0.01)
    axes[-1].set_xlabel("token #")
    return fig
