"""Token usage per key, model and UTC day: pages, aggregates and per-key totals (pure SQL over a ``Tx``).

The ``usage`` table (``store.migrations``) gains a row per key, model and day and never loses one, so
nothing here reads it whole:

- ``page``: rows newest day first, then by key and model, ``limit`` at a time, continued by an
  opaque cursor (the last row's day, key and model). The order mixes directions (day DESC, key
  ASC), which one row-value comparison cannot express; a page after a cursor is read as two index
  ranges instead — the rest of the cursor's day, then the days before it — each a seek on
  ``usage_by_day``, so page 1,000 costs what page 1 does.
- ``csv_text``: a page as CSV lines, for the console's export: the TaskStore answers text, so
  a whole export crosses the handle as a few strings a thousand rows each, not as hundreds of
  thousands of objects (as ``BatchService.read_file`` hands out files in chunks).
- ``tokens_per_day`` and ``today_by_model``: the console's charts, one GROUP BY over the days
  asked for (the ``day`` index range), never over the whole table.
- ``key_tokens``: every key's tokens so far, kept by triggers on ``usage``. The Gateways' key
  index asks for every key's total every ``auth.cache_ttl_s`` (``KeyStore.snapshot``); summing the
  usage table each time costs a pass over all of it. Triggers rather than ``record_usage``
  keeping the count: whatever writes ``usage`` — a store of an older release still running
  beside this one during an upgrade, an operator's SQL — keeps the totals right.

Dates are UTC ``YYYY-MM-DD`` strings: they compare as text in date order on both engines.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from datetime import date, timedelta
from typing import Any

from deployments.errors import InvalidRequest
from deployments.store.database import Row, Tx
from deployments.store.records import check_text

__all__ = [
    "COLUMNS",
    "CSV_COLUMNS",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "check_day",
    "csv_text",
    "decode_cursor",
    "encode_cursor",
    "page",
    "today_by_model",
    "tokens_per_day",
]

COLUMNS = "key_id, model, day, requests, prompt_tokens, completion_tokens, total_tokens"
CSV_COLUMNS = ("day", "key_id", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens")
ORDER = "day DESC, key_id, model"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CHART_DAYS = 366
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

# The listing's order is the index usage_by_day (store.migrations, step 11): a page is one range
# of it, read in order (no sort). With total_tokens in it the charts' sums read the index alone:
# 14 days of 300,000 rows took 26 ms through the table and 3 ms from the index (bench.console).


def check_day(value: str, param: str) -> str:
    """``value`` if it is a calendar date written YYYY-MM-DD; else ``InvalidRequest`` naming ``param``."""
    # fromisoformat alone also takes 20261202 and 2026-W49-3: the text must sort as a date.
    if _DAY.fullmatch(value) is not None:
        try:
            date.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise InvalidRequest(f"{param} must be a date written YYYY-MM-DD (UTC).", param=param)


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}.", param="limit")
    return limit


def encode_cursor(row: Row) -> str:
    raw = json.dumps([row["day"], row["key_id"], row["model"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str, str]:
    """The (day, key id, model) a page continues after; ``InvalidRequest`` (param ``cursor``) if it
    is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        day, key_id, model = json.loads(raw)
        if all(isinstance(part, str) for part in (day, key_id, model)):
            check_text(key_id, "cursor")
            check_text(model, "cursor")
            return check_day(day, "cursor"), key_id, model
    except (ValueError, TypeError, InvalidRequest):
        pass
    raise InvalidRequest("Invalid pagination cursor.", param="cursor")


def _filters(key_id: str | None, since: str | None, until: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if key_id is not None:
        where.append("key_id = ?")
        args.append(check_text(key_id, "key_id"))
    if since is not None:
        where.append("day >= ?")
        args.append(check_day(since, "since"))
    if until is not None:
        where.append("day <= ?")
        args.append(check_day(until, "until"))
    if since is not None and until is not None and since > until:
        raise InvalidRequest("until must not be before since.", param="until")
    return where, args


def page(
    tx: Tx,
    *,
    key_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[Row], str | None]:
    """Usage rows matching the filters (every key for ``key_id`` None; days ``since``..``until``,
    both included), ``limit`` of them after ``cursor``, and the cursor of the next page (None on
    the last). Rows added while paging never shift a page; a row of a page already read may still
    grow (today's row of a key that is being used)."""
    check_limit(limit)
    where, args = _filters(key_id, since, until)
    select = f"SELECT {COLUMNS} FROM usage WHERE {' AND '.join(where) or '1 = 1'}"
    if cursor is None:
        rows = tx.rows(f"{select} ORDER BY {ORDER} LIMIT ?", *args, limit + 1)
    else:
        day, after_key, after_model = decode_cursor(cursor)
        rows = tx.rows(
            f"{select} AND day = ? AND (key_id, model) > (?, ?) ORDER BY key_id, model LIMIT ?",
            *args, day, after_key, after_model, limit + 1,
        )
        if len(rows) <= limit:
            rows += tx.rows(f"{select} AND day < ? ORDER BY {ORDER} LIMIT ?", *args, day, limit + 1 - len(rows))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1]) if more else None)


def csv_text(rows: list[Row], header: bool = False) -> str:
    """``rows`` as CSV lines (``CSV_COLUMNS``), after the header line if ``header``."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(CSV_COLUMNS)
    writer.writerows(tuple(row[column] for column in CSV_COLUMNS) for row in rows)
    return out.getvalue()


def days_back(today: str, days: int) -> str:
    """The first of the ``days`` days that end with ``today``."""
    if not 1 <= days <= MAX_CHART_DAYS:
        raise InvalidRequest(f"days must be between 1 and {MAX_CHART_DAYS}.", param="days")
    return (date.fromisoformat(today) - timedelta(days=days - 1)).isoformat()


def tokens_per_day(tx: Tx, *, since: str, until: str, key_id: str | None = None) -> list[tuple[str, int]]:
    """(day, total tokens) of each day from ``since`` to ``until`` that has usage, oldest first."""
    where, args = _filters(key_id, since, until)
    rows = tx.rows(
        f"SELECT day, SUM(total_tokens) AS tokens FROM usage WHERE {' AND '.join(where)} GROUP BY day ORDER BY day",
        *args,
    )
    return [(row["day"], int(row["tokens"])) for row in rows]  # SUM of BIGINT is NUMERIC in PostgreSQL


def today_by_model(tx: Tx, day: str) -> list[Row]:
    """Requests and tokens of ``day`` per model (the overview's "today")."""
    rows = tx.rows(
        "SELECT model, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens,"
        " SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens"
        " FROM usage WHERE day = ? GROUP BY model ORDER BY model",
        check_day(day, "day"),
    )
    return [{k: (v if k == "model" else int(v)) for k, v in row.items()} for row in rows]


# -- per-key running totals ------------------------------------------------------------------
