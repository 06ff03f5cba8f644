"""A fast full-depth decode step: fixed shapes, compiled once, warmed up outside any timed region.

The plain eager step (`looplm.generate.decode_full`) attends over the cache prefix
[0, max(pos) + 1), a new shape at every token, and dispatches every op from Python. `DecodeStep`
instead attends over a fixed `kv_len` (the whole static cache by default, masked by position, as
gpt-fast does), so one graph serves every token; it compiles the step with torch.compile
(`fullgraph=True`) and, on CUDA, captures it as a CUDA graph (mode "reduce-overhead"). Stale
cache entries beyond a row's position are masked out by position, so the result is the same as
the eager step's (to float rounding of a different reduction order).
"""

from __future__ import annotations

import torch

from looplm.cache import LoopKVCache
from looplm.model import LoopLM


class DecodeStep:
    """One token per row through all T loops: tokens (B,), positions (B,) -> logits (B, V).

    Args:
        model: the looped model (its attention backend is used as set).
        cache: the static cache the step writes and reads (LoopKVCache or a shared "last" cache).
        compile: torch.compile the step (False: the same fixed-shape step, eager).
        mode: torch.compile mode; default "reduce-overhead" (CUDA graphs) on CUDA, None on CPU.
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code generation).
        kv_len: keys each step attends over (default cache.max_len: one graph for every position).
    """

    def __init__(
        self,
        model: LoopLM,
        cache: LoopKVCache,
        *,
        compile: bool = True,
        mode: str | None = None,
        backend: str = "inductor",
        kv_len: int | None = None,
    ):
        if getattr(cache, "kv", "per_loop") == "mean":
            raise ValueError("the compiled step supports the per-loop and 'last' caches; 'mean' keeps per-call state")
        self.model, self.cache = model, cache
        self.kv_len = cache.max_len if kv_len is None else kv_len
        self.device = cache.k.device
        fn = self._step
        if compile:
            if mode is None and self.device.type == "cuda":
                mode = "reduce-overhead"
                for buf in (cache.k, cache.v):  # CUDA graphs may mutate the cache only at a fixed address
                    torch._dynamo.mark_static_address(buf)
            fn = torch.compile(fn, mode=mode, backend=backend, fullgraph=True, dynamic=False)
        self._fn = fn

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.model.embed_tokens(tokens[:, None])  # no id check: no host sync in the step
        out = m._run_loops(h, pos[:, None], self.cache, 0, m.num_loops, None, "last", "last", self.kv_len)
        return out.logits[-1, :, 0]

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
        pos = torch.full((B,), self.kv_len - 1, dtype=torch.long, device=self.device)
        for _ in range(steps):
            self(tokens, pos)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@torch.inference_mode()
def greedy_decode(model: LoopLM, cache: LoopKVCache, prompts: list[list[int]], new_tokens: int, step=None) -> torch.Tensor:
    """Prefill, then `new_tokens - 1` greedy steps with `step` (a DecodeStep; None: the eager forward).

    Returns:
        (B, new_tokens) token ids (the first from the prefill logits).
    """
    from looplm.decoding import prefill

    tok = prefill(model, cache, prompts).logits[-1, :, 0].argmax(-1)
    pos = cache.lengths.clone()
    out = [tok]
    for _ in range(new_tokens - 1):
        if step is None:
            logits = model.forward_loops(model.embed(tok[:, None]), pos[:, None], cache, logits="last").logits[-1, :, 0]
        else:
            logits = step(tok, pos)
        tok, pos = logits.argmax(-1), pos + 1
        out.append(tok)
    return torch.stack(out, 1)
