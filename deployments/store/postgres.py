"""PostgreSQL backend of the stores (``tasks.database_url``): a small psycopg 3 connection pool.

For deployments that outgrow one head node: the runs no longer live on the TaskStore replica's
disk, so the replica may run on any node, and several store owners may share one database
(``claim`` locks with ``FOR UPDATE SKIP LOCKED``). Durability is the server's: a commit returns
once the server has flushed its WAL (``synchronous_commit``, on by default; leave it on).

Every wait is bounded: connecting (``connect_timeout``), waiting for a pooled connection, and each
statement (``statement_timeout``). A database that cannot be reached, or a statement that fails
for the connection's sake (lost connection, timeout, deadlock victim), raises ``Overloaded`` —
503 with Retry-After to a client, a transient error to a runner; the driver's own message is
logged here and never leaves this process. Pooled connections are checked before use, so a
restarted server costs no more than the calls that were in flight.
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from deployments.errors import Overloaded
from deployments.store.database import Database, Dialect, Row

__all__ = ["POSTGRES", "PostgresDatabase", "masked"]

logger = logging.getLogger("ray.serve")

POSTGRES = Dialect(
    name="postgresql",
    serial_key="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    # Byte order, as in SQLite, whatever the database's locale: ids page the same on both.
    text='TEXT COLLATE "C"',
    lock_rows=" FOR UPDATE",
    claim_rows=" FOR UPDATE SKIP LOCKED",
)

CONNECT_TIMEOUT_S = 10
POOL_TIMEOUT_S = 10
STATEMENT_TIMEOUT_MS = 30_000
RETRY_AFTER_S = 5
# Key of the advisory lock that serializes schema setup between owners starting at once
# (concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalog constraints).
_SCHEMA_LOCK_KEY = 0x7066_7363  # "pfsc"

Connection = psycopg.Connection[DictRow]


def masked(url: str) -> str:
    """``url`` with its password (in the user part or the query) shown as ``***``, for logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        masked_query = [(key, "***" if key == "password" else value) for key, value in query]
        parts = parts._replace(query=urllib.parse.urlencode(masked_query, safe="*"))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@functools.lru_cache(maxsize=512)
def _psycopg_sql(sql: str) -> str:
    # The stores write sqlite3's ``?`` placeholders; psycopg wants ``%s`` and gives any other
    # ``%`` a meaning, so store SQL contains none.
    if "%" in sql:
        raise ValueError(f"store SQL may not contain '%': {sql[:80]}")
    return sql.replace("?", "%s")


class _PostgresTx:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(_psycopg_sql(sql), args).fetchall()

    def one(self, sql: str, *args: Any) -> Row | None:
        return self._conn.execute(_psycopg_sql(sql), args).fetchone()

    def run(self, sql: str, *args: Any) -> int:
        return self._conn.execute(_psycopg_sql(sql), args).rowcount


def _configure(conn: Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class PostgresDatabase(Database):
    dialect = POSTGRES

    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self.location = masked(url)
        password = urllib.parse.urlsplit(url).password
        try:
            params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            reason = str(exc).replace(password, "***") if password else str(exc)
            raise ValueError(f"not a valid PostgreSQL URL: {self.location}: {reason}") from None
        # The URL's own settings win; these only fill gaps.
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        params.setdefault("application_name", "promptfleet")
        conninfo = make_conninfo(**params)
        try:
            # One direct connection first: the pool would only time out, this says why.
            psycopg.connect(conninfo).close()
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"cannot connect to PostgreSQL at {self.location}: {exc}") from None
        self._pool = ConnectionPool(
            conninfo,
            connection_class=Connection,
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=1,
            max_size=max_connections,
            timeout=POOL_TIMEOUT_S,
            configure=_configure,
            check=ConnectionPool.check_connection,
            name="promptfleet-store",
            open=True,
        )

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:  # includes PoolTimeout
            logger.warning("run store database %s: %s: %s", self.location, type(exc).__name__, exc)
            raise Overloaded(
                "The run store's database is unavailable; retry later.", retry_after=RETRY_AFTER_S
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTx]:
        with self._connection() as conn, conn.transaction():
            yield _PostgresTx(conn)

    @contextmanager
    def autocommit(self) -> Iterator[_PostgresTx]:
        with self._connection() as conn:
            yield _PostgresTx(conn)

    @contextmanager
    def schema_transaction(self) -> Iterator[_PostgresTx]:
        with self.transaction() as tx:
            tx.one(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY}) AS locked")
            yield tx

    def close(self) -> None:
        self._pool.close()
