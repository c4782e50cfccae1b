"""Task versions, as the TaskStore holds them: ``TaskVersionsClient``.

Used by every replica's task catalogue (``deployments.catalogue``: the pages of a change, a pinned
version's definition) and by the prompt owners' routes (``gateway.prompt_routes``: push, history,
one version, rollback). Ray's failures become ``Overloaded`` naming the task store
(``clients.failures``).
"""

from __future__ import annotations

from deployments.clients.base import HandleClient
from deployments.clients.runs import STORE
from deployments.store.tasks import CataloguePage, TaskActivation, TaskVersion, VersionInput


class TaskVersionsClient(HandleClient):
    who = STORE

    async def changes(self, since: int | None, version: int | None, after: str) -> CataloguePage:
        """One bounded page of the catalogue's change from ``since`` to ``version`` (None: the current)."""
        page: CataloguePage = await self._answer(self.handle.task_changes.remote(since, version, after))
        return page

    async def wait_changed(self, since: int | None, wait_s: float) -> int:
        """The catalogue's version once it is not ``since``, or ``since`` after ``wait_s`` (a long poll)."""
        version: int = await self._answer(self.handle.task_changes_wait.remote(since, wait_s))
        return version

    async def version(self, name: str, version: int) -> TaskVersion:
        stored: TaskVersion = await self._answer(self.handle.task_version.remote(name, version))
        return stored

    async def push(self, items: list[VersionInput], *, author: str) -> list[tuple[str, int, bool]]:
        """Store and activate checked definitions, all or none: ``(name, active version, changed)``."""
        pushed: list[tuple[str, int, bool]] = await self._answer(self.handle.push_tasks.remote(items, author))
        return pushed

    async def rollback(self, name: str, *, version: int, actor: str) -> TaskVersion:
        """Make the stored ``version`` of ``name`` active again."""
        active: TaskVersion = await self._answer(self.handle.rollback_task.remote(name, version, actor))
        return active

    async def history(self, name: str) -> tuple[list[TaskVersion], list[TaskActivation]]:
        """Every stored version of ``name``, and each time one was made active."""
        history: tuple[list[TaskVersion], list[TaskActivation]] = await self._answer(
            self.handle.task_history.remote(name))
        return history
