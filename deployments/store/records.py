"""What the stores keep and how it maps to rows, whatever the database (pure; no I/O).

``RunRecord`` and its row mapping, canonical JSON, run ids, the list cursor, and the checks
that turn a bad caller value into ``InvalidRequest``/``RunNotFound`` before it reaches SQL —
so both backends give the same answer to the same input (PostgreSQL text cannot hold NUL, for
one, and compares NaN differently from SQLite).
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from deployments.core.runstate import TERMINAL, RunStatus
from deployments.errors import InvalidRequest, RunNotFound
from deployments.schemas import RunDetail, RunView

__all__ = [
    "COLUMNS",
    "JSON_COLUMNS",
    "STATUSES",
    "RunRecord",
    "UsageRecord",
    "check_text",
    "decode_cursor",
    "dumps",
    "encode_cursor",
    "is_run_id",
    "new_run_id",
    "now_or",
    "record",
    "run_not_found",
]

COLUMNS = (
    "id, task, owner, status, input, result, error, usage, attempt, created_at, started_at,"
    " finished_at, updated_at, lease_token, lease_expires_at, idempotency_key, worker_id, available_at"
    ", task_version, request_id"
)
JSON_COLUMNS = frozenset({"input", "result", "error", "usage"})
STATUSES = frozenset(s.value for s in RunStatus)
_RUN_ID = re.compile(r"run_[0-9a-f]{24}")


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as stored. ``lease_token`` is internal: never show it to a client."""

    id: str
    task: str
    owner: str
    status: RunStatus
    input: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    lease_token: str | None
    lease_expires_at: float | None
    idempotency_key: str | None
    worker_id: str | None
    available_at: float | None = None  # a queued run is not claimed before this (a backoff)
    task_version: int | None = None  # the task version it runs with, pinned at submit
    request_id: str | None = None  # the submitting request's id; its model calls go by it
    # The chat messages its first model call sent, stored when it succeeded. Not in COLUMNS (up to
    # tasks.render_max_chars each): only ``RunStore.messages`` reads them, for the console's run page.
    messages: list[dict[str, str]] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def view(self) -> RunView:
        """What a client may see of the run (no lease token, worker or input)."""
        return RunView(
            id=self.id,
            task=self.task,
            status=self.status.value,
            attempt=self.attempt,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            result=self.result,
            error=self.error,
            usage=self.usage,
            task_version=self.task_version,
            request_id=self.request_id,
        )

    def detail(self, messages: list[dict[str, str]] | None = None) -> RunDetail:
        """What the admin's console shows: the view, its owner and input (never the lease token), and
        ``messages``: what its model call was sent, if stored."""
        return RunDetail(
            **self.view().model_dump(),
            owner=self.owner,
            input=self.input,
            updated_at=self.updated_at,
            idempotency_key=self.idempotency_key,
            worker_id=self.worker_id,
            available_at=self.available_at,
            messages=messages,
        )


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Tokens one key spent on one model, to add to today's usage (``KeyStore.record_usage``)."""

    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def record(row: dict[str, Any]) -> RunRecord:
    """The record of a row selected with ``COLUMNS``."""
    values = dict(row)
    for key in JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    values["status"] = RunStatus(values["status"])
    return RunRecord(**values)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal values give equal text (and hashes)."""
    # allow_nan=False: NaN/Infinity are not JSON and would break clients reading results.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now_or(now: float | None) -> float:
    """``now`` as a float (tests pass ints), or the current time."""
    return time.time() if now is None else float(now)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(12)


def is_run_id(value: str) -> bool:
    return _RUN_ID.fullmatch(value) is not None


def run_not_found(run_id: str) -> RunNotFound:
    # Same answer for "no such run", "someone else's run" and "not an id": ids cannot be probed.
    return RunNotFound(f"No run with id '{run_id[:100]}'.")


def check_text(value: str, param: str) -> str:
    """``value``, if a database can store it as text; else ``InvalidRequest`` naming ``param``."""
    if "\x00" in value:
        raise InvalidRequest(f"{param} must not contain NUL characters.", param=param)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param} must be valid Unicode text.", param=param) from None
    return value


def encode_cursor(created_at: float, run_id: str) -> str:
    raw = json.dumps([created_at, run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        if (
            isinstance(created_at, (int, float))
            and not isinstance(created_at, bool)
            and math.isfinite(created_at)
            and isinstance(run_id, str)
            and is_run_id(run_id)
        ):
            return float(created_at), run_id
    except (ValueError, TypeError):
        pass
    raise InvalidRequest("Invalid pagination cursor.", param="cursor")
