"""`python -m tests.serve.slow_server GRACE_S DELAY_S`: the bundled model served through looplm.serve.cli.serve
on a free loopback port (printed on stdout's first line), each step a stream emits holding the engine DELAY_S seconds;
test_sigterm.py runs it as a subprocess to send it SIGTERM."""

from __future__ import annotations

import logging
import sys

import torch

import looplm
from looplm.serve.cli import LOG_FORMAT, serve

from .conftest import free_socket
from .spy import SpyEngine

if __name__ == "__main__":
    grace_s, delay_s = float(sys.argv[1]), float(sys.argv[2])
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    engine = SpyEngine(looplm.load(), delay_s=delay_s)
    sock = free_socket()
    print(sock.getsockname()[1], flush=True)
    sys.exit(serve(engine, sock=sock, grace_period=grace_s, max_running=3, max_queue=4))
