"""How many intra-op threads torch should use for a model: chosen from its size, overridable.

Decoding runs one token (or a few) per forward, so each matrix product of a small model is tiny:
splitting it over threads buys less than the threads cost to wake and join. Worse, an OpenMP
team waits for its slowest member, so when another process holds one core, every product waits
for a descheduled thread. On a 2-core machine with one busy process, the bundled 2.6M-parameter
model decoded at 4.5 tokens/s with 2 threads against 70 with 1 (issue #13). A model gets one
thread per `BYTES_PER_THREAD` of weights (at least 1, at most the cores this process may use),
so the bundled model gets 1 and a 1.4B-parameter model every core.

Precedence: an explicit `threads=` (`looplm.load(..., threads=n)`, `--threads n`), then the
environment variable `LOOPLM_THREADS`, then the size rule.
"""

from __future__ import annotations

import os

import torch

ENV = "LOOPLM_THREADS"
# Weights one thread must have to itself before a second one pays (a judgement, not a measured
# constant: at 64 MiB a decode step's products take milliseconds, against microseconds to wake a thread).
BYTES_PER_THREAD = 64 * 2**20


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())


def threads_for(model_bytes: int, cores: int | None = None) -> int:
    """The size rule: one thread per BYTES_PER_THREAD of weights, between 1 and `cores`."""
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, model_bytes // BYTES_PER_THREAD))


def check_threads(n: object, what: str = "threads") -> int:
    """n itself when it is an integer >= 1, else a ValueError naming `what`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {n!r}")
    return n


def choose_threads(model: torch.nn.Module, threads: int | None = None) -> int:
    """The intra-op thread count for `model`: `threads` if given, else $LOOPLM_THREADS, else the size rule.

    Raises:
        ValueError: `threads` or $LOOPLM_THREADS is not an integer >= 1.
    """
    if threads is not None:
        return check_threads(threads)
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{ENV} must be an integer >= 1, got {env!r}") from None
        return check_threads(value, ENV)
    return threads_for(parameter_bytes(model))


def apply_threads(model: torch.nn.Module, threads: int | None = None) -> int:
    """Sets torch's intra-op thread count (process-wide) from `choose_threads`; returns it."""
    n = choose_threads(model, threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
