"""TaskExecutor: runs one task once — input check, prompt, model call with fallbacks, repair loop.

Used by the TaskRunner deployment for synchronous runs and for runs leased from the durable
queue. Calls the task's model (then its fallbacks) through ``ModelWorker`` handles. Owns nothing.

Executing a task: validate the input, render the messages, ask the model for JSON matching
``output_schema`` (json_schema response_format — a grammar on llama.cpp), validate, and feed
validation errors back for another try, up to the task's ``max_attempts``
(``deployments.core.output.run_with_repair``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.core.output import run_with_repair
from deployments.core.prompting import render_messages, response_format_for, validate_input
from deployments.core.taskdefs import TaskDefinition
from deployments.errors import (
    InvalidRequest,
    Overloaded,
    PromptfleetError,
    RateLimited,
    TaskNotFound,
    UpstreamError,
    UpstreamTimeout,
)
from deployments.schemas import Share

logger = logging.getLogger("ray.serve")

# Failures of the model side rather than of the task: try the next fallback model, and
# for queued runs, try again later rather than failing the run.
TRANSIENT = (UpstreamError, UpstreamTimeout, RateLimited, Overloaded)


class TaskExecutor:
    """Runs one task once (with its repair loop and fallback models). Plain class: tested with fakes."""

    def __init__(self, tasks: dict[str, TaskDefinition], workers: dict[str, DeploymentHandle]) -> None:
        self.tasks = tasks
        self.workers = workers

    def definition(self, name: str) -> TaskDefinition:
        defn = self.tasks.get(name)
        if defn is None:
            raise TaskNotFound(f"The task '{name}' does not exist.", param="task")
        return defn

    async def execute(self, name: str, task_input: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """Run the task; ``share`` (whose run it is) goes with every model call, for fair share."""
        defn = self.definition(name)
        validate_input(defn, task_input)
        messages = render_messages(defn, task_input)
        served_by: list[str] = []

        async def call(conversation: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
            body = {
                "messages": conversation,
                "response_format": response_format_for(defn),
                "temperature": defn.temperature,
                "max_tokens": defn.max_tokens,
            }
            models = [defn.model, *defn.fallback_models]
            for index, model in enumerate(models):
                try:
                    result = await self._chat(model, body, share)
                except TRANSIENT:
                    if index == len(models) - 1:
                        raise
                    logger.warning("task %s: model %s failed; falling back to %s", name, model, models[index + 1])
                    continue
                served_by.append(model)
                choice = result["choices"][0]
                return choice["message"].get("content") or "", result.get("usage") or {}
            raise AssertionError("unreachable")

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
        }

    async def _chat(self, model: str, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        try:
            result = await self.workers[model].chat.remote(body, share)
        except BackPressureError:
            raise Overloaded(f"Model '{model}' is at capacity.", retry_after=1) from None
        except (RayActorError, WorkerCrashedError, NodeDiedError):
            # The worker replica (or its node) died with this call in flight; Serve replaces it.
            # That says nothing about the task: report it as transient, so the next fallback
            # model is tried and a queued run goes back to the queue instead of failing for good
            # (found by tests/serve/test_task_faults.py killing the worker replica).
            raise Overloaded(f"Model '{model}' is temporarily unavailable.", retry_after=1) from None
        if isinstance(result, PromptfleetError):
            raise result
        return dict(result)


def check_input(tasks: dict[str, TaskDefinition], name: str, task_input: Any) -> TaskDefinition:
    """The Gateway's check before accepting a run: 404 for an unknown task, 400 naming the field."""
    defn = tasks.get(name)
    if defn is None:
        raise TaskNotFound(f"The task '{name}' does not exist.", param="task")
    if not isinstance(task_input, dict):
        raise InvalidRequest("input: must be an object", param="input")
    validate_input(defn, task_input)
    return defn
