"""Static KV caches: the exact per-loop cache (T*L slots per position) and the shared-KV cache (L)."""

from __future__ import annotations

from typing import Callable, Literal

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

    kv = "per_loop"  # what a slot holds; SharedKVCache says "last" or "mean"

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def commit(self) -> None:
        """Called by LoopLM.forward_loops at the end of every call; the per-loop cache has nothing to do."""

    def bytes_per_token(self) -> int:
        return self.nbytes // (self.batch_size * self.max_len)

    def write(self, loop, layer: int, batch_idx, pos, k, v) -> None:
        """Stores k/v (B', Hkv, S, D) at slot (loop, layer) for rows batch_idx (B', 1) and positions pos (B', S).

        `loop` is an int or a (B', S) tensor of per-token loops (0-based).
        """
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B', S, Hkv, D)
        self.k[loop, layer, batch_idx, :, pos] = kt.to(self.k.dtype)
        self.v[loop, layer, batch_idx, :, pos] = vt.to(self.v.dtype)

    writes_diagonal = True  # see write_diagonal

    def write_diagonal(self, first_loop: int, loop_step: int, layer: int, row: int, first_pos: int, k, v) -> None:
        """Stores k/v (n, Hkv, 1, D) of n tokens of one cache row where token i sits at loop
        first_loop + i * loop_step and position first_pos - i (a pipelined call's tokens): each of
        k and v is one copy into a strided view, where `write` would scatter through index tensors.
        With n = 1 it is a plain single-position write (loop_step unused)."""
        for src, dst in ((k, self.k), (v, self.v)):
            st = dst.stride()
            n, heads, _, d = src.shape
            view = dst.as_strided((n, heads, d), (loop_step * st[0] - st[4] if n > 1 else st[0], st[3], st[5]),
                                  dst.storage_offset() + first_loop * st[0] + layer * st[1] + row * st[2] + first_pos * st[4])
            view.copy_(src[:, :, 0])

    def read(self, loop: int, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot (loop, layer) for rows batch_idx (None = all; a slice reads a view), positions [0, kv_len): (B', Hkv, kv_len, D)."""
        k, v = self.k[loop, layer, :, :, :kv_len], self.v[loop, layer, :, :, :kv_len]
        if isinstance(batch_idx, slice):
            k, v = k[batch_idx], v[batch_idx]
        elif batch_idx is not None:
            k, v = k[batch_idx.view(-1)], v[batch_idx.view(-1)]
        return k, v

    def read_loops(self, loops: slice, layer: int, row: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (loop, layer) for a slice of loops of one cache row, as a view: (n_loops, Hkv, kv_len, D)."""
        return self.k[loops, layer, row, :, :kv_len], self.v[loops, layer, row, :, :kv_len]

    def read_per_token(self, loops, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token slots: loops/batch_idx broadcast to (B', S) -> (B'*S, Hkv, kv_len, D)."""
        loops, rows = torch.broadcast_tensors(loops, batch_idx)
        k = self.k[loops.reshape(-1), layer, rows.reshape(-1), :, :kv_len]
        v = self.v[loops.reshape(-1), layer, rows.reshape(-1), :, :kv_len]
        return k, v


SharedKV = Literal["last", "mean"]


class SharedKVCache(LoopKVCache):
    """One K/V per (layer, position) shared by every loop: a T-fold smaller cache (docs/design.md, "Shared KV"; Ouro's Table 14).

    Storage is (1, L, B, Hkv, max_len, D); `read(loop, ...)` ignores the loop. Semantics, exactly:

    * Positions computed in the current `forward_loops` call attend to each other per loop: at loop
      t a query sees the loop-t K/V of every position of the same call (each write overwrites the
      shared slot before the same layer reads it). A whole-prompt prefill is one call, so prefill
      computes with per-loop KV, exactly as the per-loop cache (sharing in prefill costs >10 GSM8K
      points); chunked prefill would share across chunks.
    * Positions from earlier calls are seen through one K/V per layer:
        - "last": the K/V of the last loop computed for that position (loop T-1 after full
          depth; the exit loop of an anytime token that skipped loops);
        - "mean": the running average over the loops computed for that position so far,
          mean(K_0, ..., K_t) after loop t (0-based), computed in float32 and stored in the
          cache dtype. Loops run in order from 0, so the loop index is the count: a write at loop
          0 starts a fresh average (a rejected draft's position is simply restarted), a call that
          resumes a position at loop t > 0 continues the stored average of loops 0..t-1.
      When a call ends (`commit`, called by forward_loops) its positions collapse to that value.
    For "mean" a call keeps its positions' running averages aside until commit, in float32:
    2 * L * B' * S * Hkv * D * 4 bytes (`pending_nbytes`), activation-sized; `nbytes` is the
    persistent storage, T-fold below the per-loop cache's.

    What decoders are exact against: full-depth decoding with this cache is the definition of
    "decoding with shared KV". Self-speculative decoding (spec/) is lossless against the per-loop
    cache only: with a shared cache a drafted token's loops 0..k-1 read the previous drafts' loop
    k-1 K/V where full-depth decoding would read their last (or averaged) loop, so its output is
    not token-for-token equal to full-depth decoding on the same shared cache. The anytime
    decoder's skip="shared" reads this cache and is exact against itself.
    """

    writes_diagonal = False  # a shared slot has no loop axis: writes go through `write`

    def __init__(self, cfg: LoopConfig, batch_size: int, max_len: int, *, kv: SharedKV = "last", dtype=torch.float32, device=None):
        if kv not in ("last", "mean"):
            raise ValueError(f"shared KV mode must be 'last' or 'mean', got {kv!r}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        shape = (1, cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_len = batch_size, max_len
        self.num_loops = cfg.total_ut_steps
        self.kv = kv
        self.shared = True
        self._pending: dict[int, tuple] = {}  # layer -> (rows, pos, mean_k, mean_v) of the current call

    @property
    def pending_nbytes(self) -> int:
        return sum(mk.nbytes + mv.nbytes for _, _, mk, mv in self._pending.values())

    def write(self, loop, layer: int, batch_idx, pos, k, v) -> None:
        """Stores loop `loop`'s k/v (B', Hkv, S, D) for rows batch_idx (B', 1) at positions pos (B', S)."""
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B', S, Hkv, D)
        if self.kv == "mean":
            prev = self._pending.get(layer)
            if prev is not None and prev[1] is not pos:
                self.commit()  # a call that ended without commit (e.g. raised): settle it first
                prev = None
            if prev is None:  # first loop of this call: continue the stored average of loops < loop
                base_k, base_v = self.k[0, layer, batch_idx, :, pos].float(), self.v[0, layer, batch_idx, :, pos].float()
            else:
                base_k, base_v = prev[2], prev[3]
            mk, mv = self._running_mean(base_k, kt, loop), self._running_mean(base_v, vt, loop)
            self._pending[layer] = (batch_idx, pos, mk, mv)
        self.k[0, layer, batch_idx, :, pos] = kt.to(self.k.dtype)
        self.v[0, layer, batch_idx, :, pos] = vt.to(self.v.dtype)

    @staticmethod
    def _running_mean(mean: torch.Tensor, x: torch.Tensor, loop) -> torch.Tensor:
        """Average over loops 0..loop given the average over loops 0..loop-1 (float32)."""
        x = x.float()
        if isinstance(loop, int):
            return x if loop == 0 else mean + (x - mean) / (loop + 1)
        t = loop[..., None, None].to(torch.float32)  # (B', S, 1, 1)
        return torch.where(t == 0, x, mean + (x - mean) / (t + 1))

    def commit(self) -> None:
        """Collapses the current call's positions to their shared value (a no-op for "last")."""
        for layer, (rows, pos, mk, mv) in self._pending.items():
            self.k[0, layer, rows, :, pos] = mk.to(self.k.dtype)
            self.v[0, layer, rows, :, pos] = mv.to(self.v.dtype)
        self._pending.clear()

    def read(self, loop: int, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared slot of `layer` (any loop) for rows batch_idx (None = all): (B', Hkv, kv_len, D)."""
        return super().read(0, layer, batch_idx, kv_len)

    def read_loops(self, loops: slice, layer: int, row: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every loop reads the shared slot: (n_loops, Hkv, kv_len, D), an expanded view."""
        n = len(range(*loops.indices(self.num_loops)))
        k, v = self.k[0, layer, row : row + 1, :, :kv_len], self.v[0, layer, row : row + 1, :, :kv_len]
        return k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)

    def read_per_token(self, loops, layer: int, batch_idx, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token reads (every loop reads the shared slot): (B'*S, Hkv, kv_len, D)."""
        return super().read_per_token(torch.zeros_like(loops), layer, batch_idx, kv_len)


KV_MODES = ("per_loop", "last", "mean")


def cache_factory(kv: str) -> Callable | None:
    """A DecodeRequest.cache_factory for KV mode `kv`: None (the per-loop cache) or a SharedKVCache builder.

    Args:
        kv: "per_loop" (exact, T*L slots per position), "last" or "mean" (one per layer; see SharedKVCache).
    """
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
    if kv == "per_loop":
        return None

    def build(model, batch_size: int, max_len: int) -> SharedKVCache:
        p = model.lm_head.weight
        return SharedKVCache(model.config, batch_size, max_len, kv=kv, dtype=p.dtype, device=p.device)

    build.kv = kv  # what the caches it builds hold, readable without building one
    return build
