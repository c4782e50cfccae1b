"""TaskStore: the durable record of async task runs, in one SQLite file.

Serves the TaskStore actor (a thin Ray shell around this class: one instance, one owner of the
file). The Gateway creates, reads, lists and cancels runs through it; workers claim runs under a
lease, renew the lease, and complete, fail or release them. Calls nothing; owns the database.

Durability contract (DESIGN.md): ``create_run`` has committed with ``synchronous=FULL`` (WAL
fsynced) before it returns, so the 202 the Gateway sends afterwards is never a lie. Work runs
under a lease; an expired lease puts the run back in the queue at the next ``claim``. The model
call is at-least-once; the visible result is exactly-once: only the holder of the current
``lease_token`` of a ``running`` run can write a result, and the first write ends the lease.

Every status change goes through ``runstate.transition``. All times are ``now`` arguments
(seconds since the epoch, default ``time.time()``) so tests drive the clock. Methods are
synchronous and may block on fsync: call them from a sync actor or a thread, not an event loop.
The API-key and batch tables will live here too (that is what ``schema_version`` is for).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.errors import Conflict, InvalidRequest, RunNotFound
from deployments.runstate import TERMINAL, RunEvent, RunState, RunStatus, transition

__all__ = ["SCHEMA_VERSION", "RunRecord", "TaskStore"]

SCHEMA_VERSION = 1
MAX_LIST_LIMIT = 1000

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order (ids are random)
        id               TEXT NOT NULL UNIQUE,
        task             TEXT NOT NULL,
        owner            TEXT NOT NULL,
        status           TEXT NOT NULL CHECK (status IN
                             ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        input            TEXT NOT NULL,   -- JSON
        request_hash     TEXT NOT NULL,   -- sha256 of canonical JSON of (task, input)
        idempotency_key  TEXT,
        result           TEXT,            -- JSON
        error            TEXT,            -- JSON: the client-safe error object
        usage            TEXT,            -- JSON
        attempt          INTEGER NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL,
        updated_at       REAL NOT NULL,
        lease_token      TEXT,
        lease_expires_at REAL,
        worker_id        TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency ON runs (owner, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, seq)",
    "CREATE INDEX IF NOT EXISTS runs_by_owner ON runs (owner, created_at, id)",
]

_COLUMNS = (
    "id, task, owner, status, input, result, error, usage, attempt, created_at, started_at,"
    " finished_at, updated_at, lease_token, lease_expires_at, idempotency_key, worker_id"
)
_JSON_COLUMNS = ("input", "result", "error", "usage")
_STATUSES = frozenset(s.value for s in RunStatus)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as stored. ``lease_token`` is internal: never show it to a client."""

    id: str
    task: str
    owner: str
    status: RunStatus
    input: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    lease_token: str | None
    lease_expires_at: float | None
    idempotency_key: str | None
    worker_id: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _record(row: sqlite3.Row) -> RunRecord:
    values = {k: row[k] for k in row.keys()}
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    values["status"] = RunStatus(values["status"])
    return RunRecord(**values)


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN/Infinity are not JSON and would break clients reading results.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _encode_cursor(created_at: float, run_id: str) -> str:
    raw = json.dumps([created_at, run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        if isinstance(created_at, (int, float)) and isinstance(run_id, str):
            return float(created_at), run_id
    except (ValueError, TypeError):
        pass
    raise InvalidRequest("Invalid pagination cursor.", param="cursor")


class TaskStore:
    """Durable run records in SQLite (WAL, ``synchronous=FULL``), one connection, one owner.

    ``max_attempts_total`` bounds starts per run: a run whose lease is lost (expiry, or a whole
    cluster restart) after that many starts is failed with code ``lease_expired`` instead of
    being requeued, so a run that kills its worker cannot loop forever.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_attempts_total: int = 5) -> None:
        if max_attempts_total < 1:
            raise ValueError("max_attempts_total must be >= 1")
        self.max_attempts_total = max_attempts_total
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves. check_same_thread off
        # so an actor may call from a worker thread; the lock serializes all access.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL may lose the last commits on power loss; FULL fsyncs the WAL at every commit,
        # which is what "in the store before the client hears 202" needs.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {version} is newer than {SCHEMA_VERSION}")
            # version < SCHEMA_VERSION: migrations go here once there is a version 2.

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so read-then-write is atomic.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _load(conn: sqlite3.Connection, run_id: str, owner: str | None = None) -> RunRecord:
        sql, args = f"SELECT {_COLUMNS} FROM runs WHERE id = ?", [run_id]
        if owner is not None:
            sql, args = sql + " AND owner = ?", [run_id, owner]
        row = conn.execute(sql, args).fetchone()
        if row is None:
            # Same answer for "no such run" and "someone else's run": ids cannot be probed.
            raise RunNotFound(f"No run with id '{run_id[:100]}'.")
        return _record(row)

    @staticmethod
    def _move(conn: sqlite3.Connection, run: RunRecord, event: RunEvent, now: float, **values: Any) -> None:
        """Apply ``event`` to ``run`` (checked by the state machine) and write ``values`` too."""
        new = transition(RunState(run.status, run.attempt), event)
        values.update(status=new.status.value, attempt=new.attempt, updated_at=now)
        if new.status is not RunStatus.RUNNING:  # a lease only exists while running
            values.update(lease_token=None, lease_expires_at=None)
        if new.terminal:
            values["finished_at"] = now
        # Column names come from this module only, never from callers' data.
        assignments = ", ".join(f"{column} = ?" for column in values)
        conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run.id))

    # -- the Gateway's side ---------------------------------------------------------------

    def create_run(
        self,
        *,
        task: str,
        input: dict[str, Any],
        owner: str,
        idempotency_key: str | None,
        now: float | None = None,
    ) -> tuple[RunRecord, bool]:
        """Queue a new run, committed durably before returning; returns ``(run, created)``.

        With an ``idempotency_key`` (scoped per owner, kept forever), a repeat of the same
        (task, input) returns the existing run with ``created=False``; a different body raises
        ``Conflict(param="Idempotency-Key")``.
        """
        now = _now(now)
        try:
            input_json = _dumps(input)
            request_hash = hashlib.sha256(_dumps([task, input]).encode()).hexdigest()
        except (TypeError, ValueError):
            raise InvalidRequest("Task input must be JSON (no NaN or Infinity).", param="input") from None
        with self._tx() as conn:
            if idempotency_key is not None:
                existing = conn.execute(
                    "SELECT id, request_hash FROM runs WHERE owner = ? AND idempotency_key = ?",
                    (owner, idempotency_key),
                ).fetchone()
                if existing is not None:
                    if existing["request_hash"] != request_hash:
                        raise Conflict(
                            "This Idempotency-Key was already used with a different request.",
                            param="Idempotency-Key",
                        )
                    return self._load(conn, existing["id"]), False
            run_id = "run_" + secrets.token_hex(12)
            conn.execute(
                "INSERT INTO runs (id, task, owner, status, input, request_hash, idempotency_key,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    task,
                    owner,
                    RunStatus.QUEUED.value,
                    input_json,
                    request_hash,
                    idempotency_key,
                    now,
                    now,
                ),
            )
            return self._load(conn, run_id), True

    def get(self, run_id: str, owner: str) -> RunRecord:
        """The run, if ``owner`` owns it; otherwise ``RunNotFound``."""
        with self._lock:
            return self._load(self._conn, run_id, owner)

    def cancel(self, run_id: str, owner: str, now: float | None = None) -> RunRecord:
        """Cancel a queued or running run; a finished run is returned unchanged.

        A running run loses its lease at once, so its worker's ``renew`` and ``complete``
        return False from now on (that is how the worker learns to stop).
        """
        now = _now(now)
        with self._tx() as conn:
            run = self._load(conn, run_id, owner)
            if run.terminal:
                return run
            self._move(conn, run, RunEvent.CANCEL, now)
            return self._load(conn, run_id)

    def list_runs(
        self,
        owner: str,
        status: str | None = None,
        task: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """``owner``'s runs, newest first, and the cursor of the next page (None at the end).

        Keyset pagination on (created_at, id): runs created while paging never shift a page.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
        where: list[str] = ["owner = ?"]
        args: list[Any] = [owner]
        if status is not None:
            if status not in _STATUSES:
                raise InvalidRequest(f"Unknown run status '{status[:50]}'.", param="status")
            where.append("status = ?")
            args.append(status)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if cursor is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(_decode_cursor(cursor))
        sql = (
            f"SELECT {_COLUMNS} FROM runs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, (*args, limit + 1)).fetchall()
        records = [_record(r) for r in rows[:limit]]
        more = len(rows) > limit
        return records, (_encode_cursor(records[-1].created_at, records[-1].id) if more else None)

    def count_queued(self) -> int:
        """Runs waiting for a worker (the Gateway's backpressure signal)."""
        with self._lock:
            count: int = self._conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'queued'").fetchone()[0]
            return count

    # -- the workers' side ----------------------------------------------------------------

    def _interrupt(self, conn: sqlite3.Connection, run: RunRecord, now: float) -> bool:
        """``run`` lost its worker: requeue it (True), or fail it (False) if out of starts."""
        if run.attempt < self.max_attempts_total:
            self._move(conn, run, RunEvent.REQUEUE, now)
            return True
        error = {
            "message": f"The run was interrupted {run.attempt} times (worker lost or timed out) "
            "and will not be retried.",
            "type": "task_error",
            "param": None,
            "code": "lease_expired",
        }
        self._move(conn, run, RunEvent.FAIL, now, error=_dumps(error))
        return False

    def _running(self, conn: sqlite3.Connection, condition: str = "", *args: Any) -> list[RunRecord]:
        sql = f"SELECT {_COLUMNS} FROM runs WHERE status = 'running' {condition} ORDER BY seq"
        return [_record(row) for row in conn.execute(sql, args).fetchall()]

    def claim(
        self, *, worker_id: str, lease_s: float, now: float | None = None, limit: int = 1
    ) -> list[RunRecord]:
        """Lease up to ``limit`` of the oldest queued runs to ``worker_id`` for ``lease_s``.

        First requeues (or fails, see the class docstring) running runs whose lease expired.
        Each claimed run is ``running`` with ``attempt + 1`` and a fresh ``lease_token`` that
        the worker must present to ``renew``/``complete``/``fail``/``release``.
        """
        if lease_s <= 0 or limit < 1:
            raise ValueError("lease_s must be > 0 and limit >= 1")
        now = _now(now)
        with self._tx() as conn:
            for run in self._running(conn, "AND lease_expires_at <= ?", now):
                self._interrupt(conn, run, now)
            queued = conn.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE status = 'queued' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            for row in queued:
                self._move(
                    conn,
                    _record(row),
                    RunEvent.START,
                    now,
                    lease_token=secrets.token_hex(16),
                    lease_expires_at=now + lease_s,
                    worker_id=worker_id,
                    started_at=row["started_at"] if row["started_at"] is not None else now,
                )
            return [self._load(conn, row["id"]) for row in queued]

    def renew(self, run_id: str, lease_token: str, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease; False if it is no longer ours (requeued, cancelled, finished).

        A lease past its expiry that nobody has reclaimed yet is still ours: no one else can
        have started the run, so continuing is safe and saves a duplicate call.
        """
        now = _now(now)
        with self._lock:
            cur = self._conn.execute(
                "UPDATE runs SET lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND status = 'running' AND lease_token = ?",
                (now + lease_s, now, run_id, lease_token),
            )
            return cur.rowcount == 1

    def _finish(self, run_id: str, lease_token: str, event: RunEvent, now: float, **values: Any) -> bool:
        with self._tx() as conn:
            try:
                run = self._load(conn, run_id)
            except RunNotFound:
                return False
            # Only the current lease holder of a running run writes: stale attempts (requeued,
            # reclaimed by someone else, cancelled, already finished) change nothing.
            if run.status is not RunStatus.RUNNING or run.lease_token != lease_token:
                return False
            self._move(conn, run, event, now, **values)
            return True

    def complete(
        self, run_id: str, lease_token: str, *, result: Any, usage: dict[str, Any], now: float | None = None
    ) -> bool:
        """Store the validated result: True if this call won, False if the lease was stale."""
        return self._finish(
            run_id, lease_token, RunEvent.SUCCEED, _now(now), result=_dumps(result), usage=_dumps(usage)
        )

    def fail(
        self,
        run_id: str,
        lease_token: str,
        *,
        error: dict[str, Any],
        usage: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        """Fail the run with a client-safe ``error`` object ({message, type, param, code, …})."""
        usage_json = None if usage is None else _dumps(usage)
        return self._finish(
            run_id, lease_token, RunEvent.FAIL, _now(now), error=_dumps(error), usage=usage_json
        )

    def release(self, run_id: str, lease_token: str, now: float | None = None) -> bool:
        """Give the run back to the queue (graceful shutdown, retryable failure); keeps attempt."""
        return self._finish(run_id, lease_token, RunEvent.REQUEUE, _now(now))

    def requeue_all_running(self, now: float | None = None) -> int:
        """At startup after a whole-cluster restart: requeue every ``running`` run.

        Their workers are gone. Attempts are kept; a run already at ``max_attempts_total``
        starts is failed with ``lease_expired`` instead. Returns how many were requeued.
        """
        now = _now(now)
        with self._tx() as conn:
            return sum(self._interrupt(conn, run, now) for run in self._running(conn))
