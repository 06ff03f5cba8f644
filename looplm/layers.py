"""Building blocks of the Ouro layer: RMSNorm, RoPE, attention and the SwiGLU MLP."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoopConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 inside, cast back *before* the weight multiply (as the published Qwen2/Ouro code)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE; cos/sin depend only on the position, so every loop reuses them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (B, S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D); cos/sin (B, S, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class MLP(nn.Module):
    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # (2I, H) [gate; up] in one matrix, set by looplm.fuse (not saved: the checkpoint keeps its names)
        self.register_buffer("gate_up", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:  # one matrix-vector product instead of two
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# (q, k, v, q_pos, k_pos) -> out; see looplm.attention.sdpa_attention for the exact contract.
AttentionFn = Callable[..., torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        # ((nh + 2 nkv) hd, H) [q; k; v] in one matrix, set by looplm.fuse (not saved)
        self.register_buffer("qkv", None, persistent=False)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, H) -> q (B, nh, S, hd), k and v (B, nkv, S, hd), RoPE applied to q and k."""
        B, S, _ = x.shape
        if self.qkv is not None:  # one matrix-vector product instead of three
            nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = F.linear(x, self.qkv).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = k.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, nh, S, hd) -> (B, S, H)."""
        B, _, S, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def forward(self, x, cos, sin, ctx, layer: int) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.output(ctx.attend(q, k, v, layer))  # attend: (B, nh, S, hd)


class DecoderLayer(nn.Module):
    """The Ouro "sandwich" layer: a norm before and after both attention and the MLP."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # The layer in two halves around the cache access, so a fast path can compile each half once
    # for every layer and loop (kernels.fast_step.compile_layers) and leave attention to the backend.
    def before_attention(self, h, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project(self.input_layernorm(h), cos, sin)

    def after_attention(self, h, attn_out) -> torch.Tensor:
        h = h + self.input_layernorm_2(self.self_attn.output(attn_out))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))

    def forward(self, h, cos, sin, ctx, layer: int) -> torch.Tensor:
        q, k, v = self.before_attention(h, cos, sin)
        return self.after_attention(h, ctx.attend(q, k, v, layer))
