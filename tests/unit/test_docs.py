"""The docs are checked against the code, not hand-copied."""

from __future__ import annotations

import re
from pathlib import Path

from deployments import errors
from deployments.config import docs as config_docs

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_config_reference_page_is_generated_from_the_models() -> None:
    text = config_docs.PAGE.read_text()
    assert config_docs.replace_in(text) == text, "run: python -m deployments.config.docs --write"


def test_architecture_page_exception_tree_matches_errors_module() -> None:
    doc = errors.__doc__ or ""
    tree = next(block for block in doc.split("\n\n") if block.lstrip().startswith("PromptfleetError"))
    page = (DOCS / "architecture.md").read_text()
    for line in tree.splitlines():
        assert line.strip() in page, line


README = DOCS.parent / "README.md"


def quick_start(text: str) -> str:
    return text.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_readme_links_point_at_files_that_exist() -> None:
    """README.md is outside the MkDocs site, so `mkdocs build --strict` does not check its links."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = {t.split("#", 1)[0] for t in targets if not t.startswith(("http://", "https://"))}
    assert local and {t for t in local if not (README.parent / t).exists()} == set()


def test_the_quick_start_is_the_same_on_the_front_page_and_in_the_manual() -> None:
    front = quick_start(README.read_text()).replace("docs/operations/", "operations/")
    assert front.strip() and front == quick_start((DOCS / "index.md").read_text())
