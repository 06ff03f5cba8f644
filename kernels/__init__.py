"""Attention backends over the loop-indexed cache, and a fast (compiled) decode step.

Every backend is a function `fn(q, k, v, q_pos, k_pos)` with the contract of
`looplm.attention.sdpa_attention`; a model uses one through `model.set_attention(fn)`:

    import kernels
    kernels.use(engine, "auto")          # or "reference", "sdpa", "flash_attn", "xformers", "triton"

Backends:
    reference   float32 matmul + softmax (kernels.reference): the oracle of every test.
    sdpa        torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient
                kernels on GPU): the default everywhere.
    flash_attn  flash_attn_with_kvcache, when flash-attn is installed and the model is on CUDA.
    xformers    xformers.ops.memory_efficient_attention, when installed and on CUDA.
    triton      the project's decode/verify kernel (kernels.triton_attention), on CUDA or on any
                device under TRITON_INTERPRET=1 (set it before the first use).
"auto" picks flash_attn on CUDA when it is installed, else sdpa; the Triton kernel is chosen
only by name (it has not been measured against SDPA on a GPU yet).

Fast steps (kernels.fast_step): `FixedStep(model, cache, rows, ctx)` is the engine runner's
fixed-shape full-depth decode step, one per (rows, context) bucket, kept by the runner; the facade
runs it with `Engine.generate(..., step="fixed"|"compiled")` in mode "full" and in mode "anytime"
with finish="ahead" (every decode token through all T loops in one forward); `compile_layers(model)` compiles the layer halves for every forward call, so the speculative
verify and the anytime decoder's calls get them too (one graph per distinct (batch, positions)
shape: batch sizes and draft lengths are the buckets).
"""

from __future__ import annotations

import importlib.util

import torch

from looplm.layers import AttentionFn

from .backends import flash_attention, flash_unavailable, sdpa_attention, xformers_attention, xformers_unavailable
from .fast_step import FixedStep, compile_layers, uncompile_layers
from .reference import reference_attention

BACKENDS = ("reference", "sdpa", "flash_attn", "xformers", "triton")

__all__ = ["BACKENDS", "FixedStep", "available_backends", "compile_layers", "uncompile_layers", "get_backend", "reference_attention", "select_backend", "unavailable_reason", "use"]


def unavailable_reason(name: str, device=None) -> str | None:
    """None when backend `name` can run on `device` (default: wherever it can run), else why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if name in ("reference", "sdpa"):
        return None
    if name == "flash_attn":
        return flash_unavailable(device)
    if name == "xformers":
        return xformers_unavailable(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or the project's [triton] extra)"
    try:
        from .triton_attention import triton_unavailable
    except Exception as e:  # an installed triton that cannot load (no matching backend, ABI mismatch)
        return f"triton cannot be imported: {type(e).__name__}: {e}"
    return triton_unavailable(device)


def available_backends(device=None) -> list[str]:
    """Names of the backends that can run on `device`."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def get_backend(name: str, device=None) -> AttentionFn:
    """The attention function of backend `name`; raises RuntimeError with the reason if it cannot run."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} is unavailable: {reason}")
    if name == "reference":
        return reference_attention
    if name == "sdpa":
        return sdpa_attention
    if name == "flash_attn":
        return flash_attention
    if name == "xformers":
        return xformers_attention
    from .triton_attention import triton_attention

    return triton_attention


def select_backend(name: str = "auto", device=None) -> AttentionFn:
    """Backend `name`, or for "auto" the best one available on `device` (flash_attn on CUDA, else sdpa)."""
    if name != "auto":
        return get_backend(name, device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and flash_unavailable(device) is None:
        return flash_attention
    return sdpa_attention


def use(target, name: str = "auto") -> AttentionFn:
    """Makes an Engine's (or a LoopLM's) model attend with backend `name`; returns the function.

    Args:
        target: a looplm.Engine or a looplm.LoopLM.
        name: "auto" or one of BACKENDS.
    """
    model = target if hasattr(target, "set_attention") else getattr(target, "model", None)
    if not hasattr(model, "set_attention"):
        raise TypeError(f"expected a looplm Engine or LoopLM, got {type(target).__name__}")
    fn = select_backend(name, model.lm_head.weight.device)
    model.set_attention(fn)
    return fn
