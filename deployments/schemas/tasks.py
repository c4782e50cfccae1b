"""Tasks, runs and task management (the prompts scope): `/v1/tasks`, `/v1/runs`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from deployments.schemas.base import OwnBody, check_depth
from deployments.schemas.calls import Usage


class TaskInfo(OwnBody):
    name: str = Field(description="Task name, used in /v1/tasks/{name}/run and /submit.")
    description: str = Field(description="What the task does.")
    model: str = Field(description="Model that runs it.")
    fallback_models: list[str] = Field(description="Models tried, in order, when the model fails.")
    input_schema: dict[str, Any] = Field(description="JSON Schema of `input`.")
    output_schema: dict[str, Any] = Field(description="JSON Schema the validated `output` satisfies.")
    version: int | None = Field(default=None, description="The active version: what new runs execute.")
    content_hash: str | None = Field(default=None, description="SHA-256 of the active version's definition.")


class TaskList(OwnBody):
    object: Literal["list"] = "list"
    data: list[TaskInfo]


class TaskRunRequest(OwnBody):
    """Body of POST /v1/tasks/{name}/run and /submit."""

    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")
    model: str | None = Field(
        default=None, max_length=200,
        description="/run only, keys with the prompts scope (or the admin): run the task on this model instead "
        "of its own, without fallbacks (`promptfleet tasks test --model`).",
    )

    _input_depth = field_validator("input")(classmethod(lambda cls, value: check_depth(value)))


class TaskResult(OwnBody):
    """A task's validated result (synchronous run, or `result` of a succeeded run)."""

    task: str = Field(description="Task name.")
    output: Any = Field(description="The model's output, valid against the task's output schema.")
    model: str = Field(description="Model that produced it (a fallback model if the primary failed).")
    attempts: int = Field(description="Model calls it took (the repair loop retries invalid output).")
    usage: Usage = Field(description="Tokens used by all attempts.")
    task_version: int | None = Field(default=None, description="The task version that ran.")


class RunView(OwnBody):
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
    task_version: int | None = Field(
        default=None,
        description="The task version the run executes: the one active when it was submitted. A run queued "
        "before a push or rollback keeps it. Empty for runs queued before task versions existed (they run "
        "the active version).",
    )
    request_id: str | None = Field(
        default=None, description="Id of the request that submitted it (its `X-Request-ID`); the run's model "
        "calls are logged under it. Empty for runs stored before request ids existed."
    )


class RunList(OwnBody):
    object: Literal["list"] = "list"
    data: list[RunView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; empty on the last.")




class TaskFile(OwnBody):
    """One task file as its owner wrote it."""

    file: str = Field(min_length=1, max_length=500, description="The file's name (problems name it; its stem "
                      "must equal the task's name).")
    source: str = Field(max_length=200_000, description="The file's YAML text.")


class TaskFiles(OwnBody):
    """Body of POST /v1/tasks/check and /v1/tasks/push."""

    files: list[TaskFile] = Field(min_length=1, max_length=200, description="The task files.")


class TaskProblem(OwnBody):
    file: str = Field(description="The file it is in.")
    line: int | None = Field(description="1-based line, when known.")
    field: str = Field(description="Dotted path of the field (`output_schema.properties.label`); empty: the file.")
    message: str = Field(description="What is wrong.")
    warning: bool = Field(description="true: reported, but the file is accepted.")


class TaskCheckResult(OwnBody):
    ok: bool = Field(description="No errors (warnings allowed): a push of these files would be accepted.")
    tasks: list[str] = Field(description="Names of the tasks that passed.")
    problems: list[TaskProblem] = Field(description="Every problem, errors and warnings.")


class TaskPushed(OwnBody):
    name: str = Field(description="Task name.")
    version: int = Field(description="Its active version now.")
    changed: bool = Field(description="false: the content equalled the active version, nothing was stored.")


class TaskPushResult(OwnBody):
    object: Literal["list"] = "list"
    data: list[TaskPushed]
    problems: list[TaskProblem] = Field(description="Warnings of the check (a push with errors is refused whole).")


class TaskVersionView(OwnBody):
    name: str = Field(description="Task name.")
    version: int = Field(description="Version number (1, 2, … per task).")
    content_hash: str = Field(description="SHA-256 of the canonical JSON definition.")
    author: str = Field(description="Key id of the pusher, `admin`, `anonymous` (authentication off) or `deploy`.")
    created_at: float = Field(description="Unix time it was stored.")
    active: bool = Field(description="The version new runs get.")
    source: str | None = Field(default=None, description="The file text (GET of one version only).")


class TaskActivationView(OwnBody):
    version: int = Field(description="The version that became active.")
    action: Literal["deploy", "push", "rollback"] = Field(description="What made it active.")
    actor: str = Field(description="Who: key id, `admin`, `anonymous` or `deploy`.")
    at: float = Field(description="Unix time.")


class TaskHistory(OwnBody):
    object: Literal["list"] = "list"
    name: str = Field(description="Task name.")
    data: list[TaskVersionView] = Field(description="Every version, newest first.")
    activations: list[TaskActivationView] = Field(description="Every change of the active version, newest first.")


class TaskRollback(OwnBody):
    """Body of POST /v1/tasks/{name}/rollback."""

    version: int = Field(ge=1, le=2**31 - 1, description="The stored version to make active again.")


class TaskRenderRequest(OwnBody):
    """Body of POST /v1/tasks/{name}/render."""

    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="A stored version; empty: the "
                                "active one.")


class TaskRendered(OwnBody):
    task: str = Field(description="Task name.")
    version: int | None = Field(description="The version rendered.")
    model: str = Field(description="Model the messages go to first.")
    messages: list[dict[str, str]] = Field(description="The exact chat messages of the first attempt.")
    response_format: dict[str, Any] = Field(description="The `response_format` sent with them.")


class RunDetail(RunView):
    """A run as the admin's console sees it: the view plus who owns it and what it was given."""

    owner: str = Field(description="The key id the run belongs to (`anonymous` without authentication).")
    input: dict[str, Any] = Field(description="The task input as submitted.")
    updated_at: float = Field(description="Unix time of the last change.")
    idempotency_key: str | None = Field(description="The Idempotency-Key it was submitted with, if any.")
    worker_id: str | None = Field(description="The TaskRunner replica that last held it.")
    available_at: float | None = Field(description="A queued run waiting out a backoff is not started before this.")
    messages: list[dict[str, str]] | None = Field(
        default=None, description="The chat messages the run's first model call sent (stored when it succeeded)."
    )


class RunDetailList(OwnBody):
    data: list[RunDetail]
    next_cursor: str | None = Field(description="The cursor of the next page; empty on the last.")
