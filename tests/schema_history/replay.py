"""Rebuild an earlier release's database from its recording, and describe any database's schema.

``replay_sqlite`` / ``replay_postgres`` run a recording of ``capture.py`` against an empty
database; ``describe_sqlite`` / ``describe_postgres`` give a database's schema as plain data
(tables with their columns, indexes, triggers, functions, and the bookkeeping rows), in a form
where a migrated database and a fresh one compare equal exactly when they have the same schema.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
# Tables whose rows are the schema's own (versions, one-row counters): compared too.
BOOKKEEPING = ("schema_version", "key_version", "task_catalogue")


def recordings(dialect: str) -> list[Path]:
    """Every earlier schema recorded for ``dialect`` (``sqlite`` or ``postgresql``), oldest first."""
    return sorted(HERE.glob(f"*.{dialect}.json"))


def replay_sqlite(recording: Path, path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for sql, _ in json.loads(recording.read_text()):
            conn.execute(sql)
    finally:
        conn.close()


def replay_postgres(recording: Path, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for sql, params in json.loads(recording.read_text()):
            conn.execute(sql, params or None)


def describe_sqlite(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        shape: dict[str, Any] = {}
        for table in tables:
            columns = [list(row[1:]) for row in conn.execute(f"PRAGMA table_xinfo({table})")]
            indexes = {}
            for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
                keys = [row[2] for row in conn.execute(f"PRAGMA index_xinfo({name})") if row[5]]
                indexes[name] = [unique, origin, partial, keys]
            shape[table] = {"columns": columns, "indexes": indexes}
        triggers = {name: _words(sql) for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name")}
        return {"tables": shape, "triggers": triggers, "rows": _rows(conn, tables)}
    finally:
        conn.close()


def describe_postgres(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        tables = [name for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY table_name",
            [schema])]
        shape: dict[str, Any] = {}
        for table in tables:
            columns = [list(row) for row in conn.execute(
                "SELECT column_name, data_type, is_nullable, column_default, collation_name, is_identity"
                " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
                " ORDER BY ordinal_position", [schema, table])]
            indexes = {name: definition.replace(f"{schema}.", "") for name, definition in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
                [schema, table])}
            checks = sorted(definition for (definition,) in conn.execute(
                "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
                " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = %s",
                [schema, table]))
            shape[table] = {"columns": columns, "indexes": indexes, "constraints": checks}
        triggers = sorted(list(row) for row in conn.execute(
            "SELECT trigger_name, event_manipulation, event_object_table, action_statement"
            " FROM information_schema.triggers WHERE trigger_schema = %s", [schema]))
        functions = sorted(_words(source.replace(schema, "<schema>")) for (source,) in conn.execute(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s", [schema]))
        return {"tables": shape, "triggers": triggers, "functions": functions, "rows": _rows(conn, tables)}


def _rows(conn: Any, tables: list[str]) -> dict[str, list[list[Any]]]:
    return {table: sorted(list(row) for row in conn.execute(f"SELECT * FROM {table}").fetchall())
            for table in BOOKKEEPING if table in tables}


def _words(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()
