"""Pure rate-limiting and failure-isolation logic, tested without Ray.

``Pacer`` is a token bucket written in the GCRA form ("virtual scheduling",
ITU-T I.371): instead of counting tokens it keeps the theoretical arrival time
(``tat``) of the next unit. A caller *reserves* an amount and learns the time at
which it may start; the bucket can run into debt, so waiting callers queue in
order and are paced at exactly ``rate`` instead of retrying in a thundering
herd. In any window of length W the amounts started never exceed
``capacity + rate * W``.

A new ``Pacer`` starts *empty* (as if a full burst had just been spent), so a
limiter that restarts after a crash cannot grant a burst on top of what was
granted just before it died.

``CircuitBreaker`` is the classic closed → open → half-open breaker (one probe
at a time once the cool-down has passed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class Pacer:
    """Token bucket of ``capacity`` units refilled at ``rate`` units per second, in GCRA form."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.interval = 1.0 / rate  # seconds "paid" per unit
        self.tolerance = (capacity - 1) * self.interval  # how far ahead of schedule a burst may run
        self.tat = now + capacity * self.interval  # empty at start: restart-safe
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

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds a reservation of ``amount`` made now would wait (without booking it)."""
        return max(0.0, max(now, self.tat - self.tolerance, self.paused_until) - now) if amount else 0.0


def window_capacity(per_minute: int, tolerance_fraction: float = 0.005) -> float:
    """Burst capacity for a per-minute limit.

    Any 60 s window may then see ``per_minute + capacity`` units; keeping the
    capacity at ~0.5 % of the limit keeps every window within 1 % of it.
    """
    return max(1.0, per_minute * tolerance_fraction)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown_s`` lets one probe through."""

    threshold: int = 5
    cooldown_s: float = 10.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = field(default=False)

    def allow(self, now: float | None = None) -> float | None:
        """None if a call may go ahead; otherwise seconds until a probe will be allowed."""
        now = time.monotonic() if now is None else now
        if self.state is BreakerState.CLOSED:
            return None
        remaining = self.opened_at + self.cooldown_s - now
        if self.state is BreakerState.OPEN and remaining > 0:
            return remaining
        if self.probing:  # half-open: one probe at a time
            return max(remaining, 1.0)
        self.state, self.probing = BreakerState.HALF_OPEN, True
        return None

    def success(self) -> None:
        self.state, self.failures, self.probing = BreakerState.CLOSED, 0, False

    def failure(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at, self.probing = BreakerState.OPEN, now, False


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
