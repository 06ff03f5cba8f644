"""Loop runners over the layer stack for shared-KV training and teacher-forced shared-KV evaluation.

Decoding with shared KV (`Engine.generate(..., kv="last" or "mean")`) keeps one K/V per
layer and position: a token decoded in its own call attends, at every loop t, to the shared K/V
of the earlier positions (the last loop's, or the mean over loops) and to its own loop-t K/V. The
per-loop cache instead gives loop t the loop-t K/V of every position. These runners reproduce that
semantics outside the engine, with only the model's layer seam
(`model.model.layers[l](h, cos, sin, ctx, l)`, `model.rotary`, `model.model.norm`, `model.head`):

* `per_loop_kv`: a plain forward (the per-loop regime, equal to `model.loop_outputs`) that also
  returns every loop's K/V.
* `shared_kv_logits`: the training pass. The shared K/V of positions j < i come from a per-loop pass
  and are detached (or, with `kv_grad`, carry the loss back into it); position i attends to them and
  to its own loop's K/V (with gradients), in parallel over the sequence. This is the decoding
  semantics with the earlier positions' K/V taken from the per-loop regime rather than from their
  own shared-KV decode. `shared_pass_logits` is its loss pass alone, over K/V a `per_loop_kv` call
  already computed.
* `teacher_forced_shared`: the exact decoding semantics, teacher-forced: a prefill with per-loop
  K/V, then one token per call, each reading the shared K/V its predecessors left behind.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from looplm.attention import sdpa_attention
from looplm.model import LoopLM

SharedMode = Literal["last", "mean"]
SHARED_MODES = ("last", "mean")


def _check_mode(kv: str) -> None:
    if kv not in SHARED_MODES:
        raise ValueError(f"shared KV mode must be one of {SHARED_MODES}, got {kv!r}")


def shared_value(per_loop: list[torch.Tensor], kv: SharedMode) -> torch.Tensor:
    """The one K (or V) a shared cache keeps for a position: the last loop's, or the float32 mean
    over the loops cast back to their dtype (as the engine's shared cache stores it).

    Args:
        per_loop: T tensors (B, Hkv, S, D), loop 0 first.
    Returns:
        (B, Hkv, S, D).
    """
    _check_mode(kv)
    if kv == "last":
        return per_loop[-1]
    # the shared cache's running mean (m_t = m_{t-1} + (x_t - m_{t-1}) / (t + 1)), in the same order
    mean = per_loop[0].float()
    for t, x in enumerate(per_loop[1:], start=1):
        mean = mean + (x.float() - mean) / (t + 1)
    return mean.to(per_loop[0].dtype)


class _PerLoop:
    """Attention context of a plain forward that records every (loop, layer)'s K/V."""

    def __init__(self, attn_fn, pos: torch.Tensor):
        self.attn_fn, self.pos, self.loop = attn_fn, pos, 0
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        self.kv[(self.loop, layer)] = (k, v)
        return self.attn_fn(q, k, v, self.pos, self.pos)


class _SharedParallel:
    """Attention context of the training pass: query i sees the shared K/V of positions j < i and its own K/V."""

    def __init__(self, shared: dict[int, tuple[torch.Tensor, torch.Tensor]], seq_len: int, device):
        self.shared, self.loop = shared, 0
        i = torch.arange(seq_len, device=device)
        # keys [shared 0..S-1 | own 0..S-1]: shared j visible for j < i, own j only for j == i
        self.mask = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], dim=1)  # (S, 2S)

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        ks, vs = self.shared[layer]
        keys, values = torch.cat([ks.to(k.dtype), k], dim=2), torch.cat([vs.to(v.dtype), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask,
                                              enable_gqa=q.shape[1] != k.shape[1])


def _run(model: LoopLM, h: torch.Tensor, pos: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """All T loops over h (B, S, H) at positions pos (B, S) -> (hidden (T, B, S, H), logits (T, B, S, V))."""
    cos, sin = model.rotary(pos, h.dtype)
    hiddens, logits = [], []
    for t in range(model.num_loops):
        ctx.loop = t
        for layer_idx, layer in enumerate(model.model.layers):
            h = layer(h, cos, sin, ctx, layer_idx)
        h = model.model.norm(h)
        hiddens.append(h)
        logits.append(model.head(h))
    return torch.stack(hiddens), torch.stack(logits)


def per_loop_kv(model: LoopLM, input_ids: torch.Tensor):
    """The per-loop forward (model.loop_outputs' math, with the model's attention backend) and its K/V.

    Args:
        input_ids: (B, S).
    Returns:
        (logits (T, B, S, V), kv {(loop, layer): (k, v) each (B, Hkv, S, D), RoPE applied to k}).
    """
    B, S = input_ids.shape
    pos = torch.arange(S, device=input_ids.device).expand(B, S)
    ctx = _PerLoop(model.attention, pos)
    _, logits = _run(model, model.embed(input_ids), pos, ctx)
    return logits, ctx.kv


def stacked_kv(kvs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """per_loop_kv's K/V as one (T, B, Hkv, S, D) tensor per (layer, K or V): layer 0's K, its V, layer 1's K, ..."""
    T = 1 + max(t for t, _ in kvs)
    L = 1 + max(layer for _, layer in kvs)
    return [torch.stack([kvs[(t, layer)][i] for t in range(T)]) for layer in range(L) for i in (0, 1)]


def shared_pass_logits(model: LoopLM, input_ids: torch.Tensor, kvs, kv: SharedMode,
                       kv_grad: bool = False) -> torch.Tensor:
    """The loss pass of shared-KV training over per_loop_kv's K/V `kvs` of the same ids: (T, B, S, V).

    Query i attends to the shared K/V (`shared_value`) of positions j < i and to its own loop's
    K/V, in parallel over the sequence. The shared K/V are detached unless `kv_grad`: then the loss
    also trains the per-loop pass that produced them (to make K/V that serve every loop's queries).
    """
    T, L = model.num_loops, len(model.model.layers)

    def keep(x):
        return x if kv_grad else x.detach()

    shared = {layer: (shared_value([keep(kvs[(t, layer)][0]) for t in range(T)], kv),
                      shared_value([keep(kvs[(t, layer)][1]) for t in range(T)], kv)) for layer in range(L)}
    B, S = input_ids.shape
    pos = torch.arange(S, device=input_ids.device).expand(B, S)
    _, logits = _run(model, model.embed(input_ids), pos, _SharedParallel(shared, S, input_ids.device))
    return logits


def shared_kv_logits(model: LoopLM, input_ids: torch.Tensor, kv: SharedMode,
                     teacher_grad: bool = False, kv_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-KV training pass: (logits (T, B, S, V) with gradients, per-loop logits (T, B, S, V)).

    A per-loop pass gives every loop's K/V; the loss pass (`shared_pass_logits`) then runs all T
    loops where query i attends to the shared K/V of positions j < i and to its own
    loop's K/V. The per-loop logits come with the first pass (a teacher, or a second loss): without
    gradients unless `teacher_grad` or `kv_grad`; the shared K/V are detached unless `kv_grad`.
    """
    with torch.set_grad_enabled((teacher_grad or kv_grad) and torch.is_grad_enabled()):
        teacher, kvs = per_loop_kv(model, input_ids)
    return shared_pass_logits(model, input_ids, kvs, kv, kv_grad), teacher


class _OneToken:
    """Attention context of one decoded position: the shared cache prefix, then the token's own K/V."""

    def __init__(self, cache_k: list[torch.Tensor], cache_v: list[torch.Tensor], i: int):
        self.cache_k, self.cache_v, self.i, self.loop = cache_k, cache_v, i, 0
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        self.kv[(self.loop, layer)] = (k, v)
        i, B = self.i, q.shape[0]
        keys = torch.cat([self.cache_k[layer][:, :, :i], k], dim=2)
        values = torch.cat([self.cache_v[layer][:, :, :i], v], dim=2)
        q_pos = torch.full((B, 1), i, device=q.device)
        k_pos = torch.arange(i + 1, device=q.device).expand(B, -1)
        return sdpa_attention(q, keys, values, q_pos, k_pos)


@torch.no_grad()
def teacher_forced_shared(model: LoopLM, input_ids: torch.Tensor, kv: SharedMode, prefill: int = 32) -> torch.Tensor:
    """Every loop's logits of decoding `input_ids` with a shared cache, teacher-forced.

    Positions [0, prefill) are one per-loop call (as the engine's prefill); each later position
    is its own call over all T loops, attending to the shared K/V its predecessors left and to its
    own loop's K/V; after the call its K/V collapse to `shared_value`. This is what
    `Engine.generate(..., kv=kv)` computes for the same tokens.

    Args:
        input_ids: (B, S) with S > prefill >= 1.
        kv: "last" or "mean".
        prefill: tokens computed in the first call.
    Returns:
        (T, B, S, V) float logits; positions < prefill are the per-loop prefill's.
    """
    _check_mode(kv)
    B, S = input_ids.shape
    if not 1 <= prefill < S:
        raise ValueError(f"prefill {prefill} must be in [1, {S}) for sequences of {S} tokens")
    T, L = model.num_loops, len(model.model.layers)
    head_logits, kvs = per_loop_kv(model, input_ids[:, :prefill])
    k0, v0 = kvs[(0, 0)]
    cache_k = [k0.new_zeros(B, k0.shape[1], S, k0.shape[3]) for _ in range(L)]
    cache_v = [v0.new_zeros(B, v0.shape[1], S, v0.shape[3]) for _ in range(L)]
    for layer in range(L):
        cache_k[layer][:, :, :prefill] = shared_value([kvs[(t, layer)][0] for t in range(T)], kv)
        cache_v[layer][:, :, :prefill] = shared_value([kvs[(t, layer)][1] for t in range(T)], kv)
    out = [head_logits]
    for i in range(prefill, S):
        ctx = _OneToken(cache_k, cache_v, i)
        pos = torch.full((B, 1), i, device=input_ids.device)
        _, logits = _run(model, model.embed(input_ids[:, i : i + 1]), pos, ctx)
        for layer in range(L):
            cache_k[layer][:, :, i : i + 1] = shared_value([ctx.kv[(t, layer)][0] for t in range(T)], kv)
            cache_v[layer][:, :, i : i + 1] = shared_value([ctx.kv[(t, layer)][1] for t in range(T)], kv)
        out.append(logits)
    return torch.cat(out, dim=2)
