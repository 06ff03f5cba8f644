"""An out-of-domain held-out set: text and code the default model never trains on.

Built offline from Debian packages other than the training sources (looplm.train.data):
  - prose: the manual pages of a fixed list of command-line packages (coreutils, grep, sed, tar,
    findutils, gzip, bash, diffutils, make), rendered to plain text with `man -l` at 80 columns;
  - code: the Python sources of pure-Python Debian packages outside the standard library
    (/usr/lib/python3/dist-packages: python3-jwt, -httplib2, -distro, -blinker, -argcomplete, -yaml).

Each document is cut to `max_doc_chars` and each kind to `max_kind_chars` (files in sorted order),
so the set stays a few hundred thousand tokens. It never overlaps the training corpus: a document
equal to a training document is dropped, and so is every line (of `min_line_chars` or more,
stripped) that occurs in a training document (licence headers, shared boilerplate).

Outputs under --out: ood_text.bin (all documents), ood_prose.bin and ood_code.bin (uint16 ids,
documents separated by id 0) and ood_manifest.json (every file with its package, licence and
token count).

Usage: python -m looplm.train.data --ood --out data/ [--tokenizer data/tokenizer.json]
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np

MAN_PACKAGES = ("coreutils", "grep", "sed", "tar", "findutils", "gzip", "bash", "diffutils", "make")
PY_PACKAGES = {  # Debian package -> its top-level module under /usr/lib/python3/dist-packages
    "python3-jwt": "jwt",
    "python3-httplib2": "httplib2",
    "python3-distro": "distro",
    "python3-blinker": "blinker",
    "python3-argcomplete": "argcomplete",
    "python3-yaml": "yaml",
}
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
Doc = tuple[str, str, str, str]  # (key, package, licence, text)


def debian_licence(package: str, root: Path = Path("/usr/share/doc")) -> str:
    """The licence names of /usr/share/doc/<package>/copyright's `License:` fields, joined.

    A copyright file without named licences (not in the machine-readable format) that carries the
    MIT permission notice says "Expat"; any other says where to read it.
    """
    path = root / package / "copyright"
    if not path.is_file():
        return "unknown (no copyright file)"
    text = path.read_text(encoding="utf-8", errors="replace")
    names = []
    for line in text.splitlines():
        if line.startswith("License:") and line[8:].strip() and line[8:].strip() not in names:
            names.append(line[8:].strip())
    if names:
        return ", ".join(names)
    if "Permission is hereby granted, free of charge" in text:
        return "Expat"
    return f"see {path}"


def _package_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if out.returncode != 0:
        raise FileNotFoundError(f"Debian package {package} is not installed: apt-get install {package}")
    return [Path(line) for line in out.stdout.splitlines() if line.strip()]


def man_pages(packages=MAN_PACKAGES) -> list[Doc]:
    """Every section 1-8 manual page of `packages`, rendered as plain 80-column text."""
    docs = []
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    for package in packages:
        licence = debian_licence(package)
        pages = sorted(p for p in _package_files(package) if "/share/man/man" in str(p) and p.is_file())
        for page in pages:
            if page.is_symlink():  # an alias of another page of the same package
                continue
            text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env).stdout
            if text.strip():
                docs.append((f"man/{package}/{page.name}", package, licence, text))
    return docs


def python_packages(packages: dict[str, str] = PY_PACKAGES, root: Path = DIST_PACKAGES) -> list[Doc]:
    """The .py files of pure-Python Debian packages outside the standard library."""
    docs = []
    for package, module in packages.items():
        base = root / module
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"{base} not found: apt-get install {package}")
        licence = debian_licence(package)
        for f in files:
            docs.append((f"py/{package}/{f.relative_to(root)}", package, licence, f.read_text(encoding="utf-8", errors="replace")))
    return docs


def remove_overlap(docs: list[Doc], training_texts: list[str], min_line_chars: int = 32) -> list[Doc]:
    """Drops documents equal to a training document and lines that occur in one.

    Args:
        docs: candidate held-out documents.
        training_texts: every training document's text.
        min_line_chars: lines at least this long (stripped) are removed when a training document
            has the same line; shorter ones (blank lines, `return x`, `else:`) carry no leak.
    Returns:
        The documents with those lines removed; documents left empty are dropped.
    """
    doc_hashes = {hashlib.sha1(t.encode()).digest() for t in training_texts}
    train_lines = {s for t in training_texts for line in t.splitlines() if len(s := line.strip()) >= min_line_chars}
    out = []
    for key, package, licence, text in docs:
        if hashlib.sha1(text.encode()).digest() in doc_hashes:
            continue
        kept = [line for line in text.splitlines() if line.strip() not in train_lines]
        text = "\n".join(kept).strip()
        if text:
            out.append((key, package, licence, text))
    return out


def _cap(docs: list[Doc], max_doc_chars: int, max_kind_chars: int) -> list[Doc]:
    out, total = [], 0
    for key, package, licence, text in docs:
        text = text[:max_doc_chars]
        if total + len(text) > max_kind_chars:
            break
        out.append((key, package, licence, text))
        total += len(text)
    return out


def build_ood(out: Path, tokenizer, training_texts: list[str], kinds: dict[str, list[Doc]] | None = None,
              max_doc_chars: int = 12_000, max_kind_chars: int = 450_000, min_line_chars: int = 32) -> dict:
    """Writes ood_text.bin, ood_<kind>.bin and ood_manifest.json under `out`; returns the manifest.

    Args:
        out: output folder.
        tokenizer: a `tokenizers.Tokenizer` (the training data's).
        training_texts: every document of the training sources (see remove_overlap).
        kinds: {"prose": docs, "code": docs}; default: man_pages() and python_packages().
        max_doc_chars, max_kind_chars: caps per document and per kind, applied after the overlap removal.
    """
    from .data import encode_docs

    if kinds is None:
        kinds = {"prose": man_pages(), "code": python_packages()}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": "Debian packages outside the training corpus; see looplm/train/ood.py", "kinds": {}, "files": []}
    all_ids = []
    for kind, docs in kinds.items():
        docs = _cap(remove_overlap(docs, training_texts, min_line_chars), max_doc_chars, max_kind_chars)
        if not docs:
            raise ValueError(f"out-of-domain kind {kind!r} has no documents left after removing the training overlap")
        ids = encode_docs(tokenizer, [d[3] for d in docs])
        ids.tofile(out / f"ood_{kind}.bin")
        all_ids.append(ids)
        for (key, package, licence, text), enc in zip(docs, tokenizer.encode_batch([d[3] for d in docs], add_special_tokens=False)):
            manifest["files"].append({"kind": kind, "key": key, "package": package, "licence": licence,
                                      "chars": len(text), "tokens": len(enc.ids)})
        manifest["kinds"][kind] = {"docs": len(docs), "tokens": int(ids.size),
                                   "packages": sorted({d[1] for d in docs})}
    ids = np.concatenate(all_ids)
    ids.tofile(out / "ood_text.bin")
    manifest["tokens"] = int(ids.size)
    (out / "ood_manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
