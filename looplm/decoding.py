"""The contract between the engine facade and its decoders ("full", "speculative", "anytime").

A decoder is `decode(model, request, **mode_options) -> Iterator[Step]`. It yields each row's
tokens in order as they are decided. The facade consumes each step before the decoder resumes,
and sets `request.done[row]` when a row hits a stop token or string; a decoder checks `done` and
`max_new[row]` to stop computing a row. Steps for a row that is already done are dropped.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import LoopKVCache
from .model import LoopLM, LoopOutput
from .sampling import SamplingParams

# mode name -> "module:function"; imported lazily so looplm never depends on its decoders
MODES = {"full": "looplm.generate:decode_full", "speculative": "spec:decode", "anytime": "anytime:decode"}


@dataclass
class Step:
    """One emitted token."""

    row: int  # index of the prompt in the batch
    index: int  # 0-based index of this token among the row's new tokens
    token: int
    loops: int  # loops computed for this token when it was emitted (its depth)
    exit_loop: int  # 1-based loop whose LM head produced the token
    latency_ms: float  # wall time since the row's previous token (or since the request started)
    reason: str  # why the token left at exit_loop: "max_depth", "budget", "policy", "draft", "verify", ...
    text: str = ""  # the decoded text this token added (filled by the facade)
    info: dict = field(default_factory=dict)  # decoder-specific details (e.g. per-loop probabilities)


@dataclass
class DecodeRequest:
    """A validated batch, as decoders see it."""

    prompts: list[list[int]]
    max_new: list[int]  # per row, already limited by the context length
    sampling: SamplingParams
    generator: torch.Generator
    done: list[bool]
    stats: dict = field(default_factory=dict)  # decoders add their statistics here
    cache_factory: Callable[[LoopLM, int, int], LoopKVCache] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def cache_len(self, slack: int = 0) -> int:
        """Positions a cache needs for every row's prompt and new tokens (+ decoder slack)."""
        return max(len(p) + n for p, n in zip(self.prompts, self.max_new)) + slack

    def new_cache(self, model: LoopLM, max_len: int) -> LoopKVCache:
        if self.cache_factory is not None:
            return self.cache_factory(model, self.batch_size, max_len)
        return model.new_cache(self.batch_size, max_len)

    def active(self, row: int, produced: int) -> bool:
        return not self.done[row] and produced < self.max_new[row]


def resolve_mode(mode: str) -> Callable[..., Iterator[Step]]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    module, fn = MODES[mode].split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise ValueError(f"mode {mode!r} is not available: {e}") from e


def prefill(model: LoopLM, cache: LoopKVCache, prompts: list[list[int]], **kw) -> LoopOutput:
    """Runs all T loops over right-padded prompts, writing every loop's KV.

    Returns the LoopOutput with logits at each row's last prompt token: (1, B, 1, V) by default
    (pass logits_loops="all" for every loop's). Padding positions hold stale K/V that the first
    decode step of each row overwrites before any query can see them.
    """
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    S = int(lengths.max())
    ids = torch.tensor([p + [0] * (S - len(p)) for p in prompts], device=device)
    pos = torch.arange(S, device=device).expand(len(prompts), -1)
    out = model.forward_loops(model.embed(ids), pos, cache, logits=lengths - 1, **kw)
    cache.lengths.copy_(lengths)
    return out


class Timer:
    """Milliseconds since the previous call, per row."""

    def __init__(self, rows: int):
        now = time.perf_counter()
        self.last = [now] * rows

    def lap(self, row: int) -> float:
        now = time.perf_counter()
        ms, self.last[row] = (now - self.last[row]) * 1e3, now
        return ms
