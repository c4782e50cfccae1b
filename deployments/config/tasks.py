"""The ``tasks:`` section: task definitions, the durable run store, and per-key quotas and retention.

The run store is SQLite under ``state_dir`` unless a PostgreSQL URL is given, in the
config or (for a URL with a password) in ``PROMPTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, field_validator

from deployments.config.base import _Strict
from deployments.core.render_budget import RenderLimits

DATABASE_URL_ENV = "PROMPTFLEET_DATABASE_URL"
# libpq takes both spellings of the scheme; postgres:// is what many hosting providers hand out.
_POSTGRES_URL = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)


def is_postgres_url(value: str) -> bool:
    return bool(_POSTGRES_URL.match(value))


class QuotasConfig(_Strict):
    """What one API key may keep on the head node, and how many batch jobs may run at all.

    Exceeding a per-key quota is 403 `quota_exceeded`; the global batch cap is 503 with Retry-After.
    """

    max_files_per_key: int = Field(
        default=100, ge=1, le=1_000_000, description="Stored files (uploads and batch outputs) one key may keep."
    )
    max_file_bytes: int = Field(
        default=200 * 1024**2,
        ge=1024,
        le=1024**4,
        description="Largest file one upload may store (OpenAI's limit for a batch input is 200 MB); a larger "
        "upload is refused with 413 (`param: file`) before it is read, or as soon as it passes the limit.",
    )
    max_file_bytes_per_key: int = Field(
        default=2 * 1024**3,
        ge=1024,
        description="Bytes of stored files one key may keep; an upload that would pass it is refused as it arrives.",
    )
    max_batches_per_key: int = Field(
        default=2, ge=1, le=1000, description="Batches of one key that may be unfinished at once."
    )
    max_batches: int = Field(
        default=8, ge=1, le=10000, description="Batch jobs that may be unfinished at once, over all keys."
    )
    max_batch_lines: int = Field(
        default=50_000,
        ge=1,
        le=100_000_000,
        description="Lines one batch's input file may hold (OpenAI's limit is 50,000 requests per batch); a larger "
        "file is refused with 400 (`param: input_file_id`) when the batch is created. Every line costs an output "
        "line (an error line is ~70 times the smallest input line), so this also bounds what one batch writes to "
        "the head node's disk.",
    )


class RetentionConfig(_Strict):
    """How long finished things are kept; one cleanup job (in the BatchService) runs by itself."""

    files_s: float = Field(
        default=30 * 86400,
        gt=0,
        description="Seconds a stored file (upload or batch output) and a finished batch are kept after "
        "they were created or ended; a file an unfinished batch uses is kept until it ends.",
    )
    runs_s: float = Field(
        default=7 * 86400, gt=0, description="Seconds a finished run (succeeded, failed, cancelled) is kept."
    )
    idempotency_s: float = Field(
        default=86400,
        gt=0,
        description="Seconds an Idempotency-Key is remembered; after that the same key creates a new run.",
    )
    cleanup_interval_s: float = Field(
        default=600, ge=1, le=86400,
        description="How often the cleanup runs (one job: files, batches, runs, idempotency keys).",
    )


class TasksConfig(_Strict):
    """Prompt tasks and the durable run queue."""

    definitions_dir: str = Field(
        default="configs/tasks",
        description="Directory of task definition YAML files; a relative path is taken from the "
        "promptfleet checkout (the directory holding `deployments/`).",
    )
    state_dir: str = Field(
        default="~/.promptfleet/state",
        description="Directory of the SQLite database of all records (unless `database_url` is set) and of "
        "the files' bytes, on the node running the TaskStore and BatchService replicas.",
    )
    database_url: str | None = Field(
        default=None,
        repr=False,
        description="Keep runs, API keys, usage, task versions and batch and file records in PostgreSQL "
        "instead (file bytes stay under `state_dir`): a `postgresql://user@host:5432/db` "
        f"URL (libpq syntax). Empty: the environment variable `{DATABASE_URL_ENV}` if set (the place for "
        "a URL that carries a password; `promptfleet start` passes it to the replicas), else SQLite under "
        "`state_dir`.",
    )
    lease_s: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="A running run's lease; a runner that stops renewing it for this long (replica or "
        "node died) loses the run, which is queued again.",
    )
    max_run_starts: int = Field(
        default=5, ge=1, le=100, description="Starts per run (lease losses, retried upstream failures) "
        "before it fails instead of being queued again."
    )
    max_queued_runs: int = Field(
        default=10000, ge=1, description="Bound of the queue; submits beyond it get 503 with Retry-After."
    )
    runner_concurrency: int = Field(
        default=64, ge=1, le=10000, description="Runs one TaskRunner replica executes at once."
    )
    catalogue_poll_s: float = Field(
        default=1.0, gt=0, le=60,
        description="Every Gateway and TaskRunner replica waits in a long poll that the store answers as soon as "
        "the task catalogue changes (else after 20 s), so a `promptfleet tasks push` or `rollback` reaches every "
        "replica at once plus the time to fetch the change in pages of at most 1 MiB; this is the pause after a "
        "change before the next wait (a second push within it waits for it) and the poll interval while the long "
        "poll fails.",
    )
    max_definition_bytes: int = Field(
        default=512 * 1024, ge=4096, le=2 * 1024 * 1024,
        description="Largest stored task definition (its canonical JSON, in bytes); a task file over it is refused "
        "at deploy, `tasks check` and `tasks push` (400 naming the file). At most 2 MiB, so every page of the "
        "catalogue stays far below Ray's message limit.",
    )
    render_timeout_s: float = Field(
        default=1.0, gt=0, le=60,
        description="Time budget of rendering one task's templates (system and prompt together), in a worker "
        "thread of the Gateway or TaskRunner; past it the run fails with 422 `template_error`.",
    )
    render_max_chars: int = Field(
        default=1_000_000, ge=1000, le=100_000_000,
        description="Output budget of one render, in characters; the template's operations (`*`, `join`, "
        "`center`, loops' output, …) may produce 8 times this in total. Past either: 422 `template_error`.",
    )
    quotas: QuotasConfig = Field(
        default_factory=QuotasConfig, description="Per-key quotas on stored files and batches; the batch cap."
    )
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="Expiry of files, finished runs and batches, idempotency keys."
    )

    def render_limits(self) -> RenderLimits:
        """The budgets of one render (``render_timeout_s``, ``render_max_chars``)."""
        return RenderLimits(timeout_s=self.render_timeout_s, max_chars=self.render_max_chars)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not is_postgres_url(value):
            raise ValueError("must be a postgresql:// URL (leave it out for SQLite under state_dir)")
        return value

    def store_location(self, environ: Mapping[str, str]) -> str | Path:
        """Where the run store lives: a PostgreSQL URL (``database_url``, else ``environ``'s
        ``PROMPTFLEET_DATABASE_URL``), or the SQLite file under ``state_dir``."""
        from_env = environ.get(DATABASE_URL_ENV) or None
        if from_env is not None and self.database_url is not None and from_env != self.database_url:
            raise ValueError(f"tasks.database_url and {DATABASE_URL_ENV} are both set and differ: set one")
        url = self.database_url or from_env
        if url is None:
            return Path(self.state_dir).expanduser() / "tasks.sqlite3"
        if not is_postgres_url(url):
            raise ValueError(f"{DATABASE_URL_ENV} must be a postgresql:// URL (unset it for SQLite)")
        return url

    def definitions_path(self) -> Path:
        path = Path(self.definitions_dir).expanduser()
        # deployments/config/tasks.py: the checkout is two levels up.
        return path if path.is_absolute() else Path(__file__).resolve().parents[2] / path
