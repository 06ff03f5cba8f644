"""The endpoints through the official openai client: text equal to Engine.generate, extension fields,
streaming, n, logprobs, chat templates, models, health and metrics."""

from __future__ import annotations

import json
import math
import random
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import looplm
from looplm.serve.chat import template_for

from .conftest import MODEL, PROMPTS, metric

MODES = [("full", {}), ("speculative", {}), ("speculative", {"draft_loop": 1, "draft_len": 3}),
         ("speculative", {"draft_loop": "adaptive", "call_cost": 0.0}), ("speculative", {"branch": 2, "fallback": False}),
         ("speculative", {"full_depth_above": None}),
         ("anytime", {"budget_loops": 2}), ("anytime", {"exit": "q_exit", "q": 0.5})]


def _ext(choice) -> dict:
    return choice.model_extra["looplm"]


def _steps_ext(gen: looplm.Generation) -> dict:
    return {"exit_loops": [s.exit_loop for s in gen.steps], "loops_computed": [s.loops for s in gen.steps]}


@pytest.mark.parametrize("mode,options", MODES)
def test_completion_equals_generate(client, engine, mode, options):
    prompt, n_tok = random.choice(PROMPTS), random.randint(6, 16)
    want = engine.generate(prompt, max_new_tokens=n_tok, mode=mode, temperature=0, **options)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n_tok, temperature=0,
                                  extra_body={"looplm": {"mode": mode, **options}})
    (c,) = r.choices
    assert c.text == want.text
    assert c.finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == len(engine.encode(prompt)) and r.usage.completion_tokens == len(want.tokens)
    ext = _ext(c)
    assert {k: ext[k] for k in ("exit_loops", "loops_computed")} == _steps_ext(want)
    assert len(ext["latency_ms"]) == len(want.tokens) and all(ms >= 0 for ms in ext["latency_ms"])
    assert r.model_extra["looplm"]["mode"] == mode


@pytest.mark.parametrize("mode,options", MODES[::2])
def test_streamed_completion_equals_generate(client, engine, mode, options):
    prompt, n_tok = random.choice(PROMPTS), random.randint(6, 16)
    want = engine.generate(prompt, max_new_tokens=n_tok, mode=mode, temperature=0, **options)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n_tok, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"looplm": {"mode": mode, **options}}))
    assert len({c.id for c in chunks}) == 1
    *body, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == len(want.tokens)
    token_chunks = [c for c in body if _ext(c.choices[0])["exit_loops"]]
    assert [_ext(c.choices[0])["exit_loops"][0] for c in token_chunks] == [s.exit_loop for s in want.steps]
    assert "".join(c.choices[0].text for c in body) == want.text
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["stop" if want.finish_reason == "stop" else "length"]


def test_chat_plain_template_equals_generate(client, engine):
    question = random.choice(["Who is Elizabeth?", "What does os.path do?", "Write a function."])
    # the bundled model's documented plain template (looplm/serve/chat.py)
    prompt = f"System: You answer briefly.\n\nUser: {question}\n\nAssistant:"
    want = engine.generate(prompt, max_new_tokens=12, temperature=0, stop=["\nUser:", "\nSystem:", 0])
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": question}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert _ext(r.choices[0])["exit_loops"] == [s.exit_loop for s in want.steps]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert sum(len(_ext(c.choices[0])["exit_loops"]) for c in chunks) == len(want.tokens)


def test_chatml_template_for_ouro_chat_checkpoints(engine, tmp_path):
    plain = template_for(engine)
    assert plain.name == "plain"  # the bundled model has the tokens but no chat template: it never saw chat
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}))
    chatml = template_for(looplm.Engine(engine.model, engine.tokenizer, engine.generation_config, tmp_path))
    assert chatml.name == "chatml"
    text = chatml.render([("system", "Be brief."), ("user", "Hi")])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    tail = [engine.tokenizer.token_to_id("<|im_start|>"), *engine.encode("assistant\n")]
    assert chatml.stop[0] == im_end and engine.encode(text)[-len(tail):] == tail  # the special tokens stay single ids
    with pytest.raises(ValueError, match="chat template must be one of"):
        template_for(engine, "llama")


def test_stop_string_across_tokens_streams_the_same_text(client, engine):
    prompt = random.choice(PROMPTS)
    full = engine.generate(prompt, max_new_tokens=24, temperature=0, stop=[])
    pieces = [s.text for s in full.steps]
    # a stop string that starts inside one token's text and ends inside a later one's
    i = next((i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1]), None)
    if i is None:
        pytest.fail(f"no token pair to build a stop string from in {pieces!r}")
    at = len("".join(pieces[:i]))
    stop = full.text[at + 1 : at + len(pieces[i]) + 1]
    want = full.text[: full.text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_n_and_prompt_batches(client, engine):
    prompts = random.sample(PROMPTS, 2)
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    solo = [engine.generate(p, max_new_tokens=8).text for p in prompts]
    assert [c.text for c in r.choices] == [solo[0], solo[0], solo[1], solo[1]]
    seed = random.randrange(2**31)
    kw = dict(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=1.0, n=3, seed=seed)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed makes sampling reproducible
    chunks = list(client.completions.create(**kw, stream=True))
    for i, choice in enumerate(a.choices):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == choice.text


def test_logprobs_are_the_exit_loops_distribution(client, engine):
    prompt = random.choice(PROMPTS)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"looplm": {"mode": "anytime", "budget_loops": 3}})
    c = r.choices[0]
    ids = engine.encode(prompt)
    gen = engine.generate(prompt, max_new_tokens=6, mode="anytime", budget_loops=3)
    logits = engine.model.per_loop_logits(torch.tensor([ids + gen.tokens[:-1]]))[:, 0, len(ids) - 1 :]
    for i, step in enumerate(gen.steps):
        lp = torch.log_softmax(logits[step.exit_loop - 1, i].float(), -1)
        assert math.isclose(c.logprobs.token_logprobs[i], lp[step.token].item(), abs_tol=1e-5)
        assert lp[step.token] == lp.max()  # greedy: the chosen token is the likeliest at its exit loop
        assert len(c.logprobs.top_logprobs[i]) == 2
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=1)
    entries = chat.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    assert all(e.top_logprobs[0].logprob == e.logprob for e in entries)


def test_speculative_requests_switched_for_load_are_counted(client, server):
    """n copies decode as n requests at once: above full_depth_above each switches to full depth
    (the same text as drafting), and the metric counts them by reason."""
    name = "looplm_speculative_fallbacks_total"
    before = metric(server, name, {"reason": "load"}, default=0.0)
    n, prompt = random.randint(2, 4), random.choice(PROMPTS)
    opts = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, n=n)
    r = client.completions.create(**opts, extra_body={"looplm": {"mode": "speculative", "full_depth_above": 1}})
    alone = client.completions.create(**{**opts, "n": 1}, extra_body={"looplm": {"mode": "speculative", "full_depth_above": None}})
    assert [c.text for c in r.choices] == [alone.choices[0].text] * n
    deadline = time.monotonic() + 10
    while metric(server, name, {"reason": "load"}, default=0.0) < before + n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, name, {"reason": "load"}) == before + n


def test_models_health_and_metrics(client, server):
    (m,) = client.models.list().data
    assert m.id == MODEL and m.model_extra["looplm"]["num_loops"] == 4
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    before = metric(server, "looplm_generated_tokens_total", {"mode": "anytime"}, default=0.0)
    r = client.completions.create(model=MODEL, prompt="Elizabeth was", max_tokens=5, temperature=0,
                                  extra_body={"looplm": {"mode": "anytime", "budget_loops": 1}})
    assert metric(server, "looplm_generated_tokens_total", {"mode": "anytime"}) == before + r.usage.completion_tokens
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    for name in ("looplm_requests_running", "looplm_requests_waiting", "looplm_generated_tokens", "looplm_tokens_per_second",
                 "looplm_mean_exit_loop", "looplm_loops_per_token", "looplm_speculative_acceptance", "looplm_budget_misses"):
        assert name in families, name
    assert families["looplm_requests_running"].samples[0].value == 0
    assert 1 <= families["looplm_mean_exit_loop"].samples[0].value <= 4

