"""The one seam between the stores and their database: SQLite or PostgreSQL.

The stores (``store.migrations.DatabaseBacked``) hold all the logic (state machine, leases, idempotency, paging)
once, written against ``Database``; a backend only supplies connections, transactions and the
few words of SQL in which the two engines differ (``Dialect``).

Statements use ``?`` placeholders and SQL that both engines accept (``ON CONFLICT``, row-value
comparison, ``COALESCE``); every result column has a plain name (``COUNT(*) AS n``) because the
engines name expressions differently. Rows come back as ``dict``.

Locking: SQLite's ``transaction`` takes the database's write lock up front (``BEGIN IMMEDIATE``),
so every read-then-write is serial. PostgreSQL runs transactions concurrently at READ COMMITTED,
so a statement that reads rows it is about to change appends ``dialect.lock_rows`` (``FOR
UPDATE``), and ``claim`` appends ``dialect.claim_rows`` (``FOR UPDATE SKIP LOCKED``) so that
several store owners can claim at once without handing one run out twice.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.config import is_postgres_url

__all__ = ["Database", "Dialect", "Location", "Row", "Tx", "open_database"]

Row = dict[str, Any]
Location = str | os.PathLike[str]
"""A SQLite file path (or ``":memory:"``), or a ``postgresql://`` URL."""


class Tx(Protocol):
    """Statements inside one transaction (or one autocommitted statement each)."""

    def rows(self, sql: str, *args: Any) -> list[Row]: ...

    def one(self, sql: str, *args: Any) -> Row | None: ...

    def run(self, sql: str, *args: Any) -> int:
        """Execute a write; the number of rows it changed."""
        ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL that differs between the engines: a few DDL types and the row-lock clauses."""

    name: str
    serial_key: str
    """DDL of an auto-increment primary key (queue order)."""
    text: str
    """DDL type of a text column; compared byte by byte in both engines (ids sort the same way)."""
    lock_rows: str
    """Suffix of a SELECT whose rows this transaction is about to change."""
    claim_rows: str
    """Suffix of the claim's SELECT: rows another transaction is claiming are skipped, not waited for."""


class Database(ABC):
    """Connections to one database, safe to use from several threads."""

    dialect: Dialect
    location: str
    """Where the data lives, for logs (a URL's password is masked)."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """All statements commit together (durably) when the block ends, or none does."""

    @abstractmethod
    def autocommit(self) -> AbstractContextManager[Tx]:
        """Each statement commits on its own: reads, and writes that are one statement."""

    @abstractmethod
    def schema_transaction(self) -> AbstractContextManager[Tx]:
        """A transaction that no other store's schema setup runs beside (concurrent owners)."""

    @abstractmethod
    def close(self) -> None: ...


def open_database(location: Location) -> Database:
    """The database at ``location``: a ``postgresql://`` URL, else a SQLite file path."""
    if isinstance(location, str) and is_postgres_url(location):
        # Imported here: the SQLite default should not load libpq into every process.
        from deployments.store.postgres import PostgresDatabase

        return PostgresDatabase(location)
    from deployments.store.sqlite import SqliteDatabase

    return SqliteDatabase(location)
