"""The reference attention: plain matmul + softmax in float32, the oracle for every backend."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, q_pos, k_pos) -> torch.Tensor:
    """Softmax attention by the book, computed in float32 (contract: looplm.attention.sdpa_attention).

    Query s of row n attends to key j iff k_pos[n, j] <= q_pos[n, s]; with a static cache
    (k_pos = arange(Skv)) this is the causal mask aligned to the bottom-right corner. Query
    head h reads key/value head h // (Hq // Hkv) (grouped-query attention). A query that sees no
    key gets zeros.

    Args:
        q: (N, Hq, S, D) queries.
        k, v: (N, Hkv, Skv, D) keys/values; Hq must be a multiple of Hkv.
        q_pos: (N, S) absolute position of each query.
        k_pos: (N, Skv) absolute position of each key.
    Returns:
        (N, Hq, S, D) in q's dtype.
    """
    N, Hq, S, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    g = Hq // Hkv
    kf = k.float().repeat_interleave(g, dim=1)  # (N, Hq, Skv, D)
    vf = v.float().repeat_interleave(g, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) / D**0.5  # (N, Hq, S, Skv)
    visible = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]).expand_as(scores)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(-1).masked_fill(~visible, 0.0)  # a row with no visible key: NaN -> 0
    return (probs @ vf).to(q.dtype)
