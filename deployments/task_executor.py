"""TaskExecutor: runs one task once — input check, prompt, model calls, repair loop.

Used by the TaskRunner deployment for synchronous runs and for runs leased from the durable
queue. Calls the task's model (then the task's fallbacks) through the one model call path,
``deployments.model_calls.ModelCalls``, which meters every call to the payer's key: the
caller of a synchronous run, the owner of a queued run. Owns nothing.

Executing a task: validate the input, render the messages, ask the model for JSON matching
``output_schema`` (json_schema response_format — a grammar on llama.cpp), validate, and feed
validation errors back for another try, up to the task's ``max_attempts``
(``deployments.core.output.run_with_repair``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from deployments import request_ids
from deployments.core.output import run_with_repair
from deployments.core.prompting import TemplateRenderer, response_format_for, validate_input
from deployments.core.taskdefs import TaskDefinition
from deployments.direct_transport import queued_run
from deployments.errors import TRANSIENT, InvalidRequest, TaskNotFound, UpstreamTimeout
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatCompletionRequest

__all__ = ["TRANSIENT", "Definitions", "StaticDefinitions", "TaskExecutor", "check_input"]


class Definitions(Protocol):
    """Where the executor finds a task's definition: ``version`` None is the active one."""

    async def definition(self, name: str, version: int | None) -> tuple[TaskDefinition, int | None]: ...


class StaticDefinitions:
    """A fixed set of definitions, without versions (tests, tools)."""

    def __init__(self, tasks: Mapping[str, TaskDefinition]) -> None:
        self.tasks = tasks

    async def definition(self, name: str, version: int | None) -> tuple[TaskDefinition, int | None]:
        defn = self.tasks.get(name)
        if defn is None:
            raise TaskNotFound(f"The task '{name}' does not exist.", param="task")
        return defn, version


class TaskExecutor:
    """Runs one task once (with its repair loop and fallback models). Plain class: tested with fakes."""

    def __init__(
        self, tasks: Mapping[str, TaskDefinition] | Definitions, calls: ModelCalls,
        renderer: TemplateRenderer | None = None,
    ) -> None:
        self.tasks: Definitions = StaticDefinitions(tasks) if isinstance(tasks, Mapping) else tasks
        self.calls = calls
        self.renderer = renderer or TemplateRenderer()

    async def execute(
        self,
        name: str,
        task_input: dict[str, Any],
        payer: str | None = None,
        wait: bool = False,
        background: bool = False,
        version: int | None = None,
        model: str | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``version`` of the task (None: the active one); its model calls are billed to the key
        ``payer`` (None: unmetered). ``model``: on this model instead of the task's, without fallbacks.

        ``wait``: the payer's rpm/tpm may delay the calls (within the task's ``timeout_s``) instead
        of refusing them with 429. ``background``: a queued run, served behind the payer's
        interactive calls in a limited model's fair queue. ``request_id``: the id the calls go by
        (None: the id of the request being served, see ``ModelCalls``)."""
        if request_id is not None:
            # The run's lines in this replica (fallbacks, failures) and its model calls carry it.
            request_ids.use(request_id)
        if background:
            queued_run.set(True)  # no client waits: its calls wait for a full model's place (direct_transport)
        defn, version = await self.tasks.definition(name, version)
        if model is not None:
            defn = defn.model_copy(update={"model": model, "fallback_models": []})
        validate_input(defn, task_input)
        messages = await self.renderer.render(defn, task_input)  # in a worker thread, within its budgets
        meter = self.calls.meter
        account = await meter.account(payer) if meter is not None else None
        wait_s = defn.timeout_s if wait else 0.0
        served_by: list[str] = []

        async def call(conversation: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
            request = ChatCompletionRequest.model_validate({
                "model": defn.model,
                "messages": conversation,
                "response_format": response_format_for(defn),
                "temperature": defn.temperature,
                "max_tokens": defn.max_tokens,
            })
            result = await self.calls.complete(
                request, account, wait_s=wait_s, request_id=request_id, fallbacks=defn.fallback_models,
                background=background,
            )
            served_by.append(str(result.get("model", defn.model)))
            choice = result["choices"][0]
            return choice["message"].get("content") or "", result.get("usage") or {}

        try:
            async with asyncio.timeout(defn.timeout_s):
                repaired = await run_with_repair(call, messages, defn.output_schema, defn.max_attempts)
        except TimeoutError:
            raise UpstreamTimeout(f"The task '{name}' did not finish within {defn.timeout_s:g}s.") from None
        return {
            "task": name,
            "output": repaired.output,
            "model": served_by[-1],
            "attempts": repaired.attempts,
            "usage": repaired.usage,
            "task_version": version,
            "messages": messages,  # what the first call sent: a queued run stores it (RunLoop)
        }


def check_input(defn: TaskDefinition, task_input: Any) -> TaskDefinition:
    """The Gateway's check before accepting a run: 400 naming the field."""
    if not isinstance(task_input, dict):
        raise InvalidRequest("input: must be an object", param="input")
    validate_input(defn, task_input)
    return defn
