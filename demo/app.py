"""The Gradio Blocks app: type a prompt, watch each token's depth (the loop it was read out at) as it streams.

Each request is consumed in its own producer thread, so the decoder's timing is not inflated by the
UI, and several browser tabs decode at once through Gradio's queue (the engine batches their
requests into one runner step over its paged cache). Bad input becomes a readable message in an error box, never a trace (no toast:
a toast would cover the buttons).
"""

from __future__ import annotations

import html
import importlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from looplm import Engine  # noqa: E402
from looplm.api import DEFAULT_MODEL  # noqa: E402
from looplm.decoding import MODES, Step, resolve_mode  # noqa: E402
from looplm.paged import KV_MODES  # noqa: E402

from . import render  # noqa: E402

log = logging.getLogger("demo")

MAX_NEW_TOKENS = 512
MAX_BUDGET_MS = 60_000.0  # a per-token budget above a minute is surely a typo
MAX_DRAFT_LEN = 32
MAX_ANALYSIS_ELEMENTS = 2**25  # T * tokens * vocab floats for the after-the-run per-loop probabilities
FALLBACK_POLICIES = ["q_exit", "confidence", "entropy", "kl", "delta", "static"]
# the controls, in the order the event handlers receive them (make_run's keyword names)
CONTROLS = ("prompt", "max_new_tokens", "mode", "temperature", "seed", "kv", "budget_ms", "exit_policy", "threshold",
            "skip", "draft_loop", "draft_len", "adaptive", "pipelined")
DEFAULT_PROMPT = "It is a truth universally acknowledged that"


class InputError(ValueError):
    """A problem with what the user typed; its message is shown as is."""


def available_modes() -> list[str]:
    """The decoding modes whose packages import here ("full" always; "speculative", "anytime" once they land)."""
    modes = []
    for name in MODES:
        try:
            resolve_mode(name)
        except Exception:  # a decoder package that is missing or broken is simply not offered
            continue
        modes.append(name)
    return modes


def exit_policies() -> list[str]:
    """Exit policies of the anytime decoder (read from the package when it lists them), "none" first."""
    names: list[str] = []
    try:
        mod = importlib.import_module("anytime")
        for attr in ("POLICIES", "EXIT_POLICIES", "policies"):
            value = getattr(mod, attr, None)
            if isinstance(value, dict) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                names = [str(k) for k in value]
                break
    except Exception:
        pass
    names = names or FALLBACK_POLICIES
    return ["none"] + [n for n in names if n != "none"]


def skip_modes() -> list[str]:
    """How the anytime decoder treats the loops a token skipped ("exact" first)."""
    try:
        names = [str(n) for n in importlib.import_module("anytime").SKIP_MODES]
    except Exception:
        names = []
    return names or ["exact"]


def kv_modes() -> list[str]:
    """The engine's KV-cache layouts ("per_loop", exact, first; then the shared ones)."""
    return ["per_loop"] + [k for k in KV_MODES if k != "per_loop"]


def default_policy() -> str:
    """The exit policy the app starts with: Q-exit on the gate when the anytime package has it."""
    return "q_exit" if "q_exit" in exit_policies() else "none"


def defaults() -> dict:
    """The controls' initial values, by CONTROLS name."""
    return {"prompt": DEFAULT_PROMPT, "max_new_tokens": 48, "mode": "full", "temperature": 0.0, "seed": 0,
            "kv": "per_loop", "budget_ms": 0, "exit_policy": default_policy(), "threshold": "", "skip": "exact",
            "draft_loop": 2, "draft_len": 4, "adaptive": False, "pipelined": True}


@dataclass
class Run:
    """One decoding request as the UI sees it."""

    prompt: str
    max_new_tokens: int
    mode: str
    options: dict  # temperature, seed and the mode's own options
    steps: list[Step] = field(default_factory=list)
    stats: dict | None = None  # Generation.stats once finished
    elapsed_s: float = 0.0


def _number(value, name: str, *, lo: float, hi: float, integer: bool = False, allow_none: bool = False):
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_none:
            return None
        raise InputError(f"{name} is missing")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise InputError(f"{name} must lie between {lo:g} and {hi:g}, got {x:g}")
    if integer:
        if x != int(x):
            raise InputError(f"{name} must be a whole number, got {x:g}")
        return int(x)
    return x


def make_run(engine: Engine, modes: list[str], prompt, max_new_tokens, mode, temperature=0.0, seed=0,
             kv="per_loop", budget_ms=None, exit_policy="none", threshold=None, skip="exact", draft_loop=1, draft_len=4,
             adaptive=False, pipelined=False) -> Run:
    """Validates the controls (CONTROLS, in order) into a Run; raises InputError with a readable message.

    Only the options a user set reach the decoder (e.g. no budget_ms for "0 = none"), so the same
    Run decoded with Engine.generate(prompt, mode=..., **run.options) gives the same tokens.
    """
    T, ctx = engine.config.total_ut_steps, engine.config.max_position_embeddings
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("Type a prompt first: the prompt is empty.")
    if mode not in modes:
        raise InputError(f"Mode {mode!r} is not available here; choose one of {', '.join(modes)}.")
    n_prompt = len(engine.encode(prompt))
    if n_prompt == 0:
        raise InputError("The prompt encodes to no tokens; type some text.")
    if n_prompt >= ctx:
        raise InputError(f"The prompt is {n_prompt} tokens long but the model's context holds {ctx}; shorten it.")
    max_new = _number(max_new_tokens, "Max new tokens", lo=1, hi=MAX_NEW_TOKENS, integer=True)
    options: dict = {
        "temperature": _number(temperature, "Temperature", lo=0, hi=10),
        "seed": _number(seed, "Seed", lo=0, hi=2**62, integer=True, allow_none=True),
    }
    if kv and kv != "per_loop":
        if kv not in kv_modes():
            raise InputError(f"KV cache {kv!r} is not available; choose one of {', '.join(kv_modes())}.")
        options["kv"] = kv
    if mode == "anytime":
        budget = _number(budget_ms, "Budget (ms per token)", lo=0, hi=MAX_BUDGET_MS, allow_none=True)
        if budget:  # 0 or empty: no budget
            options["budget_ms"] = budget
        if exit_policy and exit_policy != "none":
            options["exit"] = exit_policy
            t = _number(threshold, "Exit threshold", lo=0, hi=1e6, allow_none=True)
            if t is not None:
                options["threshold"] = t
        if skip and skip != "exact":
            options["skip"] = skip
    elif mode == "speculative":
        options["draft_loop"] = k = _number(draft_loop, "Draft loop", lo=1, hi=max(T - 1, 1), integer=True)
        if pipelined:  # the draft of token n+1 rides along with token n's last loops (spec.pipeline)
            if adaptive:  # the decoder picks the draft loop from the acceptance it observes (spec.adapt)
                options["draft_loop"] = "adaptive"
            elif T % k:
                raise InputError(f"Pipelined drafting splits the {T} loops into stages of k: choose a draft loop that divides {T}.")
            options["pipeline"] = True
        else:
            options["pipeline"] = False
            options["draft_len"] = ("adaptive" if adaptive else
                                    _number(draft_len, "Draft length", lo=1, hi=MAX_DRAFT_LEN, integer=True))
    return Run(prompt, max_new, mode, options)


def _produce(engine: Engine, run: Run, out: queue.Queue, cancel: threading.Event) -> None:
    log.info("decode start %s mode=%s options=%s", id(run), run.mode, run.options)
    try:
        stream = engine.stream(run.prompt, max_new_tokens=run.max_new_tokens, mode=run.mode, **run.options)
        for step in stream:
            out.put(("step", step))
            if cancel.is_set():
                stream.close()
                log.info("decode cancelled %s", id(run))
                return
        result = stream.generations[0] if stream.generations else None
        out.put(("done", result))
        log.info("decode end %s tokens=%d", id(run), len(result.tokens) if result else 0)
    except Exception as e:  # reported to the UI by the consumer
        log.info("decode failed %s: %s", id(run), e)
        out.put(("error", e))


def stream_run(engine: Engine, run: Run, min_interval_s: float = 0.05):
    """Decodes `run` in a producer thread; yields `run` (with more steps) as they arrive, last when done.

    Raises InputError for a ValueError/TypeError from the engine or decoder (bad options, prompt too
    long), and re-raises anything else.
    """
    q: queue.Queue = queue.Queue()
    cancel = threading.Event()
    start = time.perf_counter()
    worker = threading.Thread(target=_produce, args=(engine, run, q, cancel), daemon=True, name="demo-decode")
    worker.start()
    last_yield = 0.0
    try:
        while True:
            kind, payload = q.get()
            finished = False
            while True:
                if kind == "step":
                    run.steps.append(payload)
                elif kind == "done":
                    run.stats = dict(payload.stats) if payload is not None else {}
                    if payload is not None:
                        run.stats["finish_reason"] = payload.finish_reason
                    finished = True
                else:
                    if isinstance(payload, (ValueError, TypeError)):
                        raise InputError(str(payload)) from payload
                    raise payload
                try:
                    kind, payload = q.get_nowait()
                except queue.Empty:
                    break
            run.elapsed_s = time.perf_counter() - start
            if finished:
                yield run
                return
            if time.perf_counter() - last_yield >= min_interval_s:
                last_yield = time.perf_counter()
                yield run
    finally:
        cancel.set()


@torch.inference_mode()
def loop_probabilities(engine: Engine, prompt_ids: list[int], tokens: list[int]) -> list[list[float]] | None:
    """The probability each loop's head gave each generated token, from one no-cache forward after the run.

    Args:
        engine: the engine that generated `tokens`.
        prompt_ids: the prompt's P token ids.
        tokens: the n generated token ids.
    Returns:
        n lists of T floats (softmax at temperature 1, full-depth state), or None when there is
        nothing to show or the (T, n, V) logits would be too large.
    """
    T, V = engine.config.total_ut_steps, engine.config.vocab_size
    ids = prompt_ids + tokens[:-1]  # position P - 1 + i predicts token i
    if not tokens or not prompt_ids or T * len(ids) * V > MAX_ANALYSIS_ELEMENTS:
        return None
    logits = engine.model.per_loop_logits(torch.tensor([ids], device=engine.device))  # (T, 1, P + n - 1, V)
    logits = logits[:, 0, len(prompt_ids) - 1:]  # (T, n, V)
    chosen = torch.tensor(tokens, device=logits.device)[None, :, None].expand(T, -1, 1)
    return logits.float().softmax(-1).gather(-1, chosen)[..., 0].T.tolist()  # (n, T)


def _figure(engine: Engine, run: Run):
    T = engine.config.total_ut_steps
    probs = None
    if not any(render.chosen_probs(s) is not None for s in run.steps):  # the decoder did not report them
        try:
            probs = loop_probabilities(engine, engine.encode(run.prompt), [s.token for s in run.steps])
        except Exception:  # the analysis is a bonus: never let it spoil a finished run
            log.exception("demo: per-loop probabilities failed")
    return render.loops_figure(run.steps, T, probs)


def _message(text: str = "") -> str:
    if not text:
        return '<div class="looplm-message" data-state="ok"></div>'
    return f'<div class="looplm-message error" data-state="error">{html.escape(text)}</div>'


def _friendly(e: Exception) -> str:
    if isinstance(e, InputError):
        return str(e)
    log.exception("demo: request failed")
    return f"Something went wrong while decoding ({type(e).__name__}: {e}). The app is still running; try again."


def _views(engine: Engine, run: Run, state: str):
    T = engine.config.total_ut_steps
    summ = render.summary(run.steps, T, run.elapsed_s, run.stats)
    return (render.tokens_html(run.prompt, run.steps, T, mode=run.mode, state=state),
            render.stats_html(summ, mode=run.mode, state=state, stats=run.stats if state == "done" else None,
                              options=run.options))


def _describe(engine: Engine) -> str:
    c = engine.config
    params = sum(p.numel() for p in engine.model.parameters())
    where = engine.path if engine.path is not None else "in memory"
    if engine.path is not None and Path(engine.path).resolve() == DEFAULT_MODEL.resolve():
        where = "looplm/default_model (bundled)"
    size = f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.0f}k"
    return (f"Model `{where}`: {size} parameters, {c.num_hidden_layers} layers run "
            f"**T = {c.total_ut_steps}** times per token, context {c.max_position_embeddings}. "
            "Each token is coloured by how many loops it used; hover a token for its details.")


def generate_updates(engine: Engine, modes: list[str], *controls):
    """The Generate button: yields (tokens html, stats html, plot, table, message) as tokens arrive.

    Never raises: a bad input or a failed decode becomes a message in the error box.
    """
    T = engine.config.total_ut_steps
    try:
        run = make_run(engine, modes, *controls)
        yield (*_views(engine, run, "running"), None, pd.DataFrame([], columns=render.TABLE_HEADERS), _message())
        for run in stream_run(engine, run):
            done = run.stats is not None
            tokens, stats = _views(engine, run, "done" if done else "running")
            plot = _figure(engine, run) if done else gr.skip()
            table = pd.DataFrame(render.table_rows(run.steps), columns=render.TABLE_HEADERS)
            yield tokens, stats, plot, table, _message()
    except Exception as e:
        text = _friendly(e)
        yield ("", render.stats_html(render.summary([], T, 0.0), mode=str(controls[2]), state="error"), None,
               pd.DataFrame([], columns=render.TABLE_HEADERS), _message(text))


def compare_updates(engine: Engine, modes: list[str], *controls):
    """The Compare button: full depth, then the chosen mode, on the same inputs; yields both views and a summary."""
    T = engine.config.total_ut_steps
    views = {"full": ("", ""), "mode": ("", "")}
    try:
        chosen = make_run(engine, modes, *controls)
        full = make_run(engine, modes, *controls[:2], "full", *controls[3:])
        summaries = {}
        for key, run in (("full", full), ("mode", chosen)):
            for run in stream_run(engine, run):
                views[key] = _views(engine, run, "done" if run.stats is not None else "running")
                yield (*views["full"], *views["mode"], "", _message())
            summaries[key] = render.summary(run.steps, T, run.elapsed_s, run.stats)
        f, m = summaries["full"], summaries["mode"]
        ratio = m["tokens_per_s"] / f["tokens_per_s"] if f["tokens_per_s"] > 0 else float("nan")
        same = [s.token for s in full.steps] == [s.token for s in chosen.steps]
        text = (f'<div class="looplm-compare" data-speedup="{ratio:.3f}"><b>{chosen.mode}</b>: '
                f'{m["tokens_per_s"]:.1f} tokens/s vs <b>full</b>: {f["tokens_per_s"]:.1f} tokens/s '
                f'(<b>{ratio:.2f}x</b>); mean exit loop {m["mean_exit_loop"]:.2f} vs {f["mean_exit_loop"]:.2f}; '
                f'{"identical" if same else "different"} tokens.</div>')
        yield (*views["full"], *views["mode"], text, _message())
    except Exception as e:
        text = _friendly(e)
        yield (*views["full"], *views["mode"], "", _message(text))


def build_app(engine: Engine, *, concurrency: int = 4) -> gr.Blocks:
    """The demo's Blocks (queue enabled). Launch with `launch(app, port)`.

    Args:
        engine: a loaded looplm.Engine with a tokenizer.
        concurrency: requests decoded at once (the engine batches them).
    Returns:
        The gradio Blocks app.
    """
    if engine.tokenizer is None:
        raise ValueError("the demo needs a checkpoint with a tokenizer.json")
    T = engine.config.total_ut_steps
    modes = available_modes()
    init = defaults()

    def generate(*controls):
        yield from generate_updates(engine, modes, *controls)

    def compare(*controls):
        yield from compare_updates(engine, modes, *controls)

    def show_options(mode):
        return gr.update(visible=mode == "anytime"), gr.update(visible=mode == "speculative")

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])  # no web fonts: works offline
    with gr.Blocks(title="looplm: how deep did each token go?", analytics_enabled=False) as app:
        app.looplm_theme, app.looplm_css = theme, render.CSS
        gr.Markdown("## looplm: how deep did each token go?\n" + _describe(engine))
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                prompt = gr.Textbox(init["prompt"], label="Prompt", lines=3, elem_id="prompt")
                mode = gr.Radio(modes, value=init["mode"], label="Mode", elem_id="mode")
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=init["max_new_tokens"], step=1, label="Max new tokens",
                                    elem_id="max-new")
                temperature = gr.Slider(0, 2, value=init["temperature"], step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                seed = gr.Number(init["seed"], label="Seed", precision=0, elem_id="seed")
                kv = gr.Radio(kv_modes(), value=init["kv"], label="KV cache (per_loop is exact; the others share one "
                              "slot across loops)", elem_id="kv",
                              info="Shared slots are approximate, and what they cost depends on the model: the "
                                   "bundled model loses more with them than by dropping three loops (its card).")
                with gr.Group(visible=False, elem_id="anytime-options") as anytime_box:
                    budget = gr.Number(init["budget_ms"], label="Budget per token (ms, 0 = none)", elem_id="budget")
                    policy = gr.Dropdown(exit_policies(), value=init["exit_policy"], label="Exit policy",
                                         allow_custom_value=True, elem_id="exit-policy")
                    threshold = gr.Textbox(init["threshold"], label="Exit threshold (empty: the policy's default)",
                                           elem_id="threshold", max_lines=1)
                    skip = gr.Dropdown(skip_modes(), value=init["skip"], label="Skipped loops", elem_id="skip")
                with gr.Group(visible=False, elem_id="spec-options") as spec_box:
                    draft_loop = gr.Slider(1, max(T - 1, 1), value=min(init["draft_loop"], max(T - 1, 1)), step=1,
                                           label="Draft loop k", elem_id="draft-loop")
                    pipelined = gr.Checkbox(init["pipelined"], label="Pipelined (draft the next token while verifying; "
                                            "ignores the draft length)", elem_id="pipelined")
                    draft_len = gr.Slider(1, 16, value=init["draft_len"], step=1, label="Draft length",
                                          elem_id="draft-len")
                    adaptive = gr.Checkbox(init["adaptive"], label="Adaptive (pipelined: the draft loop, chosen "
                                           "from observed acceptance; otherwise the draft length)", elem_id="adaptive")
            with gr.Column(scale=2):
                message = gr.HTML(_message(), elem_id="message")  # above the tabs: seen from both
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate-tab"):
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
                            stop = gr.Button("Stop", variant="secondary", elem_id="stop", scale=1)
                        tokens = gr.HTML(elem_id="tokens")
                        stats = gr.HTML(elem_id="stats")
                        plot = gr.Plot(label="loops per token", elem_id="plot")
                        table = gr.Dataframe(headers=render.TABLE_HEADERS, label="per token", elem_id="steps",
                                             interactive=False, max_height=320)
                    with gr.Tab("Compare", id="compare-tab", elem_id="compare-tab"):
                        cmp_go = gr.Button("Compare full depth with the chosen mode", variant="primary",
                                           elem_id="compare")
                        cmp_summary = gr.HTML(elem_id="compare-summary")
                        with gr.Row():
                            with gr.Column():
                                gr.Markdown("**full depth**")
                                cmp_full_tokens = gr.HTML(elem_id="compare-full-tokens")
                                cmp_full_stats = gr.HTML(elem_id="compare-full-stats")
                            with gr.Column():
                                gr.Markdown("**chosen mode**")
                                cmp_mode_tokens = gr.HTML(elem_id="compare-mode-tokens")
                                cmp_mode_stats = gr.HTML(elem_id="compare-mode-stats")
        controls = [prompt, max_new, mode, temperature, seed, kv, budget, policy, threshold, skip, draft_loop, draft_len,
                    adaptive, pipelined]
        assert len(controls) == len(CONTROLS)
        mode.change(show_options, mode, [anytime_box, spec_box], queue=False)
        outputs = [tokens, stats, plot, table, message]
        events = [go.click(generate, controls, outputs, api_name="generate"),
                  prompt.submit(generate, controls, outputs, api_visibility="private")]
        cmp_outputs = [cmp_full_tokens, cmp_full_stats, cmp_mode_tokens, cmp_mode_stats, cmp_summary, message]
        events.append(cmp_go.click(compare, controls, cmp_outputs, api_name="compare"))
        # closing a handler's generator sets its cancel flag: the decode thread stops after its next token
        stop.click(None, cancels=events, api_visibility="private")
    app.queue(default_concurrency_limit=concurrency)
    return app


def launch(app: gr.Blocks, port: int | None = None, *, block: bool = True, quiet: bool = False):
    """Serves `app` on 127.0.0.1 (only) at `port` (None: Gradio picks from 7860 up)."""
    return app.launch(
        server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
        theme=app.looplm_theme, css=app.looplm_css, ssr_mode=False, show_error=False, mcp_server=False,
        footer_links=[],
    )
