"""benchmarks.bandwidth's bytes per token and read rate, and benchmarks.checkpoints' cached random checkpoints."""

import json

import pytest
import torch

import looplm
from benchmarks import checkpoints
from benchmarks.bandwidth import bytes_per_token, matvec_read_rate
from looplm import LoopConfig
from looplm.dtypes import weight_bytes

from ..looplm.conftest import tiny_config, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_from_the_config_arithmetic(dtype):
    model = tiny_model(loops=4).to(dtype)
    cfg, el = model.config, torch.empty((), dtype=dtype).element_size()
    positions = [7, 8, 9]
    got = bytes_per_token(model, positions)
    embed = head = cfg.vocab_size * cfg.hidden_size * el
    assert got["weights_per_loop"] == weight_bytes(cfg, el) - embed - head  # layers, final norm, exit gate
    assert got["head"] == head + cfg.hidden_size * el  # the LM head and one embedding row
    kv_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * el  # K and V, one position, one layer
    assert got["kv"] == cfg.num_hidden_layers * 4 * kv_slot * (9 + 10 + 11) / 3  # p + 2 slots per step
    assert got["total"] == 4 * got["weights_per_loop"] + got["head"] + got["kv"]


def test_matvec_read_rate_restores_the_thread_count():
    before = torch.get_num_threads()
    rate = matvec_read_rate(torch.float32, before + 1, nbytes=4 * 2**20, repeats=2)
    assert rate > 0 and torch.get_num_threads() == before


@pytest.fixture
def tiny_shape(monkeypatch):
    cfg = tiny_config(vocab=53)
    monkeypatch.setitem(checkpoints.SHAPES, "tiny", cfg)
    return cfg


def test_random_checkpoint_is_written_once_in_bf16_and_reused(tmp_path, tiny_shape, monkeypatch):
    path = checkpoints.random_checkpoint("tiny", root=tmp_path, seed=5)
    assert path == tmp_path / "tiny" and not (tmp_path / "tiny.partial").exists()
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    engine = looplm.load(path, dtype="bfloat16")
    want = checkpoints.random_model(tiny_shape, seed=5).state_dict()
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in want.items())
    monkeypatch.setattr(checkpoints, "write_random_checkpoint", lambda *a, **k: pytest.fail("rewrote a cached checkpoint"))
    assert checkpoints.random_checkpoint("tiny", root=tmp_path, seed=5) == path


def test_an_interrupted_or_different_checkpoint_is_rewritten(tmp_path, tiny_shape):
    path = checkpoints.random_checkpoint("tiny", root=tmp_path, seed=1)
    first = looplm.load(path).model.lm_head.weight.clone()
    assert not torch.equal(looplm.load(checkpoints.random_checkpoint("tiny", root=tmp_path, seed=2)).model.lm_head.weight, first)
    (path / checkpoints.DONE).unlink()  # as a write cut short leaves it
    assert torch.equal(looplm.load(checkpoints.random_checkpoint("tiny", root=tmp_path, seed=1)).model.lm_head.weight, first)


def test_unknown_shape_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="random-9b"):
        checkpoints.random_checkpoint("random-9b", root=tmp_path)


def test_published_shapes():
    big = checkpoints.SHAPES["random-1.4b"]
    assert isinstance(big, LoopConfig)
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads, big.intermediate_size) == (2048, 24, 16, 16, 5632)
    assert (big.vocab_size, big.total_ut_steps, big.max_position_embeddings, big.head_dim) == (49152, 4, 65536, 128)
    assert checkpoints.SHAPES["random-2.6b"].num_hidden_layers == 48
    assert 1.3e9 < weight_bytes(big, 1) < 1.5e9  # 1.4B parameters
