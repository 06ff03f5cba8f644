"""Admission, and the bridge from the engine's loop to the event loop.

An admitted request opens its `Engine.stream` (validation and the decoder's first item, in a thread
of asyncio's pool) with an `on_event` callback: the engine's loop thread hands it every Step and
then the request's end as they happen, and it only appends them to one inbox and, unless a wake-up
is already pending, schedules one on the event loop (`call_soon_threadsafe`). That wake-up turns
the inbox into each request's events (stop-string hold-back included) on its asyncio queue: an
engine step that emits a token for every live request costs one wake-up, and no thread waits per
request. The engine decodes every live stream together in its background loop (continuous
batching). At most `max_running` streams are live at once and at most `max_queue` more wait for a
slot; a request beyond both is refused (QueueFull, HTTP 429) before it waits. `Job.cancel()` (a
client went away, or shutdown) closes the stream (`Stream.close()`: the engine drops the request at
its next step and frees its cache blocks); its end then arrives and the job ends with Failed (503).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections import deque
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
    ended: threading.Event = field(default_factory=threading.Event)  # the engine ended the stream (blocks freed)
    stream: object | None = None  # the engine's Stream, once opened
    end: asyncio.Future | None = None  # the stream's end (None, or the error that ended it), on the event loop
    texts: dict[int, str] = field(default_factory=dict)  # row -> its text so far (the Steps' text)
    sent: dict[int, int] = field(default_factory=dict)  # row -> characters of its text already handed out

    def cancel(self) -> None:
        """Cancels the request: closes its stream now, so the engine drops it at its next step (also
        while it still waits in the engine's queue); its end then arrives and the job ends."""
        self.cancelled.set()
        if self.stream is not None:  # else the thread opening it closes it (it checks after setting it)
            self.stream.close()


class Runner:
    """Runs jobs on an engine, `max_running` at a time with `max_queue` waiting."""

    def __init__(self, engine: Engine, max_running: int, max_queue: int, metrics=None):
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"max_running must be >= 1 and max_queue >= 0, got {max_running} and {max_queue}")
        self.engine, self.max_running, self.max_queue, self.metrics = engine, max_running, max_queue, metrics
        self.running = 0  # jobs admitted and not yet ended
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the serving event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: set[Job] = set()
        self._tasks: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)
        self._inbox: deque[tuple[Job, Step | BaseException | None]] = deque()  # from the engine's thread
        self._wake_pending = False

    async def submit(self, job: Job) -> Job:
        """Admits `job` and starts it once a slot is free (waiting here until then).

        Raises:
            QueueFull: when all running slots and queue places are taken.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
            self._loop = asyncio.get_running_loop()
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
        job.end = self._loop.create_future()
        self._jobs.add(job)
        task = asyncio.create_task(self._run(job), name=f"looplm-job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def cancel_all(self, join_s: float = 5.0) -> None:
        """Cancels every running job and waits up to `join_s` seconds for the engine to end their
        streams (and free their cache blocks)."""
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + join_s
        for job in jobs:
            job.ended.wait(max(0.0, deadline - time.monotonic()))

    def _set_waiting(self, delta: int) -> None:
        self.waiting += delta
        if self.metrics is not None:
            self.metrics.waiting.inc(delta)

    # -- one job, on the event loop -----------------------------------------------------------
    async def _run(self, job: Job) -> None:
        """Opens the job's stream, waits for its end and sends Done or Failed; its Tokens are sent by
        `_drain` meanwhile."""
        try:
            try:
                stream = await asyncio.to_thread(self._open, job)
            except ValueError as e:
                job.events.put_nowait(Failed(str(e), 400))
                return
            error = await job.end
            if job.cancelled.is_set():  # a closed stream ends early: that is not a finished request
                job.events.put_nowait(Failed("the request was cancelled (the server is shutting down or the client went away)", 503))
            elif isinstance(error, ValueError):
                job.events.put_nowait(Failed(str(error), 400))
            elif error is not None:
                raise error
            else:
                gens = stream.generations
                tails = [g.text[job.sent.get(i, 0):] for i, g in enumerate(gens)]
                lp = None
                if job.logprobs is not None:  # a forward pass: off the event loop
                    lp = await asyncio.to_thread(lambda: [self._logprobs(g, job.logprobs) for g in gens])
                job.events.put_nowait(Done(gens, tails, lp))
        except Exception:  # a bug or a device error: logged here, never sent to the client
            log.exception("request %s failed while decoding", job.id)
            job.events.put_nowait(Failed("the server failed while decoding this request", 500))
        finally:
            if job.stream is not None:
                job.stream.close()
            self._jobs.discard(job)
            self.running -= 1
            if self.metrics is not None:
                self.metrics.running.dec()
            self._slots.release()

    def _open(self, job: Job):  # in a thread of asyncio's pool
        try:
            stream = job.stream = self.engine.stream(job.prompt, max_new_tokens=job.max_new_tokens, mode=job.mode,
                                                     on_event=functools.partial(self._post, job), **job.options)
        except BaseException:  # nothing was submitted: there is nothing for cancel_all to wait for
            job.ended.set()
            raise
        if job.cancelled.is_set():  # cancelled while the stream was being opened
            stream.close()
        return stream

    # -- from the engine's loop thread to the event loop ----------------------------------------
    def _post(self, job: Job, item: Step | BaseException | None) -> None:  # on the engine's thread: cheap, never raises
        try:
            if not isinstance(item, Step):
                job.ended.set()
            self._inbox.append((job, item))
            if not self._wake_pending:  # one wake-up for everything the engine hands over until it runs
                self._wake_pending = True
                self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (the server shut down): nobody waits
            pass
        except Exception:
            log.exception("request %s: could not hand an engine event to the event loop", job.id)

    def _drain(self) -> None:  # on the event loop
        # cleared before reading: whatever the engine appends from now on schedules a wake-up of its own
        self._wake_pending = False
        inbox = self._inbox
        while inbox:
            job, item = inbox.popleft()
            if isinstance(item, Step):
                if not job.cancelled.is_set():
                    job.events.put_nowait(self._token(job, item))
            elif not job.end.done():
                job.end.set_result(item)

    @staticmethod
    def _token(job: Job, step: Step) -> Token:
        """The step's event: its text, less what could still be the beginning of a stop string."""
        text = job.texts[step.row] = job.texts.get(step.row, "") + step.text
        safe = len(text) - _stop_prefix_len(text, job.stop_strings)
        start = job.sent.get(step.row, 0)
        job.sent[step.row] = max(start, safe)
        return Token(step.row, step, text[start:safe])

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
