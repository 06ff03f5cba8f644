"""The demo's logic without a browser: input validation, streaming, the handlers and the markup."""

from __future__ import annotations

import math
import random
import re
import threading
import time

import pytest
import torch

from demo import render
from demo.app import (CONTROLS, InputError, Run, available_modes, compare_updates, defaults, generate_updates,
                      kv_modes, loop_probabilities, make_run, stream_run)
from looplm import Step


@pytest.fixture(scope="module")
def engine(fresh_engine):
    return fresh_engine


def _controls(**over) -> list:
    values = {**defaults(), **over}
    return [values[name] for name in CONTROLS]


def _spans(html: str) -> list[dict]:
    return [dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m)) for m in re.findall(r'<span class="tok[^"]*"([^>]*)>', html)]


@pytest.mark.parametrize(
    "over, words",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   \n "), "prompt is empty"),
        (dict(max_new_tokens=0), "Max new tokens"),
        (dict(max_new_tokens=10**6), "Max new tokens"),
        (dict(max_new_tokens=2.5), "whole number"),
        (dict(temperature=float("nan")), "Temperature"),
        (dict(temperature=-1), "Temperature"),
        (dict(seed="abc"), "Seed must be a number"),
        (dict(mode="warp"), "not available"),
    ],
)
def test_bad_controls_are_readable_errors(engine, over, words):
    with pytest.raises(InputError, match=words):
        make_run(engine, available_modes(), *_controls(**over))


def test_prompt_over_the_context_is_refused(engine, make_prompt):
    ctx = engine.config.max_position_embeddings
    with pytest.raises(InputError, match=f"context holds {ctx}"):
        make_run(engine, ["full"], *_controls(prompt=make_prompt(random.Random(), ctx)))
    run = make_run(engine, ["full"], *_controls(prompt=make_prompt(random.Random(), ctx - 1)))  # one slot left: fine
    assert run.max_new_tokens == defaults()["max_new_tokens"]


def test_mode_options_reach_the_decoder_only_when_set(engine):
    T = engine.config.total_ut_steps
    modes = ["full", "speculative", "anytime"]
    assert make_run(engine, modes, *_controls()).options == {"temperature": 0.0, "seed": 0}
    run = make_run(engine, modes, *_controls(mode="anytime", budget_ms=0, exit_policy="none", threshold="5"))
    assert run.options == {"temperature": 0.0, "seed": 0}  # no budget, no policy: the threshold is moot
    run = make_run(engine, modes, *_controls(mode="anytime", budget_ms=12.5, exit_policy="confidence", threshold="0.9",
                                             skip="copy"))
    assert run.options == {"temperature": 0.0, "seed": 0, "budget_ms": 12.5, "exit": "confidence", "threshold": 0.9,
                           "skip": "copy"}
    for budget in (1e12, -1, float("inf"), "lots"):
        with pytest.raises(InputError, match="Budget"):
            make_run(engine, modes, *_controls(mode="anytime", budget_ms=budget))
    run = make_run(engine, modes, *_controls(mode="speculative", draft_loop=T - 1, draft_len=3, pipelined=False))
    assert (run.options["draft_loop"], run.options["draft_len"], run.options["pipeline"]) == (T - 1, 3, False)
    assert make_run(engine, modes, *_controls(mode="speculative", adaptive=True, pipelined=False)).options["draft_len"] == "adaptive"
    run = make_run(engine, modes, *_controls(mode="speculative", draft_loop=1, draft_len=3))  # pipelined by default
    assert run.options == {"temperature": 0.0, "seed": 0, "draft_loop": 1, "pipeline": True}
    # adaptive + pipelined: the decoder chooses the draft loop, so the slider's loop need not divide T
    run = make_run(engine, modes, *_controls(mode="speculative", prompt="the cat sat", max_new_tokens=12, adaptive=True,
                                             draft_loop=next((k for k in range(2, T) if T % k), 1)))
    assert run.options == {"temperature": 0.0, "seed": 0, "draft_loop": "adaptive", "pipeline": True}
    spec = engine.generate(run.prompt, max_new_tokens=12, stop=[], mode="speculative", **run.options)
    assert spec.tokens == engine.generate(run.prompt, max_new_tokens=12, stop=[]).tokens
    odd = next((k for k in range(2, T) if T % k), None)
    if odd is not None:
        with pytest.raises(InputError, match="divides"):
            make_run(engine, modes, *_controls(mode="speculative", draft_loop=odd))
    for k in (0, T):
        with pytest.raises(InputError, match="Draft loop"):
            make_run(engine, modes, *_controls(mode="speculative", draft_loop=k))
    assert "kv" not in make_run(engine, modes, *_controls(kv="per_loop")).options
    with pytest.raises(InputError, match="KV cache"):
        make_run(engine, modes, *_controls(kv="bogus"))


def test_a_shared_kv_cache_reaches_the_engine(engine):
    modes = kv_modes()
    assert modes[0] == "per_loop" and sorted(modes[1:]) == ["last", "mean"]  # the loop below is not vacuous
    for kv in modes[1:]:
        run = make_run(engine, ["full"], *_controls(prompt="the cat sat", max_new_tokens=6, kv=kv))
        assert run.options["kv"] == kv
        list(stream_run(engine, run))
        assert [s.token for s in run.steps] == engine.generate("the cat sat", max_new_tokens=6, kv=kv).tokens


def test_stream_run_matches_generate_and_yields_partial_results(engine, make_prompt):
    rng = random.Random()
    prompt, seed = make_prompt(rng, 5), rng.randint(0, 10**6)
    run = make_run(engine, ["full"], *_controls(prompt=prompt, max_new_tokens=20, temperature=0.8, seed=seed))
    seen = [len(r.steps) for r in stream_run(engine, run, min_interval_s=0.0)]
    assert seen == sorted(seen) and seen[-1] == 20 and run.stats is not None
    want = engine.generate(prompt, max_new_tokens=20, temperature=0.8, seed=seed)
    assert [s.token for s in run.steps] == want.tokens
    assert run.stats["finish_reason"] == "length" and run.stats["new_tokens"] == 20


def test_closing_the_stream_stops_the_decode_thread(engine):
    run = make_run(engine, ["full"], *_controls(prompt="the cat", max_new_tokens=500))  # to the context's end
    stream = stream_run(engine, run, min_interval_s=0.0)
    next(stream)
    stream.close()  # what Gradio does when the user presses Stop or leaves
    deadline = time.monotonic() + 10
    while any(t.name == "demo-decode" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "demo-decode" for t in threading.enumerate())
    assert run.stats is None and len(run.steps) < engine.config.max_position_embeddings - 2


def test_decoder_errors_become_input_errors(engine):
    run = Run("the cat", 4, "full", {"temperature": 0.0, "no_such_option": 1})
    with pytest.raises(InputError, match="no_such_option"):
        list(stream_run(engine, run))


def test_generate_handler_streams_then_finishes(engine, make_prompt):
    prompt = make_prompt(random.Random(), 4)
    updates = list(generate_updates(engine, ["full"], *_controls(prompt=prompt, max_new_tokens=12)))
    tokens, stats, plot, table, message = updates[-1]
    assert _spans(tokens) and len(_spans(tokens)) == 12 == len(table)
    assert [int(s["token-id"]) for s in _spans(tokens)] == engine.generate(prompt, max_new_tokens=12).tokens
    assert 'data-state="done"' in stats and "tokens/s" in stats and 'data-state="ok"' in message
    assert plot is not None and list(table["loops"]) == [engine.config.total_ut_steps] * 12


def test_handlers_turn_bad_input_into_a_message(engine):
    *_, message = list(generate_updates(engine, ["full"], *_controls(prompt="")))[-1]
    assert 'class="looplm-message error"' in message and "prompt is empty" in message
    assert "Traceback" not in message
    *_, summary, message = list(compare_updates(engine, ["full"], *_controls(max_new_tokens=-3)))[-1]
    assert summary == "" and "Max new tokens" in message


def test_compare_handler_reports_both_speeds(engine):
    full_tokens, full_stats, mode_tokens, mode_stats, summary, _ = list(
        compare_updates(engine, ["full"], *_controls(prompt="the cat sat", max_new_tokens=6)))[-1]
    assert len(_spans(full_tokens)) == len(_spans(mode_tokens)) == 6
    assert "identical tokens" in summary and "tokens/s" in summary and 'data-state="done"' in mode_stats


def _step(i, loops, reason="policy", text="x", info=None, exit_loop=None):
    return Step(0, i, 10 + i, loops, loops if exit_loop is None else exit_loop, 1.5, reason, text, info or {})


def test_a_token_shows_the_loop_it_was_read_out_at_not_the_loops_computed_for_it():
    """finish="ahead" (and the prefill's token) compute T loops for a token read out earlier."""
    T, k = 4, random.randint(1, 3)
    html = render.tokens_html("p", [_step(0, T, exit_loop=k)], T, mode="anytime")
    span = _spans(html)[0]
    assert span["loops"] == str(k) and render.loop_colour(k, T)[0] in html and render.loop_colour(T, T)[0] not in html.split('class="looplm-out"')[1]
    assert f"{T} loops computed, exit at loop {k}" in html
    bars = render.loops_figure([_step(0, T, exit_loop=k)], T).axes[0].patches
    assert [b.get_height() for b in bars] == [k]


def test_markup_colours_each_token_by_its_loops():
    T = 4
    steps = [_step(0, 1, text=" <b>&"), _step(1, 4, "draft", ""), _step(2, 2, "verify", "\n")]
    html = render.tokens_html("a <prompt>", steps, T, mode="speculative")
    spans = _spans(html)
    assert [s["loops"] for s in spans] == ["1", "4", "2"] and [s["reason"] for s in spans] == ["policy", "draft", "verify"]
    assert "&lt;b&gt;&amp;" in html and "a &lt;prompt&gt;" in html and "<b>&" not in html  # escaped
    assert ">\u00b7</span>" in html and ">\u21b5</span>\n" in html  # empty and newline tokens stay visible
    assert 'class="tok draft"' in html and 'class="tok verify"' in html and "accepted draft" in html
    assert len(re.findall(r'class="legend-item" data-loops="\d"', html)) == T
    colours = [render.loop_colour(k, T)[0] for k in range(1, T + 1)]
    assert len(set(colours)) == T  # every depth its own colour
    assert f"background:{colours[0]}" in html.split('data-index="0"')[1].split(">")[0]
    assert "accepted draft" not in render.tokens_html("", steps, T, mode="full")


def test_summary_and_plot_use_the_decoder_details():
    steps = [_step(i, 1 + i % 3, info={"probs": [0.1 * (j + 1) for j in range(1 + i % 3)]}) for i in range(6)]
    summ = render.summary(steps, 4, 0.5, {"tokens_per_s": 12.0, "acceptance_rate": 0.75, "loops_computed_per_token": 3.5})
    assert summ["tokens"] == 6 and summ["tokens_per_s"] == 12.0 and math.isclose(summ["mean_exit_loop"], 2.0)
    assert "loops computed per token 3.50" in render.stats_html(summ, mode="anytime", state="done")
    assert summ["acceptance_rate"] == 0.75
    assert "acceptance 75.0%" in render.stats_html(summ, mode="speculative", state="done")
    assert render.chosen_probs(steps[2]) == pytest.approx([0.1, 0.2, 0.3])
    assert len(render.loops_figure(steps, 4).axes) == 3  # loops bars, probability map, its colour bar
    assert len(render.loops_figure([_step(0, 2)], 4).axes) == 1
    assert render.loops_figure([], 4) is None


def test_per_loop_probabilities_match_a_no_cache_forward(engine, make_prompt):
    prompt = make_prompt(random.Random(), 5)
    gen = engine.generate(prompt, max_new_tokens=7)
    probs = loop_probabilities(engine, gen.prompt_tokens, gen.tokens)
    T = engine.config.total_ut_steps
    assert len(probs) == 7 and all(len(p) == T for p in probs)
    logits = engine.model.per_loop_logits(torch.tensor([gen.prompt_tokens + gen.tokens]))[:, 0]  # (T, S, V)
    P = len(gen.prompt_tokens)
    for i, tok in enumerate(gen.tokens):
        want = logits[:, P - 1 + i].float().softmax(-1)[:, tok]
        torch.testing.assert_close(torch.tensor(probs[i]), want)
        assert int(logits[-1, P - 1 + i].argmax()) == tok  # greedy: the last loop's favourite
    assert loop_probabilities(engine, gen.prompt_tokens, []) is None
    steps = list(generate_updates(engine, ["full"], *_controls(prompt=prompt, max_new_tokens=7)))
    assert len(steps[-1][2].axes) == 3  # full mode reports no probabilities: the app computes them
