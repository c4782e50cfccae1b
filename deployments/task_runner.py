"""TaskRunner: executes prompt tasks — synchronously for the Gateway, and from the durable queue.

Serves: ``run(task, input)`` (the synchronous API; nothing is stored), and, in
the background of every replica, a loop that leases queued runs from the
TaskStore and executes them.
Calls: ``ModelWorker`` handles (the task's model, then its fallbacks) and the
``TaskStore`` handle.
Owns: only the runs it currently holds a lease on. A replica that dies simply
stops renewing; its leases expire and the runs are queued again (at-least-once
model calls; the store accepts one result per run, from the current lease).

Executing one task is ``deployments.task_executor.TaskExecutor``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.config import TasksConfig
from deployments.core.retry import BackoffPolicy
from deployments.core.taskdefs import TaskDefinition
from deployments.errors import PromptfleetError
from deployments.schemas import Share
from deployments.store import RunRecord
from deployments.task_executor import TRANSIENT, TaskExecutor

logger = logging.getLogger("ray.serve")


class TaskRunner:
    # async: Serve runs an async constructor on the replica's event loop, which the claim loop needs.
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        tasks: dict[str, TaskDefinition],
        workers: dict[str, DeploymentHandle],
        store: DeploymentHandle,
        config: TasksConfig,
    ) -> None:
        self.executor = TaskExecutor(tasks, workers)
        self.store = store
        self.config = config
        self.worker_id = f"runner-{uuid.uuid4().hex[:12]}"
        # Keyed by lease token, not run id: a run whose lease this replica lost (e.g. its event
        # loop stalled past the lease) can be claimed again by this same replica while the old
        # attempt is still winding down; both must count against runner_concurrency, and the old
        # attempt's cleanup must not drop the new attempt's entry.
        self.active: dict[str, asyncio.Task[None]] = {}
        self.held: dict[str, str] = {}  # lease token -> run id, of the runs in ``active``
        self.slot_free = asyncio.Event()
        self.backoff = BackoffPolicy(base_s=1.0, cap_s=30.0)
        self.loop_task = asyncio.get_running_loop().create_task(self._claim_loop())

    async def run(
        self, name: str, task_input: dict[str, Any], share: Share | None = None
    ) -> dict[str, Any] | PromptfleetError:
        """The synchronous path: execute now, return the result or the error (as a value)."""
        try:
            return await self.executor.execute(name, task_input, share)
        except PromptfleetError as exc:
            return exc

    async def _claim_loop(self) -> None:
        while True:
            try:
                free = self.config.runner_concurrency - len(self.active)
                if free <= 0:
                    self.slot_free.clear()
                    await self.slot_free.wait()
                    continue
                runs: list[RunRecord] = await self.store.claim.remote(self.worker_id, free, 10.0)
                for run in runs:
                    assert run.lease_token is not None
                    self.held[run.lease_token] = run.id
                    self.active[run.lease_token] = asyncio.create_task(self._execute(run))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store is restarting or unreachable: keep trying, gently.
                logger.exception("claim failed; retrying")
                await asyncio.sleep(1.0)

    async def _execute(self, run: RunRecord) -> None:
        assert run.lease_token is not None
        token = run.lease_token
        # An async run counts against its owner's fair share of the model, at the background share.
        share = Share(tenant=run.owner, weight=None, background=True)
        work = asyncio.create_task(self.executor.execute(run.task, run.input, share))
        renewer = asyncio.create_task(self._renew(run.id, token, work))
        try:
            try:
                result = await work
            except asyncio.CancelledError:
                return  # lease lost or run cancelled: whoever holds it now finishes it
            except TRANSIENT as exc:
                if run.attempt < self.config.max_run_starts:
                    await asyncio.sleep(self.backoff.delay(run.attempt, exc.retry_after))
                    await self.store.release.remote(run.id, token)
                else:
                    await self.store.fail.remote(run.id, token, exc.to_body()["error"], None)
                return
            except PromptfleetError as exc:
                await self.store.fail.remote(run.id, token, exc.to_body()["error"], None)
                return
            except Exception:
                logger.exception("run %s failed unexpectedly", run.id)
                error = PromptfleetError("Internal error while running the task.").to_body()["error"]
                await self.store.fail.remote(run.id, token, error, None)
                return
            usage = result.pop("usage")
            await self.store.complete.remote(run.id, token, result, usage, run.owner)
        finally:
            renewer.cancel()
            self.active.pop(token, None)
            self.held.pop(token, None)
            self.slot_free.set()

    async def _renew(self, run_id: str, token: str, work: asyncio.Task[Any]) -> None:
        while not work.done():
            await asyncio.sleep(self.config.lease_s / 3)
            with contextlib.suppress(Exception):
                if not await self.store.renew.remote(run_id, token):
                    # Cancelled by its owner, or the lease was lost to another runner.
                    work.cancel()
                    return

    async def __del__(self) -> None:
        """Serve stops this replica (scale-down, redeploy, shutdown): hand its runs back at once,
        instead of leaving them to wait out their leases (``lease_s``) on a runner that is gone."""
        self.loop_task.cancel()
        held = list(self.held.items())
        for task in list(self.active.values()):
            task.cancel()
        # A run that finished meanwhile is no longer ours to release: the store ignores the token.
        await asyncio.gather(
            *(self.store.release.remote(run_id, token) for token, run_id in held), return_exceptions=True
        )
