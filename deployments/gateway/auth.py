"""Authentication at the Gateway: who is calling.

With ``auth.enabled`` every /v1 request needs ``Authorization: Bearer <key>``.
The admin key comes from the environment variable ``auth.admin_key_env``;
other keys live hashed in the TaskStore. What a key may spend is
``deployments.limits.metering``'s business.

Each Gateway replica keeps an index of every *active* key, by digest (``KeyIndex``),
so authenticating a request is a hash and a dict lookup — no store round trip, and
in particular none per distinct bogus key: a flood of made-up keys costs the store
nothing, however many different keys it tries. The index is refreshed from the store
(``TaskStore.key_snapshot``: one primary-key read of the keys' version, the key list
only when it changed, and every key's token count):

- when it is older than ``auth.cache_ttl_s`` (so a key revoked through another replica
  stops working, and budgets see other replicas' usage, within that time);
- on a miss: the answer waits for a refresh that *starts after the request arrived*, so a key
  created through any replica works on every replica from its first request (a client that
  creates a key and uses it at once, on whichever replica, is never refused). Misses share that
  refresh, and it starts no sooner than ``MISS_RECHECK_S`` after the previous one: a flood of
  bogus keys causes at most one store call per ``MISS_RECHECK_S``, and each bogus key's 401
  comes after up to that long (a fresh key's first request can wait as long, once);
- at once after a create or revoke through this replica.

Concurrent refreshes are one call (single flight). If the store cannot be reached the
last index stays in use; before the first one has loaded, requests get 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from fastapi import Depends, Request

from deployments.clients.keys import KeysClient
from deployments.config import AuthConfig
from deployments.errors import AuthenticationFailed, Overloaded, PermissionDenied
from deployments.gateway.caller import ANONYMOUS, Caller, get_caller
from deployments.limits.metering import KeyEntry
from deployments.store.keys import KeySnapshot, hash_key

logger = logging.getLogger("ray.serve")

ADMIN = Caller(owner="admin", key_id=None, is_admin=True)
MISS_RECHECK_S = 0.25


class UnwrittenUsage(Protocol):
    """Usage this process recorded that a key snapshot may not include (``limits.metering.Meter``)."""

    def mark(self) -> int: ...

    def unwritten_since(self, mark: int) -> Mapping[str, int]: ...


class KeyIndex:
    """The active keys of one Gateway replica, by digest (pure; fed ``KeySnapshot``s)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.entries: dict[str, KeyEntry] = {}  # digest -> entry
        self.digests: dict[str, str] = {}  # key id -> digest

    @property
    def loaded(self) -> bool:
        return self.version is not None

    def get(self, digest: str) -> KeyEntry | None:
        return self.entries.get(digest)

    def apply(self, snapshot: KeySnapshot, now: float, unwritten: Mapping[str, int] | None = None) -> None:
        """Take a snapshot: its key list if it has one (the list changed), its token counts if any.
        ``unwritten``: tokens per key this process recorded that the snapshot may not include
        (``Meter.unwritten_since``); without token counts, the entries keep what they had counted."""
        keys = snapshot.keys if snapshot.keys is not None else {d: e.key for d, e in self.entries.items()}
        if snapshot.tokens_used is not None:
            tokens = snapshot.tokens_used
            keys = {d: dataclasses.replace(k, tokens_used=tokens.get(k.id, 0)) for d, k in keys.items()}
            since = unwritten or {}
            self.entries = {digest: KeyEntry(key=key, fetched_at=now, tokens_since_fetch=since.get(key.id, 0))
                            for digest, key in keys.items()}
        else:
            old = self.entries
            self.entries = {digest: KeyEntry(key=key, fetched_at=now,
                                             tokens_since_fetch=old[digest].tokens_since_fetch if digest in old else 0)
                            for digest, key in keys.items()}
        self.digests = {key.id: digest for digest, key in keys.items()}
        self.version = snapshot.version

    def forget(self, key_id: str) -> None:
        digest = self.digests.pop(key_id, None)
        if digest is not None:
            self.entries.pop(digest, None)


class Authenticator:
    """Finds the ``Caller`` of a request (see the module docstring). ``clock`` is monotonic seconds."""

    def __init__(
        self,
        config: AuthConfig,
        keys: KeysClient,
        admin_key: str | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        usage: UnwrittenUsage | None = None,
    ) -> None:
        self.config = config
        self.usage = usage  # the Gateway's Meter: its usage a refresh may not see yet
        self.keys = keys
        self.admin_key = admin_key
        self.clock, self.sleep = clock, sleep
        self.index = KeyIndex()
        self.checked_at: float | None = None  # when the last finished refresh asked the store
        self.started_at: float | None = None  # when the last refresh (finished or not) asked it
        self.refreshing: asyncio.Task[None] | None = None
        self.recheck: asyncio.Task[None] | None = None  # the next refresh for misses, not begun

    async def authenticate(self, request: Request) -> Caller:
        """The caller of ``request``; stored on ``request.state.caller`` for the routes."""
        if not self.config.enabled:
            request.state.caller = ANONYMOUS
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed(
                "Missing API key: send `Authorization: Bearer <key>`.", param="Authorization"
            )
        caller = await self.identify(token.strip())
        request.state.caller = caller
        return caller

    async def identify(self, token: str) -> Caller:
        """The caller whose key is ``token`` (the admin, or an active key); 401 for any other."""
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return ADMIN
        entry = await self.lookup(hash_key(token))
        if entry is None:
            raise AuthenticationFailed("Invalid or revoked API key.", param="Authorization")
        return Caller(owner=entry.key.id, key_id=entry.key.id, entry=entry)

    async def lookup(self, digest: str) -> KeyEntry | None:
        """The active key with this digest, from the index (refreshed as the module doc says)."""
        await self._refresh_if_older(self.config.cache_ttl_s)
        entry = self.index.get(digest)
        if entry is None:
            await self._recheck_after_miss()
            entry = self.index.get(digest)
        return entry

    def keys_changed(self) -> None:
        """A key was created through this replica: check the store at the next lookup."""
        self.checked_at = None

    def forget(self, key_id: str) -> None:
        """A key was revoked through this replica: it stops working here at once."""
        self.index.forget(key_id)
        self.checked_at = None

    async def _refresh_if_older(self, max_age_s: float) -> None:
        if self.checked_at is not None and self.clock() - self.checked_at < max_age_s:
            return
        if self.refreshing is None or self.refreshing.done():
            self._start_refresh()
        assert self.refreshing is not None
        # shield: a caller that goes away must not cancel the refresh the others wait for.
        await asyncio.shield(self.refreshing)
        self._require_loaded()

    async def _recheck_after_miss(self) -> None:
        """Wait for a refresh that asks the store after now (shared by every miss until it asks)."""
        if self.recheck is None:
            self.recheck = asyncio.get_running_loop().create_task(self._recheck())
        await asyncio.shield(self.recheck)
        self._require_loaded()

    async def _recheck(self) -> None:
        if self.started_at is not None:
            await self.sleep(max(0.0, self.started_at + MISS_RECHECK_S - self.clock()))
        # One running now began before some of the misses waiting here arrived: not enough for them.
        while self.refreshing is not None and not self.refreshing.done():
            await asyncio.shield(self.refreshing)
        self.recheck = None  # misses from here on wait for the next one
        refreshing = self._start_refresh()
        await refreshing

    def _start_refresh(self) -> asyncio.Task[None]:
        self.started_at = self.clock()
        self.refreshing = asyncio.get_running_loop().create_task(self._refresh(self.started_at))
        return self.refreshing

    def _require_loaded(self) -> None:
        if not self.index.loaded:
            raise Overloaded("Authentication is unavailable; retry shortly.", retry_after=1)

    async def _refresh(self, started: float) -> None:
        mark = self.usage.mark() if self.usage is not None else 0
        try:
            snapshot = await self.keys.snapshot(known_version=self.index.version, with_usage=True)
        except Exception:
            # Keep the last index (a store restart must not lock every tenant out), and do not
            # ask again before the next period: a down store is not hammered by every request.
            logger.warning("could not refresh the key index; keeping the last one", exc_info=True)
        else:
            self.index.apply(snapshot, started, self.usage.unwritten_since(mark) if self.usage is not None else None)
        self.checked_at = started


_CALLER = Depends(get_caller)


def checked_caller(
    require: Callable[[Caller, bool], None], auth_enabled: bool
) -> Callable[[Caller], Awaitable[Caller]]:
    """A route dependency: the caller, after ``require`` (``require_admin``, ``require_prompts``).
    Dependencies run before FastAPI validates the query and body, so a caller without the right
    gets 403 whatever it sent (not a 400 describing the route's fields)."""

    # The Depends as a default, not in Annotated: this module's annotations are strings, and FastAPI
    # resolves them in the module's globals, where a closure's names are not.
    async def checked(caller: Caller = _CALLER) -> Caller:
        require(caller, auth_enabled)
        return caller

    return checked


def require_admin(caller: Caller, auth_enabled: bool) -> None:
    # With authentication off (a local single-user start) whoever can reach the port is the admin.
    if auth_enabled and not caller.is_admin:
        raise PermissionDenied("This needs the admin key.", param="Authorization")


def require_prompts(caller: Caller, auth_enabled: bool) -> None:
    """Task management (check, render, push, roll back, history): the admin or a ``prompts`` key."""
    if auth_enabled and not caller.manages_prompts:
        raise PermissionDenied("This needs a key with the prompts scope (or the admin key).", param="Authorization")
