"""Writes the local lm-eval tasks (YAML + JSONL, nothing downloaded) that reproduce the model card's figures.

  looplm_phop         the held-out p-hop problems as multiple choice over the 8 symbols (acc).
  looplm_phop_argmax  the same problems as a loglikelihood task whose acc is lm-eval's is_greedy: the
                      answer token is the argmax over the whole vocabulary, the card's scoring rule.
  looplm_text         held-out text as rolling loglikelihood (only with --data: the card's windows of
                      data/val_text.bin, each one document, so lm-eval scores all of a window's tokens
                      after the <|endoftext|> prefix token).
  looplm_text_card    the same windows as loglikelihood of all but the first token given the first:
                      the card's per-loop loss exactly (its windows have no prefix token).

The held-out p-hop problems are regenerated from looplm.train.data's seed stream, so no data/
directory is needed for them. All three carry the tag "looplm_card".

Usage: python -m looplm.harness.tasks --out TASK_DIR [--data data] [--phop 2000]
then:  lm_eval --model looplm --include_path TASK_DIR --tasks looplm_card ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from looplm.train.data import PHOP_ALPHABET, phop_problem

TAG = "looplm_card"
CHOICES = [f" {c}" for c in PHOP_ALPHABET]
PHOP_PROMPT = "<|endoftext|>{{prompt}}"  # a problem starts a document, as in training and the card


def heldout_phop(n: int = 2000, seed: int = 0) -> list[dict]:
    """The first n held-out p-hop problems of `python -m looplm.train.data --seed SEED` (its phop_val.jsonl).

    Mirrors that build's held-out stream: its own generator seeded seed + 1_000_003, hops 1 + i % 4.
    """
    rng = random.Random(seed + 1_000_003)
    out = []
    for i in range(n):
        hops = 1 + i % 4
        prompt, answer = phop_problem(rng, hops)
        out.append({"hops": hops, "prompt": prompt, "answer": answer})
    return out


def card_windows(data: str | Path, seq_len: int = 256, batches: int = 32, batch_size: int = 16) -> list[list[int]]:
    """The held-out text windows the card's per-loop loss was measured on (looplm.train.evaluate's
    defaults): evenly spaced windows of seq_len + 1 tokens of data/val_text.bin."""
    import torch

    from looplm.train.trainer import TokenData

    rows = TokenData(Path(data) / "val_text.bin", seq_len).fixed_batches(batches, batch_size)
    return [w.tolist() for x, y in rows for w in torch.cat([x, y[:, -1:]], 1)]


def _yaml(name: str, jsonl: Path, body: str) -> str:
    # target_delimiter "": the answers carry their own leading space (" a" is one token)
    return (f"task: {name}\ntag: {TAG}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(jsonl.resolve()))}\ntest_split: test\ntarget_delimiter: \"\"\n"
            f"{body}metadata:\n  version: 1.0\n")


def write_phop_tasks(out: str | Path, problems: list[dict]) -> list[Path]:
    """Writes phop.jsonl and the two p-hop task YAMLs under `out`; returns the YAML paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "phop.jsonl"
    with open(jsonl, "w") as f:
        for p in problems:
            if p["answer"] not in CHOICES:
                raise ValueError(f"p-hop answer {p['answer']!r} is not one of {CHOICES}")
            f.write(json.dumps({**p, "label": CHOICES.index(p["answer"])}) + "\n")
    mc = out / "looplm_phop.yaml"
    mc.write_text(_yaml("looplm_phop", jsonl, (
        f"output_type: multiple_choice\ndoc_to_text: {json.dumps(PHOP_PROMPT)}\n"
        f"doc_to_choice: {json.dumps(CHOICES)}\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    argmax = out / "looplm_phop_argmax.yaml"
    argmax.write_text(_yaml("looplm_phop_argmax", jsonl, (
        f"output_type: loglikelihood\ndoc_to_text: {json.dumps(PHOP_PROMPT)}\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")))
    return [mc, argmax]


def write_text_task(out: str | Path, windows: list[list[int]], tokenizer, name: str = "looplm_text") -> list[Path]:
    """Writes <name>.jsonl (one line per token window) and two tasks over it: <name> (rolling
    loglikelihood of the decoded window) and <name>_card (loglikelihood of the window's tokens 2..n
    given its first token, as the card scored them). Returns the YAML paths.

    Each line records n_tokens and whether encoding the text (and the first token's text) gives the
    window back (roundtrip), so a reader can tell that lm-eval scores the same tokens.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{name}.jsonl"
    with open(jsonl, "w") as f:
        for w in windows:
            text, first = tokenizer.decode(w), tokenizer.decode(w[:1])
            ok = tokenizer.encode(text) == list(w) and text.startswith(first) and tokenizer.encode(first) == list(w[:1])
            f.write(json.dumps({"text": text, "context": first, "continuation": text[len(first):] if text.startswith(first) else text,
                                "n_tokens": len(w), "roundtrip": ok}) + "\n")
    rolling = out / f"{name}.yaml"
    rolling.write_text(_yaml(name, jsonl, (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    card = out / f"{name}_card.yaml"
    card.write_text(_yaml(f"{name}_card", jsonl, (
        "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{continuation}}\"\n"
        "# the loss per token is config.looplm.per_task in the results (lm-eval's perplexity here would be\n"
        "# exp(-mean window loglikelihood), which overflows); acc = the whole window is the greedy decode\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    return [rolling, card]


def write_tasks(out: str | Path, data: str | Path | None = None, n_phop: int = 2000, tokenizer=None) -> list[Path]:
    """The p-hop tasks always; the text task when `data` holds val_text.bin (tokenizer: the model's)."""
    paths = write_phop_tasks(out, heldout_phop(n_phop))
    if data is not None:
        if tokenizer is None:
            import looplm

            tokenizer = looplm.load().tokenizer
        paths += write_text_task(out, card_windows(data), tokenizer)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looplm.harness.tasks", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="task directory (pass it to lm_eval --include_path)")
    p.add_argument("--data", type=Path, default=None, help="data/ with val_text.bin: also write the text task")
    p.add_argument("--phop", type=int, default=2000, help="held-out p-hop problems (the card used 2000)")
    p.add_argument("--pretrained", default=None, help="checkpoint whose tokenizer decodes the text windows")
    a = p.parse_args(argv)
    tokenizer = None
    if a.data is not None:
        if not (a.data / "val_text.bin").is_file():
            raise ValueError(f"{a.data / 'val_text.bin'} not found: build it with python -m looplm.train.data --out {a.data}")
        import looplm

        tokenizer = looplm.load(a.pretrained).tokenizer
    for path in write_tasks(a.out, a.data, a.phop, tokenizer):
        print(path)


if __name__ == "__main__":
    main()
