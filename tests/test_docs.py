"""The documentation holds together: the README stays short and keeps the CI's test command, and every
relative link in README.md, docs/*.md and leaderboards/README.md points at a file (and heading) that exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "leaderboards" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages the README index announces that are written alongside this one; a link to them is accepted while
# they are absent. Remove a name here once its page is in the repository.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    """Targets of the Markdown links in ``page``, outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_slug_follows_github():
    assert slug("`l2p`: Learning to Prompt, offline") == "l2p-learning-to-prompt-offline"
    assert slug("Hiratani's own settings") == "hiratanis-own-settings"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file()
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        name = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            broken.append(f"{target} (no file {name})")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) < 9000


def test_readme_keeps_the_ci_test_command():
    """.ci/run takes the line after the first ```bash fence within two lines of the test-command marker."""
    readme = (ROOT / "README.md").read_text()
    assert "<!-- test-command" in readme
    lines = readme.splitlines()
    at = next(i for i, line in enumerate(lines) if "<!-- test-command" in line)
    window = lines[at + 1: at + 3]
    fence = next(i for i, line in enumerate(window) if line.startswith("```bash"))
    command = lines[at + 1 + fence + 1]
    assert "pip install -e '.[test]'" in command and "-m pytest" in command
    # the same extraction as .ci/run, through the shell
    shell = subprocess.run(["bash", "-c", "grep -A2 '<!-- test-command' README.md | sed -n '/^```bash/{n;p;q}'"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == command
