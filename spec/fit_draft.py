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

With `--next` the map also gets a second-token head (DraftMap.next_state: tensors "next.*"), a map
of token n's loop k-1 and k states trained the same way towards loop T's distribution at position
n+1, on pairs (n, n+1) of consecutive tokens of one sequence (never across two). It starts from the
first-token map, whose draft for token n+1 is the naive draft for token n+2, and its held-out
agreement with loop T's argmax at n+1 is reported before (that naive draft) and after.
`--base-map PATH` keeps an existing map's first-token maps bit-identical and only fits the head.
With `--next-token` the head also reads the input embedding of token n+1 (in the decoder: of the
token drafted for n+1, which is what a second draft is tested after), as Hydra's sequentially
dependent draft heads do; it starts from the unconditioned start with the embedding's weights at zero.
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


def pair_index(batches) -> torch.Tensor:
    """(P,) int64: the index n, in `collect_states`' (N, H) order, of every token whose successor n+1
    is the next token of the same sequence (the last token of each row pairs with nothing).

    `batches`: the (B, S) id batches `collect_states` was given, in the same order (only their
    shapes are read).
    """
    out, offset = [], 0
    for x in batches:
        B, S = x.shape
        out.append(offset + (torch.arange(B)[:, None] * S + torch.arange(S - 1)).reshape(-1))
        offset += B * S
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


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


@torch.no_grad()
def next_agreement(model: LoopLM, states: dict[int, torch.Tensor], pairs: torch.Tensor, k: int, draft=None,
                   tokens: torch.Tensor | None = None, chunk: int = 8192, ids: torch.Tensor | None = None) -> float:
    """Fraction of pairs (n, n+1) (`pairs`: index n, see `pair_index`) whose draft argmax from token n's
    states (plain loop k, or `draft(prev, cur)`; with `ids`, `draft(prev, cur, e)`, e the input
    embeddings of the tokens n+1) equals loop T's argmax at n+1: how often a greedy second draft
    is accepted when the first was.

    With `tokens` (N,), the ids of the states' tokens in the same order, only the pairs whose token
    n+1 is loop T's argmax at n count: the pairs a greedy decode meets (on text it did not write).
    `ids` (N,) are those ids too, for a draft conditioned on token n+1.
    """
    T = model.num_loops
    if tokens is not None:
        pairs = torch.cat([n[model.head(states[T][n]).argmax(-1) == tokens[n + 1]] for n in pairs.split(chunk)])
    hit = 0
    for i in range(0, pairs.shape[0], chunk):
        n = pairs[i : i + chunk]
        target = model.head(states[T][n + 1]).argmax(-1)
        cur = states[k][n]
        extra = () if ids is None else (embeddings(model, ids[n + 1]),)
        h = cur if draft is None else draft(states[k - 1][n], cur, *extra)
        hit += int((model.head(h).argmax(-1) == target).sum())
    return hit / max(pairs.shape[0], 1)


def embeddings(model: LoopLM, ids: torch.Tensor) -> torch.Tensor:
    """(..., H) float32 input embeddings of `ids` (what a conditioned second-token head reads)."""
    return model.model.embed_tokens.weight.detach()[ids].float()


def generated_batches(engine, train, n: int, gen: torch.Generator, prefix: int = 32, total: int = 256, chunk: int = 32):
    """n greedy continuations (full depth) of `prefix`-token training windows, as (chunk, total) id batches."""
    out = []
    for i in tqdm(range(0, n, chunk), desc="greedy continuations"):
        prompts = train.batch(min(chunk, n - i), gen)[0][:, :prefix].tolist()
        gens = engine.generate(prompts, max_new_tokens=total - prefix, stop=[])
        out.append(torch.tensor([p + g.tokens for p, g in zip(prompts, gens)]))
    return out


def _new_hidden_layer(H: int, width: int, inputs: int = 2) -> dict[str, torch.Tensor]:
    """A GELU layer of `width` on [h_{k-1}; h_k] (`inputs` = 3: and a token embedding): default
    (Kaiming-uniform) input projection, output projection at zero (the map starts as its affine part)."""
    up = torch.nn.Linear(inputs * H, width)
    return {"up.weight": up.weight.detach().clone(), "up.bias": up.bias.detach().clone(),
            "down.weight": torch.zeros(H, width), "down.bias": torch.zeros(H)}


def _distill(model: LoopLM, params: dict[str, torch.Tensor], draw, draft, target, *, steps: int, lr: float, seed: int,
             desc: str, progress: bool) -> list[float]:
    """Adam on `params` (cosine decay to 10% of lr), minimising KL(head(target(i)) || head(draft(i)))
    on minibatches i = draw(generator); returns the KL every 50 steps."""
    for t in params.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head = model.lm_head.weight.detach().float()
    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        i = draw(gen)
        with torch.no_grad():
            teacher = F.log_softmax(target(i) @ head.T, -1)
        student = F.log_softmax(draft(i) @ head.T, -1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(loss.item(), 5))
            bar.set_postfix_str(f"KL={loss.item():.4f}")
    return curve


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
        params.update(_new_hidden_layer(H, hidden))
    prev, cur, last = states[k - 1], states[k], states[T]
    n = cur.shape[0]

    def current() -> DraftMap:
        return DraftMap({k: {**params, "weight": w0 + params["weight"]}})

    curve = _distill(model, params, lambda gen: torch.randint(0, n, (min(batch_tokens, n),), generator=gen),
                     lambda i: current().state(torch.stack([prev[i], cur[i]])), lambda i: last[i],
                     steps=steps, lr=lr, seed=seed, desc=f"draft map k={k}", progress=progress)
    fitted = {name: t.detach() for name, t in current().params[k].items()}
    return DraftMap({k: fitted}, {"start_extrapolate": extrapolate, "hidden": hidden, "steps": steps, "lr": lr}), curve


def fit_next_map(model: LoopLM, states: dict[int, torch.Tensor], pairs: torch.Tensor, k: int, *, hidden: int = 0,
                 start: DraftMap | None = None, steps: int = 1000, lr: float = 1e-3, batch_tokens: int = 4096, seed: int = 0,
                 progress: bool = True, ids: torch.Tensor | None = None) -> tuple[DraftMap, list[float]]:
    """Trains the loop-k second-token head on cached float32 states (loops k-1, k, T) to minimise
    KL(loop T at n+1 || head(next map of token n's loops k-1, k)) on minibatches of `pairs` (index n
    of pairs (n, n+1) within one sequence, from `pair_index`); returns (map, KL every 50 steps).

    The returned map is `start`'s loop-k first-token map (its tensors, unchanged) plus the fitted
    "next.*" tensors (float32). `start` (default: the identity map [0, I], i.e. the plain loop-k
    state) is also where the head starts: its affine part is copied; its hidden layer too when it has
    one of width `hidden`, else a GELU layer of width `hidden` > 0 is added whose output projection
    starts at zero. So training starts from the naive draft "token n+2 = the draft for token n+1"
    (exactly, unless `start` has a hidden layer of another width than `hidden`).

    With `ids` (N,), the token ids of the states in the same order, the head is conditioned on
    token n+1 (DraftMap.next_conditioned): its input gains that token's embedding, whose weights
    start at zero (in the copied affine part and hidden layer; a new hidden layer reads it from the
    start). It starts from `start`'s unconditioned second-token head when it has one, else as above.
    """
    T, H = model.num_loops, model.config.hidden_size
    if not 2 <= k < T:
        raise ValueError(f"a draft map needs 2 <= draft loop < T = {T}, got {k}")
    start = DraftMap.extrapolation(H, [k], 0.0) if start is None else start
    if k not in start.params or start.hidden_size != H:
        raise ValueError(f"the start map has loops {start.loops} at hidden size {start.hidden_size}; "
                         f"the fit needs loop {k} at hidden size {H}")
    pairs = pairs.long()
    n_states = states[T].shape[0]
    if pairs.numel() == 0 or int(pairs.min()) < 0 or int(pairs.max()) >= n_states - 1:
        raise ValueError(f"pairs must index tokens 0..{n_states - 2} that have a successor, got {pairs.numel()} pairs")
    torch.manual_seed(seed)
    first = {n: t for n, t in start.params[k].items() if not n.startswith("next.")}  # a head `start` has is replaced
    cond = ids is not None
    from_head = cond and start.has_next(k) and not start.next_conditioned(k)
    base = {n[5:]: t for n, t in start.params[k].items() if n.startswith("next.")} if from_head else first
    if ids is not None and ids.shape != (n_states,):
        raise ValueError(f"ids must hold the {n_states} states' token ids, got shape {tuple(ids.shape)}")

    def widen(w: torch.Tensor) -> torch.Tensor:  # zero weights for the token embedding (conditioned head)
        return torch.cat([w, torch.zeros(w.shape[0], H)], 1) if cond else w

    params = {"weight": widen(base["weight"].float().clone()), "bias": base["bias"].float().clone()}
    if hidden and "up.weight" in base and base["up.weight"].shape[0] == hidden:
        params.update({n: base[n].float().clone() for n in DraftMap.NAMES[2:]})
        params["up.weight"] = widen(params["up.weight"])
    elif hidden:
        params.update(_new_hidden_layer(H, hidden, 3 if cond else 2))
    prev, cur, last = states[k - 1], states[k], states[T]

    def current() -> DraftMap:
        return DraftMap({k: {**first, **{"next." + n: t for n, t in params.items()}}})

    def draft(n: torch.Tensor) -> torch.Tensor:
        return current().next_state(torch.stack([prev[n], cur[n]]), k, embeddings(model, ids[n + 1]) if cond else None)

    P = pairs.shape[0]
    curve = _distill(model, params, lambda gen: pairs[torch.randint(0, P, (min(batch_tokens, P),), generator=gen)],
                     draft, lambda n: last[n + 1], steps=steps, lr=lr, seed=seed, desc=f"next-token head k={k}", progress=progress)
    fitted = {name: t.detach() for name, t in current().params[k].items()}
    return DraftMap({k: fitted}, {"hidden": hidden, "steps": steps, "lr": lr, "conditioned": cond,
                                  "start": "second-token head" if from_head else "first-token map"}), curve


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
    p.add_argument("--next", action="store_true", help="also fit a second-token head (drafts token n+2 from token n's states)")
    p.add_argument("--next-hidden", type=int, default=0, help="width of an optional GELU hidden layer of the second-token head")
    p.add_argument("--next-token", action="store_true",
                   help="condition the second-token head on token n+1's embedding (the first draft's token when decoding)")
    p.add_argument("--base-map", default=None,
                   help="keep this saved map's first-token maps bit-identical and only fit the second-token head (with --next)")
    p.add_argument("--out", default=None, help="where to save (default: <checkpoint>/draft_map.safetensors)")
    p.add_argument("--recommend", action="store_true", help="name the map in the checkpoint's generation_config.json")
    a = p.parse_args(argv)
    if a.base_map and not a.next:
        raise SystemExit("--base-map only adds a second-token head to a map: pass --next")
    if a.next_token and not a.next:
        raise SystemExit("--next-token conditions the second-token head: pass --next")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    engine = looplm.load(a.checkpoint)
    model = engine.model.float().eval()
    ckpt = Path(engine.path)
    k, T = a.draft_loop, model.num_loops
    base = DraftMap.load(a.base_map) if a.base_map else None
    if base is not None and (k not in base.loops or base.hidden_size != model.config.hidden_size):
        raise SystemExit(f"{a.base_map} has maps for loops {base.loops} at hidden size {base.hidden_size}; "
                         f"--draft-loop {k} at hidden size {model.config.hidden_size} needs one")
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
    val_batches = [x for x, _ in TokenData(val_path, 256).fixed_batches(a.val_batches, 16)]
    val = collect_states(model, val_batches, loops)
    print(f"cached {states[T].shape[0]} training and {val[T].shape[0]} held-out tokens in {time.time() - t0:.0f} s", flush=True)
    if base is None:
        c = a.extrapolate
        before = {"loop": agreement(model, val, k),
                  f"extrapolate {c:g}": agreement(model, val, k, lambda h0, h1: draft_state(torch.stack([h0, h1]), c))}
        t0 = time.time()
        dmap, curve = fit_draft_map(model, states, k, extrapolate=c, hidden=a.hidden, steps=a.steps, lr=a.lr, seed=a.seed)
        after = agreement(model, val, k, lambda h0, h1: dmap.state(torch.stack([h0, h1])))
        result = {**before, "map": after}
        print(f"held-out agreement of loop-{k} drafts with loop {T}: " + ", ".join(f"{n} {v:.2%}" for n, v in result.items())
              + f" ({time.time() - t0:.0f} s fit)")
        dmap.info.update(checkpoint=str(ckpt), train_tokens=int(states[T].shape[0]), generated_sequences=a.generated, val_tokens=int(val[T].shape[0]),
                         val_agreement={n: round(v, 4) for n, v in result.items()}, kl_every_50=curve)
        dmap = dmap.to(dtype=torch.bfloat16)  # as saved: the second-token head starts from these weights
    else:
        dmap = base  # its tensors are saved as they are
    if a.next:
        val_tokens = torch.cat([x.reshape(-1) for x in val_batches])
        ids = torch.cat([x.reshape(-1) for x in batches]) if a.next_token else None
        dmap = add_next_head(model, dmap, states, pair_index(batches), val, pair_index(val_batches), val_tokens, k, a, ids)
    out = Path(a.out) if a.out else ckpt / "draft_map.safetensors"
    dmap.save(out)
    print(f"saved {out}")
    if a.recommend:
        gc_path = ckpt / "generation_config.json"
        gc = json.loads(gc_path.read_text()) if gc_path.is_file() else {}
        spec_opts = gc.setdefault("looplm", {}).setdefault("speculative", {})
        spec_opts.update(draft_loop=k, draft_map=out.name if out.parent == ckpt else str(out))
        gc_path.write_text(json.dumps(gc, indent=2) + "\n")
        print(f"recommended in {gc_path}: {spec_opts}")


def add_next_head(model: LoopLM, dmap: DraftMap, states, pairs, val, val_pairs, val_tokens, k: int,
                  a: argparse.Namespace, ids: torch.Tensor | None = None) -> DraftMap:
    """`dmap` with a second-token head for loop k fitted from its first-token map (whose tensors are
    kept as they are; the head is stored in their dtype), reported before and after on held-out pairs.
    With `ids` (the training states' token ids) the head is conditioned on token n+1 and starts from
    `dmap`'s unconditioned head when it has one (see `fit_next_map`)."""
    T = model.num_loops
    start = dmap.to(dtype=torch.float32)
    drafts = {"loop": None, "first map": lambda h0, h1, *e: start.state(torch.stack([h0, h1]), k)}
    if ids is not None and start.has_next(k) and not start.next_conditioned(k):
        drafts["unconditioned head"] = lambda h0, h1, *e: start.next_state(torch.stack([h0, h1]), k)
    t0 = time.time()
    fitted, curve = fit_next_map(model, states, pairs, k, hidden=a.next_hidden, start=start, steps=a.steps, lr=a.lr, seed=a.seed,
                                 ids=ids)
    seconds = time.time() - t0
    params = {j: dict(p) for j, p in dmap.params.items()}
    dtype = params[k]["weight"].dtype
    params[k] = {n: t for n, t in params[k].items() if not n.startswith("next.")}
    params[k].update({n: t.to(dtype) for n, t in fitted.params[k].items() if n.startswith("next.")})
    out = DraftMap(params, dmap.info)
    stored = out.to(dtype=torch.float32)  # measured as saved (rounded to the map's dtype)
    drafts["next head"] = lambda h0, h1, *e: stored.next_state(torch.stack([h0, h1]), k, *e)
    cond_ids = val_tokens if ids is not None else None
    result = {n: next_agreement(model, val, val_pairs, k, d, ids=cond_ids) for n, d in drafts.items()}
    greedy = {n: next_agreement(model, val, val_pairs, k, d, tokens=val_tokens, ids=cond_ids) for n, d in drafts.items()}
    print(f"held-out agreement of loop-{k} drafts of token n+2 with loop {T} at n+1: "
          + ", ".join(f"{n} {v:.2%}" for n, v in result.items()) + f" ({seconds:.0f} s fit); on the pairs whose token n+1 "
          f"is loop {T}'s argmax at n: " + ", ".join(f"{n} {v:.2%}" for n, v in greedy.items()))
    out.info["next"] = {"start": fitted.info["start"], "conditioned": ids is not None, "hidden": a.next_hidden, "steps": a.steps, "lr": a.lr, "seed": a.seed,
                        "train_pairs": int(pairs.shape[0]), "generated_sequences": a.generated, "val_pairs": int(val_pairs.shape[0]),
                        "val_agreement": {n: round(v, 4) for n, v in result.items()},
                        "val_agreement_greedy_pairs": {n: round(v, 4) for n, v in greedy.items()}, "kl_every_50": curve}
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
