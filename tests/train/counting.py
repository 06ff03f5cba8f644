"""The tiny training setup the trainer's tests share: counting data and a tiny config."""

import json
from pathlib import Path

import numpy as np

from looplm.train.trainer import TrainConfig

VOCAB = 48


def write_counting_data(d: Path, docs: int, ood: bool = False) -> Path:
    """Writes `docs` counting sequences (id i is followed by i + 1 mod 40, random starts, each ended
    by id 0: learnable in seconds) into d: train.bin, val.bin (its first quarter), ood.bin (its
    second half) when asked, and meta.json. Returns d."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(docs):
        start, n = rng.integers(3, 40), rng.integers(10, 40)
        parts += [3 + (start + np.arange(n)) % 40, [0]]
    ids = np.concatenate(parts).astype(np.uint16)
    ids.tofile(d / "train.bin")
    ids[: len(ids) // 4].tofile(d / "val.bin")
    if ood:
        ids[len(ids) // 2 :].tofile(d / "ood.bin")
    (d / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return d


def tiny_config(data_dir, out, **kw) -> TrainConfig:
    """A one-layer, 3-loop model of width 32 trained for 12 steps; keyword arguments override."""
    base = dict(data=str(data_dir), out=str(out), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, total_ut_steps=3, max_position_embeddings=64,
                loop_weights=[1.0, 2.0, 3.0], seq_len=32, batch_size=8, steps=12, lr=1e-2, warmup_steps=2,
                eval_every=1000, eval_batches=1, save_every=1000, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)
