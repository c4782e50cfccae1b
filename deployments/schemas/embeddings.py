"""POST /v1/embeddings: the request body (OpenAI's shape; unknown fields pass to upstreams)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from deployments.schemas.base import OpenAIBody
from deployments.schemas.inputs import Item, check_items, item_tokens, items

MAX_DIMENSIONS = 65536


class EmbeddingRequest(OpenAIBody):
    """POST /v1/embeddings. A local model embeds every input of the request in llama.cpp batches."""

    model: str = Field(description="A model with the `embeddings` capability (GET /v1/models).")
    input: Any = Field(
        description="A string, a list of strings, a list of token ids or a list of token-id lists; at most "
        "2048 inputs, none empty. Each must fit the model's context."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="`float`: lists of numbers; `base64`: each vector as little-endian float32 bytes, base64.",
    )
    dimensions: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_DIMENSIONS,
        description="Length of the vectors, for models that can shorten them (upstream models that support "
        "it); a local model answers 400 naming `dimensions` unless it is the model's own length.",
    )
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")

    _input = field_validator("input")(classmethod(lambda cls, value: check_items(value)))

    def inputs(self) -> list[Item]:
        """The inputs one by one (a string or a token-id list each)."""
        return items(self.input)

    def estimate(self) -> int:
        """Tokens booked on a key's budget before the call (settled with the real count)."""
        return sum(item_tokens(item) for item in self.inputs())
