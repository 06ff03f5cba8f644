import os

import torch

from looplm import LoopConfig, LoopLM
from looplm.decoding import DecodeRequest
from looplm.runner import Runner
from looplm.sampling import SamplingParams
from looplm.work import Forward

# The Triton kernel runs on the CPU only in the interpreter, which reads this variable when the
# kernel is defined, i.e. before kernels.triton_attention is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

T = 4


def tiny_model(seed: int, std: float = 0.2) -> LoopLM:
    """A random model whose loops matter (large std: sharing K/V or exiting early changes the logits)."""
    cfg = LoopConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, total_ut_steps=T, max_position_embeddings=128,
    )  # fmt: skip
    return LoopLM(cfg).init_weights(seed, std=std).eval()


def request(prompt: list[int], new: int, kv: str = "per_loop") -> DecodeRequest:
    """A greedy request for one prompt, as the facade builds it."""
    return DecodeRequest([prompt], [new], SamplingParams(), torch.Generator().manual_seed(0), [False], kv=kv)


def lockstep(runner: Runner, decoders: list, positions: list[int]) -> list[list]:
    """Runs decoders together, one runner step per round, as the engine's scheduler does, but with
    every sequence admitted up front, so that each round holds the same rows whatever the thread
    timing (sequence i gets id i and `positions[i]` cache positions). Returns each decoder's Steps;
    the blocks stay allocated so the caches can be read back (`runner.cache.sequence`)."""
    pool = runner.cache.pool
    for i, n in enumerate(positions):
        pool.admit(i, n)
    steps: list[list] = [[] for _ in decoders]

    def advance(i, value):
        try:
            item = decoders[i].send(value)
            while not isinstance(item, Forward):
                steps[i].append(item)
                item = decoders[i].send(None)
        except StopIteration:
            return None
        return item

    pending = {i: advance(i, None) for i in range(len(decoders))}
    while pending:
        ids = list(pending)
        items = []
        for i in ids:
            fwd = pending[i]
            fwd.pos = torch.as_tensor(fwd.pos)
            items.append((pool.ensure(i, int(fwd.pos.max()) + 1), fwd))
        outs = runner.run(items)
        pending = {i: f for i, out in zip(ids, outs) if (f := advance(i, out)) is not None}
    return steps
