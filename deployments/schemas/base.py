"""The two kinds of body: OpenAI-compatible (unknown fields tolerated) and our own (unknown fields refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# How deeply JSON values from clients may nest (objects and arrays). Deeper values are refused with a
# 400 naming the field: past ~900 levels pickling them across a handle fails (a 500), and no real
# request, schema or task input comes near 64.
MAX_JSON_DEPTH = 64


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _extras_not_too_deep(self) -> Any:
        # Unknown fields pass through to upstreams unchecked, but not at any depth.
        for name, value in (self.model_extra or {}).items():
            if nested_deeper_than(value):
                raise ValueError(f"'{name}' is nested more than {MAX_JSON_DEPTH} levels deep")
        return self


class OwnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


def nested_deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON value ``value`` nests objects/arrays more than ``limit`` levels (iterative: a
    hostile value cannot exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_depth(value: Any) -> Any:
    """A field validator's body: ``value`` unchanged, or a ValueError naming the limit."""
    if nested_deeper_than(value):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value
