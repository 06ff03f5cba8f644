"""One runner: every live request's work of an engine step through the model in one pass.

`Runner.run` takes the step's Forwards (each of one sequence, each with its own positions, start
loops and number of loops) and builds one explicit plan:

* tokens: every position of every Forward, flattened, Forwards ordered by loops to run (most
  first), so that at loop step i the tokens still running are a prefix of the list;
* per token: position, loop at step 0, flat cache index (through its sequence's block table);
* groups: the tokens of one Forward at one start loop; a group attends to its sequence's keys at
  its current loop, positions [0, last position of the group], masked causally by position.

Each loop step runs the model's loop body (`LoopLM.loop_body`) once over the running tokens; the
attention context writes their K/V into the paged cache and reads each group's keys: one batched
gather for all one-token groups (decode rows of every request), a view or a gather for each
multi-token group (prompt chunks). The model never sees a cache or a caller's layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import sdpa_attention, visibility_mask
from .model import LoopLM, LoopOutput
from .paged import PagedKVCache
from .work import FIXED_STEPS, Forward


@dataclass
class _Group:
    tokens: slice  # tokens of the step (contiguous)
    loop: int  # loop at step 0
    table: list[int]  # the sequence's block table
    ctx: int  # keys: positions [0, ctx)


class _Batch:
    """Groups attended together: their queries padded to (G, n), their keys gathered to (G, C).

    The index tensors are built on first use (a batch-1 decode row with the default backend needs
    none of them)."""

    def __init__(self, cache: PagedKVCache, groups: list[_Group], pos_t: torch.Tensor, device):
        self.groups, self._pos_t, self._device = groups, pos_t, device
        self.first = [g.tokens.start for g in groups]  # groups are in token order
        self._sizes = sizes = [g.tokens.stop - g.tokens.start for g in groups]
        self.n = max(sizes)
        self.ctx = max(g.ctx for g in groups)
        self.view = None  # (first flat position, first loop, loop step) when every group reads one contiguous range
        loops = [g.loop for g in groups]
        d = loops[1] - loops[0] if len(loops) > 1 else 1
        if all(g.table is groups[0].table for g in groups) and loops == [loops[0] + j * d for j in range(len(loops))] \
                and (d > 0 or len(loops) == 1):
            rng = cache.flat_range(groups[0].table, self.ctx)
            if rng is not None:  # one sequence's tokens at evenly spaced loops (the pipeline): a strided view
                self.view = (rng[0], loops[0], d)
        self.flat = cache.flat_index([g.table for g in groups], self.ctx, device) if self.view is None else None
        self.n_tok = sum(sizes)
        # groups cover tokens [first[0], first[0] + n_tok) without gaps
        self.contiguous = all(a.tokens.stop == b.tokens.start for a, b in zip(groups, groups[1:]))
        self.dense = self.n == 1  # one query per group: no padding
        # one query per group at its context's last position (decode rows of equal length): every
        # key is visible, so the default backend needs no mask
        self.all_visible = self.dense and all(g.ctx == self.ctx for g in groups)

    @functools.cached_property
    def loops(self) -> torch.Tensor:
        """(G,) loop of each group at loop step 0."""
        return torch.tensor([g.loop for g in self.groups], device=self._device)

    @functools.cached_property
    def k_pos(self) -> torch.Tensor:
        """(G, C) key positions."""
        return torch.arange(self.ctx, device=self._device).expand(len(self.groups), -1)

    @functools.cached_property
    def tok(self) -> torch.Tensor:
        """(n_tok,) the batch's tokens (indices into the step's tokens), group by group."""
        if self.contiguous:
            return torch.arange(self.first[0], self.first[0] + self.n_tok, device=self._device)
        return torch.tensor([t for g in self.groups for t in range(g.tokens.start, g.tokens.stop)], device=self._device)

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        """(n_tok,) slot of each token in the padded (G * n) query layout."""
        return torch.tensor([gi * self.n + j for gi, sz in enumerate(self._sizes) for j in range(sz)], device=self._device)

    @functools.cached_property
    def q_pos(self) -> torch.Tensor:
        """(G, n) query positions; padded slots query position 0."""
        if self.dense:
            return self._pos_t[self.tok][:, None]
        q_pos = torch.zeros(len(self.groups) * self.n, dtype=torch.long, device=self._device)
        q_pos[self.slot] = self._pos_t[self.tok]
        return q_pos.view(len(self.groups), self.n)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(G, 1, n, C) visibility of the keys to each query (the same at every loop and layer)."""
        return visibility_mask(self.q_pos, self.k_pos)

    def running(self, n_tokens: int) -> int:
        """Groups whose tokens are still running when the first n_tokens tokens run (a prefix)."""
        return sum(1 for f in self.first if f < n_tokens)


class _Plan:
    """The tensors and index lists of one runner step (built once, used by every loop and layer)."""

    def __init__(self, cache: PagedKVCache, items: list[tuple[list[int], Forward]], device):
        self.cache = cache
        order = sorted(range(len(items)), key=lambda i: -items[i][1].most_loops())
        self.order = order
        # every position of every Forward (in `order`, each in its layout order): item, position,
        # start loop, loops to run
        tokens = []
        for i in order:
            fwd = items[i][1]
            p = fwd.pos.reshape(-1).tolist()
            st = fwd.start_loop.reshape(-1).tolist() if isinstance(fwd.start_loop, torch.Tensor) else [fwd.start_loop] * len(p)
            n = fwd.num_loops.reshape(-1).tolist() if isinstance(fwd.num_loops, torch.Tensor) else [fwd.num_loops] * len(p)
            tokens += zip([i] * len(p), p, st, n)
        # most loops first (stable), so that at loop step i the tokens still running are a prefix;
        # this moves tokens only within Forwards of per-position loop counts
        rank = sorted(range(len(tokens)), key=lambda t: -tokens[t][3])
        self.input_order = None if rank == list(range(len(tokens))) else torch.tensor(rank, device=device)
        where = [0] * len(tokens)  # layout index -> index in the step's order
        for j, t in enumerate(rank):
            where[t] = j
        self.spans, first = {}, 0
        for i in order:  # each Forward's tokens in its layout order: a slice, or their indices when moved
            b, s = items[i][1].inputs.shape[:2]
            idx = where[first : first + b * s]
            self.spans[i] = slice(idx[0], idx[0] + len(idx)) if idx == list(range(idx[0], idx[0] + len(idx))) else idx
            first += b * s
        tokens = [tokens[t] for t in rank]
        self.pos = [t[1] for t in tokens]
        self.loops = [t[2] for t in tokens]
        self.steps = [t[3] for t in tokens]
        self.flat = [cache.flat(items[t[0]][0], t[1]) for t in tokens]
        # a group: a run of tokens of one Forward at one start loop running as many loops (tokens
        # that run none join no group)
        groups, j = [], 0
        while j < len(tokens):
            e = j
            while e + 1 < len(tokens) and tokens[e + 1][0] == tokens[j][0] and tokens[e + 1][2:] == tokens[j][2:]:
                e += 1
            if tokens[j][3]:
                groups.append(_Group(slice(j, e + 1), tokens[j][2], items[tokens[j][0]][0], max(self.pos[j : e + 1]) + 1))
            j = e + 1
        self.n_tokens = len(tokens)
        self.pos_t = torch.tensor(self.pos, device=device)
        self.device = device
        self.max_steps = max(self.steps)
        # decode rows (one query) of every request in one batch, prompt chunks in another
        singles = [g for g in groups if g.tokens.stop - g.tokens.start == 1]
        multis = [g for g in groups if g.tokens.stop - g.tokens.start > 1]
        self.batches = [_Batch(cache, b, self.pos_t, device) for b in (singles, multis) if b]

    def active(self, step: int) -> int:
        """Tokens still running at loop step `step` (a prefix)."""
        return sum(1 for s in self.steps if s > step)

    def layout(self, item: int, j: int) -> int:
        """Index in the step's order of position j (flattened) of Forward `item`."""
        sp = self.spans[item]
        return sp.start + j if isinstance(sp, slice) else sp[j]

    @functools.cached_property
    def loops_t(self) -> torch.Tensor:
        return torch.tensor(self.loops, device=self.device)

    @functools.cached_property
    def flat_t(self) -> torch.Tensor:
        return torch.tensor(self.flat, device=self.device)


class _Attend:
    """The attention context of a runner step (the `ctx` the model's layers call)."""

    def __init__(self, plan: _Plan, attn_fn):
        self.plan, self.attn_fn = plan, attn_fn
        self.at(0, plan.n_tokens)

    def at(self, step: int, n: int) -> None:
        """Moves to loop step `step` with the first n tokens running."""
        self.step, self.n = step, n
        self.loops = [t + step for t in self.plan.loops[:n]]
        self._index = None

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The write indices (loops, flat positions) of the running tokens as tensors, built once
        per loop step for every layer."""
        if self._index is None:
            self._index = (self.plan.loops_t[: self.n] + self.step, self.plan.flat_t[: self.n])
        return self._index

    @property
    def pos(self) -> torch.Tensor:
        """(N, 1) positions of the running tokens (for hooks and tests)."""
        return self.plan.pos_t[: self.n, None]

    @property
    def loop(self) -> torch.Tensor:
        """(N, 1) 0-based loop each running token is at in this loop step."""
        return (self.plan.loops_t[: self.n] + self.step)[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q (N, Hq, 1, D), k/v (N, Hkv, 1, D) of the running tokens -> (N, Hq, 1, D)."""
        plan, n = self.plan, self.n
        plan.cache.write(layer, self.loops, plan.flat[:n], k[:, :, 0], v[:, :, 0], self.index if n > 1 else None)
        if len(plan.batches) == 1:
            b = plan.batches[0]
            if b.contiguous and b.n_tok == n and b.first[0] == 0:
                return self._batch(b, q, layer, len(b.groups), whole=True)
        out = torch.empty_like(q)
        for b in plan.batches:
            G = b.running(n)
            if G:
                self._batch(b, q, layer, G, out=out)
        return out

    def _batch(self, b: _Batch, q, layer: int, G: int, *, whole: bool = False, out=None):
        cache, i = self.plan.cache, self.step
        if b.view is not None:
            first, lo, d = b.view
            kk, vv = cache.read_strided(lo + i, d, G, layer, first, b.ctx)
        else:
            kk, vv = cache.gather(b.loops[:G] + i, layer, b.flat[:G])
        ntok = sum(g.tokens.stop - g.tokens.start for g in b.groups[:G]) if G < len(b.groups) else b.n_tok
        Hq, D = q.shape[1], q.shape[3]
        if b.dense:  # (G, Hq, 1, D): one query per group
            qg = q if whole else q[b.tok[:ntok]]
            res = self._attention(b, G, qg, kk, vv)
            if whole:
                return res
            out[b.tok[:ntok]] = res
            return out
        qp = q.new_zeros(G * b.n, Hq, D)
        qp[b.slot[:ntok]] = q[b.tok[:ntok], :, 0]
        res = self._attention(b, G, qp.view(G, b.n, Hq, D).transpose(1, 2), kk, vv)
        res = res.transpose(1, 2).reshape(G * b.n, Hq, D)[b.slot[:ntok]][:, :, None]
        if whole:
            return res
        out[b.tok[:ntok]] = res
        return out

    def _attention(self, b: _Batch, G: int, q, k, v) -> torch.Tensor:
        """The backend's attention of the batch's first G groups; the default (SDPA) backend gets the
        mask built once per step, or none when every key is visible (bit-identical results)."""
        if self.attn_fn is not sdpa_attention:
            return self.attn_fn(q, k, v, b.q_pos[:G], b.k_pos[:G])
        gqa = q.shape[1] != k.shape[1]
        if b.all_visible:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask[:G], enable_gqa=gqa)


class Runner:
    """Runs the step's Forwards of many sequences over one paged cache (see the module docstring).

    Counts its calls in `steps`.
    """

    def __init__(self, model: LoopLM, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.steps = 0
        self.fixed_steps: dict[tuple, object] = {}  # (rows, ctx, compiled) -> kernels.fast_step.FixedStep

    def run_sequences(self, work: dict[int, Forward], reserve: int) -> list[LoopOutput]:
        """One step over {sequence id: Forward} outside an engine (tests and tools): a sequence
        is admitted for `reserve` positions when first seen, and its table grows to cover the
        Forward's positions. Returns the outputs in the dict's order."""
        pool = self.cache.pool
        items = []
        for seq, fwd in work.items():
            if seq not in pool.tables:
                pool.admit(seq, reserve)
            fwd.pos = torch.as_tensor(fwd.pos, device=self.cache.k.device)
            items.append((pool.ensure(seq, int(fwd.pos.max()) + 1), fwd))
        return self.run(items)

    def _fixed_ok(self, fwd: Forward) -> bool:
        return (fwd.step in FIXED_STEPS and not fwd.copy_slots and isinstance(fwd.start_loop, int)
                and fwd.start_loop == 0 and fwd.num_loops == self.model.num_loops
                and (fwd.logits is None or isinstance(fwd.logits, str) and fwd.logits == "last")
                and fwd.inputs.shape[:2] == (1, 1) and fwd.inputs.dtype in (torch.int32, torch.int64))

    @torch.inference_mode()
    def run(self, items: list[tuple[list[int], Forward]]) -> list[LoopOutput]:
        """items: (block table, Forward) per sequence; every position a Forward writes must be
        covered by its table. Returns one LoopOutput per item, shaped like the Forward."""
        m, cache = self.model, self.cache
        T = m.num_loops
        device = cache.k.device
        shapes = []
        copies: dict[int, list[int]] = {}  # source loop -> flat positions whose later slots take its K/V
        for table, fwd in items:
            fwd.pos = torch.as_tensor(fwd.pos, device=device)
            B, S = fwd.inputs.shape[:2]
            if fwd.pos.dim() == 1:
                fwd.pos = fwd.pos.expand(B, -1)
            if fwd.pos.shape != (B, S):
                raise ValueError(f"Forward pos shape {tuple(fwd.pos.shape)} does not match its inputs {(B, S)}")
            if isinstance(fwd.start_loop, torch.Tensor):
                if fwd.num_loops is None:
                    raise ValueError("num_loops is required when start_loop is a tensor")
                fwd.start_loop = fwd.start_loop.expand(B, S)
                lo, top = int(fwd.start_loop.min()), int(fwd.start_loop.max())
            else:
                lo = top = fwd.start_loop
            if fwd.num_loops is None:
                fwd.num_loops = T - lo
            if isinstance(fwd.num_loops, torch.Tensor):  # per-position counts
                fwd.num_loops = fwd.num_loops.expand(B, S)
                n, hi = fwd.num_loops, int((fwd.start_loop + fwd.num_loops).max())
                if int(n.min()) < 0 or int(n.max()) < 1:
                    raise ValueError(f"per-position num_loops must be >= 0 with one > 0, got {n.tolist()}")
                lo = int(torch.as_tensor(fwd.start_loop).expand(B, S)[n > 0].min())
            else:
                n, hi = fwd.num_loops, top + fwd.num_loops
                if n < 1:
                    raise ValueError(f"num_loops must be >= 1, got {n}")
            if lo < 0 or hi > T:
                raise ValueError(f"loops [{lo}, {hi}) are outside the model's {T} loops")
            shapes.append((B, S))
            for p, src in fwd.copy_slots:
                copies.setdefault(src, []).append(cache.flat(table, p))
        for src, flat in copies.items():  # one indexed copy per source loop for every request of the step
            cache.copy_slots(flat, src)
        outs: list[LoopOutput | None] = [None] * len(items)
        for kind in FIXED_STEPS:
            sel = [i for i, (_, fwd) in enumerate(items) if fwd.step == kind and self._fixed_ok(fwd)]
            if sel:
                for i, out in zip(sel, self._run_fixed([items[i] for i in sel], kind == "compiled")):
                    outs[i] = out
        rest = [i for i in range(len(items)) if outs[i] is None]
        if rest:
            for i, out in zip(rest, self._run_plan([items[i] for i in rest], [shapes[i] for i in rest])):
                outs[i] = out
        self.steps += 1
        return outs

    def _run_fixed(self, items, compiled: bool) -> list[LoopOutput]:
        """One-token full-depth decode rows through the fixed-shape step of their bucket."""
        from kernels.fast_step import FixedStep, bucket_ctx, bucket_rows  # kernels builds on looplm

        m, cache = self.model, self.cache
        device = cache.k.device
        n = len(items)
        pos = [int(fwd.pos.reshape(-1)[0]) for _, fwd in items]
        R, C = bucket_rows(n), bucket_ctx(max(pos) + 1)
        key = (R, C, compiled)
        if key not in self.fixed_steps:
            self.fixed_steps[key] = FixedStep(m, cache, R, C, compile=compiled)
        step = self.fixed_steps[key]
        ids = torch.cat([fwd.inputs.reshape(-1) for _, fwd in items])
        h = m.model.embed_tokens(ids)
        h = torch.cat([h, h.new_zeros(R - n, h.shape[-1])])
        pos_t = torch.tensor(pos + [0] * (R - n), device=device)
        scratch = cache.scratch_block * cache.block_size
        flat = [cache.flat(t, p) for (t, _), p in zip(items, pos)] + [scratch] * (R - n)
        index = cache.flat_index([t for t, _ in items] + [[cache.scratch_block]] * (R - n), C, device)
        hid = step(h, pos_t, flat, index)[:, :n]  # (T, n, H)
        gates = m.gate(hid) if any(fwd.gates for _, fwd in items) else None
        # the head after the last loop, batched over the rows that ask for it; after every loop per row
        last = [i for i, (_, fwd) in enumerate(items) if fwd.logits == "last" and fwd.logits_loops == "last"]
        head = dict(zip(last, m.head(hid[-1, last])[:, None, None, None])) if last else {}  # (1, 1, 1, V) each
        outs = []
        for i, (_, fwd) in enumerate(items):
            logits = None if fwd.logits is None else head[i] if i in head else m.head(hid[:, i, None, None])
            outs.append(LoopOutput(hid[:, i, None, None], gates[:, i, None, None] if fwd.gates else None, logits))
        return outs

    def _run_plan(self, items, shapes) -> list[LoopOutput]:
        m, cache = self.model, self.cache
        device = cache.k.device
        plan = _Plan(cache, items, device)
        h = self._inputs([items[i][1] for i in plan.order])  # (N, H)
        if plan.input_order is not None:
            h = h[plan.input_order]
        cos, sin = m.rotary(plan.pos_t[:, None], h.dtype)  # (N, 1, D)
        ctx = _Attend(plan, m.attention)
        want_gates = any(fwd.gates for _, fwd in items)
        hiddens, gates = [], []
        x = h[:, None]  # (N, 1, H): every token a row of one position
        for i in range(plan.max_steps):
            n = plan.active(i)
            ctx.at(i, n)
            x = m.loop_body(x[:n], cos[:n], sin[:n], ctx)
            hiddens.append(x[:, 0])
            if want_gates:
                gates.append(m.gate(x[:, 0]))
        cache.end_step()
        gates_in = None
        if want_gates and plan.active(0) < plan.n_tokens:  # tokens that ran no loop show their input's gate
            gates_in = torch.zeros(plan.n_tokens, dtype=torch.float32, device=device)
            gates_in[plan.active(0):] = m.gate(h[plan.active(0):])
        return self._outputs(items, plan, shapes, _stack(hiddens, h), _stack(gates, gates_in) if gates else None)

    def _inputs(self, fwds: list[Forward]) -> torch.Tensor:
        """(N, H) inputs of the step's tokens in the given Forward order: token ids of every Forward
        embedded in one lookup (ids were checked when the request was submitted), hidden states as
        they are."""
        ids = [f.inputs.dtype in (torch.int32, torch.int64) for f in fwds]
        if all(ids):
            return self.model.model.embed_tokens(torch.cat([f.inputs.reshape(-1) for f in fwds]))
        embed = self.model.model.embed_tokens
        return torch.cat([embed(f.inputs.reshape(-1)) if i else f.inputs.reshape(-1, f.inputs.shape[-1])
                          for f, i in zip(fwds, ids)])

    def _outputs(self, items, plan: _Plan, shapes, all_h, all_g) -> list[LoopOutput]:
        """all_h (steps, N, H), all_g (steps, N) or None: every loop step's states and gates of the
        step's tokens, a token that stopped repeating its last; a Forward's outputs are views of
        them (copies when its tokens were reordered)."""
        m = self.model
        outs: list[LoopOutput] = []
        H = all_h.shape[-1]
        # the states the head reads after a Forward's last loop, for one batched head call:
        # (loop, token) pairs of every Forward asking for "last" or per-row positions
        head_loop: list[int] = []
        head_tok: list[int] = []
        heads: list[tuple[int, int, tuple]] = []  # (item, rows selected, logits shape without V)
        for idx, ((_, fwd), (B, S)) in enumerate(zip(items, shapes)):
            sp = plan.spans[idx]
            n = fwd.most_loops()
            hid = all_h[:n, sp].view(n, B, S, H)
            gat = all_g[:n, sp].view(n, B, S) if fwd.gates else None
            out = LoopOutput(hid, gat, None)
            outs.append(out)
            where = fwd.logits
            if where is None:
                continue
            if fwd.logits_loops == "all":
                out.logits = m.head(_select(hid, where))
                continue
            if where == "all":
                toks, shape = [plan.layout(idx, j) for j in range(B * S)], (1, B, S)
            elif where == "last":
                toks, shape = [plan.layout(idx, b * S + S - 1) for b in range(B)], (1, B, 1)
            elif isinstance(where, torch.Tensor):
                toks, shape = [plan.layout(idx, b * S + j) for b, j in enumerate(where.view(-1).tolist())], (1, B, 1)
            else:
                raise ValueError(f"logits must be None, 'all', 'last' or a (B,) index tensor, got {where!r}")
            head_tok.extend(toks)
            head_loop.extend([n - 1] * len(toks))
            heads.append((idx, len(toks), shape))
        if heads:
            lg = m.head(all_h[head_loop, head_tok])  # (rows, V)
            o = 0
            for idx, k, shape in heads:
                outs[idx].logits = lg[o : o + k].view(*shape, -1)
                o += k
        return outs


def _stack(rows: list[torch.Tensor], init: torch.Tensor | None) -> torch.Tensor:
    """Per loop step (n_i, ...) values of the running prefix of N tokens -> (steps, N, ...): a token
    that stopped repeats its last value, one that never ran shows `init` (N, ...) (zeros if None)."""
    N = rows[0].shape[0] if init is None else init.shape[0]
    if all(x.shape[0] == N for x in rows):
        return torch.stack(rows)
    out = rows[0].new_empty(len(rows), N, *rows[0].shape[1:])
    prev = init if init is not None else rows[0].new_zeros(N, *rows[0].shape[1:])
    for i, x in enumerate(rows):
        n = x.shape[0]
        out[i, :n] = x
        out[i, n:] = prev[n:]
        prev = out[i]
    return out


def _select(h: torch.Tensor, where) -> torch.Tensor:
    """h (n, B, S, H) -> the positions `where` asks for: (n, B, S', H)."""
    if isinstance(where, torch.Tensor):
        B = h.shape[1]
        return h[:, torch.arange(B, device=h.device), where.view(-1)][:, :, None]
    if where == "last":
        return h[:, :, -1:]
    if where == "all":
        return h
    raise ValueError(f"logits must be None, 'all', 'last' or a (B,) index tensor, got {where!r}")


def drive(runner: Runner, seq: int, positions: int, decoder):
    """Runs one decoder alone over the runner's cache, outside an engine (tests and tools).

    Admits sequence id `seq` for `positions` cache positions and yields the decoder's Steps. The
    sequence's blocks stay allocated afterwards so its cache can be read back
    (`runner.cache.sequence(table, n)`); free them with `runner.cache.pool.release(seq)`.
    """
    runner.cache.pool.admit(seq, positions)
    value = None
    while True:
        try:
            item = decoder.send(value)
        except StopIteration:
            return
        if isinstance(item, Forward):
            value = runner.run_sequences({seq: item}, positions)[0]
        else:
            value = None
            yield item
