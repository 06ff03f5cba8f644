"""Bandwidth accounting of batch-1 decoding: bytes read per token, and the rate memory delivers them.

Batch-1 full-depth decoding reads every layer weight once per loop (T times per token), the final
norm and exit gate once per loop, the LM head and one embedding row once, and the KV cache of every
(loop, layer) up to the token's position. The bound on decode tokens/s is the rate at which this
machine's matrix-vector product reads weights of the model's dtype (measured over a matrix far
larger than the caches, with the same thread count) divided by those bytes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from looplm import LoopLM

MATVEC_BYTES = 256 * 2**20  # the matrix of the read-rate measurement: ~8x a server CPU's L3


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def bytes_per_token(model: LoopLM, positions: list[int]) -> dict:
    """Bytes batch-1 full-depth decoding reads per decode step, averaged over the steps at `positions`.

    Args:
        model: the model (its parameters' dtype is the one read; the KV cache has the same dtype).
        positions: the position of the token each decode step feeds (prompt length, +1, ...).

    Returns:
        dict with weights_per_loop (layers + final norm + exit gate), loops, head (LM head and one
        embedding row), kv (cache reads and writes, mean over the steps) and total, all in bytes.
    """
    cfg = model.config
    el = model.lm_head.weight.element_size()
    per_loop = _nbytes(model.model.layers) + _nbytes(model.model.norm) + _nbytes(model.model.early_exit_gate)
    head = model.lm_head.weight.numel() * el + cfg.hidden_size * el
    per_key = 2 * cfg.num_key_value_heads * cfg.head_dim * el  # K and V of one position, one layer
    # a step at position p writes its own K/V and reads keys 0..p, at every loop and layer: p + 2 slots
    kv = sum(cfg.num_hidden_layers * model.num_loops * per_key * (p + 2) for p in positions) / max(len(positions), 1)
    total = per_loop * model.num_loops + head + kv
    return {"weights_per_loop": per_loop, "loops": model.num_loops, "head": head, "kv": kv, "total": total}


def matvec_read_rate(dtype: torch.dtype, threads: int, *, nbytes: int = MATVEC_BYTES, repeats: int = 5) -> float:
    """Bytes/s a (1, K) x (N, K)^T `F.linear` (the model's own op) reads from a `nbytes` weight, best of `repeats`.

    Runs with `threads` intra-op threads (restored after).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k = 4096
        w = torch.randn(nbytes // (k * torch.empty((), dtype=dtype).element_size()), k).to(dtype)
        x = torch.randn(1, k).to(dtype)
        F.linear(x, w)  # first touch and kernel selection, untimed
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - t0)
        return w.numel() * w.element_size() / best
    finally:
        torch.set_num_threads(before)
