"""Bounds on the llama.cpp grammar a client's JSON Schema becomes (pure, cached).

llama-cpp-python turns ``response_format``'s schema into a GBNF grammar, and llama.cpp parses that
grammar recursively, in C++, on the generation thread: a grammar nested a couple of thousand groups
deep (``"maxLength": 3000`` is one group per optional character; so are ``maxItems`` and deeply
nested schemas) overflows the thread's stack and kills the worker process — every request it was
serving, and the model for a while. So a schema is converted here first, and refused with a 400
naming it when its grammar is nested deeper than ``MAX_GRAMMAR_DEPTH`` or larger than
``MAX_GRAMMAR_BYTES``. The generation thread also gets a larger stack
(``GENERATION_STACK_BYTES``), so the depth allowed stays far from the crash.

Measured with SmolLM2 on an 8 MiB thread stack: ``maxLength`` 1,000 works, 2,000 crashes.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from typing import Any

MAX_GRAMMAR_DEPTH = 2_000
MAX_GRAMMAR_BYTES = 256 * 1024
GENERATION_STACK_BYTES = 64 * 1024 * 1024

# String literals and character classes: the parentheses inside them are characters, not groups.
_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')
_STEP = {"(": 1, ")": -1}


def grammar_depth(gbnf: str) -> int:
    """The deepest nesting of groups in a GBNF grammar (rules are one per line)."""
    bare = _LITERALS.sub("", gbnf)
    return max(itertools.accumulate(map(_STEP.get, bare, itertools.repeat(0))), default=0)


@functools.lru_cache(maxsize=256)
def _problem(schema_json: str) -> str | None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_json)
    except Exception as exc:  # its errors are ValueError, AssertionError, KeyError, RecursionError, …
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        return f"llama.cpp cannot turn this schema into a grammar: {reason}"
    if len(gbnf) > MAX_GRAMMAR_BYTES:
        return (f"its llama.cpp grammar would be {len(gbnf):,} bytes (at most {MAX_GRAMMAR_BYTES:,}); "
                "lower maxLength/minLength/maxItems/minItems")
    depth = grammar_depth(gbnf)
    if depth > MAX_GRAMMAR_DEPTH:
        return (f"its llama.cpp grammar would nest {depth:,} levels deep (at most {MAX_GRAMMAR_DEPTH:,}); "
                "lower maxLength/maxItems or the schema's nesting")
    return None


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a local model cannot take ``schema`` as its output grammar, or None if it can."""
    return _problem(json.dumps(schema, sort_keys=True))
