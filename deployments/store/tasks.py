"""Task versions: every version of every task ever deployed or pushed, and which one is active.

In the TaskStore's database (SQLite or PostgreSQL; pure, no Ray). A *version* is immutable: the
task's definition (canonical JSON), the file text it came from, its content hash, who made it
(the key id of the pusher, ``admin``, or ``deploy``) and when. Versions count 1, 2, 3, … per
task. One version per task is *active*: the one new runs get. Every change of an active version
(seed at deploy, push, rollback) is a row of ``task_activations`` and bumps the one-row
``task_catalogue`` version, so Gateway and TaskRunner replicas ask "did the catalogue change?"
with one primary-key read (the pattern of ``key_version`` in ``keys.py``).

Catalogue pages (``changes``): each activation row records the catalogue version it made, so the
catalogue *as of* any version V is, per task, its latest activation at or below V — history is
append-only and versions are immutable, so a page read while others push still describes exactly
V. A replica at version S asks for the tasks changed in (S, V] (every task when it has none), in
pages of at most ``PAGE_COUNT`` tasks and ``PAGE_BYTES`` of definitions (a page holds at least one
task; a definition is at most ``tasks.max_definition_bytes``), ordered by name, each page naming
the V it belongs to and where the next one starts. No call carries the whole catalogue.

Content hash: SHA-256 of the canonical JSON of the parsed definition (``core.taskfile``), so
comments and formatting do not make a new version; pushing what is already active changes
nothing.

Deploy seeding (``seed``): the files of ``tasks.definitions_dir`` are compared with the file text
*the last deploy* saw (``task_active.deployed_hash``), not with the active version. A redeploy with
unchanged files therefore leaves pushed versions active; a file that changed since the last deploy
becomes a new active version (unless it equals the active one). A task that only exists by push
stays in the catalogue.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from deployments.errors import Conflict, NotFound
from deployments.store.database import Database, Location, Row, Tx
from deployments.store.migrations import DatabaseBacked

__all__ = [
    "MAX_PUSH_BYTES",
    "PAGE_BYTES",
    "PAGE_COUNT",
    "CatalogueEntry",
    "CataloguePage",
    "TaskActivation",
    "TaskVersion",
    "TaskVersionStore",
    "VersionInput",
]

DEPLOY_AUTHOR = "deploy"
# Far below Ray's message limit (gRPC's 4 MiB default, and the object store's per-call overhead):
# a full load of a 50 MB catalogue is ~50 calls, a push's delta usually one.
PAGE_BYTES = 1024 * 1024
PAGE_COUNT = 256
# One push is one call to the store (one transaction): its definitions and file texts together. Room
# for the largest definition (tasks.max_definition_bytes <= 2 MiB) and its file (<= 200 kB).
MAX_PUSH_BYTES = 3 * 1024 * 1024
_TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # TaskDefinition.name: anything else names no task


@dataclass(frozen=True)
class VersionInput:
    """A definition to store: its name, canonical JSON, hash and file text (``core.taskfile``)."""

    name: str
    definition: str
    content_hash: str
    source: str


@dataclass(frozen=True)
class TaskVersion:
    name: str
    version: int
    content_hash: str
    definition: dict[str, Any]
    source: str
    author: str
    created_at: float
    active: bool = False


@dataclass(frozen=True)
class TaskActivation:
    name: str
    version: int
    action: str
    actor: str
    at: float


@dataclass(frozen=True)
class CatalogueEntry:
    """One task of a catalogue page: its active version and definition (canonical JSON text)."""

    name: str
    version: int
    content_hash: str
    definition: str


@dataclass(frozen=True)
class CataloguePage:
    """Part of the change from the caller's catalogue version to ``version`` (see ``changes``).

    ``full``: the entries (with the other pages of ``version``) are the whole catalogue, to replace
    the caller's (it had none, or the store is behind it); else they update it. ``after``: pass it
    to get the next page of the same ``version``; None on the last page."""

    version: int
    entries: list[CatalogueEntry]
    after: str | None
    full: bool


_VERSION_COLUMNS = "v.name, v.version, v.content_hash, v.definition, v.source, v.author, v.created_at"


def _version(row: Row, active: bool = False) -> TaskVersion:
    return TaskVersion(
        name=row["name"], version=int(row["version"]), content_hash=row["content_hash"],
        definition=json.loads(row["definition"]), source=row["source"], author=row["author"],
        created_at=float(row["created_at"]), active=active,
    )


def _check_name(name: str, version: int | None = None) -> None:
    if _TASK_NAME.fullmatch(name) is None:
        raise _task_not_found(name, version)


def _task_not_found(name: str, version: int | None = None) -> NotFound:
    what = f"version {version} of task '{name[:64]}'" if version is not None else f"task '{name[:64]}'"
    return NotFound(f"No {what}.", param="version" if version is not None else "task")


class TaskVersionStore(DatabaseBacked):
    """Task versions in the database at ``location``, or in a ``Database`` shared with the other stores."""

    def __init__(self, location: Location | Database) -> None:
        super().__init__(location)
        self._lock_rows = self._db.dialect.lock_rows

    # -- writing -----------------------------------------------------------------------------

    def _active(self, tx: Tx, name: str) -> Row | None:
        return tx.one(
            f"SELECT a.version, a.deployed_hash, v.content_hash FROM task_active a"
            f" JOIN task_versions v ON v.name = a.name AND v.version = a.version WHERE a.name = ?{self._lock_rows}",
            name,
        )

    def _add(self, tx: Tx, item: VersionInput, author: str, now: float) -> int:
        row = tx.one("SELECT MAX(version) AS v FROM task_versions WHERE name = ?", item.name)
        version = int(row["v"] or 0) + 1 if row is not None else 1
        tx.run(
            "INSERT INTO task_versions (name, version, content_hash, definition, source, author, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            item.name, version, item.content_hash, item.definition, item.source, author, now,
        )
        return version

    def _activate(self, tx: Tx, name: str, version: int, action: str, actor: str, now: float,
                  deployed_hash: str | None = None) -> None:
        if deployed_hash is None:
            tx.run(
                "INSERT INTO task_active (name, version) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET version = excluded.version",
                name, version,
            )
        else:
            tx.run(
                "INSERT INTO task_active (name, version, deployed_hash) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET version = excluded.version, deployed_hash = excluded.deployed_hash",
                name, version, deployed_hash,
            )
        tx.run("UPDATE task_catalogue SET version = version + 1 WHERE id = 1")
        row = tx.one("SELECT version FROM task_catalogue WHERE id = 1")
        assert row is not None
        tx.run("INSERT INTO task_activations (name, version, action, actor, at, catalogue_version)"
               " VALUES (?, ?, ?, ?, ?, ?)", name, version, action, actor, now, int(row["version"]))

    def push(self, items: list[VersionInput], author: str, now: float | None = None) -> list[tuple[str, int, bool]]:
        """Store and activate ``items`` together (one transaction: all or none).

        Returns ``(name, active version, changed)`` per item: an item equal to its task's active
        version changes nothing (``changed`` False)."""
        now = time.time() if now is None else now
        results: list[tuple[str, int, bool]] = []
        with self._db.transaction() as tx:
            tx.one(f"SELECT version FROM task_catalogue WHERE id = 1{self._lock_rows}")  # one pusher at a time
            for item in items:
                active = self._active(tx, item.name)
                if active is not None and active["content_hash"] == item.content_hash:
                    results.append((item.name, int(active["version"]), False))
                    continue
                version = self._add(tx, item, author, now)
                self._activate(tx, item.name, version, "push", author, now)
                results.append((item.name, version, True))
        return results

    def seed(self, items: list[VersionInput], now: float | None = None) -> list[tuple[str, int, bool]]:
        """The deploy's task files (see the module docstring): ``(name, active version, changed)``."""
        now = time.time() if now is None else now
        results: list[tuple[str, int, bool]] = []
        with self._db.transaction() as tx:
            tx.one(f"SELECT version FROM task_catalogue WHERE id = 1{self._lock_rows}")
            for item in items:
                active = self._active(tx, item.name)
                if active is not None and active["deployed_hash"] == item.content_hash:
                    results.append((item.name, int(active["version"]), False))  # file unchanged: pushes stand
                    continue
                if active is not None and active["content_hash"] == item.content_hash:
                    tx.run("UPDATE task_active SET deployed_hash = ? WHERE name = ?", item.content_hash, item.name)
                    results.append((item.name, int(active["version"]), False))
                    continue
                version = self._add(tx, item, DEPLOY_AUTHOR, now)
                self._activate(tx, item.name, version, "deploy", DEPLOY_AUTHOR, now, deployed_hash=item.content_hash)
                results.append((item.name, version, True))
        return results

    def rollback(self, name: str, version: int, actor: str, now: float | None = None) -> TaskVersion:
        """Make the stored ``version`` of ``name`` the active one again (no new version)."""
        now = time.time() if now is None else now
        _check_name(name, version)
        with self._db.transaction() as tx:
            tx.one(f"SELECT version FROM task_catalogue WHERE id = 1{self._lock_rows}")
            row = tx.one(f"SELECT {_VERSION_COLUMNS} FROM task_versions v WHERE v.name = ? AND v.version = ?",
                         name, version)
            if row is None:
                raise _task_not_found(name, version)
            active = self._active(tx, name)
            if active is not None and int(active["version"]) == version:
                raise Conflict(f"Version {version} of task '{name[:64]}' is already active.", param="version")
            self._activate(tx, name, version, "rollback", actor, now)
        return _version(row, active=True)

    # -- reading -----------------------------------------------------------------------------

    def catalogue_version(self) -> int:
        with self._db.autocommit() as tx:
            row = tx.one("SELECT version FROM task_catalogue WHERE id = 1")
        assert row is not None
        return int(row["version"])

    def changes(self, since: int | None, version: int | None = None, after: str = "",
                max_bytes: int = PAGE_BYTES, max_count: int = PAGE_COUNT) -> CataloguePage:
        """One page of the change from catalogue version ``since`` (None: none yet) to ``version``
        (None: the current one; then, if that is ``since``, an empty last page from one primary-key
        read), starting after the task named ``after``. See the module docstring."""
        with self._db.autocommit() as tx:
            row = tx.one("SELECT version FROM task_catalogue WHERE id = 1")
            assert row is not None
            current = int(row["version"])
            if version is None:
                version = current
                if since == current:
                    return CataloguePage(version=current, entries=[], after=None, full=False)
            elif version > current:  # the database was replaced under the caller: start again
                version = current
                since, after = None, ""
            full = since is None or since > version  # the store is behind the caller: replace its catalogue
            low = -1 if full else since
            # Per task, its latest activation at or below ``version``, if that is above ``low``.
            rows = tx.rows(
                "SELECT a.name, a.version FROM task_activations a"
                " WHERE a.name > ? AND a.catalogue_version > ? AND a.catalogue_version <= ?"
                " AND NOT EXISTS (SELECT 1 FROM task_activations b WHERE b.name = a.name"
                " AND b.catalogue_version <= ? AND (b.catalogue_version > a.catalogue_version"
                " OR (b.catalogue_version = a.catalogue_version AND b.seq > a.seq)))"
                " ORDER BY a.name LIMIT ?",
                after, low, version, version, max_count + 1,
            )
            entries: list[CatalogueEntry] = []
            size = 0
            for r in rows[:max_count]:
                stored = tx.one("SELECT content_hash, definition FROM task_versions WHERE name = ? AND version = ?",
                                r["name"], r["version"])
                assert stored is not None
                definition: str = stored["definition"]
                size += len(definition.encode())
                if entries and size > max_bytes:
                    break
                entries.append(CatalogueEntry(r["name"], int(r["version"]), stored["content_hash"], definition))
        more = len(entries) < len(rows)
        return CataloguePage(version=version, entries=entries, after=entries[-1].name if more else None, full=full)

    def get(self, name: str, version: int) -> TaskVersion:
        _check_name(name, version)
        with self._db.autocommit() as tx:
            row = tx.one(
                f"SELECT {_VERSION_COLUMNS}, a.version AS active_version FROM task_versions v"
                " LEFT JOIN task_active a ON a.name = v.name WHERE v.name = ? AND v.version = ?",
                name, version,
            )
        if row is None:
            raise _task_not_found(name, version)
        return _version(row, active=row["active_version"] == version)

    def history(self, name: str) -> tuple[list[TaskVersion], list[TaskActivation]]:
        """Every version of ``name`` (newest first, the active one marked; definitions and sources left
        empty: ``get`` has them) and every activation."""
        _check_name(name)
        with self._db.transaction() as tx:
            active = tx.one("SELECT version FROM task_active WHERE name = ?", name)
            # Without definitions and file texts: a long history of large files must not make one huge reply.
            rows = tx.rows("SELECT v.name, v.version, v.content_hash, '{}' AS definition, '' AS source, v.author,"
                           " v.created_at FROM task_versions v WHERE v.name = ? ORDER BY v.version DESC", name)
            events = tx.rows("SELECT name, version, action, actor, at FROM task_activations WHERE name = ?"
                             " ORDER BY seq DESC", name)
        if not rows:
            raise _task_not_found(name)
        current = int(active["version"]) if active is not None else None
        return (
            [_version(r, active=int(r["version"]) == current) for r in rows],
            [TaskActivation(name=e["name"], version=int(e["version"]), action=e["action"], actor=e["actor"],
                            at=float(e["at"])) for e in events],
        )
