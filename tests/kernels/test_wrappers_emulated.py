"""The flash-attn and xformers wrappers' layout and masking logic, on the CPU, against stand-ins that
implement those libraries' documented semantics (the real kernels are checked in test_backends on a GPU)."""

import sys
import types

import pytest
import torch

from kernels import reference_attention
from kernels.backends import flash_attention, xformers_attention


def _fake_flash_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, causal=False):
    """flash_attn_with_kvcache semantics: (B, S, H, D) layout, keys [0, seqlen), causal bottom-right."""
    B, S, H, D = q.shape
    skv, hkv = k_cache.shape[1], k_cache.shape[2]
    j = torch.arange(skv)[None, None, :]
    i = torch.arange(S)[None, :, None]
    seqlen = cache_seqlens.long()[:, None, None]
    visible = (j < seqlen) & (~torch.tensor(causal) | (j <= i + seqlen - S))  # (B, S, Skv)
    k = k_cache.float().repeat_interleave(H // hkv, dim=2)
    v = v_cache.float().repeat_interleave(H // hkv, dim=2)
    scores = torch.einsum("bshd,bjhd->bhsj", q.float(), k) / D**0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhsj,bjhd->bshd", scores.softmax(-1), v).to(q.dtype)


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
    """xformers semantics: (B, M, H, K) layout, softmax(q k^T * scale + bias) v."""
    scores = torch.einsum("bmhk,bnhk->bhmn", q.float(), k.float()) * scale + attn_bias.float()
    return torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v.float()).to(q.dtype)


@pytest.fixture
def fake_libs(monkeypatch):
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_with_kvcache = _fake_flash_with_kvcache
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    xformers.ops = ops
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


CASES = [  # (q_pos per row, Skv, k_pos start): cache prefill, ragged decode, verify, no-cache window
    ([[0, 1, 2, 3, 4]] * 2, 5, 0),
    ([[3], [11]], 12, 0),
    ([[4, 5, 6], [9, 10, 11]], 12, 0),
    ([[5, 6, 7, 8]] * 2, 4, 5),  # a no-cache forward over positions 5..8: keys are the queries
]


@pytest.mark.parametrize("case", CASES, ids=["prefill", "decode", "verify", "nocache_window"])
@pytest.mark.parametrize("fn", [flash_attention, xformers_attention], ids=["flash_attn", "xformers"])
def test_wrapper_masks_like_the_reference(fake_libs, fn, case):
    q_pos, skv, k0 = case
    q_pos = torch.tensor(q_pos)
    n, s = q_pos.shape
    k_pos = (k0 + torch.arange(skv)).expand(n, -1)
    q = torch.randn(n, 4, s, 16, dtype=torch.float16)
    k, v = torch.randn(n, 2, skv, 16, dtype=torch.float16), torch.randn(n, 2, skv, 16, dtype=torch.float16)
    out = fn(q, k, v, q_pos, k_pos)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), reference_attention(q, k, v, q_pos, k_pos).float(), atol=2e-3, rtol=2e-3)
