"""Teacher-forced shared-KV and per-loop evaluation of any checkpoint on a token file.

For windows of held-out text it prints:
  * shared KV (`kv="last"` / `"mean"`, the engine's shared-KV decoding, through
    looplm.train.shared_kv.teacher_forced_shared): a prefill of --prefill tokens with per-loop
    K/V, then one token per call; the last loop's cross-entropy on the positions decoded one per
    call, against the per-loop cache's on the same positions, and the fraction of those positions
    where the next-token argmax agrees with the per-loop cache's;
  * per loop, on every position of the windows: cross-entropy, loop-1 vs loop-T argmax agreement,
    and how often loop T's argmax is in loop 1's top 4 (what the speculative decoder's loop-1
    drafts can reach).

The per-loop cache's logits are the no-cache forward's (`model.loop_outputs`): teacher-forced,
decoding with the per-loop cache computes the same attention.

Usage: python -m looplm.train.kv_eval --checkpoint looplm/default_model --text data/ood_text.bin
       python -m looplm.train.kv_eval --checkpoint data/<run>/ckpt.pt --text data/ood_text.bin   # a run in progress
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .objectives import per_loop_ce
from .shared_kv import SHARED_MODES, teacher_forced_shared
from .trainer import TokenData, load_model


@torch.no_grad()
def kv_eval(model, batches, prefill: int = 32, modes=SHARED_MODES, top_k: int = 4) -> dict:
    """Sums over (x, y) batches of (B, S) windows; returns the metrics as plain floats.

    Returns:
        {"tokens", "kv_tokens", "per_loop_ce" [T], "agree_loop1_T", "loopT_in_loop1_top{k}",
         "per_loop_cache_ce", and per mode: "<mode>_ce", "<mode>_minus_per_loop", "<mode>_agree"}.
    """
    model.eval()
    T = model.num_loops
    sums: dict[str, torch.Tensor | float] = {"ce": torch.zeros(T), "agree1": 0.0, "topk": 0.0, "n": 0, "kv_n": 0,
                                             "kv_ref": 0.0}
    for mode in modes:
        sums[mode], sums[mode + "_agree"] = 0.0, 0.0
    for x, y in batches:
        if x.shape[1] <= prefill:
            raise ValueError(f"windows of {x.shape[1]} tokens leave nothing after a prefill of {prefill}")
        logits = model.loop_outputs(x).logits.float()  # (T, B, S, V)
        ce = per_loop_ce(logits, y)  # (T, B, S)
        sums["ce"] += ce.sum(dim=(1, 2))
        am = logits.argmax(-1)
        sums["agree1"] += float((am[0] == am[-1]).sum())
        top = logits[0].topk(top_k, dim=-1).indices  # (B, S, k)
        sums["topk"] += float((top == am[-1][..., None]).any(-1).sum())
        sums["n"] += y.numel()
        ref_ce, ref_am = ce[-1, :, prefill:], am[-1, :, prefill:]
        sums["kv_ref"] += float(ref_ce.sum())
        sums["kv_n"] += ref_ce.numel()
        for mode in modes:
            shared = teacher_forced_shared(model, x, mode, prefill)[-1:, :, prefill:].float()  # (1, B, S - prefill, V)
            sums[mode] += float(per_loop_ce(shared, y[:, prefill:]).sum())
            sums[mode + "_agree"] += float((shared[0].argmax(-1) == ref_am).sum())
    n, kv_n = sums["n"], sums["kv_n"]
    out = {"tokens": n, "kv_tokens": kv_n, "prefill": prefill,
           "per_loop_ce": [round(v, 4) for v in (sums["ce"] / n).tolist()],
           "agree_loop1_T": round(sums["agree1"] / n, 4), f"loopT_in_loop1_top{top_k}": round(sums["topk"] / n, 4),
           "per_loop_cache_ce": round(sums["kv_ref"] / kv_n, 4)}
    for mode in modes:
        out[f"{mode}_ce"] = round(sums[mode] / kv_n, 4)
        out[f"{mode}_minus_per_loop"] = round((sums[mode] - sums["kv_ref"]) / kv_n, 4)
        out[f"{mode}_agree"] = round(sums[mode + "_agree"] / kv_n, 4)
    return out


def load_checkpoint(path: Path):
    """The float32 model of a checkpoint directory, or of a training run's resumable `ckpt.pt`
    (trainer.load_run_checkpoint)."""
    if not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a training ckpt.pt")
    return load_model(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.train.kv_eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint directory the engine loads, or a training run's ckpt.pt")
    p.add_argument("--text", type=Path, required=True, action="append",
                   help="uint16 token file (e.g. data/val_text.bin, data/ood_text.bin); repeat for several")
    p.add_argument("--windows", type=int, default=64, help="evenly spaced, non-overlapping windows per file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.windows < 1 or a.batch_size < 1:
        raise ValueError(f"--windows {a.windows} and --batch-size {a.batch_size} must be >= 1")
    model = load_checkpoint(a.checkpoint)
    results = {}
    for path in a.text:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (build it with python -m looplm.train.data)")
        rows = TokenData(path, a.seq_len).fixed_batches(a.windows, 1)  # evenly spaced windows, one per row
        batches = [(torch.cat([x for x, _ in rows[i : i + a.batch_size]]), torch.cat([y for _, y in rows[i : i + a.batch_size]]))
                   for i in range(0, len(rows), a.batch_size)]
        res = kv_eval(model, batches, a.prefill)
        results[str(path)] = res
        T = len(res["per_loop_ce"])
        print(f"{path}: {res['tokens']} tokens in {len(rows)} windows of {a.seq_len}; shared KV on {res['kv_tokens']} "
              f"positions after a per-loop prefill of {a.prefill}")
        print(f"  per-loop cache CE {res['per_loop_cache_ce']:.4f}")
        for mode in SHARED_MODES:
            print(f"  kv={mode!r:7} CE {res[f'{mode}_ce']:.4f} ({res[f'{mode}_minus_per_loop']:+.4f} nats), "
                  f"argmax agreement {100 * res[f'{mode}_agree']:.1f}%")
        print("  per-loop CE " + " ".join(f"L{t + 1}={v:.4f}" for t, v in enumerate(res["per_loop_ce"]))
              + f"  (loop 1 -> {T} gain {res['per_loop_ce'][0] - res['per_loop_ce'][-1]:+.4f})")
        print(f"  loop-1 argmax = loop-{T} argmax: {100 * res['agree_loop1_T']:.1f}%; "
              f"loop {T} in loop-1 top 4: {100 * res['loopT_in_loop1_top4']:.1f}%", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": str(a.checkpoint), "results": results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
