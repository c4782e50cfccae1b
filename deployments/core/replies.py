"""The one convention for errors across ``DeploymentHandle`` calls: expected errors are values.

Every deployment shell (ModelWorker, TaskRunner, TaskStore, BatchService) *returns* an expected
failure — a ``PromptfleetError`` such as 404, 409 or 503 — instead of raising it. A raised one
would reach the caller as a ``RayTaskError`` hybrid carrying a formatted traceback of another
process, and be logged as a replica failure; a returned one is a small pickle. The caller's
typed client (``deployments.clients``) turns it back into an exception with ``unwrap``, so it
reaches the routes as HTTP and the TaskRunner's run loop as a decision. Anything unexpected
still raises.

    shell:   async def get(...) -> Reply[RunView]:  return await replying(self._get, ...)
    client:  return unwrap(await self.handle.get.remote(...))   (``clients.failures.answer``)
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeAlias, TypeVar

from deployments.errors import PromptfleetError

__all__ = ["Reply", "replying", "unwrap"]

T = TypeVar("T")

Reply: TypeAlias = T | PromptfleetError
"""What a shell's handle method returns: its result, or the expected error as a value."""


def unwrap(reply: T | PromptfleetError) -> T:
    """The result of a handle call; an error value is raised here, on the caller's side."""
    if isinstance(reply, PromptfleetError):
        raise reply
    return reply


async def replying(call: Awaitable[T]) -> T | PromptfleetError:
    """Await ``call`` in a shell; an expected error becomes the return value."""
    try:
        return await call
    except PromptfleetError as exc:
        return exc
