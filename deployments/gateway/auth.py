"""Authentication at the Gateway: who is calling.

With ``auth.enabled`` every /v1 request needs ``Authorization: Bearer <key>``.
The admin key comes from the environment variable ``auth.admin_key_env``;
other keys live hashed in the TaskStore. A Gateway replica caches a key's
record for ``auth.cache_ttl_s`` (a revoked key stops working within that time)
so a request costs no store round trip. What a key may spend is
``deployments.gateway.metering``'s business.
"""

from __future__ import annotations

import hmac
import time

from fastapi import Request
from ray.serve.handle import DeploymentHandle

from deployments.config import AuthConfig
from deployments.errors import AuthenticationFailed, PermissionDenied
from deployments.gateway.caller import ANONYMOUS, Caller, KeyEntry
from deployments.store.keys import ApiKey, hash_key

ADMIN = Caller(owner="admin", key_id=None, is_admin=True)
MAX_CACHED_KEYS = 100_000  # bounded: garbage keys must not grow memory forever


class Authenticator:
    def __init__(self, config: AuthConfig, store: DeploymentHandle, admin_key: str | None) -> None:
        self.config = config
        self.store = store
        self.admin_key = admin_key
        # digest -> (entry or None for "no such key", fetched_at); by_id finds a key's entry.
        self.cache: dict[str, tuple[KeyEntry | None, float]] = {}
        self.by_id: dict[str, str] = {}

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
        token = token.strip()
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            request.state.caller = ADMIN
            return ADMIN
        entry = await self._lookup(hash_key(token))
        if entry is None:
            raise AuthenticationFailed("Invalid or revoked API key.", param="Authorization")
        caller = Caller(owner=entry.key.id, key_id=entry.key.id, entry=entry)
        request.state.caller = caller
        return caller

    async def _lookup(self, digest: str) -> KeyEntry | None:
        now = time.monotonic()
        cached = self.cache.get(digest)
        if cached is not None and now - cached[1] <= self.config.cache_ttl_s:
            return cached[0]
        key: ApiKey | None = await self.store.lookup_key.remote(digest)
        entry = KeyEntry(key=key, fetched_at=now) if key is not None else None
        if len(self.cache) >= MAX_CACHED_KEYS:
            self.cache.clear()
            self.by_id.clear()
        self.cache[digest] = (entry, now)
        if key is not None:
            self.by_id[key.id] = digest
        return entry

    def forget(self, key_id: str) -> None:
        """Drop a key from this replica's cache (after a revoke through this replica)."""
        digest = self.by_id.pop(key_id, None)
        if digest is not None:
            self.cache.pop(digest, None)


def require_admin(caller: Caller, auth_enabled: bool) -> None:
    # With authentication off (a local single-user start) whoever can reach the port is the admin.
    if auth_enabled and not caller.is_admin:
        raise PermissionDenied("This needs the admin key.", param="Authorization")
