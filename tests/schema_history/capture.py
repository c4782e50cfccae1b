"""Record the statements each earlier release ran to create its database (``python -m tests.schema_history.capture``).

Every distinct schema the project has shipped is kept here as the exact statements its own code
ran against an empty database, SQLite and PostgreSQL (``<nn>-<date>-<commit>.<dialect>.json``, oldest first, a list
of ``[sql, params]``), so ``tests/unit/test_migrations.py`` can rebuild each one on any machine
and migrate it to head without checking out old code. This script makes those files: for each
commit it exports that commit's ``deployments/`` into a temporary directory, opens its stores on a
fresh database in a subprocess (the stores of that release, whatever they were called) with the
drivers' ``execute`` recording, and keeps the recording if its schema differs from the ones before.

Run it again only to add a release (add its commit to ``COMMITS``); it needs git history and a
PostgreSQL install (``tests/postgres.py`` starts a throwaway server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Every first-parent commit of main that changed the stores' schema code, oldest first (from
# `git log --first-parent -- deployments/store/ deployments/store.py deployments/keystore.py`),
# and the releases the CHANGELOG names. Commits whose schema equals an earlier one are skipped.
COMMITS = [
    "609e3a2", "685f700", "60e8c9c", "efc266d", "f5edde1", "67df32e", "900b76e", "f1da04b", "42a3047",
    "4399ca6", "23ca0de", "ea760b5", "95f72f5", "594464c", "9712294", "b6b9889", "a4d3e2e", "28e81b9",
    "d30e6b5", "e0ea9bb", "0f7d1bb", "8c3db63", "6c5df6e",
]

# Runs inside the old tree: open every store that release had, recording what reaches the driver.
_OPEN_OLD_STORES = r'''
import importlib, json, sqlite3, sys
tree, location, out = sys.argv[1:]
sys.path.insert(0, tree)
recorded = []
if location.startswith("postgresql://"):
    import psycopg
    real_execute = psycopg.Connection.execute
    def execute(self, query, params=None, **kwargs):
        recorded.append([str(query), list(params) if params else []])
        return real_execute(self, query, params, **kwargs)
    psycopg.Connection.execute = execute
else:
    real_connect = sqlite3.connect
    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: recorded.append([sql, []]))
        return conn
    sqlite3.connect = connect
opened = []
for module_name, class_names in (
    ("deployments.store", ["TaskStore"]), ("deployments.store.runs", ["TaskStore", "RunStore"]),
    ("deployments.keystore", ["KeyStore"]), ("deployments.store.keys", ["KeyStore"]),
    ("deployments.store.tasks", ["TaskVersionStore"]),
):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        continue
    for name in class_names:
        cls = getattr(module, name, None)
        if cls is not None and cls.__module__ == module_name:
            opened.append(cls(location))
for store in opened:
    store.close()
json.dump(recorded, open(out, "w"), indent=0)
'''


def _export(commit: str, into: Path) -> Path:
    tree = into / commit
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "deployments"], capture_output=True,
                             check=True).stdout
    tar_path = into / f"{commit}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _record(tree: Path, location: str, out: Path) -> list[list[object]] | None:
    done = subprocess.run([sys.executable, "-c", _OPEN_OLD_STORES, str(tree), location, str(out)],
                          capture_output=True, text=True, check=False, cwd=tree)
    if done.returncode != 0:
        print(f"  {location.split(':')[0]}: could not open its stores: {done.stderr.strip().splitlines()[-1]}")
        return None
    recorded: list[list[object]] = json.loads(out.read_text())
    return recorded


def main() -> int:
    from tests.postgres import PostgresServer, find_bin_dir
    from tests.schema_history.replay import describe_postgres, describe_sqlite

    bin_dir = find_bin_dir()
    assert bin_dir is not None, "PostgreSQL is not installed"
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="promptfleet-history-") as scratch:
        work = Path(scratch)
        server = PostgresServer(bin_dir=bin_dir, root=Path(tempfile.mkdtemp(prefix="promptfleet-pg-")))
        server.init()
        server.start()
        try:
            for commit in COMMITS:
                number = len(seen) + 1
                date = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ad", "--date=short", commit],
                                      capture_output=True, text=True, check=True).stdout.strip()
                tree = _export(commit, work)
                sqlite_file = work / f"{commit}.sqlite3"
                sqlite_statements = _record(tree, str(sqlite_file), work / f"{commit}.sqlite.json")
                assert sqlite_statements is not None
                shape = json.dumps(describe_sqlite(str(sqlite_file)), sort_keys=True)
                pg_url = server.fresh_url()
                # Releases before the PostgreSQL backend would take the URL for a file name.
                has_postgres = (tree / "deployments" / "store" / "postgres.py").exists()
                pg_statements = _record(tree, pg_url, work / f"{commit}.pg.json") if has_postgres else None
                pg_shape = json.dumps(describe_postgres(pg_url), sort_keys=True) if pg_statements else ""
                key = shape + pg_shape
                if key in seen:
                    print(f"{commit}: same schema as {seen[key]}")
                    continue
                seen[key] = commit
                print(f"{commit}: a new schema ({date})")
                name = f"{number:02d}-{date}-{commit}"
                (HERE / f"{name}.sqlite.json").write_text(json.dumps(sqlite_statements, indent=0) + "\n")
                if pg_statements:
                    (HERE / f"{name}.postgresql.json").write_text(json.dumps(pg_statements, indent=0) + "\n")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
