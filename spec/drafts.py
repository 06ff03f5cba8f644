"""What a draft is proposed from: the loop-k head, extrapolated along the loops, or a fitted map.

Successive loops move the shared head's logits towards the last loop's. Pushing loop k's logits
further along their change from loop k-1,

    z_draft = z_k + c * (z_k - z_{k-1}),

predicts the last loop's argmax more often than z_k alone when the refinement keeps its direction:
on the default model's held-out text (65k tokens), loop-2 drafts agree with loop 4 on 74.3% of
tokens at c = 0 and 78.3% at c = 0.5. The head is linear (Ouro's lm_head has no bias), so
z_draft = head(h_k + c * (h_k - h_{k-1})) on the loops' normed hidden states: the extrapolation
costs one head pass, like a plain draft. Any draft distribution keeps speculative decoding
lossless; only the acceptance rate changes.

A fitted draft map (`DraftMap`, fitted by `python -m spec.fit_draft`) generalises the
extrapolation to a learned map of the two states, W [h_{k-1}; h_k] + b plus optionally one hidden
GELU layer, trained so that the head of the mapped state matches loop T's distribution (the
extrapolation is the map W = [-c I, (1 + c) I], b = 0, where fitting starts). It costs one
(2H -> H) matmul per draft, and two more with a hidden layer. The default model's affine map
agrees with loop 4 on 82.5% of the same held-out tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "looplm-draft-map"


def draft_state(per_loop: torch.Tensor, extrapolate: float = 0.0, draft_map: "DraftMap | None" = None,
                loop: int | None = None) -> torch.Tensor:
    """The hidden state whose head logits are the draft logits, from the states of loops 1..k
    `per_loop` [k >= 1, ..., H] (LoopOutput.hidden, loops in order), or, given `loop` = k, from
    the states of loops k-1 and k alone (only the last two are ever read).

    With a `draft_map`, its map of the last two states (extrapolate is then unused); else
    extrapolate = c > 0 gives h_k + c * (h_k - h_{k-1}) (needs k >= 2), and c = 0 returns h_k.
    """
    if draft_map is not None:
        return draft_map.state(per_loop, loop)
    if not extrapolate:
        return per_loop[-1]
    if per_loop.shape[0] < 2:
        raise ValueError("extrapolated drafts need the states of two loops (draft_loop >= 2)")
    return torch.lerp(per_loop[-2], per_loop[-1], 1.0 + extrapolate)  # h_{k-1} + (1 + c)(h_k - h_{k-1})


def resolve_draft_map(draft_map, hidden_size: int, draft_loop: int, dtype, device, *,
                      recommended: bool = False) -> "DraftMap | None":
    """A decoder's `draft_map` option (None, a DraftMap, or a path to a saved one) -> a checked
    DraftMap in the model's dtype and device.

    A map without a map for `draft_loop` raises when the caller passed it; when it is only the
    checkpoint's recommendation (`recommended`), it is not used and None is returned (a
    checkpoint's loop-2 map does not stop a caller from drafting at another loop; the decoder
    says so in its statistics). A map for another hidden size, an unreadable file or another
    type raise."""
    if draft_map is None:
        return None
    saved = isinstance(draft_map, (str, Path))
    if saved:
        draft_map = DraftMap.load(draft_map)
    elif not isinstance(draft_map, DraftMap):
        raise ValueError(f"draft_map must be a DraftMap or the path of a saved one, got {type(draft_map).__name__}")
    if draft_map.hidden_size != hidden_size:
        raise ValueError(f"the draft map is for hidden size {draft_map.hidden_size}, the model has {hidden_size}")
    if draft_loop not in draft_map.loops:
        if recommended:
            return None
        raise ValueError(f"draft_map has maps for draft loops {sorted(draft_map.loops)}, not for draft_loop={draft_loop}; "
                         "pass draft_map=None to draft without one")
    # a saved map (one object per file version, DraftMap.load) is converted once per dtype and device,
    # not per request: the bundled map is stored in bfloat16 and its conversion cost ~2.5 ms a request
    return _converted(draft_map, dtype, device) if saved else draft_map.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=8)
def _converted(draft_map: "DraftMap", dtype, device) -> "DraftMap":  # read-only in decoding: requests share it
    return draft_map.to(dtype=dtype, device=device)


class DraftMap:
    """Draft maps per draft loop k >= 2, on x = [h_{k-1}; h_k]:

        state = weight x + bias  (+ down(gelu(up x + up_bias)) + down_bias, when the map has a hidden layer)

    `params[k]` holds "weight" (H, 2H) and "bias" (H,), and optionally "up.weight" (M, 2H),
    "up.bias" (M,), "down.weight" (H, M), "down.bias" (H,). A map may also have a second-token
    head: the same names prefixed "next." (its own hidden width), a map of the same two states of
    token n whose head logits draft token n+2 (trained towards loop T's distribution at position
    n+1; `next_state`). A head whose "next.weight" is (H, 3H) (and "next.up.weight" (M, 3H)) is
    conditioned on token n+1: it maps [h_{k-1}; h_k; e], e the input embedding of the token drafted
    for n+1 (`next_conditioned`; the sequentially dependent draft heads of Hydra). Saved as one
    safetensors file with tensors "loop{k}.<name>".
    """

    NAMES = ("weight", "bias", "up.weight", "up.bias", "down.weight", "down.bias")
    ALL_NAMES = NAMES + tuple("next." + n for n in NAMES)

    def __init__(self, params: dict[int, dict[str, torch.Tensor]], info: dict | None = None):
        for k, p in params.items():
            if not isinstance(k, int) or k < 2:
                raise ValueError(f"draft map: draft loop {k!r} must be an integer >= 2 (it maps loops k-1 and k)")
            for n in p:
                if n not in self.ALL_NAMES:
                    raise ValueError(f"draft map loop {k}: unexpected tensor {n!r}")
            self._check(k, p, "")
            if any(n.startswith("next.") for n in p):
                self._check(k, p, "next.", p["weight"].shape[0], widths=(2, 3))
        self.params = {k: dict(p) for k, p in params.items()}
        self.info = dict(info or {})

    @classmethod
    def _check(cls, k: int, p: dict, prefix: str, H: int | None = None, widths: tuple[int, ...] = (2,)) -> None:
        """The tensors of one map (prefix "" or "next.") are complete and have matching shapes; its
        input is w x H wide for a w of `widths` (2: [h_{k-1}; h_k]; 3: and a token's embedding)."""
        missing = [prefix + n for n in ("weight", "bias") if prefix + n not in p]
        mlp = [n for n in cls.NAMES[2:] if prefix + n in p]
        if missing or mlp and len(mlp) != 4:
            have = sorted(n for n in p if n.startswith(prefix)) if prefix else sorted(n for n in p if not n.startswith("next."))
            raise ValueError(f"draft map loop {k}: has {have}; needs {prefix}weight and {prefix}bias, "
                             f"and all or none of {[prefix + n for n in cls.NAMES[2:]]}")
        H = p[prefix + "weight"].shape[0] if H is None else H
        M = p[prefix + "up.weight"].shape[0] if mlp else 0
        w = p[prefix + "weight"]
        n_in = 3 * H if 3 in widths and tuple(w.shape) == (H, 3 * H) else 2 * H  # a conditioned head reads 3H
        want = {"weight": (H, n_in), "bias": (H,), "up.weight": (M, n_in), "up.bias": (M,), "down.weight": (H, M), "down.bias": (H,)}
        for n, shape in want.items():
            t = p.get(prefix + n)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"draft map loop {k}: {prefix}{n} has shape {tuple(t.shape)}, expected {shape} (H = {H})")

    @classmethod
    def extrapolation(cls, hidden_size: int, loops, extrapolate: float = 0.0) -> "DraftMap":
        """The map that equals extrapolated drafts with coefficient c (the fit's starting point)."""
        eye = torch.eye(hidden_size)
        w = torch.cat([-extrapolate * eye, (1.0 + extrapolate) * eye], 1)
        return cls({k: {"weight": w.clone(), "bias": torch.zeros(hidden_size)} for k in loops})

    @property
    def loops(self) -> list[int]:
        return sorted(self.params)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.params.values()))["weight"].shape[0]

    def to(self, dtype=None, device=None) -> "DraftMap":
        return DraftMap({k: {n: t.to(device=device, dtype=dtype) for n, t in p.items()} for k, p in self.params.items()}, self.info)

    def state(self, per_loop: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        """The draft state from `per_loop` [k, ..., H] (the states of loops 1..k, in order; or,
        given `loop` = k, those of loops k-1 and k)."""
        return self._apply(per_loop, loop, "")

    def has_next(self, loop: int) -> bool:
        """Whether the map for draft loop `loop` has a second-token head."""
        return "next.weight" in self.params.get(loop, {})

    def next_conditioned(self, loop: int) -> bool:
        """Whether the second-token head for draft loop `loop` also reads the embedding of the token drafted for n+1."""
        w = self.params.get(loop, {}).get("next.weight")
        return w is not None and w.shape[1] == 3 * w.shape[0]

    def next_state(self, per_loop: torch.Tensor, loop: int | None = None, token_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The state whose head logits draft token n+2, from token n's states (as `state`) and, for
        a conditioned head (`next_conditioned`), `token_embedding` (..., H): the input embedding of
        the token drafted for n+1 (an unconditioned head does not read it)."""
        k = per_loop.shape[0] if loop is None else loop
        if k in self.params and not self.has_next(k):
            raise ValueError(f"the draft map for loop {k} has no second-token head (fit one with `python -m spec.fit_draft --next`)")
        if k in self.params and self.next_conditioned(k) and token_embedding is None:
            raise ValueError(f"the second-token head for loop {k} is conditioned on the first draft: pass its token_embedding")
        return self._apply(per_loop, loop, "next.", token_embedding if self.next_conditioned(k) else None)

    def _apply(self, per_loop: torch.Tensor, loop: int | None, prefix: str, extra: torch.Tensor | None = None) -> torch.Tensor:
        k = per_loop.shape[0] if loop is None else loop
        if k not in self.params:
            raise ValueError(f"the draft map has loops {self.loops}, not the draft loop {k}")
        p = self.params[k]
        x = torch.cat([per_loop[-2], per_loop[-1]] + ([] if extra is None else [extra]), -1)
        out = F.linear(x, p[prefix + "weight"], p[prefix + "bias"])
        if prefix + "up.weight" in p:
            up = F.gelu(F.linear(x, p[prefix + "up.weight"], p[prefix + "up.bias"]))
            out = out + F.linear(up, p[prefix + "down.weight"], p[prefix + "down.bias"])
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"loop{k}.{n}": t.detach().contiguous().cpu() for k in self.loops for n, t in self.params[k].items()}
        save_file(tensors, str(path), metadata={"format": FORMAT, "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> "DraftMap":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"draft map {path} does not exist")
        return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> DraftMap:  # mtime in the key: a rewritten file is read again
    from looplm.checkpoint import open_safetensors

    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a draft map (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    params: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        loop, _, kind = name.partition(".")
        if not loop.startswith("loop") or not loop[4:].isdigit() or kind not in DraftMap.ALL_NAMES:
            raise ValueError(f"{path}: unexpected tensor {name!r} (expected loop<k>.[next.]<{'|'.join(DraftMap.NAMES)}>)")
        params.setdefault(int(loop[4:]), {})[kind] = t
    try:
        return DraftMap(params, json.loads(meta.get("info", "{}")))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
