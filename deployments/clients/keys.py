"""API keys and the usage recorded against them, as the TaskStore holds them: ``KeysClient``.

Used by the Gateway (its key index, ``gateway.auth``; the admin routes; ``/v1/usage``), by every
``metering.Meter`` (a key record for work billed to it, usage rows written about once a second —
in the Gateway, the TaskRunner and batch drivers) and by the console (usage pages, charts, the
CSV export, the overview's totals). Ray's failures become ``Overloaded`` naming the task store
(``clients.failures``).
"""

from __future__ import annotations

from deployments.clients.base import HandleClient
from deployments.clients.runs import STORE
from deployments.schemas import DayTokens, KeyList, ModelUsage, UsageCsv, UsageList
from deployments.store import usage as usage_rows
from deployments.store.keys import ApiKey, KeySnapshot
from deployments.store.records import UsageRecord


class KeysClient(HandleClient):
    who = STORE

    # -- keys ------------------------------------------------------------------------------

    async def create(
        self, *, name: str, rpm: int | None = None, tpm: int | None = None, token_budget: int | None = None,
        weight: float = 1.0, scope: str = "tenant",
    ) -> tuple[ApiKey, str]:
        """A new key: its record and the plain key (which exists only in this answer)."""
        created: tuple[ApiKey, str] = await self._answer(
            self.handle.create_key.remote(name, rpm, tpm, token_budget, weight, scope))
        return created

    async def get(self, key_id: str) -> ApiKey | None:
        """The key (revoked ones too), or None."""
        key: ApiKey | None = await self._answer(self.handle.get_key.remote(key_id))
        return key

    async def snapshot(self, *, known_version: int | None, with_usage: bool = True) -> KeySnapshot:
        """What a Gateway replica's key index polls for (``KeyStore.snapshot``)."""
        snapshot: KeySnapshot = await self._answer(self.handle.key_snapshot.remote(known_version, with_usage))
        return snapshot

    async def list_keys(self, *, limit: int, after: str | None = None, order: str = "asc") -> KeyList:
        """A page of keys in creation order (``asc`` or ``desc``) after the key ``after``."""
        listing: KeyList = await self._answer(self.handle.list_keys.remote(limit, after, order))
        return listing

    async def set_limits(
        self, key_id: str, *, rpm: int | None, tpm: int | None, token_budget: int | None, weight: float
    ) -> ApiKey:
        """Replace the key's limits (None: unlimited)."""
        key: ApiKey = await self._answer(self.handle.set_key_limits.remote(key_id, rpm, tpm, token_budget, weight))
        return key

    async def revoke(self, key_id: str) -> ApiKey:
        key: ApiKey = await self._answer(self.handle.revoke_key.remote(key_id))
        return key

    # -- usage -----------------------------------------------------------------------------

    async def record_usage(self, rows: list[UsageRecord]) -> None:
        await self._answer(self.handle.record_usage.remote(rows))

    async def usage(
        self, *, key_id: str | None, since: str | None = None, until: str | None = None,
        limit: int = usage_rows.DEFAULT_LIMIT, cursor: str | None = None,
    ) -> UsageList:
        """A page of usage rows, newest first (``key_id`` None: every key's), and the next cursor."""
        page: UsageList = await self._answer(self.handle.usage.remote(key_id, since, until, limit, cursor))
        return page

    async def usage_csv(
        self, *, key_id: str | None, since: str | None, until: str | None, cursor: str | None
    ) -> UsageCsv:
        """The next page of usage rows as CSV lines (the header first when ``cursor`` is None)."""
        chunk: UsageCsv = await self._answer(self.handle.usage_csv.remote(key_id, since, until, cursor))
        return chunk

    async def tokens_per_day(
        self, days: int, *, key_id: str | None = None, today: str | None = None
    ) -> list[DayTokens]:
        """Tokens of each of the ``days`` days up to ``today`` that has usage (the console's charts)."""
        points: list[DayTokens] = await self._answer(self.handle.tokens_per_day.remote(days, key_id, today))
        return points

    async def today_by_model(self) -> list[ModelUsage]:
        """Today's (UTC) requests and tokens per model, every key together."""
        rows: list[ModelUsage] = await self._answer(self.handle.today_by_model.remote())
        return rows
