"""API keys and token usage, in the TaskStore's database (SQLite or PostgreSQL; pure, no Ray).

Keys are random (256 bits, ``pf-…``) and stored only as their SHA-256 hex
digest: with that much entropy a plain hash is what GitHub and Stripe do, and a
slow KDF would only cost latency. The plain key is returned once, by
``create``. A lookup finds the row by digest and then compares digests with
``hmac.compare_digest`` so the comparison itself leaks no timing.

Usage is kept per key, per model, per UTC day: requests and tokens.

A key's ``weight`` is its share of a model budget when keys wait for it
together (``core.fairshare``). Databases made before it existed get the column
(default 1) when a store opens them: ``ADD COLUMN`` on both engines.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from deployments.errors import NotFound
from deployments.store.database import Database, DatabaseBacked, Dialect, Location, Row, Tx
from deployments.store.records import check_text

KEY_PREFIX = "pf-"
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
_KEY_HASH = re.compile(r"[0-9a-f]{64}")


def schema(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS api_keys (
            id            {d.text} PRIMARY KEY,
            name          {d.text} NOT NULL,
            key_hash      {d.text} NOT NULL UNIQUE,   -- sha256 hex of the plain key; the key is never stored
            hint          {d.text} NOT NULL,          -- last 4 characters, to tell keys apart in listings
            created_at    DOUBLE PRECISION NOT NULL,
            revoked_at    DOUBLE PRECISION,
            rpm           BIGINT,
            tpm           BIGINT,
            token_budget  BIGINT,
            weight        DOUBLE PRECISION NOT NULL DEFAULT 1
        )""",
        f"""CREATE TABLE IF NOT EXISTS usage (
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


# SUM of a BIGINT is NUMERIC in PostgreSQL: ApiKey takes int() of it.
_SELECT_KEY = (
    "SELECT id, name, key_hash, hint, created_at, revoked_at, rpm, tpm, token_budget, weight,"
    " COALESCE((SELECT SUM(u.total_tokens) FROM usage u WHERE u.key_id = k.id), 0) AS tokens_used"
    " FROM api_keys k"
)
_USAGE_COLUMNS = "key_id, model, day, requests, prompt_tokens, completion_tokens, total_tokens"


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

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def _api_key(row: Row) -> ApiKey:
    fields = {name: row[name] for name in ("id", "name", "hint", "created_at", "revoked_at", "rpm", "tpm",
                                            "token_budget")}
    return ApiKey(**fields, weight=float(row["weight"]), tokens_used=int(row["tokens_used"]))


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id[:64]}'.", param="key_id")


class KeyStore(DatabaseBacked):
    """API keys and usage in the database at ``location``, or in a ``Database`` shared with the
    ``TaskStore``."""

    def __init__(self, location: Location | Database) -> None:
        super().__init__(location, schema)

    def _check_schema(self, tx: Tx) -> None:
        # Migration: `weight` came after the first release of the table.
        if self._db.dialect.name == "postgresql":
            tx.run("ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS weight DOUBLE PRECISION NOT NULL DEFAULT 1")
        elif not any(row["name"] == "weight" for row in tx.rows("PRAGMA table_info(api_keys)")):
            tx.run("ALTER TABLE api_keys ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1")

    def create(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, token_budget: int | None = None,
        weight: float = 1.0, now: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; returns the record and the plain key (shown once, never stored)."""
        check_text(name, "name")
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        with self._db.transaction() as tx:
            tx.run(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at, rpm, tpm, token_budget, weight)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                key_id, name, hash_key(plain), plain[-4:], time.time() if now is None else now, rpm, tpm,
                token_budget, weight,
            )
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

    def list_keys(self) -> list[ApiKey]:
        with self._db.autocommit() as tx:
            return [_api_key(row) for row in tx.rows(f"{_SELECT_KEY} ORDER BY k.created_at, k.id")]

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        if _KEY_ID.fullmatch(key_id) is None:
            raise _key_not_found(key_id)
        with self._db.autocommit() as tx:
            tx.run(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                time.time() if now is None else now, key_id,
            )
        return self.get(key_id)

    def record_usage(self, rows: list[tuple[str, str, int, int, int]], now: float | None = None) -> None:
        """Add ``(key_id, model, requests, prompt_tokens, completion_tokens)`` rows to today's usage."""
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        with self._db.transaction() as tx:
            # Sorted, so two concurrent batches lock their rows in the same order (no deadlock).
            for key_id, model, requests, prompt, completion in sorted(rows):
                tx.run(
                    "INSERT INTO usage (key_id, model, day, requests, prompt_tokens, completion_tokens,"
                    " total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key_id, model, day) DO UPDATE SET"
                    " requests = usage.requests + excluded.requests,"
                    " prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = usage.completion_tokens + excluded.completion_tokens,"
                    " total_tokens = usage.total_tokens + excluded.total_tokens",
                    key_id, model, day, requests, prompt, completion, prompt + completion,
                )

    def usage(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """Usage rows, newest day first; all keys when ``key_id`` is None."""
        if key_id and _KEY_ID.fullmatch(key_id) is None:
            return []  # not a key id, so no key's usage
        where, args = (" WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        with self._db.autocommit() as tx:
            return tx.rows(f"SELECT {_USAGE_COLUMNS} FROM usage{where} ORDER BY day DESC, key_id, model", *args)
