"""Task definitions: named prompt programs owned by the prompts team, one YAML file per task.

The model of one task (``TaskDefinition``, with its ``examples``): field types and ranges, both
JSON Schemas and template syntax are checked here. What needs the whole file or the configured
models (lines, template variables against the input schema, file name == task name, unknown
models, structured-output support) is ``core.taskfile``'s. Owns no state.

Config errors are ``TaskConfigError`` (a ``ValueError``), not a ``PromptfleetError``: they are
the operator's problem, never shown to an API client.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError, nodes
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from deployments.core.prompting import format_json_path, template_environment

__all__ = ["STORED", "Example", "Expectation", "Judge", "TaskConfigError", "TaskDefinition"]


class TaskConfigError(ValueError):
    """A task definition file is invalid. The message names the file and the field."""


STORED: dict[str, Any] = {"stored": True}
"""Validation context of a definition read back from the store (``taskfile.parse_stored``): it was
checked whole when it was stored, so the JSON Schema meta-validation and template compilation
(milliseconds per task: most of a replica's first load of a large catalogue) are not repeated."""


def _stored(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and info.context.get("stored") is True


def _check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = format_json_path(exc.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}") from None
    return schema


def _check_template(source: str) -> str:
    env = template_environment()
    try:
        # Compile with the same environment that renders, so unknown filters/tests fail too.
        env.from_string(source)
        tree = env.parse(source)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        raise ValueError(f"template error{f' on line {line}' if line else ''}: {exc.message}") from None
    # The sandbox refuses these at render time (every run would fail): say so when the task is checked.
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name: object = node.attr
        elif isinstance(node, nodes.Getitem):
            name = getattr(node.arg, "value", None)
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:  # `|attr('…')`
            name = getattr(node.args[0], "value", None)
        else:
            continue
        if isinstance(name, str) and name.startswith("_"):
            raise ValueError(f"template error on line {node.lineno}: '{name}' is not allowed (the sandbox "
                             "refuses attributes that start with '_')")
    return source


class Judge(BaseModel):
    """Ask another model whether the output is right: it answers ``{"pass": bool, "reason": str}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="The model that judges (any configured model).")
    prompt: str = Field(
        min_length=1,
        description="Jinja2 template of the judge's question; variables: `input` and `output` (JSON text).",
    )

    @field_validator("prompt")
    @classmethod
    def _template_valid(cls, value: str) -> str:
        return _check_template(value)


class Expectation(BaseModel):
    """What an example's run must give. Every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    valid: bool = Field(
        default=True,
        description="true: the run succeeds with output valid against output_schema; false: it must fail.",
    )
    equals: dict[str, Any] = Field(
        default_factory=dict, description="Output field (dotted path, `items.0.name`) → the exact value it must have."
    )
    matches: dict[str, str] = Field(
        default_factory=dict, description="Output field (dotted path) → a regular expression its text must match."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="A JSON Schema the output must also satisfy (narrower than "
        "output_schema, e.g. one enum value)."
    )
    judge: Judge | None = Field(default=None, description="A judge model's verdict must be pass.")

    @field_validator("matches")
    @classmethod
    def _regexes_valid(cls, value: dict[str, str]) -> dict[str, str]:
        for path, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{path}: not a valid regular expression: {exc}") from None
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_valid(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return None if value is None or _stored(info) else _check_schema(value)


class Example(BaseModel):
    """A named input with expectations: `promptfleet tasks test` runs it against a running cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64, description="Example name.")
    input: dict[str, Any] = Field(description="The task input (valid against input_schema).")
    expect: Expectation = Field(default_factory=Expectation, description="What the run must give.")


class TaskDefinition(BaseModel):
    """One task: what it takes, how it prompts, which model answers, what it must return."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        max_length=64,
        description="Task slug used in URLs (/v1/tasks/{name}); must equal the file name stem.",
    )
    description: str = Field(min_length=1, description="What the task does, for humans and docs.")
    model: str = Field(min_length=1, description="Name of the configured model that runs it.")
    fallback_models: list[str] = Field(
        default_factory=list,
        description="Models tried in order when the primary model is unavailable.",
    )
    input_schema: dict[str, Any] = Field(
        description="JSON Schema (2020-12) of the task input; must describe an object.",
    )
    output_schema: dict[str, Any] = Field(
        description="JSON Schema (2020-12) the model output must satisfy; sent to the provider "
        "as a json_schema response_format where supported.",
    )
    system: str | None = Field(
        default=None, description="Jinja2 template of the system message; none if omitted."
    )
    prompt: str = Field(
        min_length=1,
        description="Jinja2 template of the user message; variables are the input's fields.",
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(default=256, ge=1, description="Completion token limit per call.")
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Model calls per run: the first, plus repairs that feed back validation "
        "errors when the output does not match output_schema.",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Time limit of one run, seconds.")
    examples: list[Example] = Field(
        default_factory=list,
        description="Named inputs with expectations, run by `promptfleet tasks test` (never by the API).",
    )

    # Where the definition came from, for error messages (not part of the YAML).
    _source: str = PrivateAttr(default="<memory>")

    @property
    def source(self) -> str:
        """The file this definition was loaded from (``"<memory>"`` if built in code)."""
        return self._source

    @field_validator("input_schema")
    @classmethod
    def _input_schema_valid(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if not _stored(info):
            _check_schema(value)
        # The input is rendered as template variables, so it has to be an object.
        if value.get("type") != "object":
            raise ValueError('must have "type": "object" (the input is a JSON object)')
        return value

    @field_validator("output_schema")
    @classmethod
    def _output_schema_valid(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return value if _stored(info) else _check_schema(value)

    @field_validator("system", "prompt")
    @classmethod
    def _template_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None or _stored(info) else _check_template(value)
