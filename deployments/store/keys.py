"""API keys and token usage, in the TaskStore's database (SQLite or PostgreSQL; pure, no Ray).

Keys are random (256 bits, ``pf-…``) and stored only as their SHA-256 hex
digest: with that much entropy a plain hash is what GitHub and Stripe do, and a
slow KDF would only cost latency. The plain key is returned once, by
``create``. A lookup finds the row by digest and then compares digests with
``hmac.compare_digest`` so the comparison itself leaks no timing.

Usage is kept per key, per model, per UTC day: requests and tokens (``store.usage``: its pages,
charts and the per-key totals that ``tokens_used`` reads).

Listings are keyset pages, whatever the number of keys: keys in creation order (``created_at``,
then id; either direction) after a key id, as OpenAI's admin key list pages; usage by cursor.

A key's ``weight`` is its share of a model budget when keys wait for it
together (``limits.fair_queue``). A key's ``scope`` is ``tenant`` (the API's normal use) or
``prompts`` (also manages tasks: check, push, roll back, history; issue 14). The tables
(``api_keys``, ``usage``, ``key_version``, ``key_tokens``, ``console_signouts``) are made and
migrated by ``store.migrations``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from deployments.errors import InvalidRequest, NotFound
from deployments.store import usage as usage_rows
from deployments.store.database import Database, Location, Row, Tx
from deployments.store.migrations import DatabaseBacked
from deployments.store.records import UsageRecord, check_text

KEY_PREFIX = "pf-"
SCOPES = ("tenant", "prompts")
DEFAULT_LIST_LIMIT = 20  # OpenAI's admin key list: 20 by default, at most 100
MAX_LIST_LIMIT = 100
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
# Usage of calls without a key (authentication off) is recorded under this owner
# (``metering.Meter(anonymous=...)``); it is no key id, but its usage can be read like one.
ANONYMOUS_OWNER = "anonymous"
_KEY_HASH = re.compile(r"[0-9a-f]{64}")


_KEY_COLUMNS = "SELECT id, name, key_hash, hint, created_at, revoked_at, rpm, tpm, token_budget, weight, scope"
_SELECT_KEY = (
    f"{_KEY_COLUMNS}, COALESCE((SELECT t.tokens FROM key_tokens t WHERE t.key_id = k.id), 0) AS tokens_used"
    " FROM api_keys k"
)
_SELECT_KEY_WITHOUT_TOKENS = f"{_KEY_COLUMNS}, 0 AS tokens_used FROM api_keys k"


@dataclass(frozen=True)
class KeySnapshot:
    """What a Gateway replica's key index needs from the store (``KeyStore.snapshot``).

    ``keys`` (digest → active key) is None when the caller already has ``version``;
    ``tokens_used`` (key id → tokens recorded) is None when not asked for.
    """

    version: int
    keys: dict[str, ApiKey] | None
    tokens_used: dict[str, int] | None


@dataclass(frozen=True)
class ApiKey:
    """A key as stored (never the plain key)."""

    id: str
    name: str
    hint: str
    created_at: float
    revoked_at: float | None
    rpm: int | None
    tpm: int | None
    token_budget: int | None
    weight: float = 1.0
    tokens_used: int = 0
    scope: str = "tenant"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def _api_key(row: Row) -> ApiKey:
    fields = {name: row[name] for name in ("id", "name", "hint", "created_at", "revoked_at", "rpm", "tpm",
                                            "token_budget")}
    return ApiKey(**fields, weight=float(row["weight"]), tokens_used=int(row["tokens_used"]), scope=row["scope"])


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id[:64]}'.", param="key_id")


class KeyStore(DatabaseBacked):
    """API keys and usage in the database at ``location``, or in a ``Database`` shared with the
    ``TaskStore``."""

    def __init__(self, location: Location | Database) -> None:
        super().__init__(location)

    @staticmethod
    def _bump(tx: Tx) -> None:
        tx.run("UPDATE key_version SET version = version + 1 WHERE id = 1")

    def create(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, token_budget: int | None = None,
        weight: float = 1.0, now: float | None = None, scope: str = "tenant",
    ) -> tuple[ApiKey, str]:
        """A new key; returns the record and the plain key (shown once, never stored)."""
        check_text(name, "name")
        if scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}.", param="scope")
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        with self._db.transaction() as tx:
            tx.run(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at, rpm, tpm, token_budget, weight, scope)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                key_id, name, hash_key(plain), plain[-4:], time.time() if now is None else now, rpm, tpm,
                token_budget, weight, scope,
            )
            self._bump(tx)
            row = tx.one(f"{_SELECT_KEY} WHERE k.id = ?", key_id)
        assert row is not None
        return _api_key(row), plain

    def lookup(self, key_hash: str) -> ApiKey | None:
        """The active key with this digest, or None (unknown or revoked)."""
        if _KEY_HASH.fullmatch(key_hash) is None:
            return None
        with self._db.autocommit() as tx:
            row = tx.one(f"{_SELECT_KEY} WHERE k.key_hash = ?", key_hash)
        if row is None or not hmac.compare_digest(row["key_hash"], key_hash) or row["revoked_at"] is not None:
            return None
        return _api_key(row)

    def get(self, key_id: str) -> ApiKey:
        if _KEY_ID.fullmatch(key_id) is None:
            raise _key_not_found(key_id)
        with self._db.autocommit() as tx:
            row = tx.one(f"{_SELECT_KEY} WHERE k.id = ?", key_id)
        if row is None:
            raise _key_not_found(key_id)
        return _api_key(row)

    def list_keys(
        self, limit: int = DEFAULT_LIST_LIMIT, after: str | None = None, order: str = "asc"
    ) -> tuple[list[ApiKey], bool]:
        """Up to ``limit`` keys (revoked ones too) after the key ``after`` in creation order
        (``asc``: oldest first; ``desc``: newest first), and whether more follow."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc.", param="order")
        direction, beyond = ("ASC", ">") if order == "asc" else ("DESC", "<")
        where, args = "", []
        with self._db.autocommit() as tx:
            if after is not None:
                well_formed = _KEY_ID.fullmatch(after) is not None
                anchor = tx.one("SELECT created_at FROM api_keys WHERE id = ?", after) if well_formed else None
                if anchor is None:
                    raise InvalidRequest(f"after: no API key with id '{after[:64]}'.", param="after")
                # (created_at, id): two keys made in the same instant still have one order.
                where, args = f" WHERE (k.created_at, k.id) {beyond} (?, ?)", [anchor["created_at"], after]
            rows = tx.rows(
                f"{_SELECT_KEY}{where} ORDER BY k.created_at {direction}, k.id {direction} LIMIT ?", *args, limit + 1
            )
        return [_api_key(row) for row in rows[:limit]], len(rows) > limit

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        if _KEY_ID.fullmatch(key_id) is None:
            raise _key_not_found(key_id)
        with self._db.transaction() as tx:
            if tx.run(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND revoked_at IS NULL",
                time.time() if now is None else now, key_id,
            ):
                self._bump(tx)
        return self.get(key_id)

    def set_limits(
        self, key_id: str, *, rpm: int | None, tpm: int | None, token_budget: int | None, weight: float
    ) -> ApiKey:
        """Replace the key's limits (revoked keys too: it changes nothing for them)."""
        if _KEY_ID.fullmatch(key_id) is None:
            raise _key_not_found(key_id)
        with self._db.transaction() as tx:
            changed = tx.run(
                "UPDATE api_keys SET rpm = ?, tpm = ?, token_budget = ?, weight = ? WHERE id = ?",
                rpm, tpm, token_budget, weight, key_id,
            )
            if not changed:
                raise _key_not_found(key_id)
            self._bump(tx)  # every Gateway's key index reloads the keys: the new limits apply there
        return self.get(key_id)

    def version(self) -> int:
        """Changes with every create and revoke (never goes back)."""
        with self._db.autocommit() as tx:
            row = tx.one("SELECT version FROM key_version WHERE id = 1")
        assert row is not None
        return int(row["version"])

    def snapshot(self, known_version: int | None = None, *, with_usage: bool = True) -> KeySnapshot:
        """The active keys by digest unless the caller has ``known_version`` already, and (with
        ``with_usage``) every key's recorded tokens: what a Gateway's key index polls for."""
        with self._db.transaction() as tx:  # one consistent read of version and keys
            row = tx.one("SELECT version FROM key_version WHERE id = 1")
            assert row is not None
            version = int(row["version"])
            keys = None
            if version != known_version:
                # Each key's tokens come with it (with_usage): no second pass over 10,000 records.
                select = _SELECT_KEY if with_usage else _SELECT_KEY_WITHOUT_TOKENS
                rows = tx.rows(f"{select} WHERE k.revoked_at IS NULL")
                keys = {r["key_hash"]: _api_key(r) for r in rows}
            tokens = None
            if with_usage:
                tokens = {r["key_id"]: int(r["tokens"]) for r in tx.rows("SELECT key_id, tokens FROM key_tokens")}
        return KeySnapshot(version=version, keys=keys, tokens_used=tokens)

    def end_session(self, session_id: str, expires_at: float, now: float | None = None) -> None:
        """A console sign-out: the session ``session_id`` is refused from now on (until ``expires_at``,
        after which its signature is refused anyway and the row goes)."""
        now = time.time() if now is None else now
        with self._db.transaction() as tx:
            tx.run("DELETE FROM console_signouts WHERE expires_at <= ?", now)
            tx.run("INSERT INTO console_signouts (session_id, expires_at) VALUES (?, ?)"
                   " ON CONFLICT (session_id) DO NOTHING", session_id, expires_at)

    def session_ended(self, session_id: str) -> bool:
        """Whether the console session ``session_id`` was signed out."""
        with self._db.autocommit() as tx:
            return tx.one("SELECT 1 AS ended FROM console_signouts WHERE session_id = ?", session_id) is not None

    def record_usage(self, rows: list[UsageRecord], now: float | None = None) -> None:
        """Add ``rows`` to today's usage."""
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        with self._db.transaction() as tx:
            # Sorted, so two concurrent batches lock their rows in the same order (no deadlock).
            for r in sorted(rows, key=lambda r: (r.key_id, r.model)):
                tx.run(
                    "INSERT INTO usage (key_id, model, day, requests, prompt_tokens, completion_tokens,"
                    " total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key_id, model, day) DO UPDATE SET"
                    " requests = usage.requests + excluded.requests,"
                    " prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = usage.completion_tokens + excluded.completion_tokens,"
                    " total_tokens = usage.total_tokens + excluded.total_tokens",
                    r.key_id, r.model, day, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens,
                )

    def usage(
        self,
        key_id: str | None = None,
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int = usage_rows.DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of usage rows (newest day first, then key and model) and the next page's cursor;
        every key's when ``key_id`` is empty, days ``since``..``until`` (YYYY-MM-DD, both included)."""
        if key_id and key_id != ANONYMOUS_OWNER and _KEY_ID.fullmatch(key_id) is None:
            return [], None  # not a key id, so no key's usage (and no NUL reaches PostgreSQL)
        with self._db.autocommit() as tx:
            return usage_rows.page(tx, key_id=key_id or None, since=since, until=until, limit=limit, cursor=cursor)

    def tokens_per_day(
        self, days: int = 14, key_id: str | None = None, today: str | None = None
    ) -> list[tuple[str, int]]:
        """(day, tokens) of each of the ``days`` UTC days up to ``today`` that has usage, oldest
        first: summed by the database over those days' rows only."""
        today = usage_rows.check_day(today, "today") if today else time.strftime("%Y-%m-%d", time.gmtime())
        since = usage_rows.days_back(today, days)
        with self._db.autocommit() as tx:
            return usage_rows.tokens_per_day(tx, since=since, until=today, key_id=key_id or None)

    def today_by_model(self, day: str | None = None) -> list[dict[str, Any]]:
        """Requests and tokens per model on ``day`` (default: today, UTC)."""
        with self._db.autocommit() as tx:
            return usage_rows.today_by_model(tx, day or time.strftime("%Y-%m-%d", time.gmtime()))
