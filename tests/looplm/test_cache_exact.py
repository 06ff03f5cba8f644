"""Invariant: cached incremental decoding equals the no-cache forward, at every loop."""

import pytest
import torch

from looplm.decoding import prefill

from .conftest import tiny_model


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_every_decode_step_matches_no_cache_per_loop_logits(gqa, tied):
    model = tiny_model(gqa=gqa, tied=tied, loops=4)
    B, P, N = 2, 5, 7
    seq = torch.randint(0, model.config.vocab_size, (B, P + N))
    full = model.per_loop_logits(seq)  # (T, B, S, V)
    cache = model.new_cache(B, P + N)
    with torch.no_grad():
        out = prefill(model, cache, seq[:, :P].tolist(), logits_loops="all")
        torch.testing.assert_close(out.logits[:, :, 0], full[:, :, P - 1], rtol=0, atol=1e-5)
        for p in range(P, P + N):
            step = model.forward_loops(model.embed(seq[:, p : p + 1]), torch.tensor([p]), cache, logits="all", logits_loops="all")
            torch.testing.assert_close(step.logits[:, :, 0], full[:, :, p], rtol=0, atol=1e-5)


def test_ragged_positions_and_multi_token_steps_match():
    model = tiny_model(loops=3)
    seq = torch.randint(0, model.config.vocab_size, (3, 12))
    full = model.per_loop_logits(seq)
    lengths = [2, 6, 4]
    cache = model.new_cache(3, 12)
    with torch.no_grad():
        prefill(model, cache, [seq[b, :n].tolist() for b, n in enumerate(lengths)])
        # one call, each row continuing from its own length with 3 tokens (a verification-shaped step)
        pos = torch.tensor(lengths)[:, None] + torch.arange(3)
        ids = seq.gather(1, pos)
        out = model.forward_loops(model.embed(ids), pos, cache, logits="all", logits_loops="all")
    want = torch.stack([full[:, b, pos[b]] for b in range(3)], 1)  # (T, B, 3, V)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)


def test_loop_range_resumes_from_saved_hidden_state():
    """Loops 1..k then k+1..T from the saved loop-k state equal one T-loop pass, cache included."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model.per_loop_logits(seq)
    for k in range(1, 4):
        cache = model.new_cache(2, 9)
        with torch.no_grad():
            prefill(model, cache, seq[:, :6].tolist())
            pos = torch.arange(6, 9)
            first = model.forward_loops(model.embed(seq[:, 6:]), pos, cache, num_loops=k, logits="all")
            rest = model.forward_loops(first.hidden[-1], pos, cache, start_loop=k, logits="all", logits_loops="all")
        torch.testing.assert_close(first.logits[0], full[k - 1, :, 6:], rtol=0, atol=1e-5)
        torch.testing.assert_close(rest.logits, full[k:, :, 6:], rtol=0, atol=1e-5)


def test_rows_at_different_loops_in_one_forward():
    """Finishing token p's last loops batched with token p+1's first loops keeps the exact cache."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (1, 8))
    full = model.per_loop_logits(seq)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        prefill(model, cache, seq[:, :6].tolist())
        early = model.forward_loops(model.embed(seq[:, 6:7]), torch.tensor([6]), cache, num_loops=2)  # token 6 exits at loop 2
        h = torch.cat([early.hidden[-1], model.embed(seq[:, 7:8])], 1)
        both = model.forward_loops(h, torch.tensor([6, 7]), cache, start_loop=torch.tensor([[2, 0]]), num_loops=2, logits="all", logits_loops="all")
        torch.testing.assert_close(both.logits[:, 0, 0], full[2:, 0, 6], rtol=0, atol=1e-5)  # token 6 at loops 3, 4
        torch.testing.assert_close(both.logits[:, 0, 1], full[:2, 0, 7], rtol=0, atol=1e-5)  # token 7 at loops 1, 2
        last = model.forward_loops(both.hidden[-1][:, 1:], torch.tensor([7]), cache, start_loop=2, logits="all", logits_loops="all")
    torch.testing.assert_close(last.logits[:, 0, 0], full[2:, 0, 7], rtol=0, atol=1e-5)


def test_cache_reports_its_size():
    model = tiny_model(loops=3, layers=2)
    cache = model.new_cache(2, 10)
    cfg = model.config
    per_token = 2 * cfg.total_ut_steps * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cache.bytes_per_token() == per_token
    assert cache.nbytes == per_token * 2 * 10


@pytest.mark.parametrize("n,step", [(2, 2), (4, 1), (3, 1)])
def test_diagonal_write_equals_the_indexed_write(n, step):
    """write_diagonal (token i at loop lo + i*step, position p0 - i) stores what `write` stores."""
    model = tiny_model(loops=4, layers=2)
    a, b = model.new_cache(3, 12), model.new_cache(3, 12)
    cfg = model.config
    k = torch.randn(n, cfg.num_key_value_heads, 1, cfg.head_dim)
    v = torch.randn(n, cfg.num_key_value_heads, 1, cfg.head_dim)
    lo, row, p0, layer = 4 - 1 - step * (n - 1), 2, 9, 1
    loops = torch.tensor([[lo + i * step] for i in range(n)])
    a.write(loops, layer, torch.full((n, 1), row), torch.tensor([[p0 - i] for i in range(n)]), k, v)
    b.write_diagonal(lo, step, layer, row, p0, k, v)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and a.k.abs().sum() > 0


def test_pipelined_rows_of_one_sequence_write_the_diagonal_and_stay_exact():
    """A single sequence's tokens at loops lo, lo+d, ... and consecutive positions (the pipeline's call)."""
    model = tiny_model(loops=4)
    seq = torch.randint(0, model.config.vocab_size, (1, 9))
    full = model.per_loop_logits(seq)
    cache = model.new_cache(1, 9)
    calls = []
    write_diagonal = cache.write_diagonal
    cache.write_diagonal = lambda *a: (calls.append(a[:5]), write_diagonal(*a))
    with torch.no_grad():
        prefill(model, cache, seq[:, :6].tolist())
        first = model.forward_loops(model.embed(seq[:, 6:7]), torch.tensor([6]), cache, num_loops=2)
        assert calls == [(0, 1, 0, 0, 6), (0, 1, 1, 0, 6), (1, 1, 0, 0, 6), (1, 1, 1, 0, 6)]  # batch-1 steps write plainly too
        calls.clear()
        h = torch.cat([model.embed(seq[:, 7:8])[0], first.hidden[-1][0]])[:, None]  # newest first, as the pipeline orders rows
        both = model.forward_loops(h, torch.tensor([[7], [6]]), cache, start_loop=torch.tensor([[0], [2]]), num_loops=2,
                                   batch_idx=torch.tensor([0, 0]), logits="all", logits_loops="all")
    torch.testing.assert_close(both.logits[:, 1, 0], full[2:, 0, 6], rtol=0, atol=1e-5)  # token 6 at loops 3, 4
    torch.testing.assert_close(both.logits[:, 0, 0], full[:2, 0, 7], rtol=0, atol=1e-5)  # token 7 at loops 1, 2
    assert calls == [(0, 2, 0, 0, 7), (0, 2, 1, 0, 7), (1, 2, 0, 0, 7), (1, 2, 1, 0, 7)]  # (loop, step, layer, row, pos)
