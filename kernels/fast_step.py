"""Fixed-shape decode steps: one loop traced once per (rows, context) bucket, and compiled layer halves.

`FixedStep` is the engine runner's fixed-shape variant of a full-depth decode step (every token one
position through all T loops, looplm.runner). Its rows are padded to a bucket of rows and its keys
to a bucket of positions, so one graph serves every step of that bucket: the model's own loop body
(`LoopLM.loop_body`) with a functional attention context is traced (torch.compile, `fullgraph`)
as a pure function of the cache slots it reads, each query's own slot replaced by its new K/V; the
cache writes and the gathers through the block tables happen outside the graph, in place. The
same graph runs all T loops. Steps belong to the engine's runner (one per bucket), never to the
process. Padded rows sit at a scratch position of the cache that no sequence owns.

`compile_layers(model)` compiles the two halves of the layer around attention instead (norm + QKV
+ RoPE, and o_proj + norms + MLP), one graph per half and shape, used by every forward.

Stale cache entries beyond a row's position are masked by position, so a fixed step's result is
the eager step's up to float rounding of a different reduction order.
"""

from __future__ import annotations

import functools

import torch

from looplm.layers import DecoderLayer
from looplm.model import LoopLM
from looplm.paged import PagedKVCache

STEPS = ("eager", "fixed", "compiled")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CTX_BUCKET = 128  # key positions are padded to a multiple of this


def bucket_rows(n: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= n), -(-n // 256) * 256)


def bucket_ctx(n: int) -> int:
    return -(-n // CTX_BUCKET) * CTX_BUCKET


def _before(layer, h, cos, sin):
    return DecoderLayer.before_attention(layer, h, cos, sin)


def _after(layer, h, attn_out):
    return DecoderLayer.after_attention(layer, h, attn_out)


def compile_layers(model: LoopLM, *, backend: str = "inductor") -> LoopLM:
    """Compiles both halves of every layer around attention (one graph per half and input shape).

    Parameters are graph inputs (torch.compile inlines nn.Modules), so all L layers and T loops
    share one compiled graph per half; the cache write and attention stay in Python/the backend.
    Undo with `uncompile_layers`. Returns the model.
    """
    before = torch.compile(_before, backend=backend, dynamic=False)
    after = torch.compile(_after, backend=backend, dynamic=False)
    for layer in model.model.layers:
        layer.before_attention = functools.partial(before, layer)  # instance attributes shadow the methods
        layer.after_attention = functools.partial(after, layer)
    return model


def uncompile_layers(model: LoopLM) -> LoopLM:
    """Restores the eager layer halves."""
    for layer in model.model.layers:
        layer.__dict__.pop("before_attention", None)
        layer.__dict__.pop("after_attention", None)
    return model


class _SlotAttention:
    """Functional attention of a fixed step: keys are the gathered slots with each query's own
    position replaced by its new K/V; the new K/V are collected for the writes outside the graph."""

    def __init__(self, attn_fn, k_slots, v_slots, own, q_pos, k_pos):
        self.attn_fn, self.k_slots, self.v_slots = attn_fn, k_slots, v_slots
        self.own, self.q_pos, self.k_pos = own, q_pos, k_pos
        self.new_k, self.new_v = [], []

    def attend(self, q, k, v, layer: int) -> torch.Tensor:
        ck = torch.where(self.own, k, self.k_slots[layer])
        cv = torch.where(self.own, v, self.v_slots[layer])
        self.new_k.append(k)
        self.new_v.append(v)
        return self.attn_fn(q, ck, cv, self.q_pos, self.k_pos)


class FixedStep:
    """A full-depth decode step of `rows` rows over `ctx` key positions (see the module docstring).

    Args:
        model: the looped model (its attention backend is used as set).
        cache: the runner's paged cache.
        rows, ctx: the bucket (padded rows, padded key positions).
        compile: torch.compile the loop (False: the same fixed-shape step, eager).
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code generation).
    """

    def __init__(self, model: LoopLM, cache: PagedKVCache, rows: int, ctx: int, *, compile: bool = True,
                 backend: str = "inductor"):
        self.model, self.cache, self.rows, self.ctx = model, cache, rows, ctx
        self.compiled = compile
        self._loop = torch.compile(self._one_loop, backend=backend, fullgraph=True, dynamic=False) if compile else self._one_loop
        self.k_pos = torch.arange(ctx, device=cache.k.device).expand(rows, -1)
        self.calls = 0

    def _one_loop(self, h, cos, sin, k_slots, v_slots, own, q_pos):
        ctx = _SlotAttention(self.model.attention, k_slots, v_slots, own, q_pos, self.k_pos)
        h = self.model.loop_body(h, cos, sin, ctx)
        return h, ctx.new_k, ctx.new_v

    def __call__(self, h: torch.Tensor, pos: torch.Tensor, flat: list[int], flat_index: torch.Tensor) -> list[torch.Tensor]:
        """h (rows, H) embeddings, pos (rows,), flat: each row's write position, flat_index (rows, ctx)
        its key positions -> the hidden state after every loop, T x (rows, H)."""
        m, cache = self.model, self.cache
        L = m.config.num_hidden_layers
        pos = pos[:, None]
        cos, sin = m.rotary(pos, h.dtype)
        own = (self.k_pos == pos)[:, None, :, None]  # (rows, 1, ctx, 1): the query's own slot
        flat_t = torch.tensor(flat, device=h.device)
        x, out = h[:, None], []
        for t in range(m.num_loops):
            s = cache.slot(t)
            k_slots = [cache.k[s, l][:, flat_index].transpose(0, 1) for l in range(L)]  # (rows, Hkv, ctx, D)
            v_slots = [cache.v[s, l][:, flat_index].transpose(0, 1) for l in range(L)]
            x, new_k, new_v = self._loop(x, cos, sin, k_slots, v_slots, own, pos)
            loops = [t] * len(flat)
            for l in range(L):  # the writes, eager and in place
                cache.write(l, loops, flat, new_k[l][:, :, 0], new_v[l][:, :, 0], (torch.full_like(flat_t, t), flat_t))
            out.append(x[:, 0])
        cache.end_step()
        self.calls += 1
        return out
