"""Console sign-in state: a signed session cookie and a CSRF token (pure; no I/O).

A session is the cookie ``<issued>.<nonce>.<signature>``: HMAC-SHA256 over ``issued.nonce`` with a
secret derived from the admin key, so every Gateway replica (each derives the same secret) accepts
the sessions of the others, the key itself never travels after sign-in, and changing the admin key
ends every session. A session lasts ``SESSION_S``; signing out clears the cookie (sessions are not
kept server-side, so a copied cookie stays valid until it expires — it is HttpOnly and
SameSite=Strict, and never in a URL).

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


def valid(secret: bytes, cookie: str | None, now: float | None = None) -> bool:
    """Whether ``cookie`` is a session this secret signed, not older than ``SESSION_S``."""
    if not cookie or len(cookie) > 200:
        return False
    payload, _, signature = cookie.rpartition(".")
    issued, _, _nonce = payload.partition(".")
    if not issued.isdigit() or not hmac.compare_digest(signature, _sign(secret, payload)):
        return False
    age = (time.time() if now is None else now) - int(issued)
    return 0 <= age < SESSION_S


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(cookie: str | None, submitted: str | None) -> bool:
    """The form's token equals the cookie's (both present)."""
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode())
