"""Bounds on the llama.cpp grammar of a client's schema (``core.grammar``), with the real converter."""

from __future__ import annotations

import pytest

from deployments.core.grammar import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_DEPTH, grammar_depth, schema_problem

pytest.importorskip("llama_cpp")


def test_depth_counts_groups_not_parentheses_in_literals_or_classes() -> None:
    assert grammar_depth('root ::= "(" (a (b)?)? ")"\na ::= [()] "\\")("') == 2
    assert grammar_depth("root ::= a") == 0


def test_ordinary_schemas_pass() -> None:
    assert schema_problem({"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]},
                                                            "summary": {"type": "string", "maxLength": 1000}},
                           "required": ["label"]}) is None


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "maxLength": MAX_GRAMMAR_DEPTH + 500}, "levels deep"),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": MAX_GRAMMAR_DEPTH + 500}, "levels deep"),
        ({"type": "string", "minLength": 100_000}, "bytes"),
        ({"type": "string", "pattern": "(unclosed"}, "cannot turn this schema into a grammar"),
    ],
)
def test_schemas_whose_grammar_crashes_or_bloats_llama_cpp_are_named(schema: dict[str, object], words: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and words in problem
    if words == "bytes":
        assert f"{MAX_GRAMMAR_BYTES:,}" in problem
