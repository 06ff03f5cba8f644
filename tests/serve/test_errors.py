"""Error responses in the OpenAI shape, each triggered for real, and cancellation on disconnect."""

from __future__ import annotations

import random
import threading
import time

import httpx
import openai
import pytest

from looplm.serve.app import create_app

from .conftest import MODEL, PROMPTS, client_for, metric, running_server
from .spy import SpyEngine


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("stream", [False, True])
def test_400_carries_the_engines_message(client, stream):
    for looplm_opts, message, param in [
        ({"mode": "speculative", "draft_loop": 9}, "draft_loop must be an integer in 1..3", "looplm.draft_loop"),
        ({"mode": "sideways"}, "unknown mode 'sideways'", None),
        ({"mode": "anytime", "exit": "never"}, "never", None),
        ({"step": "compiled"}, "looplm.step is not a per-request option", "looplm.step"),
        ({"mode": "anytime", "budget_ms": -random.random()}, "must be a positive number of milliseconds", "looplm.budget_ms"),
        ({"mode": "speculative", "full_depth_above": 0}, "full_depth_above must be an integer >= 1", "looplm.full_depth_above"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=random.choice(PROMPTS), max_tokens=4, stream=stream,
                                      extra_body={"looplm": looplm_opts})
        err = _error(e.value)
        assert e.value.status_code == 400 and message in err["message"] and err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-0.5, stream=stream)
    assert _error(e.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=1, stream=True)
    assert _error(e.value)["param"] == "logprobs"


def test_400_prompt_longer_than_the_context(client, engine):
    ctx = engine.config.max_position_embeddings
    ids = [random.randrange(3, engine.config.vocab_size) for _ in range(ctx + random.randint(0, 50))]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
    err = _error(e.value)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt" and str(len(ids)) in err["message"]
    long_text = " ".join(random.choice(["Elizabeth", "Darcy", "import", "os"]) for _ in range(ctx))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}], stream=True)
    assert _error(e.value)["code"] == "context_length_exceeded"
    r = client.completions.create(model=MODEL, prompt=ids[: ctx - 2], max_tokens=4, temperature=0)  # 2 free positions
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_404_unknown_model_and_route(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    err = _error(e.value)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_401_wrong_or_missing_key(engine):
    key = f"sk-{random.randrange(10**12)}"
    with running_server(create_app(engine, api_key=key)) as url:
        for wrong in ("sk-wrong", key + "x"):
            with pytest.raises(openai.AuthenticationError) as e:
                client_for(url, api_key=wrong).completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert e.value.status_code == 401 and _error(e.value)["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert client_for(url, api_key=key).completions.create(model=MODEL, prompt="Elizabeth", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # health and metrics stay open to probes
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_429_when_queue_is_full(engine):
    spy = SpyEngine(engine, delay_s=0.05)
    with running_server(create_app(spy, max_running=1, max_queue=1)) as url:
        client = client_for(url)
        running = client.completions.create(model=MODEL, prompt="Elizabeth was", max_tokens=400, stream=True)
        next(iter(running))  # the only slot is taken
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(r=httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "She", "max_tokens": 2}, timeout=30)))
        thread.start()
        assert _wait_for(lambda: metric(url, "looplm_requests_waiting") == 1)  # the one queue place is taken
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and _error(e.value)["type"] == "rate_limit_error"
        running.close()  # the running request's client goes away: its slot frees, the waiting one runs
        thread.join(30)
        assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 2
        assert _wait_for(lambda: metric(url, "looplm_requests_running") == 0 and metric(url, "looplm_requests_waiting") == 0)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert _wait_for(lambda: spy.closed == 3) and spy.opened == 3  # the worker closes each stream after its last step


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_closes_the_stream_and_the_server_keeps_serving(engine, stream):
    spy = SpyEngine(engine, delay_s=0.02)
    max_tokens = 500
    with running_server(create_app(spy, max_running=2, max_queue=2)) as url:
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # a first token arrived
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the decode runs
                httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
        assert _wait_for(lambda: spy.closed == 1), "the request's stream was not closed"
        assert _wait_for(lambda: metric(url, "looplm_requests_running") == 0)
        # the engine dropped the request and its KV blocks went back to the pool
        assert _wait_for(lambda: metric(url, "looplm_engine_requests_running") == 0)
        assert _wait_for(lambda: metric(url, "looplm_kv_blocks_used", {"kv": "per_loop"}) == 0)
        assert metric(url, "looplm_kv_blocks_free", {"kv": "per_loop"}) == metric(url, "looplm_kv_blocks_total", {"kv": "per_loop"}) > 0
        assert 1 <= spy.steps[0] < max_tokens  # it stopped early
        r = client_for(url).completions.create(model=MODEL, prompt="Elizabeth", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 and _wait_for(lambda: spy.closed == 2)
        assert metric(url, "looplm_requests_total", {"endpoint": "completions", "status": "499"}) == 1
