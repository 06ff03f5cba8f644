"""A static KV cache with one slot per (loop, layer) and position: T*L slots per position."""

from __future__ import annotations

import torch

from .config import LoopConfig


class LoopKVCache:
    """Keys/values of every loop of every layer, allocated once and written by position.

    Storage is (T, L, B, Hkv, max_len, D). Attention at loop t, layer l reads slot (t, l) only.
    Nothing is ever rolled back: a position is valid for a query when it is <= the query's
    position, so a stale entry (a rejected draft, a padded prompt tail) is overwritten before any
    query can see it. `lengths` records each row's valid prefix for the decoders' bookkeeping.
    """

    def __init__(self, cfg: LoopConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device=None):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        shape = (cfg.total_ut_steps, cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_len = batch_size, max_len
        self.num_loops = cfg.total_ut_steps

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bytes_per_token(self) -> int:
        return self.nbytes // (self.batch_size * self.max_len)

    def write(self, loop, layer: int, batch_idx, pos, k, v) -> None:
        """Stores k/v (B', Hkv, S, D) at slot (loop, layer) for rows batch_idx (B', 1) and positions pos (B', S).

        `loop` is an int or a (B', S) tensor of per-token loops (0-based).
        """
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B', S, Hkv, D)
        self.k[loop, layer, batch_idx, :, pos] = kt.to(self.k.dtype)
        self.v[loop, layer, batch_idx, :, pos] = vt.to(self.v.dtype)

    def read(self, loop: int, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot (loop, layer) for rows batch_idx (None = all), positions [0, kv_len): (B', Hkv, kv_len, D)."""
        k, v = self.k[loop, layer, :, :, :kv_len], self.v[loop, layer, :, :, :kv_len]
        if batch_idx is not None:
            k, v = k[batch_idx.view(-1)], v[batch_idx.view(-1)]
        return k, v

    def read_per_token(self, loops, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token slots: loops/batch_idx broadcast to (B', S) -> (B'*S, Hkv, kv_len, D)."""
        loops, rows = torch.broadcast_tensors(loops, batch_idx)
        k = self.k[loops.reshape(-1), layer, rows.reshape(-1), :, :kv_len]
        v = self.v[loops.reshape(-1), layer, rows.reshape(-1), :, :kv_len]
        return k, v
