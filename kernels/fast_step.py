"""A fast full-depth decode step: fixed shapes, compiled once, warmed up outside any timed region.

The plain eager step (`looplm.generate.decode_full`) attends over the cache prefix
[0, max(pos) + 1), a new shape at every token, and dispatches every op from Python. `DecodeStep`
instead attends over a fixed `kv_len` (the whole static cache by default, masked by position, as
gpt-fast does), so one graph serves every token. Two ways to compile it:

* "graph": the whole step (T loops x L layers, cache writes included) as one torch.compile
  graph (`fullgraph=True`), captured as a CUDA graph on CUDA (mode "reduce-overhead"). Fastest
  per token, but compile time grows with T * L (minutes for a 100M model on a loaded 2-core CPU).
* "loop": one loop (L layers) as one graph, a pure function of the cache slots it reads (its
  own position's slot replaced by its new K/V) that returns the new K/V; the cache writes happen
  outside, in place. The same graph runs all T loops (compile time T-fold below "graph", T graph
  calls per token), and no cache buffer is copied by functionalization. The CPU default.
* "layers": `compile_layers(model)` compiles the two halves of the layer around the cache access
  (norm + QKV + RoPE, and o_proj + norms + MLP) once, one graph each shared by every layer and
  loop; cache writes and attention stay eager in the chosen backend. Compile time is independent
  of depth, but it pays two compiled-call overheads per layer and loop.

Stale cache entries beyond a row's position are masked out by position, so the result is the
eager step's (to float rounding of a different reduction order).
"""

from __future__ import annotations

import functools
import weakref
from typing import Literal

import torch

from looplm.cache import LoopKVCache
from looplm.layers import DecoderLayer
from looplm.model import LoopLM


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


class DecodeStep:
    """One token per row through all T loops: tokens (B,), positions (B,) -> logits (B, V).

    Args:
        model: the looped model (its attention backend is used as set).
        cache: the static cache the step writes and reads: a LoopKVCache or a SharedKVCache
            ("graph" takes per_loop and "last" only: "mean" keeps per-call state in Python).
        compile: torch.compile the step (False: the same fixed-shape step, eager).
        strategy: "graph" (the whole step, fullgraph), "loop" (one loop's graph reused for every
            loop) or "layers" (compile_layers, which compiles the model's layers in place);
            default "graph" on CUDA, "loop" on the CPU.
        mode: torch.compile mode for "graph"; default "reduce-overhead" (CUDA graphs) on CUDA.
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code generation).
        options: torch.compile inductor options (e.g. {"freezing": True} on the CPU).
        kv_len: keys each step attends over (default: cache.max_len for "graph" and "loop", one
            graph for every position; the prefix up to the furthest row's position for "layers").
    """

    def __init__(
        self,
        model: LoopLM,
        cache: LoopKVCache,
        *,
        compile: bool = True,
        strategy: Literal["graph", "loop", "layers"] | None = None,
        mode: str | None = None,
        backend: str = "inductor",
        kv_len: int | None = None,
        options: dict | None = None,
    ):
        self.model, self.cache = model, cache
        self.device = cache.k.device
        if strategy is None:
            strategy = "graph" if self.device.type == "cuda" else "loop"
        if strategy not in ("graph", "loop", "layers"):
            raise ValueError(f"strategy must be 'graph', 'loop' or 'layers', got {strategy!r}")
        if strategy == "graph" and getattr(cache, "kv", "per_loop") == "mean":
            raise ValueError("strategy 'graph' supports the per-loop and 'last' caches ('mean' keeps per-call state); use 'loop'")
        # a whole-step graph needs a fixed key length; compiled layer halves do not, so they attend over the prefix
        self.kv_len = kv_len if kv_len is not None or strategy == "layers" else cache.max_len
        fn = self._step
        self._rows = torch.arange(cache.batch_size, device=self.device)[:, None]
        self._k_pos = None
        self.strategy = strategy if compile else "eager"
        if compile and strategy == "layers":
            compile_layers(model, backend=backend)
        elif strategy == "loop":
            if compile:
                self._one_loop = torch.compile(self._one_loop, backend=backend, fullgraph=True, dynamic=False, options=options)
            fn = self._looped_step
        elif compile:
            if mode is None and self.device.type == "cuda":
                mode = "reduce-overhead"
                for buf in (cache.k, cache.v):  # CUDA graphs may mutate the cache only at a fixed address
                    torch._dynamo.mark_static_address(buf)
            fn = torch.compile(fn, mode=mode, backend=backend, fullgraph=True, dynamic=False, options=options)
        self._fn = fn

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.model.embed_tokens(tokens[:, None])  # no id check: no host sync in the step
        kv_len = self.kv_len if self.kv_len is not None else int(pos.max()) + 1
        out = m._run_loops(h, pos[:, None], self.cache, 0, m.num_loops, None, "last", "last", kv_len)
        return out.logits[-1, :, 0]

    def _one_loop(self, h, pos, cos, sin, k_slots, v_slots):
        """One loop over all layers as a pure function of the cache slots it reads (no mutation in
        the graph, so nothing copies the cache): each layer's query at position p sees the slot
        with position p replaced by its own new K/V. Returns the loop's output and the new K/V."""
        m = self.model
        own = (self._k_pos[:1] == pos)[:, None, :, None]  # (B, 1, kv_len, 1): the query's own slot
        new_k, new_v = [], []
        for i, layer in enumerate(m.model.layers):
            q, k, v = layer.before_attention(h, cos, sin)  # k, v (B, Hkv, 1, D)
            ck, cv = torch.where(own, k, k_slots[i]), torch.where(own, v, v_slots[i])
            h = layer.after_attention(h, m.attention(q, ck, cv, pos, self._k_pos))
            new_k.append(k)
            new_v.append(v)
        return m.model.norm(h), new_k, new_v

    def _looped_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m, cache, B = self.model, self.cache, tokens.shape[0]
        h = m.model.embed_tokens(tokens[:, None])
        pos = pos[:, None]
        cos, sin = m.rotary(pos, h.dtype)
        rows = self._rows[:B]
        if self._k_pos is None or self._k_pos.shape[0] != B:
            self._k_pos = torch.arange(self.kv_len, device=self.device).expand(B, -1)
        for t in range(m.num_loops):
            slots = [cache.read(t, i, None, self.kv_len) for i in range(len(m.model.layers))]
            h, new_k, new_v = self._one_loop(h, pos, cos, sin, [k for k, _ in slots], [v for _, v in slots])
            for i, (k, v) in enumerate(zip(new_k, new_v)):  # the writes, eager and in place
                cache.write(t, i, rows, pos, k, v)
        cache.commit()
        return m.lm_head(h[:, -1])

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at positions pos (B,) -> (B, V) logits after the last loop; writes their K/V."""
        logits = self._fn(tokens, pos)
        self.model.token_loops += tokens.shape[0] * self.model.num_loops
        return logits.clone() if self.device.type == "cuda" else logits  # CUDA graph outputs are reused

    @torch.inference_mode()
    def warmup(self, steps: int = 3) -> None:
        """Compiles (and captures) the step; writes only to the last cache position, which is then stale.

        Run it before any timed region and before prefill (or accept that position max_len - 1 is
        overwritten: a query at an earlier position never sees it).
        """
        B = self.cache.batch_size
        tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        pos = torch.full((B,), (self.kv_len or self.cache.max_len) - 1, dtype=torch.long, device=self.device)
        for _ in range(steps):
            self(tokens, pos)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# model -> {(batch, cache length, KV mode, compiled): DecodeStep}; dies with the model
_POOL: "weakref.WeakKeyDictionary[LoopLM, dict]" = weakref.WeakKeyDictionary()
BUCKET = 128  # cache lengths are rounded up to a multiple of this, so one graph serves many requests


def pooled_step(model: LoopLM, req, *, compile: bool = True) -> DecodeStep:
    """The fixed-shape step for a request, built (and warmed up: compiled) once and then reused.

    Steps are kept per model, batch size, cache length (the request's, rounded up to BUCKET and
    capped at max_position_embeddings) and KV mode. The step's cache is the request's cache: its
    prefill overwrites what an earlier request left, and stale positions are masked by position.
    """
    max_len = min(-(-req.cache_len() // BUCKET) * BUCKET, model.config.max_position_embeddings)
    key = (req.batch_size, max_len, getattr(req.cache_factory, "kv", "per_loop"), compile)
    steps = _POOL.setdefault(model, {})
    if key not in steps:  # the cache is allocated once per step, not once per request
        step = DecodeStep(model, req.new_cache(model, max_len), compile=compile)
        step.warmup()  # compiles before the request's prefill, which then overwrites the warm-up's writes
        steps[key] = step
    return steps[key]
