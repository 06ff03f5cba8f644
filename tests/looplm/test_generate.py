"""Full-depth generation: ragged batches, sampling, stops, streaming."""

import queue

import pytest
import torch

import looplm
from looplm.sampling import SamplingParams, probabilities

from .conftest import random_prompts, tiny_model


def greedy_by_no_cache(model, prompt, n):
    """Greedy continuation from repeated no-cache forwards: the oracle for decode_full."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.per_loop_logits(torch.tensor([seq]))[-1, 0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_no_cache_argmax(engine):
    prompt = random_prompts(1, engine.config.vocab_size)[0]
    out = engine.generate(prompt, max_new_tokens=10, stop=[])
    assert out.tokens == greedy_by_no_cache(engine.model, prompt, 10)
    assert out.loops == [engine.config.total_ut_steps] * 10


def test_ragged_batch_equals_each_prompt_alone(engine):
    prompts = random_prompts(3, engine.config.vocab_size, lo=1, hi=15)
    prompts[0] = prompts[0][:1]  # lengths differ a lot
    batch = engine.generate(prompts, max_new_tokens=12, stop=[])
    assert [g.tokens for g in batch] == [engine.generate(p, max_new_tokens=12, stop=[]).tokens for p in prompts]


def test_stop_token_ends_only_its_row():
    engine = looplm.Engine(tiny_model())
    prompts = random_prompts(2, engine.config.vocab_size)
    free = engine.generate(prompts, max_new_tokens=8, stop=[])
    stop_id = free[0].tokens[2]
    cut = engine.generate(prompts, max_new_tokens=8, stop=[stop_id])
    first = free[0].tokens.index(stop_id)
    assert cut[0].tokens == free[0].tokens[: first + 1] and cut[0].finish_reason == "stop"
    expect1 = free[1].tokens[: free[1].tokens.index(stop_id) + 1] if stop_id in free[1].tokens else free[1].tokens
    assert cut[1].tokens == expect1


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    prompt = random_prompts(1, engine.config.vocab_size)[0]
    a = engine.generate(prompt, max_new_tokens=20, temperature=1.5, seed=7, stop=[]).tokens
    b = engine.generate(prompt, max_new_tokens=20, temperature=1.5, seed=7, stop=[]).tokens
    c = engine.generate(prompt, max_new_tokens=20, temperature=1.5, seed=8, stop=[]).tokens
    assert a == b and a != c


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.randn(5, 40)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    assert ((p > 0).sum(-1) == 3).all()
    assert torch.equal(p.argmax(-1), logits.argmax(-1))
    q = probabilities(logits, SamplingParams(temperature=0.7, top_p=0.6))
    full = (logits / 0.7).softmax(-1)
    for row in range(5):
        kept = q[row] > 0
        # the kept set is the smallest top set whose mass reaches 0.6
        assert full[row][kept].sum() >= 0.6 - 1e-6
        assert full[row][kept].sum() - full[row][kept].min() < 0.6
        torch.testing.assert_close(q[row][kept], full[row][kept] / full[row][kept].sum())
    torch.testing.assert_close(q.sum(-1), torch.ones(5))


def test_sampled_tokens_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    from looplm.sampling import sample

    draws = torch.stack([sample(probabilities(logits, SamplingParams(temperature=1.0)), g) for _ in range(20000)])
    freq = torch.bincount(draws.view(-1), minlength=4).float() / draws.numel()
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.015


def test_stream_yields_steps_with_loops_and_latency(engine):
    prompt = random_prompts(1, engine.config.vocab_size)[0]
    steps = list(engine.stream(prompt, max_new_tokens=5, stop=[]))
    assert [s.index for s in steps] == list(range(5))
    assert all(s.loops == engine.config.total_ut_steps and s.latency_ms >= 0 for s in steps)
    assert [s.token for s in steps] == engine.generate(prompt, max_new_tokens=5, stop=[]).tokens


def test_generate_queues_no_steps_yet_records_what_a_stream_delivers(engine, monkeypatch):
    prompts = random_prompts(2, engine.config.vocab_size)
    stream = engine.stream(prompts, max_new_tokens=6, stop=[], mode="anytime", budget_loops=2)
    streamed = list(stream)
    quiet = engine.generate(prompts, max_new_tokens=6, stop=[], mode="anytime", budget_loops=2)
    for row, (g, s) in enumerate(zip(quiet, stream.generations)):
        mine = [x for x in streamed if x.row == row]
        assert [x.token for x in g.steps] == [x.token for x in mine] == s.tokens == g.tokens
        assert [x.exit_loop for x in g.steps] == [x.exit_loop for x in mine] and g.text == s.text
    puts = []

    class Counting(queue.Queue):
        def put(self, item, *a, **k):
            puts.append(item)
            super().put(item, *a, **k)

    submit = engine.scheduler.submit

    def spy(requests):
        for r in requests:
            r.out = Counting()
        submit(requests)

    monkeypatch.setattr(engine.scheduler, "submit", spy)
    assert len(engine.generate(prompts[0], max_new_tokens=3, stop=[]).tokens) == 3
    assert len(puts) == 1  # the end only: the caller's thread woke once
    list(engine.stream(prompts[0], max_new_tokens=3, stop=[]))
    assert len(puts) == 1 + 4  # a stream's consumer gets every Step and the end


def test_generation_up_to_the_context_limit_is_truncated_with_a_reason(engine):
    ctx = engine.config.max_position_embeddings
    prompt = random_prompts(1, engine.config.vocab_size, lo=ctx - 4, hi=ctx - 4)[0]
    out = engine.generate(prompt, max_new_tokens=50, stop=[])
    assert len(out.tokens) == 4 and out.finish_reason == "context"
    assert out.tokens == greedy_by_no_cache(engine.model, prompt, 4)


def test_stats_report_speed_and_loops(engine):
    out = engine.generate([1, 2, 3], max_new_tokens=4, stop=[])
    assert out.stats["new_tokens"] == 4 and out.stats["tokens_per_s"] > 0
    assert out.stats["mean_loops"] == engine.config.total_ut_steps and out.stats["prefill_ms"] > 0


def test_stream_exposes_its_generations(engine):
    prompts = [[1, 2, 3], [4, 5]]
    stream = engine.stream(prompts, max_new_tokens=4, stop=[])
    first = next(stream)  # the prompts run concurrently: the other request may be ahead or behind
    assert first.row == 0 and stream.generations[0].tokens[0] == first.token
    assert [len(g.tokens) for g in stream.generations][0] >= 1
    rest = list(stream)
    assert 1 + len(rest) == 8 and [s.row for s in rest] == [0] * 3 + [1] * 4  # each prompt's steps in turn
    assert [g.tokens for g in stream.generations] == [g.tokens for g in engine.generate(prompts, max_new_tokens=4, stop=[])]
    assert all(g.stats["new_tokens"] == 4 for g in stream.generations)



def _scripted_decoder(model, req, *, script):
    """A decoder that emits a fixed token sequence (drives the facade's text assembly)."""
    from looplm.decoding import Step

    for i, t in enumerate(script):
        yield Step(0, i, t, 1, 1, 0.0, "scripted")


def test_streamed_pieces_never_split_a_character(monkeypatch):
    """Byte-level tokens can end inside a UTF-8 character: pieces must still add up to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from looplm import decoding
    from looplm.tokenizer import Tokenizer as LoopTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    engine = looplm.Engine(tiny_model(vocab=tok.get_vocab_size()), LoopTokenizer(tok))
    ids = engine.encode("é€ a")
    assert len(ids) == 7  # one token per byte: 2 + 3 + 1 + 1
    monkeypatch.setitem(decoding.MODES, "scripted", f"{__name__}:_scripted_decoder")
    stream = engine.stream([1], max_new_tokens=len(ids), stop=[], mode="scripted", script=ids)
    pieces = [s.text for s in stream]
    assert "".join(pieces) == "é€ a" == stream.generations[0].text
    assert all("\ufffd" not in p for p in pieces) and pieces[0] == "" and pieces[1] == "é"


def test_checkpoint_recommended_mode_options_are_defaults_and_explicit_options_win():
    from looplm.config import LoopConfig
    from looplm.model import LoopLM

    cfg = LoopConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, total_ut_steps=4, max_position_embeddings=32)
    model = LoopLM(cfg).init_weights(int(torch.randint(0, 1000, ())), std=0.2).eval()
    engine = looplm.Engine(model, generation_config={"looplm": {"speculative": {"draft_loop": 1, "draft_len": 2}}})
    assert engine.generate([1, 2, 3], max_new_tokens=6, stop=[], mode="speculative").stats["draft_loop"] == 1
    st = engine.generate([1, 2, 3], max_new_tokens=6, stop=[], mode="speculative", draft_loop=3).stats
    assert (st["draft_loop"], st["draft_len"]) == (3, 2)
    assert "draft_loop" not in engine.generate([1, 2], max_new_tokens=2, stop=[]).stats  # other modes untouched
    bad = looplm.Engine(model, generation_config={"looplm": {"speculative": 2}})
    with pytest.raises(ValueError, match="generation_config"):
        bad.generate([1, 2], max_new_tokens=2, mode="speculative")
    assert bad.generate([1, 2], max_new_tokens=2, stop=[]).tokens  # still usable


def test_incremental_text_equals_full_decodes_and_decodes_only_a_window():
    """Byte-level tokens that split multi-byte characters, random ids, and a Metaspace-style decoder."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    from looplm.tokenizer import IncrementalText, Tokenizer

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    hf.train_from_iterator(["é€ a b ab 漢字 naïve"] * 10, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf)
    widths = []
    decode = lambda ids: (widths.append(len(ids)), tok.decode(ids))[1]  # noqa: E731
    ids = torch.randint(0, hf.get_vocab_size(), (60,)).tolist() + tok.encode("漢字 é€ naïve")
    inc = IncrementalText(decode)
    for n in range(1, len(ids) + 1):
        got = inc.update(ids[:n])
        full = tok.decode(ids[:n])
        assert got == full or (got.rstrip("\ufffd") == full.rstrip("\ufffd")), n
    assert max(widths[-20:]) < 12  # windows, not the whole list
    # a decoder that drops a leading space at the start of what it decodes (Metaspace-like)
    words = ["▁Hello", "▁world", "!", "▁again"]
    meta = lambda ids: "".join(words[i] for i in ids).replace("▁", " ").lstrip(" ")  # noqa: E731
    inc = IncrementalText(meta)
    for n in range(1, 5):
        assert inc.update(list(range(n))) == meta(list(range(n)))


def test_finished_rows_stop_computing_and_outputs_are_unchanged():
    """A ragged batch (one row ends at a stop token, one at its context limit) decodes each row as
    alone, sampled or greedy, and computes loops only for rows still generating."""
    from looplm.config import LoopConfig
    from looplm.model import LoopLM

    cfg = LoopConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, total_ut_steps=3, max_position_embeddings=24)
    model = LoopLM(cfg).init_weights(int(torch.randint(0, 1000, ())), std=0.3).eval()
    engine = looplm.Engine(model)
    prompts = [torch.randint(0, 32, (n,)).tolist() for n in (4, 20, 6)]
    alone = [engine.generate(p, max_new_tokens=10, stop=[]) for p in prompts]
    stop = alone[2].tokens[2]
    want = [engine.generate(p, max_new_tokens=10, stop=[stop]) for p in prompts]
    got = engine.generate(prompts, max_new_tokens=10, stop=[stop])
    assert [g.tokens for g in got] == [w.tokens for w in want]
    # each request computes its prompt and one position per token it still had to produce, T loops each
    for p, g in zip(prompts, got):
        assert g.stats["token_loops"] == 3 * (len(p) + max(len(g.tokens) - 1, 0))
    sampled = engine.generate(prompts, max_new_tokens=10, stop=[], temperature=0.9, seed=3)
    again = engine.generate(prompts, max_new_tokens=10, stop=[], temperature=0.9, seed=3)
    assert [g.tokens for g in sampled] == [g.tokens for g in again]
