"""The durable store of runs (``RunStore``, behind the TaskStore deployment), keys and batch files.

Runs and keys live in SQLite by default or PostgreSQL by URL.

    records.py    RunRecord, its row mapping, cursors, input checks (pure; shared)
    runs.py       RunStore: the run queue's logic, written once against ``Database``
    database.py   the ``Database`` seam, ``open_database(location)``, the stores' base class
    sqlite.py     SQLite backend (one file, WAL, synchronous=FULL)
    postgres.py   PostgreSQL backend (psycopg 3 pool; imported only when a URL asks for it)

``deployments.store.keys.KeyStore`` (API keys, usage) sits on the same ``Database``.
"""

from deployments.store.database import Database, Location, open_database
from deployments.store.records import RunRecord
from deployments.store.runs import MAX_LIST_LIMIT, SCHEMA_VERSION, RunStore

__all__ = ["MAX_LIST_LIMIT", "SCHEMA_VERSION", "Database", "Location", "RunRecord", "RunStore", "open_database"]
