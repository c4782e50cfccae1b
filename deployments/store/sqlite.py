"""SQLite backend of the stores: one file (WAL, ``synchronous=FULL``), one connection, one lock.

The default: nothing to run, and the file lives on the head node, where its two owners run (the
TaskStore and the BatchService replicas, each with its own connection; WAL lets them share it).
``":memory:"`` gives a private in-memory database (tests).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from deployments.store.database import Database, Dialect, Location, Row
from deployments.store.private import private_dir, private_file

__all__ = ["SQLITE", "SqliteDatabase"]

SQLITE = Dialect(
    name="sqlite",
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    text="TEXT",  # SQLite's default BINARY collation already compares bytes
    # BEGIN IMMEDIATE has locked the whole database: no row locks to ask for.
    lock_rows="",
    claim_rows="",
)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    def one(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    def run(self, sql: str, *args: Any) -> int:
        return self._conn.execute(sql, args).rowcount


class SqliteDatabase(Database):
    dialect = SQLITE

    def __init__(self, path: Location) -> None:
        self.location = str(path)
        if self.location != ":memory:":
            # Readable by the owner only; SQLite gives the -wal and -shm files the database's mode.
            private_file(private_dir(Path(path).parent) / Path(path).name)
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves. check_same_thread off
        # so an actor may call from a worker thread; the lock serializes all access.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = _dict_row
        self._lock = threading.RLock()
        # First: the TaskStore and the BatchService open one file, maybe at the same moment, and
        # switching a new file to WAL takes a lock the other may hold for an instant.
        self._conn.execute("PRAGMA busy_timeout=5000")
        _switch_to_wal(self._conn)
        # NORMAL may lose the last commits on power loss; FULL fsyncs the WAL at every commit,
        # which is what "in the store before the client hears 202" needs.
        self._conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTx]:
        # IMMEDIATE takes the write lock up front, so read-then-write is atomic.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def autocommit(self) -> Iterator[_SqliteTx]:
        with self._lock:
            yield _SqliteTx(self._conn)

    def schema_transaction(self) -> AbstractContextManager[_SqliteTx]:
        return self.transaction()  # BEGIN IMMEDIATE already excludes every other writer

    def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` (tests check the durability settings)."""
        with self._lock:
            return next(iter(self._conn.execute(f"PRAGMA {name}").fetchone().values()))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float = 5.0) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while another connection holds the lock it needs:
    SQLite can answer "database is locked" to it at once, without waiting out ``busy_timeout``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
