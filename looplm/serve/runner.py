"""Admission and the bridge from the engine's blocking streams to the event loop.

Each admitted request iterates its `Engine.stream` in a worker thread of its own and hands every
step to the event loop through an asyncio queue. The engine decodes every live stream together in
its background loop (continuous batching); a worker only waits for its own stream's steps. At
most `max_running` streams are live at once and at most `max_queue` more wait for a slot; a
request beyond both is refused (QueueFull, HTTP 429) before it waits. `Job.cancel()` (a client
went away, or shutdown) stops the worker at its next step, which then closes the stream
(`Stream.close()`: the engine cancels the request and frees its cache blocks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from looplm import Engine, Generation, Step, tp

log = logging.getLogger("looplm.serve")


class QueueFull(Exception):
    """Every running slot and every queue place is taken."""


@dataclass
class Token:
    """One emitted token of one row, with the text it lets the server send."""

    row: int
    step: Step
    text: str  # new text, held back while it could still be the start of a stop string


@dataclass
class Done:
    """The stream ended: each row's Generation, its text not yet sent, and its logprobs if asked."""

    generations: list[Generation]
    tails: list[str]
    logprobs: list[list[tuple[float, list[tuple[int, float]]]]] | None = None


@dataclass
class Failed:
    """The request ended without a result: its HTTP status says why (400: the engine refused its
    arguments with a ValueError; 503: cancelled, e.g. at shutdown; 500: decoding failed)."""

    message: str
    status: int


@dataclass(eq=False)  # identity: jobs are kept in sets
class Job:
    """One admitted request; its events arrive on `events` in order, ending with Done or Failed."""

    prompt: list
    max_new_tokens: int
    mode: str
    options: dict
    stop_strings: list[str]
    logprobs: int | None  # top alternatives per token to return (0: the chosen token's only), None: none
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    admitted: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: object | None = None  # the engine's Stream, once the worker opened it

    def cancel(self) -> None:
        """Cancels the request: closes its stream now, so the engine drops it even while the worker
        waits for a step (e.g. the request still queued in the engine); the worker then ends it."""
        self.cancelled.set()
        if self.stream is not None:
            self.stream.close()


class Runner:
    """Runs jobs on an engine, `max_running` at a time with `max_queue` waiting."""

    def __init__(self, engine: Engine, max_running: int, max_queue: int, metrics=None):
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"max_running must be >= 1 and max_queue >= 0, got {max_running} and {max_queue}")
        self.engine, self.max_running, self.max_queue, self.metrics = engine, max_running, max_queue, metrics
        self.running = 0  # jobs whose worker thread is alive
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the serving event loop
        self._jobs: set[Job] = set()
        self._threads: dict[Job, threading.Thread] = {}
        self._names = itertools.count()

    async def submit(self, job: Job) -> Job:
        """Admits `job` and starts it once a slot is free (waiting here until then).

        Raises:
            QueueFull: when all running slots and queue places are taken.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.running} requests running and {self.waiting} waiting")
        self._set_waiting(+1)
        try:
            await self._slots.acquire()
        finally:
            self._set_waiting(-1)
        self.running += 1
        if self.metrics is not None:
            self.metrics.running.inc()
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._work, args=(job, loop), name=f"looplm-job-{next(self._names)}", daemon=True)
        self._jobs.add(job)
        self._threads[job] = thread
        thread.start()
        return job

    def cancel_all(self, join_s: float = 5.0) -> None:
        """Cancels every running job and waits up to `join_s` seconds for their workers to close."""
        for job in list(self._jobs):
            job.cancel()
        deadline = time.monotonic() + join_s
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _set_waiting(self, delta: int) -> None:
        self.waiting += delta
        if self.metrics is not None:
            self.metrics.waiting.inc(delta)

    def _finished(self, job: Job) -> None:  # on the event loop
        self._jobs.discard(job)
        self._threads.pop(job, None)
        self.running -= 1
        if self.metrics is not None:
            self.metrics.running.dec()
        self._slots.release()

    # -- the worker thread --------------------------------------------------------------------
    def _work(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        def post(fn, *args) -> None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the event loop is gone (the server shut down): nobody waits
                pass

        def emit(event) -> None:
            post(job.events.put_nowait, event)

        stream = None
        try:
            stream = job.stream = self.engine.stream(job.prompt, max_new_tokens=job.max_new_tokens, mode=job.mode, **job.options)
            if job.cancelled.is_set():  # cancelled while the stream was being opened
                stream.close()
            sent: dict[int, int] = {}  # row -> characters of its text already handed out
            for step in stream:
                if job.cancelled.is_set():
                    break
                text = stream.generations[step.row].text
                safe = len(text) - _stop_prefix_len(text, job.stop_strings)
                start = sent.get(step.row, 0)
                sent[step.row] = max(start, safe)
                emit(Token(step.row, step, text[start:safe]))
            if job.cancelled.is_set():  # a closed stream ends early: that is not a finished request
                emit(Failed("the request was cancelled (the server is shutting down or the client went away)", 503))
            else:
                gens = stream.generations
                tails = [g.text[sent.get(i, 0):] for i, g in enumerate(gens)]
                lp = None if job.logprobs is None else [self._logprobs(g, job.logprobs) for g in gens]
                emit(Done(gens, tails, lp))
        except ValueError as e:
            emit(Failed(str(e), 400))
        except Exception:  # a bug or a device error: logged here, never sent to the client
            log.exception("request %s failed while decoding", job.id)
            emit(Failed("the server failed while decoding this request", 500))
        finally:
            if stream is not None:
                stream.close()
            post(self._finished, job)

    @torch.inference_mode()
    def _logprobs(self, gen: Generation, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Each new token's log-probability under the loop that emitted it, and the `top` likeliest
        tokens there, from one cache-free forward over prompt + completion (temperature 1)."""
        if not gen.tokens:
            return []
        ids = torch.tensor([gen.prompt_tokens + gen.tokens[:-1]], device=self.engine.device)
        # through looplm.tp: on a tensor-parallel engine the other ranks compute their part with it
        logits = tp.per_loop_logits(self.engine.model, ids)[:, 0, len(gen.prompt_tokens) - 1 :]  # (T, N, V)
        out = []
        for i, step in enumerate(gen.steps):
            lp = torch.log_softmax(logits[step.exit_loop - 1, i].float(), -1)
            best = lp.topk(top) if top else None
            alts = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
            out.append((float(lp[step.token]), alts))
        return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
