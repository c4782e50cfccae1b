"""Authentication, per-key limits and usage metering at the Gateway.

With ``auth.enabled`` every /v1 request needs ``Authorization: Bearer <key>``.
The admin key comes from the environment variable ``auth.admin_key_env``;
other keys live hashed in the TaskStore. A Gateway replica caches a key's
record for ``auth.cache_ttl_s`` (a revoked key stops working within that time)
so a request costs no store round trip.

Per-key ``rpm``/``tpm`` are budgets on the shared RateLimiter (``key:<id>``),
so they hold across every Gateway replica; over the limit answers 429 with
Retry-After at once (a client's limit never queues). A key's ``token_budget``
is checked against the tokens recorded for it; usage is accumulated here and
written to the store about once a second, so a budget can be overrun by what
is in flight during that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from ray.serve.handle import DeploymentHandle

from deployments.config import AuthConfig
from deployments.core.booking import BudgetClient
from deployments.errors import AuthenticationFailed, PermissionDenied, RateLimited
from deployments.gateway.caller import ANONYMOUS, Caller
from deployments.rate_limiter import Budget
from deployments.store.keys import ApiKey, hash_key

logger = logging.getLogger("ray.serve")

ADMIN = Caller(owner="admin", key_id=None, is_admin=True)
FLUSH_INTERVAL_S = 1.0


@dataclass
class _Cached:
    key: ApiKey | None
    fetched_at: float
    tokens_since_fetch: int = 0


class Authenticator:
    def __init__(
        self,
        config: AuthConfig,
        store: DeploymentHandle,
        limiter: DeploymentHandle,
        admin_key: str | None,
    ) -> None:
        self.config = config
        self.store = store
        self.budgets = BudgetClient(limiter.reserve.remote)
        self.admin_key = admin_key
        self.cache: dict[str, _Cached] = {}
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flusher: asyncio.Task[None] | None = None

    # -- who is calling -------------------------------------------------------------------

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
        key = await self._lookup(hash_key(token))
        if key is None:
            raise AuthenticationFailed("Invalid or revoked API key.", param="Authorization")
        caller = Caller(owner=key.id, key_id=key.id)
        request.state.caller = caller
        return caller

    async def _lookup(self, digest: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self.cache.get(digest)
        if cached is None or now - cached.fetched_at > self.config.cache_ttl_s:
            key = await self.store.lookup_key.remote(digest)
            cached = _Cached(key=key, fetched_at=now)
            self.cache[digest] = cached
            if len(self.cache) > 100_000:  # bounded: garbage keys must not grow memory forever
                self.cache.clear()
        return cached.key

    def forget(self, key_id: str) -> None:
        """Drop a key from this replica's cache (after a revoke through this replica)."""
        for digest, cached in list(self.cache.items()):
            if cached.key is not None and cached.key.id == key_id:
                del self.cache[digest]

    # -- limits -------------------------------------------------------------------------

    async def admit(self, caller: Caller, tokens: int) -> None:
        """Enforce the caller's budget and rpm/tpm before a billable request."""
        if caller.key_id is None:
            return
        key = self._cached_key(caller.key_id)
        if key is None:
            return
        if key.token_budget is not None and self.tokens_used(key) >= key.token_budget:
            raise PermissionDenied(
                f"The token budget of this API key ({key.token_budget} tokens) is exhausted.",
                param="Authorization",
            )
        if key.rpm is None and key.tpm is None:
            return
        # Deadline "now": a client's limit never queues, over it answers 429 at once.
        retry_after = await self.budgets.acquire(
            f"key:{key.id}", Budget(rpm=key.rpm, tpm=key.tpm), 1, tokens if key.tpm else 0, time.monotonic()
        )
        if retry_after is not None:
            raise RateLimited("This API key is over its rate limit.", retry_after=retry_after)

    def _cached_key(self, key_id: str) -> ApiKey | None:
        for cached in self.cache.values():
            if cached.key is not None and cached.key.id == key_id:
                return cached.key
        return None

    def tokens_used(self, key: ApiKey) -> int:
        local = sum(c.tokens_since_fetch for c in self.cache.values() if c.key is not None and c.key.id == key.id)
        return key.tokens_used + local

    # -- usage ---------------------------------------------------------------------------

    def record(self, caller: Caller, model: str, usage: dict[str, Any] | None, estimated: int = 0) -> None:
        """Count a finished request's tokens for the caller's key (and settle its tpm estimate)."""
        if caller.key_id is None:
            return
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        row = self.pending[(caller.key_id, model)]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        for cached in self.cache.values():
            if cached.key is not None and cached.key.id == caller.key_id:
                cached.tokens_since_fetch += prompt + completion
        key = self._cached_key(caller.key_id)
        if key is not None and key.tpm is not None and estimated:
            self.budgets.settle(f"key:{key.id}", Budget(rpm=key.rpm, tpm=key.tpm), prompt + completion - estimated)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        rows = [(key_id, model, r[0], r[1], r[2]) for (key_id, model), r in self.pending.items()]
        self.pending.clear()
        try:
            await self.store.record_usage.remote(rows)
        except Exception:
            logger.exception("could not record usage; %d rows kept for the next flush", len(rows))
            for key_id, model, requests, prompt, completion in rows:
                row = self.pending[(key_id, model)]
                row[0] += requests
                row[1] += prompt
                row[2] += completion

    async def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        await self.flush()
        await self.budgets.close()


def require_admin(caller: Caller, auth_enabled: bool) -> None:
    # With authentication off (a local single-user start) whoever can reach the port is the admin.
    if auth_enabled and not caller.is_admin:
        raise PermissionDenied("This needs the admin key.", param="Authorization")
