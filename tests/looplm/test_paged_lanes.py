"""BlockPool lanes (forks of a sequence's block table, looplm.lanes): sharing, copies, accounting."""

import random

import pytest
import torch

from looplm.config import LoopConfig
from looplm.paged import BlockPool, PagedKVCache, lane_blocks


def _check(pool: BlockPool, admitted: dict[int, int]) -> None:
    """Every taken block is held by a table and no free block is; per sequence, the distinct blocks
    its tables (its own and its lanes') hold plus its open reservation equal what it reserved."""
    held = {b for table in pool.tables.values() for b in table}
    assert held == set(range(pool.num_blocks)) - pool._free
    for seq, total in admitted.items():
        mine = {b for key, table in pool.tables.items() if key == seq or (isinstance(key, tuple) and key[0] == seq) for b in table}
        assert len(mine) + pool._reserved[seq] == total


def test_fork_shares_whole_blocks_and_owns_the_fork_block():
    bs = 4
    pool = BlockPool(32, bs)
    pool.admit(7, 20, extra_blocks=lane_blocks(2, 3, bs))
    table = list(pool.ensure(7, 10))  # positions 0..9: blocks 0, 1 and half of 2
    assert table == [0, 1, 2]
    copy = pool.fork(7, 1, 10)
    lane = pool.tables[7, 1]
    assert lane[:2] == table[:2] and lane[2] not in table
    assert copy == (table[2], lane[2], 2)  # positions 8, 9 of the fork block come from the sequence
    assert pool.fork(7, 2, 8) is None  # block-aligned: nothing to copy
    assert pool.tables[7, 2] == table[:2]
    assert pool.lane_copies(7) == [(table[2], lane[2], 2)]
    grown = pool.ensure_lane(7, 2, 12)
    assert grown[:2] == table[:2] and grown[2] not in table + lane
    assert pool.lanes(7) == {1: 10, 2: 8}
    with pytest.raises(ValueError, match="lane 1"):
        pool.fork(7, 1, 9)


def test_drop_adopt_and_release_return_every_block():
    bs = 4
    pool = BlockPool(40, bs)
    start = pool.free
    pool.admit(0, 30, extra_blocks=lane_blocks(3, 5, bs))
    pool.admit(1, 9)
    admitted = {0: 8 + 6, 1: 3}
    pool.ensure(1, 9)
    pool.ensure(0, 13)
    old = list(pool.tables[0])
    pool.fork(0, 1, 13)
    pool.fork(0, 2, 13)
    pool.ensure_lane(0, 1, 17)
    pool.ensure_lane(0, 2, 16)
    _check(pool, admitted)
    pool.drop(0, 2)
    _check(pool, admitted)
    winner = list(pool.tables[0, 1])
    pool.adopt(0, 1)
    assert pool.tables[0] == winner and pool.lanes(0) == {}
    assert old[3] in pool._free  # the replaced table's own fork block is free again
    assert all(b not in pool._free for b in winner)  # the shared prefix stayed with the new table
    _check(pool, admitted)
    pool.ensure(0, 30)  # the sequence still reaches its whole reservation
    _check(pool, admitted)
    pool.release(0)
    pool.release(1)
    assert pool.free == start and pool.used == 0 and pool._holders == {}


def test_random_fork_drop_adopt_sequences_conserve_blocks():
    bs = random.choice([2, 3, 4, 16])
    pool = BlockPool(200, bs)
    start = pool.free
    lanes, per_lane, positions = 4, 6, 60
    seqs = {s: 0 for s in range(3)}  # seq -> positions its table covers
    admitted = {}
    for s in seqs:
        pool.admit(s, positions, extra_blocks=lane_blocks(lanes, per_lane, bs))
        admitted[s] = pool.blocks_for(positions) + lane_blocks(lanes, per_lane, bs)
    next_lane = 1
    forks: dict[tuple[int, int], int] = {}  # (seq, lane) -> positions the lane covers
    ops = set()
    for _ in range(500):
        s = random.randrange(3)
        live = [lane for (q, lane) in forks if q == s]
        op = random.random()
        if op < 0.35 and seqs[s] < positions - per_lane:
            seqs[s] += random.randint(1, 3)
            pool.ensure(s, seqs[s])
        elif op < 0.55 and len(live) < lanes and seqs[s]:
            pos = seqs[s] - random.randint(0, min(2, seqs[s] - 1))
            pool.fork(s, next_lane, pos)
            forks[s, next_lane] = min(pos + random.randint(1, per_lane), positions)  # never past the reservation
            pool.ensure_lane(s, next_lane, forks[s, next_lane])
            next_lane += 1
            ops.add("fork")
        elif op < 0.75 and live:
            lane = random.choice(live)
            pool.drop(s, lane)
            del forks[s, lane]
            ops.add("drop")
        elif op < 0.85 and live:  # adopt one lane; its siblings are dropped first, as the decoder does
            lane = random.choice(live)
            for other in live:
                if other != lane:
                    pool.drop(s, other)
                    del forks[s, other]
            pool.adopt(s, lane)
            seqs[s] = forks.pop((s, lane))
            ops.add("adopt")
        _check(pool, admitted)
    assert ops == {"fork", "drop", "adopt"}
    for s in seqs:
        pool.release(s)
    assert pool.free == start and pool.used == 0 and pool._holders == {}


def test_lanes_beyond_their_reservation_raise():
    bs = 4
    pool = BlockPool(50, bs)
    pool.admit(0, 8, extra_blocks=lane_blocks(1, 3, bs))  # 2 blocks + 2 for one lane
    pool.ensure(0, 7)
    pool.fork(0, 1, 7)  # takes the lane's fork block
    pool.ensure_lane(0, 1, 9)  # and the next one
    with pytest.raises(RuntimeError, match="reserved"):
        pool.ensure_lane(0, 1, 13)
    pool.release(0)
    assert pool.used == 0


def test_lane_blocks_covers_the_worst_fork_offset():
    for bs in (1, 2, 4, 16):
        for n in range(1, 20):
            worst = max(-(-(off + n) // bs) for off in range(bs))  # blocks spanned from offset off
            assert lane_blocks(1, n, bs) == worst
            assert lane_blocks(3, n, bs) == 3 * worst
    assert lane_blocks(0, 5, 4) == lane_blocks(5, 0, 4) == 0


def test_copy_positions_copies_every_slot_and_layer():
    cfg = LoopConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, total_ut_steps=3, max_position_embeddings=32)
    cache = PagedKVCache(cfg, num_blocks=4, block_size=4)
    cache.k.normal_()
    cache.v.normal_()
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.copy_positions(1, 3, 3)
    assert torch.equal(cache.k[..., 12:15, :], k0[..., 4:7, :]) and torch.equal(cache.v[..., 12:15, :], v0[..., 4:7, :])
    keep = torch.ones(cache.k.shape[3], dtype=torch.bool)
    keep[12:15] = False
    assert torch.equal(cache.k[..., keep, :], k0[..., keep, :]) and torch.equal(cache.v[..., keep, :], v0[..., keep, :])
