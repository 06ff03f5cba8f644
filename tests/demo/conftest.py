"""A tiny random checkpoint with a tiny word-level tokenizer, saved with looplm.save."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import looplm
from looplm import LoopConfig, LoopLM
from looplm.tokenizer import Tokenizer as LoopTokenizer

WORDS = ("[UNK] the a cat dog bird fish tree house river hill sun moon star rain snow wind sat ran saw ate "
         "sang slept jumped found lost made big small red blue green old new happy sad quick slow on in "
         "under over near far and but or then so because when where who what why how it is was you . , ! ?").split()


def tiny_tokenizer() -> LoopTokenizer:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return LoopTokenizer(tok)


def tiny_engine(seed: int) -> looplm.Engine:
    tokenizer = tiny_tokenizer()
    cfg = LoopConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, total_ut_steps=4, max_position_embeddings=128, eos_token_id=None,
                     bos_token_id=None, pad_token_id=None)
    assert tokenizer.vocab_size == cfg.vocab_size
    model = LoopLM(cfg).init_weights(seed, std=0.2).eval()  # a large std so the loops disagree
    return looplm.Engine(model, tokenizer)


def random_prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[1:]) for _ in range(n))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """Path of a saved tiny checkpoint (fresh random weights each session)."""
    path = tmp_path_factory.mktemp("tiny_demo_model")
    looplm.save(tiny_engine(int(torch.randint(0, 2**31, ()).item())), path)
    return str(path)


@pytest.fixture
def make_prompt():
    """random_prompt(rng, n): n random words of the tiny vocabulary."""
    return random_prompt


@pytest.fixture(scope="module")
def fresh_engine() -> looplm.Engine:
    """A tiny engine with fresh random weights (in memory)."""
    return tiny_engine(int(torch.randint(0, 2**31, ()).item()))



class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def caplog_handler():
    """Collects the demo logger's records for a whole module (pytest's caplog is per test)."""
    handler, log = _Records(), logging.getLogger("demo")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)
