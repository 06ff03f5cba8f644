"""`python -m looplm serve`: the OpenAI-compatible server on uvicorn.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish for up to
--grace-period seconds, cancels the rest and exits 0. With --tp N this process is rank 0 of N
(looplm.tp) and spawns the other ranks itself (looplm/serve/ranks.py): they stop with it, and one
that dies stops the server (exit status 1, the rank named in the log).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

import uvicorn

from .chat import TEMPLATES

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BACKSTOP_S = 5.0  # uvicorn cancels what is left this long after the grace period


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m looplm serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Ouro checkpoint directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-running", type=int, default=8, help="requests decoding at once")
    p.add_argument("--max-queue", type=int, default=64, help="admitted requests waiting for a slot; more get HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("LOOPLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env LOOPLM_API_KEY, else none)")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--chat-template", default="auto", choices=TEMPLATES, help="see looplm/serve/chat.py")
    p.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: looplm-default or the checkpoint's directory name)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (per rank with --tp) (default: $LOOPLM_THREADS, else chosen from the model's size)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallelism over N processes on this machine, spawned here (under torchrun: "
                        "its --nproc-per-node N) (default: %(default)s)")
    return p


class _Server(uvicorn.Server):
    """uvicorn's server, cancelling the requests still running `grace_s` after shutdown begins."""

    def __init__(self, config: uvicorn.Config, runner, grace_s: float):
        super().__init__(config)
        self.runner, self.grace_s = runner, grace_s

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace_s, self.runner.cancel_all, 0.0)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None,
          grace_period: float = 30.0, on_server: Callable[[uvicorn.Server], None] | None = None, **app_options) -> int:
    """Serves `engine` until SIGTERM or SIGINT; returns 0 after a graceful shutdown.

    Args:
        engine: a looplm Engine.
        host, port: where to listen (ignored when `sock` is given: an already bound socket).
        grace_period: seconds the requests in flight get to finish once a stop signal arrives.
        on_server: called with the uvicorn Server before it starts (`serve --tp` stops it when a rank dies).
        **app_options: create_app's options (max_running, max_queue, api_key, chat_template, model_name).
    """
    from .app import create_app

    app = create_app(engine, **app_options)  # ValueError for bad options, before anything listens
    # uvicorn's own timeout is only the backstop: at the grace period's end the requests still
    # running are cancelled, and each then ends its response (an error event) and its connection
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=grace_period + BACKSTOP_S, timeout_keep_alive=5)
    server = _Server(config, app.state.runner, grace_period)
    if on_server is not None:
        on_server(server)
    # uvicorn re-raises the stop signal once it has shut down, to the handler that was installed
    # before it started: make that one a no-op so a graceful stop exits 0 rather than dying by signal
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        server.run(sockets=None if sock is None else [sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.state.runner.cancel_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    import looplm

    if args.tp < 1:
        print(f"error: --tp must be an integer >= 1, got {args.tp}", file=sys.stderr)
        return 2
    ranks = None
    try:
        if args.tp > 1 and "RANK" not in os.environ:  # a launch of our own: this process is rank 0
            from looplm import checkpoint, tp
            from looplm.api import DEFAULT_MODEL
            from looplm.config import resolve_dtype
            from looplm.threads import check_threads

            from .ranks import Ranks

            # checked once here rather than by every rank (a missing checkpoint fails here too)
            tp.check_divisible(checkpoint.read_config(args.model or DEFAULT_MODEL), args.tp)
            resolve_dtype(args.dtype)
            if args.threads is not None:
                check_threads(args.threads)
            ranks = Ranks(args.tp, argv)
        # under a launch, looplm.load returns on rank 0 only: the other ranks serve its steps and exit there
        engine = looplm.load(args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                             tp=args.tp if args.tp > 1 else None)
        logging.getLogger("looplm.serve").info("serving %s on http://%s:%d", args.model or "the bundled model", args.host, args.port)
        code = serve(engine, host=args.host, port=args.port, grace_period=args.grace_period, max_running=args.max_running,
                     max_queue=args.max_queue, api_key=args.api_key, chat_template=args.chat_template, model_name=args.model_name,
                     on_server=None if ranks is None else ranks.attach)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if ranks is not None:
            ranks.close()
        elif args.tp > 1:  # under torchrun: tell the other ranks to exit
            from looplm import tp

            tp.stop()
    if ranks is not None and ranks.dead is not None:
        print(f"error: {ranks.dead}", file=sys.stderr)
        return 1
    return code
