"""Console sign-in state: a signed session cookie and a CSRF token (pure; no I/O).

A session is the cookie ``<issued>.<nonce>.<signature>``: HMAC-SHA256 over ``issued.nonce`` with a
secret derived from the admin key, so every Gateway replica (each derives the same secret) accepts
the sessions of the others, the key itself never travels after sign-in, and changing the admin key
ends every session. A session lasts ``SESSION_S``. Signing out clears the cookie and records the
session's id (its nonce) in the store until it would have expired, and every replica refuses a
recorded session: a copy of the cookie stops working too.

CSRF: every POST form carries a token that must equal the ``pf_csrf`` cookie (double submit). A page
of another site can neither read that cookie nor make the browser send it (SameSite=Strict), so
it cannot forge a form. The same check protects the console with authentication off, where there
is no session at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "pf_console"
CSRF_COOKIE = "pf_csrf"
CSRF_FIELD = "csrf_token"
SESSION_S = 12 * 3600


def session_secret(admin_key: str) -> bytes:
    """The signing secret: the same on every replica that has the same admin key."""
    return hmac.new(admin_key.encode(), b"promptfleet console session v1", hashlib.sha256).digest()


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue(secret: bytes, now: float | None = None) -> str:
    """A new session cookie value."""
    payload = f"{int(time.time() if now is None else now)}.{secrets.token_hex(16)}"
    return f"{payload}.{_sign(secret, payload)}"


@dataclass(frozen=True)
class Session:
    id: str  # the nonce: what a sign-out records
    expires_at: float


def parse(secret: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session of ``cookie`` if this secret signed it and it is not older than ``SESSION_S``."""
    if not cookie or len(cookie) > 200:
        return None
    payload, _, signature = cookie.rpartition(".")
    issued, _, nonce = payload.partition(".")
    if not issued.isdigit() or not nonce or not hmac.compare_digest(signature, _sign(secret, payload)):
        return None
    age = (time.time() if now is None else now) - int(issued)
    if not 0 <= age < SESSION_S:
        return None
    return Session(id=nonce, expires_at=int(issued) + SESSION_S)


def valid(secret: bytes, cookie: str | None, now: float | None = None) -> bool:
    """Whether ``cookie`` is a session this secret signed, not older than ``SESSION_S`` (the signature
    only: whether it was signed out is the store's to say)."""
    return parse(secret, cookie, now) is not None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(cookie: str | None, submitted: str | None) -> bool:
    """The form's token equals the cookie's (both present)."""
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode())
