"""Retention: which stored things have expired, as pure functions of their records and the clock.

Used by the cleanups of the ``BatchService`` (files, finished batches) and the ``TaskStore``
(finished runs, idempotency keys); tested without Ray or disk. A thing expires once it is older
than its ``RetentionConfig`` period; nothing an unfinished batch still uses ever expires.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from deployments.config import RetentionConfig


@dataclass(frozen=True)
class Cutoffs:
    """Everything older than these instants (seconds since the epoch) has expired."""

    files_before: float  # files created, and batches ended, before this
    runs_before: float  # runs finished before this
    idempotency_before: float  # Idempotency-Keys of runs created before this are forgotten

    @classmethod
    def at(cls, config: RetentionConfig, now: float) -> Cutoffs:
        return cls(
            files_before=now - config.files_s,
            runs_before=now - config.runs_s,
            idempotency_before=now - config.idempotency_s,
        )


class FileLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> int: ...


class BatchLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def input_file_id(self) -> str: ...

    @property
    def terminal(self) -> bool: ...

    @property
    def ended_at(self) -> int | None: ...


def expired_files(files: Iterable[FileLike], batches: Iterable[BatchLike], cutoffs: Cutoffs) -> list[str]:
    """Ids of files created before the cutoff that no unfinished batch reads."""
    in_use = {b.input_file_id for b in batches if not b.terminal}
    return [f.id for f in files if f.created_at < cutoffs.files_before and f.id not in in_use]


def expired_batches(batches: Iterable[BatchLike], cutoffs: Cutoffs) -> list[str]:
    """Ids of batches that ended before the cutoff (an unfinished batch never expires)."""
    return [
        b.id for b in batches
        if b.terminal and b.ended_at is not None and b.ended_at < cutoffs.files_before
    ]
