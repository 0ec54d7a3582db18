"""The docs hold together: every relative link in README.md and docs/ names a file that exists
and, after a ``#``, a heading in it (GitHub's anchors)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(path: Path) -> list[str]:
    """The lines of ``path`` outside code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose(path):
        m = re.match(r"^#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def test_the_reference_is_in_docs() -> None:
    assert len(PAGES) > 10
    assert len((ROOT / "README.md").read_text().splitlines()) < 320  # the newcomer's path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for line in prose(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto: ...: not ours to check offline
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{target}: no such heading")
    assert broken == []


def test_code_comments_cite_pages_that_exist() -> None:
    cited = set()
    for source in (ROOT / "fetcher").glob("*.py"):
        cited |= set(re.findall(r"docs/([\w-]+\.md)", source.read_text()))
    for name in cited:
        assert (ROOT / "docs" / name).exists(), name
    assert "SPEC.md table" not in "".join(p.read_text() for p in (ROOT / "fetcher").glob("*.py"))
