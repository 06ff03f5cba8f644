"""looplm.threads: intra-op threads from the model's size, and its overrides."""

import pytest
import torch

import looplm
from looplm.checkpoint import save_pretrained
from looplm.threads import BYTES_PER_THREAD, parameter_bytes, threads_for

from .conftest import tiny_model


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_size_rule():
    assert threads_for(0, cores=8) == 1
    assert threads_for(BYTES_PER_THREAD - 1, cores=8) == 1
    assert threads_for(2 * BYTES_PER_THREAD, cores=8) == 2
    assert threads_for(100 * BYTES_PER_THREAD, cores=8) == 8
    assert threads_for(100 * BYTES_PER_THREAD, cores=1) == 1


def test_parameter_bytes_counts_tied_weights_once():
    untied, tied = tiny_model(tied=False), tiny_model(tied=True)
    head = untied.lm_head.weight
    assert parameter_bytes(untied) - parameter_bytes(tied) == head.numel() * head.element_size()
    fp32 = parameter_bytes(tied)
    assert parameter_bytes(tied.to(torch.bfloat16)) * 2 == fp32  # Module.to converts in place


def test_load_sets_threads_by_size_argument_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPLM_THREADS", raising=False)
    save_pretrained(tiny_model(), tmp_path)
    torch.set_num_threads(2)
    looplm.load(tmp_path)
    assert torch.get_num_threads() == 1  # a tiny model: one thread
    looplm.load(tmp_path, threads=2)
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("LOOPLM_THREADS", "3")
    looplm.load(tmp_path)
    assert torch.get_num_threads() == 3
    looplm.load(tmp_path, threads=1)  # the argument wins over the environment
    assert torch.get_num_threads() == 1


def test_bundled_model_gets_one_thread(monkeypatch):
    monkeypatch.delenv("LOOPLM_THREADS", raising=False)
    torch.set_num_threads(2)
    engine = looplm.load()
    assert parameter_bytes(engine.model) < BYTES_PER_THREAD and torch.get_num_threads() == 1
