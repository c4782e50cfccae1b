"""The TaskRunner's synchronous runs: ``RunnerClient``.

Used by ``POST /v1/tasks/{name}/run`` (``gateway.task_routes``) and by batch jobs' task lines
(``jobs.batch``): both go through this one client, so a runner that is at capacity or dies
mid-run is the same answer on both — ``Overloaded`` (503, Retry-After) naming the task runner
(``clients.failures``), which a client or the batch job tries again. A run's own failure (bad
output, a model error) comes back as the error the run ended with.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.clients.base import HandleClient
from deployments.errors import PromptfleetError
from deployments.schemas import CatalogueStatus

logger = logging.getLogger("ray.serve")


class RunnerClient(HandleClient):
    who = "The task runner"

    async def run(
        self, task: str, task_input: dict[str, Any], *, payer: str | None, background: bool = False,
        version: int | None = None, model: str | None = None, request_id: str | None = None,
    ) -> dict[str, Any]:
        """Execute ``version`` of ``task`` (None: the runner's active one) now, billed to the key
        ``payer``; the result (``TaskResult``'s fields), or the run's error raised. ``background``:
        behind the payer's interactive calls (batch lines); ``model``: on another model;
        ``request_id``: the id its model calls go by (None: the calling request's)."""
        result = await self._answer(
            self.handle.run.remote(task, task_input, payer, background, version, model, request_id))
        if not isinstance(result, dict):
            logger.error("the task runner answered an unexpected %s", type(result).__name__)
            raise PromptfleetError("Internal error.")
        return result

    async def catalogue_status(self) -> tuple[str, CatalogueStatus]:
        """The answering replica's id and the task catalogue it holds."""
        status: tuple[str, CatalogueStatus] = await self._answer(self.handle.catalogue_status.remote())
        return status

    async def keyless_owner(self) -> str | None:
        """Whom the app records keyless calls under: ``anonymous`` with authentication off, None
        (not recorded) with it on. A batch job's keyless lines follow the same rule."""
        owner: str | None = await self._answer(self.handle.keyless_owner.remote())
        return owner
