import random

import pytest
import torch

import looplm
from looplm.config import LoopConfig
from looplm.model import LoopLM


def tiny_config(*, gqa=True, tied=False, loops=3, layers=2, vocab=61, max_pos=96, **kw) -> LoopConfig:
    return LoopConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, total_ut_steps=loops, max_position_embeddings=max_pos,
        tie_word_embeddings=tied, rope_theta=10000.0, **kw,
    )


def tiny_model(seed: int | None = None, std: float = 0.1, **kw) -> LoopLM:
    """A random model whose loops disagree (std large enough that depth changes the argmax)."""
    seed = random.randrange(2**31) if seed is None else seed
    return LoopLM(tiny_config(**kw)).init_weights(seed, std=std).eval()


@pytest.fixture
def engine() -> looplm.Engine:
    return looplm.Engine(tiny_model())


def random_prompts(n: int, vocab: int, lo: int = 1, hi: int = 12) -> list[list[int]]:
    return [torch.randint(0, vocab, (random.randint(lo, hi),)).tolist() for _ in range(n)]
