"""API keys and token usage, in the TaskStore's SQLite file (pure; no Ray).

Keys are random (256 bits, ``pf-…``) and stored only as their SHA-256 hex
digest: with that much entropy a plain hash is what GitHub and Stripe do, and a
slow KDF would only cost latency. The plain key is returned once, by
``create``. A lookup finds the row by digest and then compares digests with
``hmac.compare_digest`` so the comparison itself leaks no timing.

Usage is kept per key, per model, per UTC day: requests and tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.errors import NotFound

KEY_PREFIX = "pf-"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        key_hash      TEXT NOT NULL UNIQUE,   -- sha256 hex of the plain key; the key is never stored
        hint          TEXT NOT NULL,          -- last 4 characters, to tell keys apart in listings
        created_at    REAL NOT NULL,
        revoked_at    REAL,
        rpm           INTEGER,
        tpm           INTEGER,
        token_budget  INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        key_id             TEXT NOT NULL,
        model              TEXT NOT NULL,
        day                TEXT NOT NULL,     -- UTC date, YYYY-MM-DD
        requests           INTEGER NOT NULL DEFAULT 0,
        prompt_tokens      INTEGER NOT NULL DEFAULT 0,
        completion_tokens  INTEGER NOT NULL DEFAULT 0,
        total_tokens       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, model, day)
    )""",
]


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
    tokens_used: int = 0

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        for statement in _SCHEMA:
            self._conn.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _key(self, row: sqlite3.Row) -> ApiKey:
        used = self._conn.execute(
            "SELECT COALESCE(SUM(total_tokens), 0) FROM usage WHERE key_id = ?", (row["id"],)
        ).fetchone()[0]
        return ApiKey(
            id=row["id"],
            name=row["name"],
            hint=row["hint"],
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
            rpm=row["rpm"],
            tpm=row["tpm"],
            token_budget=row["token_budget"],
            tokens_used=int(used),
        )

    def create(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, token_budget: int | None = None,
        now: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; returns the record and the plain key (shown once, never stored)."""
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at, rpm, tpm, token_budget)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, hash_key(plain), plain[-4:], time.time() if now is None else now, rpm, tpm,
                 token_budget),
            )
            row = self._conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            return self._key(row), plain

    def lookup(self, key_hash: str) -> ApiKey | None:
        """The active key with this digest, or None (unknown or revoked)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
            if row is None or not hmac.compare_digest(row["key_hash"], key_hash) or row["revoked_at"]:
                return None
            return self._key(row)

    def get(self, key_id: str) -> ApiKey:
        with self._lock:
            row = self._conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"No API key with id '{key_id[:64]}'.", param="key_id")
            return self._key(row)

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
            return [self._key(row) for row in rows]

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (time.time() if now is None else now, key_id),
            )
        return self.get(key_id)

    def record_usage(self, rows: list[tuple[str, str, int, int, int]], now: float | None = None) -> None:
        """Add ``(key_id, model, requests, prompt_tokens, completion_tokens)`` rows to today's usage."""
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for key_id, model, requests, prompt, completion in rows:
                    self._conn.execute(
                        "INSERT INTO usage (key_id, model, day, requests, prompt_tokens, completion_tokens,"
                        " total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (key_id, model, day) DO UPDATE SET"
                        " requests = requests + excluded.requests,"
                        " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                        " completion_tokens = completion_tokens + excluded.completion_tokens,"
                        " total_tokens = total_tokens + excluded.total_tokens",
                        (key_id, model, day, requests, prompt, completion, prompt + completion),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def usage(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """Usage rows, newest day first; all keys when ``key_id`` is None."""
        sql = "SELECT * FROM usage" + (" WHERE key_id = ?" if key_id else "") + " ORDER BY day DESC, key_id, model"
        with self._lock:
            rows = self._conn.execute(sql, (key_id,) if key_id else ()).fetchall()
            return [dict(row) for row in rows]
