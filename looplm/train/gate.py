"""Stage II: train only `model.early_exit_gate` with improvement-based targets, the LM frozen.

Because the LM is frozen, its per-loop hidden states and losses are fixed: they are computed once
for a set of training windows (no gradients), and the gate (a Linear(H, 1)) is then fitted on
those cached features for many cheap steps. This is exactly Stage II's objective (docs/design.md, "Training objectives"),
only without re-running the frozen stack for every gate step.

Usage:
    python -m looplm.train gate --checkpoint data/run/final --data data --out data/gate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from looplm.model import LoopLM

from .objectives import per_loop_ce, stage2_gate_loss, stage2_targets
from .trainer import TokenData, load_model


@torch.no_grad()
def collect_features(model: LoopLM, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-LM features for Stage II: hidden [T, N, H] (the gate's input) and CE [T, N] per token."""
    model.eval()
    hidden, ce = [], []
    for x, y in tqdm(batches, desc="stage II features", dynamic_ncols=True, mininterval=5):
        out = model.loop_outputs(x)
        T, B, S, H = out.hidden.shape
        hidden.append(out.hidden.reshape(T, B * S, H).float())
        ce.append(per_loop_ce(out.logits, y).reshape(T, B * S))
    return torch.cat(hidden, dim=1), torch.cat(ce, dim=1)


def fit_gate(
    gate: torch.nn.Linear,
    hidden: torch.Tensor,
    ce: torch.Tensor,
    *,
    steps: int = 400,
    lr: float = 1e-2,
    batch_tokens: int = 8192,
    k: float = 50.0,
    gamma: float = 0.005,
    seed: int = 0,
) -> list[float]:
    """Fits `gate` in place with Adam on the Stage II loss over cached features; returns the loss curve.

    Args:
        gate: the model's early_exit_gate, Linear(H, 1) (z_t = gate(h_t), lambda_t = sigmoid(z_t)).
        hidden: [T, N, H] normed hidden states of the frozen LM after every loop.
        ce: [T, N] per-token CE of the frozen LM after every loop.
    """
    g = torch.Generator().manual_seed(seed)
    params = list(gate.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    N = hidden.shape[1]
    curve = []
    bar = tqdm(range(steps), desc="stage II gate", dynamic_ncols=True, mininterval=2)
    for step in bar:
        idx = torch.randint(0, N, (min(batch_tokens, N),), generator=g)
        z = gate(hidden[:, idx].to(gate.weight.dtype)).squeeze(-1).float()  # [T, n]
        loss, per_step = stage2_gate_loss(z, ce[:, idx], k=k, gamma=gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix_str(" ".join(f"t{t + 2}={v:.3f}" for t, v in enumerate(per_step.tolist())))
    return curve


def train_gate(
    model: LoopLM,
    data: TokenData,
    *,
    feature_batches: int = 24,
    batch_size: int = 16,
    steps: int = 400,
    lr: float = 1e-2,
    k: float = 50.0,
    gamma: float = 0.005,
    seed: int = 0,
) -> dict:
    """Stage II on any LoopLM: freezes everything, fits only model.model.early_exit_gate. Returns stats."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    batches = [data.batch(batch_size, gen) for _ in range(feature_batches)]
    t0 = time.time()
    hidden, ce = collect_features(model, batches)
    t_features = time.time() - t0
    gate = model.model.early_exit_gate
    with torch.no_grad():
        before = float(stage2_gate_loss(gate(hidden).squeeze(-1).float(), ce, k=k, gamma=gamma)[0])
    curve = fit_gate(gate, hidden, ce, steps=steps, lr=lr, k=k, gamma=gamma, seed=seed)
    for p in gate.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        after = float(stage2_gate_loss(gate(hidden).squeeze(-1).float(), ce, k=k, gamma=gamma)[0])
        w = stage2_targets(ce, k, gamma)
    return {
        "tokens": int(hidden.shape[1]),
        "feature_seconds": round(t_features, 1),
        "fit_seconds": round(time.time() - t0 - t_features, 1),
        "loss_before": before,
        "loss_after": after,
        "mean_continue_target_per_step": [round(float(v), 4) for v in w.mean(dim=1)],
        "k": k,
        "gamma": gamma,
        "curve_every_50": [round(v, 4) for v in curve[::50]],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.train gate", description="Stage II gate training (LM frozen).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (any Ouro-format model)")
    p.add_argument("--data", default="data", help="folder with train.bin")
    p.add_argument("--out", required=True, help="where to save the checkpoint with the trained gate")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--feature-batches", type=int, default=24)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--k", type=float, default=50.0)
    p.add_argument("--gamma", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="dtype of the saved tensors")
    a = p.parse_args(argv)
    from looplm.checkpoint import save_pretrained
    from looplm.config import resolve_dtype

    torch.manual_seed(a.seed)
    model = load_model(a.checkpoint)
    data = TokenData(Path(a.data) / "train.bin", a.seq_len)
    stats = train_gate(model, data, feature_batches=a.feature_batches, batch_size=a.batch_size, steps=a.steps,
                       lr=a.lr, k=a.k, gamma=a.gamma, seed=a.seed)
    tok = Path(a.checkpoint) / "tokenizer.json"
    save_pretrained(model, a.out, tokenizer_json_path=tok if tok.is_file() else None, dtype=resolve_dtype(a.dtype))
    (Path(a.out) / "stage2_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
