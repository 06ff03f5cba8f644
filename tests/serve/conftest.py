"""Servers on 127.0.0.1 for the serve tests: uvicorn in a thread of the test process, on a free port.

Skips the folder cleanly when the serve extra (fastapi, uvicorn, prometheus-client) or the openai
client is missing.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402

import looplm  # noqa: E402
from looplm.serve.app import create_app  # noqa: E402

MODEL = "looplm-default"  # the id the bundled model is served under
START_TIMEOUT_S = 30

# prompts in the bundled model's domains (Python sources and docs, Austen)
PROMPTS = [
    "def fibonacci(n):",
    "It is a truth universally acknowledged, that a single man",
    "import os\nimport sys\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "Elizabeth was",
    "for i in range(10):\n    if i % 2 == 0:",
    "Mr. Darcy said nothing, but",
    "try:\n    import json\nexcept ImportError:",
    "Emma Woodhouse, handsome, clever, and rich,",
    "def quicksort(items):",
    "She had never",
    "while True:\n    line = f.readline()",
    "The os.path module implements",
    "Return a list of the words in the string",
    "mod 7: 3 + 5 * 2 =",
    "copy: a b c |",
]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_server(app):
    """Serves `app` on a free loopback port in a thread; yields its base URL, stops it after."""
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def engine() -> looplm.Engine:
    return looplm.load()


@pytest.fixture(scope="session")
def server(engine):
    """The bundled model served with room for the load test: 16 running, 256 waiting."""
    with running_server(create_app(engine, max_running=16, max_queue=256)) as url:
        yield url


def client_for(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return client_for(server)


def metric(url: str, name: str, labels: dict | None = None, default: float | None = None) -> float:
    """One sample of the server's /metrics, parsed with prometheus_client's parser (`default` when
    absent, e.g. a labelled counter no request has touched yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    if default is not None:
        return default
    raise KeyError(name)
