"""looplm.train.card: a re-released card keeps the previous card's sections that its template does not write."""

import random
import string

from looplm.train.card import keep_sections, sections


def _words(n=6):
    return " ".join("".join(random.choices(string.ascii_lowercase, k=random.randint(2, 8))) for _ in range(n))


def test_sections_split_at_headings_outside_code_fences():
    body = _words()
    md = f"# Card\n\n{body}\n\n## Reproduce\n\n```bash\n# a comment, not a heading\nrun it\n```\n\n### Sub ###\n{body}\n"
    got = sections(md)
    assert [h for h, _ in got] == ["# Card", "## Reproduce", "### Sub"]
    assert "".join(t for _, t in got) == md
    assert "# a comment, not a heading" in got[1][1]
    assert sections("plain text\n") == [("", "plain text\n")]


def test_kept_sections_stay_where_they_were_and_template_sections_are_replaced():
    a, b, c, d, e = (_words() for _ in range(5))
    old = (f"# Card\n\nold intro\n\n## Recipe\n\nold recipe {a}\n\n### Draft map\n\n{b}\n\n"
           f"## Evaluation\n\nold table\n\n#### Shared KV\n\n{c}\n\n## Notes\n\n{d}\n")
    new = f"# Card\n\nnew intro\n\n## Recipe\n\nnew recipe {e}\n\n## Evaluation\n\nnew table\n"
    merged, kept = keep_sections(new, old)
    assert kept == ["### Draft map", "#### Shared KV", "## Notes"]
    assert [h for h, _ in sections(merged)] == ["# Card", "## Recipe", "### Draft map", "## Evaluation", "#### Shared KV", "## Notes"]
    assert "old recipe" not in merged and "old table" not in merged and "old intro" not in merged
    assert all(x in merged for x in (b, c, d, e)) and "new table\n\n#### Shared KV" in merged
    # nothing to keep: the template's card as it is; a section whose anchor is gone goes to the end
    assert keep_sections(new, new) == (new, [])
    merged, kept = keep_sections("# Card\n\nx\n", f"# Other\n\n## Gone\n\ny\n\n### Kept\n\n{a}\n")
    assert kept == ["## Gone", "### Kept"] and merged == f"# Card\n\nx\n\n## Gone\n\ny\n\n### Kept\n\n{a}\n"
    merged, kept = keep_sections("## A\n\nx\n", f"## B\n\ny\n\n## A\n\nz\n")  # B came first: no anchor, at the end
    assert kept == ["## B"] and merged == "## A\n\nx\n\n## B\n\ny\n"
