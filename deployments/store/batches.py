"""BatchStore: uploaded files, batch records and their state machine, in one directory.

Serves the ``BatchService`` deployment (a thin shell: one instance, one owner of the
directory). Calls nothing; owns ``root``:

    root/files/<file_id>.json         a file's record (FileRecord)
    root/files/<file_id>.jsonl        an uploaded file's bytes
    root/uploads/<upload_id>.part     an upload in progress (removed on finish or abort)
    root/batches/<batch_id>.json      a batch's record (BatchRecord)
    root/batches/<batch_id>/          the batch job's output.jsonl, errors.jsonl, progress.json

Records are small JSON files replaced atomically (write, then rename), read once at start into
memory: this class is their only writer. Every lookup is scoped to an owner; someone else's id
answers exactly like an unknown one (404); the owner ``None`` is the admin's view of every owner.
Directories are 0700 and files 0600. Quotas (``QuotasConfig``) bound what one owner may store and
run, and how many batches run at all; ``expire`` removes what retention says has expired.

A batch is a Ray job running ``jobs.batch``; ``advance`` maps what the job reports to the
OpenAI batch status. Methods are synchronous and touch the disk: call them from a thread.
"""

from __future__ import annotations

import dataclasses
import json
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
from deployments.schemas import (
    BatchErrorItem,
    BatchErrors,
    BatchProgress,
    BatchRequestCounts,
    BatchView,
    FileView,
)
from deployments.store.private import private_dir, write_private

# The most bytes one handle call carries (a piece of an upload or a download): a quarter of the
# 4 MiB that one Serve handle call's message may hold (deployments.gateway.files says why).
PIECE_BYTES = 1024 * 1024
MAX_JOB_STARTS = 3  # a batch whose job is lost (node or cluster restart) is resumed this often
COMPLETION_WINDOW_S = 24 * 3600
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
STATUSES = ("validating", "in_progress", "cancelling", "completed", "failed", "cancelled", "expired")
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


@dataclass
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: Literal["batch", "batch_output"]
    bytes: int
    created_at: int
    path: str  # relative to the store's root
    lines: int = 0  # non-blank lines (input files)

    def view(self) -> FileView:
        return FileView(
            id=self.id, bytes=self.bytes, created_at=self.created_at, filename=self.filename, purpose=self.purpose
        )


@dataclass
class BatchRecord:
    id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    total: int
    metadata: dict[str, str] | None = None
    status: str = "validating"
    job_id: str | None = None
    job_starts: int = 0
    completed: int = 0
    failed: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def ended_at(self) -> int | None:
        return self.completed_at or self.failed_at or self.cancelled_at

    def view(self) -> BatchView:
        return BatchView(
            id=self.id,
            endpoint=self.endpoint,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            errors=BatchErrors(data=[BatchErrorItem(**e) for e in self.errors]) if self.errors else None,
            created_at=self.created_at,
            in_progress_at=self.in_progress_at,
            expires_at=self.created_at + COMPLETION_WINDOW_S,
            finalizing_at=self.finalizing_at,
            completed_at=self.completed_at,
            failed_at=self.failed_at,
            cancelling_at=self.cancelling_at,
            cancelled_at=self.cancelled_at,
            request_counts=BatchRequestCounts(total=self.total, completed=self.completed, failed=self.failed),
            metadata=self.metadata,
        )


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


class BatchStore:
    def __init__(
        self, root: Path, max_file_bytes: int | None = None, quotas: QuotasConfig | None = None
    ) -> None:
        self.root = root
        self.quotas = quotas or QuotasConfig()
        self.max_file_bytes = self.quotas.max_file_bytes if max_file_bytes is None else max_file_bytes
        private_dir(root.parent)  # tasks.state_dir: the run store's SQLite file may live there too
        for sub in ("files", "uploads", "batches"):
            private_dir(root / sub)
        os.chmod(root, 0o700)
        for stale in (root / "uploads").glob("*.part"):
            stale.unlink()  # uploads do not survive a restart: their clients got an error
        self.files: dict[str, FileRecord] = {r.id: r for r in self._load(root / "files", FileRecord)}
        self.batches: dict[str, BatchRecord] = {r.id: r for r in self._load(root / "batches", BatchRecord)}
        self.uploads: dict[str, Upload] = {}

    @staticmethod
    def _load(directory: Path, cls: Any) -> list[Any]:
        records = []
        for path in sorted(directory.glob("*.json")):
            records.append(cls(**json.loads(path.read_text())))
        return records

    def _save(self, directory: str, record: FileRecord | BatchRecord) -> None:
        path = self.root / directory / f"{record.id}.json"
        tmp = path.with_suffix(".json.tmp")
        write_private(tmp, json.dumps(dataclasses.asdict(record)).encode())
        os.replace(tmp, path)

    # -- quotas -----------------------------------------------------------------------------

    def stored(self, owner: str) -> tuple[int, int]:
        """Files and bytes ``owner`` holds, uploads in progress included."""
        files = [r.bytes for r in self.files.values() if r.owner == owner]
        uploads = [upload.size for upload in self.uploads.values() if upload.owner == owner]
        return len(files) + len(uploads), sum(files) + sum(uploads)

    def _check_files_quota(self, owner: str) -> None:
        count, _ = self.stored(owner)
        if count >= self.quotas.max_files_per_key:
            raise QuotaExceeded(
                f"file: this key already stores {count} files, its quota is {self.quotas.max_files_per_key};"
                " delete some first",
                param="file",
            )

    def _check_batch_quota(self, owner: str) -> None:
        running = [b for b in self.batches.values() if not b.terminal]
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
        self._save("files", record)
        self.files[record.id] = record
        return record

    def abort_upload(self, upload_id: str) -> None:
        if self.uploads.pop(upload_id, None) is not None:
            (self.root / "uploads" / f"{upload_id}.part").unlink(missing_ok=True)

    def get_file(self, owner: str | None, file_id: str, param: str = "file_id") -> FileRecord:
        """The file, if ``owner`` owns it (anyone's for ``None``: the admin's console)."""
        record = self.files.get(file_id)
        if record is None or (owner is not None and record.owner != owner):
            raise NotFound(f"No file with id '{file_id}'.", param=param)
        return record

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
        mine = [r for r in self.files.values() if r.owner == owner and purpose in (None, r.purpose)]
        return _page(sorted(mine, key=lambda r: (-r.created_at, r.id)), limit, after)

    def delete_file(self, owner: str, file_id: str) -> None:
        record = self.get_file(owner, file_id)
        for batch in self.batches.values():
            if not batch.terminal and file_id in (batch.input_file_id, batch.output_file_id):
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
            "input": self.root / self.files[batch.input_file_id].path,
            "output": work / "output.jsonl",
            "errors": work / "errors.jsonl",
            "progress": work / "progress.json",
        }

    def save_batch(self, batch: BatchRecord) -> None:
        self._save("batches", batch)
        self.batches[batch.id] = batch

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord:
        """``owner``'s batch (any owner's for ``None``, the admin); otherwise ``NotFound``."""
        batch = self.batches.get(batch_id)
        if batch is None or owner not in (None, batch.owner):
            raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id")
        return batch

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        mine = [b for b in self.batches.values() if owner in (None, b.owner)]
        return _page(sorted(mine, key=lambda b: (-b.created_at, b.id)), limit, after)

    def unfinished_batches(self, owner: str) -> list[BatchRecord]:
        return [b for b in self.batches.values() if b.owner == owner and not b.terminal]

    def read_progress(self, batch: BatchRecord) -> BatchProgress | None:
        try:
            return BatchProgress.model_validate_json(self.job_paths(batch)["progress"].read_text())
        except (FileNotFoundError, ValueError):
            return None

    def finalize(self, batch: BatchRecord, now: int | None = None) -> None:
        """Register the job's output (always) and error file (if it has lines) as files of the owner."""
        paths = self.job_paths(batch)
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
            self._save("files", record)
            self.files[record.id] = record
            if kind == "output":
                batch.output_file_id = record.id
            else:
                batch.error_file_id = record.id
        self.save_batch(batch)


    # -- retention ----------------------------------------------------------------------------

    def expire(self, cutoffs: Cutoffs) -> tuple[int, int]:
        """Remove expired files and finished batches (records and bytes); returns how many of each."""
        file_ids = expired_files(list(self.files.values()), list(self.batches.values()), cutoffs)
        for file_id in file_ids:
            self._remove_file(self.files[file_id])
        batch_ids = expired_batches(list(self.batches.values()), cutoffs)
        for batch_id in batch_ids:
            batch = self.batches.pop(batch_id)
            for output_id in (batch.output_file_id, batch.error_file_id):
                if output_id is not None and output_id in self.files:
                    self._remove_file(self.files[output_id])  # its bytes live in the batch's directory
            (self.root / "batches" / f"{batch_id}.json").unlink(missing_ok=True)
            shutil.rmtree(self.batch_dir(batch_id), ignore_errors=True)
        return len(file_ids), len(batch_ids)

    def _remove_file(self, record: FileRecord) -> None:
        del self.files[record.id]
        (self.root / "files" / f"{record.id}.json").unlink(missing_ok=True)
        (self.root / record.path).unlink(missing_ok=True)


def _page(records: list[Any], limit: int, after: str | None) -> tuple[list[Any], bool]:
    start = 0
    if after is not None:
        ids = [r.id for r in records]
        start = ids.index(after) + 1 if after in ids else len(records)
    page = records[start : start + limit]
    return page, start + limit < len(records)
