"""RunStore: the durable record of async task runs, in SQLite (default) or PostgreSQL.

Serves the TaskStore deployment (``task_store.TaskStore``, a thin shell around this
class). The Gateway creates, reads, lists and cancels runs through it; workers claim runs under
a lease, renew the lease, and complete, fail or release them. Calls nothing; owns the ``runs``
table of its ``Database`` (its shape: ``store.migrations``).

Durability contract (docs/architecture.md, "Durability"): ``create_run`` has committed durably (SQLite: WAL fsynced with
``synchronous=FULL``; PostgreSQL: the server's WAL flush) before it returns, so the 202 the
Gateway sends afterwards is never a lie. Work runs under a lease; an expired lease puts the run
back in the queue at the next ``claim``. The model call is at-least-once; the visible result is
exactly-once: only the holder of the current ``lease_token`` of a ``running`` run can write a
result, and the first write ends the lease. On PostgreSQL several stores may share one
database: each read-then-write locks its rows, and ``claim`` skips rows another claim holds.

Every status change goes through ``runstate.transition``; once its transaction has committed, an
``observer`` (the TaskStore's metrics) is told of it as a ``RunMove``. All times are ``now`` arguments
(seconds since the epoch, default ``time.time()``) so tests drive the clock. Methods are
synchronous and block on the database: call them from a thread, not an event loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from deployments.core.runstate import RunEvent, RunState, RunStatus, transition
from deployments.errors import Conflict, InvalidRequest
from deployments.store.database import Database, Location, Tx
from deployments.store.migrations import DatabaseBacked
from deployments.store.records import (
    COLUMNS,
    JSON_COLUMNS,
    STATUSES,
    RunRecord,
    check_text,
    decode_cursor,
    dumps,
    encode_cursor,
    is_run_id,
    new_run_id,
    now_or,
    record,
    run_not_found,
)

__all__ = ["EXPIRE_STEP", "MAX_LIST_LIMIT", "QueueStats", "RunMove", "RunStore"]

logger = logging.getLogger(__name__)

MAX_LIST_LIMIT = 1000
EXPIRE_STEP = 1000  # rows per retention call: one call holds the database briefly


@dataclass(frozen=True, slots=True)
class RunMove:
    """One status change that has committed (for an ``observer``)."""

    task: str
    event: RunEvent
    status: RunStatus  # the status it led to
    lease_expired: bool = False  # the run lost its worker (expired lease), requeued or failed


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Runs by status (queued, running) and the age of the oldest queued run (0 when none)."""

    by_status: dict[str, int]
    oldest_queued_age_s: float


_WRITTEN_AS_JSON = JSON_COLUMNS | {"messages"}


class RunStore(DatabaseBacked):
    """Durable run records in the database at ``location`` (a SQLite path or a PostgreSQL URL),
    or in a ``Database`` shared with the ``KeyStore``.

    ``max_attempts_total`` bounds starts per run: a run whose lease is lost (expiry, or a whole
    cluster restart) after that many starts is failed with code ``lease_expired`` instead of
    being requeued, so a run that kills its worker cannot loop forever.
    """

    def __init__(
        self,
        location: Location | Database,
        *,
        max_attempts_total: int = 5,
        observer: Callable[[RunMove], None] | None = None,
    ) -> None:
        if max_attempts_total < 1:
            raise ValueError("max_attempts_total must be >= 1")
        self.max_attempts_total = max_attempts_total
        self.observer = observer
        self._moves = threading.local()  # the status changes of the transaction in progress, per thread
        super().__init__(location)
        dialect = self._db.dialect
        self._lock_rows, self._claim_rows = dialect.lock_rows, dialect.claim_rows

    def _load(self, tx: Tx, run_id: str, owner: str | None = None, *, lock: bool = False) -> RunRecord:
        sql, args = f"SELECT {COLUMNS} FROM runs WHERE id = ?", [run_id]
        if owner is not None:
            sql, args = sql + " AND owner = ?", [run_id, owner]
        row = tx.one(sql + (self._lock_rows if lock else ""), *args)
        if row is None:
            raise run_not_found(run_id)
        return record(row)

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        """A transaction whose status changes (``_move``) the observer hears of once it has committed."""
        moves: list[RunMove] = []
        self._moves.pending = moves
        try:
            with self._db.transaction() as tx:
                yield tx
        finally:
            self._moves.pending = None
        if self.observer is not None:
            for move in moves:
                try:
                    self.observer(move)
                except Exception:
                    logger.exception("the run store's observer failed")

    def _move(
        self, tx: Tx, run: RunRecord, event: RunEvent, now: float, lease_expired: bool = False, **changes: Any
    ) -> RunRecord:
        """Apply ``event`` to ``run`` (checked by the state machine), write ``changes`` too, and
        return the record as written (JSON values as given)."""
        new = transition(RunState(run.status, run.attempt), event)
        pending = getattr(self._moves, "pending", None)
        if pending is not None:
            pending.append(RunMove(run.task, event, new.status, lease_expired))
        changes.update(status=new.status, attempt=new.attempt, updated_at=now)
        if new.status is not RunStatus.RUNNING:  # a lease only exists while running
            changes.update(lease_token=None, lease_expires_at=None)
        if new.terminal:
            changes["finished_at"] = now
        columns = {
            column: dumps(value) if column in _WRITTEN_AS_JSON and value is not None else value
            for column, value in changes.items()
        }
        columns["status"] = new.status.value
        # Column names come from this module only, never from callers' data.
        assignments = ", ".join(f"{column} = ?" for column in columns)
        tx.run(f"UPDATE runs SET {assignments} WHERE id = ?", *columns.values(), run.id)
        return dataclasses.replace(run, **changes)

    # -- the Gateway's side ---------------------------------------------------------------

    def create_run(
        self,
        *,
        task: str,
        input: dict[str, Any],
        owner: str,
        idempotency_key: str | None,
        request_id: str | None = None,
        now: float | None = None,
        task_version: int | None = None,
    ) -> tuple[RunRecord, bool]:
        """Queue a new run, committed durably before returning; returns ``(run, created)``.

        ``task_version``: the version of the task the run executes, whatever is active by then.
        ``request_id``: the id of the submitting request; the model calls of every attempt of the
        run go by it, so its log lines carry it. An idempotent repeat keeps the first request's id.

        With an ``idempotency_key`` (scoped per owner, kept forever), a repeat of the same
        (task, input) returns the existing run with ``created=False``; a different body raises
        ``Conflict(param="Idempotency-Key")``.
        """
        now = now_or(now)
        check_text(task, "task")
        if idempotency_key is not None:
            check_text(idempotency_key, "Idempotency-Key")
        try:
            input_json = dumps(input)
            request_hash = hashlib.sha256(dumps([task, input]).encode()).hexdigest()
        except (TypeError, ValueError):  # UnicodeEncodeError (lone surrogates) is a ValueError
            raise InvalidRequest("Task input must be JSON (no NaN or Infinity).", param="input") from None
        run_id = new_run_id()
        with self._db.transaction() as tx:
            # Insert first: of two concurrent creates with one key, the unique index lets one
            # in and makes the other (PostgreSQL: after waiting for it) insert nothing.
            inserted = tx.run(
                "INSERT INTO runs (id, task, owner, status, input, request_hash, idempotency_key,"
                " created_at, updated_at, task_version, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                run_id, task, owner, RunStatus.QUEUED.value, input_json, request_hash, idempotency_key, now, now,
                task_version, request_id,
            )
            if inserted:
                return self._load(tx, run_id), True
            existing = tx.one(
                "SELECT id, request_hash FROM runs WHERE owner = ? AND idempotency_key = ?", owner, idempotency_key
            )
            assert existing is not None, "insert conflicted with no row"
            if existing["request_hash"] != request_hash:
                raise Conflict(
                    "This Idempotency-Key was already used with a different request.", param="Idempotency-Key"
                )
            return self._load(tx, existing["id"]), False

    def get(self, run_id: str, owner: str | None) -> RunRecord:
        """The run, if ``owner`` owns it (anyone's for ``None``: the admin); otherwise ``RunNotFound``."""
        if not is_run_id(run_id):
            raise run_not_found(run_id)
        with self._db.autocommit() as tx:
            return self._load(tx, run_id, owner)

    def cancel(self, run_id: str, owner: str | None, now: float | None = None) -> RunRecord:
        """Cancel a queued or running run; a finished run is returned unchanged.

        A running run loses its lease at once, so its worker's ``renew`` and ``complete``
        return False from now on (that is how the worker learns to stop).
        """
        now = now_or(now)
        if not is_run_id(run_id):
            raise run_not_found(run_id)
        with self._write() as tx:
            run = self._load(tx, run_id, owner, lock=True)
            if run.terminal:
                return run
            return self._move(tx, run, RunEvent.CANCEL, now)

    def list_runs(
        self,
        owner: str | None,
        status: str | None = None,
        task: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """``owner``'s runs (everyone's for ``None``), newest first, and the cursor of the next page.

        Keyset pagination on (created_at, id): runs created while paging never shift a page.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
        where: list[str] = ["owner = ?"] if owner is not None else ["1 = 1"]
        args: list[Any] = [owner] if owner is not None else []
        if status is not None:
            if status not in STATUSES:
                raise InvalidRequest(f"Unknown run status '{status[:50]}'.", param="status")
            where.append("status = ?")
            args.append(status)
        if task is not None:
            where.append("task = ?")
            args.append(check_text(task, "task"))
        if cursor is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(decode_cursor(cursor))
        sql = (
            f"SELECT {COLUMNS} FROM runs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        with self._db.autocommit() as tx:
            rows = tx.rows(sql, *args, limit + 1)
        records = [record(r) for r in rows[:limit]]
        more = len(rows) > limit
        return records, (encode_cursor(records[-1].created_at, records[-1].id) if more else None)

    def count_by_status(self) -> dict[str, int]:
        """Runs per status, every status present (0 if none): the console's queue depth."""
        with self._db.autocommit() as tx:
            rows = tx.rows("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({row["status"]: int(row["n"]) for row in rows})
        return counts

    def count_queued(self) -> int:
        """Runs waiting for a worker (the Gateway's backpressure signal)."""
        with self._db.autocommit() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM runs WHERE status = 'queued'")
        assert row is not None
        return int(row["n"])

    def queue_stats(self, now: float | None = None) -> QueueStats:
        """Queued and running runs, and how long the oldest queued run has waited (for metrics)."""
        now = now_or(now)
        with self._db.autocommit() as tx:
            rows = tx.rows(
                "SELECT status, COUNT(*) AS n FROM runs WHERE status IN ('queued', 'running') GROUP BY status"
            )
            oldest = tx.one("SELECT created_at FROM runs WHERE status = 'queued' ORDER BY seq LIMIT 1")
        age = max(0.0, now - float(oldest["created_at"])) if oldest is not None else 0.0
        return QueueStats({str(row["status"]): int(row["n"]) for row in rows}, age)

    # -- the workers' side ----------------------------------------------------------------

    def _interrupt(self, tx: Tx, run: RunRecord, now: float) -> bool:
        """``run`` lost its worker: requeue it (True), or fail it (False) if out of starts."""
        if run.attempt < self.max_attempts_total:
            self._move(tx, run, RunEvent.REQUEUE, now, lease_expired=True)
            return True
        error = {
            "message": f"The run was interrupted {run.attempt} times (worker lost or timed out) "
            "and will not be retried.",
            "type": "task_error",
            "param": None,
            "code": "lease_expired",
        }
        self._move(tx, run, RunEvent.FAIL, now, lease_expired=True, error=error)
        return False

    def _running(self, tx: Tx, lock: str, condition: str = "", *args: Any) -> list[RunRecord]:
        sql = f"SELECT {COLUMNS} FROM runs WHERE status = 'running' {condition} ORDER BY seq{lock}"
        return [record(row) for row in tx.rows(sql, *args)]

    def claim(
        self, *, worker_id: str, lease_s: float, now: float | None = None, limit: int = 1
    ) -> list[RunRecord]:
        """Lease up to ``limit`` of the oldest queued runs to ``worker_id`` for ``lease_s``.

        A run released with a delay is not claimed before its ``available_at``.

        First requeues (or fails, see the class docstring) running runs whose lease expired.
        Each claimed run is ``running`` with ``attempt + 1`` and a fresh ``lease_token`` that
        the worker must present to ``renew``/``complete``/``fail``/``release``. Concurrent
        claims (PostgreSQL) each take different runs; one may get fewer than are queued while
        another holds the rest.
        """
        if lease_s <= 0 or limit < 1:
            raise ValueError("lease_s must be > 0 and limit >= 1")
        now = now_or(now)
        with self._write() as tx:
            for run in self._running(tx, self._claim_rows, "AND lease_expires_at <= ?", now):
                self._interrupt(tx, run, now)
            queued = tx.rows(
                f"SELECT {COLUMNS} FROM runs WHERE status = 'queued'"
                " AND (available_at IS NULL OR available_at <= ?)"
                f" ORDER BY seq LIMIT ?{self._claim_rows}",
                now, limit,
            )
            return [
                self._move(
                    tx,
                    run,
                    RunEvent.START,
                    now,
                    lease_token=secrets.token_hex(16),
                    lease_expires_at=now + lease_s,
                    worker_id=worker_id,
                    started_at=run.started_at if run.started_at is not None else now,
                    available_at=None,
                )
                for run in map(record, queued)
            ]

    def renew(self, run_id: str, lease_token: str, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease; False if it is no longer ours (requeued, cancelled, finished).

        A lease past its expiry that nobody has reclaimed yet is still ours: no one else can
        have started the run, so continuing is safe and saves a duplicate call.
        """
        now = now_or(now)
        if not is_run_id(run_id):
            return False
        with self._db.autocommit() as tx:
            changed = tx.run(
                "UPDATE runs SET lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND status = 'running' AND lease_token = ?",
                now + lease_s, now, run_id, lease_token,
            )
        return changed == 1

    def _finish(self, run_id: str, lease_token: str, event: RunEvent, now: float, **changes: Any) -> bool:
        if not is_run_id(run_id):
            return False
        with self._write() as tx:
            row = tx.one(f"SELECT {COLUMNS} FROM runs WHERE id = ?{self._lock_rows}", run_id)
            if row is None:
                return False
            run = record(row)
            # Only the current lease holder of a running run writes: stale attempts (requeued,
            # reclaimed by someone else, cancelled, already finished) change nothing.
            if run.status is not RunStatus.RUNNING or run.lease_token != lease_token:
                return False
            self._move(tx, run, event, now, **changes)
            return True

    def complete(
        self, run_id: str, lease_token: str, *, result: Any, usage: dict[str, Any],
        messages: list[dict[str, str]] | None = None, now: float | None = None,
    ) -> bool:
        """Store the validated result (and the messages its first model call sent): True if this call
        won, False if the lease was stale."""
        return self._finish(run_id, lease_token, RunEvent.SUCCEED, now_or(now), result=result, usage=usage,
                            messages=messages)

    def messages(self, run_id: str) -> list[dict[str, str]] | None:
        """The messages stored with a succeeded run (None: not stored, or no such run)."""
        if not is_run_id(run_id):
            return None
        with self._db.autocommit() as tx:
            row = tx.one("SELECT messages FROM runs WHERE id = ?", run_id)
        if row is None or row["messages"] is None:
            return None
        stored: list[dict[str, str]] = json.loads(row["messages"])
        return stored

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
        return self._finish(run_id, lease_token, RunEvent.FAIL, now_or(now), error=error, usage=usage)

    def release(
        self, run_id: str, lease_token: str, *, delay_s: float = 0.0, now: float | None = None
    ) -> bool:
        """Give the run back to the queue (graceful shutdown, retryable failure); keeps attempt.

        With ``delay_s`` > 0 no ``claim`` takes it before ``now + delay_s``: a runner backs off
        a transient failure in the queue, never by sleeping on a lease it no longer renews.
        """
        if not (0 <= delay_s < float("inf")):
            raise ValueError("delay_s must be a finite number >= 0")
        now = now_or(now)
        return self._finish(
            run_id, lease_token, RunEvent.REQUEUE, now, available_at=now + delay_s if delay_s > 0 else None
        )

    def requeue_all_running(self, now: float | None = None) -> int:
        """At startup after a whole-cluster restart: requeue every ``running`` run.

        Their workers are gone. Attempts are kept; a run already at ``max_attempts_total``
        starts is failed with ``lease_expired`` instead. Returns how many were requeued.
        Only for a store that is the database's one owner: it ends every lease, live or not.
        """
        now = now_or(now)
        with self._write() as tx:
            return sum(self._interrupt(tx, run, now) for run in self._running(tx, self._lock_rows))

    # -- the admin's side and retention ---------------------------------------------------

    def cancel_queued(self, owner: str, now: float | None = None) -> int:
        """Cancel every queued run of ``owner`` (its key was revoked); returns how many."""
        now = now_or(now)
        with self._write() as tx:
            rows = tx.rows(f"SELECT {COLUMNS} FROM runs WHERE owner = ? AND status = 'queued'{self._lock_rows}", owner)
            for run in map(record, rows):
                self._move(tx, run, RunEvent.CANCEL, now)
        return len(rows)

    def expire(self, finished_before: float, idempotency_before: float, limit: int = EXPIRE_STEP) -> tuple[int, int]:
        """Delete up to ``limit`` runs that finished before ``finished_before``, and forget the
        Idempotency-Keys of up to ``limit`` runs created before ``idempotency_before``.

        Bounded so that one call holds the database briefly (lease renewals share it): the caller
        repeats while a call removes ``limit`` of either. Returns (runs deleted, keys forgotten).
        """
        with self._db.transaction() as tx:
            deleted = tx.run(
                "DELETE FROM runs WHERE seq IN (SELECT seq FROM runs WHERE status IN"
                " ('succeeded', 'failed', 'cancelled') AND finished_at < ? LIMIT ?)",
                finished_before, limit,
            )
            forgotten = tx.run(
                "UPDATE runs SET idempotency_key = NULL WHERE seq IN (SELECT seq FROM runs WHERE"
                " idempotency_key IS NOT NULL AND created_at < ? LIMIT ?)",
                idempotency_before, limit,
            )
        return deleted, forgotten
