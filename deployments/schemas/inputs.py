"""The input shapes /v1/embeddings (`input`) and /v1/completions (`prompt`) share.

Either a string, a list of strings, a list of token ids, or a list of token-id lists — as OpenAI
takes them. Checked by hand (not a pydantic union) so a bad value is one 400 naming the field
itself, not a member of the union.
"""

from __future__ import annotations

from typing import Any

# OpenAI's own bounds: at most 2048 inputs per request, token ids are non-negative int32.
MAX_INPUTS = 2048
MAX_TOKEN_ID = 2**31 - 1

Item = str | list[int]


def _tokens(value: list[Any]) -> list[int]:
    if not value:
        raise ValueError("a token array must not be empty")
    for token in value:
        # bool is an int in Python; a JSON true is not a token id.
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token <= MAX_TOKEN_ID:
            raise ValueError(f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return value


def check_items(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """``value`` unchanged if it has one of the four shapes, else a ValueError saying which is wanted."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists "
                         "(not empty)")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return _tokens(value)
    if all(isinstance(v, str) for v in value):
        if not all(value):
            raise ValueError("strings must not be empty")
        return value
    if all(isinstance(v, list) for v in value):
        return [_tokens(v) for v in value]
    raise ValueError("a list must hold only strings, only token ids or only token-id lists")


def items(value: str | list[str] | list[int] | list[list[int]]) -> list[Item]:
    """The inputs one by one: each a string or a token-id list."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]  # one token array
    return list(value)  # type: ignore[arg-type]


def item_tokens(item: Item, chars_per_token: int = 4) -> int:
    """Estimated tokens of one input (exact for a token array)."""
    if isinstance(item, str):
        return -(-len(item) // chars_per_token)
    return len(item)
