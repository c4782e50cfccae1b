"""BatchStore: uploaded files, batch records and their state machine: records in SQL, bytes on disk.

Serves the ``BatchService`` deployment (a thin shell: one instance, the one writer of these
records and bytes). Calls nothing; owns the ``files`` and ``batches`` tables of the run store's
database (SQLite by default, PostgreSQL when configured; their shape: ``store.migrations``) and
the directory ``root``:

    root/files/<file_id>.jsonl        an uploaded file's bytes
    root/uploads/<upload_id>.part     an upload in progress (removed on finish or abort)
    root/batches/<batch_id>/          the batch job's output.jsonl, errors.jsonl, progress.json

Why records in SQL and bytes on disk: the records are what one backup, one retention sweep and
PostgreSQL must cover with the runs and keys (a PostgreSQL deployment no longer keeps batch state
only on the head's disk); the bytes are up to 200 MiB per file, written and read in 1 MiB pieces
by the batch job and the downloads, which a file appends and seeks cheaply and a database row
would copy whole (PostgreSQL's ``bytea`` is read and written as one value; large objects need
their own backup and cleanup). A record names its bytes by a path under ``root``; so a backup is
the database plus ``root`` (docs/operations/state.md).

The BatchService opens its own connection to the database (``database``) rather than asking the
TaskStore: no extra Ray hop per file or batch call, and no new hand-off between deployments; the
two touch different tables, and both engines let two owners share one database (SQLite's
``BEGIN IMMEDIATE`` with a busy timeout, PostgreSQL's row locks). Earlier releases kept each
record as a JSON file beside its bytes; those are imported once at start and then removed.

Every lookup is scoped to an owner; someone else's id
answers exactly like an unknown one (404); the owner ``None`` is the admin's view of every owner.
Directories are 0700 and files 0600. Quotas (``QuotasConfig``) bound what one owner may store and
run, and how many batches run at all; ``expire`` removes what retention says has expired.

A batch is a Ray job running ``jobs.batch``; ``advance`` maps what the job reports to the
OpenAI batch status. Methods are synchronous and touch the disk: call them from a thread.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deployments.config import QuotasConfig
from deployments.core.files import LineCounter
from deployments.core.retention import Cutoffs, expired_batches, expired_files
from deployments.errors import Conflict, InvalidRequest, NotFound, Overloaded, QuotaExceeded, RequestTooLarge
from deployments.schemas import BatchProgress
from deployments.store.batch_records import (
    STATUSES,
    TERMINAL,
    UNFINISHED,
    BatchRecord,
    FileRecord,
    page,
    select_batches,
    select_files,
    write_batch,
    write_file,
)
from deployments.store.database import Database, Location
from deployments.store.migrations import DatabaseBacked
from deployments.store.private import private_dir, write_private

__all__ = [
    "MAX_JOB_STARTS",
    "PIECE_BYTES",
    "STATUSES",
    "TERMINAL",
    "BatchRecord",
    "BatchStore",
    "FileRecord",
    "JobState",
    "advance",
]

logger = logging.getLogger(__name__)

# The most bytes one handle call carries (a piece of an upload or a download): a quarter of the
# 4 MiB that one Serve handle call's message may hold (deployments.gateway.files says why).
PIECE_BYTES = 1024 * 1024
MAX_JOB_STARTS = 3  # a batch whose job is lost (node or cluster restart) is resumed this often
EXIT_SETUP = 3  # jobs.batch.EXIT_SETUP: could not start (no input, no app); retrying will not help

Action = Literal["none", "submit", "finalize"]


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class Upload:
    """An upload in progress: whose, its display name, and what arrived so far."""

    owner: str
    filename: str
    size: int = 0
    lines: LineCounter = field(default_factory=LineCounter)


@dataclass(frozen=True)
class JobState:
    """What the Ray Jobs API says about a batch's job."""

    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    exit_code: int | None = None


def advance(batch: BatchRecord, job: JobState | None, progress: BatchProgress | None, now: int) -> Action:
    """Move ``batch`` to the status its job's state implies; say what the caller must do next.

    ``job`` is None when the cluster has no such job (it restarted and lost its job table): the
    batch is resubmitted (the job resumes from its output), at most ``MAX_JOB_STARTS`` times.
    ``"finalize"``: the batch just ended; register its output and error files.
    """
    if batch.terminal:
        return "none"
    if progress is not None:
        batch.completed, batch.failed = progress.completed, progress.failed
        batch.tokens = {
            "prompt_tokens": progress.prompt_tokens,
            "completion_tokens": progress.completion_tokens,
            "total_tokens": progress.total_tokens,
        }
    cancelling = batch.cancelling_at is not None
    status = job.status if job is not None else "LOST"
    if status in ("PENDING", "RUNNING"):
        if not cancelling:
            batch.status = "validating" if status == "PENDING" else "in_progress"
            if status == "RUNNING" and batch.in_progress_at is None:
                batch.in_progress_at = now
        return "none"
    if status == "SUCCEEDED":
        batch.status, batch.completed_at = "completed", now
        return "finalize"
    if status == "STOPPED" or cancelling:
        batch.status, batch.cancelled_at = "cancelled", now
        return "finalize"
    retryable = job is None or job.exit_code != EXIT_SETUP
    if retryable and batch.job_starts < MAX_JOB_STARTS:
        return "submit"
    batch.status, batch.failed_at = "failed", now
    batch.errors = [{
        "code": "batch_job_failed" if job is not None else "batch_job_lost",
        "message": f"The batch job failed after {batch.job_starts} start(s); see `ray job logs {batch.job_id}`.",
    }]
    return "finalize"


class BatchStore(DatabaseBacked):
    """Files and batches: records in the database at ``database`` (a SQLite path, a PostgreSQL URL
    or an open ``Database``; by default a SQLite file in ``root``, for tests: the BatchService
    passes the run store's), bytes under ``root``."""

    def __init__(
        self, root: Path, max_file_bytes: int | None = None, quotas: QuotasConfig | None = None,
        database: Location | Database | None = None,
    ) -> None:
        self.root = root
        self.quotas = quotas or QuotasConfig()
        self.max_file_bytes = self.quotas.max_file_bytes if max_file_bytes is None else max_file_bytes
        private_dir(root.parent)  # tasks.state_dir: the run store's SQLite file may live there too
        for sub in ("files", "uploads", "batches"):
            private_dir(root / sub)
        os.chmod(root, 0o700)
        super().__init__(database if database is not None else root / "batches.sqlite3")
        for stale in (root / "uploads").glob("*.part"):
            stale.unlink()  # uploads do not survive a restart: their clients got an error
        self.uploads: dict[str, Upload] = {}
        self.import_json_records()

    def import_json_records(self) -> int:
        """Move the JSON records an earlier release kept in ``root`` into the database, once.

        All in one transaction, then the JSON files are removed; a crash between the two imports
        them again on the next start, which changes nothing (an id already stored is kept).
        Returns how many records were imported."""
        found = [(path, "files") for path in sorted((self.root / "files").glob("*.json"))]
        found += [(path, "batches") for path in sorted((self.root / "batches").glob("*.json"))]
        if not found:
            return 0
        with self._db.transaction() as tx:
            for path, kind in found:
                fields = json.loads(path.read_text())
                if kind == "files":
                    write_file(tx, FileRecord(**fields), replace=False)
                else:
                    write_batch(tx, BatchRecord(**fields), replace=False)
        for path, _ in found:
            path.unlink()
        for stale in [*(self.root / "files").glob("*.json.tmp"), *(self.root / "batches").glob("*.json.tmp")]:
            stale.unlink()  # an earlier release's write that never finished
        logger.warning("imported %d file and batch records from %s into the database", len(found), self.root)
        return len(found)

    def _files_where(self, condition: str, *args: Any) -> list[FileRecord]:
        with self._db.autocommit() as tx:
            return select_files(tx, condition, *args)

    def _batches_where(self, condition: str, *args: Any) -> list[BatchRecord]:
        with self._db.autocommit() as tx:
            return select_batches(tx, condition, *args)

    @property
    def files(self) -> dict[str, FileRecord]:
        """Every file record by id (tests and tools; the service reads by query)."""
        return {r.id: r for r in self._files_where("")}

    @property
    def batches(self) -> dict[str, BatchRecord]:
        """Every batch record by id (tests and tools; the service reads by query)."""
        return {r.id: r for r in self._batches_where("")}

    def count_by_status(self) -> dict[str, int]:
        with self._db.autocommit() as tx:
            rows = tx.rows("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def all_unfinished(self) -> list[BatchRecord]:
        """Every owner's unfinished batches (at most ``quotas.max_batches``), oldest first."""
        return self._batches_where(f"WHERE {UNFINISHED} ORDER BY created_at, id")

    # -- quotas -----------------------------------------------------------------------------

    def stored(self, owner: str) -> tuple[int, int]:
        """Files and bytes ``owner`` holds, uploads in progress included."""
        with self._db.autocommit() as tx:
            row = tx.one("SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS size FROM files WHERE owner = ?", owner)
        assert row is not None
        uploads = [upload.size for upload in self.uploads.values() if upload.owner == owner]
        return int(row["n"]) + len(uploads), int(row["size"]) + sum(uploads)

    def _check_files_quota(self, owner: str) -> None:
        count, _ = self.stored(owner)
        if count >= self.quotas.max_files_per_key:
            raise QuotaExceeded(
                f"file: this key already stores {count} files, its quota is {self.quotas.max_files_per_key};"
                " delete some first",
                param="file",
            )

    def _check_batch_quota(self, owner: str) -> None:
        running = self.all_unfinished()
        mine = sum(1 for b in running if b.owner == owner)
        if mine >= self.quotas.max_batches_per_key:
            raise QuotaExceeded(
                f"This key already has {mine} unfinished batches, its quota is"
                f" {self.quotas.max_batches_per_key}; wait for one to end or cancel one.",
                param="input_file_id",
            )
        if len(running) >= self.quotas.max_batches:
            raise Overloaded(f"The service runs {len(running)} batches, its maximum; retry later.", retry_after=60)

    # -- files ------------------------------------------------------------------------------

    def begin_upload(self, owner: str, filename: str) -> str:
        self._check_files_quota(owner)
        upload_id = _new_id("upload-")
        write_private(self.root / "uploads" / f"{upload_id}.part", b"")
        self.uploads[upload_id] = Upload(owner, filename)
        return upload_id

    def write_upload(self, upload_id: str, chunk: bytes) -> None:
        upload = self.uploads.get(upload_id)
        if upload is None:
            raise NotFound("The upload ended (it failed, or it is already stored).", param="file")
        if upload.size + len(chunk) > self.max_file_bytes:
            self.abort_upload(upload_id)
            raise RequestTooLarge(f"file: larger than the limit of {self.max_file_bytes} bytes", param="file")
        _, stored = self.stored(upload.owner)
        if stored + len(chunk) > self.quotas.max_file_bytes_per_key:
            self.abort_upload(upload_id)
            raise QuotaExceeded(
                f"file: this key's stored files would pass its quota of {self.quotas.max_file_bytes_per_key}"
                " bytes; delete some first",
                param="file",
            )
        with (self.root / "uploads" / f"{upload_id}.part").open("ab") as f:
            f.write(chunk)
        upload.size += len(chunk)
        upload.lines.feed(chunk)

    def finish_upload(self, upload_id: str, now: int | None = None) -> FileRecord:
        upload = self.uploads.pop(upload_id, None)
        if upload is None:
            raise NotFound("The upload ended (it failed, or it is already stored).", param="file")
        part = self.root / "uploads" / f"{upload_id}.part"
        if upload.lines.lines == 0:
            part.unlink()
            raise InvalidRequest("file: the file has no lines", param="file")
        record = FileRecord(
            id=_new_id("file-"), owner=upload.owner, filename=upload.filename, purpose="batch", bytes=upload.size,
            created_at=now or int(time.time()), path="", lines=upload.lines.lines,
        )
        record.path = f"files/{record.id}.jsonl"
        os.replace(part, self.root / record.path)
        with self._db.transaction() as tx:
            write_file(tx, record)
        return record

    def abort_upload(self, upload_id: str) -> None:
        if self.uploads.pop(upload_id, None) is not None:
            (self.root / "uploads" / f"{upload_id}.part").unlink(missing_ok=True)

    def get_file(self, owner: str | None, file_id: str, param: str = "file_id") -> FileRecord:
        """The file, if ``owner`` owns it (anyone's for ``None``: the admin's console)."""
        found = self._files_where("WHERE id = ?", file_id)
        if not found or (owner is not None and found[0].owner != owner):
            raise NotFound(f"No file with id '{file_id}'.", param=param)
        return found[0]

    def read_file(self, owner: str | None, file_id: str, offset: int, size: int) -> bytes:
        """Up to ``min(size, PIECE_BYTES)`` bytes of the file from ``offset``.

        Safe on a thread of its own (records are only looked up): a file deleted meanwhile is
        ``NotFound``, as if it had been gone before."""
        record = self.get_file(owner, file_id)
        try:
            with (self.root / record.path).open("rb") as f:
                f.seek(max(0, offset))
                return f.read(max(0, min(size, PIECE_BYTES)))
        except FileNotFoundError:
            raise NotFound(f"No file with id '{file_id}'.", param="file_id") from None

    def list_files(
        self, owner: str, purpose: str | None, limit: int, after: str | None
    ) -> tuple[list[FileRecord], bool]:
        where, args = "WHERE owner = ?", [owner]
        if purpose is not None:
            where, args = where + " AND purpose = ?", [*args, purpose]
        with self._db.autocommit() as tx:
            return page(tx, select_files, where, args, limit, after)

    def delete_file(self, owner: str, file_id: str) -> None:
        record = self.get_file(owner, file_id)
        for batch in self.all_unfinished():
            if file_id in (batch.input_file_id, batch.output_file_id):
                raise Conflict(f"The file '{file_id}' is in use by the batch '{batch.id}'.", param="file_id")
        self._remove_file(record)

    # -- batches ----------------------------------------------------------------------------

    def create_batch(
        self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
        metadata: dict[str, str] | None, now: int | None = None,
    ) -> BatchRecord:
        source = self.get_file(owner, input_file_id, param="input_file_id")
        self._check_batch_quota(owner)
        if source.purpose != "batch":
            raise InvalidRequest(
                f"input_file_id: the file '{input_file_id}' was not uploaded with purpose 'batch'",
                param="input_file_id",
            )
        if source.lines > self.quotas.max_batch_lines:
            raise InvalidRequest(
                f"input_file_id: the file '{input_file_id}' has {source.lines} lines; a batch may have at most"
                f" {self.quotas.max_batch_lines}: split it into several batches",
                param="input_file_id",
            )
        batch = BatchRecord(
            id=_new_id("batch_"), owner=owner, input_file_id=input_file_id, endpoint=endpoint,
            completion_window=completion_window, created_at=now or int(time.time()), total=source.lines,
            metadata=metadata,
        )
        private_dir(self.batch_dir(batch.id))
        self.save_batch(batch)
        return batch

    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    def job_paths(self, batch: BatchRecord) -> dict[str, Path]:
        """Absolute paths the batch job reads and writes."""
        work = self.batch_dir(batch.id)
        return {
            "input": self.root / self.get_file(None, batch.input_file_id).path,
            "output": work / "output.jsonl",
            "errors": work / "errors.jsonl",
            "progress": work / "progress.json",
        }

    def save_batch(self, batch: BatchRecord) -> None:
        with self._db.transaction() as tx:
            write_batch(tx, batch)

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord:
        """``owner``'s batch (any owner's for ``None``, the admin); otherwise ``NotFound``."""
        found = self._batches_where("WHERE id = ?", batch_id)
        if not found or owner not in (None, found[0].owner):
            raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id")
        return found[0]

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        where, args = ("WHERE owner = ?", [owner]) if owner is not None else ("WHERE 1 = 1", [])
        with self._db.autocommit() as tx:
            return page(tx, select_batches, where, args, limit, after)

    def unfinished_batches(self, owner: str) -> list[BatchRecord]:
        return [b for b in self.all_unfinished() if b.owner == owner]

    def read_progress(self, batch: BatchRecord) -> BatchProgress | None:
        try:
            return BatchProgress.model_validate_json(self.job_paths(batch)["progress"].read_text())
        except (FileNotFoundError, ValueError):
            return None

    def finalize(self, batch: BatchRecord, now: int | None = None) -> None:
        """Register the job's output (always) and error file (if it has lines) as files of the owner."""
        paths = self.job_paths(batch)
        made: list[FileRecord] = []
        for kind, path in (("output", paths["output"]), ("errors", paths["errors"])):
            path.touch()
            path.chmod(0o600)  # the job wrote it with its umask's mode
            size = path.stat().st_size
            if kind == "errors" and size == 0:
                continue
            record = FileRecord(
                id=_new_id("file-"), owner=batch.owner, filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output", bytes=size, created_at=now or int(time.time()),
                path=str(path.relative_to(self.root)),
            )
            made.append(record)
            if kind == "output":
                batch.output_file_id = record.id
            else:
                batch.error_file_id = record.id
        with self._db.transaction() as tx:  # the batch ends and its files appear together
            for record in made:
                write_file(tx, record)
            write_batch(tx, batch)


    # -- retention ----------------------------------------------------------------------------

    def expire(self, cutoffs: Cutoffs) -> tuple[int, int]:
        """Remove expired files and finished batches (records and bytes); returns how many of each."""
        # The candidates come from the indexes (created before the cutoff; ended batches); which of
        # them expire is core.retention's rule.
        before = cutoffs.files_before
        unfinished = self.all_unfinished()
        old_files = self._files_where("WHERE created_at < ?", before)
        file_ids = expired_files(old_files, unfinished, cutoffs)
        by_id = {r.id: r for r in old_files}
        for file_id in file_ids:
            self._remove_file(by_id[file_id])
        ended = self._batches_where(f"WHERE NOT ({UNFINISHED}) AND created_at < ?", before)
        batch_ids = expired_batches(ended, cutoffs)
        ended_by_id = {b.id: b for b in ended}
        removed = set(file_ids)
        for batch_id in batch_ids:
            batch = ended_by_id[batch_id]
            for output_id in (batch.output_file_id, batch.error_file_id):
                if output_id is not None and output_id not in removed:
                    for output in self._files_where("WHERE id = ?", output_id):
                        self._remove_file(output)  # its bytes live in the batch's directory
            with self._db.transaction() as tx:
                tx.run("DELETE FROM batches WHERE id = ?", batch_id)
            shutil.rmtree(self.batch_dir(batch_id), ignore_errors=True)
        return len(file_ids), len(batch_ids)

    def _remove_file(self, record: FileRecord) -> None:
        # The record first: a crash between the two leaves bytes nobody names, never a record
        # whose bytes are gone.
        with self._db.transaction() as tx:
            tx.run("DELETE FROM files WHERE id = ?", record.id)
        (self.root / record.path).unlink(missing_ok=True)
