"""Fits a draft map (spec.drafts.DraftMap) for a checkpoint: better drafts, the same exact output.

    python -m spec.fit_draft --checkpoint looplm/default_model --data data [--recommend]

The model is frozen. On cached training tokens (and, with `--generated N`, on N of the model's
own greedy continuations of training-text prefixes: the text a greedy speculative decode actually
drafts on), the states of loops k-1 and k and of loop T are collected once; the affine map W [h_{k-1}; h_k] + b starts as the extrapolation with coefficient
c (`--extrapolate`) and is trained with Adam to minimise KL(loop T || head(mapped state)), the
same distillation target a draft head would have, on minibatches of tokens. Held-out agreement of
the draft argmax with loop T's argmax (what a greedy draft's acceptance is) is reported before and
after for the plain loop-k head, the extrapolation and the map. The map is saved next to the
checkpoint (`draft_map.safetensors`); `--recommend` also names it in the checkpoint's
generation_config.json, so `mode="speculative"` uses it by default (Engine.mode_defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from looplm.model import LoopLM

from .drafts import DraftMap, draft_state


@torch.no_grad()
def collect_states(model: LoopLM, batches, loops: list[int]) -> dict[int, torch.Tensor]:
    """1-based loop -> (N, H) float32 states of every token of `batches` after that loop."""
    out: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    for x in batches:
        hidden = model.loop_outputs(x).hidden  # (T, B, S, H)
        for t in loops:
            out[t].append(hidden[t - 1].reshape(-1, hidden.shape[-1]).float())
    return {t: torch.cat(v) for t, v in out.items()}


@torch.no_grad()
def agreement(model: LoopLM, states: dict[int, torch.Tensor], k: int, draft=None, chunk: int = 8192) -> float:
    """Fraction of tokens whose draft argmax (plain loop k, or `draft(prev, cur)`) equals loop T's."""
    T = model.num_loops
    hit = 0
    n = states[T].shape[0]
    for i in range(0, n, chunk):
        target = model.head(states[T][i : i + chunk]).argmax(-1)
        cur = states[k][i : i + chunk]
        h = cur if draft is None else draft(states[k - 1][i : i + chunk], cur)
        hit += int((model.head(h).argmax(-1) == target).sum())
    return hit / n


def generated_batches(engine, train, n: int, gen: torch.Generator, prefix: int = 32, total: int = 256, chunk: int = 32):
    """n greedy continuations (full depth) of `prefix`-token training windows, as (chunk, total) id batches."""
    out = []
    for i in tqdm(range(0, n, chunk), desc="greedy continuations"):
        prompts = train.batch(min(chunk, n - i), gen)[0][:, :prefix].tolist()
        gens = engine.generate(prompts, max_new_tokens=total - prefix, stop=[])
        out.append(torch.tensor([p + g.tokens for p, g in zip(prompts, gens)]))
    return out


def fit_draft_map(model: LoopLM, states: dict[int, torch.Tensor], k: int, *, extrapolate: float = 0.5, hidden: int = 0,
                  steps: int = 1000, lr: float = 1e-3, batch_tokens: int = 4096, seed: int = 0,
                  progress: bool = True) -> tuple[DraftMap, list[float]]:
    """Trains the loop-k map on cached float32 states (loops k-1, k, T); returns (map, KL every 50 steps).

    The affine part starts at the extrapolation with coefficient `extrapolate`; with `hidden` = M > 0
    a GELU layer of width M is added whose output projection starts at zero, so training starts
    from the extrapolation either way.
    """
    T, H = model.num_loops, model.config.hidden_size
    if not 2 <= k < T:
        raise ValueError(f"a draft map needs 2 <= draft loop < T = {T}, got {k}")
    torch.manual_seed(seed)
    w0 = DraftMap.extrapolation(H, [k], extrapolate).params[k]["weight"]
    params = {"weight": torch.zeros_like(w0), "bias": torch.zeros(H)}  # weight: the change from w0
    if hidden:
        up = torch.nn.Linear(2 * H, hidden)  # default (Kaiming-uniform) init
        params.update({"up.weight": up.weight.detach().clone(), "up.bias": up.bias.detach().clone(),
                       "down.weight": torch.zeros(H, hidden), "down.bias": torch.zeros(H)})
    for t in params.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head = model.lm_head.weight.detach().float()
    prev, cur, last = states[k - 1], states[k], states[T]
    n = cur.shape[0]

    def current() -> DraftMap:
        return DraftMap({k: {**params, "weight": w0 + params["weight"]}})

    curve = []
    bar = tqdm(range(steps), desc=f"draft map k={k}", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:  # cosine decay to 10%
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen)
        with torch.no_grad():
            teacher = F.log_softmax(last[idx] @ head.T, -1)
        student = F.log_softmax(current().state(torch.stack([prev[idx], cur[idx]])) @ head.T, -1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(loss.item(), 5))
            bar.set_postfix_str(f"KL={loss.item():.4f}")
    fitted = {name: t.detach() for name, t in current().params[k].items()}
    return DraftMap({k: fitted}, {"start_extrapolate": extrapolate, "hidden": hidden, "steps": steps, "lr": lr}), curve


def main(argv: list[str] | None = None) -> None:
    import looplm
    from looplm.train.trainer import TokenData

    p = argparse.ArgumentParser(prog="python -m spec.fit_draft", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled default model)")
    p.add_argument("--data", default="data", help="folder with train.bin and val_text.bin (or val.bin)")
    p.add_argument("--draft-loop", type=int, default=2)
    p.add_argument("--extrapolate", type=float, default=0.5, help="the extrapolation the fit starts from")
    p.add_argument("--hidden", type=int, default=0, help="width of an optional GELU hidden layer (0: affine map only)")
    p.add_argument("--batches", type=int, default=64, help="training batches (of 16 x 256 tokens) whose states are cached")
    p.add_argument("--generated", type=int, default=0, help="also fit on this many greedy continuations (224 tokens after 32-token training prefixes)")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="where to save (default: <checkpoint>/draft_map.safetensors)")
    p.add_argument("--recommend", action="store_true", help="name the map in the checkpoint's generation_config.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    engine = looplm.load(a.checkpoint)
    model = engine.model.float().eval()
    ckpt = Path(engine.path)
    k, T = a.draft_loop, model.num_loops
    data = Path(a.data)
    val_path = data / "val_text.bin" if (data / "val_text.bin").is_file() else data / "val.bin"
    for f in (data / "train.bin", val_path):
        if not f.is_file():
            raise SystemExit(f"{f} is missing: build the data with `python -m looplm.train.data --out {data}/`")
    gen = torch.Generator().manual_seed(a.seed)
    train = TokenData(data / "train.bin", 256)
    t0 = time.time()
    loops = sorted({k - 1, k, T})
    batches = [train.batch(16, gen)[0] for _ in range(a.batches)]
    if a.generated:
        batches += generated_batches(engine, train, a.generated, gen)
    states = collect_states(model, tqdm(batches, desc="states"), loops)
    val = collect_states(model, [x for x, _ in TokenData(val_path, 256).fixed_batches(a.val_batches, 16)], loops)
    print(f"cached {states[T].shape[0]} training and {val[T].shape[0]} held-out tokens in {time.time() - t0:.0f} s", flush=True)
    c = a.extrapolate
    before = {"loop": agreement(model, val, k),
              f"extrapolate {c:g}": agreement(model, val, k, lambda h0, h1: draft_state(torch.stack([h0, h1]), c))}
    dmap, curve = fit_draft_map(model, states, k, extrapolate=c, hidden=a.hidden, steps=a.steps, lr=a.lr, seed=a.seed)
    after = agreement(model, val, k, lambda h0, h1: dmap.state(torch.stack([h0, h1])))
    result = {**before, "map": after}
    print(f"held-out agreement of loop-{k} drafts with loop {T}: " + ", ".join(f"{n} {v:.2%}" for n, v in result.items()))
    dmap.info.update(checkpoint=str(ckpt), train_tokens=int(states[T].shape[0]), generated_sequences=a.generated, val_tokens=int(val[T].shape[0]),
                     val_agreement={n: round(v, 4) for n, v in result.items()}, kl_every_50=curve)
    out = Path(a.out) if a.out else ckpt / "draft_map.safetensors"
    dmap.to(dtype=torch.bfloat16).save(out)
    print(f"saved {out}")
    if a.recommend:
        gc_path = ckpt / "generation_config.json"
        gc = json.loads(gc_path.read_text()) if gc_path.is_file() else {}
        spec_opts = gc.setdefault("looplm", {}).setdefault("speculative", {})
        spec_opts.update(draft_loop=k, draft_map=out.name if out.parent == ckpt else str(out))
        gc_path.write_text(json.dumps(gc, indent=2) + "\n")
        print(f"recommended in {gc_path}: {spec_opts}")


if __name__ == "__main__":
    main(sys.argv[1:])
