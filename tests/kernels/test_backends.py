"""Every attention backend against the float32 reference, on fresh random inputs."""

import math

import pytest
import torch

import kernels
from kernels import reference_attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _backend(name, device="cpu"):
    reason = kernels.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return kernels.get_backend(name, device)


def _inputs(n, hq, hkv, s, d, q_pos, skv, dtype, device="cpu", strided=True):
    """Random q/k/v; k/v are (by default) strided slices of a larger cache, as the model passes them."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q = torch.randn(n, s, hq, d, generator=g).transpose(1, 2)  # (N, Hq, S, D), non-contiguous
    if strided:
        cache = torch.randn(2, n, hkv, skv + 5, d, generator=g)
        k, v = cache[0, :, :, :skv], cache[1, :, :, :skv]
    else:
        k, v = torch.randn(n, hkv, skv, d, generator=g), torch.randn(n, hkv, skv, d, generator=g)
    q_pos = torch.as_tensor(q_pos).view(n, s)
    k_pos = torch.arange(skv).expand(n, -1)
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), v.to(**to), q_pos.to(device), k_pos.to(device)


# (name, N, S, Skv, q_pos per row): prefill, decode with ragged positions, verification
# (S drafted positions aligned bottom-right at different depths per row)
CASES = [
    ("prefill", 2, 13, 13, [list(range(13))] * 2),
    ("decode", 3, 1, 40, [[0], [17], [39]]),
    ("verify", 3, 4, 37, [[3, 4, 5, 6], [20, 21, 22, 23], [33, 34, 35, 36]]),
    ("long_decode", 2, 1, 300, [[130], [299]]),
]
HEADS = [("mha", 4, 4), ("gqa", 4, 2), ("mqa", 4, 1)]


def test_reference_matches_a_scalar_loop():
    q, k, v, q_pos, k_pos = _inputs(2, 4, 2, 3, 8, [[2, 3, 4], [5, 6, 7]], 8, torch.float32)
    out = reference_attention(q, k, v, q_pos, k_pos)
    for n in range(2):
        for h in range(4):
            for s in range(3):
                keys = [j for j in range(8) if k_pos[n, j] <= q_pos[n, s]]
                scores = [float(q[n, h, s].double() @ k[n, h // 2, j].double()) / math.sqrt(8) for j in keys]
                w = torch.tensor(scores, dtype=torch.float64).softmax(0)
                want = sum(w[i] * v[n, h // 2, j].double() for i, j in enumerate(keys))
                torch.testing.assert_close(out[n, h, s].double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", kernels.BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: h[0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_backend_matches_reference_float32(name, heads, case):
    fn = _backend(name)
    _, hq, hkv = heads
    _, n, s, skv, q_pos = case
    q, k, v, q_pos, k_pos = _inputs(n, hq, hkv, s, 16, q_pos, skv, torch.float32)
    out = fn(q, k, v, q_pos, k_pos)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference_attention(q, k, v, q_pos, k_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", kernels.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c[0])
def test_backend_matches_reference_low_precision(name, dtype, case):
    if name == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("triton: the interpreter gets bf16 wrong; bf16 is checked on the GPU (test_gpu_parity)")
    fn = _backend(name)
    _, n, s, skv, q_pos = case
    q, k, v, q_pos, k_pos = _inputs(n, 4, 2, s, 16, q_pos, skv, dtype)
    out = fn(q, k, v, q_pos, k_pos)
    assert out.dtype == dtype
    ref = reference_attention(q, k, v, q_pos, k_pos)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("name", kernels.BACKENDS)
def test_backend_matches_reference_per_token_rows(name):
    """Rows at different loops run as B*S single-query rows (the model's per-token path)."""
    fn = _backend(name)
    q, k, v, q_pos, k_pos = _inputs(5, 6, 3, 1, 32, [[7], [8], [9], [2], [3]], 12, torch.float32, strided=False)
    torch.testing.assert_close(fn(q, k, v, q_pos, k_pos), reference_attention(q, k, v, q_pos, k_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernels.BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_gpu_parity_bf16(name, case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fn = _backend(name, "cuda")
    _, n, s, skv, q_pos = case
    q, k, v, q_pos, k_pos = _inputs(n, 8, 2, s, 128, q_pos, skv, torch.bfloat16, device="cuda")
    out = fn(q, k, v, q_pos, k_pos)
    torch.testing.assert_close(out.float(), reference_attention(q, k, v, q_pos, k_pos).float(), atol=1.6e-2, rtol=1.6e-2)


def test_unknown_and_unavailable_backends_say_why():
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.select_backend("nope")
    for name in kernels.BACKENDS:
        reason = kernels.unavailable_reason(name, "cpu")
        if reason is not None:
            with pytest.raises(RuntimeError, match="unavailable"):
                kernels.get_backend(name, "cpu")
    assert {"reference", "sdpa"} <= set(kernels.available_backends("cpu"))
    if not torch.cuda.is_available():
        assert kernels.unavailable_reason("flash_attn", "cpu") is not None
        assert kernels.select_backend("auto", "cpu") is kernels.get_backend("sdpa")
