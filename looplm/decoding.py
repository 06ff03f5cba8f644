"""The contract between the engine facade and its decoders ("full", "speculative", "anytime").

A decoder is a policy over one request's state: `decode(model, request, **mode_options)` is a
generator that yields `Forward` work items (looplm.work) and receives each one's `LoopOutput`, and
yields each `Step` (an emitted token) as it is decided. The engine (looplm.scheduler) runs the
Forwards of every live request together, one runner step at a time; the decoder never calls the
model's forward or touches the cache (it may apply the LM head and the embedding to the states
it received). The engine consumes each Step before the decoder resumes and sets
`request.done[0]` when the request hits a stop token or string; a decoder checks `done` and
`max_new` to stop. Steps after the request is done are dropped.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Union

import torch

from .work import Forward
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
    """One validated request (one sequence), as its decoder sees it.

    The list-valued fields hold one entry (row 0): decoders index them by row, as a batch of one.
    """

    prompts: list[list[int]]
    max_new: list[int]  # limited by the context length
    sampling: SamplingParams
    generator: torch.Generator
    done: list[bool]
    stats: dict = field(default_factory=dict)  # decoders add their statistics here
    kv: str = "per_loop"  # the KV mode of the request's cache (looplm.paged)
    timed: bool = False  # the decoder keeps a time budget: the scheduler runs its work first in a step
    token_ms: float = math.inf  # a timed decoder's budget for its current token (ms): the scheduler sizes steps by it
    recommended: frozenset = frozenset()  # option names whose values are the checkpoint's recommendation, not the caller's
    seeded: bool = False  # the caller gave a seed: its samples must not depend on what runs beside it
    # the engine's load: requests running and waiting (set by the scheduler on submit; None outside an engine)
    load: Callable[[], int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def shared_kv(self) -> bool:
        return self.kv != "per_loop"

    def active(self, row: int, produced: int) -> bool:
        return not self.done[row] and produced < self.max_new[row]


Decoder = Generator[Union[Forward, Step], object, None]


def resolve_mode(mode: str) -> Callable[..., Decoder]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    module, fn = MODES[mode].split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise ValueError(f"mode {mode!r} is not available: {e}") from e


def prefill(req: DecodeRequest, device, **kw) -> Forward:
    """The Forward that runs all T loops over the prompt, writing every loop's KV, with logits at
    its last position: (1, 1, 1, V) by default (pass logits_loops="all" for every loop's)."""
    ids = req.prompts[0]
    return Forward(torch.tensor([ids], device=device), torch.arange(len(ids), device=device)[None], logits="last", **kw)


class Timer:
    """Milliseconds since the previous call, per row."""

    def __init__(self, rows: int):
        now = time.perf_counter()
        self.last = [now] * rows

    def lap(self, row: int) -> float:
        now = time.perf_counter()
        ms, self.last[row] = (now - self.last[row]) * 1e3, now
        return ms
