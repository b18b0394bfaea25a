"""The README is a front page and its topic pages in docs/ are reachable: every relative link in README.md and
docs/*.md points at a file that exists (and, with a #fragment, at a heading of that file)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _broken(document: Path) -> list[str]:
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, fragment = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{document.name}: {target} (no such file)")
        elif fragment and file.suffix == ".md":
            anchors = {_anchor(line) for line in file.read_text().splitlines() if line.startswith("#")}
            if fragment not in anchors:
                broken.append(f"{document.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    assert (ROOT / "docs").is_dir()
    broken = [b for d in _documents() for b in _broken(d)]
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page_that_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    assert "pip install -e" in readme and "python -m pytest" in readme  # install, demo and test commands


def test_the_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading\n")
    page.write_text("[ok](other.md#a-heading) [missing](nope.md) [bad anchor](other.md#b)\n")
    assert _broken(page) == ["page.md: nope.md (no such file)", "page.md: other.md#b (no such heading)"]
