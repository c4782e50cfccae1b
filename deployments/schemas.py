"""Wire formats: HTTP bodies and the payloads the Gateway hands to workers.

OpenAI-compatible request bodies tolerate unknown fields (clients send new ones
all the time) and reject what promptfleet cannot honour with a 400 naming the
field, instead of silently ignoring it. Our own bodies use ``extra="forbid"``.

This module imports nothing heavy (no ray, no llama_cpp): the Gateway, the
workers, jobs and tests all share it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Author of the message."
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of content parts (`{type: text, text}`)."
    )
    name: str | None = Field(default=None, description="Optional participant name.")


class StreamOptions(_OpenAIBody):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` and empty `choices`."
    )


class ResponseFormat(_OpenAIBody):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`json_object`: any JSON object; `json_schema`: JSON matching `json_schema.schema`."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="`{name, schema, strict}` when `type` is `json_schema`."
    )

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
        return self


class ChatCompletionRequest(_OpenAIBody):
    """POST /v1/chat/completions. Fields not listed here pass through to OpenAI-compatible upstreams."""

    model: str = Field(description="A model name from GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Newer name of `max_tokens`; wins when both are set."
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling.")
    n: int = Field(default=1, description="Number of choices; only 1 is supported.")
    stop: str | list[str] | None = Field(default=None, description="Stop sequence(s).")
    seed: int | None = Field(default=None, description="Sampling seed.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="Frequency penalty.")
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (grammar-constrained locally)."
    )
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")

    # Field validators (not one model validator) so a 400 names the offending field.
    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ModelCard(BaseModel):
    id: str = Field(description="Model name to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the application started.")
    owned_by: str = Field(description="`promptfleet` and the provider kind, e.g. `promptfleet:llamacpp`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"] = "ok"
    models: list[str] = Field(description="Models this gateway routes to.")


# -- tasks and runs ------------------------------------------------------------------------


class _Ours(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskInfo(_Ours):
    name: str = Field(description="Task name, used in /v1/tasks/{name}/run and /submit.")
    description: str = Field(description="What the task does.")
    model: str = Field(description="Model that runs it.")
    fallback_models: list[str] = Field(description="Models tried, in order, when the model fails.")
    input_schema: dict[str, Any] = Field(description="JSON Schema of `input`.")
    output_schema: dict[str, Any] = Field(description="JSON Schema the validated `output` satisfies.")


class TaskList(_Ours):
    object: Literal["list"] = "list"
    data: list[TaskInfo]


class TaskRunRequest(_Ours):
    """Body of POST /v1/tasks/{name}/run and /submit."""

    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TaskResult(_Ours):
    """A task's validated result (synchronous run, or `result` of a succeeded run)."""

    task: str = Field(description="Task name.")
    output: Any = Field(description="The model's output, valid against the task's output schema.")
    model: str = Field(description="Model that produced it (a fallback model if the primary failed).")
    attempts: int = Field(description="Model calls it took (the repair loop retries invalid output).")
    usage: Usage = Field(description="Tokens used by all attempts.")


class RunView(_Ours):
    """An asynchronous run of a task, as its owner sees it."""

    id: str = Field(description="Run id.")
    object: Literal["task.run"] = "task.run"
    task: str = Field(description="Task name.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="`queued` → `running` → `succeeded` | `failed`; `cancelled` by the owner."
    )
    attempt: int = Field(description="Times a runner has started it (more than 1 after a lost lease).")
    created_at: float = Field(description="Unix time it was accepted.")
    started_at: float | None = Field(description="Unix time it first started.")
    finished_at: float | None = Field(description="Unix time it reached a final status.")
    result: dict[str, Any] | None = Field(description="`{task, output, model, attempts}` once succeeded.")
    error: dict[str, Any] | None = Field(description="The error object (OpenAI shape) once failed.")
    usage: Usage | None = Field(description="Tokens used, when known.")


class RunList(_Ours):
    object: Literal["list"] = "list"
    data: list[RunView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; empty on the last.")
