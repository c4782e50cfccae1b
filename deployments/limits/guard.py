"""The upstream guard: admission of calls to one upstream model, in one worker replica.

Before each upstream call: the replica's circuit breaker (fail fast while the
upstream is failing), the model-wide pause (an upstream 429 with Retry-After,
shared by every replica through the RateLimiter), and, if the model has
``rpm``/``tpm`` limits, a booking on the shared budget (coalesced with the
replica's other bookings by ``BookingClient``). The booking carries the call's
``Share`` (its key, weight and priority), so when calls of several keys wait
for the model the RateLimiter hands out slots by fair share, not arrival. After the call: the
breaker learns the outcome and the token estimate is settled with real usage.

The pause is known locally: a background long-poll (``watch_pause``) keeps it
current, so a model without limits pays no limiter round trip per request. A
pause is never longer than the model's ``max_retry_after_s``, whoever asked for it.

Refusals here happen before anything is sent upstream: ``ModelRateLimited``
(budget or pause would not let the call start within its deadline) and
``CircuitOpen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ray.serve.handle import DeploymentHandle

from deployments.errors import CircuitOpen, ModelRateLimited
from deployments.limits.booking import BookingClient
from deployments.limits.breaker import BreakerState, CircuitBreaker
from deployments.schemas import Budget, Share
from deployments.telemetry import NULL, Metrics

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_PAUSE_S = 60.0
ANONYMOUS_SHARE = Share(tenant="anonymous")


class UpstreamGuard:
    """Upstream admission for one model in this worker replica: breaker, pause, model budget."""

    def __init__(
        self,
        name: str,
        *,
        budget: Budget | None,
        limiter: DeploymentHandle | None,
        breaker: CircuitBreaker | None = None,
        max_pause_s: float = DEFAULT_MAX_PAUSE_S,
        metrics: Metrics = NULL,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.max_pause_s = max_pause_s
        self.budget_name = f"model:{name}"
        self.budget = budget if budget and (budget.rpm or budget.tpm) else None
        self.limiter = limiter
        self.bookings = (
            BookingClient(limiter.options(stream=True).reserve.remote) if limiter is not None and self.budget else None
        )
        self.breaker = breaker or CircuitBreaker()
        self.breaker_seen: BreakerState | None = None  # the state the metrics last heard of
        self._breaker_changed()
        self.paused_until = 0.0  # monotonic
        self.watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.limiter is not None and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self.bookings is not None:
            await self.bookings.close()
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watcher

    async def _watch(self) -> None:
        assert self.limiter is not None
        while True:
            try:
                known = max(0.0, self.paused_until - time.monotonic())
                remaining = await self.limiter.watch_pause.remote(self.budget_name, known)
                # Bounded here too: a pause set by an older replica without the cap cannot park us.
                self.paused_until = max(self.paused_until, time.monotonic() + min(remaining, self.max_pause_s))
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)  # limiter restarting

    async def admit(self, tokens: int, deadline: float, share: Share | None = None) -> None:
        """Return when the call may go; raise CircuitOpen / ModelRateLimited / Overloaded otherwise.
        ``share``: whose call it is, for the fair queue of the model's budget (None: anonymous)."""
        if self.watcher is None:
            self.start()  # lazily: constructors of replicas may run outside the event loop
        wait = self.breaker.allow()
        self._breaker_changed()
        if wait is not None:
            raise CircuitOpen(
                f"The upstream for model '{self.name}' is failing; not calling it for now.", retry_after=wait
            )
        await self._wait_out_pause(deadline)
        if self.budget is None or self.bookings is None:
            return
        tokens = tokens if self.budget.tpm else 0
        retry_after = await self.bookings.book(
            self.budget_name, self.budget, 1, tokens, deadline, share or ANONYMOUS_SHARE
        )
        if retry_after is not None:
            raise ModelRateLimited(
                f"Model '{self.name}' is at its configured rate limit.", retry_after=retry_after
            )
        await self._wait_out_pause(deadline)  # a pause that began while we waited for our slot

    async def _wait_out_pause(self, deadline: float) -> None:
        # Pauses only ever extend, so this loop ends.
        while (pause := self.paused_until - time.monotonic()) > 0:
            if time.monotonic() + pause >= deadline:
                raise ModelRateLimited(
                    f"The upstream for model '{self.name}' asked us to slow down.", retry_after=pause
                )
            await asyncio.sleep(pause)

    def failure(self) -> None:
        """The upstream failed (5xx, timeout, connection): tell the breaker."""
        self.breaker.failure()
        self._breaker_changed()

    def success(self) -> None:
        self.breaker.success()
        self._breaker_changed()

    def _breaker_changed(self) -> None:
        state = self.breaker.state
        if state is not self.breaker_seen:
            self.metrics.breaker(self.name, state.value, opened=state is BreakerState.OPEN)
            self.breaker_seen = state

    def rate_limited(self, retry_after: float) -> None:
        """An upstream 429: pause this model here at once and, through the limiter, everywhere
        (for at most ``max_pause_s``)."""
        retry_after = min(max(retry_after, 0.0), self.max_pause_s)
        self.paused_until = max(self.paused_until, time.monotonic() + retry_after)
        if self.limiter is not None:
            self.limiter.pause.remote(self.budget_name, retry_after)

    def settle(self, estimated: int, actual: int) -> None:
        """Replace a booked token estimate by what the call used (0 for a call that was refused)."""
        if self.budget is None or self.budget.tpm is None or self.bookings is None:
            return
        self.bookings.settle(self.budget_name, self.budget, actual - estimated)
