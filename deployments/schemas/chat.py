"""The OpenAI chat completion request body and the model list (`/v1/chat/completions`, `/v1/models`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from deployments.schemas.base import OpenAIBody, check_depth

# Absolute bounds on client integers, whatever the model: nothing unbounded reaches the limiter's
# arithmetic or a C library (a 400-digit `max_tokens` is a 400 naming the field). A model's own
# output limit (`max_output_tokens` in its config) is checked on top, by the model call path.
MAX_TOKENS_LIMIT = 1_048_576
MAX_CHOICES = 8  # `n`: a local model generates them one after another
INT64_MAX = 2**63 - 1



def check_stops(value: str | list[str] | None) -> str | list[str] | None:
    """A ``stop`` field validator's body (chat and completions): at most 4 sequences, as OpenAI's."""
    if isinstance(value, list) and len(value) > 4:
        raise ValueError("at most 4 stop sequences")
    return value


def only_when_streaming(value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    """A ``stream_options`` field validator's body: the field needs ``stream: true`` (declared before it)."""
    if value is not None and not info.data.get("stream"):
        raise ValueError("only allowed when stream is true")
    return value

class ChatMessage(OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Author of the message."
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of content parts (`{type: text, text}`)."
    )
    name: str | None = Field(default=None, description="Optional participant name.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="An assistant message's calls: `{id, type: function, function: {name, arguments}}`."
    )
    tool_call_id: str | None = Field(default=None, description="A `tool` message: the id of the call it answers.")

    _content_depth = field_validator("content", "tool_calls")(classmethod(lambda cls, value: check_depth(value)))


class StreamOptions(OpenAIBody):
    include_usage: bool = Field(
        default=False, strict=True, description="Send a last chunk with `usage` and empty `choices`."
    )


class FunctionDef(OpenAIBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Function name (letters, digits, _ and -).")
    description: str | None = Field(default=None, description="What the function does, for the model.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the arguments (an object); a local model's grammar holds the "
        "arguments to it."
    )
    strict: bool | None = Field(default=None, description="Upstream: OpenAI's strict schema adherence.")

    _schema_depth = field_validator("parameters")(classmethod(lambda cls, value: check_depth(value)))


class Tool(OpenAIBody):
    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionDef = Field(description="The function the model may call.")


class NamedFunction(OpenAIBody):
    name: str = Field(description="The function to call.")


class NamedToolChoice(OpenAIBody):
    type: Literal["function"] = Field(description="`function`.")
    function: NamedFunction = Field(description="The function the model must call.")


class ResponseFormat(OpenAIBody):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`json_object`: any JSON object; `json_schema`: JSON matching `json_schema.schema`."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="`{name, schema, strict}` when `type` is `json_schema`."
    )

    _schema_depth = field_validator("json_schema")(classmethod(lambda cls, value: check_depth(value)))

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
        return self


class ChatCompletionRequest(OpenAIBody):
    """POST /v1/chat/completions. Fields not listed here pass through to OpenAI-compatible upstreams.

    Numbers and flags are strict, as OpenAI's are: `"max_tokens": true` or `"stream": "yes"` is a 400
    naming the field, not a 1 or a stream; NaN and infinities are refused too."""

    model: str = Field(description="A model name from GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    stream: bool = Field(default=False, strict=True, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    max_tokens: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_TOKENS_LIMIT,
        description="Most tokens to generate; at most the model's `max_output_tokens`.",
    )
    max_completion_tokens: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_TOKENS_LIMIT,
        description="Newer name of `max_tokens`; wins when both are set.",
    )
    temperature: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=0, le=2, description="Sampling temperature."
    )
    top_p: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, gt=0, le=1, description="Nucleus sampling."
    )
    n: int = Field(
        default=1, strict=True, ge=1, le=MAX_CHOICES, description=f"Number of choices (at most {MAX_CHOICES})."
    )
    stop: str | list[str] | None = Field(default=None, description="Stop sequence(s), at most 4.")
    seed: int | None = Field(
        default=None, strict=True, ge=-INT64_MAX - 1, le=INT64_MAX, description="Sampling seed (64-bit)."
    )
    logprobs: bool | None = Field(default=None, strict=True, description="Return log probabilities (upstream models).")
    top_logprobs: int | None = Field(
        default=None, strict=True, ge=0, le=20, description="Most likely tokens returned per position, with `logprobs`."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=300, description="Token id → bias in [-100, 100], at most 300 entries."
    )
    presence_penalty: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=-2, le=2, description="Presence penalty."
    )
    frequency_penalty: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=-2, le=2, description="Frequency penalty."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (grammar-constrained locally)."
    )
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")
    tools: list[Tool] | None = Field(
        default=None, max_length=128, description="Functions the model may call (grammar-constrained locally)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="`none`, `auto` (default with tools), `required`, or `{type: function, function: "
        "{name}}`."
    )
    parallel_tool_calls: bool | None = Field(
        default=None, strict=True, description="Upstream: several calls per turn. A local model makes one."
    )

    # Field validators (not one model validator) so a 400 names the offending field.
    @field_validator("tool_choice")
    @classmethod
    def _choice_has_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"function {value.function.name!r} is not in tools")
        if value == "required" and not tools:
            raise ValueError("'required' needs tools")
        return value

    _few_stops = field_validator("stop")(classmethod(lambda cls, value: check_stops(value)))

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("biases must be between -100 and 100")
        return value

    _only_when_streaming = field_validator("stream_options")(
        classmethod(lambda cls, value, info: only_when_streaming(value, info)))

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The field that sets the output length (for a 400 naming it)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ModelCard(BaseModel):
    id: str = Field(description="Model name to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the application started.")
    owned_by: str = Field(description="`promptfleet` and the provider kind, e.g. `promptfleet:llamacpp`.")
    capabilities: list[str] = Field(
        default_factory=list,
        description="What the model is called for: `chat`, `completions`, `responses`, `embeddings` "
        "(a promptfleet extension of OpenAI's model object; the openai client keeps it as an extra field).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
