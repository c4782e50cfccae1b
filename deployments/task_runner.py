"""TaskRunner: executes prompt tasks — synchronously for the Gateway, and from the durable queue.

Serves: ``run(task, input)`` (the synchronous API; nothing is stored), ``keyless_owner()`` (whom
calls without a key are recorded for: batch drivers record theirs the same way), and, in
the background of every replica, a ``RunLoop`` that leases queued runs from the
TaskStore and executes them.
Calls: the task's model, then its fallbacks, through the one model call path
(``deployments.model_calls``), metered to the run's key (the ``RateLimiter`` for its rpm/tpm,
the ``TaskStore`` for its budget and usage): an upstream model from this process, a local one
through its ``ModelWorker`` handle (``deployments.direct_transport``); and the ``TaskStore``
(its runners' side: ``clients.runs.LeasesClient``).
Owns: the runs it currently holds a lease on, a provider per upstream model (connection pool,
circuit breaker), and its copy of the task catalogue
(``deployments.catalogue``: followed from the TaskStore by a long poll, so a push reaches it at
once; a queued run executes the version it was pinned to at submit). A replica that dies simply
stops renewing; its leases expire and the runs are queued again (at-least-once
model calls; the store accepts one result per run, from the current lease).

A thin shell: executing one task is ``deployments.task_executor.TaskExecutor``'s
job; claiming, slots, lease renewal and hand-back are ``deployments.core.runloop``'s.
This class only wires them to the handles, starts the loop and stops it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.catalogue import CatalogueFollower
from deployments.clients.keys import KeysClient
from deployments.clients.runs import LeasesClient
from deployments.clients.task_versions import TaskVersionsClient
from deployments.collector import raise_first_generation
from deployments.config import AdmissionConfig, LogsConfig, MetricsConfig, ModelConfig, TasksConfig
from deployments.core.prompting import TemplateRenderer
from deployments.core.replies import Reply, replying
from deployments.core.runloop import RunLoop
from deployments.direct_transport import DirectTransport
from deployments.errors import PromptfleetError
from deployments.limits.metering import Meter
from deployments.logs import watch_serve_log
from deployments.model_calls import HandleTransport, ModelCalls
from deployments.schemas import CatalogueStatus
from deployments.task_executor import TaskExecutor
from deployments.telemetry import RUNNER_METRICS, UPSTREAM_WORKER_METRICS, metrics_for

logger = logging.getLogger("ray.serve")


def is_transient(exc: BaseException) -> bool:
    """A failure of the model side rather than of the task: retry the run later."""
    return isinstance(exc, PromptfleetError) and exc.transient


class TaskRunner:
    # async: Serve runs an async constructor on the replica's event loop, which the run loop needs.
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        workers: dict[str, DeploymentHandle],
        store: DeploymentHandle,
        config: TasksConfig,
        models: list[ModelConfig] | None = None,
        limiter: DeploymentHandle | None = None,
        admission: AdmissionConfig | None = None,
        metrics: MetricsConfig | None = None,
        anonymous: str | None = None,
        logs: LogsConfig | None = None,
    ) -> None:
        watch_serve_log()
        raise_first_generation()
        # ``anonymous``: record runs without a key under this owner (authentication off).
        self.meter = Meter(KeysClient(store), limiter, admission, anonymous=anonymous) if limiter is not None else None
        versions = TaskVersionsClient(store)
        self.tasks = CatalogueFollower(versions.changes, versions.version, config.catalogue_poll_s,
                                       wait=versions.wait_changed)
        self.tasks.start()
        recorder = metrics_for(metrics)
        recorder.declare(*RUNNER_METRICS, *UPSTREAM_WORKER_METRICS)
        # Upstream models are called from here, as from the Gateway (deployments.direct_transport):
        # a run's call skips the worker's process; local models go through their workers.
        self.transport = DirectTransport.for_upstreams(models or [], HandleTransport(workers), limiter, recorder, logs)
        calls = ModelCalls(models or [], self.transport, self.meter, recorder)
        self.executor = TaskExecutor(self.tasks, calls, TemplateRenderer(config.render_limits()))
        self.loop = RunLoop(
            LeasesClient(store),  # the TaskStore's lease lane
            self.executor,
            worker_id=f"runner-{uuid.uuid4().hex[:12]}",
            slots=config.runner_concurrency,
            lease_s=config.lease_s,
            max_starts=config.max_run_starts,
            transient=is_transient,
        )
        self.loop.start()

    async def run(
        self, name: str, task_input: dict[str, Any], payer: str | None = None, background: bool = False,
        version: int | None = None, model: str | None = None, request_id: str | None = None,
    ) -> Reply[dict[str, Any]]:
        """The synchronous path: execute ``version`` (the one the Gateway checked the input against;
        None: this replica's active one) now, billed to the key ``payer``; return the result or the
        error (as a value). The payer's rate limit paces the calls within the task's timeout;
        ``background`` (batch task lines) puts them behind the payer's interactive calls; ``model``
        runs it on another model (``promptfleet tasks test --model``). ``request_id``: the id the calls
        go by (a batch line's); None: the calling request's."""
        async def execute() -> dict[str, Any]:
            result = await self.executor.execute(
                name, task_input, payer, True, background, version, model, request_id=request_id
            )
            result.pop("messages", None)  # stored for queued runs only; the caller has its answer
            return result

        return await replying(execute())

    async def keyless_owner(self) -> str | None:
        """Whom work without a key is recorded for: ``anonymous`` with authentication off, None with it
        on (the operator's own work, unrecorded). Batch drivers ask, to record their keyless lines as
        this runner records keyless task runs."""
        return self.meter.anonymous if self.meter is not None else None

    async def catalogue_status(self) -> tuple[str, CatalogueStatus]:
        """This replica's id and the task catalogue it holds (operators and tests, through a handle)."""
        return serve.get_replica_context().replica_id.unique_id, self.tasks.status()

    async def __del__(self) -> None:
        """Serve stops this replica (scale-down, redeploy, shutdown): hand its runs back at once,
        instead of leaving them to wait out their leases (``lease_s``) on a runner that is gone."""
        await self.loop.stop()
        await self.tasks.stop()
        await self.transport.close()
        if self.meter is not None:
            await self.meter.close()  # the usage of the calls made so far
