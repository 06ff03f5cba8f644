"""Turns a Stage I run into the bundled default model: Stage II gate, evaluation, model card.

    python -m looplm.train release --run data/run --data data --dest looplm/default_model

Steps: (1) Stage II on the run's final checkpoint (LM frozen) -> <run>/gate; (2) evaluation of
per-loop quality, p-hop and Q-exit (untrained vs Stage-II gate) -> <run>/eval; (3) copies the
Stage-II checkpoint (bf16 safetensors, config.json, tokenizer.json, generation_config.json),
exit_curve.png and MODEL_CARD.md into --dest. A card already at --dest keeps the sections this
template does not write (looplm.train.card: the draft map's recipe, calibration, other tables,
notes), each where it was.

`python -m looplm.train release --export-only` just converts <run>/ckpt.pt (a training checkpoint,
e.g. of a run still in progress) into a published-format directory at --dest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from .card import keep_sections
from .evaluate import evaluate
from .trainer import TrainConfig, build_model

SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def export_training_checkpoint(run: Path, dest: Path, data: Path) -> None:
    """<run>/ckpt.pt -> published Ouro layout at dest (bf16)."""
    from looplm.checkpoint import save_pretrained

    ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    tc = TrainConfig(**{k: v for k, v in ckpt["train_config"].items()})
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    model = build_model(tc, vocab)
    model.load_state_dict(ckpt["model"])
    save_pretrained(model, dest, tokenizer_json_path=data / "tokenizer.json", dtype=torch.bfloat16)
    print(f"exported step {ckpt['step']} of {run} to {dest}")


def acceptance(result: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's acceptance list."""
    per = result["per_loop"]
    gap = per[0]["loss"] - per[-1]["loss"]
    agree = per[0]["agreement_with_T"]
    rows = [
        ("loop T >= 0.15 nats/token better than loop 1 on held-out text", f"{gap:.3f} nats", gap >= 0.15),
        ("loop-1 argmax agrees with loop-T argmax on 55-95% of tokens", f"{100 * agree:.1f}%", 0.55 <= agree <= 0.95),
    ]
    if result.get("phop"):
        ph = result["phop"]["per_loop"]
        d = 100 * (ph[-1] - ph[0])
        rows.append(("held-out p-hop: loop-T accuracy >= loop-1 accuracy + 10 points",
                     f"{100 * ph[0]:.1f}% -> {100 * ph[-1]:.1f}% ({d:+.1f} points)", d >= 10))
    cmp = {c["gate"]: c for c in result.get("comparisons", [])}
    if "stage2" in cmp:
        c = cmp["stage2"]
        rows.append(("Stage-II Q-exit loss no worse than static exit interpolated at equal average loops",
                     f"mean {c['loss_vs_static']:+.4f} nats over q with {c['range'][0]:.2f}-{c['range'][1]:.2f} loops",
                     c["loss_vs_static"] <= 0))
        if c["loss_vs_other"] is not None:
            rows.append(("Stage-II Q-exit loss better than the untrained gate at equal average loops",
                         f"mean {c['loss_vs_other']:+.4f} nats", c["loss_vs_other"] < 0))
    return rows


def model_card(run: Path, data: Path, result: dict, eval_md: str, stage2: dict, dest: Path) -> str:
    tc = json.loads((run / "train_config.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    cfg = json.loads((dest / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    steps = log[-1]["step"] if log else 0
    minutes = log[-1]["elapsed_s"] / 60 if log else 0
    tokens = steps * tc["batch_size"] * tc["seq_len"]
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(dest / "model.safetensors")).values())
    flags = " \\\n    ".join(_train_flags(tc))
    acc = acceptance(result)
    lines = [
        "# looplm default model",
        "",
        "A small looped language model of the Ouro architecture (`OuroForCausalLM`, `model_type: ouro`), "
        "trained from scratch on a CPU by this project's own scripts so that the engine runs with no download. "
        "It is a toy: it writes Python-, docs- and Austen-flavoured text, solves the synthetic tasks it was "
        "trained on to some degree, and — the point — its early loops really differ from its last loop.",
        "",
        "## Architecture",
        "",
        f"- {n_params / 1e6:.2f}M parameters, bf16 safetensors; vocabulary {cfg['vocab_size']} (byte-level BPE, digits split).",
        f"- hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} shared layers run T = {cfg['total_ut_steps']} times, "
        f"{cfg['num_attention_heads']} heads of dim {cfg['head_dim']} with {cfg['num_key_value_heads']} KV heads (GQA), "
        f"SwiGLU {cfg['intermediate_size']}, RoPE theta {cfg['rope_theta']:g}, "
        f"{'tied' if cfg['tie_word_embeddings'] else 'untied'} embeddings; trained at context {tc['seq_len']}, max_position_embeddings "
        f"{cfg['max_position_embeddings']}.",
        "- Special tokens: `<|endoftext|>` = 0 (bos/eos/pad, as in Ouro), `<|im_start|>` = 1, `<|im_end|>` = 2.",
        "",
        "## Data (offline, license-clean; built by `python -m looplm.train.data --out data/`)",
        "",
        f"- Python 3.11 documentation sources (Debian `python3.11-doc`, PSF licence): {meta['natural_docs']['python_docs']} files.",
        f"- Python standard library source (`/usr/lib/python3.11`, PSF licence; tests, encodings, lib2to3 and "
        f"idlelib left out): {meta['natural_docs']['stdlib']} files.",
        f"- Jane Austen's six novels (Debian `r-cran-janeaustenr`, public domain), one document per chapter: "
        f"{meta['natural_docs']['austen']} chapters.",
        f"- Synthetic tasks where depth helps, {int(100 * meta['synthetic_fraction_chars'])}% of training characters "
        f"({int(100 * meta['phop_share_of_synthetic'])}% of those p-hop): p-hop induction over 8 symbols, 24 symbols per "
        "problem, 1-4 hops (`hop 3: f e f d ... =` then the answer); left-to-right arithmetic mod 7 or 10 with 1-4 "
        "operations and only the result written (`mod 7: 3 + 5 * 2 = 2`); copying (`copy: x y | x y`).",
        f"- {meta['train_tokens'] / 1e6:.1f}M training tokens. Held out: 3% of the natural documents by a hash of "
        f"their name ({meta['val_text_tokens'] / 1e3:.0f}k tokens, `val_text.bin`) and {meta['n_phop_val']} p-hop "
        "problems from a separate seed (none of them occurs in the training data).",
        "",
        "## Recipe",
        "",
        f"Stage I: plain per-loop cross-entropy with loop weights {':'.join(f'{w:g}' for w in tc['loop_weights'])} "
        f"(equal weights left the loops indistinguishable at this budget), AdamW (betas {tc['betas'][0]}, "
        f"{tc['betas'][1]}, weight decay {tc['weight_decay']} on matrices), peak lr {tc['lr']:g} with "
        f"{tc['warmup_steps']} warm-up steps and cosine decay to {tc['min_lr_ratio']:g}x, gradient clipping "
        f"{tc['grad_clip']}, bf16 autocast: {tc['bf16']}, batch {tc['batch_size']} x {tc['seq_len']} tokens, seed "
        f"{tc['seed']}. The run took {steps} steps ({tokens / 1e6:.1f}M tokens) in {minutes:.0f} minutes on 2 shared "
        "CPU cores. The cosine schedule followed max(step / steps, elapsed / time budget), so with "
        "`--time-budget-min` the exact step count depends on the machine; to reproduce this run step for step, "
        f"pass `--steps {steps}` and drop `--time-budget-min`.",
        "",
        f"Stage II: LM frozen, only `model.early_exit_gate` trained on the improvement targets "
        f"(k = {stage2['k']:g}, gamma = {stage2['gamma']:g}) over {stage2['tokens']} cached training tokens; Stage II "
        f"loss {stage2['loss_before']:.4f} -> {stage2['loss_after']:.4f}. Mean \"continue\" target for loops 2..T: "
        f"{stage2['mean_continue_target_per_step']}. (During Stage I the gate received no gradient, so the "
        "\"untrained gate\" below is its random initialisation.)",
        "",
        "### Reproduce",
        "",
        "```bash",
        "apt-get install python3.11-doc r-cran-janeaustenr   # data sources (Rscript comes with the latter)",
        "python -m looplm.train.data --out data/",
        "python -m looplm.train.data --ood --out data/   # out-of-domain held-out set (packages: looplm/train/ood.py)",
        f"python -m looplm.train \\\n    {flags}",
        f"python -m looplm.train release --run {run} --data {data} --dest {dest}",
        f"python -m looplm.train.kv_eval --checkpoint {dest} --text {data}/val_text.bin --text {data}/ood_text.bin",
        "```",
        "",
        f"`release` runs Stage II (`python -m looplm.train gate --checkpoint {run}/final --data {data} --out {run}/gate`), "
        f"the evaluation (`python -m looplm.train eval --checkpoint {run}/gate --gate untrained={run}/final "
        f"--gate stage2={run}/gate --data {data} --out {run}/eval`), and writes this card.",
        "",
        "## Evaluation",
        "",
        "| acceptance target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in acc],
        "",
        eval_md.replace("### ", "#### "),
        "![loss and accuracy versus average loops](exit_curve.png)",
        "",
        "Figure: held-out loss and next-token accuracy versus average loops per token, static exit at each depth "
        "against Q-exit at q in {0.1 ... 0.99} with the untrained and the Stage-II gate (cf. the paper's Figure 5).",
        "",
    ]
    return "\n".join(lines)


def _train_flags(tc: dict) -> list[str]:
    keys = ["data", "out", "init_from", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "total_ut_steps", "max_position_embeddings", "rope_theta", "objective",
            "loop_weights", "phop_rows", "phop_weight", "phop_loop_weights", "distill_weights", "distill_scale",
            "shared_kv_every", "shared_kv_modes", "shared_kv_kl", "ood_val", "seq_len", "batch_size", "steps", "time_budget_min", "lr", "min_lr_ratio", "warmup_steps", "seed",
            "eval_every", "save_every"]
    defaults = dataclasses.asdict(TrainConfig())
    optional = {"init_from", "phop_rows", "phop_weight", "phop_loop_weights", "distill_weights", "distill_scale", "min_lr_ratio",
                "shared_kv_every", "shared_kv_modes", "shared_kv_kl", "ood_val"}
    flags = []
    for k in keys:
        v = tc.get(k)
        if v is None or v == [] or (k in optional and v == defaults.get(k)):
            continue
        flag = "--" + k.replace("_", "-")
        flags.append(f"{flag} {' '.join(f'{x:g}' for x in v)}" if isinstance(v, list) else f"{flag} {v}")
    for k in ("bf16", "compile", "tie_word_embeddings"):
        if tc.get(k):
            flags.append("--" + k.replace("_", "-"))
    return flags


def release(run: Path, data: Path, dest: Path, gate_steps: int = 1000, feature_batches: int = 64,
            eval_batches: int = 32) -> dict:
    from . import gate as gate_mod

    final, gate_dir, eval_dir = run / "final", run / "gate", run / "eval"
    gate_mod.main(["--checkpoint", str(final), "--data", str(data), "--out", str(gate_dir),
                   "--steps", str(gate_steps), "--feature-batches", str(feature_batches)])
    result = evaluate(gate_dir, data, eval_dir, {"untrained": final, "stage2": gate_dir}, batches=eval_batches)
    dest.mkdir(parents=True, exist_ok=True)
    gen_path = dest / "generation_config.json"
    recommended = json.loads(gen_path.read_text()).get("looplm") if gen_path.is_file() else None  # before the copy
    for name in SHIPPED:
        shutil.copyfile(gate_dir / name, dest / name)
    if recommended:  # decoder options measured for the shipped model (Engine.mode_defaults) survive a re-release
        gen = json.loads(gen_path.read_text())  # the new checkpoint's
        gen.setdefault("looplm", recommended)
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(eval_dir / "exit_curve.png", dest / "exit_curve.png")
    stage2 = json.loads((gate_dir / "stage2_stats.json").read_text())
    card = model_card(run, data, result, (eval_dir / "eval.md").read_text(), stage2, dest)
    card_path = dest / "MODEL_CARD.md"
    if card_path.is_file():  # sections the template does not write (hand-written, or by later steps) stay
        card, kept = keep_sections(card, card_path.read_text())
        if kept:
            print(f"[release] kept from the previous {card_path}: {'; '.join(kept)} (they describe the previous model until redone)")
    card_path.write_text(card)
    for target, measured, ok in acceptance(result):
        print(f"[{'ok' if ok else 'NOT MET'}] {target}: {measured}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.train release", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("data/run"))
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--dest", type=Path, default=Path("looplm/default_model"))
    p.add_argument("--gate-steps", type=int, default=1000, help="Stage II steps (400 left the gate level with static exit on a trial; 1000 on 64 batches beat it)")
    p.add_argument("--feature-batches", type=int, default=64, help="training batches whose per-loop CE Stage II caches")
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--export-only", action="store_true", help="only convert <run>/ckpt.pt to --dest")
    a = p.parse_args(argv)
    if a.export_only:
        export_training_checkpoint(a.run, a.dest, a.data)
    else:
        release(a.run, a.data, a.dest, a.gate_steps, a.feature_batches, a.eval_batches)


if __name__ == "__main__":
    main(sys.argv[1:])
