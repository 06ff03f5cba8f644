"""Attention backends other than the reference and Triton: PyTorch SDPA, flash-attn, xformers.

Every backend implements the contract of `looplm.attention.sdpa_attention`:
`fn(q (N, Hq, S, D), k (N, Hkv, Skv, D), v, q_pos (N, S), k_pos (N, Skv)) -> (N, Hq, S, D)`.
flash-attn and xformers are optional extras, detected at run time and never required.
"""

from __future__ import annotations

import importlib.util

import torch

from looplm.attention import sdpa_attention, visibility_mask

__all__ = ["sdpa_attention", "flash_attention", "xformers_attention", "flash_unavailable", "xformers_unavailable"]


def _cuda_reason(device) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if device is not None and torch.device(device).type != "cuda":
        return f"needs a CUDA device, got {device}"
    return None


def flash_unavailable(device=None) -> str | None:
    """None when flash-attn can run on `device`, else the reason it cannot."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install flash-attn)"
    return _cuda_reason(device)


def xformers_unavailable(device=None) -> str | None:
    """None when xformers can run on `device`, else the reason it cannot."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install xformers)"
    return _cuda_reason(device)


def flash_attention(q, k, v, q_pos, k_pos) -> torch.Tensor:
    """`flash_attn_with_kvcache` over a static cache (same contract as sdpa_attention).

    flash-attn masks by length, not by position, so this assumes the layouts the model uses:
    each row's keys at consecutive positions k_pos[n, 0] + arange(Skv) (the static cache:
    k_pos[n, 0] = 0; a no-cache forward: the queries' own positions) and its queries at
    consecutive positions ending at q_pos[n, -1]. Then `cache_seqlens = q_pos[:, -1] + 1 - k_pos[:, 0]`
    with `causal=True` (flash-attn aligns the causal mask to the bottom-right) gives exactly
    "key j visible iff k_pos[n, j] <= q_pos[n, s]", with no host sync. float32 inputs (which
    flash-attn does not take) go to SDPA.
    """
    if q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, q_pos, k_pos)
    from flash_attn import flash_attn_with_kvcache

    seqlens = (q_pos[:, -1] + 1 - k_pos[:, 0]).to(torch.int32)
    out = flash_attn_with_kvcache(
        q.transpose(1, 2),  # (N, S, Hq, D)
        k.transpose(1, 2),  # (N, Skv, Hkv, D), last dim contiguous as flash-attn requires
        v.transpose(1, 2),
        cache_seqlens=seqlens,
        causal=True,
    )
    return out.transpose(1, 2)


def xformers_attention(q, k, v, q_pos, k_pos) -> torch.Tensor:
    """xformers' memory-efficient attention with the position mask as an additive bias.

    Same contract as sdpa_attention; key/value heads are expanded for GQA.
    """
    import xformers.ops as xops

    N, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    skv = k.shape[2]
    # xformers wants the bias's last dim stored with a multiple-of-8 stride: allocate padded, slice
    padded = (skv + 7) // 8 * 8
    bias = torch.zeros(N, Hq, S, padded, dtype=q.dtype, device=q.device)[..., :skv]
    bias.masked_fill_(~visibility_mask(q_pos, k_pos).expand(N, Hq, S, skv), float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=D**-0.5
    )
    return out.transpose(1, 2)
