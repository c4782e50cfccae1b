"""The schema of the one database, as numbered steps: how every table got to its present shape.

Serves every store on the database (``DatabaseBacked``: runs, keys and usage, console sign-outs,
task versions, batch and file records). Calls nothing but the ``Tx`` it is given. Owns the
``schema_version`` table: one row, the number of the last step applied.

``migrate(db)`` runs, in one schema transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under an
advisory lock, so owners starting at once take turns), every step after the recorded one, and
records the new number in the same transaction: a database is at one step or the next, never
between. A fresh database runs them all, so a fresh and a migrated database are built by the same
statements (``tests/unit/test_migrations.py`` rebuilds the database of every earlier release from
``tests/schema_history/`` and compares each, migrated, with a fresh one, on both engines). A
database whose number is ahead of this code's (a newer release wrote it) is refused, not touched.

Each step is SQL that both engines take, with the few words that differ from the ``Dialect``
(``d.text``, ``d.serial_key``), or a function of the ``Tx`` when the engines need different
statements (the ``key_tokens`` triggers). Steps are append-only: a step that has shipped is never
edited; a change is a new step at the end.

Databases of releases before this module: those recorded ``schema_version`` 1 to 3 for the runs
table alone, and added other columns, tables and indexes whenever they were missing at each start.
Such a database (``schema_version`` at most ``LEGACY_VERSION``) is placed once by what it holds:
its step is the last of the unbroken run of steps, from the first, whose object exists
(``Step.present``; every shipped release is such a run). From then on only numbers count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from deployments.store.database import Database, Dialect, Location, Tx, open_database

__all__ = ["HEAD", "LEGACY_VERSION", "STEPS", "DatabaseBacked", "Step", "migrate", "version_of"]

LEGACY_VERSION = 3  # the last schema_version a release before this module wrote


@dataclass(frozen=True)
class Catalog:
    """What a database holds, by name: for placing a database of an earlier release."""

    tables: frozenset[str]
    indexes: frozenset[str]
    columns: dict[str, frozenset[str]]


@dataclass(frozen=True)
class Step:
    number: int
    why: str
    apply: Callable[[Tx, Dialect], None]
    # Only for steps that shipped before this module: does the database already hold this step's work?
    present: Callable[[Catalog], bool] | None = None


def _sql(*statements: Callable[[Dialect], str | list[str]] | str) -> Callable[[Tx, Dialect], None]:
    """A step of statements, each given as text or made from the dialect (one statement or several)."""

    def apply(tx: Tx, d: Dialect) -> None:
        for statement in statements:
            made = statement(d) if callable(statement) else statement
            for sql in [made] if isinstance(made, str) else made:
                tx.run(sql)

    return apply


def _table(name: str) -> Callable[[Catalog], bool]:
    return lambda c: name in c.tables


def _column(table: str, column: str) -> Callable[[Catalog], bool]:
    return lambda c: column in c.columns.get(table, frozenset())


def _index(name: str) -> Callable[[Catalog], bool]:
    return lambda c: name in c.indexes


def _runs(d: Dialect) -> str:
    # DOUBLE PRECISION: an exact Python float in both engines (SQLite reads it as REAL).
    return f"""CREATE TABLE runs (
        seq              {d.serial_key},  -- queue order (ids are random)
        id               {d.text} NOT NULL UNIQUE,
        task             {d.text} NOT NULL,
        owner            {d.text} NOT NULL,
        status           {d.text} NOT NULL CHECK (status IN
                             ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        input            {d.text} NOT NULL,   -- JSON
        request_hash     {d.text} NOT NULL,   -- sha256 of canonical JSON of (task, input)
        idempotency_key  {d.text},
        result           {d.text},            -- JSON
        error            {d.text},            -- JSON: the client-safe error object
        usage            {d.text},            -- JSON
        attempt          INTEGER NOT NULL DEFAULT 0,
        created_at       DOUBLE PRECISION NOT NULL,
        started_at       DOUBLE PRECISION,
        finished_at      DOUBLE PRECISION,
        updated_at       DOUBLE PRECISION NOT NULL,
        lease_token      {d.text},
        lease_expires_at DOUBLE PRECISION,
        worker_id        {d.text}
    )"""


def _keys_and_usage(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE api_keys (
            id            {d.text} PRIMARY KEY,
            name          {d.text} NOT NULL,
            key_hash      {d.text} NOT NULL UNIQUE,   -- sha256 hex of the plain key; the key is never stored
            hint          {d.text} NOT NULL,          -- last 4 characters, to tell keys apart in listings
            created_at    DOUBLE PRECISION NOT NULL,
            revoked_at    DOUBLE PRECISION,
            rpm           BIGINT,
            tpm           BIGINT,
            token_budget  BIGINT
        )""",
        f"""CREATE TABLE usage (
            key_id             {d.text} NOT NULL,
            model              {d.text} NOT NULL,
            day                {d.text} NOT NULL,     -- UTC date, YYYY-MM-DD
            requests           BIGINT NOT NULL DEFAULT 0,
            prompt_tokens      BIGINT NOT NULL DEFAULT 0,
            completion_tokens  BIGINT NOT NULL DEFAULT 0,
            total_tokens       BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, model, day)
        )""",
    ]


def _task_versions(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE task_versions (
            name          {d.text} NOT NULL,
            version       INTEGER NOT NULL,
            content_hash  {d.text} NOT NULL,          -- sha256 of the canonical JSON definition
            definition    {d.text} NOT NULL,          -- canonical JSON of the parsed definition
            source        {d.text} NOT NULL,          -- the file text as pushed or deployed
            author        {d.text} NOT NULL,          -- key id, 'admin', 'anonymous' or 'deploy'
            created_at    DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (name, version)
        )""",
        f"""CREATE TABLE task_active (
            name           {d.text} PRIMARY KEY,
            version        INTEGER NOT NULL,
            deployed_hash  {d.text}                   -- content hash of the file the last deploy saw
        )""",
        f"""CREATE TABLE task_activations (
            seq      {d.serial_key},
            name     {d.text} NOT NULL,
            version  INTEGER NOT NULL,
            action   {d.text} NOT NULL,               -- deploy, push, rollback
            actor    {d.text} NOT NULL,
            at       DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE task_catalogue (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            version  BIGINT NOT NULL
        )""",
        "INSERT INTO task_catalogue (id, version) VALUES (1, 0)",
    ]


def _files_and_batches(d: Dialect) -> list[str]:
    # Times are whole seconds (the OpenAI objects' created_at); JSON columns are canonical JSON text.
    return [
        f"""CREATE TABLE files (
            id          {d.text} PRIMARY KEY,
            owner       {d.text} NOT NULL,
            filename    {d.text} NOT NULL,
            purpose     {d.text} NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
            bytes       BIGINT NOT NULL,
            lines       BIGINT NOT NULL DEFAULT 0,   -- non-blank lines (input files)
            created_at  BIGINT NOT NULL,
            path        {d.text} NOT NULL            -- of the bytes, under the BatchService's directory
        )""",
        "CREATE INDEX files_by_owner ON files (owner, created_at, id)",
        "CREATE INDEX files_by_created ON files (created_at)",
        f"""CREATE TABLE batches (
            id                 {d.text} PRIMARY KEY,
            owner              {d.text} NOT NULL,
            input_file_id      {d.text} NOT NULL,
            endpoint           {d.text} NOT NULL,
            completion_window  {d.text} NOT NULL,
            created_at         BIGINT NOT NULL,
            total              BIGINT NOT NULL,
            metadata           {d.text},             -- JSON object, or NULL
            status             {d.text} NOT NULL,
            job_id             {d.text},
            job_starts         INTEGER NOT NULL DEFAULT 0,
            completed          BIGINT NOT NULL DEFAULT 0,
            failed             BIGINT NOT NULL DEFAULT 0,
            tokens             {d.text} NOT NULL,    -- JSON object
            output_file_id     {d.text},
            error_file_id      {d.text},
            errors             {d.text} NOT NULL,    -- JSON list
            in_progress_at     BIGINT,
            finalizing_at      BIGINT,
            completed_at       BIGINT,
            failed_at          BIGINT,
            cancelling_at      BIGINT,
            cancelled_at       BIGINT
        )""",
        "CREATE INDEX batches_by_owner ON batches (owner, created_at, id)",
        "CREATE INDEX batches_by_status ON batches (status)",
    ]


# SET search_path FROM CURRENT: the function finds key_tokens in the schema it was made in, whatever
# the search_path of the session that writes usage.
_PG_FUNCTION = """CREATE OR REPLACE FUNCTION usage_key_tokens() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE key_tokens SET tokens = tokens - OLD.total_tokens WHERE key_id = OLD.key_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO key_tokens (key_id, tokens) VALUES (NEW.key_id, NEW.total_tokens)
        ON CONFLICT (key_id) DO UPDATE SET tokens = key_tokens.tokens + excluded.tokens;
    END IF;
    RETURN NULL;
END $$"""
_ADD_NEW = (
    "INSERT INTO key_tokens (key_id, tokens) VALUES (NEW.key_id, NEW.total_tokens)"
    " ON CONFLICT (key_id) DO UPDATE SET tokens = key_tokens.tokens + excluded.tokens;"
)
_TAKE_OLD = "UPDATE key_tokens SET tokens = tokens - OLD.total_tokens WHERE key_id = OLD.key_id;"


def _add_key_tokens(tx: Tx, dialect: Dialect) -> None:
    """Create ``key_tokens`` (every key's tokens so far, ``store.usage``) and the triggers on ``usage``
    that keep it, filled from the usage so far (step 11, in the schema transaction)."""
    tx.run(f"CREATE TABLE key_tokens (key_id {dialect.text} PRIMARY KEY, tokens BIGINT NOT NULL)")
    # Triggers before the fill: on PostgreSQL creating one locks out writers of usage until this
    # transaction commits, so no row lands between the fill's read and the triggers (SQLite's
    # BEGIN IMMEDIATE already excludes every writer).
    if dialect.name == "postgresql":
        tx.run(_PG_FUNCTION)
        tx.run(
            "CREATE TRIGGER usage_key_tokens AFTER INSERT OR UPDATE OR DELETE ON usage"
            " FOR EACH ROW EXECUTE FUNCTION usage_key_tokens()"
        )
    else:
        tx.run(f"CREATE TRIGGER usage_key_tokens_insert AFTER INSERT ON usage BEGIN {_ADD_NEW} END")
        tx.run(
            "CREATE TRIGGER usage_key_tokens_update AFTER UPDATE OF key_id, total_tokens ON usage"
            f" BEGIN {_TAKE_OLD} {_ADD_NEW} END"
        )
        tx.run(f"CREATE TRIGGER usage_key_tokens_delete AFTER DELETE ON usage BEGIN {_TAKE_OLD} END")
    tx.run("INSERT INTO key_tokens (key_id, tokens) SELECT key_id, SUM(total_tokens) FROM usage GROUP BY key_id")


def _paged_keys_and_key_tokens(tx: Tx, d: Dialect) -> None:
    _sql(
        "CREATE INDEX api_keys_by_created ON api_keys (created_at, id)",
        # usage's listing order, total_tokens included so the charts' sums read the index alone
        "CREATE INDEX usage_by_day ON usage (day DESC, key_id, model, total_tokens)",
    )(tx, d)
    _add_key_tokens(tx, d)


STEPS: list[Step] = [
    Step(1, "runs: the queue of async task runs", _sql(
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        _runs,
        "CREATE UNIQUE INDEX runs_idempotency ON runs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL",
        "CREATE INDEX runs_by_status ON runs (status, seq)",
        "CREATE INDEX runs_by_owner ON runs (owner, created_at, id)",
    ), _table("runs")),
    Step(2, "API keys and their usage per model and day", _sql(_keys_and_usage), _table("api_keys")),
    Step(3, "runs: a released run's not-before time (a retryable failure backs off in the queue)",
         _sql("ALTER TABLE runs ADD COLUMN available_at DOUBLE PRECISION"), _column("runs", "available_at")),
    Step(4, "key_version: one row bumped by every key change, for the Gateways' key index", _sql(
        """CREATE TABLE key_version (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            version  BIGINT NOT NULL
        )""",
        "INSERT INTO key_version (id, version) VALUES (1, 0)",
    ), _table("key_version")),
    Step(5, "api_keys: a key's weight, its share of a model budget",
         _sql("ALTER TABLE api_keys ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1"),
         _column("api_keys", "weight")),
    Step(6, "api_keys: a key's scope (tenant, or prompts: also manages tasks)",
         _sql(lambda d: f"ALTER TABLE api_keys ADD COLUMN scope {d.text} NOT NULL DEFAULT 'tenant'"),
         _column("api_keys", "scope")),
    Step(7, "runs: the task version a run is pinned to",
         _sql("ALTER TABLE runs ADD COLUMN task_version INTEGER"), _column("runs", "task_version")),
    Step(8, "task versions, the active one of each task, activations, the catalogue's version",
         _sql(_task_versions), _table("task_versions")),
    Step(9, "runs: the admin's listings read one index range each", _sql(
        "CREATE INDEX runs_by_created ON runs (created_at, id)",
        "CREATE INDEX runs_by_status_created ON runs (status, created_at, id)",
        "CREATE INDEX runs_by_task_created ON runs (task, created_at, id)",
    ), _index("runs_by_created")),
    Step(10, "runs: the id of the request that submitted the run",
         _sql(lambda d: f"ALTER TABLE runs ADD COLUMN request_id {d.text}"), _column("runs", "request_id")),
    Step(11, "keys and usage page by index; key_tokens keeps every key's total (triggers on usage)",
         _paged_keys_and_key_tokens, _table("key_tokens")),
    Step(12, "console sessions signed out before they expired", _sql(
        lambda d: f"""CREATE TABLE console_signouts (
            session_id  {d.text} PRIMARY KEY,
            expires_at  DOUBLE PRECISION NOT NULL
        )""",
    ), _table("console_signouts")),
    Step(13, "task_activations: the catalogue version each made (0 before catalogue pages)", _sql(
        "ALTER TABLE task_activations ADD COLUMN catalogue_version BIGINT",
        "UPDATE task_activations SET catalogue_version = 0 WHERE catalogue_version IS NULL",
        "CREATE INDEX task_activations_by_name ON task_activations (name, catalogue_version, seq)",
        "CREATE INDEX task_activations_by_catalogue ON task_activations (catalogue_version)",
    ), _column("task_activations", "catalogue_version")),
    Step(14, "runs: the messages a succeeded run's first model call sent",
         _sql(lambda d: f"ALTER TABLE runs ADD COLUMN messages {d.text}"), _column("runs", "messages")),
    Step(15, "files and batches: their records move from JSON files on the head's disk",
         _sql(_files_and_batches)),
]
HEAD = STEPS[-1].number
assert [step.number for step in STEPS] == list(range(1, HEAD + 1)), "steps are numbered 1, 2, 3, ..."


def _catalog(tx: Tx, d: Dialect) -> Catalog:
    if d.name == "postgresql":  # the first schema on the search_path, where unqualified names land
        tables = [r["name"] for r in tx.rows(
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()")]
        indexes = [r["name"] for r in tx.rows(
            "SELECT indexname AS name FROM pg_indexes WHERE schemaname = current_schema()")]
        columns = tx.rows("SELECT table_name AS t, column_name AS c FROM information_schema.columns"
                          " WHERE table_schema = current_schema()")
    else:
        tables = [r["name"] for r in tx.rows("SELECT name FROM sqlite_master WHERE type = 'table'")]
        indexes = [r["name"] for r in tx.rows("SELECT name FROM sqlite_master WHERE type = 'index'")]
        columns = tx.rows("SELECT m.name AS t, p.name AS c FROM sqlite_master m, pragma_table_info(m.name) p"
                          " WHERE m.type = 'table'")
    by_table: dict[str, set[str]] = {}
    for row in columns:
        by_table.setdefault(row["t"], set()).add(row["c"])
    return Catalog(frozenset(tables), frozenset(indexes), {t: frozenset(c) for t, c in by_table.items()})


def _placed(catalog: Catalog) -> int:
    """The step a database of an earlier release is at: the last of the unbroken run of steps present."""
    number = 0
    for step in STEPS:
        if step.present is None or not step.present(catalog):
            break
        number = step.number
    return number


def version_of(tx: Tx, d: Dialect) -> int:
    """The step the database is at (0: empty), placing a database of an earlier release by its contents."""
    catalog = _catalog(tx, d)
    recorded = 0
    if "schema_version" in catalog.tables:
        row = tx.one("SELECT MAX(version) AS version FROM schema_version")
        recorded = int(row["version"]) if row is not None and row["version"] is not None else 0
    return _placed(catalog) if recorded <= LEGACY_VERSION else recorded


def migrate(db: Database, *, to: int = HEAD) -> tuple[int, int]:
    """Apply every step after the database's up to ``to`` (tests stop early); returns (from, to)."""
    with db.schema_transaction() as tx:
        current = version_of(tx, db.dialect)
        if current > HEAD:
            raise RuntimeError(f"{db.location}: schema version {current} is newer than {HEAD}")
        if current >= to:
            return current, current
        for step in STEPS[current:to]:
            step.apply(tx, db.dialect)
        tx.run("DELETE FROM schema_version")
        tx.run("INSERT INTO schema_version (version) VALUES (?)", to)
        return current, to


class DatabaseBacked:
    """Base of the stores: a ``Database`` opened from a location (and closed with the store) or
    shared with another store (and left open), migrated to the schema this code needs
    (``migrate``: one schema for every store, whichever opens the database first)."""

    def __init__(self, location: Location | Database) -> None:
        self._owns_db = not isinstance(location, Database)
        self._db = open_database(location) if not isinstance(location, Database) else location
        try:
            migrate(self._db)
        except BaseException:
            self.close()
            raise

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        if self._owns_db:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
