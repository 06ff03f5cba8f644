"""Checks on `Engine.generate`/`stream` arguments: each raises a ValueError naming the argument and value.

Pure functions (no engine state), so a bad request fails before anything is decoded or changed.
Per-mode options are checked by their decoders and exit policies (`number_in` serves those too).
"""

from __future__ import annotations

import math

import torch

PromptItem = str | list[int]


def _is_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _ids(p: object, where: str) -> list[int]:
    """A list/tuple of ints or a 1-D integer tensor -> list[int]; anything else raises."""
    if isinstance(p, torch.Tensor):
        if p.dim() != 1 or p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            raise ValueError(f"{where}: a tensor of token ids must be 1-D with an integer dtype, got shape {tuple(p.shape)} {p.dtype}")
        return p.tolist()
    if not isinstance(p, (list, tuple)):
        raise ValueError(f"{where} must be a string or a list of token ids, got {type(p).__name__} {p!r}")
    bad = next((j for j, t in enumerate(p) if not _is_id(t)), None)
    if bad is not None:
        raise ValueError(f"{where}: token id {p[bad]!r} at index {bad} is not an integer")
    return list(p)


def prompts(prompt: object) -> list[PromptItem]:
    """Splits `prompt` into its prompts: each a string (to encode) or a list of token ids.

    Accepts a string, a list/tuple of int ids or a 1-D integer tensor (one prompt), or a list/tuple
    of those (a batch; `Engine._is_batch` reads a list whose first item is not an int as a batch).
    Emptiness and vocabulary bounds are the engine's checks (they need the tokenizer and config).
    """
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, torch.Tensor):
        return [_ids(prompt, "prompt")]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a string, a list of token ids, or a list of those; got {type(prompt).__name__} {prompt!r}")
    if not prompt or isinstance(prompt[0], int):
        return [_ids(prompt, "prompt")]
    return [p if isinstance(p, str) else _ids(p, f"prompt {i}") for i, p in enumerate(prompt)]


def number_in(name: str, value: object, lo: float = -math.inf, hi: float = math.inf, *,
              lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> float:
    """`value` as a float when it is a finite real number in the interval lo..hi (ends closed unless *_open).

    Raises:
        ValueError: naming `name`, the value and the interval.
    """
    kind = "an integer" if integer else "a finite number"
    ok_type = _is_id(value) if integer else isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok_type and math.isfinite(value):
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if above and below:
            return float(value)
    if math.isinf(lo) and math.isinf(hi):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if math.isinf(hi):
        raise ValueError(f"{name} must be {kind} {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")


def sampling(temperature: object = 0.0, top_k: object = None, top_p: object = None) -> None:
    """temperature finite and >= 0; top_k None or an integer >= 1; top_p None or in (0, 1]."""
    number_in("temperature", temperature, 0)
    if top_k is not None and not (_is_id(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None:
        number_in("top_p", top_p, 0, 1, lo_open=True)


def seed(value: object) -> None:
    """None or an integer in [0, 2**64) (what torch.Generator.manual_seed takes)."""
    if value is not None and not (_is_id(value) and 0 <= value < 2**64):
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {value!r}")


def stop(value: object) -> None:
    """None, a token id (int >= 0), a string, or a list/tuple of ids and strings."""
    items = value if isinstance(value, (list, tuple)) else [value] if value is not None else []
    for s in items:
        if not (isinstance(s, str) or (_is_id(s) and s >= 0)):
            raise ValueError(f"stop must be None, a token id >= 0, a string, or a list of those; got {s!r}" +
                             (f" in {value!r}" if s is not value else ""))


def request(max_new_tokens: object, options: dict) -> None:
    """Checks max_new_tokens and the generic options (seed, temperature, top_k, top_p, stop) without
    removing them from `options`."""
    if not _is_id(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    seed(options.get("seed"))
    sampling(options.get("temperature", 0.0), options.get("top_k"), options.get("top_p"))
    stop(options.get("stop"))
