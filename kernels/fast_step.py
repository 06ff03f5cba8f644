"""Fixed-shape decode steps: all T loops traced once per (rows, context) bucket, and compiled layer halves.

`FixedStep` is the engine runner's fixed-shape variant of a full-depth decode step (every token one
position through all T loops, looplm.runner). Its rows are padded to a bucket of rows and its keys
to a bucket of positions, so one graph serves every step of that bucket: the model's own loop body
(`LoopLM.loop_body`), T times, with a functional attention context is traced (torch.compile,
`fullgraph`) as a pure function of the cache: it gathers the rows' key positions through their
block tables and reads them, each query's own slot replaced by its new K/V, and returns every
loop's new K/V; the cache writes happen after the graph, in place (one indexed copy per K and V).
Nothing the step reads is written within it: a row reads other positions only, and rows of one step
are different sequences. One compiled call per step is what makes it fast at batch 1 (a graph per
loop cost T calls, 2TL gathers and 2TL writes of Python dispatch per token). Steps belong to the
engine's runner (one per bucket), never to the process. Padded rows sit at a scratch position of
the cache that no sequence owns.

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
        self.new_k.append(k[:, :, 0])
        self.new_v.append(v[:, :, 0])
        return self.attn_fn(q, ck, cv, self.q_pos, self.k_pos)


class FixedStep:
    """A full-depth decode step of `rows` rows over `ctx` key positions (see the module docstring).

    Args:
        model: the looped model (its attention backend is used as set).
        cache: the runner's paged cache.
        rows, ctx: the bucket (padded rows, padded key positions).
        compile: torch.compile the step (False: the same fixed-shape step, eager).
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code generation).
    """

    def __init__(self, model: LoopLM, cache: PagedKVCache, rows: int, ctx: int, *, compile: bool = True,
                 backend: str = "inductor"):
        self.model, self.cache, self.rows, self.ctx = model, cache, rows, ctx
        self.compiled = compile
        self._step = torch.compile(self._all_loops, backend=backend, fullgraph=True, dynamic=False) if compile else self._all_loops
        self.k_pos = torch.arange(ctx, device=cache.k.device).expand(rows, -1)
        self.calls = 0

    def _all_loops(self, h, cos, sin, k_all, v_all, flat_index, q_pos):
        """Every loop of the step as one pure function of the whole cache (nothing in it is written):
        -> the states after each loop (T, rows, 1, H) and the new K/V (T, L, rows, Hkv, D) each."""
        m, cache = self.model, self.cache
        own = (self.k_pos == q_pos)[:, None, :, None]  # (rows, 1, ctx, 1): the query's own slot
        # (slots, L, Hkv, rows, ctx, D) -> per slot and layer (rows, Hkv, ctx, D)
        kg, vg = k_all[:, :, :, flat_index].transpose(2, 3), v_all[:, :, :, flat_index].transpose(2, 3)
        x, states, new_k, new_v = h, [], [], []
        for t in range(m.num_loops):
            s = cache.slot(t)
            ctx = _SlotAttention(m.attention, kg[s], vg[s], own, q_pos, self.k_pos)
            x = m.loop_body(x, cos, sin, ctx)
            states.append(x)
            new_k.append(torch.stack(ctx.new_k))
            new_v.append(torch.stack(ctx.new_v))
        return torch.stack(states), torch.stack(new_k), torch.stack(new_v)

    def __call__(self, h: torch.Tensor, pos: torch.Tensor, flat: list[int], flat_index: torch.Tensor) -> torch.Tensor:
        """h (rows, H) embeddings, pos (rows,), flat: each row's write position, flat_index (rows, ctx)
        its key positions -> the hidden state after every loop, (T, rows, H)."""
        cache = self.cache
        pos = pos[:, None]
        cos, sin = self.model.rotary(pos, h.dtype)
        states, new_k, new_v = self._step(h[:, None], cos, sin, cache.k, cache.v, flat_index, pos)
        cache.write_loops(flat, new_k, new_v)  # eager and in place, outside the graph
        self.calls += 1
        return states[:, :, 0]
