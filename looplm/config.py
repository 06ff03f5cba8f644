"""The Ouro configuration (`config.json`, Qwen2-style plus `total_ut_steps`)."""

from __future__ import annotations

import dataclasses
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        checks = {
            "vocab_size": self.vocab_size > 0,
            "hidden_size": self.hidden_size > 0,
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
        """Builds a config from a config.json dict; unknown keys are ignored, missing required keys raise."""
        if d.get("model_type", "ouro") != "ouro":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'ouro'")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
