"""The Ouro looped LM and its single entry point: a forward over a range of loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .attention import sdpa_attention
from .config import LoopConfig
from .layers import AttentionFn, DecoderLayer, RMSNorm, RotaryEmbedding

LogitsAt = Literal["all", "last"] | torch.Tensor | None


@dataclass
class LoopOutput:
    """What a loop-range forward computed. n = loops run in this call."""

    hidden: torch.Tensor  # (n, B, S, H) normed hidden state after each loop (= next loop's input)
    gates: torch.Tensor | None  # (n, B, S) float32 lambda_t = sigmoid(gate(h_t)); None if not asked for (Forward.gates)
    logits: torch.Tensor | None  # (n or 1, B, S', V) LM head at the requested positions and loops


class _SelfAttention:
    """Attention context of a no-cache forward: the call's own keys, causal by position."""

    def __init__(self, attn_fn, pos: torch.Tensor):
        self.attn_fn, self.pos = attn_fn, pos

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        return self.attn_fn(q, k, v, self.pos, self.pos)


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

    def loop_body(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        """One loop: the L shared layers and the norm Ouro applies after every loop.

        h (B, S, H) is the loop's input; `ctx.attend(q, k, v, layer)` supplies attention (the
        no-cache forward's causal self-attention, or the engine runner's paged-cache context).
        Returns the normed state (B, S, H): the loop's output and the next loop's input.
        """
        for layer_idx, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, ctx, layer_idx)
        return self.model.norm(h)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """The exit gate's lambda = sigmoid(gate(h)) in float32: (..., H) -> (...)."""
        return torch.sigmoid(self.model.early_exit_gate(h).float()).squeeze(-1)

    def forward_loops(
        self,
        h: torch.Tensor,
        input_pos: torch.Tensor,
        *,
        start_loop: int = 0,
        num_loops: int | None = None,
        logits: LogitsAt = None,
        logits_loops: Literal["last", "all"] = "last",
    ) -> LoopOutput:
        """Runs loops [start_loop, start_loop + num_loops) over positions that attend only to each
        other (no cache: causal by position). The engine's cached forward is looplm.runner.

        Args:
            h: (B, S, H) input of loop `start_loop`: the embeddings for loop 0, else the normed
                hidden state after the previous loop.
            input_pos: (B, S) or (S,) absolute positions.
            start_loop: 0-based loop of the first loop run.
            num_loops: how many loops to run (default: up to the last loop).
            logits: where to apply the LM head: None, "all" positions, the "last" position, or a
                (B,) tensor of per-row indices into S.
            logits_loops: apply it after the "last" loop run only, or after "all" of them.
        Returns:
            LoopOutput with hidden (n, B, S, H), gates (n, B, S), logits (n|1, B, S', V) or None.
        """
        T = self.num_loops
        B, S, _ = h.shape
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, -1)
        if input_pos.shape != (B, S):
            raise ValueError(f"input_pos shape {tuple(input_pos.shape)} does not match hidden states {(B, S)}")
        if num_loops is None:
            num_loops = T - start_loop
        if start_loop < 0 or num_loops < 1 or start_loop + num_loops > T:
            raise ValueError(f"loops [{start_loop}, {start_loop + num_loops}) are outside the model's {T} loops")
        cos, sin = self.rotary(input_pos, h.dtype)
        ctx = _SelfAttention(self.attention, input_pos)
        hiddens, gates, outs = [], [], []
        for i in range(num_loops):
            h = self.loop_body(h, cos, sin, ctx)
            hiddens.append(h)
            gates.append(self.gate(h))
            if logits is not None and (logits_loops == "all" or i == num_loops - 1):
                outs.append(self.lm_head(self._select(h, logits)))
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
