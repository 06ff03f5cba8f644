"""The engine loop: requests, admission into the paged cache, and one runner step at a time.

Every request is one sequence driven by its decoder (a generator policy, looplm.decoding). An
engine step: drop cancelled requests (freeing their blocks), admit waiting requests whose whole
reservation fits, advance every running decoder until it yields its next Forward (handing its
emitted Steps to the request's consumer on the way), then run all those Forwards in one runner
step per KV mode, and hand each decoder its output. One background thread runs the loop while
there is work; `submit` may be called from any thread. A consumer reads its request's Steps from a
queue, or has them pushed to its callback (`Request.on_event`, called on the loop's thread).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decoding import DecodeRequest, Step
from .lanes import LaneForward, end_lanes, run_lanes
from .memory import available_bytes
from .model import LoopLM
from .paged import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_BYTES, PagedKVCache, bytes_per_position, lane_blocks
from .runner import Runner
from .stats import Stats
from .tokenizer import IncrementalText
from .work import Forward

log = logging.getLogger("looplm")

_END = object()
TIMED_STEP_SHARE = 0.8  # beside a timed request, a step aims at this share of its token's time budget
CACHE_MEMORY_SHARE = 0.25  # the default cache holds a whole context only up to this share of the free memory
STARVE_STEPS = 8  # an untimed request left out this many steps runs in the next one whatever its size


@dataclass
class Request:
    """A submitted request: its decoder, its stop rules and what it has produced so far."""

    req: DecodeRequest
    decoder: object  # the decoder generator
    mode: str
    stop_ids: list[int]
    stop_strs: list[str]
    detok: IncrementalText | None
    generation: object  # looplm.api.Generation
    id: int = 0
    out: queue.Queue = field(default_factory=queue.Queue)
    first: object = None  # the decoder's first item (taken when submitted: a Forward, a Step, or None)
    quiet: bool = False  # the consumer waits for the end only (Engine.generate): Steps are not queued
    # instead of `out`: called on the loop's thread with each Step, then once with the end (None, or
    # the exception that ended the request); it must be quick (the loop waits for it)
    on_event: Callable[[Step | BaseException | None], None] | None = None
    pending: Forward | None = None  # the Forward its decoder waits on
    cancelled: bool = False
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)
    chunks: list[tuple[int, int]] | None = None  # a long prompt's chunks (positions [a, b)), while it runs in pieces
    chunk_outs: list | None = None
    slices: list | None = None  # outputs of the single-loop pieces of its pending Forward so far
    token_loops: int = 0  # (position, loop) pairs its Forwards ran, prefill included
    prefill_loops: int = 0
    weight_passes: int = 0  # loops of every Forward it ran (each one pass over the weights)
    forwards: int = 0
    runner_steps: int = 0  # engine steps it took part in (a chunked or loop-sliced Forward takes several)
    last_step: int = -1  # the engine step it last ran in (untimed requests take turns while a timed one runs)

    @property
    def positions(self) -> int:
        """Cache positions the request may write: its prompt and its new tokens."""
        return len(self.req.prompts[0]) + self.req.max_new[0]

    @property
    def lanes(self) -> tuple[int, int]:
        """(lanes alive at once, positions each writes) its decoder forks beside the sequence
        (looplm.lanes; set before its first Forward as req.stats["_lanes"]), reserved on admission."""
        return self.req.stats.get("_lanes", (0, 0))


class Scheduler:
    """Admission, the engine step and the background loop (see the module docstring).

    `runner_class` makes each KV mode's runner (looplm.tp sets its broadcasting runner on rank 0).

    Args:
        model: the looped model.
        cache_bytes: bytes of each KV mode's paged cache (allocated when first used); default
            DEFAULT_CACHE_BYTES, raised to hold one whole context when that fits in
            CACHE_MEMORY_SHARE of the memory free when the engine is made. A request that needs
            more positions than the whole cache holds is refused when submitted.
        block_size: positions per block.
        max_running: requests decoding at once; more wait in the queue.
        max_step_tokens: positions one engine step runs (at least one request's Forward runs);
            the Forwards of other requests wait for the next step.
        prefill_chunk: a prompt longer than this (on the exact per-loop cache) joins in chunks of
            this many positions, one per step, so that running requests keep decoding meanwhile.
    """

    runner_class = Runner

    def __init__(self, model: LoopLM, *, cache_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_running: int = 256, max_step_tokens: int = 1024, prefill_chunk: int = 256):
        for name, value in (("max_running", max_running), ("max_step_tokens", max_step_tokens), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.max_step_tokens, self.prefill_chunk = max_step_tokens, prefill_chunk
        self.model = model
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 1):
            raise ValueError(f"cache_bytes must be a positive integer, got {cache_bytes!r}")
        self.cache_bytes = cache_bytes
        self.block_size, self.max_running = block_size, max_running
        self.runners: dict[str, Runner] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._atexit = False
        self._slice = False
        self.steps = 0
        # while a request keeps a time budget: how many positions of other requests a step may run,
        # adjusted after every step so that a step lasts about TIMED_STEP_SHARE of the tightest budget;
        # it starts at 1 (the first timed request's first steps must not run every other request
        # before any step was measured) and is kept between timed requests
        self._others_cap = 1
        # free memory when the engine was made: the default cache takes a share of it (looplm.tp
        # gives every rank rank 0's figure, so that all ranks build the same number of blocks)
        self.free_memory = available_bytes(model.lm_head.weight.device) if cache_bytes is None else None

    # -- caches ---------------------------------------------------------------------------------
    def num_blocks(self, kv: str) -> int:
        p = self.model.lm_head.weight
        per_block = bytes_per_position(self.model.config, kv, p.dtype) * self.block_size
        if self.cache_bytes is not None:  # what the user asked for (at least one block)
            return max(self.cache_bytes // per_block, 1)
        # the default budget, raised to hold one whole context where a share of the free memory allows
        context = -(-self.model.config.max_position_embeddings // self.block_size) * per_block
        if self.free_memory is not None:
            context = min(context, int(self.free_memory * CACHE_MEMORY_SHARE))
        return max(max(DEFAULT_CACHE_BYTES, context) // per_block, 1)

    def runner(self, kv: str) -> Runner:
        if kv not in self.runners:
            p = self.model.lm_head.weight
            cache = PagedKVCache(self.model.config, self.num_blocks(kv), self.block_size, kv=kv, dtype=p.dtype, device=p.device)
            self.runners[kv] = self.runner_class(self.model, cache)
        return self.runners[kv]

    def load(self) -> int:
        """Requests running and waiting (what a decoder may adapt to: spec.fallback)."""
        return len(self.running) + len(self.waiting)

    def usage(self) -> dict:
        """Blocks used / free / total per KV mode, and the requests running and waiting."""
        with self._lock:
            caches = {kv: {"blocks_used": r.cache.pool.used, "blocks_total": r.cache.pool.num_blocks,
                           "block_size": r.cache.block_size, "bytes": r.cache.nbytes} for kv, r in self.runners.items()}
            return {"running": len(self.running), "waiting": len(self.waiting), "caches": caches}

    # -- submission -----------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queues requests whose decoders have already yielded their first item (`request.first`),
        all at once (they join the same step); nothing is queued when one can never fit."""
        for request in requests:
            blocks = -(-request.positions // self.block_size) + lane_blocks(*request.lanes, self.block_size)
            total = self.num_blocks(request.req.kv)
            if blocks > total:
                raise ValueError(f"the request needs {request.positions} cache positions ({blocks} blocks of {self.block_size}); "
                                 f"the whole {request.req.kv} cache holds {total} blocks: raise cache_bytes or lower max_new_tokens")
        with self._lock:
            for request in requests:
                request.id = next(self._ids)
                request.req.load = self.load
                self.waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="looplm-engine", daemon=True)
                self._thread.start()
                if not self._atexit:  # stop the loop before the interpreter tears torch down under it
                    ref = weakref.ref(self)
                    atexit.register(lambda: ref() is not None and ref().shutdown())
                    self._atexit = True

    def cancel(self, request: Request) -> None:
        request.cancelled = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancels every live request and waits for the loop to stop (the engine stays usable)."""
        with self._lock:
            for r in self.running + list(self.waiting):
                r.cancelled = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._admit()
                if not self.running:
                    if not self.waiting:
                        self._thread = None
                        return
            try:
                self.step()
            except Exception as e:  # a bug, not a user error: fail every live request, keep the engine usable
                with self._lock:
                    live = self.running + list(self.waiting)
                    self.running, self.waiting = [], deque()
                for r in live:
                    self._finish(r, e)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.popleft()
                self._finish(r, None)
                continue
            pool = self.runner(r.req.kv).cache.pool
            extra = lane_blocks(*r.lanes, pool.block_size)
            if not pool.can_admit(r.positions, extra):
                break
            self.waiting.popleft()
            pool.admit(r.id, r.positions, extra)
            self.running.append(r)
            self._start(r)

    def _start(self, r: Request) -> None:
        """Hands the decoder's first item on: a Forward waits for the next step, a Step is emitted."""
        first, r.first = r.first, None
        if isinstance(first, Forward):
            r.pending = first
        elif first is None:
            self._finish(r, None)
        else:
            self._emit(r, first)
            self._advance(r, None)

    @torch.inference_mode()
    def step(self) -> None:
        """One engine step: advance every running decoder to its next Forward; run, in one runner
        step per KV mode, the Forwards that fit the step's token budget (requests with a time
        budget first, then in order of arrival); the others wait for the next step."""
        for r in list(self.running):
            if r.cancelled:
                self._finish(r, None)
            elif r.pending is None:
                self._advance(r, None)
        t0 = time.perf_counter()
        timed = sorted((r for r in self.running if r.req.timed), key=lambda r: r.id)
        # a request keeps a time budget: one loop per step for all, its work first, the others take turns
        self._slice = bool(timed)
        others = sorted((r for r in self.running if not r.req.timed), key=lambda r: (r.last_step, r.id) if timed else r.id)
        cap = self._others_cap if timed else None
        chosen: dict[str, list[tuple[Request, Forward]]] = {}
        tokens = other_tokens = 0
        for r in timed + others:
            fwd = self._next_piece(r)
            n = fwd.inputs.shape[0] * fwd.inputs.shape[1]
            if tokens and tokens + n > self.max_step_tokens:
                continue
            if not r.req.timed and cap is not None and other_tokens + n > cap and (other_tokens or self.steps - r.last_step < STARVE_STEPS):
                continue
            tokens += n
            other_tokens += 0 if r.req.timed else n
            r.last_step = self.steps
            chosen.setdefault(r.req.kv, []).append((r, fwd))
        for kv, pairs in chosen.items():
            runner = self.runner(kv)
            pool = runner.cache.pool
            for r, fwd in pairs:
                end_lanes(pool, r.id, fwd)  # a tree decoder that stopped (spec.fallback) leaves lanes
            if any(isinstance(fwd, LaneForward) for _, fwd in pairs):
                outs = run_lanes(runner, [(r.id, fwd) for r, fwd in pairs])
            else:
                items = [(pool.ensure(r.id, int(fwd.pos.max()) + 1), fwd) for r, fwd in pairs]
                outs = runner.run(items)
            for (r, fwd), out in zip(pairs, outs):
                n = fwd.position_loops()
                r.token_loops += n
                if r.forwards == 0:
                    r.prefill_loops += n
                r.weight_passes += fwd.most_loops()
                r.runner_steps += 1
                out = self._collect(r, out)
                if out is not None:
                    r.forwards += 1
                    r.pending = None
                    self._advance(r, out)
        self.steps += 1
        self._size_steps(timed, other_tokens, (time.perf_counter() - t0) * 1e3)

    def _size_steps(self, timed: list[Request], other_tokens: int, step_ms: float) -> None:
        """Adjusts how many positions of untimed requests a step may run beside timed ones: fewer
        (in proportion, and at least half) when the step took longer than TIMED_STEP_SHARE of the
        tightest token budget, a quarter more when it took well under it (none of this applies
        while no request keeps a time budget; the cap is kept for the next timed request, whose
        first steps would otherwise run every other request)."""
        budget = min((r.req.token_ms for r in timed), default=math.inf)
        if math.isinf(budget):  # no timed request, or only ones before their first budgeted token (their prompts):
            return  # the cap stays as the last timed token left it, for the next ones to start from
        target = TIMED_STEP_SHARE * budget
        cap = self._others_cap
        if step_ms > target:  # at least halve: most of a step beside timed tokens can be theirs, not the others'
            ran = min(cap, other_tokens)
            cap = max(1, min(ran * target // step_ms, ran // 2))
        elif step_ms < 0.7 * target and other_tokens >= cap:
            cap += max(1, cap // 4)
        self._others_cap = int(cap)

    def _next_piece(self, r: Request) -> Forward:
        """The Forward r runs next: its pending Forward, the next chunk of a long prompt, or, while
        a request with a time budget runs, the next single loop of a many-loop Forward of at most
        prefill_chunk positions (a joining prompt too: one loop of it per step, not all T at once)."""
        fwd = r.pending
        if r.slices is not None:
            return self._loop_piece(r)
        if r.chunks is None:
            fwd.pos = torch.as_tensor(fwd.pos, device=self.model.lm_head.weight.device)
            S = fwd.inputs.shape[1]
            if self._slice and fwd.inputs.shape[0] * S <= self.prefill_chunk and self._loops(fwd) > 1 \
                    and not isinstance(fwd, LaneForward):  # its table operations must run once
                r.slices = []
                return self._loop_piece(r)
            if S <= self.prefill_chunk or not self._chunkable(r, fwd):
                return fwd
            r.chunks = [(a, min(a + self.prefill_chunk, S)) for a in range(0, S, self.prefill_chunk)]
            r.chunk_outs = []
        a, b = r.chunks[len(r.chunk_outs)]
        last = b == fwd.inputs.shape[1]
        logits = fwd.logits if last or fwd.logits == "all" else None
        return Forward(fwd.inputs[:, a:b], fwd.pos[:, a:b], logits=logits, logits_loops=fwd.logits_loops, gates=fwd.gates)

    def _chunkable(self, r: Request, fwd: Forward) -> bool:
        """A whole-depth prompt Forward on the exact cache: its chunks compute the same K/V (a
        chunk attends to the earlier chunks' per-loop K/V). Shared-KV caches are not chunked:
        their prefill attends with per-loop K/V only within one step."""
        return (r.req.kv == "per_loop" and fwd.inputs.dtype in (torch.int32, torch.int64) and fwd.inputs.shape[0] == 1
                and isinstance(fwd.start_loop, int) and fwd.start_loop == 0
                and (fwd.num_loops is None or fwd.num_loops == self.model.num_loops) and not fwd.copy_slots
                and fwd.logits in (None, "last", "all"))

    def _loops(self, fwd: Forward) -> int:
        if fwd.num_loops is not None:
            return fwd.most_loops()
        return self.model.num_loops - (fwd.start_loop if isinstance(fwd.start_loop, int) else 0)

    def _loop_piece(self, r: Request) -> Forward:
        """Loop i of r's pending Forward as a Forward of its own (exact: a loop range resumes from
        the saved state of the loop before it; with per-position counts, a position past its own
        count runs no loop and carries its last state)."""
        fwd, i = r.pending, len(r.slices)
        n = self._loops(fwd)
        last = i == n - 1
        inputs = fwd.inputs if i == 0 else r.slices[-1].hidden[-1]
        logits = fwd.logits if last or fwd.logits_loops == "all" else None
        start, loops = fwd.start_loop + i, 1
        if isinstance(fwd.num_loops, torch.Tensor):
            start, loops = fwd.start_loop + fwd.num_loops.clamp(max=i), (fwd.num_loops > i).long()
        return Forward(inputs, fwd.pos, start_loop=start, num_loops=loops, logits=logits,
                       copy_slots=fwd.copy_slots if i == 0 else [], gates=fwd.gates)

    def _collect(self, r: Request, out):
        """The output to hand r's decoder, or None while chunks of its prompt (or loops of its
        Forward) remain."""
        if r.slices is not None:
            r.slices.append(out)
            if len(r.slices) < self._loops(r.pending):
                return None
            outs, r.slices = r.slices, None
            logits = torch.cat([o.logits for o in outs]) if r.pending.logits_loops == "all" else outs[-1].logits
            if not isinstance(r.pending.num_loops, torch.Tensor):
                r.pending.num_loops = len(outs)
            return type(out)(torch.cat([o.hidden for o in outs]), _cat([o.gates for o in outs], 0), logits)
        if r.chunks is None:
            return out
        r.chunk_outs.append(out)
        if len(r.chunk_outs) < len(r.chunks):
            return None
        outs, r.chunks, r.chunk_outs = r.chunk_outs, None, None
        hidden = torch.cat([o.hidden for o in outs], 2)
        gates = _cat([o.gates for o in outs], 2)
        logits = outs[-1].logits if r.pending.logits != "all" else torch.cat([o.logits for o in outs], 2)
        r.pending.num_loops = self.model.num_loops
        return type(out)(hidden, gates, logits)

    def _advance(self, r: Request, value) -> None:
        """Resumes r's decoder with `value` until it yields a Forward or ends."""
        try:
            item = r.decoder.send(value)
            while isinstance(item, Step):
                self._emit(r, item)
                item = r.decoder.send(None)
        except StopIteration:
            self._finish(r, None)
            return
        except Exception as e:
            self._finish(r, e)
            return
        r.pending = item

    def _emit(self, r: Request, step: Step) -> None:
        """The facade's side of a Step: stop rules, text, the consumer's queue."""
        req, g = r.req, r.generation
        if req.done[0] or len(g.tokens) >= req.max_new[0]:
            return
        g.tokens.append(step.token)
        g.loops.append(step.loops)
        g.exit_loops.append(step.exit_loop)
        g.steps.append(step)
        text = r.detok.update(g.tokens) if r.detok is not None else ""
        hit = next((s for s in r.stop_strs if s in text), None)
        if step.token in r.stop_ids or hit is not None:
            req.done[0], g.finish_reason = True, "stop"
            if hit is not None:
                text = text[: text.index(hit)]
        elif len(g.tokens) >= req.max_new[0]:
            req.done[0] = True
            g.finish_reason = "length" if not req.stats.get("_context_limited") else "context"
        elif text.endswith("\ufffd"):
            # a byte-level token ended inside a UTF-8 character: hold the partial character back
            # until a later token completes it, so streamed pieces concatenate to the final text
            text = text.rstrip("\ufffd")
        step.row = 0
        step.text, g.text = text[len(g.text):], text
        if not r.quiet:  # a quiet consumer reads g.steps at the end: no wake-up per token
            self._hand(r, step)

    def _finish(self, r: Request, error: BaseException | None) -> None:
        if r.finished:
            return
        r.finished = True
        try:
            r.decoder.close()  # runs the decoder's finally (its final statistics)
        except Exception:
            pass
        if r in self.running:
            self.running.remove(r)
        for runner in self.runners.values():
            runner.cache.pool.release(r.id) if runner.cache.kv == r.req.kv else None
        r.generation.stats = _stats(r, self.model.num_loops)
        self._hand(r, error)

    def _hand(self, r: Request, item: Step | BaseException | None) -> None:
        """Hands r's consumer a Step or the end (None, or the error that ended r): to its callback if
        it set one, else to its queue. A callback that raises is logged and its request cancelled:
        the loop goes on with every other request."""
        if r.on_event is None:
            r.out.put(_END if item is None else item)
            return
        try:
            r.on_event(item)
        except Exception:
            log.exception("request %d: its on_event callback raised; the request is cancelled", r.id)
            r.cancelled = True


def _cat(gates: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    """The pieces' gates joined along `dim`, or None when the Forward did not ask for them."""
    return torch.cat(gates, dim) if gates[0] is not None else None


def _stats(r: Request, T: int) -> Stats:
    """The keys every mode carries (looplm.stats.Stats), over the decoder's own."""
    g, req = r.generation, r.req
    elapsed = time.perf_counter() - r.started
    n = len(g.tokens)
    decode_loops = r.token_loops - r.prefill_loops
    st = {k: v for k, v in req.stats.items() if not k.startswith("_")}
    st.update(
        mode=r.mode,
        kv=req.kv,
        finish_reason=g.finish_reason,
        new_tokens=n,
        tokens_per_s=n / elapsed if elapsed > 0 else float("inf"),
        elapsed_ms=elapsed * 1e3,
        mean_exit_loop=sum(g.exit_loops) / n if n else 0.0,
        # (position, loop) pairs per new token: the first token's T loops ran in the prefill
        loops_computed_per_token=(T + decode_loops) / n if n else 0.0,
        # loops of every forward the request took part in (prefill included) per new token
        weight_passes_per_token=r.weight_passes / n if n else 0.0,
        forwards=r.forwards,
        tokens_per_forward=n / r.forwards if r.forwards else 0.0,  # new tokens per Forward (prefill included)
        runner_steps=r.runner_steps,
        token_loops=r.token_loops,  # (position, loop) pairs of every Forward, prefill included
    )
    st["mean_loops"] = st["mean_exit_loop"]
    return st
