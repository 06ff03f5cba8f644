"""An Engine wrapper for the serve tests: counts closed streams and can slow each step down."""

from __future__ import annotations

import threading
import time

import looplm


class SpyEngine:
    """Behaves as `engine`, but counts each stream's steps and its close(), and holds the engine's
    loop `delay_s` after every step it hands to a stream's on_event callback (a slow engine: a step
    in which k streams emit takes k * delay_s longer); an iterated stream sleeps after each step."""

    def __init__(self, engine: looplm.Engine, delay_s: float = 0.0):
        self._engine, self.delay_s = engine, delay_s
        self.opened = self.closed = 0
        self.steps: list[int] = []  # steps produced by each stream, in the order they were opened
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, prompt, *, on_event=None, **kwargs) -> "SpyStream":
        with self._lock:
            self.opened += 1
            self.steps.append(0)
            index = len(self.steps) - 1
        if on_event is not None:
            kwargs["on_event"] = lambda item: self._event(index, on_event, item)
        return SpyStream(self, index, self._engine.stream(prompt, **kwargs))

    def _event(self, index: int, on_event, item) -> None:
        if isinstance(item, looplm.Step):
            self.steps[index] += 1
            time.sleep(self.delay_s)
        on_event(item)


class SpyStream:
    def __init__(self, owner: SpyEngine, index: int, inner: looplm.Stream):
        self._owner, self._index, self._inner = owner, index, inner
        self._closed = False

    def __iter__(self) -> "SpyStream":
        return self

    def __next__(self) -> looplm.Step:
        step = next(self._inner)
        self._owner.steps[self._index] += 1
        time.sleep(self._owner.delay_s)
        return step

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._owner._lock:
                self._owner.closed += 1
        self._inner.close()

    @property
    def generations(self) -> list[looplm.Generation]:
        return self._inner.generations
