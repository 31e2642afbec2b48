"""The docs hold together: every relative link and `#anchor` in README.md, backends.md and
docs/*.md resolves, the two front pages stay within their size budgets, and no page calls a
recipe "the study's script" (the study published a one-page description, not scripts).

Plain text processing: no backend, no network, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "backends.md", *(ROOT / "docs").glob("*.md")])
BUDGETS = {"README.md": 12_000, "backends.md": 20_000}  # bytes, as `wc -c` counts them

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); the text may hold inline code or an image.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
STUDYS_SCRIPT = re.compile(r"study['\u2019]s\s+(?:(?:two|keras|pytorch|own)\s+)*scripts?\b", re.IGNORECASE)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than '-' and
    '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does (-1, -2)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the file's prose, inline code left out."""
    out = []
    text = path.read_text(encoding="utf-8")
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = INLINE_CODE.sub("", line)
        out.extend((number, m.group(1)) for m in LINK.finditer(line))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link whose file does not exist or whose anchor names no heading there."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_the_front_pages_keep_within_their_size_budgets():
    sizes = {name: len((ROOT / name).read_bytes()) for name in BUDGETS}
    assert {name: n for name, n in sizes.items() if n > BUDGETS[name]} == {}, sizes


def test_no_doc_calls_a_recipe_the_studys_script():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in DOCS
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if STUDYS_SCRIPT.search(line)]
    assert found == []


def test_the_checker_finds_what_it_should(tmp_path):
    """A planted broken file link, a planted broken anchor and a good anchor under GitHub's rules."""
    (tmp_path / "a.md").write_text(
        "# The study's gap, one factor at a time (`reproduce`)\n## Speed: A/B\n## Speed: A/B\n"
        "```\n# not a heading\n[fenced](nowhere.md)\n```\n"
        "[ok](#the-studys-gap-one-factor-at-a-time-reproduce) [dup](#speed-ab-1) `[code](nowhere.md)`\n"
        "[no file](missing.md) [no anchor](a.md#not-there) [web](https://example.org/x#y)\n",
        encoding="utf-8")
    problems = broken_links(tmp_path / "a.md", root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == ["(missing.md): no file missing.md",
                                                       "(a.md#not-there): no heading #not-there in a.md"]
    assert "not-a-heading" not in anchors(tmp_path / "a.md")
    assert STUDYS_SCRIPT.search("the study's Keras script") and STUDYS_SCRIPT.search("The study's two scripts")
    assert not STUDYS_SCRIPT.search("the study's description, not its code")
