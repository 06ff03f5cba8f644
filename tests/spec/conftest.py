import random

import torch

from looplm.config import LoopConfig
from looplm.model import LoopLM



def spec_model(seed: int | None = None, *, loops: int = 4, vocab: int = 64, max_pos: int = 48, std: float = 0.1,
               step_scale: float | None = None, layers: int = 2) -> LoopLM:
    """A random tiny model whose loops agree partly, so drafts are sometimes accepted and sometimes not.

    The Ouro layer norms each sublayer's output before the residual add; scaling those norm weights
    (`step_scale`) sets how far one loop moves the hidden state, hence how often loop k's argmax
    agrees with loop T's.
    """
    seed = random.randrange(2**31) if seed is None else seed
    cfg = LoopConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, total_ut_steps=loops, max_position_embeddings=max_pos, rope_theta=10000.0)
    model = LoopLM(cfg).init_weights(seed, std=std).eval()
    scale = random.Random(seed).uniform(0.04, 0.15) if step_scale is None else step_scale
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm_2.weight.fill_(scale)
            layer.post_attention_layernorm_2.weight.fill_(scale)
    return model


def ragged_prompts(n: int, vocab: int, lo: int = 1, hi: int = 12) -> list[list[int]]:
    return [torch.randint(0, vocab, (random.randint(lo, hi),)).tolist() for _ in range(n)]


def acceptance(gens) -> float:
    """Accepted over drafted tokens of several requests (each request reports its own counts)."""
    return sum(g.stats["accepted"] for g in gens) / max(sum(g.stats["drafted"] for g in gens), 1)
