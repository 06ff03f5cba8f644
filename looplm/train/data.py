"""Builds the default model's offline, license-clean corpus, its tokenizer, and token arrays.

Sources (all from Debian packages or generated here):
  - Python documentation sources (`python3.11-doc`: /usr/share/doc/python3.11/html/_sources), PSF licence.
  - The Python standard library's own source (/usr/lib/python3.11), PSF licence.
  - Jane Austen's six novels (`r-cran-janeaustenr`, public domain), dumped with Rscript.
  - Synthetic tasks where depth helps: p-hop induction, multi-step modular arithmetic written
    without intermediate steps, and copying.

Outputs under --out: tokenizer.json, train.bin / val.bin (uint16 token ids, documents separated by
id 0 = <|endoftext|>), phop_val.jsonl (held-out p-hop problems), val_text.bin (held-out natural text
only) and meta.json (counts and mixture).

With --ood it builds only the out-of-domain held-out set (looplm.train.ood: ood_text.bin and its
manifest) with the tokenizer of --tokenizer or --out/tokenizer.json.

Usage: python -m looplm.train.data --out data/
       python -m looplm.train.data --ood --out data/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in Ouro
EOT_ID = 0
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_DIR = Path("/usr/lib/python3.11")
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
PHOP_ALPHABET = "abcdefgh"  # 8 symbols: chance accuracy 12.5%


# ---------------------------------------------------------------- natural text sources


def _is_val(key: str, val_fraction: float) -> bool:
    """A stable split by document name, so rebuilding never leaks validation text into training."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return (h % 10_000) < val_fraction * 10_000


def python_docs(root: Path = DOCS_DIR) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: apt-get install python3.11-doc")
    out = []
    for path in sorted(root.rglob("*.txt")):
        out.append((f"docs/{path.relative_to(root)}", path.read_text(encoding="utf-8", errors="replace")))
    return out


def stdlib_source(root: Path = STDLIB_DIR) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found")
    skip = {"test", "dist-packages", "site-packages", "encodings", "lib2to3", "idlelib", "__pycache__"}
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts) or path.stat().st_size > 400_000:
            continue
        out.append((f"stdlib/{rel}", path.read_text(encoding="utf-8", errors="replace")))
    return out


def austen_novels() -> list[tuple[str, str]]:
    """One document per chapter, dumped from the R package's lazy-load data with Rscript."""
    if shutil.which("Rscript") is None:
        raise FileNotFoundError("Rscript not found: apt-get install r-cran-janeaustenr (pulls in r-base-core)")
    with tempfile.TemporaryDirectory() as tmp:
        names = ",".join(f'"{n}"' for n in AUSTEN_NOVELS)
        script = (
            f"library(janeaustenr); for (n in c({names})) "
            f'writeLines(get(n), file.path("{tmp}", paste0(n, ".txt")))'
        )
        subprocess.run(["Rscript", "-e", script], check=True, capture_output=True)
        out = []
        for name in AUSTEN_NOVELS:
            text = (Path(tmp) / f"{name}.txt").read_text(encoding="utf-8", errors="replace")
            chapters, current = [], []
            for line in text.splitlines():
                if line.strip().upper().startswith("CHAPTER ") and current:
                    chapters.append("\n".join(current).strip())
                    current = []
                current.append(line)
            chapters.append("\n".join(current).strip())
            out += [(f"austen/{name}/{i:03d}", c) for i, c in enumerate(chapters) if c]
    return out


# ---------------------------------------------------------------- synthetic tasks


def phop_answer(seq: list[str], hops: int) -> str | None:
    """p-hop induction: from the last position, jump to the token after the previous occurrence of
    the current token, `hops` times; the answer is the token reached. None when a hop has no
    earlier occurrence to follow."""
    pos = len(seq) - 1
    for _ in range(hops):
        prev = next((j for j in range(pos - 1, -1, -1) if seq[j] == seq[pos]), None)
        if prev is None:
            return None
        pos = prev + 1
    return seq[pos]


def phop_problem(rng: random.Random, hops: int, length: int = 24) -> tuple[str, str]:
    """Returns (prompt, answer); the prompt ends right before the answer symbol."""
    while True:
        seq = [rng.choice(PHOP_ALPHABET) for _ in range(length)]
        ans = phop_answer(seq, hops)
        if ans is not None:
            return f"hop {hops}: {' '.join(seq)} =", f" {ans}"


def phop_document(rng: random.Random, n: int = 8, max_hops: int = 4) -> str:
    return "\n".join(p + a for p, a in (phop_problem(rng, rng.randint(1, max_hops)) for _ in range(n)))


def modarith_document(rng: random.Random, n: int = 12) -> str:
    """Left-to-right arithmetic mod m with only the final result written: depth, not chain of thought."""
    lines = []
    for _ in range(n):
        m = rng.choice([7, 10])
        steps = rng.randint(1, 4)
        acc = rng.randrange(m)
        expr = str(acc)
        for _ in range(steps):
            op, b = rng.choice("+-*"), rng.randrange(m)
            acc = (acc + b) % m if op == "+" else (acc - b) % m if op == "-" else (acc * b) % m
            expr += f" {op} {b}"
        lines.append(f"mod {m}: {expr} = {acc}")
    return "\n".join(lines)


def copy_document(rng: random.Random, n: int = 6) -> str:
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    lines = []
    for _ in range(n):
        words = ["".join(rng.choice(chars) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(3, 10))]
        s = " ".join(words)
        lines.append(f"copy: {s} | {s}")
    return "\n".join(lines)


# ---------------------------------------------------------------- tokenizer and arrays


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with digits split one per token and Ouro's special ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    """Concatenates documents, each followed by <|endoftext|> (id 0), as uint16."""
    pieces = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=np.uint16))
        pieces.append(np.zeros(1, dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def build(out: Path, vocab_size: int = 2048, seed: int = 0, val_fraction: float = 0.03,
          synthetic_fraction: float = 0.35, phop_share: float = 0.6, n_phop_val: int = 2000,
          tokenizer: Path | None = None) -> dict:
    """Writes the tokenizer and token arrays under `out`; returns the metadata it also writes."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = {"python_docs": python_docs(), "stdlib": stdlib_source(), "austen": austen_novels()}
    train_docs, val_docs = [], []
    for name, docs in sources.items():
        for key, text in docs:
            (val_docs if _is_val(key, val_fraction) else train_docs).append(text)
    text_chars = sum(len(d) for d in train_docs)
    print(f"natural text: {len(train_docs)} train / {len(val_docs)} val docs, {text_chars / 1e6:.1f}M train chars",
          flush=True)

    # Synthetic documents sized by characters relative to natural text; p-hop gets the largest share.
    target = text_chars * synthetic_fraction / (1 - synthetic_fraction)
    shares = {"phop": phop_share, "modarith": (1 - phop_share) / 2, "copy": (1 - phop_share) / 2}
    makers = {"phop": phop_document, "modarith": modarith_document, "copy": copy_document}
    synth = {}
    for name, share in shares.items():
        docs, chars = [], 0
        while chars < target * share:
            d = makers[name](rng)
            docs.append(d)
            chars += len(d)
        synth[name] = docs
        print(f"synthetic {name}: {len(docs)} docs, {chars / 1e6:.1f}M chars", flush=True)
    synth_val = [makers[name](rng) for name in shares for _ in range(100)]

    # Held-out p-hop problems (scored on the answer symbol only) from a separate seed stream.
    vrng = random.Random(seed + 1_000_003)
    phop_val = []
    for i in range(n_phop_val):
        hops = 1 + i % 4
        prompt, answer = phop_problem(vrng, hops)
        phop_val.append({"hops": hops, "prompt": prompt, "answer": answer})
    with open(out / "phop_val.jsonl", "w") as f:
        for r in phop_val:
            f.write(json.dumps(r) + "\n")
    val_prompts = {r["prompt"] for r in phop_val}
    n_train_phop = sum(line.rsplit(" ", 1)[0] in val_prompts for d in synth["phop"] for line in d.split("\n"))
    print(f"held-out p-hop prompts also in train: {n_train_phop} (random collisions)", flush=True)

    # The tokenizer sees a sample of everything, so task symbols get their own tokens too.
    if tokenizer is None:
        sample = train_docs + [d for docs in synth.values() for d in docs[: max(1, len(docs) // 10)]]
        tok = train_tokenizer(sample, vocab_size)
    else:  # reuse a trained tokenizer (e.g. to build another mixture for fine-tuning the same model)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
    tok.save(str(out / "tokenizer.json"))
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.0f}s)", flush=True)

    all_train = train_docs + [d for docs in synth.values() for d in docs]
    rng.shuffle(all_train)
    train_ids = encode_docs(tok, all_train)
    val_text_ids = encode_docs(tok, val_docs)
    val_ids = np.concatenate([val_text_ids, encode_docs(tok, synth_val)])
    train_ids.tofile(out / "train.bin")
    val_ids.tofile(out / "val.bin")
    val_text_ids.tofile(out / "val_text.bin")
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "val_text_tokens": int(val_text_ids.size),
        "natural_docs": {k: len(v) for k, v in sources.items()},
        "synthetic_docs": {k: len(v) for k, v in synth.items()},
        "synthetic_fraction_chars": synthetic_fraction,
        "phop_share_of_synthetic": phop_share,
        "n_phop_val": n_phop_val,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2), flush=True)
    return meta


def build_ood_set(out: Path, tokenizer: Path) -> dict:
    """The out-of-domain held-out set under `out`, checked against every document of the training sources."""
    from tokenizers import Tokenizer

    from .ood import build_ood

    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} not found: build the corpus first or pass --tokenizer")
    training = [text for source in (python_docs(), stdlib_source(), austen_novels()) for _, text in source]
    manifest = build_ood(out, Tokenizer.from_file(str(tokenizer)), training)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2), flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-fraction", type=float, default=0.35, help="share of training chars")
    p.add_argument("--phop-share", type=float, default=0.6, help="share of synthetic chars that are p-hop")
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--ood", action="store_true", help="build only the out-of-domain held-out set (looplm.train.ood)")
    a = p.parse_args(argv)
    if a.ood:
        build_ood_set(a.out, a.tokenizer or a.out / "tokenizer.json")
        return
    build(a.out, a.vocab_size, a.seed, synthetic_fraction=a.synthetic_fraction, phop_share=a.phop_share,
          tokenizer=a.tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
