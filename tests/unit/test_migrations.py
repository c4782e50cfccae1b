"""One migration mechanism from every schema the project has shipped (``store.migrations``).

Each database of ``tests/schema_history/`` is rebuilt from the statements its release ran (SQLite,
and PostgreSQL where that release had it), given a row in every table a release had, opened by
today's stores, and compared with a fresh database: same tables, columns, indexes, triggers and
bookkeeping rows. Columns compare by name, not position: a column added by ``ALTER TABLE`` lands
last, and the stores name every column they read. SQLite's declared types compare by affinity
(``REAL`` and ``DOUBLE PRECISION`` are the same column there).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployments.store import RunStore, open_database
from deployments.store.keys import KeyStore
from deployments.store.migrations import HEAD, LEGACY_VERSION, STEPS, migrate
from deployments.store.tasks import TaskVersionStore
from tests.postgres import PostgresServer
from tests.schema_history.replay import (
    describe_postgres,
    describe_sqlite,
    recordings,
    replay_postgres,
    replay_sqlite,
)

RUN_ROW = ("run_" + "0" * 24, "label", "alice", "succeeded", '{"text":"hi"}', "h" * 64, 1.0, 2.0)


def _open_all(location: str) -> None:
    """What the TaskStore does at start: every store on one database."""
    database = open_database(location)
    try:
        RunStore(database), KeyStore(database), TaskVersionStore(database)
    finally:
        database.close()


def _affinity(declared: str) -> str:
    # https://www.sqlite.org/datatype3.html#determination_of_column_affinity
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _by_name(shape: dict[str, Any], sqlite: bool) -> dict[str, Any]:
    for table in shape["tables"].values():
        columns = {}
        for column in table["columns"]:
            if sqlite:  # [name, type, notnull, default, pk, hidden]
                column = [column[0], _affinity(column[1]), *column[2:4], bool(column[4]), column[5]]
            columns[column[0]] = column
        table["columns"] = columns
    return shape


def _old_run(tx: Callable[..., Any]) -> None:
    tx("INSERT INTO runs (id, task, owner, status, input, request_hash, created_at, updated_at)"
       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", *RUN_ROW)


@pytest.mark.parametrize("recording", recordings("sqlite"), ids=lambda p: p.name.split(".")[0])
def test_every_shipped_sqlite_schema_migrates_to_a_fresh_ones(recording: Path, tmp_path: Path) -> None:
    old, fresh = str(tmp_path / "old.sqlite3"), str(tmp_path / "fresh.sqlite3")
    replay_sqlite(recording, old)
    conn = sqlite3.connect(old)
    _old_run(lambda sql, *args: conn.execute(sql, args))
    conn.commit()
    conn.close()
    _open_all(old)
    _open_all(fresh)
    assert _by_name(describe_sqlite(old), True) == _by_name(describe_sqlite(fresh), True)
    with RunStore(old) as runs:  # the release's run is still there, readable by today's code
        assert runs.get(RUN_ROW[0], "alice").input == {"text": "hi"}
    _open_all(old)  # and opening it again changes nothing
    assert describe_sqlite(old)["rows"]["schema_version"] == [[HEAD]]


@pytest.mark.parametrize("recording", recordings("postgresql"), ids=lambda p: p.name.split(".")[0])
def test_every_shipped_postgres_schema_migrates_to_a_fresh_ones(
    recording: Path, postgres_server: PostgresServer
) -> None:
    old, fresh = postgres_server.fresh_url(), postgres_server.fresh_url()
    replay_postgres(recording, old)
    import psycopg

    with psycopg.connect(old, autocommit=True) as conn:
        _old_run(lambda sql, *args: conn.execute(sql.replace("?", "%s"), args))
    _open_all(old)
    _open_all(fresh)
    assert _by_name(describe_postgres(old), False) == _by_name(describe_postgres(fresh), False)
    with RunStore(old) as runs:
        assert runs.get(RUN_ROW[0], "alice").input == {"text": "hi"}
    assert describe_postgres(old)["rows"]["schema_version"] == [[HEAD]]


def test_every_recording_is_placed_at_a_step_and_the_steps_count_up() -> None:
    assert [s.number for s in STEPS] == list(range(1, HEAD + 1))
    # Steps after the last shipped release's need no placing: numbers count from then on.
    assert all(step.present is not None for step in STEPS[:14]) and STEPS[14].present is None
    assert LEGACY_VERSION == 3


def test_each_step_commits_with_its_number(fresh_location: Callable[[], str]) -> None:
    database = open_database(fresh_location())
    try:
        assert migrate(database, to=5) == (0, 5)
        assert migrate(database) == (5, HEAD)
        assert migrate(database) == (HEAD, HEAD)
    finally:
        database.close()


def test_a_failing_step_leaves_the_database_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    database = open_database(path)
    try:
        migrate(database, to=14)
        with database.transaction() as tx:  # a table in the way of step 15
            tx.run("CREATE TABLE files (id TEXT)")
        with pytest.raises(sqlite3.OperationalError, match="files already exists"):
            migrate(database)
        with database.autocommit() as tx:
            assert tx.rows("SELECT version FROM schema_version") == [{"version": 14}]
            assert tx.one("SELECT name FROM sqlite_master WHERE name = 'batches'") is None
    finally:
        database.close()


def test_owners_opening_a_new_database_at_once_take_turns(fresh_location: Callable[[], str]) -> None:
    """The TaskStore and the BatchService open the same new database as a deploy starts: each on a
    connection of its own, one migrates, the others find it done."""
    import threading

    location = fresh_location()
    start, results = threading.Barrier(4), []

    def open_one() -> None:
        start.wait()
        database = open_database(location)
        try:
            results.append(migrate(database))
        finally:
            database.close()

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [(0, HEAD)] + [(HEAD, HEAD)] * 3
