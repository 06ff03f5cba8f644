"""The Ouro configuration (`config.json`, Qwen2-style plus `total_ut_steps`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """Maps "bfloat16" / torch.bfloat16 / None to a torch dtype, or raises a ValueError naming it."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose one of {sorted(DTYPES)}")
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass
class LoopConfig:
    """Architecture of an Ouro looped LM; field names are those of the published config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # L: layers in the shared stack
    num_attention_heads: int
    num_key_value_heads: int | None = None  # GQA when smaller than num_attention_heads
    head_dim: int | None = None  # hidden_size // num_attention_heads unless given
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0
    total_ut_steps: int = 4  # T: how many times the stack runs per token
    early_exit_threshold: float = 1.0
    torch_dtype: str = "float32"
    model_type: str = "ouro"
    architectures: list[str] = field(default_factory=lambda: ["OuroForCausalLM"])

    def __post_init__(self) -> None:
        if self.num_attention_heads < 1:
            raise ValueError(f"invalid config value(s): num_attention_heads={self.num_attention_heads!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        checks = {
            "vocab_size": self.vocab_size > 0,
            "hidden_size": self.hidden_size > 0,
            "intermediate_size": self.intermediate_size > 0,
            "max_position_embeddings": self.max_position_embeddings > 1,
            "num_hidden_layers": self.num_hidden_layers > 0,
            "total_ut_steps": self.total_ut_steps > 0,
            "num_key_value_heads": self.num_key_value_heads > 0
            and self.num_attention_heads % self.num_key_value_heads == 0,
            "head_dim": self.head_dim > 0 and self.head_dim % 2 == 0,
            "hidden_act": self.hidden_act == "silu",
            "rope_scaling": self.rope_scaling is None,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid config value(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))

    @property
    def num_loops(self) -> int:
        return self.total_ut_steps

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "LoopConfig":
        """Builds a config from a config.json dict; unknown keys are ignored.

        Raises a ValueError naming `source` and the key when model_type is absent or not "ouro", a
        required key is missing, or a value has the wrong JSON type (e.g. "256" or 255.5 for an
        integer, a non-finite float).
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "model_type" not in d:
            raise ValueError(f"{source}: no model_type (expected 'ouro')")
        if d["model_type"] != "ouro":
            raise ValueError(f"{source}: model_type is {d['model_type']!r}, expected 'ouro'")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        hints = typing.get_type_hints(cls)
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key, value in values.items():
            if not _has_type(value, hints[key]):
                raise ValueError(f"{source}: {key} must be {_describe(hints[key])}, got {value!r}")
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int excludes bool and float; float takes ints, finite only)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """'an integer or null' for int | None, and so on."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "an object", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
