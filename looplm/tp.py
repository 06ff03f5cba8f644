"""Tensor parallelism across processes with torch.distributed (gpt-fast style, as a transform).

Each of `world` ranks holds 1/world of every layer. Column-parallel (a slice of the output
features, i.e. of the rows of the (out, in) weight): q/k/v, split by whole heads and KV heads, and
gate/up. Row-parallel (a slice of the input features): o_proj and down_proj, whose partial
outputs an all-reduce sums (two per layer and loop). Vocabulary-parallel: the token embedding
(`VocabParallelEmbedding`, rows [r*V/N, (r+1)*V/N) on rank r; a lookup is an all-reduce of each
rank's rows, zero where an id is another rank's), unless it is tied to the LM head. The norms, the
exit gate and the LM head are replicated (decoders apply the head on rank 0 alone, outside the
runner's steps), so every rank holds the same hidden states, gates and logits after each loop.
A rank's model has the per-rank head counts in its config, so its paged KV cache holds only its
own KV heads (1/world of the cache bytes per position).

The engine: rank 0 runs the scheduler and the decoders; before each runner step its runner
(`TPRunner`) broadcasts the step's (block table, Forward) items, and every other rank runs the
same step on its own runner and cache (`serve`). Decoders therefore see exactly what one process
computing with these weights would see. Launch with `torchrun --nproc-per-node N` (every rank
runs the same script; `looplm.load(path, tp=N)` returns the engine on rank 0 and never returns on
the others: they serve rank 0 and exit when it does).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .config import LoopConfig
from .model import LoopLM
from .runner import Runner
from .work import Forward

# checkpoint name suffix -> the weight dimension split across ranks (0: output rows, 1: input columns)
_SPLIT = {
    "self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 0, "self_attn.v_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1,
}
EMBEDDING = "model.embed_tokens.weight"
_state: dict = {}  # rank 0's engine, stopped at exit
# Rank 0: the workers run rank 0's messages in order, so a message and the collectives of its
# computation must not interleave with another thread's (the scheduler's steps, a server's logprobs).
_collectives = threading.Lock()
# Rank 0: set while this thread computes a message's step with the other ranks (see _with_workers)
_lockstep = threading.local()
# How long a collective waits for a peer (the process group's timeout; $LOOPLM_TP_TIMEOUT seconds).
# A rank whose process dies is noticed at once (its sockets close); the timeout bounds a rank that
# hangs, and also how long the other ranks may wait idle for rank 0's next step.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LOOPLM_TP_TIMEOUT", 24 * 3600)))


def check_divisible(cfg: LoopConfig, world: int) -> None:
    """Raises ValueError unless heads, KV heads and the MLP width divide evenly over `world` ranks
    and every rank gets rows of the vocabulary (it need not divide: shards differ by one row)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tp must be an integer >= 1, got {world!r}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(cfg, name)
        if n % world:
            raise ValueError(f"tp={world}: the model's {name}={n} is not divisible by {world} ranks")
    if cfg.vocab_size < world:
        raise ValueError(f"tp={world}: the model's vocab_size={cfg.vocab_size} leaves a rank without rows of the vocabulary")


def rank_config(cfg: LoopConfig, world: int) -> LoopConfig:
    """The config of one rank's model: 1/world of the heads, KV heads and MLP width."""
    check_divisible(cfg, world)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                               num_key_value_heads=cfg.num_key_value_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


def vocab_rows(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of the token embedding that rank `rank` holds: [r*V/N, (r+1)*V/N) rounded
    down, so a vocabulary that `world` does not divide gives shards that differ by one row."""
    return rank * vocab_size // world, (rank + 1) * vocab_size // world


def rank_slice(name: str, shape: tuple[int, ...], rank: int, world: int, *, tied: bool = False) -> tuple[slice, ...] | None:
    """The index of rank `rank`'s part of checkpoint tensor `name` of full shape `shape`, or None
    when the tensor is replicated. Heads stay whole: a split by rows of q/k/v is a split by heads.
    The token embedding splits by vocabulary rows unless it is `tied` to the LM head."""
    if name == EMBEDDING:
        return None if tied else (slice(*vocab_rows(shape[0], rank, world)), slice(None))
    dim = next((d for suffix, d in _SPLIT.items() if name.endswith(suffix)), None)
    if dim is None:
        return None
    n = shape[dim] // world
    index = [slice(None)] * len(shape)
    index[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(index)


@torch.no_grad()
def shard(model: LoopLM, rank: int, world: int) -> LoopLM:
    """Keeps rank `rank`'s part of every split weight of a whole model (in place) and connects the
    all-reduces; returns the model. Needs an initialised process group of `world` ranks to run.

    Raises ValueError when heads, KV heads or the MLP width do not divide over `world` (or the
    vocabulary has fewer rows than ranks), or when the model's projections are fused (shard first,
    then `looplm.fuse`).
    """
    check_divisible(model.config, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    if getattr(model, "tp", None) is not None:
        raise ValueError(f"the model is already sharded (rank {model.tp[0]} of {model.tp[1]})")
    if any(layer.self_attn.qkv is not None or layer.mlp.gate_up is not None for layer in model.model.layers):
        raise ValueError("shard the model before fusing its projections (looplm.fuse)")
    for name, p in list(model.named_parameters()):
        index = rank_slice(name, tuple(p.shape), rank, world) if name != EMBEDDING else None  # split_embedding: a new module
        if index is not None:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = nn.Parameter(p[index].clone(), requires_grad=p.requires_grad)
    split_embedding(model, rank, world)
    model.config = rank_config(model.config, world)
    for layer in model.model.layers:
        layer.self_attn.n_heads, layer.self_attn.n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    return connect(model, rank, world)


def split_embedding(model: LoopLM, rank: int, world: int) -> None:
    """Replaces the model's whole token embedding by rank `rank`'s `VocabParallelEmbedding` (its
    rows of the weights; on the meta device, an empty one for `load_state_dict(assign=True)`).
    A tied embedding stays whole: it is the LM head, which decoders apply on rank 0 alone."""
    if model.config.tie_word_embeddings:
        return
    whole = model.model.embed_tokens
    start, end = vocab_rows(whole.num_embeddings, rank, world)
    model.model.embed_tokens = VocabParallelEmbedding(whole.weight[start:end].clone(), start, whole.num_embeddings)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + len(weight)) of a token embedding of `num_embeddings` rows. A lookup
    sums every rank's lookup with an all-reduce: each id's row comes from the one rank holding
    it, the others add exact zeros, so the result equals the whole table's bit for bit."""

    def __init__(self, weight: torch.Tensor, start: int, num_embeddings: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.num_embeddings = start, num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) in [0, num_embeddings) -> (..., H); a collective: every rank must call it."""
        rows = ids - self.start
        mine = (rows >= 0) & (rows < self.weight.shape[0])
        out = F.embedding(torch.where(mine, rows, 0), self.weight).masked_fill_(~mine[..., None], 0)
        if "engine" in _state and not getattr(_lockstep, "on", False):
            # rank 0's decoders embed tokens between the runner's steps: the other ranks join on request
            with _with_workers(("embed", ids.cpu())):
                dist.all_reduce(out)
        else:
            dist.all_reduce(out)
        return out


def connect(model: LoopLM, rank: int, world: int) -> LoopLM:
    """Adds the all-reduce after o_proj and down_proj of a model holding one rank's weights
    (`shard`, or built from `rank_config` with `split_embedding` and loaded with `rank_slice`);
    sets `model.tp`."""
    for layer in model.model.layers:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.register_forward_hook(_all_reduce)
    model.tp = (rank, world)
    return model


def _all_reduce(module, inputs, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out)  # the partial products of this rank's columns: their sum is the whole product
    return out


# -- launching ------------------------------------------------------------------------------------
def init(world: int, device: str | torch.device | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[int, torch.device]:
    """Joins the process group of a launch of `world` ranks (torchrun sets RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); gloo on the CPU, NCCL on CUDA (rank r on GPU LOCAL_RANK). An
    already initialised group is used as it is. Returns (rank, this rank's device).

    Raises ValueError when not launched with `world` ranks.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tp must be an integer >= 1, got {world!r}")
    if "engine" in _state:  # the other ranks serve the first engine's steps
        raise ValueError("this process already has a tensor-parallel engine (one per launch); call looplm.tp.stop() first")
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(f"tp={world} needs a distributed launch: run under `torchrun --nproc-per-node {world}` "
                             "(RANK and WORLD_SIZE are not set), or use `python -m looplm generate --tp N`")
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise ValueError(f"tp={world} but the launch has WORLD_SIZE={size} processes")
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=size, timeout=timeout)
    return rank, dev


class TPRunner(Runner):
    """Rank 0's runner: broadcasts each step's items to the other ranks, then runs them itself."""

    @torch.inference_mode()
    def run(self, items: list[tuple[list[int], Forward]]):
        with _with_workers(("run", self.cache.kv, [(table, _to(fwd, "cpu")) for table, fwd in items])):
            return super().run(items)


@torch.inference_mode()
def per_loop_logits(model: LoopLM, input_ids: torch.Tensor) -> torch.Tensor:
    """`model.per_loop_logits(input_ids)` ((B, S) ids -> (T, B, S, V), no cache) for rank 0 of a
    tensor-parallel engine: the other ranks compute their part with it. Any other model: as is."""
    if getattr(model, "tp", None) is None:
        return model.per_loop_logits(input_ids)
    with _with_workers(("logits", input_ids.cpu())):
        return model.per_loop_logits(input_ids)


@contextlib.contextmanager
def _with_workers(message: tuple):
    """Rank 0: sends the other ranks `message`, then runs the body, whose collectives are the ones
    the message makes them run, with no other thread's message in between."""
    with _collectives:
        _broadcast(message)
        _lockstep.on = True
        try:
            yield
        finally:
            _lockstep.on = False


def _broadcast(message: tuple) -> None:
    try:
        dist.broadcast_object_list([message], src=0)
    except RuntimeError as e:
        raise RuntimeError(f"tensor parallel: a worker rank is gone ({_one_line(e)})") from e


def _to(fwd: Forward, device) -> Forward:
    """A copy of the Forward with its tensors on `device` (pickled tensors keep their device)."""
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return dataclasses.replace(fwd, inputs=move(fwd.inputs), pos=move(fwd.pos), start_loop=move(fwd.start_loop),
                               num_loops=move(fwd.num_loops), logits=move(fwd.logits), copy_slots=list(fwd.copy_slots))


def start(engine) -> None:
    """Rank 0: routes the engine's runner steps through `TPRunner` and stops the other ranks when
    the process exits (or at `stop()`). Other ranks: serve rank 0's steps, then exit the process."""
    rank, _ = engine.model.tp
    box = [engine.scheduler.free_memory]  # every rank sizes its default cache as rank 0 does
    dist.broadcast_object_list(box, src=0)
    engine.scheduler.free_memory = box[0]
    if rank == 0:
        engine.scheduler.runner_class = TPRunner
        _state["engine"] = engine
        atexit.register(stop)
        return
    code = serve(engine)
    sys.exit(code)


def stop() -> None:
    """Rank 0: stops the engine, tells the other ranks to exit and leaves the process group."""
    engine = _state.pop("engine", None)
    if engine is None or not dist.is_initialized():
        return
    engine.scheduler.shutdown()
    # after a forward still running in another thread (bounded: a collective stuck on a hung peer)
    locked = _collectives.acquire(timeout=30)
    try:
        dist.broadcast_object_list([("stop",)], src=0)
    except RuntimeError:
        pass  # a worker already gone has nothing to stop
    finally:
        if locked:
            _collectives.release()
    dist.destroy_process_group()


def serve(engine) -> int:
    """A worker rank's loop: runs each runner step (and no-cache forward, and embedding lookup)
    rank 0 broadcasts on this rank's runners (and model) until rank 0 stops. Returns the exit status: 0, or 1 (with a
    message) when rank 0 or a peer is gone."""
    rank = engine.model.tp[0]
    device = engine.device
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            print(f"looplm tp rank {rank}: rank 0 is gone or unreachable, exiting ({_one_line(e)})", file=sys.stderr)
            return 1
        msg = box[0]
        if msg[0] == "stop":
            dist.destroy_process_group()
            return 0
        try:
            if msg[0] == "logits":
                with torch.inference_mode():
                    engine.model.per_loop_logits(msg[1].to(device))
            elif msg[0] == "embed":
                with torch.inference_mode():
                    engine.model.model.embed_tokens(msg[1].to(device))
            else:
                _, kv, items = msg
                engine.scheduler.runner(kv).run([(table, _to(fwd, device)) for table, fwd in items])
        except ValueError:
            continue  # a Forward the runner refuses before computing: rank 0 raised the same error
        except RuntimeError as e:  # a collective failed: a peer died mid-step
            print(f"looplm tp rank {rank}: a step failed, exiting ({_one_line(e)})", file=sys.stderr)
            return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
