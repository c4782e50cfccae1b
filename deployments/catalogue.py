"""The task catalogue of one replica: the active version of every task, kept fresh off the request path.

Used by the Gateway (the catalogue, input checks, the version a submitted run is pinned to) and
the TaskRunner (the definition of the version a run executes). A background loop asks the
TaskStore what changed since this replica's catalogue version (``task_changes``: one primary-key
read when nothing did). Between changes it waits in a long poll (``task_changes_wait``) that the
store answers as soon as a push or rollback moves the catalogue, and after ``WAIT_S`` at the latest;
after a change, or while the long poll fails (a store of an older release), it asks again
``tasks.catalogue_poll_s`` later. A change comes in pages (at most
``store.tasks.PAGE_COUNT`` tasks and ``PAGE_BYTES`` of definitions each, all of one catalogue
version) and is applied whole once its last page is in, so a replica moves from one consistent
version to the next and never holds half a push; a new replica pages in the whole catalogue the
same way. No call carries the whole catalogue, so a catalogue of any size reaches every replica.
A push or rollback therefore shows on every replica within the store's answer to the long poll
(a second change within ``catalogue_poll_s`` of the first: within that) plus the time to fetch and
parse its pages (milliseconds for a push; seconds for a first load of 50 MB); an idle replica makes
one call every ``WAIT_S``. The replica that served a push refreshes before answering.

Versions are immutable, so definitions of other versions than the active one (a queued run pinned
before a push) are fetched once from the store and cached. Before the first load has finished,
requests get 503. If the store cannot be reached later the last catalogue stays in use, and
``status()`` says how old it is (``/readyz`` of a Gateway turns ``unavailable`` once it is stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import parse_definition, parse_stored
from deployments.errors import Overloaded, TaskNotFound
from deployments.schemas import CatalogueStatus
from deployments.store.tasks import CatalogueEntry, CataloguePage, TaskVersion

__all__ = ["WAIT_S", "ActiveTask", "Catalogue", "CatalogueFollower", "stale_after_s"]

logger = logging.getLogger("ray.serve")
Changes = Callable[[int | None, int | None, str], Awaitable[CataloguePage]]
Fetch = Callable[[str, int], Awaitable[TaskVersion]]
Wait = Callable[[int | None, float], Awaitable[int]]
# The long poll's bound: an answer every WAIT_S proves the store alive and the catalogue current, well
# inside ``stale_after_s`` (30 s + 10 × catalogue_poll_s).
WAIT_S = 20.0
MAX_CACHED_VERSIONS = 256
MAX_PAGES = 100_000  # a change of more pages than this is a store that keeps answering "more": give up on it


def stale_after_s(poll_s: float) -> float:
    """How long without a successful refresh before a replica's catalogue counts as stale."""
    return 30.0 + 10 * poll_s


@dataclass(frozen=True)
class ActiveTask:
    definition: TaskDefinition
    version: int
    content_hash: str


def _parse_page(entries: list[CatalogueEntry]) -> tuple[dict[str, ActiveTask], list[str]]:
    """The page's tasks, and the names of those whose definition does not load here."""
    parsed: dict[str, ActiveTask] = {}
    broken: list[str] = []
    for entry in entries:
        try:
            definition = parse_stored(entry.definition, f"{entry.name} v{entry.version}")
        except Exception:
            logger.exception("task %s v%d does not load; keeping the last one", entry.name, entry.version)
            broken.append(entry.name)
            continue
        parsed[entry.name] = ActiveTask(definition, entry.version, entry.content_hash)
    return parsed, broken


class Catalogue:
    """Pure: the active tasks as of catalogue ``version``, and a bounded cache of other versions."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.tasks: dict[str, ActiveTask] = {}
        self.versions: OrderedDict[tuple[str, int], TaskDefinition] = OrderedDict()

    @property
    def loaded(self) -> bool:
        return self.version is not None

    def apply(self, version: int, changed: dict[str, ActiveTask], full: bool = False,
              broken: tuple[str, ...] = ()) -> None:
        """Move to ``version``: ``changed`` replaces the catalogue (``full``) or updates it. A task in
        ``broken`` (its new definition does not load here, e.g. a newer release's field) keeps its last
        good version rather than being taken away."""
        if full:
            kept = {name: self.tasks[name] for name in broken if name in self.tasks}
            self.tasks = {**kept, **changed}
        else:
            self.tasks = {**self.tasks, **changed}
        for entry in changed.values():
            self.remember(entry.definition.name, entry.version, entry.definition)
        self.version = version

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

    def __init__(self, changes: Changes, fetch: Fetch, poll_s: float, wait: Wait | None = None) -> None:
        # ``changes``/``fetch``/``wait``: ``clients.task_versions.TaskVersionsClient``'s ``changes``/``version``/
        # ``wait_changed``; without ``wait`` the follower polls every ``poll_s``.
        self.changes, self.fetch, self.poll_s, self.wait = changes, fetch, poll_s, wait
        self.wait_failed = False  # the last long poll failed: poll until one answers again
        self.catalogue = Catalogue()
        self.loop: asyncio.Task[None] | None = None
        self.refreshing: asyncio.Task[None] | None = None
        self.refreshed_at: float | None = None  # monotonic time of the last refresh that reached the store
        self.last_error: str | None = None
        self.broken: tuple[str, ...] = ()  # tasks whose active definition does not load on this replica
        self.first_load_s: float | None = None  # how long the first load (every page, parsed) took

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
            if await self._unchanged():
                continue
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not refresh the task catalogue; keeping the last one", exc_info=True)
            await asyncio.sleep(self.poll_s)

    async def _unchanged(self) -> bool:
        """Wait in the store's long poll; True if it answered that nothing changed (this replica is current)."""
        if self.wait is None or not self.catalogue.loaded:
            return False
        since = self.catalogue.version
        try:
            version = await self.wait(since, WAIT_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self.wait_failed:  # once per failing stretch; the poll below keeps the catalogue fresh
                logger.warning("could not long-poll the task catalogue; polling instead", exc_info=True)
            self.wait_failed = True
            return False
        self.wait_failed = False
        if version != since:
            return False
        self.refreshed_at = time.monotonic()
        self.last_error = None
        return True

    async def refresh(self) -> None:
        """Ask the store now (concurrent callers share one call)."""
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self.refreshing)

    async def _refresh(self) -> None:
        try:
            await self._catch_up()
        except Exception as exc:
            self.last_error = type(exc).__name__
            raise
        self.last_error = None
        self.refreshed_at = time.monotonic()

    async def _page(self, since: int | None, version: int | None, after: str) -> CataloguePage:
        return await self.changes(since, version, after)

    async def _catch_up(self) -> None:
        """Fetch every page of the change to the store's current version, then apply it at once."""
        since = self.catalogue.version
        started = time.monotonic()
        page = await self._page(since, None, "")
        if page.version == since and not page.entries:
            return
        target, full = page.version, page.full
        changed: dict[str, ActiveTask] = {}
        broken: list[str] = []
        for _ in range(MAX_PAGES):
            # Parsed in a thread, page by page: a first load of thousands of tasks must not hold the loop.
            parsed, failed = await asyncio.to_thread(_parse_page, page.entries)
            changed.update(parsed)
            broken += failed
            if page.after is None:
                break
            page = await self._page(since, target, page.after)
            if page.version != target or page.full != full:  # the store was replaced meanwhile: next poll
                raise RuntimeError("the task catalogue changed under a paged refresh")
        else:
            raise RuntimeError("the task catalogue did not end within MAX_PAGES pages")
        self.catalogue.apply(target, changed, full, tuple(broken))
        if since is None:
            self.first_load_s = time.monotonic() - started
        if full or broken:
            self.broken = tuple(sorted(set(broken)))
        else:
            self.broken = tuple(n for n in self.broken if n not in changed)
        logger.info("task catalogue at version %d (%d tasks, %d changed)", target, len(self.catalogue.tasks),
                    len(changed))

    def status(self) -> CatalogueStatus:
        """What this replica holds, and whether it is keeping up (``/readyz``, ``catalogue_status``)."""
        age = None if self.refreshed_at is None else time.monotonic() - self.refreshed_at
        stale = age is None or age > stale_after_s(self.poll_s)
        return CatalogueStatus(
            version=self.catalogue.version, tasks=len(self.catalogue.tasks),
            state="loading" if not self.catalogue.loaded else "stale" if stale else "current",
            refreshed_s_ago=None if age is None else round(age, 3), error=self.last_error,
            not_loaded=list(self.broken[:20]),
            first_load_s=None if self.first_load_s is None else round(self.first_load_s, 3),
        )

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
            stored = await self.fetch(name, version)
            cached = parse_definition(stored.definition, f"{name} v{version}")
            catalogue.remember(name, version, cached)
        return cached, version
