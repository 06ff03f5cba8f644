"""The out-of-domain held-out set never contains training text."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from looplm.train.ood import build_ood, debian_licence, remove_overlap

TOKENIZER = Path(__file__).parents[2] / "looplm" / "default_model" / "tokenizer.json"
SHARED_LINE = "    raise ValueError(f'could not parse {name!r}: {exc}')"


def _training() -> list[str]:
    return [
        "def parse(name):\n    try:\n        return int(name)\n    except Exception as exc:\n" + SHARED_LINE + "\n",
        "Chapter 1\n\nIt is a truth universally acknowledged, that a single man in possession of a good fortune\n",
    ]


def _candidates() -> dict[str, list[tuple[str, str, str, str]]]:
    train = _training()
    return {
        "prose": [
            ("man/a/a.1", "a", "GPL-3+", "NAME\n       a - does things\n\nDESCRIPTION\n       Reads standard input and writes it back.\n"),
            ("man/b/b.1", "b", "GPL-3+", train[1]),  # a whole training document: dropped
        ],
        "code": [
            ("py/c/c.py", "c", "Expat", "import os\n\n\ndef load(path):\n    with open(path) as f:\n        return f.read()\n" + SHARED_LINE + "\n"),
            ("py/d/d.py", "d", "Expat", SHARED_LINE + "\n"),  # nothing left once the shared line goes
        ],
    }


def test_remove_overlap_drops_training_documents_and_lines():
    kept = remove_overlap(_candidates()["prose"] + _candidates()["code"], _training())
    assert [d[0] for d in kept] == ["man/a/a.1", "py/c/c.py"]
    assert SHARED_LINE.strip() not in kept[1][3] and "def load(path):" in kept[1][3]
    # short lines common to both (blank lines, "try:") are kept: they carry no text
    short = remove_overlap([("k", "p", "l", "x = 1\ntry:\n")], ["try:\n    pass\n"])
    assert short[0][3] == "x = 1\ntry:"


def test_build_writes_no_training_text(tmp_path):
    tok = Tokenizer.from_file(str(TOKENIZER))
    manifest = build_ood(tmp_path, tok, _training(), kinds=_candidates())
    text = tok.decode(np.fromfile(tmp_path / "ood_text.bin", dtype=np.uint16).tolist())
    assert "truth universally acknowledged" not in text and SHARED_LINE.strip() not in text
    assert "Reads standard input" in text and "def load(path):" in text
    for kind in ("prose", "code"):
        assert manifest["kinds"][kind]["docs"] == 1
        assert (tmp_path / f"ood_{kind}.bin").stat().st_size == 2 * manifest["kinds"][kind]["tokens"]
    assert manifest["tokens"] == manifest["kinds"]["prose"]["tokens"] + manifest["kinds"]["code"]["tokens"]
    assert {f["licence"] for f in manifest["files"]} == {"GPL-3+", "Expat"}


def test_build_rejects_a_kind_left_empty(tmp_path):
    tok = Tokenizer.from_file(str(TOKENIZER))
    kinds = {"code": [("py/d/d.py", "d", "Expat", SHARED_LINE)]}
    with pytest.raises(ValueError, match="'code' has no documents left"):
        build_ood(tmp_path, tok, _training(), kinds=kinds)


def test_debian_licence_reads_the_copyright_file(tmp_path):
    files = {
        "dep5": "Files: *\nLicense: GPL-3+\n text\n\nFiles: doc/*\nLicense: GFDL-1.3\n\nLicense: GPL-3+\n text\n",
        "mit": "Copyright (c) 2006 Someone\n\nLicense:\n\nPermission is hereby granted, free of charge, to any person\n",
        "other": "Copyright 2001 Someone. All rights reserved.\n",
    }
    for package, text in files.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "copyright").write_text(text)
    assert debian_licence("dep5", tmp_path) == "GPL-3+, GFDL-1.3"
    assert debian_licence("mit", tmp_path) == "Expat"
    assert debian_licence("other", tmp_path) == f"see {tmp_path / 'other' / 'copyright'}"
    assert debian_licence("absent", tmp_path) == "unknown (no copyright file)"
