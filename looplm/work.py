"""Work items: what a decoder asks the engine to compute for its sequence in one engine step.

A decoder (a policy over one request's state: looplm.generate, spec, anytime) never calls the model
or touches the cache. It yields a `Forward` — some positions of its sequence, each at its own start
loop, run through `num_loops` loops — and receives the `LoopOutput`; the engine runs the Forwards of
every live request together in one runner step (looplm.runner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

LogitsAt = Literal["all", "last"] | torch.Tensor | None
FIXED_STEPS = ("fixed", "compiled")  # Forward.step values the runner may run through its fixed-shape step


@dataclass
class Forward:
    """Positions of one sequence to run through loops [start, start + num_loops).

    Shapes follow the model's batch layout: B rows of S positions, all of the same sequence (a
    decoder may lay its tokens out as rows, e.g. one row per token in flight, or as positions).

    Attributes:
        inputs: (B, S) token ids (embedded by the runner; input of loop 0) or (B, S, H) hidden
            states (input of loop `start_loop`: the normed state after the previous loop).
        pos: (B, S) absolute positions (a tensor or nested lists).
        start_loop: 0-based first loop, an int or a (B, S) tensor of per-position start loops.
        num_loops: loops to run (default: up to the last loop; required for a tensor start), an
            int or a (B, S) tensor of per-position counts (>= 0, at least one > 0): position
            (b, s) runs loops [start, start + num_loops[b, s]). The outputs then hold n = the
            largest count of loops; a position that ran fewer repeats its last state (and gate)
            in the later ones, and one that ran none shows its input, so hidden[-1] is every
            position's state after its own last loop.
        logits: where to apply the LM head: None, "all" positions, the "last" position of each
            row, or a (B,) tensor of per-row indices into S.
        logits_loops: after the "last" loop run only, or after "all" of them.
        copy_slots: (position, loop) pairs whose K/V are first copied into every later loop's
            slot at that position (anytime skip="copy"), before the forward runs.
        step: None, or "fixed" / "compiled" for a one-token full-depth Forward of token ids (one
            row, one position, loops [0, T), logits None or "last") that may run through the
            runner's fixed-shape step (kernels.fast_step.FixedStep), uncompiled or compiled once per
            (rows, context) bucket; the runner's plan runs any other Forward.
        gates: whether the decoder reads the exit gates; when False its LoopOutput.gates is None
            (a step computes the gate once per loop only if one of its Forwards asks).

    Ordering rule (the decoder's to keep): a position read by another position of the same
    Forward at loop t must be at loop t in the same loop step, or have been written at loop t in
    an earlier step. Positions of a sequence run together in one step at the same loop see each
    other causally.
    """

    inputs: torch.Tensor
    pos: torch.Tensor | list
    start_loop: int | torch.Tensor = 0
    num_loops: int | None = None
    logits: LogitsAt = None
    logits_loops: Literal["last", "all"] = "last"
    copy_slots: list[tuple[int, int]] = field(default_factory=list)
    step: str | None = None
    gates: bool = True

    def most_loops(self) -> int:
        """Loops of the longest-running position (num_loops resolved, as the runner leaves it)."""
        n = self.num_loops
        return int(n.max()) if isinstance(n, torch.Tensor) else n

    def position_loops(self) -> int:
        """(position, loop) pairs this Forward computes (num_loops resolved)."""
        n = self.num_loops
        if isinstance(n, torch.Tensor):
            return int(n.expand(self.inputs.shape[:2]).sum())
        return self.inputs.shape[0] * self.inputs.shape[1] * n
