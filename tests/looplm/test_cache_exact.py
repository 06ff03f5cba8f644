"""Invariant: the runner's cached, paged incremental computation equals the no-cache forward, at every loop."""

import random

import pytest
import torch

from looplm.paged import PagedKVCache
from looplm.runner import Runner
from looplm.work import Forward

from .conftest import tiny_model


def make_runner(model, *, block_size=4, num_blocks=64, kv="per_loop", fragment=False) -> Runner:
    """A runner over a fresh paged cache; `fragment` hands out blocks in a shuffled order, so a
    sequence's blocks are not contiguous and every read goes through the block table gather."""
    cache = PagedKVCache(model.config, num_blocks, block_size, kv=kv)
    if fragment:
        free = list(range(num_blocks))
        random.shuffle(free)
        cache.pool.ensure = _shuffled_ensure(cache.pool, iter(free))
    return Runner(model, cache)


def _shuffled_ensure(pool, order):
    def ensure(seq, positions):
        table = pool.tables[seq]
        while len(table) * pool.block_size < positions:
            block = next(order)
            pool._free.remove(block)
            pool._reserved[seq] -= 1
            table.append(block)
        return table

    return ensure


def step(runner, work: dict[int, Forward]):
    """One runner step over {sequence id: Forward}; sequences are admitted on first sight."""
    return runner.run_sequences(work, 64)


def prompt_forward(model, ids, **kw) -> Forward:
    return Forward(torch.tensor([ids]), torch.arange(len(ids))[None], **kw)


@pytest.mark.parametrize("fragment", [False, True])
@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_every_decode_step_matches_no_cache_per_loop_logits(gqa, tied, fragment):
    model = tiny_model(gqa=gqa, tied=tied, loops=4)
    B, P, N = 2, 5, 7
    seq = torch.randint(0, model.config.vocab_size, (B, P + N))
    full = model.per_loop_logits(seq)  # (T, B, S, V)
    runner = make_runner(model, fragment=fragment)
    outs = step(runner, {b: prompt_forward(model, seq[b, :P].tolist(), logits="last", logits_loops="all") for b in range(B)})
    for b in range(B):
        torch.testing.assert_close(outs[b].logits[:, 0, 0], full[:, b, P - 1], rtol=0, atol=1e-5)
    for p in range(P, P + N):  # both sequences' decode rows in one runner step
        outs = step(runner, {b: Forward(seq[b : b + 1, p : p + 1], [[p]], logits="all", logits_loops="all") for b in range(B)})
        for b in range(B):
            torch.testing.assert_close(outs[b].logits[:, 0, 0], full[:, b, p], rtol=0, atol=1e-5)


def test_ragged_sequences_and_multi_token_steps_match():
    model = tiny_model(loops=3)
    seq = torch.randint(0, model.config.vocab_size, (3, 12))
    full = model.per_loop_logits(seq)
    lengths = [2, 6, 4]
    runner = make_runner(model, fragment=True)
    step(runner, {b: prompt_forward(model, seq[b, :n].tolist()) for b, n in enumerate(lengths)})
    # one step, each sequence continuing from its own length with 3 tokens (a verification-shaped step)
    pos = torch.tensor(lengths)[:, None] + torch.arange(3)
    outs = step(runner, {b: Forward(seq[b : b + 1].gather(1, pos[b : b + 1]), pos[b : b + 1], logits="all", logits_loops="all")
                         for b in range(3)})
    for b in range(3):
        torch.testing.assert_close(outs[b].logits[:, 0], full[:, b, pos[b]], rtol=0, atol=1e-5)


def test_loop_range_resumes_from_saved_hidden_state():
    """Loops 1..k then k+1..T from the saved loop-k state equal one T-loop pass, cache included."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (1, 9))
    full = model.per_loop_logits(seq)
    for k in range(1, 4):
        runner = make_runner(model)
        step(runner, {0: prompt_forward(model, seq[0, :6].tolist())})
        pos = torch.arange(6, 9)[None]
        first = step(runner, {0: Forward(seq[:, 6:], pos, num_loops=k, logits="all")})[0]
        rest = step(runner, {0: Forward(first.hidden[-1], pos, start_loop=k, logits="all", logits_loops="all")})[0]
        torch.testing.assert_close(first.logits[0], full[k - 1, :, 6:], rtol=0, atol=1e-5)
        torch.testing.assert_close(rest.logits, full[k:, :, 6:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["positions", "rows"])
def test_tokens_at_different_loops_in_one_step(layout):
    """Finishing token p's last loops with token p+1's first loops keeps the exact cache, whether
    the Forward lays the tokens out as positions of a row (anytime) or as rows (the pipeline)."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (1, 8))
    full = model.per_loop_logits(seq)
    runner = make_runner(model, block_size=2, fragment=True)
    step(runner, {0: prompt_forward(model, seq[0, :6].tolist())})
    early = step(runner, {0: Forward(seq[:, 6:7], [[6]], num_loops=2)})[0]  # token 6 exits at loop 2
    h = torch.cat([early.hidden[-1], model.embed(seq[:, 7:8])], 1)  # (1, 2, H)
    if layout == "positions":
        both = step(runner, {0: Forward(h, [[6, 7]], start_loop=torch.tensor([[2, 0]]), num_loops=2, logits="all", logits_loops="all")})[0]
        at6, at7 = both.logits[:, 0, 0], both.logits[:, 0, 1]
        nxt = both.hidden[-1][:, 1:]
    else:  # newest first, as the pipeline orders its rows
        both = step(runner, {0: Forward(h.flip(1).transpose(0, 1), [[7], [6]], start_loop=torch.tensor([[0], [2]]), num_loops=2,
                                        logits="all", logits_loops="all")})[0]
        at6, at7 = both.logits[:, 1, 0], both.logits[:, 0, 0]
        nxt = both.hidden[-1][:1]
    torch.testing.assert_close(at6, full[2:, 0, 6], rtol=0, atol=1e-5)  # token 6 at loops 3, 4
    torch.testing.assert_close(at7, full[:2, 0, 7], rtol=0, atol=1e-5)  # token 7 at loops 1, 2
    last = step(runner, {0: Forward(nxt, [[7]], start_loop=2, logits="all", logits_loops="all")})[0]
    torch.testing.assert_close(last.logits[:, 0, 0], full[2:, 0, 7], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["positions", "rows"])
def test_per_position_loop_counts_in_one_step(layout):
    """A Forward whose positions run different numbers of loops (token 6 finishes its loop 4 while
    token 7 runs loops 1-3, and a position that runs none), beside another sequence's plain
    Forward in the same step: every position's states equal the no-cache forward's, a position
    that stopped repeats its last state and gate, one that ran none shows its input, and the cache
    stays exact (the next step finishes token 7 from it)."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        full = model.loop_outputs(seq)  # hidden (T, B, S, H), logits (T, B, S, V)
    runner = make_runner(model, block_size=2, fragment=True)
    step(runner, {b: prompt_forward(model, seq[b, :6].tolist()) for b in range(2)})
    at3 = step(runner, {0: Forward(seq[:1, 6:7], [[6]], num_loops=3), 1: Forward(seq[1:, 6:7], [[6]], num_loops=1)})
    carried = torch.randn(model.config.hidden_size)  # the state of a position that runs no loop
    h = torch.stack([at3[0].hidden[-1, 0, 0], model.embed(seq[:1, 7:8])[0, 0], carried])  # tokens 6, 7, a carried state
    pos, start, loops = [6, 7, 8], [3, 0, 1], [1, 3, 0]
    plain = Forward(at3[1].hidden[-1], [[6]], start_loop=1, num_loops=2, logits="all", logits_loops="all")
    if layout == "positions":
        fwd = Forward(h[None], [pos], start_loop=torch.tensor([start]), num_loops=torch.tensor([loops]),
                      logits="all", logits_loops="all")
        out, side = step(runner, {0: fwd, 1: plain})
        hid, lg, g = out.hidden[:, 0], out.logits[:, 0], out.gates[:, 0]  # (3, positions, ...)
    else:  # one row per token
        fwd = Forward(h[:, None], [[p] for p in pos], start_loop=torch.tensor(start)[:, None],
                      num_loops=torch.tensor(loops)[:, None], logits="all", logits_loops="all")
        out, side = step(runner, {0: fwd, 1: plain})
        hid, lg, g = out.hidden[:, :, 0], out.logits[:, :, 0], out.gates[:, :, 0]
    assert hid.shape[0] == 3 and lg.shape[0] == 3
    with torch.inference_mode():
        torch.testing.assert_close(hid[:, 0], full.hidden[3, 0, 6].expand(3, -1), rtol=0, atol=1e-5)  # loop 4, repeated
        torch.testing.assert_close(hid[:, 1], full.hidden[:3, 0, 7], rtol=0, atol=1e-5)  # loops 1-3
        assert torch.equal(hid[:, 2], carried.expand(3, -1))
        torch.testing.assert_close(lg[:, 0], full.logits[3, 0, 6].expand(3, -1), rtol=0, atol=1e-5)
        torch.testing.assert_close(lg[:, 1], full.logits[:3, 0, 7], rtol=0, atol=1e-5)
        torch.testing.assert_close(g, model.gate(hid), rtol=0, atol=1e-6)
        torch.testing.assert_close(side.logits[:, 0, 0], full.logits[1:3, 1, 6], rtol=0, atol=1e-5)
    last = step(runner, {0: Forward(hid[-1, 1][None, None], [[7]], start_loop=3, logits="all")})[0]
    torch.testing.assert_close(last.logits[0, 0, 0], full.logits[3, 0, 7], rtol=0, atol=1e-5)


def test_per_position_loop_counts_are_checked():
    model = tiny_model(loops=4)
    runner = make_runner(model)
    step(runner, {0: prompt_forward(model, [1, 2, 3])})
    h = torch.randn(1, 2, model.config.hidden_size)
    for start, loops, msg in (([[0, 3]], [[2, 2]], r"loops \[0, 5\) are outside"), ([[0, 0]], [[0, 0]], "one > 0"),
                              ([[0, 0]], [[1, -1]], ">= 0")):
        with pytest.raises(ValueError, match=msg):
            step(runner, {0: Forward(h, [[3, 4]], start_loop=torch.tensor(start), num_loops=torch.tensor(loops))})


def test_cache_reports_its_size_and_shared_modes_are_T_times_smaller():
    model = tiny_model(loops=3, layers=2)
    cfg = model.config
    per_token = 2 * cfg.total_ut_steps * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    cache = PagedKVCache(cfg, 5, 4)
    assert cache.bytes_per_token() == per_token
    assert cache.nbytes == per_token * (5 + 1) * 4  # the pool's blocks and one scratch block
    for kv in ("last", "mean"):
        assert PagedKVCache(cfg, 5, 4, kv=kv).nbytes * cfg.total_ut_steps == cache.nbytes


def test_block_pool_reserves_grows_and_frees():
    model = tiny_model(loops=2)
    pool = PagedKVCache(model.config, 6, 4).pool
    pool.admit(0, 9)  # 3 blocks reserved
    assert pool.free == 3 and pool.used == 0
    assert not pool.can_admit(13) and pool.can_admit(12)
    assert pool.ensure(0, 5) == [0, 1] and pool.used == 2 and pool.free == 3
    pool.admit(1, 12)
    assert pool.free == 0
    with pytest.raises(RuntimeError, match="reservation"):
        pool.ensure(0, 13)
    assert pool.ensure(1, 4) == [2]  # the block after sequence 0's is free: taken by the next one asked
    pool.release(0)
    assert pool.used == 1 and pool.free == 5 - 2
    pool.release(1)
    assert pool.used == 0 and pool.free == 6 and pool.tables == {}


@pytest.mark.parametrize("lengths", [(6, 6), (4, 7)])  # decode rows of equal length (no mask) and ragged (masked)
def test_gates_are_computed_for_the_forwards_that_ask_and_change_nothing_else(lengths):
    model = tiny_model(loops=4)
    seqs = [torch.randint(0, model.config.vocab_size, (n + 1,)) for n in lengths]
    outs = {}
    for ask in ((True, True), (True, False), (False, False)):
        runner = make_runner(model)
        step(runner, {b: prompt_forward(model, s[:-1].tolist()) for b, s in enumerate(seqs)})
        outs[ask] = step(runner, {b: Forward(s[None, -1:], [[len(s) - 1]], logits="last", gates=ask[b]) for b, s in enumerate(seqs)})
    for ask, out in outs.items():
        for b, o in enumerate(out):
            assert torch.equal(o.hidden, outs[True, True][b].hidden) and torch.equal(o.logits, outs[True, True][b].logits)
            if ask[b]:
                with torch.inference_mode():
                    torch.testing.assert_close(o.gates, model.gate(o.hidden), rtol=0, atol=1e-6)
            else:
                assert o.gates is None
