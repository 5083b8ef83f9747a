"""The README and the guide in docs/ stay usable: every relative link reaches an existing file (and heading, by
GitHub's anchor rules), the README stays a ten-minute read, and it names every model family the registry holds, so
a new family cannot ship undocumented."""

import re
import unicodedata
from pathlib import Path

import pytest

from finetune.base.families import FAMILIES
from tests.helpers import REPO

README = REPO / "README.md"
README_MAX_LINES = 350
DOCS = sorted([README, *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks and HTML comments (where neither links nor headings are Markdown)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans and links reduced to their text), lower case,
    every character but letters, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    # A link's text may wrap onto the next line, so the prose is searched as one text.
    prose = "\n".join(CODE_SPAN.sub("", line) for line in prose_lines(path.read_text()))
    return [target for target in LINK.findall(prose) if not target.startswith(EXTERNAL)]


def test_the_slug_follows_githubs_rules():
    assert slug("What `./launch.sh` does") == "what-launchsh-does"
    assert slug("Qwen3.5") == "qwen35"
    assert slug("The demo, set-up and tests") == "the-demo-set-up-and-tests"
    assert slug("Serve with [vLLM](https://vllm.ai)") == "serve-with-vllm"


def test_the_checker_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Two words\n\n[a](#two-words) [b](#nowhere) [c](gone.md) `[d](x.md)` [e\nf](g.md)\n")
    assert broken_links(page) == ["#nowhere", "gone.md", "g.md"]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        file = (path.parent / file_part).resolve() if file_part else path
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(path):
    assert broken_links(path) == [], f"{path.relative_to(REPO)}: broken links"


def test_the_readme_is_a_ten_minute_read():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


def test_the_readme_names_every_family_of_the_registry():
    text = README.read_text()
    # A title inside a longer name does not count: "Qwen3-VL" in "Qwen3-VL-MoE", "Qwen3.5" in "Qwen3.5-MoE".
    missing = [
        f.title for f in FAMILIES.values() if not re.search(rf"(?<![\w.-]){re.escape(f.title)}(?![\w]|-\w|\.\d)", text)
    ]
    assert missing == [], f"README.md does not name the families {missing}"


def test_the_families_page_names_every_registry_key():
    text = (REPO / "docs" / "families.md").read_text()
    assert [key for key in FAMILIES if f"`{key}`" not in text] == []
