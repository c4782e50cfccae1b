"""Key management and usage routes of the Gateway.

    POST   /v1/admin/keys          create a key (admin); the plain key is in this response only
    GET    /v1/admin/keys?limit=&after=&order=   a page of keys in creation order (admin)
    PATCH  /v1/admin/keys/{id}     replace a key's limits: rpm, tpm, token_budget, weight (admin)
    DELETE /v1/admin/keys/{id}     revoke a key (admin): its queued runs and unfinished batches are
                                   cancelled too
    GET    /v1/usage?key_id=&since=&until=&limit=&cursor=   a page of the caller's token usage per
                                   model and day, newest first (admin: every key's, or ?key_id=)

Both lists are keyset pages, so a page costs the same with 10 keys or 10,000 and with a year of
usage: keys as OpenAI's admin key list pages them (``after`` the last id, ``has_more``), usage by
an opaque ``cursor`` (``next_cursor``), as ``GET /v1/runs``. The limits are checked here for the
API reference and again by the store, which names the parameter of any bad value (``after``,
``cursor``, ``since``, ``until``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from deployments.clients.batches import BatchClient
from deployments.clients.keys import KeysClient
from deployments.clients.runs import RunsClient
from deployments.gateway.auth import Authenticator, checked_caller, require_admin
from deployments.gateway.caller import Caller, get_caller
from deployments.gateway.json_body import v1_router
from deployments.limits.metering import Meter
from deployments.schemas import KeyCreate, KeyCreated, KeyLimits, KeyList, KeyView, UsageList
from deployments.store import usage as usage_rows
from deployments.store.keys import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, ApiKey

logger = logging.getLogger("ray.serve")


def key_view(key: ApiKey) -> KeyView:
    return KeyView(**dataclasses.asdict(key))


class KeyAdmin:
    """What the admin does to keys, for the JSON routes and the console alike (the caller is the admin).
    A revoked key's queued runs and unfinished batches are cancelled with it."""

    def __init__(self, keys: KeysClient, runs: RunsClient, auth: Authenticator, batches: BatchClient | None) -> None:
        self.keys, self.runs, self.auth, self.batches = keys, runs, auth, batches

    async def create(self, body: KeyCreate) -> KeyCreated:
        key, plain = await self.keys.create(name=body.name, rpm=body.rpm, tpm=body.tpm,
                                            token_budget=body.token_budget, weight=body.weight, scope=body.scope)
        self.auth.keys_changed()
        return KeyCreated(**dataclasses.asdict(key), key=plain)

    async def set_limits(self, key_id: str, body: KeyLimits) -> KeyView:
        # A merge patch: the limits the body names change (null: unlimited), the others stay — raising
        # a key's rpm must not silently lift its token budget.
        limits = body
        if body.model_fields_set != set(KeyLimits.model_fields):
            current = await self.keys.get(key_id)
            if current is not None:  # (an unknown key: the store's 404 below)
                kept = {name: getattr(current, name) for name in KeyLimits.model_fields
                        if name not in body.model_fields_set}
                limits = body.model_copy(update=kept)
        key = await self.keys.set_limits(key_id, rpm=limits.rpm, tpm=limits.tpm, token_budget=limits.token_budget,
                                         weight=limits.weight)
        self.auth.keys_changed()
        return key_view(key)

    async def revoke(self, key_id: str) -> KeyView:
        key = await self.keys.revoke(key_id)
        self.auth.forget(key_id)
        # Work the key queued must not run on after it: queued runs and unfinished batches end here
        # (running runs finish; their results stay with the revoked key).
        runs = await self.runs.cancel_queued(key_id)
        cancelled = await self.batches.cancel_owner(key_id) if self.batches is not None else 0
        logger.info("revoked %s: cancelled %d queued runs, %s batches", key_id, runs, cancelled)
        return key_view(key)

    async def list(self, limit: int = DEFAULT_LIST_LIMIT, after: str | None = None, order: str = "asc") -> KeyList:
        return await self.keys.list_keys(limit=limit, after=after, order=order)


def build_admin_router(key_admin: KeyAdmin, meter: Meter) -> APIRouter:
    router = v1_router("keys")
    enabled = key_admin.auth.config.enabled
    admin = Depends(checked_caller(require_admin, enabled))  # a default, not Annotated: see auth.checked_caller

    @router.post("/admin/keys", status_code=201, response_model=KeyCreated)
    async def create_key(body: KeyCreate, caller: Caller = admin) -> KeyCreated:
        return await key_admin.create(body)

    @router.get("/admin/keys", response_model=KeyList)
    async def list_keys(
        caller: Caller = admin,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description=(
            f"Keys per page, 1 to {MAX_LIST_LIMIT}."))] = DEFAULT_LIST_LIMIT,
        after: Annotated[str | None, Query(max_length=64, description=(
            "A key id: the page starts after it (the `last_id` of the page before)."))] = None,
        order: Annotated[Literal["asc", "desc"], Query(description=(
            "Creation order: `asc` oldest first (the default), `desc` newest first."))] = "asc",
    ) -> KeyList:
        return await key_admin.list(limit, after, order)

    @router.patch("/admin/keys/{key_id}", response_model=KeyView)
    async def set_key_limits(
        key_id: Annotated[str, Path(max_length=64)], body: KeyLimits, caller: Caller = admin
    ) -> KeyView:
        return await key_admin.set_limits(key_id, body)

    @router.delete("/admin/keys/{key_id}", response_model=KeyView)
    async def revoke_key(
        key_id: Annotated[str, Path(max_length=64)], caller: Caller = admin
    ) -> KeyView:
        return await key_admin.revoke(key_id)

    @router.get("/usage", response_model=UsageList)
    async def usage(
        caller: Annotated[Caller, Depends(get_caller)],
        key_id: Annotated[str | None, Query(max_length=64, description=(
            "Admin only: this key's usage (empty: every key's). A tenant key always gets its own."))] = None,
        since: Annotated[str | None, Query(max_length=10, description=(
            "First UTC day, YYYY-MM-DD (included)."))] = None,
        until: Annotated[str | None, Query(max_length=10, description=(
            "Last UTC day, YYYY-MM-DD (included); not before `since`."))] = None,
        limit: Annotated[int, Query(ge=1, le=usage_rows.MAX_LIMIT, description=(
            f"Rows per page, 1 to {usage_rows.MAX_LIMIT}."))] = usage_rows.DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(max_length=400, description=(
            "The `next_cursor` of the page before, with the same filters."))] = None,
    ) -> UsageList:
        await meter.flush()  # include this replica's last second
        # A tenant's key_id is ignored, not refused: its own usage is all it may read.
        owner = key_id if caller.is_admin or not enabled else caller.owner
        return await key_admin.keys.usage(key_id=owner, since=since, until=until, limit=limit, cursor=cursor)

    return router
