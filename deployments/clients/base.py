"""What every typed client is: one deployment's handle, and who to name when a call to it fails."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.clients.failures import answer


class HandleClient:
    """A typed face on ``handle``. Subclasses add one method per call they make; each sends its
    arguments to the shell's method of the same meaning and awaits ``_answer``, which maps Ray's
    failures (``deployments.clients.failures``) and raises an error value."""

    who: str = "A deployment"  # the subject of its 503s: "The task store is at capacity; …"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _answer(self, response: Awaitable[Any]) -> Any:
        return await answer(response, self.who)
