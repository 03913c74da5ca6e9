"""The documentation stands alone in a user's clone: every relative link in a Markdown file
resolves inside the repository, every `docs/...` path a docstring names exists, and nothing
points to files outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"\bdocs/[\w./-]+\.md\b")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


MARKDOWN = _tracked("*.md")
SOURCES = _tracked("*.py", "*.yaml", "*.toml")


def test_the_documentation_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in MARKDOWN}
    assert {"README.md", "docs/architecture.md", "docs/method.md"} <= names
    for package in ("core", "encoders", "decoders", "train", "eval", "toy"):
        assert f"packages/metamorph-{package}/README.md" in names


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor of this page
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: '{target}' leaves the repository"
        assert resolved.exists(), f"{path.name}: '{target}' does not exist"


def test_docstrings_and_docs_point_only_inside_the_repository():
    # the maintainers' session notes may cite their own files; this test names what it looks for
    skip = {ROOT / "NOTES.md", Path(__file__).resolve()}
    for path in sorted((set(SOURCES) | set(MARKDOWN)) - skip):
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert "../shared" not in text and "DESIGN.md" not in text, where
        for docs in DOCS_PATH.findall(text):
            assert (ROOT / docs).is_file(), f"{where} names {docs}, which does not exist"
