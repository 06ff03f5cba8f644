import pytest
import torch

import looplm
from looplm import LoopConfig, LoopLM


def tiny_model(seed: int = 0, std: float = 0.2, loops: int = 4) -> LoopLM:
    """A tiny Ouro model whose loops disagree (larger init std)."""
    cfg = LoopConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        total_ut_steps=loops,
        max_position_embeddings=128,
    )
    return LoopLM(cfg).init_weights(seed, std=std).eval()


@pytest.fixture
def model():
    return tiny_model(seed=11)


@pytest.fixture
def engine(model):
    return looplm.Engine(model)


def spread_gate(model: LoopLM) -> None:
    """Sharpens the exit gate (weights x2, bias -1) so that different tokens exit at different loops."""
    with torch.no_grad():
        model.model.early_exit_gate.weight.mul_(2.0)
        model.model.early_exit_gate.bias.fill_(-1.0)


def random_prompts(seed: int, lengths, vocab: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


class FakeClock:
    """A clock that only moves when told: seconds as a float."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1e3


def clocked(model: LoopLM, clock: FakeClock, ms_per_call: float):
    """Makes every loop the engine runs on `model` take exactly ms_per_call on `clock` (one
    LoopLM.loop_body call runs one loop for every token of a runner step)."""
    inner = model.loop_body

    def loop_body(*args, **kwargs):
        out = inner(*args, **kwargs)
        clock.advance_ms(ms_per_call)
        return out

    model.loop_body = loop_body
    return model
