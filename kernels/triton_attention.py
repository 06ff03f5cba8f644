"""A Triton attention kernel for decode and verification over the loop-indexed static cache.

One program handles one (row, key/value head) pair and a block of its queries: all G = Hq / Hkv
query heads that share the key/value head, times the S query positions (G * S rows, which is
what makes a GQA decode step a matrix product instead of G vector products). It streams the keys
in blocks with an online softmax, skips key blocks no query in the block can see (so a decode
step over a long static cache reads only the prefix up to its position), and loads everything
as float32 (the accumulators are float32 too; the output is cast back to q's dtype).

The kernel is exposed as the custom op `looplm::triton_attention` (torch.library.custom_op), so a
model using it compiles with torch.compile (the op is opaque to the compiler, with a fake
implementation for shapes). On a CPU it runs only under `TRITON_INTERPRET=1` (set before this
module is imported), which the tests use in float32 and float16 (the interpreter gets bf16 wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def triton_unavailable(device=None) -> str | None:
    """None when the kernel can run on `device` (CUDA, or any tensor under TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _INTERPRETED:
        return None
    if not torch.cuda.is_available():
        return "triton needs a CUDA device, or TRITON_INTERPRET=1 set before kernels.triton_attention is imported"
    if device is not None and torch.device(device).type != "cuda":
        return f"triton without TRITON_INTERPRET=1 needs CUDA tensors, got {device}"
    return None


@triton.jit
def _attention_kernel(
    Q, K, V, QP, KP, O,
    sq_n, sq_h, sq_s, sq_d,
    sk_n, sk_h, sk_s, sk_d,
    sv_n, sv_h, sv_s, sv_d,
    so_n, so_h, so_s, so_d,
    sqp_n, sqp_s, skp_n, skp_s,
    S, SKV, D, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this block: (s, g) pairs
    s = r // G
    hq = kvh * G + r % G
    rmask = s < S
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        Q + n * sq_n + hq[:, None] * sq_h + s[:, None] * sq_s + d[None, :] * sq_d,
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_M, BLOCK_D)  # fmt: skip
    qp = tl.load(QP + n * sqp_n + s * sqp_s, mask=rmask, other=-1)  # padded rows see nothing
    qp_max = tl.max(qp, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, SKV, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jmask = j < SKV
        kp = tl.load(KP + n * skp_n + j * skp_s, mask=jmask, other=0)
        kp_min = tl.min(tl.where(jmask, kp, qp_max + 1), 0)
        if kp_min <= qp_max:  # some query in the block sees some key in this block
            kv_mask = jmask[:, None] & dmask[None, :]
            k = tl.load(K + n * sk_n + kvh * sk_h + j[:, None] * sk_s + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            v = tl.load(V + n * sv_n + kvh * sv_h + j[:, None] * sv_s + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
            visible = (kp[None, :] <= qp[:, None]) & jmask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.where(visible, tl.exp(qk - m_safe[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query with no visible key gets zeros
    tl.store(
        O + n * so_n + hq[:, None] * so_h + s[:, None] * so_s + d[None, :] * so_d,
        out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
    )  # fmt: skip


_INTERPRETED = not isinstance(_attention_kernel, triton.runtime.JITFunction)


@torch.library.custom_op("looplm::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Attention over a static cache by the Triton kernel (contract: looplm.attention.sdpa_attention).

    Key j is visible to query s of row n iff k_pos[n, j] <= q_pos[n, s] (bottom-right causal for
    a static cache); query head h reads key/value head h // (Hq // Hkv).

    Args:
        q: (N, Hq, S, D) queries (any strides).
        k, v: (N, Hkv, Skv, D) keys/values, e.g. a slice of the cache (any strides).
        q_pos: (N, S) integer positions of the queries.
        k_pos: (N, Skv) integer positions of the keys.
    Returns:
        (N, Hq, S, D) contiguous, in q's dtype.
    """
    N, Hq, S, D = q.shape
    Hkv, skv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    g = Hq // Hkv
    out = torch.empty((N, Hq, S, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_m = min(64, max(16, triton.next_power_of_2(S * g)))
    block_d = max(16, triton.next_power_of_2(D))
    grid = (N, Hkv, triton.cdiv(S * g, block_m))
    _attention_kernel[grid](
        q, k, v, q_pos, k_pos, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *q_pos.stride(), *k_pos.stride(),
        S, skv, D, D**-0.5,
        G=g, BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d,
    )  # fmt: skip
    return out


@triton_attention.register_fake
def _(q, k, v, q_pos, k_pos):
    return q.new_empty(q.shape)
