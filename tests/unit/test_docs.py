"""The docs are checked against the code, not hand-copied."""

from __future__ import annotations

from pathlib import Path

from deployments import errors
from deployments.config import docs as config_docs

README = Path(__file__).resolve().parents[2] / "README.md"


def test_config_reference_in_readme_is_generated_from_the_models() -> None:
    text = README.read_text()
    assert config_docs.replace_in(text) == text, "run: python -m deployments.config.docs --write"


def test_readme_exception_tree_matches_errors_module() -> None:
    doc = errors.__doc__ or ""
    tree = next(block for block in doc.split("\n\n") if block.lstrip().startswith("PromptfleetError"))
    readme = README.read_text()
    for line in tree.splitlines():
        assert line.strip() in readme, line
