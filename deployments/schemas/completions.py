"""POST /v1/completions (legacy text completion): the request body, OpenAI's shape.

Unknown fields pass through to upstream models; a local model refuses what it cannot honour (400
naming the field: `suffix`, `logprobs`, `best_of`, `n` above 1, `logit_bias`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from deployments.schemas.base import OpenAIBody
from deployments.schemas.chat import INT64_MAX, MAX_TOKENS_LIMIT, StreamOptions, check_stops, only_when_streaming
from deployments.schemas.inputs import Item, check_items, items

# OpenAI's default when a request sets no max_tokens.
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(OpenAIBody):
    """POST /v1/completions. Numbers and flags are strict (`"max_tokens": true` is a 400 naming it)."""

    model: str = Field(description="A model with the `completions` capability (GET /v1/models).")
    prompt: Any = Field(
        description="A string, a list of strings (one choice each), a list of token ids or a list of "
        "token-id lists."
    )
    max_tokens: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_TOKENS_LIMIT,
        description=f"Most tokens to generate per prompt (default {DEFAULT_MAX_TOKENS}, as OpenAI's); at most "
        "the model's `max_output_tokens`.",
    )
    stream: bool = Field(default=False, strict=True, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    temperature: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=0, le=2, description="Sampling temperature."
    )
    top_p: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, gt=0, le=1, description="Nucleus sampling."
    )
    stop: str | list[str] | None = Field(default=None, description="Stop sequence(s), at most 4.")
    echo: bool = Field(default=False, strict=True, description="Return the prompt before the completion.")
    suffix: str | None = Field(
        default=None, description="Text after the completion (insertion). Upstream models only: a local "
        "model answers 400 naming `suffix`.",
    )
    n: int = Field(default=1, strict=True, ge=1, le=128, description="Choices per prompt (local models: 1).")
    best_of: int | None = Field(default=None, strict=True, ge=1, le=20, description="Upstream models only.")
    logprobs: int | None = Field(default=None, strict=True, ge=0, le=5, description="Upstream models only.")
    seed: int | None = Field(
        default=None, strict=True, ge=-INT64_MAX - 1, le=INT64_MAX, description="Sampling seed (64-bit)."
    )
    presence_penalty: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=-2, le=2, description="Presence penalty."
    )
    frequency_penalty: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=-2, le=2, description="Frequency penalty."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=300, description="Token id → bias (upstream models only)."
    )
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")

    _prompt = field_validator("prompt")(classmethod(lambda cls, value: check_items(value)))

    _few_stops = field_validator("stop")(classmethod(lambda cls, value: check_stops(value)))

    _only_when_streaming = field_validator("stream_options")(
        classmethod(lambda cls, value, info: only_when_streaming(value, info)))

    def prompts(self) -> list[Item]:
        """The prompts one by one (a string or a token-id list each): one choice each."""
        return items(self.prompt)

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens"
