"""The circuit breaker of one worker replica's upstream (pure, tested without Ray; held by ``guard``).

``CircuitBreaker`` is the classic closed → open → half-open breaker: it opens after
``breaker_threshold`` consecutive upstream failures (the model's config), fails fast for
``breaker_cooldown_s``, then lets one probe through at a time; a success closes it. Each worker
replica has its own (no shared state: a replica that cannot reach the upstream stops trying by
itself). Its state is the metric ``circuit_breaker_state``; an open breaker refuses with
``CircuitOpen`` (503, Retry-After).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


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
