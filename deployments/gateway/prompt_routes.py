"""Task management for the people who own the prompts: check, push, history, roll back, render.

    POST /v1/tasks/check                   check task files (the same checks as a push), store nothing
    POST /v1/tasks/push                    check and publish task files: new versions become active on
                                           every Gateway and TaskRunner replica once the store
                                           answers their long poll, plus one paged fetch (``catalogue``);
                                           refused whole if any file has an error
    GET  /v1/tasks/{name}/versions         every version (hash, author, time, active) and activation
    GET  /v1/tasks/{name}/versions/{v}     one version, with its file text
    POST /v1/tasks/{name}/rollback         make a stored version active again
    POST /v1/tasks/{name}/render           the exact messages a run would send (active or given version)

A 200 from push or rollback means the change is committed in the TaskStore, whose catalogue version
every replica follows in bounded pages (so nothing stops a replica from applying it), and that this
replica applied it before answering. A file with YAML anchors/aliases or whose stored definition
is over ``tasks.max_definition_bytes`` is a 400 naming it; so is a push over ``MAX_PUSH_BYTES``
stored (it would be one call to the store).

All need the admin key or a key with the ``prompts`` scope (``auth.require_prompts``); with
authentication off anyone may. Runs already submitted keep the version they were pinned to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from deployments.catalogue import CatalogueFollower
from deployments.clients.task_versions import TaskVersionsClient
from deployments.config import AppArgs
from deployments.core.prompting import TemplateRenderer, response_format_for, validate_input
from deployments.core.taskfile import CheckedTask, Problem, canonical, check_sources, content_hash
from deployments.errors import InvalidRequest
from deployments.gateway.auth import checked_caller, require_prompts
from deployments.gateway.caller import Caller
from deployments.gateway.json_body import v1_router
from deployments.schemas import (
    TaskActivationView,
    TaskCheckResult,
    TaskFiles,
    TaskHistory,
    TaskProblem,
    TaskPushed,
    TaskPushResult,
    TaskRendered,
    TaskRenderRequest,
    TaskRollback,
    TaskVersionView,
)
from deployments.store.tasks import MAX_PUSH_BYTES, TaskVersion, VersionInput

logger = logging.getLogger("ray.serve")
TaskName = Annotated[str, Path(max_length=64)]


def problem_view(problem: Problem) -> TaskProblem:
    return TaskProblem(file=problem.file, line=problem.line, field=problem.field, message=problem.message,
                       warning=problem.warning)


def version_view(version: TaskVersion, with_source: bool = False) -> TaskVersionView:
    return TaskVersionView(name=version.name, version=version.version, content_hash=version.content_hash,
                           author=version.author, created_at=version.created_at, active=version.active,
                           source=version.source if with_source else None)


def build_prompt_router(args: AppArgs, tasks: CatalogueFollower, versions: TaskVersionsClient) -> APIRouter:
    router = v1_router("task management")
    enabled = args.auth.enabled
    models = args.task_models()
    prompts = Depends(checked_caller(require_prompts, enabled))  # a default, not Annotated: see auth.checked_caller
    limits = args.tasks.render_limits()
    renderer = TemplateRenderer(limits)

    async def refresh() -> None:
        """This replica follows a change it made at once (the others on the store's answer to their long
        poll). The change is stored whatever happens here: a failed refresh only waits for the next poll."""
        try:
            await tasks.refresh()
        except Exception:
            logger.warning("could not refresh the task catalogue after a change", exc_info=True)

    async def check(body: TaskFiles) -> list[CheckedTask]:
        # Off the event loop: the llama.cpp grammar check compiles the schema, and every task's examples
        # (or a sample input) are rendered, each within the render budgets.
        return await asyncio.to_thread(check_sources, [(f.file, f.source) for f in body.files], models,
                                       max_definition_bytes=args.tasks.max_definition_bytes, limits=limits)

    @router.post("/tasks/check", response_model=TaskCheckResult)
    async def check_tasks(body: TaskFiles, caller: Caller = prompts) -> TaskCheckResult:
        checked = await check(body)
        return TaskCheckResult(
            ok=all(c.definition is not None for c in checked),
            tasks=[c.definition.name for c in checked if c.definition is not None],
            problems=[problem_view(p) for c in checked for p in c.problems],
        )

    @router.post("/tasks/push", response_model=TaskPushResult)
    async def push_tasks(body: TaskFiles, caller: Caller = prompts) -> TaskPushResult:
        checked = await check(body)
        errors = [p for c in checked for p in c.errors]
        if errors or any(c.definition is None for c in checked):
            listing = "\n".join(str(p) for p in errors[:50])
            raise InvalidRequest(f"The push was refused: {len(errors)} problem(s); nothing was published.\n{listing}",
                                 param="files")
        items = [
            VersionInput(name=c.definition.name, definition=canonical(c.definition),
                         content_hash=content_hash(c.definition), source=c.source)
            for c in checked if c.definition is not None
        ]
        size = sum(len(i.definition.encode()) + len(i.source.encode()) for i in items)
        if size > MAX_PUSH_BYTES:
            raise InvalidRequest(f"The push would store {size} bytes (definitions and file texts), over the limit of "
                                 f"{MAX_PUSH_BYTES} per push; push the files in several smaller pushes.", param="files")
        pushed = await versions.push(items, author=caller.author)
        await refresh()
        return TaskPushResult(
            data=[TaskPushed(name=name, version=version, changed=changed) for name, version, changed in pushed],
            problems=[problem_view(p) for c in checked for p in c.problems],
        )

    @router.get("/tasks/{name}/versions", response_model=TaskHistory)
    async def task_history(name: TaskName, caller: Caller = prompts) -> TaskHistory:
        stored, activations = await versions.history(name)
        return TaskHistory(
            name=name,
            data=[version_view(v) for v in stored],
            activations=[TaskActivationView(version=a.version, action=a.action, actor=a.actor, at=a.at)
                         for a in activations],
        )

    @router.get("/tasks/{name}/versions/{version}", response_model=TaskVersionView)
    async def task_version(
        name: TaskName,
        version: Annotated[int, Path(ge=1, le=2**31 - 1)],
        caller: Caller = prompts,
    ) -> TaskVersionView:
        return version_view(await versions.version(name, version), with_source=True)

    @router.post("/tasks/{name}/rollback", response_model=TaskVersionView)
    async def rollback_task(
        name: TaskName, body: TaskRollback, caller: Caller = prompts
    ) -> TaskVersionView:
        active = await versions.rollback(name, version=body.version, actor=caller.author)
        await refresh()
        return version_view(active)

    @router.post("/tasks/{name}/render", response_model=TaskRendered)
    async def render_task(
        name: TaskName, body: TaskRenderRequest, caller: Caller = prompts
    ) -> TaskRendered:
        defn, version = await tasks.definition(name, body.version)
        validate_input(defn, body.input)
        return TaskRendered(task=name, version=version, model=defn.model,
                            messages=await renderer.render(defn, body.input), response_format=response_format_for(defn))

    return router
