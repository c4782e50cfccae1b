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
from dataclasses import dataclass

from deployments.core.limits import Pacer, window_capacity

WATCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Budget:
    """Limits of one budget; either may be None (unlimited)."""

    rpm: int | None = None
    tpm: int | None = None


class RateLimiterCore:
    """The limiter's logic on an injectable clock (the deployment is a thin async shell)."""

    def __init__(self) -> None:
        self.pacers: dict[tuple[str, str], Pacer] = {}
        self.paused_until: dict[str, float] = {}

    def _pacer(self, name: str, unit: str, per_minute: int, now: float) -> Pacer:
        pacer = self.pacers.get((name, unit))
        rate = per_minute / 60.0
        if pacer is None or pacer.rate != rate:
            # New budget, or its limit changed: start empty (never a burst).
            pacer = Pacer(rate, window_capacity(per_minute), now)
            pacer.pause(self.paused_until.get(name, 0.0))
            self.pacers[(name, unit)] = pacer
        return pacer

    def reserve(self, name: str, budget: Budget, requests: int, tokens: int, now: float, max_wait_s: float) -> float:
        """Book the call; return its start time, or raise ``WaitTooLong`` (nothing booked) if > max_wait."""
        booked: list[tuple[Pacer, float]] = []
        start = max(now, self.paused_until.get(name, 0.0))
        units: tuple[tuple[str, int | None, float], ...] = (
            ("requests", budget.rpm, requests),
            ("tokens", budget.tpm, tokens),
        )
        for unit, limit, amount in units:
            if limit is None or amount <= 0:
                continue
            pacer = self._pacer(name, unit, limit, now)
            start = max(start, pacer.reserve(amount, now))
            booked.append((pacer, amount))
        if start - now > max_wait_s:
            for pacer, amount in booked:
                pacer.unreserve(amount)
            raise WaitTooLong(start - now)
        return start

    def settle(self, name: str, token_delta: int, now: float) -> None:
        pacer = self.pacers.get((name, "tokens"))
        if pacer is not None and token_delta:
            pacer.settle(token_delta, now)

    def pause(self, name: str, until: float) -> bool:
        """Returns True if this extends the pause (so watchers must be told)."""
        if until <= self.paused_until.get(name, 0.0):
            return False
        self.paused_until[name] = until
        for (budget_name, _), pacer in self.pacers.items():
            if budget_name == name:
                pacer.pause(until)
        return True


class WaitTooLong(Exception):
    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


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
