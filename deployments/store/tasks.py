"""Task versions: every version of every task ever deployed or pushed, and which one is active.

In the TaskStore's database (SQLite or PostgreSQL; pure, no Ray). A *version* is immutable: the
task's definition (canonical JSON), the file text it came from, its content hash, who made it
(the key id of the pusher, ``admin``, or ``deploy``) and when. Versions count 1, 2, 3, … per
task. One version per task is *active*: the one new runs get. Every change of an active version
(seed at deploy, push, rollback) is a row of ``task_activations`` and bumps the one-row
``task_catalogue`` version, so Gateway and TaskRunner replicas ask "did the catalogue change?"
with one primary-key read (the pattern of ``key_version`` in ``keys.py``).

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
from deployments.store.database import Database, DatabaseBacked, Dialect, Location, Row, Tx

__all__ = ["TaskActivation", "TaskSnapshot", "TaskVersion", "TaskVersionStore", "VersionInput"]

DEPLOY_AUTHOR = "deploy"
_TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # TaskDefinition.name: anything else names no task


def schema(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS task_versions (
            name          {d.text} NOT NULL,
            version       INTEGER NOT NULL,
            content_hash  {d.text} NOT NULL,          -- sha256 of the canonical JSON definition
            definition    {d.text} NOT NULL,          -- canonical JSON of the parsed definition
            source        {d.text} NOT NULL,          -- the file text as pushed or deployed
            author        {d.text} NOT NULL,          -- key id, 'admin', 'anonymous' or 'deploy'
            created_at    DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (name, version)
        )""",
        f"""CREATE TABLE IF NOT EXISTS task_active (
            name           {d.text} PRIMARY KEY,
            version        INTEGER NOT NULL,
            deployed_hash  {d.text}                   -- content hash of the file the last deploy saw
        )""",
        f"""CREATE TABLE IF NOT EXISTS task_activations (
            seq      {d.serial_key},
            name     {d.text} NOT NULL,
            version  INTEGER NOT NULL,
            action   {d.text} NOT NULL,               -- deploy, push, rollback
            actor    {d.text} NOT NULL,
            at       DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS task_catalogue (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            version  BIGINT NOT NULL
        )""",
    ]


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
class TaskSnapshot:
    """What a replica's catalogue polls for: the active versions unless it has ``version`` already."""

    version: int
    active: list[TaskVersion] | None


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
        super().__init__(location, schema)
        self._lock_rows = self._db.dialect.lock_rows

    def _check_schema(self, tx: Tx) -> None:
        tx.run("INSERT INTO task_catalogue (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")

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
        tx.run("INSERT INTO task_activations (name, version, action, actor, at) VALUES (?, ?, ?, ?, ?)",
               name, version, action, actor, now)
        tx.run("UPDATE task_catalogue SET version = version + 1 WHERE id = 1")

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

    def snapshot(self, known_version: int | None = None) -> TaskSnapshot:
        """The active version of every task, unless the caller has ``known_version`` already."""
        with self._db.transaction() as tx:
            row = tx.one("SELECT version FROM task_catalogue WHERE id = 1")
            assert row is not None
            version = int(row["version"])
            if version == known_version:
                return TaskSnapshot(version=version, active=None)
            rows = tx.rows(
                f"SELECT {_VERSION_COLUMNS} FROM task_active a"
                " JOIN task_versions v ON v.name = a.name AND v.version = a.version ORDER BY v.name"
            )
        return TaskSnapshot(version=version, active=[_version(r, active=True) for r in rows])

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
        """Every version of ``name`` (newest first, the active one marked) and every activation."""
        _check_name(name)
        with self._db.transaction() as tx:
            active = tx.one("SELECT version FROM task_active WHERE name = ?", name)
            rows = tx.rows(f"SELECT {_VERSION_COLUMNS} FROM task_versions v WHERE v.name = ? ORDER BY v.version DESC",
                           name)
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
