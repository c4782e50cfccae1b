"""The task API of the Gateway: catalogue, synchronous runs, durable asynchronous runs.

    GET  /v1/tasks                      the catalogue (names, descriptions, schemas)
    POST /v1/tasks/{name}/run           run now; 200 with the validated output
    POST /v1/tasks/{name}/submit        202 with a run id once the run is durably stored
                                        (Idempotency-Key: same key + body → same run)
    GET  /v1/runs/{id}?wait=SECONDS     the run; long-polls until it ends or SECONDS pass
    POST /v1/runs/{id}/cancel           cancel a queued or running run
    GET  /v1/runs?status=&task=&limit=&cursor=   the caller's runs, newest first
                                        (admin: every key's, or ?owner=<key id>)

Input is validated here, before anything is queued, so a bad input is a 400
naming the field and never a failed run. Every run belongs to its creator; an
id of someone else's run answers 404, exactly like an unknown id. The admin
reads, long-polls, lists and cancels any tenant's runs.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.core.taskdefs import TaskDefinition
from deployments.errors import InvalidRequest, Overloaded, PromptfleetError
from deployments.gateway.caller import Caller, get_caller, list_scope, run_scope
from deployments.gateway.metering import Meter
from deployments.schemas import RunList, RunView, TaskInfo, TaskList, TaskResult, TaskRunRequest
from deployments.store import RunRecord
from deployments.task_executor import check_input

MAX_WAIT_S = 60.0


def run_view(run: RunRecord) -> RunView:
    return RunView(
        id=run.id,
        task=run.task,
        status=run.status.value,
        attempt=run.attempt,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        result=run.result,
        error=run.error,
        usage=run.usage,
    )


def task_cost(defn: TaskDefinition, task_input: dict[str, Any]) -> int:
    """Token estimate for per-key limits: the input, and every attempt's completion budget."""
    return len(json.dumps(task_input)) // 4 + defn.max_tokens * defn.max_attempts


def build_task_router(
    tasks: dict[str, TaskDefinition], store: DeploymentHandle, runner: DeploymentHandle, meter: Meter
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["tasks"])
    catalogue = TaskList(
        data=[
            TaskInfo(
                name=d.name,
                description=d.description,
                model=d.model,
                fallback_models=list(d.fallback_models),
                input_schema=d.input_schema,
                output_schema=d.output_schema,
            )
            for d in sorted(tasks.values(), key=lambda d: d.name)
        ]
    )

    @router.get("/tasks", response_model=TaskList)
    async def list_tasks() -> TaskList:
        return catalogue

    @router.post("/tasks/{name}/run", response_model=TaskResult)
    async def run_task(name: str, body: TaskRunRequest, caller: Annotated[Caller, Depends(get_caller)]) -> Any:
        defn = check_input(tasks, name, body.input)
        estimated = task_cost(defn, body.input)
        await meter.admit(caller, estimated)
        try:
            result = await runner.run.remote(name, body.input)
        except BackPressureError:
            raise Overloaded("The task runners are at capacity; retry shortly.", retry_after=1) from None
        if isinstance(result, PromptfleetError):
            raise result
        meter.record(caller, result["model"], result["usage"], estimated)
        return result

    @router.post("/tasks/{name}/submit", status_code=202, response_model=RunView)
    async def submit_task(
        name: str,
        body: TaskRunRequest,
        caller: Annotated[Caller, Depends(get_caller)],
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JSONResponse:
        defn = check_input(tasks, name, body.input)
        await meter.admit(caller, task_cost(defn, body.input))
        run, created = await store.create_run.remote(name, body.input, caller.owner, idempotency_key)
        view = run_view(run)
        return JSONResponse(
            view.model_dump(mode="json"),
            status_code=202 if created else 200,
            headers={"Location": f"/v1/runs/{run.id}"},
        )

    @router.get("/runs/{run_id}", response_model=RunView)
    async def get_run(
        run_id: Annotated[str, Path(max_length=64)],
        caller: Annotated[Caller, Depends(get_caller)],
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to long-poll.")] = 0,
    ) -> RunView:
        return run_view(await store.get.remote(run_id, run_scope(caller), wait))

    @router.post("/runs/{run_id}/cancel", response_model=RunView)
    async def cancel_run(
        run_id: Annotated[str, Path(max_length=64)], caller: Annotated[Caller, Depends(get_caller)]
    ) -> RunView:
        return run_view(await store.cancel.remote(run_id, run_scope(caller)))

    @router.get("/runs", response_model=RunList)
    async def list_runs(
        caller: Annotated[Caller, Depends(get_caller)],
        status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        task: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admin only: this key's runs.")] = None,
    ) -> RunList:
        if task is not None and task not in tasks:
            raise InvalidRequest(f"task: no task named '{task[:64]}'", param="task")
        scope = list_scope(caller, owner)
        runs, next_cursor = await store.list_runs.remote(scope, status, task, limit, cursor)
        return RunList(data=[run_view(r) for r in runs], next_cursor=next_cursor)

    return router
