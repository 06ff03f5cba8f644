"""Loading the published layout, saving it back bit for bit, and the independent reference."""

import json

import pytest
import torch
from safetensors.torch import save_file

import looplm
from looplm.checkpoint import load_model, save_pretrained

from .conftest import tiny_model
from .ouro_reference import random_published_state, reference_per_loop

OURO_STYLE = {  # a config.json as the published checkpoints write it, extra keys included
    "architectures": ["OuroForCausalLM"], "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig"},
    "model_type": "ouro", "vocab_size": 67, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float32", "total_ut_steps": 4,
    "early_exit_threshold": 1.0, "use_cache": True, "use_sliding_window": False, "sliding_window": None,
}


def write_published(path, cfg, sd, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = {n: sd[n] for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / file))
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_hand_written_published_checkpoint_matches_reference(tmp_path, tied, shards):
    cfg = OURO_STYLE | {"tie_word_embeddings": tied, "num_key_value_heads": 2 if shards == 1 else 4}
    sd = random_published_state(cfg, seed=int(torch.randint(0, 10**6, ())))
    assert len(sd) == 11 * cfg["num_hidden_layers"] + 5 - tied
    write_published(tmp_path, cfg, sd, shards)
    engine = looplm.load(tmp_path)
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    want_logits, want_gates = reference_per_loop(sd, cfg, ids)
    # an independent float32 implementation sums in another order; with a tied std-1 embedding the
    # logits reach ~30, so the bound is float32's ~1e-5 relative to the logits' scale
    got = engine.model.per_loop_logits(ids)
    assert (got - want_logits).abs().max() <= 1e-5 * max(1.0, want_logits.abs().max().item())
    torch.testing.assert_close(engine.model.per_loop_gates(ids), want_gates, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trips_bit_for_bit(tmp_path, tied):
    model = tiny_model(tied=tied)
    for shard_bytes in (None, 30_000):
        save_pretrained(model, tmp_path / str(shard_bytes), max_shard_bytes=shard_bytes)
        loaded = load_model(tmp_path / str(shard_bytes))
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ids = torch.randint(0, model.config.vocab_size, (1, 7))
        assert torch.equal(model.per_loop_logits(ids), loaded.per_loop_logits(ids))


def test_saved_checkpoint_uses_the_published_names(tmp_path):
    from safetensors import safe_open

    save_pretrained(tiny_model(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    sd = random_published_state(json.loads((tmp_path / "config.json").read_text()) | {"tie_word_embeddings": False}, 0)
    assert names == set(sd)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.float32])
def test_load_in_requested_dtype(tmp_path, dtype):
    save_pretrained(tiny_model(), tmp_path)
    engine = looplm.load(tmp_path, dtype=dtype)
    assert all(p.dtype == looplm.config.resolve_dtype(dtype) for p in engine.model.parameters())
    assert len(engine.generate([1, 2, 3], max_new_tokens=3, stop=[]).tokens) == 3


def test_engine_save_keeps_tokenizer_and_stop_strings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tok.json"))
    model = tiny_model(vocab=tok.get_vocab_size())
    save_pretrained(model, tmp_path / "ckpt", tokenizer_json_path=tmp_path / "tok.json")
    engine = looplm.load(tmp_path / "ckpt")
    looplm.save(engine, tmp_path / "again")
    again = looplm.load(tmp_path / "again")
    assert again.tokenizer.encode("the cat") == engine.tokenizer.encode("the cat")
    out = engine.generate("the cat sat", max_new_tokens=12, stop=[])
    assert out.text == engine.tokenizer.decode(out.tokens)
    piece = engine.tokenizer.decode(out.tokens[2:3])
    cut = engine.generate("the cat sat", max_new_tokens=12, stop=[piece])
    assert cut.finish_reason == "stop" and piece not in cut.text and out.text.startswith(cut.text)


MODES = {  # every decoder, greedy; anytime with an exit policy so tokens leave at different loops
    "full": {},
    "speculative": {},  # the checkpoint's recommendation: draft_loop 2 with its fitted draft map
    "anytime": {"exit": "q_exit", "q": 0.5},
}


def test_save_keeps_the_files_generation_config_names(tmp_path):
    engine = looplm.load()
    named = engine.generation_config["looplm"]["speculative"]["draft_map"]
    looplm.save(engine, tmp_path / "copy")
    assert (tmp_path / "copy" / named).read_bytes() == (engine.path / named).read_bytes()
    again = looplm.load(tmp_path / "copy")
    prompts = ["def fibonacci(n):", "Elizabeth was"]
    for mode, options in MODES.items():
        want = engine.generate(prompts, max_new_tokens=24, mode=mode, stop=[], **options)
        got = again.generate(prompts, max_new_tokens=24, mode=mode, stop=[], **options)
        assert [g.tokens for g in got] == [g.tokens for g in want], mode
        assert [[s.exit_loop for s in g.steps] for g in got] == [[s.exit_loop for s in g.steps] for g in want], mode
    assert again.generate(prompts[0], max_new_tokens=8, mode="speculative").stats["draft"] == "map"
    # saved again from the saved copy: the file travels on
    looplm.save(again, tmp_path / "copy2")
    assert (tmp_path / "copy2" / named).read_bytes() == (engine.path / named).read_bytes()


@pytest.mark.parametrize("value, message", [
    ("absent.safetensors", "no such file in the engine's checkpoint directory"),
    ("/abs/map.safetensors", "a checkpoint file must be named relative to its directory"),
    ("../map.safetensors", "a checkpoint file must be named relative to its directory"),
])
def test_save_refuses_a_named_file_it_cannot_copy(tmp_path, value, message):
    save_pretrained(tiny_model(), tmp_path / "src")
    engine = looplm.load(tmp_path / "src")
    engine.generation_config = {"looplm": {"speculative": {"draft_map": value}}}
    with pytest.raises(ValueError, match=f"looplm.speculative.draft_map = '{value}': {message}"):
        looplm.save(engine, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
