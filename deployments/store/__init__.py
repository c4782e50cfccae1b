"""The durable state of promptfleet: one SQL database (SQLite by default, PostgreSQL by URL).

Every record lives in it: runs (``RunStore``, behind the TaskStore deployment), API keys and usage
(``keys.KeyStore``), task versions (``tasks.TaskVersionStore``), file and batch records
(``batches.BatchStore``, behind the BatchService, whose file bytes stay on disk).

    records.py     RunRecord, its row mapping, cursors, input checks (pure; shared)
    runs.py        RunStore: the run queue's logic, written once against ``Database``
    migrations.py  the schema as numbered steps, ``migrate``, the stores' base class
    database.py    the ``Database`` seam and ``open_database(location)``
    sqlite.py      SQLite backend (one file, WAL, synchronous=FULL)
    postgres.py    PostgreSQL backend (psycopg 3 pool; imported only when a URL asks for it)
"""

from deployments.store.database import Database, Location, open_database
from deployments.store.migrations import HEAD as SCHEMA_VERSION
from deployments.store.records import RunRecord
from deployments.store.runs import MAX_LIST_LIMIT, RunStore

__all__ = ["MAX_LIST_LIMIT", "SCHEMA_VERSION", "Database", "Location", "RunRecord", "RunStore", "open_database"]
