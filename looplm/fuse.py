"""Fused projections for batch-1 decoding: q/k/v in one matrix, gate/up in another (gpt-fast style).

At batch 1 every projection is a matrix-vector product that streams its weight from memory; one
product over [q; k; v] (and one over [gate; up]) makes 4 calls per layer and loop instead of 7.
`fuse(model)` concatenates the weights once and points the original parameters at slices of the
fused matrix, so no weight is held twice and the state dict (the checkpoint names) is unchanged:
saving a fused model writes the same tensors. `unfuse(model)` goes back to separate products.
"""

from __future__ import annotations

import torch
from torch import nn

from .memory import return_freed_memory
from .model import LoopLM


def _share(parts: list[nn.Linear]) -> torch.Tensor:
    """Concatenates the layers' weights into one (sum out, in) tensor and makes each weight a view of it."""
    fused = torch.cat([p.weight.detach() for p in parts])
    start = 0
    for p in parts:
        n = p.weight.shape[0]
        p.weight = nn.Parameter(fused[start:start + n], requires_grad=p.weight.requires_grad)
        start += n
    return fused


@torch.no_grad()
def fuse(model: LoopLM) -> LoopLM:
    """Fuses every layer's q/k/v and gate/up projections in place; returns the model.

    Apply after loading and after any move or dtype change (`Module.to` copies the fused matrix and
    the weights separately: the results stay right but the memory is then held twice).
    """
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv = _share([a.q_proj, a.k_proj, a.v_proj])
        m.gate_up = _share([m.gate_proj, m.up_proj])
        return_freed_memory()  # the separate weights just replaced: the next layer's copies reuse their pages
    return model


def unfuse(model: LoopLM) -> LoopLM:
    """Back to one product per projection (the weights keep pointing into the fused storage)."""
    for layer in model.model.layers:
        layer.self_attn.qkv = None
        layer.mlp.gate_up = None
    return model


def is_fused(model: LoopLM) -> bool:
    return all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.model.layers)


def fuse_if_large(model: LoopLM) -> LoopLM:
    """`fuse` for a model whose weights exceed `dtypes.BF16_MIN_BYTES` in bf16 (streamed from memory
    at batch 1; measured on the CPU, Ouro-1.4B's layer shapes in float32: 15.1 vs 14.1 GB/s fused);
    smaller models are left as they are."""
    from .dtypes import BF16_MIN_BYTES, weight_bytes

    return fuse(model) if weight_bytes(model.config) >= BF16_MIN_BYTES else model
