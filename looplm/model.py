"""The Ouro looped LM and its single entry point: a forward over a range of loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .attention import sdpa_attention
from .cache import LoopKVCache
from .config import LoopConfig
from .layers import AttentionFn, DecoderLayer, RMSNorm, RotaryEmbedding

LogitsAt = Literal["all", "last"] | torch.Tensor | None


@dataclass
class LoopOutput:
    """What a loop-range forward computed. n = loops run in this call."""

    hidden: torch.Tensor  # (n, B, S, H) normed hidden state after each loop (= next loop's input)
    gates: torch.Tensor  # (n, B, S) float32 lambda_t = sigmoid(gate(h_t))
    logits: torch.Tensor | None  # (n or 1, B, S', V) LM head at the requested positions and loops


class _LoopStep:
    """Attention context of one forward call: where its K/V go and what it reads.

    Built once per call (not per loop or layer): the index tensors every layer needs (cache rows,
    key positions, per-token query positions) are made here once; `loop` is advanced per loop.
    """

    def __init__(self, attn_fn, cache, pos, batch_idx, kv_len, groups=None):
        self.attn_fn, self.cache, self.pos, self.kv_len = attn_fn, cache, pos, kv_len
        self.loop = 0
        self.step = 0  # loops run so far in this call (loop = start_loop + step)
        self.groups = groups  # rows at different loops, grouped by start loop (see LoopLM._loop_groups)
        # every group one row, in call order (the pipelined and anytime decoders' usual case)
        self.one_row_groups = groups is not None and [g[0] for g in groups] == [slice(i, i + 1) for i in range(len(groups))]
        self.strided = None  # (first loop, loop step, rows, cache row) when the rows are one cache
        self.diagonal = None  # (first loop or None = self.loop, loop step, cache row, first position) for cache.write_diagonal
        if self.one_row_groups and len(groups) > 1:  # row at evenly spaced loops
            # a one-row group's cache rows are always a one-row slice (LoopLM._loop_groups)
            starts, rows = [g[2] for g in groups], {g[1].start for g in groups}
            d = starts[1] - starts[0]
            if d > 0 and len(rows) == 1 and starts == list(range(starts[0], starts[0] + d * len(starts), d)):
                self.strided = (starts[0], d, len(starts), rows.pop())
                positions = pos[:, 0].tolist() if cache.writes_diagonal and not torch.compiler.is_compiling() else None
                if positions and positions == list(range(positions[0], positions[0] - len(positions), -1)):
                    self.diagonal = (starts[0], d, self.strided[3], positions[0])  # the pipeline's usual call
        elif (groups is None and cache is not None and pos.numel() == 1 and pos.device.type == "cpu"
              and cache.writes_diagonal and not torch.compiler.is_compiling()):
            # one token at one loop per step (batch-1 decoding): a plain write, no index tensors (on
            # the CPU, where reading the position costs no device sync)
            row = 0 if batch_idx is None else int(batch_idx.view(-1)[0])
            self.diagonal = (None, 1, row, int(pos.view(-1)[0]))
        if cache is None:
            return
        B, S = pos.shape
        self.batch_idx = batch_idx  # (B, 1) or None (= all rows, read without a gather)
        self.rows = batch_idx if batch_idx is not None else torch.arange(B, device=pos.device)[:, None]
        self.k_pos = torch.arange(kv_len, device=pos.device).expand(B, -1)  # static cache: key j at position j
        self.flat_pos = pos.reshape(B * S, 1)  # per-token path: every query its own row
        self.flat_k_pos = self.k_pos[:1].expand(B * S, -1)

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        if self.cache is None:  # no-cache forward: the call's own keys, causal by position
            return self.attn_fn(q, k, v, self.pos, self.pos)
        if self.diagonal is not None:
            lo, d, row, p0 = self.diagonal
            self.cache.write_diagonal(self.loop if lo is None else lo + self.step, d, layer, row, p0, k, v)
        else:
            self.cache.write(self.loop, layer, self.rows, self.pos, k, v)
        if isinstance(self.loop, int):
            ck, cv = self.cache.read(self.loop, layer, self.batch_idx, self.kv_len)
            return self.attn_fn(q, ck, cv, self.pos, self.k_pos)
        if self.strided is not None:  # one row per loop lo, lo+d, ...: a strided view of the cache
            lo, d, n, row = self.strided
            ck, cv = self.cache.read_loops(slice(lo + self.step, lo + self.step + d * (n - 1) + 1, d), layer, row, self.kv_len)
            return self.attn_fn(q, ck, cv, self.pos, self.k_pos)
        if self.groups is not None:  # one plain read per group of rows at the same loop, no gather
            reads = [self.cache.read(start + self.step, layer, rows, self.kv_len) for _, rows, start, _ in self.groups]
            if self.one_row_groups:  # rows in call order: concatenate the reads, attend once
                ck, cv = torch.cat([r[0] for r in reads]), torch.cat([r[1] for r in reads])
                return self.attn_fn(q, ck, cv, self.pos, self.k_pos)
            out = torch.empty_like(q)
            for (sel, _, _, n), (ck, cv) in zip(self.groups, reads):
                if ck.shape[0] != n:  # several rows of one cache row
                    ck, cv = ck.expand(n, -1, -1, -1), cv.expand(n, -1, -1, -1)
                out[sel] = self.attn_fn(q[sel], ck, cv, self.pos[sel], self.k_pos[sel])
            return out
        # rows at different loops: every query reads its own loop's slot
        B, Hq, S, D = q.shape
        ck, cv = self.cache.read_per_token(self.loop, layer, self.rows, self.kv_len)
        q1 = q.transpose(1, 2).reshape(B * S, Hq, 1, D)
        out = self.attn_fn(q1, ck, cv, self.flat_pos, self.flat_k_pos)
        return out.reshape(B, S, Hq, D).transpose(1, 2)


class OuroModel(nn.Module):
    """The `model.` prefix of the published state dict."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.early_exit_gate = nn.Linear(cfg.hidden_size, 1)


class LoopLM(nn.Module):
    """Ouro's OuroForCausalLM: L shared layers run T times, the final norm and one LM head after every loop."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.config = cfg
        self.model = OuroModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.attention: AttentionFn = sdpa_attention  # swap in a kernels/ backend with set_attention
        self.token_loops = 0  # (token, loop) pairs computed so far: the unit of decode work

    @property
    def num_loops(self) -> int:
        return self.config.total_ut_steps

    def set_attention(self, fn: AttentionFn) -> None:
        """Uses `fn(q, k, v, q_pos, k_pos)` (contract: looplm.attention.sdpa_attention) for attention."""
        self.attention = fn

    def reset_buffers(self, device=None) -> None:
        """Recomputes the non-persistent RoPE buffer (needed after building on the meta device)."""
        self.rotary = RotaryEmbedding(self.config.head_dim, self.config.rope_theta).to(device)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "LoopLM":
        """Random initialisation for training from scratch (deterministic for a seed)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The shared LM head on hidden states a loop returned (LoopOutput.hidden): (..., H) -> (..., V)."""
        return self.lm_head(h)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, H); raises on ids outside the vocabulary."""
        # the check reads values (a host sync, a graph break): compiled code skips it
        if not torch.compiler.is_compiling() and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got min {int(input_ids.min())}, max {int(input_ids.max())}"
            )
        return self.model.embed_tokens(input_ids)

    def forward_loops(
        self,
        h: torch.Tensor,
        input_pos: torch.Tensor,
        cache: LoopKVCache | None = None,
        *,
        start_loop: int | torch.Tensor = 0,
        num_loops: int | None = None,
        batch_idx: torch.Tensor | None = None,
        logits: LogitsAt = None,
        logits_loops: Literal["last", "all"] = "last",
        kv_len: int | None = None,
    ) -> LoopOutput:
        """Runs loops [start_loop, start_loop + num_loops) of the layer stack over some positions.

        Args:
            h: (B, S, H) input of loop `start_loop`: the embeddings for loop 0, else the normed
                hidden state after the previous loop (e.g. a draft's saved loop-k state).
            input_pos: (B, S) absolute positions (ragged rows allowed); every loop uses them.
            cache: KV cache to write slot (loop, layer) at these positions and read from; None
                runs a no-cache forward whose keys are just these positions (causal by position).
            start_loop: 0-based loop of the first loop run; an int, or a (B, S) tensor when rows
                are at different loops (each row then reads and writes its own loop's slot).
            num_loops: how many loops to run (default: up to the last loop; required for tensors).
            batch_idx: (B,) cache rows these B rows belong to (default 0..B-1).
            logits: where to apply the LM head: None, "all" positions, the "last" position, or a
                (B,) tensor of per-row indices into S.
            logits_loops: apply it after the "last" loop run only, or after "all" of them.
            kv_len: cache prefix to attend over (default max(input_pos) + 1).
        Returns:
            LoopOutput with hidden (n, B, S, H), gates (n, B, S), logits (n|1, B, S', V) or None.
        """
        T = self.num_loops
        B, S, _ = h.shape
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, -1)
        if input_pos.shape != (B, S):
            raise ValueError(f"input_pos shape {tuple(input_pos.shape)} does not match hidden states {(B, S)}")
        if isinstance(start_loop, torch.Tensor):
            if num_loops is None:
                raise ValueError("num_loops is required when start_loop is a tensor")
            start_loop = start_loop.expand(B, S)
            starts = start_loop[:, 0].tolist() if S == 1 else None  # one transfer serves the range check and the groups
            lo, hi = (min(starts), max(starts)) if starts else (int(start_loop.min()), int(start_loop.max()))
            if lo == hi:  # a uniform tensor takes the fast path
                start_loop = lo
        else:
            lo = hi = start_loop
        if num_loops is None:
            num_loops = T - start_loop
        if lo < 0 or num_loops < 1 or hi + num_loops > T:
            raise ValueError(f"loops [{lo}, {hi + num_loops}) are outside the model's {T} loops")
        if cache is None and not isinstance(start_loop, int):
            raise ValueError("rows at different loops need a cache")
        if cache is not None:
            kv_len = int(input_pos.max()) + 1 if kv_len is None else kv_len
            if kv_len > cache.max_len:
                raise ValueError(f"position {kv_len - 1} is beyond the cache's max_len {cache.max_len}")
        if batch_idx is not None:
            batch_idx = batch_idx.view(B, 1)
        groups = None
        if cache is not None and not isinstance(start_loop, int) and S == 1:
            groups = self._loop_groups(starts, batch_idx, h.device)
        out = self._run_loops(h, input_pos, cache, start_loop, num_loops, batch_idx, logits, logits_loops, kv_len, groups)
        if not torch.compiler.is_compiling():  # a mutated int attribute would force a recompile per call
            self.token_loops += B * S * num_loops
        return out

    @staticmethod
    def _loop_groups(starts: list[int], batch_idx: torch.Tensor | None, device) -> list[tuple]:
        """Rows (one position each) grouped by start loop, so each group reads its loop's cache
        slot with one plain read instead of a per-token gather: [(rows of the call (slice or
        index tensor), cache rows to read (slice or (n, 1) tensor), start loop, n)]."""
        cache_rows = list(range(len(starts))) if batch_idx is None else batch_idx.view(-1).tolist()
        by_start: dict[int, list[int]] = {}
        for i, s in enumerate(starts):
            by_start.setdefault(s, []).append(i)
        groups = []
        for s, idx in by_start.items():
            n = len(idx)
            sel = slice(idx[0], idx[0] + n) if idx == list(range(idx[0], idx[0] + n)) else torch.tensor(idx, device=device)
            mine = [cache_rows[i] for i in idx]
            if len(set(mine)) == 1:
                rows = slice(mine[0], mine[0] + 1)
            elif mine == list(range(mine[0], mine[0] + n)):
                rows = slice(mine[0], mine[0] + n)
            else:
                rows = torch.tensor(mine, device=device)[:, None]
            groups.append((sel, rows, s, n))
        return groups

    def _run_loops(self, h, input_pos, cache, start_loop, num_loops, batch_idx, logits, logits_loops, kv_len,
                   groups=None) -> LoopOutput:
        """forward_loops after validation (batch_idx (B, 1), kv_len set): no host syncs, no counters.

        This is the part a compiled fixed-shape step traces (kernels.fast_step).
        """
        cos, sin = self.rotary(input_pos, h.dtype)
        hiddens, gates, outs = [], [], []
        ctx = _LoopStep(self.attention, cache, input_pos, batch_idx, kv_len, groups)
        for i in range(num_loops):
            ctx.loop = start_loop + i
            ctx.step = i
            for layer_idx, layer in enumerate(self.model.layers):
                h = layer(h, cos, sin, ctx, layer_idx)
            h = self.model.norm(h)  # Ouro norms after every loop: output of loop t, input of loop t+1
            hiddens.append(h)
            gates.append(torch.sigmoid(self.model.early_exit_gate(h).float()).squeeze(-1))
            if logits is not None and (logits_loops == "all" or i == num_loops - 1):
                outs.append(self.lm_head(self._select(h, logits)))
        if cache is not None:
            cache.commit()  # a shared-KV cache collapses this call's positions (a no-op per loop)
        return LoopOutput(torch.stack(hiddens), torch.stack(gates), torch.stack(outs) if outs else None)

    @staticmethod
    def _select(h: torch.Tensor, where: LogitsAt) -> torch.Tensor:
        if isinstance(where, torch.Tensor):
            return h[torch.arange(h.shape[0], device=h.device), where][:, None]  # (B, 1, H)
        if where == "last":
            return h[:, -1:]
        if where == "all":
            return h
        raise ValueError(f"logits must be None, 'all', 'last' or a (B,) index tensor, got {where!r}")

    def loop_outputs(self, input_ids: torch.Tensor) -> LoopOutput:
        """No-cache forward of all T loops over (B, S) ids with logits everywhere (differentiable)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.forward_loops(self.embed(input_ids), pos, logits="all", logits_loops="all")

    def per_loop_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (T, B, S, V): the shared head's logits after every loop, no cache."""
        return self.loop_outputs(input_ids).logits

    def per_loop_gates(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (T, B, S): the exit gate's lambda after every loop, no cache."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.forward_loops(self.embed(input_ids), pos).gates

    def new_cache(self, batch_size: int, max_len: int) -> LoopKVCache:
        p = self.lm_head.weight
        return LoopKVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)
