"""The OpenAI Responses request body (`POST /v1/responses`), as far as promptfleet serves it.

A response is one model call. For most models it is made through the chat path (``core.responses``
translates both ways), so it has what chat has: text, structured output (`text.format`), function
tools, streaming; every field not declared here (`include`, `reasoning`, `truncation`, …) is then
refused with a 400 naming it — none is dropped silently. A model whose upstream speaks the Responses
API (`upstream_api: responses`) gets the body forwarded as sent, undeclared fields included.
Nothing is stored either way: `store: true`, `previous_response_id` (and `conversation`,
`background`) and `GET /v1/responses/{id}` are refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deployments.schemas.base import OpenAIBody, check_depth
from deployments.schemas.chat import MAX_TOKENS_LIMIT, FunctionDef


class TextFormat(OpenAIBody):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`text`, `json_object`, or `json_schema` (held by a grammar on local models)."
    )
    name: str | None = Field(default=None, description="Schema name (`json_schema`).")
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON Schema the output matches (`json_schema`)."
    )
    strict: bool | None = Field(default=None, description="Strict schema adherence (upstream).")
    description: str | None = Field(default=None, description="What the format is for.")

    _schema_depth = field_validator("schema_")(classmethod(lambda cls, value: check_depth(value)))

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if self.type == "json_schema" and not isinstance(self.schema_, dict):
            raise ValueError("a json_schema format needs a schema object")
        return self


class TextConfig(OpenAIBody):
    format: TextFormat | None = Field(default=None, description="The output's format.")


class FunctionTool(FunctionDef):
    """A Responses function tool: chat's function definition, flat, with its `type`."""

    type: Literal["function"] = Field(description="Only function tools.")


class NamedFunctionChoice(OpenAIBody):
    type: Literal["function"] = Field(description="`function`.")
    name: str = Field(description="The function the model must call.")


class ResponseCreate(OpenAIBody):
    """POST /v1/responses. Numbers and flags are strict, as in chat."""

    model: str = Field(description="A model name from GET /v1/models.")
    input: str | list[dict[str, Any]] = Field(
        description="A string (one user message), or input items: messages (`{role, content}`, content a "
        "string or `input_text`/`output_text` parts), `function_call` and `function_call_output` items."
    )
    instructions: str | None = Field(default=None, description="A system message put first.")
    text: TextConfig | None = Field(default=None, description="`{format: {...}}`: the output's format.")
    max_output_tokens: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate."
    )
    temperature: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, ge=0, le=2, description="Sampling temperature."
    )
    top_p: float | None = Field(
        default=None, strict=True, allow_inf_nan=False, gt=0, le=1, description="Nucleus sampling."
    )
    tools: list[FunctionTool] | None = Field(default=None, max_length=128, description="Function tools.")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = Field(
        default=None, description="`none`, `auto`, `required` or `{type: function, name}`."
    )
    parallel_tool_calls: bool | None = Field(default=None, strict=True, description="Several calls per turn.")
    stream: bool = Field(default=False, strict=True, description="Answer with server-sent events.")
    store: bool | None = Field(default=None, strict=True, description="Only `false`: responses are not stored.")
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description="Echoed in the response.")
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")

    _input_depth = field_validator("input")(classmethod(lambda cls, value: check_depth(value)))

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("responses are not stored here; send store: false (or leave it out)")
        return value

    @property
    def effective_max_tokens(self) -> int | None:
        """The output length asked for (the model call path checks it against the model's limit)."""
        return self.max_output_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_output_tokens"
