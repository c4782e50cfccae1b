"""Pacing: the GCRA token bucket of every budget and the RateLimiter's logic (pure, tested without Ray).

``Pacer`` is a token bucket written in the GCRA form ("virtual scheduling",
ITU-T I.371): instead of counting tokens it keeps the theoretical arrival time
(``tat``) of the next unit. A caller *reserves* an amount and learns the time at
which it may start; the bucket can run into debt, so waiting callers queue in
order and are paced at exactly ``rate`` instead of retrying in a thundering
herd. In any window of length W the amounts started never exceed
``capacity + rate * W``.

Restart rule. A ``Pacer`` is created with what it may grant at once
(``available``). The limiter gives a budget it has never seen the burst it
would have refilled since the limiter itself started: ``min(capacity, rate *
(now - started))``. A budget first seen long after the start (a fresh API key)
so gets its full burst at once; after a restart every budget counts as empty at
the restart, exactly as if a full burst had just been spent. Across a restart,
any window of length W therefore starts at most ``capacity + rate * W + 1``
units — the bound of one limiter that never died (the old limiter's grants
within the window, plus the new one's refill). A budget whose limit changes
starts empty.

``RateLimiterCore`` is the RateLimiter's logic over the pacers of every
budget, their pauses and the fair queues of shared budgets (``fair_queue``).
Words as in the glossary of ``deployments.limits``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from deployments.limits.fair_queue import FairQueue, Waiter
from deployments.schemas import BookingAsk, Budget, BudgetState, LimiterState, PacerState

__all__ = ["Decision", "Granted", "Pacer", "Queued", "RateLimiterCore", "Refused", "WaitTooLong", "window_capacity"]


class Pacer:
    """Token bucket of ``capacity`` units refilled at ``rate`` units per second, in GCRA form."""

    def __init__(self, rate: float, capacity: float, now: float, available: float = 0.0) -> None:
        """``available``: units that may start at once (0: empty, as if a full burst was just spent)."""
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.interval = 1.0 / rate  # seconds "paid" per unit
        self.tolerance = (capacity - 1) * self.interval  # how far ahead of schedule a burst may run
        self.tat = now + (capacity - min(max(available, 0.0), capacity)) * self.interval
        self.paused_until = 0.0

    def reserve(self, amount: float, now: float) -> float:
        """Book ``amount`` units; return the time at which the caller may start (>= now)."""
        start = max(now, self.tat - self.tolerance, self.paused_until)
        self.tat = max(self.tat, now, self.paused_until) + amount * self.interval
        return start

    def unreserve(self, amount: float) -> None:
        """Give back a reservation that will not be used (the caller gave up waiting)."""
        self.tat -= amount * self.interval

    def settle(self, delta: float, now: float) -> None:
        """Correct an estimate: ``delta`` > 0 used more than reserved (debt), < 0 used less (refund)."""
        # A refund never moves the schedule before "now - tolerance": that would mint a burst
        # larger than the capacity.
        self.tat = max(self.tat + delta * self.interval, now - self.tolerance)

    def pause(self, until: float) -> None:
        """Nothing starts before ``until`` (an upstream 429 asked us to back off)."""
        self.paused_until = max(self.paused_until, until)

    def available(self, now: float) -> float:
        """Units that could start at ``now`` (0 while paused)."""
        if self.paused_until > now:
            return 0.0
        return min(self.capacity, max(0.0, self.capacity - (self.tat - now) / self.interval))

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds a reservation of ``amount`` made now would wait (without booking it)."""
        return max(0.0, max(now, self.tat - self.tolerance, self.paused_until) - now) if amount else 0.0


def window_capacity(per_minute: int, tolerance_fraction: float = 0.005) -> float:
    """Burst capacity for a per-minute limit.

    Any 60 s window may then see ``per_minute + capacity`` units; keeping the
    capacity at ~0.5 % of the limit keeps every window within 1 % of it.
    """
    return max(1.0, per_minute * tolerance_fraction)


@dataclass(frozen=True)
class Granted:
    start: float  # monotonic time at which the call may start


@dataclass(frozen=True)
class Refused:
    retry_after: float  # seconds until a slot is expected to be free


@dataclass(frozen=True)
class Queued:
    waiter: Waiter  # in the budget's fair queue; ``dispatch`` grants or refuses it later


Decision = Granted | Refused | Queued


class RateLimiterCore:
    """The limiter's logic on an injectable clock (the deployment is a thin async shell).

    ``reserve`` books in arrival order and answers at once (a key's own budget: one tenant).
    ``book`` is for shared budgets: it answers at once while nobody waits and the slot is at
    most ``grant_ahead_s`` away; otherwise the call joins the budget's ``FairQueue`` and
    ``dispatch`` (run when ``next_wake`` says) grants slots in fair order as they come within
    ``grant_ahead_s``, and refuses calls whose deadline passed.
    """

    def __init__(
        self,
        started_at: float = 0.0,
        *,
        grant_ahead_s: float = 0.1,
        max_queued_per_tenant: int = 1000,
        background_share: float = 0.25,
    ) -> None:
        self.started_at = started_at
        self.grant_ahead_s = grant_ahead_s
        self.max_queued_per_tenant = max_queued_per_tenant
        self.background_share = background_share
        self.pacers: dict[tuple[str, str], Pacer] = {}
        self.paused_until: dict[str, float] = {}
        self.queues: dict[str, FairQueue] = {}
        self.deadlines: dict[str, list[tuple[float, int, Waiter]]] = {}
        self.budgets: dict[str, Budget] = {}
        self.tickets = 0

    def _pacer(self, name: str, unit: str, per_minute: int, burst: float | None, now: float) -> Pacer:
        pacer = self.pacers.get((name, unit))
        rate = per_minute / 60.0
        capacity = burst if burst is not None else window_capacity(per_minute)
        if pacer is None or pacer.rate != rate or pacer.capacity != capacity:
            # Never seen: what it refilled since this limiter started (restart rule, module doc).
            # Seen with another limit: empty.
            available = min(capacity, (now - self.started_at) * rate) if pacer is None else 0.0
            pacer = Pacer(rate, capacity, now, available)
            pacer.pause(self.paused_until.get(name, 0.0))
            self.pacers[(name, unit)] = pacer
        return pacer

    def _units(self, name: str, budget: Budget, requests: int, tokens: int, now: float) -> list[tuple[Pacer, int]]:
        units: list[tuple[Pacer, int]] = []
        if budget.rpm is not None and requests > 0:
            units.append((self._pacer(name, "requests", budget.rpm, budget.rpm_burst, now), requests))
        if budget.tpm is not None and tokens > 0:
            units.append((self._pacer(name, "tokens", budget.tpm, budget.tpm_burst, now), tokens))
        return units

    def snapshot(self, now: float) -> LimiterState:
        """Every budget seen: its pacers' fill, its fair queue's length and any pause (the console)."""
        names = sorted({name for name, _ in self.pacers} | set(self.queues) | set(self.paused_until))
        return LimiterState(budgets=[
            BudgetState(
                budget=name,
                pacers=[
                    PacerState(unit=unit, per_minute=pacer.rate * 60, capacity=pacer.capacity,
                               available=pacer.available(now))
                    for (pacer_name, unit), pacer in sorted(self.pacers.items())
                    if pacer_name == name
                ],
                queued=len(self.queues[name]) if name in self.queues else 0,
                paused_s=max(0.0, self.paused_until.get(name, 0.0) - now),
            )
            for name in names
        ])

    def wait_time(self, name: str, budget: Budget, requests: int, tokens: int, now: float) -> float:
        """Seconds a booking made now would wait (nothing booked)."""
        wait = max(0.0, self.paused_until.get(name, 0.0) - now)
        for pacer, amount in self._units(name, budget, requests, tokens, now):
            wait = max(wait, pacer.wait_time(amount, now))
        return wait

    def reserve(
        self, name: str, budget: Budget, requests: int, tokens: int, now: float, max_wait_s: float
    ) -> float:
        """Book the call; return its start time, or raise ``WaitTooLong`` (nothing booked) if > max_wait."""
        booked = self._units(name, budget, requests, tokens, now)
        start = max(now, self.paused_until.get(name, 0.0))
        for pacer, amount in booked:
            start = max(start, pacer.reserve(amount, now))
        if start - now > max_wait_s:
            for pacer, amount in booked:
                pacer.unreserve(amount)
            raise WaitTooLong(start - now)
        return start

    def book(self, name: str, budget: Budget, ask: BookingAsk, now: float) -> Decision:
        """Book ``ask`` on ``name``: at once, into the fair queue (shared budgets), or refused."""
        if ask.share is None:
            max_wait_s = ask.max_wait_s
            if budget.rpm is not None:
                # The bounded queue of a key's own budget: at most max_queued_per_tenant calls waiting.
                max_wait_s = min(max_wait_s, self.max_queued_per_tenant * 60.0 / budget.rpm)
            try:
                return Granted(self.reserve(name, budget, ask.requests, ask.tokens, now, max_wait_s))
            except WaitTooLong as exc:
                return Refused(exc.wait_s)
        self.budgets[name] = budget
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = FairQueue(self.max_queued_per_tenant, self.background_share)
        share = ask.share
        if not queue and self.wait_time(name, budget, ask.requests, ask.tokens, now) <= self.grant_ahead_s:
            return Granted(self.reserve(name, budget, ask.requests, ask.tokens, now, float("inf")))
        expected = self._expected_wait(name, queue, share.tenant, share.weight, now)
        if expected > ask.max_wait_s or queue.full(share.tenant):
            return Refused(expected)
        self.tickets += 1
        waiter = Waiter(self.tickets, share.tenant, share.background, ask.requests, ask.tokens, now + ask.max_wait_s)
        queue.push(waiter, share.weight)
        heapq.heappush(self.deadlines.setdefault(name, []), (waiter.deadline, waiter.ticket, waiter))
        return Queued(waiter)

    def _expected_wait(self, name: str, queue: FairQueue, tenant: str, weight: float | None, now: float) -> float:
        """When the tenant's next call would start: the slots ahead of it at its fair share."""
        budget = self.budgets[name]
        slot_s = 0.0
        if budget.rpm is not None:
            slot_s = 60.0 / budget.rpm
        position = queue.queued(tenant) + 1
        base = max(self.wait_time(name, budget, 1, 0, now), 0.0)
        return base + position * slot_s / queue.share(tenant, weight)

    def dispatch(self, name: str, now: float) -> tuple[list[tuple[Waiter, float]], list[tuple[Waiter, float]]]:
        """Grant the queued calls whose turn has come (``(waiter, start)``) and refuse those whose
        deadline passed (``(waiter, retry_after)``)."""
        queue = self.queues.get(name)
        if queue is None:
            return [], []
        refused: list[tuple[Waiter, float]] = []
        deadlines = self.deadlines.get(name, [])
        while deadlines and deadlines[0][0] <= now:
            _, _, late = heapq.heappop(deadlines)
            if queue.remove(late):
                weight = queue.weight(late.tenant)
                refused.append((late, self._expected_wait(name, queue, late.tenant, weight, now)))
        granted: list[tuple[Waiter, float]] = []
        budget = self.budgets[name]
        while (waiter := queue.peek()) is not None:
            if self.wait_time(name, budget, waiter.requests, waiter.tokens, now) > self.grant_ahead_s:
                break
            queue.pop()
            granted.append((waiter, self.reserve(name, budget, waiter.requests, waiter.tokens, now, float("inf"))))
        if not queue:
            self.deadlines.pop(name, None)  # every entry left is stale
        return granted, refused

    def next_wake(self, name: str, now: float) -> float | None:
        """When ``dispatch`` has something to do next for ``name`` (None: nothing waits)."""
        queue = self.queues.get(name)
        waiter = queue.peek() if queue is not None else None
        if waiter is None:
            return None
        wait = self.wait_time(name, self.budgets[name], waiter.requests, waiter.tokens, now)
        wake = now + max(0.0, wait - self.grant_ahead_s)
        deadlines = self.deadlines.get(name)
        if deadlines:
            wake = min(wake, deadlines[0][0])
        return wake

    def cancel(self, name: str, waiter: Waiter) -> None:
        """The caller of a queued call is gone: free its place."""
        queue = self.queues.get(name)
        if queue is not None:
            queue.remove(waiter)

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
