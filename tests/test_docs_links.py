"""Every relative link and image in README.md and docs/*.md resolves: the file exists, and a `#anchor` names a
heading of the target document (GitHub's heading ids). Links with a scheme (https:, mailto:) are not fetched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target "title") and ![alt](target); the target stops at whitespace or the closing parenthesis.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without code: a link-like string in a code block or `code span` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE, HTML_SRC) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a document's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    """Each link of `doc` that does not resolve, with the reason."""
    problems = []
    for target in links(doc.read_text()):
        if SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            problems.append(f"{target}: {dest.name} has no heading with id #{anchor}")
    return problems


@pytest.mark.parametrize("doc", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in DOCS])
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


def test_the_checker_finds_broken_links(tmp_path):
    """A missing file, a missing image and an unknown anchor are each reported; good links and code are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Shared store: PostgreSQL (bench.py)\n\n## Again\n## Again\n")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n[ok](other.md) [ok](other.md#shared-store-postgresql-benchpy) [ok](other.md#again-1)\n"
        "![ok](pic.png) [ok](#title) [web](https://example.com/missing)\n"
        "[gone](missing.md) ![gone](images/none.png) [bad](other.md#nowhere) [bad](#no-such-heading)\n\n"
        "`[code](not-a-link.md)`\n\n```\n[code](not-a-link-either.md)\n```\n"
    )
    assert [p.split(":")[0] for p in broken_links(doc)] == [
        "missing.md",
        "images/none.png",
        "other.md#nowhere",
        "#no-such-heading",
    ]


PACKAGES = ("kvstore", "agents", "cli", "server", "migrations")
MAP_ROW = re.compile(r"^\| `([^`]+\.py)` \|", re.M)


def test_module_map_lists_every_module():
    """docs/ARCHITECTURE.md's module map has one row per module of the tree, and no row for a missing one."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Module map") :]
    rows = MAP_ROW.findall(table)
    tree = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(rows) == len(set(rows)), "a module is listed twice"
    assert sorted(rows) == tree
