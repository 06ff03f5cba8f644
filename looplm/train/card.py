"""Model cards as sections, so a re-release keeps what its template does not write.

`release` writes the card's generated parts (architecture, data, recipe, reproduce commands,
evaluation tables) from the run. Other sections of the card it replaces were written by hand or by
later steps (the draft map's recipe, calibration, tables of other evaluations, notes); those are
kept, each after the section it followed before, or at the end when that one is gone.
"""

from __future__ import annotations

import re

_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#* *$")


def sections(md: str) -> list[tuple[str, str]]:
    """Splits markdown into (heading, text) in order: heading is the heading line's level marks and
    title ("## Recipe"), "" for the text before the first heading; text includes the heading line.
    Lines inside fenced code blocks (``` or ~~~) are never headings."""
    out: list[tuple[str, list[str]]] = [("", [])]
    fence = None
    for line in md.splitlines(keepends=True):
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None and (m := _HEADING.match(line.rstrip("\n"))):
            out.append((f"{m.group(1)} {m.group(2)}", [line]))
            continue
        out[-1][1].append(line)
    return [(h, "".join(lines)) for h, lines in out if h or lines]


def keep_sections(new: str, old: str) -> tuple[str, list[str]]:
    """`new` with every section of `old` below the title whose heading `new` lacks, each placed after the section
    that preceded it in `old` (the nearest earlier one still present), else at the end.
    Returns (the merged card, the headings kept from `old`)."""
    merged = sections(new)
    have = {h for h, _ in merged}
    kept = []
    anchor = ""  # the heading of the last section of `old` that is in the merged card
    for h, text in sections(old):
        if h in have:
            anchor = h
            continue
        if not h or h.startswith("# "):  # the title and the text before it are the template's
            anchor = next((m for m, _ in merged if m.startswith("# ")), "") if h else ""
            continue
        at = next((i for i, (m, _) in enumerate(merged) if m == anchor), None) if anchor else None
        i = len(merged) if at is None else at + 1
        text = text.rstrip("\n") + ("\n" if i == len(merged) else "\n\n")  # a blank line before the next section
        if i > 0 and not merged[i - 1][1].endswith("\n\n"):
            merged[i - 1] = (merged[i - 1][0], merged[i - 1][1].rstrip("\n") + "\n\n")
        merged.insert(i, (h, text))
        kept.append(h)
        have.add(h)
        anchor = h
    return "".join(text for _, text in merged), kept
