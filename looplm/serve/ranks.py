"""The worker ranks of `python -m looplm serve --tp N`, owned by the server process.

The server process is rank 0 (the HTTP server, the scheduler and the decoders, looplm.tp); ranks
1..N-1 are spawned here with torch.multiprocessing, under torchrun's environment variables as
`generate --tp` spawns its ranks, and run looplm.tp's worker loop. Rank 0 being the process the
user started is what makes a signal to it stop everything:
- SIGTERM or SIGINT: the server's graceful shutdown, then `close()`: `looplm.tp.stop()` tells the
  workers to exit, and they are joined (any still alive after JOIN_S seconds is killed);
- a worker that exits on its own: a log line names its rank, pid and status; the server then stops
  as on SIGTERM and exits 1, or, before it listens (rank 0 may be blocked joining the process
  group), the process exits 1 at once;
- the server process killed outright: each worker's next collective fails (its socket to rank 0
  closes) and it exits with a message. Workers ignore SIGINT (torch sends it to them when their
  parent dies; Ctrl-C in a terminal sends it to all), so rank 0's graceful shutdown stops them.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

import torch.multiprocessing as mp

from looplm import tp

log = logging.getLogger("looplm.serve")
JOIN_S = 10.0  # how long close() waits for a worker to exit before killing it


class Ranks:
    """Spawns ranks 1..world-1 of a launch whose rank 0 is this process (which it sets up as rank 0)."""

    def __init__(self, world: int, argv: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = _rank_env(0, world, port)
        self._environ = {k: os.environ.get(k) for k in env}  # restored by close()
        os.environ.update(env)
        self.dead: str | None = None  # what happened to the worker that exited first, unasked
        self._server = None  # the uvicorn Server, once it exists: stopped when a worker dies
        self._closing = threading.Event()
        self._ctx = mp.start_processes(_worker, args=(world, port, argv), nprocs=world - 1, join=False, start_method="spawn")
        for rank, p in enumerate(self._ctx.processes, 1):
            log.info("tensor-parallel rank %d of %d: pid %d", rank, world, p.pid)
        threading.Thread(target=self._watch, name="looplm-tp-ranks", daemon=True).start()

    def attach(self, server) -> None:
        """From now on a dead worker stops `server` (its should_exit) instead of the process."""
        self._server = server

    def _watch(self) -> None:
        processes = {p.sentinel: (rank, p) for rank, p in enumerate(self._ctx.processes, 1)}
        first = multiprocessing.connection.wait(list(processes))[0]
        if self._closing.is_set():
            return
        rank, p = processes[first]
        p.join()
        self.dead = f"tensor-parallel rank {rank} (pid {p.pid}) exited with status {p.exitcode}"
        log.error("%s; stopping the server", self.dead)
        if self._server is not None:
            self._server.should_exit = True
            return
        self._kill()  # rank 0 may be blocked joining the process group or in a collective: leave now
        print(f"error: {self.dead}", file=sys.stderr, flush=True)
        os._exit(1)

    def close(self) -> None:
        """Stops rank 0's engine and tells the workers to exit (looplm.tp.stop); waits up to JOIN_S
        seconds for them, then kills the rest."""
        self._closing.set()
        tp.stop()
        deadline = time.monotonic() + JOIN_S
        for p in self._ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        for k, v in self._environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def _kill(self) -> None:
        for rank, p in enumerate(self._ctx.processes, 1):
            if p.is_alive():
                log.warning("tensor-parallel rank %d (pid %d) did not exit: killing it", rank, p.pid)
                p.kill()
                p.join()


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _worker(index: int, world: int, port: int, argv: list[str]) -> None:
    """Rank index + 1: the same `serve` command under torchrun's variables (looplm.load runs the
    worker loop and exits the process there; it returns only on an error, e.g. a bad option)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(_rank_env(index + 1, world, port))
    from .cli import main

    sys.exit(main(argv))
