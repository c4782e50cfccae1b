"""Task definitions: named prompt programs owned by the prompts team, one YAML file per task.

Loaded once at application build time (``load_task_definitions``) and handed to the Gateway and
workers as plain data. Everything that can be checked without calling a model is checked here,
so a broken task fails the deploy instead of a client request: field types and ranges, both JSON
Schemas, template syntax, template variables against the input schema, file name == task name,
and (``validate_models``) that every model a task names exists. Owns no state.

Config errors are ``TaskConfigError`` (a ``ValueError``), not a ``PromptfleetError``: they are
the operator's problem, never shown to an API client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jinja2 import TemplateError, meta
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from deployments.core.prompting import format_json_path, template_environment

__all__ = ["TaskConfigError", "TaskDefinition", "load_task_definitions", "validate_models"]


class TaskConfigError(ValueError):
    """A task definition file is invalid. The message names the file and the field."""


def _check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = format_json_path(exc.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}") from None
    return schema


def _check_template(source: str) -> str:
    try:
        # Compile with the same environment that renders, so unknown filters/tests fail too.
        template_environment().from_string(source)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        raise ValueError(f"template error{f' on line {line}' if line else ''}: {exc.message}") from None
    return source


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

    # Where the definition came from, for error messages (not part of the YAML).
    _source: str = PrivateAttr(default="<memory>")

    @property
    def source(self) -> str:
        """The file this definition was loaded from (``"<memory>"`` if built in code)."""
        return self._source

    @field_validator("input_schema")
    @classmethod
    def _input_schema_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_schema(value)
        # The input is rendered as template variables, so it has to be an object.
        if value.get("type") != "object":
            raise ValueError('must have "type": "object" (the input is a JSON object)')
        return value

    @field_validator("output_schema")
    @classmethod
    def _output_schema_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_schema(value)

    @field_validator("system", "prompt")
    @classmethod
    def _template_valid(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value)


def _template_variables(source: str) -> set[str]:
    """Top-level variables a template reads (including ones guarded by ``is defined``)."""
    return meta.find_undeclared_variables(template_environment().parse(source))


def _format_validation_error(path: str, exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        field = format_json_path(err["loc"]) or "(file)"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {field}: {msg}")
    return problems


def _load_file(path: Path) -> tuple[TaskDefinition | None, list[str]]:
    """Parse one file; returns the definition or the list of problems (never both)."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{where}: cannot read file: {exc}"]
    except yaml.YAMLError as exc:
        return None, [f"{where}: invalid YAML: {exc}"]
    if not isinstance(data, dict):
        return None, [f"{where}: expected a mapping of fields, got {type(data).__name__}"]
    try:
        defn = TaskDefinition.model_validate(data)
    except ValidationError as exc:
        return None, _format_validation_error(where, exc)
    defn._source = where
    problems = []
    if path.stem != defn.name:
        problems.append(f"{where}: name: '{defn.name}' must equal the file name '{path.stem}'")
    # A variable the input schema does not declare can never be supplied by a valid input,
    # so the task would fail on every request; catch the typo at deploy time instead.
    declared = set(defn.input_schema.get("properties", {}))
    for field in ("system", "prompt"):
        source = getattr(defn, field)
        if source is None:
            continue
        for var in sorted(_template_variables(source) - declared):
            problems.append(f"{where}: {field}: template variable '{var}' is not a property of input_schema")
    return (None, problems) if problems else (defn, [])


def load_task_definitions(directory: Path) -> dict[str, TaskDefinition]:
    """Load every ``*.yaml`` / ``*.yml`` file in ``directory`` (not recursive), keyed by name.

    Raises ``TaskConfigError`` listing every problem found, one per line, each as
    ``<file>: <field>: <what is wrong>``; duplicate task names are an error too.
    """
    if not directory.is_dir():
        raise TaskConfigError(f"{directory}: task definition directory does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    defs: dict[str, TaskDefinition] = {}
    problems: list[str] = []
    for path in files:
        defn, file_problems = _load_file(path)
        problems.extend(file_problems)
        if defn is None:
            continue
        if defn.name in defs:
            problems.append(
                f"{path}: name: duplicate task name '{defn.name}' (also in {defs[defn.name].source})"
            )
            continue
        defs[defn.name] = defn
    if problems:
        raise TaskConfigError("\n".join(problems))
    return defs


def validate_models(defs: Mapping[str, TaskDefinition], known_models: Iterable[str]) -> None:
    """Check that every task's ``model`` and ``fallback_models`` are configured models.

    Raises ``TaskConfigError`` naming the file, task and field of every unknown model.
    """
    known = set(known_models)
    listing = ", ".join(sorted(known)) or "none"
    problems: list[str] = []
    for defn in defs.values():
        fields = [("model", defn.model)] + [
            (f"fallback_models[{i}]", m) for i, m in enumerate(defn.fallback_models)
        ]
        for field, model in fields:
            if model not in known:
                problems.append(
                    f"{defn.source}: {field}: task '{defn.name}' uses unknown model '{model}' "
                    f"(configured: {listing})"
                )
    if problems:
        raise TaskConfigError("\n".join(problems))
