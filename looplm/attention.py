"""The attention contract every backend implements, and the default (PyTorch SDPA) backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal visibility by absolute position: key j is visible to query s iff k_pos[j] <= q_pos[s].

    q_pos (N, S), k_pos (N, Skv) -> bool (N, 1, S, Skv).
    """
    return (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]


def sdpa_attention(q, k, v, q_pos, k_pos) -> torch.Tensor:
    """Softmax attention with GQA and a position-based causal mask.

    Args:
        q: (N, Hq, S, D) queries.
        k, v: (N, Hkv, Skv, D) keys/values; Hq must be a multiple of Hkv.
        q_pos: (N, S) absolute position of each query.
        k_pos: (N, Skv) absolute position of each key. With a static cache this is arange(Skv):
            queries then see the cache prefix up to and including their own position, which
            aligns the causal mask to the bottom-right for multi-token verification.
    Returns:
        (N, Hq, S, D) in q's dtype.
    """
    mask = visibility_mask(q_pos, k_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
