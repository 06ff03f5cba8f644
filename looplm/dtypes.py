"""Which dtype a checkpoint loads in when the caller does not say.

On a GPU: the config's `torch_dtype`. On the CPU, decoding at batch 1 reads every weight once per
loop, so its speed is the rate at which a matrix-vector product streams weights from memory:
bfloat16 halves the bytes, but only pays where the CPU computes it natively (AMX-BF16 or
AVX512-BF16). Without those instructions PyTorch's bf16 matrix-vector product converts in
software and reads about as many *parameters* per second as float32 does (measured on an AVX2
AMD EPYC, 1 thread: 20.8 GB/s float32, 10.4 GB/s bf16, i.e. 5.2 G params/s each), so there a
large model decodes no faster in bf16 (random Ouro-1.4B shape: 0.93x-1.26x float32 tokens/s under
heavy load) while every logit is rounded. A small model is not bandwidth-bound at all; the bundled
2.6M-parameter model decodes 1.11x faster in bf16 on that CPU (median of 30 paired rounds, load
average 7-9), not enough to give up float32's exact outputs (16 of its 32 greedy tokens differed
from float32's in the bandwidth benchmark). So bf16 is the default only where it is native and the model large
enough to be bandwidth-bound; the size threshold is an estimate (a server CPU's last-level cache
is tens of MiB), not measured on a native-bf16 CPU.

The rule (`default_dtype`): bfloat16 on the CPU when the config says bfloat16, the CPU has native
bf16, and the weights exceed `BF16_MIN_BYTES` in bf16; float32 otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .config import LoopConfig, resolve_dtype

# bf16 weights below this fit in a server CPU's last-level cache (tens of MiB): not bandwidth-bound
BF16_MIN_BYTES = 256 * 2**20
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_native() -> bool:
    """True when the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo)."""
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def cpu_bf16_reason() -> str:
    """Why bf16 is or is not native here, for logs and benchmark reports."""
    have = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    cap = torch.backends.cpu.get_cpu_capability()
    if have:
        return f"native bf16: {', '.join(have)} (torch CPU capability {cap})"
    return f"no native bf16 ({' / '.join(NATIVE_BF16_FLAGS)} absent from /proc/cpuinfo; torch CPU capability {cap})"


def weight_bytes(cfg: LoopConfig, bytes_per_param: int = 2) -> int:
    """Bytes of the checkpoint's parameters (untied head counted once) at `bytes_per_param`."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = H * (q + 2 * kv) + q * H + 3 * H * I + 4 * H
    params = cfg.num_hidden_layers * layer + V * H * (1 if cfg.tie_word_embeddings else 2) + H + (H + 1)
    return params * bytes_per_param


def default_dtype(cfg: LoopConfig, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype `looplm.load` uses for `cfg` on `device` when none is given (rule: module docstring)."""
    want = resolve_dtype(cfg.torch_dtype)
    if torch.device(device).type != "cpu":
        return want
    if want == torch.bfloat16 and cpu_bf16_native() and weight_bytes(cfg) >= BF16_MIN_BYTES:
        return torch.bfloat16
    return torch.float32
