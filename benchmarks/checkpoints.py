"""Random checkpoints of the published Ouro shapes, written once by looplm's own saver and cached.

`random_checkpoint("random-1.4b")` returns the directory of a checkpoint with Ouro-1.4B's shape
(the published config: hidden 2048, 24 layers, 16 heads and 16 KV heads of 128, intermediate 5632,
vocab 49152, T = 4, 65536 positions, RoPE theta 1e6) and random weights, as sharded bf16 safetensors
written by `looplm.checkpoint.save_pretrained`. It is generated on first use under
`$LOOPLM_CACHE` (default ~/.cache/looplm), outside the repository, and reused afterwards.
"random-2.6b" is Ouro-2.6B's shape (48 layers, otherwise the same).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from looplm import LoopConfig, LoopLM
from looplm.checkpoint import save_pretrained

# Ouro-1.4B's published config.json (architecture fields); 2.6B differs only in num_hidden_layers
OURO_1_4B = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    max_position_embeddings=65536,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
    total_ut_steps=4,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
SHAPES = {
    "random-1.4b": LoopConfig(**OURO_1_4B),
    "random-2.6b": LoopConfig(**{**OURO_1_4B, "num_hidden_layers": 48}),
}
SHARD_BYTES = 2 * 2**30  # the published checkpoints' shard size order of magnitude
DONE = "looplm-random.json"  # written last: a directory without it is an interrupted write


def cache_root() -> Path:
    return Path(os.environ.get("LOOPLM_CACHE") or Path.home() / ".cache" / "looplm")


def random_model(cfg: LoopConfig, *, seed: int = 0, std: float = 0.02, dtype=torch.bfloat16, device="cpu") -> LoopLM:
    """A LoopLM of `cfg` with N(0, std) weights (norms 1, biases 0), built directly in `dtype` on `device`.

    Built on the meta device and materialised in place, so the float32 copy never exists: peak
    memory is the model in `dtype` plus one float32 tensor (the largest, the LM head) at a time.
    """
    with torch.device("meta"):
        model = LoopLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device).mul_(std))
    model.reset_buffers(device)
    return model.eval()


def write_random_checkpoint(cfg: LoopConfig, path: str | Path, *, seed: int = 0, device="cpu", shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes a random bf16 checkpoint of `cfg` to `path` (a temporary sibling renamed when complete)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = random_model(cfg, seed=seed, device=device)
    save_pretrained(model, tmp, max_shard_bytes=shard_bytes)
    del model
    (tmp / DONE).write_text(json.dumps({"seed": seed, "config": cfg.to_dict()}, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def random_checkpoint(name: str, *, root: str | Path | None = None, seed: int = 0, device="cpu") -> Path:
    """The cached checkpoint directory of shape `name` (see SHAPES), generated on first use.

    Raises:
        ValueError: `name` is not one of SHAPES.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown random checkpoint {name!r}; choose one of {sorted(SHAPES)}")
    path = Path(root or cache_root()) / name
    cfg = SHAPES[name]
    done = path / DONE
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("seed") == seed and meta.get("config") == json.loads(json.dumps(cfg.to_dict())):
            return path
    return write_random_checkpoint(cfg, path, seed=seed, device=device)
