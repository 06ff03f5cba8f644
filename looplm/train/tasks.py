"""Synthetic task rows generated on the fly, with the loss on their answers only.

A row packs independent p-hop problems, each laid out as in the held-out set the evaluation reads
(`<|endoftext|>` + prompt + answer symbol); the target is the answer symbol and every other target is
ignored. In a corpus window the answer is about 1 token in 31 of a p-hop problem and its random
symbols are unlearnable, so a task row gives the answers their own loss term instead of drowning
them in the token mean.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .data import EOT_ID, phop_problem
from .objectives import IGNORE_INDEX


class PhopRows:
    """Rows of seq_len inputs and targets; targets are IGNORE_INDEX except at answer symbols."""

    def __init__(self, tokenizer, seq_len: int, max_hops: int = 4, exclude_file: str | Path | None = None):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.max_hops = max_hops
        self.exclude: set[str] = set()
        if exclude_file is not None and Path(exclude_file).is_file():
            lines = Path(exclude_file).read_text().splitlines()
            self.exclude = {json.loads(line)["prompt"] for line in lines if line.strip()}

    def _problem(self, rng: random.Random) -> tuple[list[int], int]:
        while True:
            prompt, answer = phop_problem(rng, rng.randint(1, self.max_hops))
            if prompt in self.exclude:  # never train on a held-out problem
                continue
            ans = self.tokenizer.encode(answer)
            if len(ans) != 1:
                raise ValueError(f"p-hop answer {answer!r} is not a single token in this tokenizer")
            return [EOT_ID] + self.tokenizer.encode(prompt), ans[0]

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [n, seq_len] from a generator seeded with `seed` (the same rows for the same seed)."""
        rng = random.Random(seed)
        xs, ys = [], []
        for _ in range(n):
            ids, tgt = [], []
            while len(ids) < self.seq_len + 1:
                prompt, ans = self._problem(rng)
                tgt += [IGNORE_INDEX] * (len(prompt) - 1) + [ans, IGNORE_INDEX]  # target of each input position
                ids += prompt + [ans]
            xs.append(ids[: self.seq_len])
            ys.append(tgt[: self.seq_len])
        return torch.tensor(xs), torch.tensor(ys)
