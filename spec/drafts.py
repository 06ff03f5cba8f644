"""What a draft is proposed from: the loop-k head, optionally extrapolated along the loops.

Successive loops move the shared head's logits towards the last loop's. Pushing loop k's logits
further along their change from loop k-1,

    z_draft = z_k + c * (z_k - z_{k-1}),

predicts the last loop's argmax more often than z_k alone when the refinement keeps its direction:
on the default model's held-out text, loop-2 drafts agree with loop 4 on 82.1% of tokens at c = 0
and 84.1% at c = 0.5 (c = 1: 82.5%). The head is linear (Ouro's lm_head has no bias), so
z_draft = head(h_k + c * (h_k - h_{k-1})) on the loops' normed hidden states: the extrapolation
costs one head pass, like a plain draft. Any draft distribution keeps speculative decoding
lossless; only the acceptance rate changes.

A fitted draft map (`DraftMap`, fitted by `python -m spec.fit_draft`) generalises the
extrapolation to a learned affine map of the two states, W [h_{k-1}; h_k] + b, trained so that
the head of the mapped state matches loop T's distribution (the extrapolation is the map
W = [-c I, (1 + c) I], b = 0, where fitting starts). It costs one (2H -> H) matmul per draft.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "looplm-draft-map"


def draft_state(per_loop: torch.Tensor, extrapolate: float = 0.0, draft_map: "DraftMap | None" = None) -> torch.Tensor:
    """The hidden state whose head logits are the draft logits, from the states of loops 1..k
    `per_loop` [k >= 1, ..., H] (LoopOutput.hidden, loops in order).

    With a `draft_map` its affine map of the last two states (extrapolate is then unused); else
    extrapolate = c > 0 gives h_k + c * (h_k - h_{k-1}) (needs k >= 2), and c = 0 returns h_k.
    """
    if draft_map is not None:
        return draft_map.state(per_loop)
    if not extrapolate:
        return per_loop[-1]
    if per_loop.shape[0] < 2:
        raise ValueError("extrapolated drafts need the states of two loops (draft_loop >= 2)")
    return torch.lerp(per_loop[-2], per_loop[-1], 1.0 + extrapolate)  # h_{k-1} + (1 + c)(h_k - h_{k-1})


def resolve_draft_map(draft_map, hidden_size: int, draft_loop: int, dtype, device) -> "DraftMap | None":
    """A decoder's `draft_map` option (None, a DraftMap, or a path to a saved one) -> a checked
    DraftMap in the model's dtype and device, or None."""
    if draft_map is None:
        return None
    if isinstance(draft_map, (str, Path)):
        draft_map = DraftMap.load(draft_map)
    elif not isinstance(draft_map, DraftMap):
        raise ValueError(f"draft_map must be a DraftMap or the path of a saved one, got {type(draft_map).__name__}")
    if draft_loop < 2:
        raise ValueError(f"a draft map maps loops k-1 and k: it needs draft_loop >= 2, got {draft_loop}")
    draft_map.check(hidden_size, draft_loop)
    return draft_map.to(dtype=dtype, device=device)


class DraftMap:
    """Affine draft maps per draft loop k >= 2: state = weight @ [h_{k-1}; h_k] + bias.

    `weights[k]` is (H, 2H) and `biases[k]` (H,), in the model's dtype once `to` is called.
    Saved as one safetensors file with tensors "loop{k}.weight" and "loop{k}.bias".
    """

    def __init__(self, weights: dict[int, torch.Tensor], biases: dict[int, torch.Tensor], info: dict | None = None):
        if set(weights) != set(biases):
            raise ValueError(f"draft map: weights for loops {sorted(weights)} but biases for loops {sorted(biases)}")
        for k, w in weights.items():
            if not isinstance(k, int) or k < 2:
                raise ValueError(f"draft map: draft loop {k!r} must be an integer >= 2 (it maps loops k-1 and k)")
            H = w.shape[0]
            if w.dim() != 2 or w.shape[1] != 2 * H or biases[k].shape != (H,):
                raise ValueError(f"draft map loop {k}: weight {tuple(w.shape)} and bias {tuple(biases[k].shape)} "
                                 "must be (H, 2H) and (H,)")
        self.weights, self.biases, self.info = dict(weights), dict(biases), dict(info or {})

    @classmethod
    def extrapolation(cls, hidden_size: int, loops, extrapolate: float = 0.0) -> "DraftMap":
        """The map that equals extrapolated drafts with coefficient c (the fit's starting point)."""
        eye = torch.eye(hidden_size)
        w = torch.cat([-extrapolate * eye, (1.0 + extrapolate) * eye], 1)
        return cls({k: w.clone() for k in loops}, {k: torch.zeros(hidden_size) for k in loops})

    @property
    def loops(self) -> list[int]:
        return sorted(self.weights)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.weights.values())).shape[0]

    def to(self, dtype=None, device=None) -> "DraftMap":
        return DraftMap({k: w.to(device=device, dtype=dtype) for k, w in self.weights.items()},
                        {k: b.to(device=device, dtype=dtype) for k, b in self.biases.items()}, self.info)

    def check(self, hidden_size: int, draft_loop: int) -> None:
        """Raises a clear error unless this map serves drafts at `draft_loop` of a model of `hidden_size`."""
        if draft_loop not in self.weights:
            raise ValueError(f"the draft map has loops {self.loops}, not the draft loop {draft_loop}")
        if self.hidden_size != hidden_size:
            raise ValueError(f"the draft map is for hidden size {self.hidden_size}, the model has {hidden_size}")

    def state(self, per_loop: torch.Tensor) -> torch.Tensor:
        """The draft state from `per_loop` [k, ..., H] (the states of loops 1..k, in order)."""
        k = per_loop.shape[0]
        if k not in self.weights:
            raise ValueError(f"the draft map has loops {self.loops}, not the draft loop {k}")
        return F.linear(torch.cat([per_loop[-2], per_loop[-1]], -1), self.weights[k], self.biases[k])

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for k in self.loops:
            tensors[f"loop{k}.weight"] = self.weights[k].detach().contiguous().cpu()
            tensors[f"loop{k}.bias"] = self.biases[k].detach().contiguous().cpu()
        save_file(tensors, str(path), metadata={"format": FORMAT, "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> "DraftMap":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"draft map {path} does not exist")
        return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> DraftMap:  # mtime in the key: a rewritten file is read again
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError on a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a draft map (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    weights, biases = {}, {}
    for name, t in tensors.items():
        loop, _, kind = name.partition(".")
        if not loop.startswith("loop") or not loop[4:].isdigit() or kind not in ("weight", "bias"):
            raise ValueError(f"{path}: unexpected tensor {name!r} (expected loop<k>.weight / loop<k>.bias)")
        (weights if kind == "weight" else biases)[int(loop[4:])] = t
    try:
        return DraftMap(weights, biases, json.loads(meta.get("info", "{}")))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
