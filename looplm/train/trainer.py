"""Stage I training of a looped LM from scratch (or from a checkpoint) on uint16 token arrays.

AdamW with linear warm-up and cosine decay, gradient clipping, optional bf16 autocast and
torch.compile, resumable checkpoints, deterministic seeds (batch i is drawn from a generator seeded
with (seed, i), so a resumed run sees the same batches), and a tqdm bar with per-loop losses.

Usage (the default model's recipe is in looplm/default_model/MODEL_CARD.md):
    python -m looplm.train --data data/ --out data/run --hidden 256 --layers 2 --steps 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from looplm.config import LoopConfig
from looplm.dtypes import cpu_bf16_native, cpu_bf16_reason
from looplm.model import LoopLM

from .objectives import (IGNORE_INDEX, entropy_regularized_loss, kv_consistency_loss, loop_distillation_loss, per_loop_ce,
                         teacher_kl_loss, weighted_per_loop_loss)
from .shared_kv import SHARED_MODES, per_loop_kv, shared_kv_logits, shared_pass_logits, stacked_kv
from .tasks import PhopRows


@dataclass
class TrainConfig:
    """Everything a Stage I run depends on; saved with every checkpoint."""

    data: str = "data"  # folder with train.bin / val.bin (uint16) and tokenizer.json
    out: str = "data/run"
    init_from: str | None = None  # a checkpoint directory, or a run's ckpt.pt, to continue from instead of random init
    # model (ignored with init_from)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    total_ut_steps: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # objective
    objective: str = "weighted"  # "weighted" per-loop CE, or "entropy" (Stage I ELBO with uniform prior)
    loop_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    beta: float = 0.1  # entropy weight of the "entropy" objective
    beta_late: float = 0.05  # ... after half of the run
    # synthetic task rows (looplm.train.tasks): p-hop problems generated on the fly, loss on answers only
    phop_rows: int = 0  # rows of each batch given to p-hop problems (the rest are corpus windows)
    phop_weight: float = 1.0  # the answers' loss term is added with this weight
    phop_loop_weights: list[float] = field(default_factory=list)  # default: loop_weights
    phop_max_hops: int = 4
    # loop distillation on the corpus rows (objectives.loop_distillation_loss): T weights, empty = off
    distill_weights: list[float] = field(default_factory=list)
    distill_scale: float = 1.0  # the (weight-normalised) distillation term is added times this
    # shared-KV steps (looplm.train.shared_kv): every k-th step attends to the shared K/V of earlier
    # positions, as decoding with kv="last"/"mean" does; 0 = off. The modes alternate over those steps.
    shared_kv_every: int = 0
    shared_kv_modes: str = "last,mean"
    shared_kv_kl: float = 0.0  # + this times the loop-weighted KL(per-loop pass || shared pass) on corpus rows
    shared_kv_joint: bool = False  # shared-KV steps also take the per-loop pass's losses (it then runs with gradients)
    shared_kv_grad: bool = False  # the shared K/V carry the shared pass's loss back into the per-loop pass that made them
    # K/V consistency (objectives.kv_consistency_loss): + this times the scale-free distance of every loop's K/V
    # to the shared cache's value (the last loop's or the mean), on every step's per-loop pass; 0 = off
    kv_consistency: float = 0.0
    kv_consistency_target: str = "last"
    ood_val: str = ""  # a second held-out token file evaluated per loop at every evaluation (e.g. ood_text.bin)
    # optimisation
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 3000
    time_budget_min: float | None = None  # the schedule also advances with elapsed time / budget; stops at it
    stop_at: int | None = None  # stop after this step as if interrupted (the schedule still follows `steps`)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    compile: bool = False
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 250
    log_every: int = 10


def _causal_sdpa(q, k, v, q_pos, k_pos):
    """Training attention: queries and keys are the same positions 0..S-1, so `is_causal` is exact
    and avoids materialising the boolean mask the general backend builds."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class TokenData:
    """Random windows of seq_len + 1 tokens from a memory-mapped uint16 array."""

    def __init__(self, path: str | Path, seq_len: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than a window of {seq_len + 1}")

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch_size,), generator=generator)
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def fixed_batches(self, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n evenly spaced, non-overlapping batches: the same every call (for evaluation)."""
        window = self.seq_len + 1
        total = min(n * batch_size, (len(self.tokens) - 1) // window)
        stride = (len(self.tokens) - window) // max(1, total)
        rows = np.stack([self.tokens[i * stride : i * stride + window] for i in range(total)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return [(rows[i : i + batch_size, :-1], rows[i : i + batch_size, 1:]) for i in range(0, total, batch_size)]


def lr_at(progress: float, tc: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)


def load_model(path: str | Path) -> LoopLM:
    """The float32 model of any checkpoint directory the engine loads, or of a run's ckpt.pt (load_run_checkpoint)."""
    import looplm

    if Path(path).is_file():
        return load_run_checkpoint(Path(path))
    if hasattr(looplm, "load"):
        return looplm.load(str(path)).model.float()
    from looplm.checkpoint import load_model as _load

    return _load(path, dtype=torch.float32)


def load_run_checkpoint(path: Path) -> LoopLM:
    """The float32 weights of a training run's resumable `ckpt.pt`, on the architecture it records
    (its model config, or for older runs the one its train_config builds)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "train_config" not in ckpt:
        raise ValueError(f"{path}: not a looplm.train checkpoint (expected the keys 'model' and 'train_config')")
    if "model_config" in ckpt:
        model = LoopLM(LoopConfig.from_dict(ckpt["model_config"], source=str(path)))
    else:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        tc = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in fields})
        model = build_model(tc, ckpt["model"]["model.embed_tokens.weight"].shape[0])
    model.load_state_dict(ckpt["model"])
    print(f"{path}: step {ckpt['step']} of the run in {ckpt['train_config']['out']}", flush=True)
    return model.float()


def build_model(tc: TrainConfig, vocab_size: int) -> LoopLM:
    if tc.init_from:
        return load_model(tc.init_from).float()
    cfg = LoopConfig(
        vocab_size=vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        max_position_embeddings=tc.max_position_embeddings,
        rope_theta=tc.rope_theta,
        tie_word_embeddings=tc.tie_word_embeddings,
        total_ut_steps=tc.total_ut_steps,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LoopLM(cfg).init_weights(tc.seed)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, biases or the gate)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "early_exit_gate" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)


def stage1_loss(model: LoopLM, x: torch.Tensor, y: torch.Tensor, objective: str, loop_weights, beta: float,
                task_rows: int = 0, task_weight: float = 1.0, task_loop_weights=None, distill_weights=None,
                distill_scale: float = 1.0, shared_kv: str | None = None, shared_kl: float = 0.0,
                shared_joint: bool = False, kv_consistency: float = 0.0, kv_target: str = "last",
                shared_grad: bool = False):
    """(loss, per-loop mean CE [T] of the corpus rows, per-loop answer CE [T] of the task rows or None,
    per-loop K/V distance [T] of objectives.kv_consistency_loss or None).

    The last `task_rows` rows are task rows (targets IGNORE_INDEX except answers): their masked
    per-loop CE enters as a separate term, `task_weight` times the weighted mean over loops.
    `distill_weights` (T weights) adds `distill_scale` times the loop-distillation term on the corpus rows.
    `shared_kv` ("last" or "mean") computes these losses on the shared-KV pass
    (shared_kv.shared_kv_logits; the returned CEs are its) and adds `shared_kl` times the
    loop-weighted KL from the per-loop pass (detached) to it on the corpus rows; `shared_joint`
    adds the same losses on that per-loop pass too (it then runs with gradients); `shared_grad`
    lets the shared pass's loss reach the per-loop pass through the shared K/V (not detached).
    `kv_consistency` adds that times the K/V consistency term (toward `kv_target`, "last" or
    "mean") of the per-loop pass, which then runs with gradients on shared-KV steps too; at 0 the
    computation is exactly the one without the option.
    """
    n = x.shape[0] - task_rows
    gates, teacher, kv_states = None, None, None
    if kv_consistency and objective != "weighted":
        raise ValueError(f"K/V consistency needs objective 'weighted' (its per-loop pass has no gates), got {objective!r}")
    if shared_kv is None and kv_consistency:
        logits, kvs = per_loop_kv(model, x)
        kv_states = stacked_kv(kvs)
    elif shared_kv is None:
        out = model.loop_outputs(x)
        logits, gates = out.logits, out.gates
    elif kv_consistency:
        teacher, kvs = per_loop_kv(model, x)
        logits, kv_states = shared_pass_logits(model, x, kvs, shared_kv, shared_grad), stacked_kv(kvs)
    else:
        logits, teacher = shared_kv_logits(model, x, shared_kv, teacher_grad=shared_joint, kv_grad=shared_grad)

    def task_loss(lg):
        ce = per_loop_ce(lg, y)
        if objective == "weighted":
            loss, _ = weighted_per_loop_loss(ce[:, :n], loop_weights)
        elif objective == "entropy":
            if gates is None:
                raise ValueError("the entropy objective needs the exit gates, which the shared-KV pass does not compute")
            loss, _ = entropy_regularized_loss(ce[:, :n], gates[:, :n], beta)
        else:
            raise ValueError(f"unknown objective {objective!r}")
        task_per_loop = None
        if task_rows:
            t_loss, task_per_loop = weighted_per_loop_loss(ce[:, n:], task_loop_weights or loop_weights, y[n:] != IGNORE_INDEX)
            loss = loss + task_weight * t_loss
        if distill_weights:
            distill, _ = loop_distillation_loss(lg[:, :n], distill_weights)
            loss = loss + distill_scale * distill
        return loss, ce[:, :n].detach().mean(dim=(1, 2)), task_per_loop

    loss, per_loop, task_per_loop = task_loss(logits)
    if shared_kv is not None and shared_joint:
        loss = loss + task_loss(teacher)[0]
    if shared_kv is not None and shared_kl:
        kl, _ = teacher_kl_loss(logits[:, :n], teacher[:, :n].detach(), loop_weights)
        loss = loss + shared_kl * kl
    kv_per_loop = None
    if kv_states is not None:
        kvc, kv_per_loop = kv_consistency_loss(kv_states, kv_target)
        loss = loss + kv_consistency * kvc
    return loss, per_loop, task_per_loop, kv_per_loop


@torch.no_grad()
def evaluate_batches(model: LoopLM, batches, device: str = "cpu", shared_kv: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-loop CE [T], fraction [T] of tokens whose loop-t argmax equals the last loop's,
    the draft quality of loop t) over fixed batches; `shared_kv` evaluates the parallel shared-KV
    pass of training (shared_kv.shared_kv_logits) instead of the per-loop forward."""
    was_training = model.training
    model.eval()
    total, agree, n = None, None, 0
    for x, y in batches:
        x = x.to(device)
        logits = model.loop_outputs(x).logits if shared_kv is None else shared_kv_logits(model, x, shared_kv)[0]
        ce = per_loop_ce(logits, y.to(device)).mean(dim=(1, 2)).cpu()
        am = logits.argmax(-1)
        ag = (am == am[-1]).float().mean(dim=(1, 2)).cpu()
        total = ce * x.numel() if total is None else total + ce * x.numel()
        agree = ag * x.numel() if agree is None else agree + ag * x.numel()
        n += x.numel()
    model.train(was_training)
    return total / n, agree / n


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def train(tc: TrainConfig) -> Path:
    """Runs Stage I; returns the directory of the final checkpoint (published Ouro format)."""
    from looplm.checkpoint import save_pretrained

    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tc.data)
    tokenizer_json = data_dir / "tokenizer.json"
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"] if (data_dir / "meta.json").is_file() else None
    if vocab_size is None:
        from tokenizers import Tokenizer

        vocab_size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
    train_data = TokenData(data_dir / "train.bin", tc.seq_len)
    val_path = data_dir / "val_text.bin" if (data_dir / "val_text.bin").is_file() else data_dir / "val.bin"
    val_batches = TokenData(val_path, tc.seq_len).fixed_batches(tc.eval_batches, tc.batch_size)
    ood_batches = TokenData(tc.ood_val, tc.seq_len).fixed_batches(tc.eval_batches, tc.batch_size) if tc.ood_val else None
    shared_modes = [m for m in tc.shared_kv_modes.split(",") if m] if tc.shared_kv_every else []
    if tc.shared_kv_every:
        if tc.shared_kv_every < 1 or not shared_modes or any(m not in SHARED_MODES for m in shared_modes):
            raise ValueError(f"--shared-kv-every {tc.shared_kv_every} must be >= 1 and --shared-kv-modes "
                             f"{tc.shared_kv_modes!r} a comma-separated list of {SHARED_MODES}")
        if tc.objective != "weighted":
            raise ValueError(f"shared-KV steps need --objective weighted (the shared pass has no gates), got {tc.objective!r}")
    if tc.kv_consistency < 0 or tc.kv_consistency_target not in SHARED_MODES:
        raise ValueError(f"--kv-consistency {tc.kv_consistency} must be >= 0 and --kv-consistency-target "
                         f"{tc.kv_consistency_target!r} one of {SHARED_MODES}")
    if tc.kv_consistency and tc.objective != "weighted":
        raise ValueError(f"--kv-consistency needs --objective weighted (its per-loop pass has no gates), got {tc.objective!r}")

    phop, tokenizer = None, None
    if tc.phop_rows:
        from looplm.tokenizer import Tokenizer

        if not 0 < tc.phop_rows < tc.batch_size:
            raise ValueError(f"--phop-rows {tc.phop_rows} must leave corpus rows in a batch of {tc.batch_size}")
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        phop = PhopRows(tokenizer, tc.seq_len, tc.phop_max_hops, exclude_file=data_dir / "phop_val.jsonl")

    model = build_model(tc, vocab_size).to(tc.device)
    model.set_attention(_causal_sdpa)
    T = model.num_loops
    if tc.objective == "weighted" and len(tc.loop_weights) != T:
        raise ValueError(f"{len(tc.loop_weights)} loop weights for a {T}-loop model")
    opt = make_optimizer(model, tc)
    step, elapsed = 0, 0.0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.is_file():  # resume
        ckpt = torch.load(ckpt_path, map_location=tc.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {T} loops; {model.config}", flush=True)

    if tc.bf16 and tc.device.startswith("cpu") and not cpu_bf16_native():
        print(f"warning: --bf16 on a CPU with {cpu_bf16_reason()}: bf16 matrix products run in software "
              "here, several times slower than float32 (8x in a backward pass on an AVX2 EPYC); "
              "--no-bf16 trains faster", file=sys.stderr, flush=True)
    fwd = torch.compile(stage1_loss) if tc.compile else stage1_loss
    log = open(out / "log.jsonl", "a")
    autocast = torch.autocast(device_type=tc.device.split(":")[0], dtype=torch.bfloat16, enabled=tc.bf16)
    bar = tqdm(total=tc.steps, initial=step, dynamic_ncols=True, mininterval=5)
    ema = None
    budget_s = tc.time_budget_min * 60 if tc.time_budget_min else None

    def save_ckpt():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "rng": _rng_state(), "train_config": dataclasses.asdict(tc),
                    "model_config": model.config.to_dict()}, tmp)
        tmp.replace(ckpt_path)

    model.train()
    t_last = time.time()
    last = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    while step < last and (budget_s is None or elapsed < budget_s):
        progress = step / tc.steps if budget_s is None else max(step / tc.steps, elapsed / budget_s)
        lr = lr_at(progress, tc, step)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        x, y = train_data.batch(tc.batch_size - tc.phop_rows, gen)
        if phop is not None:
            px, py = phop.batch(tc.phop_rows, seed=tc.seed * 1_000_003 + step)
            x, y = torch.cat([x, px]), torch.cat([y, py])
        x, y = x.to(tc.device), y.to(tc.device)
        # shared-KV steps: every shared_kv_every-th step, the modes taking turns
        shared = None
        if shared_modes and (step + 1) % tc.shared_kv_every == 0:
            shared = shared_modes[((step + 1) // tc.shared_kv_every - 1) % len(shared_modes)]
        with autocast:
            beta = tc.beta if progress < 0.5 else tc.beta_late
            loss, per_loop, task_per_loop, kv_per_loop = fwd(
                model, x, y, tc.objective, tuple(tc.loop_weights), beta, tc.phop_rows, tc.phop_weight,
                tuple(tc.phop_loop_weights) or None, tuple(tc.distill_weights) or None, tc.distill_scale, shared,
                tc.shared_kv_kl, tc.shared_kv_joint, tc.kv_consistency, tc.kv_consistency_target,
                tc.shared_kv_grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        per_loop = per_loop.float().cpu()
        if shared is None:  # the bar shows the per-loop regime's losses
            ema = per_loop if ema is None else 0.95 * ema + 0.05 * per_loop
        bar.update(1)
        if ema is not None:
            bar.set_postfix_str(" ".join(f"L{t + 1}={v:.3f}" for t, v in enumerate(ema.tolist())) + f" lr={lr:.1e}")
        if step % tc.log_every == 0:
            rec = {"step": step, "elapsed_s": round(elapsed, 1), "lr": lr, "loss": loss.item(),
                   "per_loop": [round(v, 4) for v in per_loop.tolist()], "grad_norm": float(gnorm),
                   "tok_per_s": round(step * tc.batch_size * tc.seq_len / max(elapsed, 1e-9))}
            if shared is not None:
                rec["kv"] = shared
            if task_per_loop is not None:
                rec["phop_per_loop"] = [round(v, 4) for v in task_per_loop.float().tolist()]
            if kv_per_loop is not None:
                rec["kv_dist_per_loop"] = [round(v, 5) for v in kv_per_loop.tolist()]
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % tc.eval_every == 0 or step == tc.steps:
            val, agree = evaluate_batches(model, val_batches, tc.device)
            msg = {"step": step, "val_per_loop": [round(v, 4) for v in val.tolist()],
                   "gap_1_T": round(float(val[0] - val[-1]), 4), "agree_with_T": [round(v, 3) for v in agree.tolist()]}
            for mode in shared_modes:  # the parallel shared pass (training's approximation of decoding)
                sval, sagree = evaluate_batches(model, val_batches, tc.device, shared_kv=mode)
                msg[f"val_{mode}_per_loop"] = [round(v, 4) for v in sval.tolist()]
            if ood_batches is not None:
                oval, oagree = evaluate_batches(model, ood_batches, tc.device)
                msg["ood_per_loop"] = [round(v, 4) for v in oval.tolist()]
                msg["ood_agree_with_T"] = [round(v, 3) for v in oagree.tolist()]
            if phop is not None:  # held-out answer accuracy per loop on the first 400 problems
                from .evaluate import phop_accuracy

                acc = phop_accuracy(model, tokenizer, data_dir / "phop_val.jsonl", limit=400)
                model.train()
                msg["phop_acc_per_loop"] = [round(v, 3) for v in acc["per_loop"]]
            log.write(json.dumps(msg) + "\n")
            log.flush()
            tqdm.write(json.dumps(msg))
        if step % tc.save_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    final = out / "final"
    model.set_attention(_default_attention())
    save_pretrained(model, final, tokenizer_json_path=tokenizer_json if tokenizer_json.is_file() else None,
                    dtype=torch.bfloat16)
    print(f"done: step {step}, {elapsed / 60:.1f} min; saved {final}", flush=True)
    return final


def _default_attention():
    from looplm.attention import sdpa_attention

    return sdpa_attention


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m looplm.train", description="Stage I training of a looped LM.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, (list, tuple)):
            p.add_argument(flag, type=float, nargs="+", default=default)
        elif f.name in ("init_from", "time_budget_min", "threads", "stop_at"):
            typ = {"init_from": str, "time_budget_min": float, "threads": int, "stop_at": int}[f.name]
            p.add_argument(flag, type=typ, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    a = p.parse_args(argv)
    tc = TrainConfig(**vars(a))
    tc.betas = tuple(tc.betas)
    return tc


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
