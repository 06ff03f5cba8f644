"""Loading and saving Ouro checkpoints in the published Hugging Face layout.

A directory holds `config.json` (model_type "ouro"), `model.safetensors` or shards listed by
`model.safetensors.index.json`, and optionally `tokenizer.json` and `generation_config.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LoopConfig, resolve_dtype
from .dtypes import default_dtype
from .memory import return_freed_memory
from .model import LoopLM
from .tokenizer import Tokenizer

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def read_config(path: str | Path) -> LoopConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    return LoopConfig.from_dict(_read_json(cfg_file), source=str(cfg_file))


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    if (path / INDEX).is_file():
        index = _read_json(path / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX}: no 'weight_map' object")
        files, root = {}, path.resolve()
        for name, shard in weight_map.items():
            # a shard is a file of this directory: an index must not make the loader open /etc/passwd
            if not isinstance(shard, str) or not shard or (path / shard).resolve().parent != root:
                raise ValueError(f"{path / INDEX}: weight_map[{name!r}] = {shard!r} is not a file name inside {path}")
            files[name] = path / shard
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{path / INDEX} names shard {shard.name}, which does not exist")
        return files
    if (path / SINGLE).is_file():
        with open_safetensors(path / SINGLE) as f:
            return {name: path / SINGLE for name in f.keys()}
    raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX}")


def open_safetensors(file: str | Path):
    """safe_open on the CPU; a corrupt or truncated header raises ValueError naming the file."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError on truncated/corrupt headers
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def expected_shapes(model: LoopLM) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint must hold (lm_head is absent when tied)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def load_model(path: str | Path, *, dtype=None, device=None, tp: tuple[int, int] | None = None) -> LoopLM:
    """Builds the model on the meta device and assigns tensors read from the safetensors files.

    Every name and shape is checked before anything is assigned, so a bad checkpoint raises
    without leaving a half-loaded model. dtype defaults to `looplm.dtypes.default_dtype`: the
    config's torch_dtype on a GPU; on the CPU bfloat16 where the config says so and the CPU
    computes it natively for a model too large for its caches, float32 otherwise.

    tp: (rank, world) builds rank `rank`'s part of a tensor-parallel model (looplm.tp): only that
    rank's slices of the split weights (and its rows of an untied token embedding) are read from
    the memory-mapped files.
    """
    path = Path(path)
    cfg = read_config(path)
    device = check_device(device)
    dtype = resolve_dtype(dtype, default_dtype(cfg, device))
    with torch.device("meta"):
        model = LoopLM(cfg)
    want = expected_shapes(model)
    if tp is not None:
        from . import tp as tensor_parallel

        with torch.device("meta"):
            model = LoopLM(tensor_parallel.rank_config(cfg, tp[1]))
            tensor_parallel.split_embedding(model, *tp)
    files = _weight_files(path)
    missing = sorted(set(want) - set(files))
    unexpected = sorted(set(files) - set(want))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint tensors do not match the config: missing {missing}, unexpected {unexpected}")
    shapes = {}
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:  # headers only: every shape is checked before any data is read
            for name in f.keys():
                if files.get(name) != file:
                    continue
                shapes[name] = tuple(f.get_slice(name).get_shape())
                if shapes[name] != want[name]:
                    raise ValueError(f"{file}: tensor {name} has shape {shapes[name]}, the config needs {want[name]}")
    state = {}
    for name, file in files.items():
        index = tensor_parallel.rank_slice(name, shapes[name], *tp, tied=cfg.tie_word_embeddings) if tp is not None else None
        # one mapping per tensor: the file's pages read so far leave this process's resident memory
        # when it closes (held open, a whole shard's pages would count on top of the copies)
        with open_safetensors(file) as f:
            try:
                # a view of the tensor's mapped storage (this rank's part of it): one copy, converted on the
                # way, so no whole-tensor temporary in the file's dtype is ever resident
                view = f.get_slice(name)[index if index is not None else slice(None)]
                t = torch.empty(view.shape, dtype=dtype, device=device).copy_(view)
                del view
            except Exception as e:
                raise ValueError(f"{file}: cannot read tensor {name} ({e})") from e
        # checked per tensor: NaN or inf weights would load silently and emit only token 0. A sum is
        # non-finite when any value is (it allocates nothing the size of the tensor); the count runs only then
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{file}: tensor {name} has {bad} non-finite value(s) (NaN or inf) in {dtype}")
        state[name] = t
        return_freed_memory()  # this tensor's temporary copies, before the next one's are made
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(device)
    if tp is not None:
        tensor_parallel.connect(model, *tp)
    return model.eval()



def check_device(device: str | torch.device | None) -> torch.device:
    """The device to load on (None: the CPU), or a ValueError naming it when torch cannot use it."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available to this torch ({torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: MPS is not available to this torch")
    return dev


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    file = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(file) if file.is_file() else None


def load_generation_config(path: str | Path) -> dict:
    file = Path(path) / "generation_config.json"
    return _read_json(file) if file.is_file() else {}


def save_pretrained(
    model: LoopLM,
    path: str | Path,
    *,
    tokenizer_json_path: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
    dtype=None,
    max_shard_bytes: int | None = None,
    generation_config: dict | None = None,
) -> None:
    """Writes the published layout; tensors keep their dtype unless `dtype` is given.

    With `max_shard_bytes`, weights are split into `model-0000i-of-0000n.safetensors` shards
    plus `model.safetensors.index.json`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    state, tensors = {}, model.state_dict()
    for name in expected_shapes(model):
        t = tensors[name].detach()
        state[name] = (t.to(resolve_dtype(dtype)) if dtype is not None else t).cpu().contiguous().clone()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shards = _split(state, max_shard_bytes)
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.nbytes for t in state.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(generation_config or gen, indent=2) + "\n")
    if tokenizer_json_path is not None:
        if Path(tokenizer_json_path).resolve() != (path / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer_json_path, path / "tokenizer.json")
    elif tokenizer is not None:
        (path / "tokenizer.json").write_text(tokenizer.to_str())


def _split(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards, cur, size = [], {}, 0
    for name, t in state.items():
        if cur and size + t.nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + t.nbytes
    return shards + [cur]


def load_pretrained(path: str | Path, *, dtype=None, device=None, tp: tuple[int, int] | None = None):
    """(model, tokenizer or None, generation config dict) from a checkpoint directory (tp: see load_model)."""
    model = load_model(path, dtype=dtype, device=device, tp=tp)
    return model, load_tokenizer(path), load_generation_config(path)
