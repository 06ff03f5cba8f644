"""Lanes: rows of one sequence's Forward that sit at the same positions on forked block tables.

A draft tree (spec.trees) runs sibling candidates for one position in the same Forward. Each
sibling's lane is the sequence's accepted prefix plus its own tokens, so its positions past the
fork need K/V of their own: lane l of sequence s is a fork of s's block table (looplm.paged.
BlockPool.fork) that shares s's blocks before the fork and owns the rest. Lane 0 is the sequence
itself. A `LaneForward` names each row's lane and the table operations to apply before it runs
(drop lanes, let a lane's table become the sequence's, fork new lanes); `run_lanes` applies them,
runs each lane's rows as one item of the runner step with the lane's table, and puts the outputs
back in row order. Nothing is rolled back: a dropped lane's blocks are simply released. A plain
Forward of a sequence ends its lanes (`end_lanes`: its tree decoder has stopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import LoopOutput
from .runner import Runner
from .work import Forward


@dataclass
class LaneForward(Forward):
    """A Forward of one-position rows (B, 1), row b on lane `lanes[b]`; table operations first.

    Attributes (beyond Forward's; `num_loops` is required, `logits` and `copy_slots` unused):
        lanes: (B,) lane of each row; 0 is the sequence's own table.
        drop: lanes to release.
        adopt: a lane whose table becomes the sequence's (its old table is released), or None.
        forks: (lane, position) pairs: new lanes forked off the sequence's table (after `adopt`)
            that own positions >= position.
    Applied in that order, before the rows run.
    """

    lanes: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    adopt: int | None = None
    forks: list[tuple[int, int]] = field(default_factory=list)


def run_lanes(runner: Runner, work: list[tuple[int, Forward]]) -> list[LoopOutput]:
    """One runner step over (sequence id, Forward) pairs, some of them LaneForwards; ensures every
    table covers its positions. Returns one LoopOutput per pair, shaped like its Forward."""
    cache = runner.cache
    pool = cache.pool
    items, spans = [], []
    for seq, fwd in work:
        fwd.pos = torch.as_tensor(fwd.pos, device=cache.k.device)
        if not isinstance(fwd, LaneForward):
            spans.append((len(items), len(items) + 1, None))
            items.append((pool.ensure(seq, int(fwd.pos.max()) + 1), fwd))
            continue
        B = _check(pool, seq, fwd)
        _apply(cache, seq, fwd)
        if not any(fwd.lanes):  # the sequence alone: one item, as a plain Forward (its table may be read as a view)
            spans.append((len(items), len(items) + 1, None))
            items.append((pool.ensure(seq, int(fwd.pos.max()) + 1), fwd))
            continue
        first, order = len(items), []
        start = fwd.start_loop if isinstance(fwd.start_loop, torch.Tensor) else torch.full((B, 1), fwd.start_loop)
        start = start.to(fwd.pos.device).expand(B, 1)
        for lane in dict.fromkeys(fwd.lanes):  # lanes in order of first appearance
            rows = [b for b in range(B) if fwd.lanes[b] == lane]
            order += rows
            idx = torch.tensor(rows, device=fwd.pos.device)
            pos = fwd.pos[idx]
            table = pool.ensure(seq, int(pos.max()) + 1) if lane == 0 else pool.ensure_lane(seq, lane, int(pos.max()) + 1)
            items.append((table, Forward(fwd.inputs[idx], pos, start_loop=start[idx], num_loops=fwd.num_loops, gates=fwd.gates)))
        spans.append((first, len(items), None if order == list(range(B)) else torch.tensor(order).argsort()))
    outs = runner.run(items)
    merged = []
    for a, b, inverse in spans:
        if b - a == 1 and inverse is None:
            merged.append(outs[a])
            continue
        hidden = torch.cat([o.hidden for o in outs[a:b]], 1)  # (loops, B, 1, H) in lane order
        gates = torch.cat([o.gates for o in outs[a:b]], 1) if outs[a].gates is not None else None
        if inverse is not None:
            inverse = inverse.to(hidden.device)
            hidden, gates = hidden[:, inverse], gates[:, inverse] if gates is not None else None
        merged.append(LoopOutput(hidden, gates, None))
    return merged


def end_lanes(pool, seq: int, fwd: Forward) -> None:
    """A plain (not lane) Forward of a sequence drops the lanes it still has, before it runs.

    Only a tree decoder's LaneForwards keep lanes, and its drops ride on its next LaneForward. A
    tree decoder closed mid-request (spec.fallback switching the request to full depth on the same
    sequence) yields no further Forward, so the side lanes it had in flight, and any drop or
    adoption it had decided, would otherwise hold their blocks until the request ends. Dropping
    every lane is right for the sequence that goes on: its own table (lane 0's) holds every loop
    of every position before the last emitted token (the tokens behind it left loop T on it), and
    a pending adoption concerns only the last emitted token's position and later ones, which the
    next Forward rewrites (full depth runs the last emitted token's T loops) before any query
    reads them.
    """
    if not isinstance(fwd, LaneForward):
        for lane in list(pool.lanes(seq)):
            pool.drop(seq, lane)


def _check(pool, seq: int, fwd: LaneForward) -> int:
    """Raises before any table changes when the LaneForward cannot run; returns its rows B."""
    B, S = fwd.inputs.shape[:2]
    if S != 1 or len(fwd.lanes) != B:
        raise ValueError(f"a LaneForward has one position per row and one lane per row: inputs {tuple(fwd.inputs.shape[:2])}, "
                         f"{len(fwd.lanes)} lanes")
    if fwd.num_loops is None or fwd.logits is not None or fwd.copy_slots:
        raise ValueError("a LaneForward sets num_loops and asks for no logits and no copy_slots")
    live = set(pool.lanes(seq))
    gone = set(fwd.drop) | ({fwd.adopt} if fwd.adopt is not None else set())
    if not gone <= live:
        raise ValueError(f"sequence {seq} drops or adopts lanes {sorted(gone - live)}, which it has not forked")
    new = [lane for lane, _ in fwd.forks]
    if 0 in new or len(set(new)) < len(new) or set(new) & (live - gone):
        raise ValueError(f"sequence {seq} forks lanes {new}: each must be new and not 0")
    live = (live - gone) | set(new)
    missing = {lane for lane in fwd.lanes if lane} - live
    if missing:
        raise ValueError(f"rows of sequence {seq} name lanes {sorted(missing)}, which it has not forked")
    return B


def _apply(cache, seq: int, fwd: LaneForward) -> None:
    """The LaneForward's table operations, after refreshing the lanes' copies of their fork blocks."""
    pool = cache.pool
    for lane in fwd.drop:
        pool.drop(seq, lane)
    for src, dst, n in pool.lane_copies(seq):  # before adopt: the adopted lane gets the prefix's last writes
        cache.copy_positions(src, dst, n)
    if fwd.adopt is not None:
        pool.adopt(seq, fwd.adopt)
    for lane, pos in fwd.forks:
        copy = pool.fork(seq, lane, pos)
        if copy is not None:
            cache.copy_positions(*copy)
