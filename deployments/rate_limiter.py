"""RateLimiter: request and token budgets shared by every replica on every node (a one-replica deployment).

Serves: ``reserve`` (book calls on a budget, say when each may start, and
correct earlier token estimates with real usage), ``pause`` (an upstream said
429 + Retry-After) and ``watch_pause`` (a long-poll that wakes every worker
replica of a model when a pause starts). Budgets are named by the caller —
``model:<name>`` for upstream limits, ``key:<id>`` for API keys — and carry
their limits with each call, so the limiter needs no config of its own.
Calls: nothing.
Owns: one ``Pacer`` per budget and per unit (requests, tokens), in memory.

If this replica dies, Serve starts a new one whose pacers start *empty*: calls
are paced from the first one on, never burst past the limit. Callers whose
bookings fail meanwhile retry against the new replica within their own deadline
(they fail closed, never open).

Cost: callers go through ``deployments.core.booking.BudgetClient``, which puts
all of a replica's concurrent bookings into one call, answered at once (the
waiting happens on the caller's side). Unlimited models never call it.
"""

from __future__ import annotations

import asyncio
import time

from deployments.core.limits import Budget, RateLimiterCore, WaitTooLong

WATCH_TIMEOUT_S = 30.0


class RateLimiter:
    def __init__(self) -> None:
        self.core = RateLimiterCore()
        self.pause_changed: dict[str, asyncio.Event] = {}

    async def reserve(
        self, name: str, budget: Budget, asks: list[tuple[int, int, float]], token_delta: int = 0
    ) -> list[tuple[bool, float]]:
        """Book several calls on one budget at once (a replica's coalesced bookings).

        ``asks`` are ``(requests, tokens, max_wait_s)``; each answer is ``(True, delay_s)`` — start
        after ``delay_s`` — or ``(False, retry_after_s)`` when the wait would exceed ``max_wait_s``
        (nothing booked). ``token_delta`` first settles earlier estimates with real usage.
        Answers at once: the callers wait on their own side, holding no request here.
        """
        now = time.monotonic()
        if token_delta:
            self.core.settle(name, token_delta, now)
        answers: list[tuple[bool, float]] = []
        for requests, tokens, max_wait_s in asks:
            try:
                answers.append((True, self.core.reserve(name, budget, requests, tokens, now, max_wait_s) - now))
            except WaitTooLong as exc:
                answers.append((False, exc.wait_s))
        return answers

    async def pause(self, name: str, seconds: float) -> None:
        # Durations, not timestamps, cross the wire: nodes' clocks differ.
        if self.core.pause(name, time.monotonic() + seconds):
            event = self.pause_changed.pop(name, None)
            if event is not None:
                event.set()

    async def watch_pause(self, name: str, known_remaining_s: float) -> float:
        """Long-poll: return the pause remaining for ``name`` once it differs from what the
        caller knows (a new pause), or after WATCH_TIMEOUT_S."""
        remaining = self.core.paused_until.get(name, 0.0) - time.monotonic()
        if remaining > known_remaining_s + 0.5:
            return remaining
        event = self.pause_changed.setdefault(name, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout=WATCH_TIMEOUT_S)
        except TimeoutError:
            pass
        return max(0.0, self.core.paused_until.get(name, 0.0) - time.monotonic())
