"""The task API of the Gateway: catalogue, synchronous runs, durable asynchronous runs.

    GET  /v1/tasks                      the catalogue: the active version of every task
    POST /v1/tasks/{name}/run           run now; 200 with the validated output
    POST /v1/tasks/{name}/submit        202 with a run id once the run is durably stored
                                        (Idempotency-Key: same key + body → same run)
    GET  /v1/runs/{id}?wait=SECONDS     the run; long-polls until it ends or SECONDS pass
    POST /v1/runs/{id}/cancel           cancel a queued or running run
    GET  /v1/runs?status=&task=&limit=&cursor=   the caller's runs, newest first
                                        (admin: every key's, or ?owner=<key id>)

Input is validated here, before anything is queued, so a bad input is a 400
naming the field and never a failed run. The definitions come from this replica's
copy of the task catalogue (``deployments.catalogue``, followed from the TaskStore):
a run executes the version its input was checked against — a submitted run is pinned
to it (``task_version``) and keeps it through later pushes and rollbacks. A key whose
token budget is spent gets 403 here; the runs' model calls are metered to the key where
they are made (the TaskRunner, through ``deployments.model_calls``): their key's rate
limit paces them. Every run belongs to its creator; an id of someone else's run
answers 404, exactly like an unknown id. The admin reads, long-polls, lists and cancels
any tenant's runs. The TaskStore and the TaskRunner are reached through their typed clients
(``deployments.clients``): a runner at capacity or one that dies mid-run is a 503 with
Retry-After here, the same answer a batch's task line gets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import JSONResponse

from deployments import request_ids
from deployments.catalogue import Catalogue, CatalogueFollower
from deployments.clients.runner import RunnerClient
from deployments.clients.runs import RunsClient
from deployments.errors import InvalidRequest
from deployments.gateway.auth import require_prompts
from deployments.gateway.caller import Caller, get_caller, list_scope, run_scope
from deployments.gateway.json_body import v1_router
from deployments.limits.metering import Meter
from deployments.schemas import RunList, RunView, TaskInfo, TaskList, TaskResult, TaskRunRequest
from deployments.task_executor import check_input

MAX_WAIT_S = 60.0


def task_list(catalogue: Catalogue) -> TaskList:
    return TaskList(
        data=[
            TaskInfo(
                name=entry.definition.name,
                description=entry.definition.description,
                model=entry.definition.model,
                fallback_models=list(entry.definition.fallback_models),
                input_schema=entry.definition.input_schema,
                output_schema=entry.definition.output_schema,
                version=entry.version,
                content_hash=entry.content_hash,
            )
            for _, entry in sorted(catalogue.tasks.items())
        ]
    )


def build_task_router(
    tasks: CatalogueFollower, runs: RunsClient, runner: RunnerClient, meter: Meter, auth_enabled: bool
) -> APIRouter:
    router = v1_router("tasks")
    listed: dict[int | None, TaskList] = {}  # the catalogue page, built once per catalogue version

    @router.get("/tasks", response_model=TaskList)
    async def list_tasks() -> TaskList:
        catalogue = await tasks.ready()
        if catalogue.version not in listed:
            listed.clear()
            listed[catalogue.version] = task_list(catalogue)
        return listed[catalogue.version]

    @router.post("/tasks/{name}/run", response_model=TaskResult)
    async def run_task(name: str, body: TaskRunRequest, caller: Annotated[Caller, Depends(get_caller)]) -> Any:
        entry = await tasks.active(name)
        check_input(entry.definition, body.input)
        if body.model is not None:
            require_prompts(caller, auth_enabled)
        meter.check_token_budget(caller.entry)
        return await runner.run(name, body.input, payer=caller.key_id, version=entry.version, model=body.model)

    @router.post("/tasks/{name}/submit", status_code=202, response_model=RunView)
    async def submit_task(
        name: str,
        body: TaskRunRequest,
        caller: Annotated[Caller, Depends(get_caller)],
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JSONResponse:
        entry = await tasks.active(name)
        check_input(entry.definition, body.input)
        if body.model is not None:
            raise InvalidRequest("model: only POST /v1/tasks/{name}/run takes a model.", param="model")
        meter.check_token_budget(caller.entry)
        view, created = await runs.create(
            task=name, task_input=body.input, owner=caller.owner, idempotency_key=idempotency_key,
            task_version=entry.version, request_id=request_ids.current(),
        )
        return JSONResponse(
            view.model_dump(mode="json"),
            status_code=202 if created else 200,
            headers={"Location": f"/v1/runs/{view.id}"},
        )

    @router.get("/runs/{run_id}", response_model=RunView)
    async def get_run(
        run_id: Annotated[str, Path(max_length=64)],
        caller: Annotated[Caller, Depends(get_caller)],
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to long-poll.")] = 0,
    ) -> RunView:
        return await runs.get(run_id, owner=run_scope(caller), wait_s=wait)

    @router.post("/runs/{run_id}/cancel", response_model=RunView)
    async def cancel_run(
        run_id: Annotated[str, Path(max_length=64)], caller: Annotated[Caller, Depends(get_caller)]
    ) -> RunView:
        return await runs.cancel(run_id, owner=run_scope(caller))

    @router.get("/runs", response_model=RunList)
    async def list_runs(
        caller: Annotated[Caller, Depends(get_caller)],
        status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        task: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admin only: this key's runs.")] = None,
    ) -> RunList:
        if task is not None and task not in (await tasks.ready()).tasks:
            raise InvalidRequest(f"task: no task named '{task[:64]}'", param="task")
        return await runs.list_runs(owner=list_scope(caller, owner), status=status, task=task, limit=limit,
                                    cursor=cursor)

    return router
