"""Metering at the Gateway: per-key limits before a billable request, usage after it.

A key's ``rpm``/``tpm`` are budgets on the shared RateLimiter (``key:<id>``),
so they hold across every Gateway replica. A key may send its burst at once
(``admission.key_burst_s`` seconds' worth of its rate, at least
``admission.key_min_burst`` requests); beyond it requests are paced: each waits
for its slot if the slot starts before the request's deadline
(``gateway.deadline``), and only a request whose slot is further away gets 429,
with Retry-After = when that slot would be free. ``share`` names the caller for
the fair share of a limited model's budget (booked by the worker). A key's ``token_budget``
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

from deployments.config import DEFAULT_ADMISSION_WAIT_S, AdmissionConfig
from deployments.core.booking import BudgetClient, answered_at_once
from deployments.errors import PermissionDenied, RateLimited
from deployments.gateway.caller import Caller
from deployments.gateway.deadline import admission_wait
from deployments.schemas import Budget, Share
from deployments.store.keys import ApiKey

logger = logging.getLogger("ray.serve")

FLUSH_INTERVAL_S = 1.0
MAX_CACHED = 10_000  # per-key budgets and shares kept ready (a plain cache: cleared when full)


class Meter:
    def __init__(
        self, store: DeploymentHandle, limiter: DeploymentHandle, admission: AdmissionConfig | None = None
    ) -> None:
        self.store = store
        self.admission = admission or AdmissionConfig()
        # A key's own budget never queues (one tenant): its bookings are answered at once, so a plain
        # call does (cheaper than the stream a shared model budget needs).
        self.budgets = BudgetClient(answered_at_once(limiter.reserve_now.remote))
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flusher: asyncio.Task[None] | None = None
        self.key_budgets: dict[tuple[str, int | None, int | None], Budget] = {}
        self.shares: dict[tuple[str, float, bool], Share] = {}

    def deadline(self, client_timeout_s: float | None, default_wait_s: float = DEFAULT_ADMISSION_WAIT_S) -> float:
        """The monotonic time by which a request's slot must start (``gateway.deadline``)."""
        return time.monotonic() + admission_wait(client_timeout_s, default_wait_s, self.admission.max_wait_s)

    def share(self, caller: Caller, background: bool = False) -> Share | None:
        """The caller's place in a model's fair queue (None: anonymous)."""
        entry = caller.entry
        if entry is None:
            return None
        key = (entry.key.id, entry.key.weight, background)
        share = self.shares.get(key)
        if share is None:
            if len(self.shares) >= MAX_CACHED:
                self.shares.clear()
            share = self.shares[key] = Share(tenant=entry.key.id, weight=entry.key.weight, background=background)
        return share

    def _budget(self, key: ApiKey) -> Budget:
        cache_key = (key.id, key.rpm, key.tpm)
        budget = self.key_budgets.get(cache_key)
        if budget is None:
            if len(self.key_budgets) >= MAX_CACHED:
                self.key_budgets.clear()
            rpm_burst, tpm_burst = self.admission.key_bursts(key.rpm, key.tpm)
            budget = self.key_budgets[cache_key] = Budget(
                rpm=key.rpm, tpm=key.tpm, rpm_burst=rpm_burst, tpm_burst=tpm_burst
            )
        return budget

    async def admit(self, caller: Caller, tokens: int, deadline: float | None = None) -> None:
        """Enforce the caller's budget and rpm/tpm before a billable request: return when its slot
        has come, or raise RateLimited if the slot is not due before ``deadline`` (monotonic;
        None: the default wait)."""
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
        if deadline is None:
            deadline = self.deadline(None)
        retry_after = await self.budgets.acquire(
            f"key:{key.id}", self._budget(key), 1, tokens if key.tpm else 0, deadline
        )
        if retry_after is not None:
            raise RateLimited(
                f"This API key is over its rate limit; its next slot is {retry_after:.1f}s away, past this "
                "request's deadline.",
                retry_after=retry_after,
            )

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
            self.budgets.settle(f"key:{key.id}", self._budget(key), prompt + completion - estimated)
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
