"""File and batch records and their rows in the database (the ``files`` and ``batches`` tables).

Serves ``store.batches.BatchStore``, the tables' one writer. Calls nothing but the ``Tx`` it is
given. ``FileRecord`` and ``BatchRecord`` map field for field to the columns of the same names
(``store.migrations``, step 15); a batch's ``metadata``, ``tokens`` and ``errors`` are canonical
JSON text. Column names in the SQL come from the records' fields, never from callers' data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from deployments.schemas import BatchErrorItem, BatchErrors, BatchRequestCounts, BatchView, FileView
from deployments.store.database import Row, Tx
from deployments.store.records import dumps

__all__ = [
    "COMPLETION_WINDOW_S",
    "STATUSES",
    "TERMINAL",
    "UNFINISHED",
    "BatchRecord",
    "FileRecord",
    "page",
    "select_batches",
    "select_files",
    "write_batch",
    "write_file",
]

COMPLETION_WINDOW_S = 24 * 3600
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
STATUSES = ("validating", "in_progress", "cancelling", "completed", "failed", "cancelled", "expired")
UNFINISHED = f"status NOT IN ({', '.join(repr(s) for s in sorted(TERMINAL))})"
"""A condition on ``batches``: the batch has not ended."""

R = TypeVar("R", "FileRecord", "BatchRecord")


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


_FILE_COLUMNS = tuple(f.name for f in dataclasses.fields(FileRecord))
_BATCH_COLUMNS = tuple(f.name for f in dataclasses.fields(BatchRecord))
_BATCH_JSON = frozenset({"metadata", "tokens", "errors"})


def _insert(table: str, columns: tuple[str, ...], replace: bool) -> str:
    # replace: a write of the record as it is now; else an import that keeps a row already there.
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
    on_conflict = f"DO UPDATE SET {updates}" if replace else "DO NOTHING"
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (id) {on_conflict}")


_WRITE = {
    ("files", True): _insert("files", _FILE_COLUMNS, True),
    ("files", False): _insert("files", _FILE_COLUMNS, False),
    ("batches", True): _insert("batches", _BATCH_COLUMNS, True),
    ("batches", False): _insert("batches", _BATCH_COLUMNS, False),
}


def write_file(tx: Tx, record: FileRecord, replace: bool = True) -> None:
    tx.run(_WRITE["files", replace], *(getattr(record, c) for c in _FILE_COLUMNS))


def write_batch(tx: Tx, record: BatchRecord, replace: bool = True) -> None:
    values = [getattr(record, c) for c in _BATCH_COLUMNS]
    tx.run(_WRITE["batches", replace], *(
        dumps(v) if c in _BATCH_JSON and v is not None else v for c, v in zip(_BATCH_COLUMNS, values, strict=True)
    ))


def _file(row: Row) -> FileRecord:
    return FileRecord(**{name: row[name] for name in _FILE_COLUMNS})


def _batch(row: Row) -> BatchRecord:
    values = {name: row[name] for name in _BATCH_COLUMNS}
    for name in _BATCH_JSON:
        values[name] = json.loads(values[name]) if values[name] is not None else None
    return BatchRecord(**values)


def select_files(tx: Tx, condition: str = "", *args: Any) -> list[FileRecord]:
    """The files matching ``condition`` (SQL after ``FROM files``: WHERE, ORDER BY, LIMIT)."""
    return [_file(r) for r in tx.rows(f"SELECT {', '.join(_FILE_COLUMNS)} FROM files {condition}", *args)]


def select_batches(tx: Tx, condition: str = "", *args: Any) -> list[BatchRecord]:
    """The batches matching ``condition`` (SQL after ``FROM batches``)."""
    return [_batch(r) for r in tx.rows(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches {condition}", *args)]


def page(
    tx: Tx, select: Callable[..., list[R]], where: str, args: Sequence[Any], limit: int, after: str | None
) -> tuple[list[R], bool]:
    """Newest first (``created_at`` descending, then id), ``limit`` after the record ``after``; an
    ``after`` that names no record of this listing gives an empty page."""
    if after is not None:
        anchor = select(tx, f"{where} AND id = ?", *args, after)
        if not anchor:
            return [], False
        where = f"{where} AND (created_at < ? OR (created_at = ? AND id > ?))"
        args = [*args, anchor[0].created_at, anchor[0].created_at, after]
    records = select(tx, f"{where} ORDER BY created_at DESC, id LIMIT ?", *args, limit + 1)
    return records[:limit], len(records) > limit
