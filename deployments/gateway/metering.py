"""Metering at the Gateway: per-key limits before a billable request, usage after it.

A key's ``rpm``/``tpm`` are budgets on the shared RateLimiter (``key:<id>``),
so they hold across every Gateway replica; over the limit answers 429 with
Retry-After at once (a client's limit never queues). A key's ``token_budget``
is checked against the tokens recorded for it; usage is accumulated here and
written to the store about once a second, so a budget can be overrun by what
is in flight during that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.core.booking import BudgetClient
from deployments.core.limits import Budget
from deployments.core.replies import unwrap
from deployments.errors import PermissionDenied, RateLimited
from deployments.gateway.caller import Caller
from deployments.store.records import UsageRecord

logger = logging.getLogger("ray.serve")

FLUSH_INTERVAL_S = 1.0


class Meter:
    def __init__(self, store: DeploymentHandle, limiter: DeploymentHandle) -> None:
        self.store = store
        self.budgets = BudgetClient(limiter.reserve.remote)
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flusher: asyncio.Task[None] | None = None

    async def admit(self, caller: Caller, tokens: int) -> None:
        """Enforce the caller's budget and rpm/tpm before a billable request."""
        entry = caller.entry
        if entry is None:
            return
        key = entry.key
        if key.token_budget is not None and entry.tokens_used >= key.token_budget:
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

    def record(self, caller: Caller, model: str, usage: dict[str, Any] | None, estimated: int = 0) -> None:
        """Count a finished request's tokens for the caller's key (and settle its tpm estimate)."""
        entry = caller.entry
        if caller.key_id is None or entry is None:
            return
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        row = self.pending[(caller.key_id, model)]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        entry.tokens_since_fetch += prompt + completion
        key = entry.key
        if key.tpm is not None and estimated:
            self.budgets.settle(f"key:{key.id}", Budget(rpm=key.rpm, tpm=key.tpm), prompt + completion - estimated)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        rows = [UsageRecord(key_id, model, *r) for (key_id, model), r in self.pending.items()]
        self.pending.clear()
        try:
            unwrap(await self.store.record_usage.remote(rows))
        except Exception:
            logger.exception("could not record usage; %d rows kept for the next flush", len(rows))
            for usage in rows:
                row = self.pending[(usage.key_id, usage.model)]
                row[0] += usage.requests
                row[1] += usage.prompt_tokens
                row[2] += usage.completion_tokens

    async def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        await self.flush()
        await self.budgets.close()
