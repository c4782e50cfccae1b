"""The task catalogue of one replica: the active version of every task, kept fresh off the request path.

Used by the Gateway (the catalogue, input checks, the version a submitted run is pinned to) and
the TaskRunner (the definition of the version a run executes). A background loop asks the
TaskStore every ``tasks.catalogue_poll_s`` whether the catalogue changed (``task_snapshot``: one
primary-key read of the catalogue version; the active definitions only when it changed), so a
push or rollback reaches every replica within that period plus one round trip, and a request
never waits for the store. The replica that served a push refreshes at once.

Versions are immutable, so definitions of other versions than the active one (a queued run pinned
before a push) are fetched once from the store and cached. Before the first snapshot has loaded,
requests get 503; if the store cannot be reached later, the last catalogue stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployments.core.replies import unwrap
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import parse_definition
from deployments.errors import Overloaded, TaskNotFound
from deployments.store.tasks import TaskSnapshot, TaskVersion

__all__ = ["ActiveTask", "Catalogue", "CatalogueFollower"]

logger = logging.getLogger("ray.serve")
MAX_CACHED_VERSIONS = 256


@dataclass(frozen=True)
class ActiveTask:
    definition: TaskDefinition
    version: int
    content_hash: str


def _active(stored: TaskVersion) -> ActiveTask:
    source = f"{stored.name} v{stored.version}"
    return ActiveTask(parse_definition(stored.definition, source), stored.version, stored.content_hash)


class Catalogue:
    """Pure: the active tasks as of the last snapshot, and a bounded cache of other versions."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.tasks: dict[str, ActiveTask] = {}
        self.versions: OrderedDict[tuple[str, int], TaskDefinition] = OrderedDict()

    @property
    def loaded(self) -> bool:
        return self.version is not None

    def apply(self, snapshot: TaskSnapshot) -> None:
        if snapshot.active is not None:
            tasks = {}
            for stored in snapshot.active:
                # Parsed only when the catalogue changed: a definition that no longer parses (a newer
                # release's field) keeps its last good version here rather than taking the task away.
                try:
                    tasks[stored.name] = _active(stored)
                except Exception:
                    logger.exception("task %s v%d does not load; keeping the last one", stored.name, stored.version)
                    if stored.name in self.tasks:
                        tasks[stored.name] = self.tasks[stored.name]
            self.tasks = tasks
            for entry in tasks.values():
                self.remember(entry.definition.name, entry.version, entry.definition)
        self.version = snapshot.version

    def remember(self, name: str, version: int, definition: TaskDefinition) -> None:
        self.versions[(name, version)] = definition
        self.versions.move_to_end((name, version))
        while len(self.versions) > MAX_CACHED_VERSIONS:
            self.versions.popitem(last=False)

    def get(self, name: str) -> ActiveTask:
        entry = self.tasks.get(name)
        if entry is None:
            raise TaskNotFound(f"The task '{name[:64]}' does not exist.", param="task")
        return entry


class CatalogueFollower:
    """A ``Catalogue`` kept fresh from the TaskStore (see the module docstring)."""

    def __init__(self, snapshot: Callable[[int | None], Any], fetch: Callable[[str, int], Any],
                 poll_s: float) -> None:
        # ``snapshot``/``fetch``: the TaskStore handle's ``task_snapshot.remote``/``task_version.remote``.
        self.snapshot, self.fetch, self.poll_s = snapshot, fetch, poll_s
        self.catalogue = Catalogue()
        self.loop: asyncio.Task[None] | None = None
        self.refreshing: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop

    async def _follow(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not refresh the task catalogue; keeping the last one", exc_info=True)
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> None:
        """Ask the store now (concurrent callers share one call)."""
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self.refreshing)

    async def _refresh(self) -> None:
        snapshot: TaskSnapshot = unwrap(await self.snapshot(self.catalogue.version))
        self.catalogue.apply(snapshot)

    async def ready(self) -> Catalogue:
        """The catalogue, loading it first if this replica has none yet (503 if the store is away)."""
        if not self.catalogue.loaded:
            try:
                await self.refresh()
            except Exception:
                logger.warning("could not load the task catalogue", exc_info=True)
            if not self.catalogue.loaded:
                raise Overloaded("The task catalogue is not loaded yet; retry shortly.", retry_after=1)
        return self.catalogue

    async def active(self, name: str) -> ActiveTask:
        return (await self.ready()).get(name)

    async def definition(self, name: str, version: int | None) -> tuple[TaskDefinition, int]:
        """The definition of ``version`` of ``name`` (the active one if None) and its version number."""
        catalogue = await self.ready()
        if version is None:
            entry = catalogue.get(name)
            return entry.definition, entry.version
        cached = catalogue.versions.get((name, version))
        if cached is None:
            stored: TaskVersion = unwrap(await self.fetch(name, version))
            cached = parse_definition(stored.definition, f"{name} v{version}")
            catalogue.remember(name, version, cached)
        return cached, version
