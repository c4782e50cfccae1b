"""Pacer (token bucket, GCRA form), the limiter core and the circuit breaker, without Ray."""

from __future__ import annotations

import bisect
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.limits.breaker import BreakerState, CircuitBreaker
from deployments.limits.pacing import Pacer, RateLimiterCore, WaitTooLong, window_capacity
from deployments.schemas import Budget


def most_in_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max((bisect.bisect_left(starts, t + window - 1e-9) - i for i, t in enumerate(starts)), default=0)


arrivals = st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(arrivals=arrivals, rate=st.floats(0.5, 50), capacity=st.integers(1, 20), window=st.floats(0.1, 20))
def test_capacity_is_never_exceeded_in_any_window(
    arrivals: list[float], rate: float, capacity: int, window: float
) -> None:
    pacer = Pacer(rate, capacity, now=0.0)
    starts = [pacer.reserve(1, now) for now in sorted(arrivals)]
    assert all(start >= now for start, now in zip(starts, sorted(arrivals), strict=True))
    assert most_in_window(starts, window) <= capacity + rate * window + 1e-6


@settings(max_examples=100, deadline=None)
@given(arrivals=arrivals, rate=st.floats(0.5, 50), capacity=st.integers(1, 20), restart_at=st.floats(0, 30))
def test_a_restart_never_bursts(arrivals: list[float], rate: float, capacity: int, restart_at: float) -> None:
    """Calls granted by a limiter before it died plus those of its replacement stay within the bound."""
    times = sorted(arrivals)
    old = Pacer(rate, capacity, now=0.0)
    starts = [s for s in (old.reserve(1, t) for t in times if t < restart_at) if s <= restart_at]
    new = Pacer(rate, capacity, now=restart_at)  # the replacement starts empty
    starts += [new.reserve(1, t) for t in times if t >= restart_at]
    for window in (1.0, 5.0, 60.0):
        assert most_in_window(starts, window) <= capacity + rate * window + 1 + 1e-6


def test_refill_is_at_the_rate() -> None:
    pacer = Pacer(rate=10, capacity=1, now=0.0)
    starts = [pacer.reserve(1, 0.0) for _ in range(50)]
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(starts)}
    assert gaps == {0.1}


def test_pause_holds_back_every_reservation() -> None:
    pacer = Pacer(rate=100, capacity=10, now=0.0)
    pacer.pause(until=5.0)
    assert min(pacer.reserve(1, 1.0) for _ in range(20)) >= 5.0


def test_settle_charges_debt_and_refunds_without_minting_a_burst() -> None:
    pacer = Pacer(rate=10, capacity=10, now=0.0)
    pacer.settle(50, now=0.0)  # used 50 more tokens than estimated
    assert pacer.reserve(1, 0.0) >= 5.0
    pacer.settle(-10_000, now=0.0)  # a huge refund
    assert most_in_window([pacer.reserve(1, 6.0) for _ in range(30)], 1.0) <= 10 + 10


def test_window_capacity_keeps_a_minute_within_one_percent() -> None:
    for rpm in (60, 300, 10_000, 1_000_000):
        assert window_capacity(rpm) <= max(1.0, rpm * 0.01)


def test_limiter_core_wait_too_long_books_nothing() -> None:
    core = RateLimiterCore()
    budget = Budget(rpm=60)
    first = core.reserve("m", budget, 1, 0, now=100.0, max_wait_s=10)
    with pytest.raises(WaitTooLong) as caught:
        for _ in range(100):
            core.reserve("m", budget, 1, 0, now=100.0, max_wait_s=0)
    assert caught.value.wait_s > 0
    # Rejected reservations left no debt: the next slot is where it was.
    assert core.reserve("m", budget, 1, 0, now=100.0, max_wait_s=10) - first <= 1.0 + 1e-9


def test_limiter_core_pause_applies_to_new_budgets_too() -> None:
    core = RateLimiterCore()
    assert core.pause("m", 50.0)
    assert not core.pause("m", 40.0)  # an earlier end does not shorten it
    assert core.reserve("m", Budget(rpm=6000, tpm=10**6), 1, 100, now=10.0, max_wait_s=100) >= 50.0


def test_breaker_opens_fails_fast_and_half_opens_one_probe() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=10)
    for _ in range(3):
        assert breaker.allow(now=0.0) is None
        breaker.failure(now=0.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow(now=5.0) == pytest.approx(5.0)
    assert breaker.allow(now=10.5) is None  # the probe
    assert breaker.allow(now=10.6) is not None  # only one at a time
    breaker.failure(now=11.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow(now=21.5) is None
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow(now=22.0) is None
