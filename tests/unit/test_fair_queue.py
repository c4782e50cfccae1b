"""Fair admission without Ray: the fair queue, the limiter core's bursts, restart rule and queueing."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.config import AdmissionConfig
from deployments.limits.fair_queue import REBASE_AT, FairQueue, Waiter, clamp_weight
from deployments.limits.pacing import Granted, Queued, RateLimiterCore, Refused
from deployments.schemas import BookingAsk, Budget, KeyLimits, Share
from deployments.schemas.keys import MAX_WEIGHT, MIN_WEIGHT

tickets = itertools.count(1)


def waiter(tenant: str, background: bool = False, deadline: float = 1e9) -> Waiter:
    return Waiter(next(tickets), tenant, background, 1, 0, deadline)


def serve(queue: FairQueue, n: int) -> list[Waiter]:
    return [queue.pop() for _ in range(n)]


# -- the fair queue -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(flood=st.integers(1, 200), w_a=st.sampled_from([0.5, 1.0, 2.0, 3.0]), w_b=st.sampled_from([0.5, 1.0, 4.0]))
def test_backlogged_tenants_are_served_in_the_ratio_of_their_weights(flood: int, w_a: float, w_b: float) -> None:
    """However the queues were filled (A first, with many), every prefix of service is within one
    slot per tenant of the weighted fair split."""
    queue = FairQueue()
    for _ in range(flood * 10):
        queue.push(waiter("A"), w_a)
    for _ in range(flood * 10):
        queue.push(waiter("B"), w_b)
    served: Counter[str] = Counter()
    for n in range(1, flood * 10 + 1):
        served[queue.pop().tenant] += 1
        ideal_b = n * w_b / (w_a + w_b)
        assert abs(served["B"] - ideal_b) <= 1 + 1e-9, (n, served)


@settings(max_examples=100, deadline=None)
@given(others=st.integers(1, 20), depth=st.integers(5, 500))
def test_a_lone_call_is_served_within_one_round_however_deep_the_flood(others: int, depth: int) -> None:
    queue = FairQueue(max_queued_per_tenant=10_000)
    for index in range(others):
        for _ in range(depth):
            queue.push(waiter(f"flood{index}"), 1.0)
    serve(queue, min(depth, 3))  # the floods have been running for a while
    mine = waiter("B")
    queue.push(mine, 1.0)
    served = serve(queue, others + 1)  # one round: each flood once, and B
    assert mine in served


def test_idle_time_earns_no_credit() -> None:
    """A tenant that was away does not get a burst of turns when it comes back."""
    queue = FairQueue()
    for _ in range(100):
        queue.push(waiter("A"), 1.0)
    serve(queue, 50)  # B was idle all along
    for _ in range(20):
        queue.push(waiter("B"), 1.0)
    order = [w.tenant for w in serve(queue, 20)]
    assert Counter(order)["B"] == 10  # alternating from the moment it came, not 20 in a row


def test_background_calls_count_against_their_key_and_run_behind_its_interactive_ones() -> None:
    queue = FairQueue(background_share=0.25)
    for _ in range(100):
        queue.push(waiter("A", background=True), 1.0)
        queue.push(waiter("A"), 1.0)
        queue.push(waiter("B"), 1.0)
    served = serve(queue, 100)
    per_tenant = Counter(w.tenant for w in served)
    assert abs(per_tenant["A"] - per_tenant["B"]) <= 1  # A's background adds nothing to A's share
    a_lanes = Counter(w.background for w in served if w.tenant == "A")
    assert a_lanes[True] == pytest.approx(per_tenant["A"] * 0.2, abs=1)  # 1 : 0.25
    assert a_lanes[True] > 0  # behind, never starved


def test_background_only_tenant_gets_its_full_share() -> None:
    queue = FairQueue(background_share=0.25)
    for _ in range(40):
        queue.push(waiter("A", background=True), 1.0)
        queue.push(waiter("B"), 1.0)
    assert Counter(w.tenant for w in serve(queue, 40)) == {"A": 20, "B": 20}


def test_remove_and_bounds() -> None:
    queue = FairQueue(max_queued_per_tenant=2)
    first, second = waiter("A"), waiter("A")
    queue.push(first, 1.0)
    assert not queue.full("A")
    queue.push(second, 1.0)
    assert queue.full("A") and not queue.full("B")
    assert queue.remove(first) and not queue.remove(first)
    assert queue.pop() is second and len(queue) == 0 and queue.peek() is None
    with pytest.raises(IndexError):
        queue.pop()


def test_weight_none_uses_the_weight_the_key_last_brought() -> None:
    queue = FairQueue()
    queue.push(waiter("A"), 3.0)
    queue.pop()
    assert queue.weight("A") == 3.0 and queue.weight("B") == 1.0
    for _ in range(40):
        queue.push(waiter("A", background=True), None)
        queue.push(waiter("B"), None)
    assert Counter(w.tenant for w in serve(queue, 40))["A"] == 30


# -- weights: bounds and the virtual clock's arithmetic ---------------------------------------

accepted_weights = st.floats(MIN_WEIGHT, MAX_WEIGHT, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("weight", [5e-324, 0.0, -1.0, 0.009, 100.5, 1000.0, float("inf"), float("nan")])
def test_weights_outside_the_bounds_are_refused_by_the_api(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        KeyLimits(weight=weight)
    with pytest.raises(ValueError, match="weight"):
        Share(tenant="k", weight=weight)


@pytest.mark.parametrize("weight", [MIN_WEIGHT, 1.0, MAX_WEIGHT])
def test_weights_inside_the_bounds_are_accepted(weight: float) -> None:
    assert KeyLimits(weight=weight).weight == weight and Share(tenant="k", weight=weight).weight == weight


def queue_is_finite(queue: FairQueue) -> bool:
    tags = [queue.clock, *queue.idle_tags.values()]
    for tenant in queue.active.values():
        tags += [tenant.tag, tenant.lane_clock, *tenant.lane_tags]
    return all(math.isfinite(tag) and 0 <= tag <= REBASE_AT + 1e4 for tag in tags)


@settings(max_examples=200, deadline=None)
@given(
    w_a=accepted_weights, w_b=accepted_weights, clock=st.sampled_from([0.0, REBASE_AT - 50.0, 1e15]),
    background=st.booleans(), pops=st.integers(1, 400),
)
def test_any_accepted_weights_keep_the_clock_finite_and_the_split_fair(
    w_a: float, w_b: float, clock: float, background: bool, pops: int
) -> None:
    """Two backlogged tenants at any accepted weights, with the virtual clock anywhere (a limiter that has
    run for years, or a clock far past the rebase point, where a float no longer resolves a 0.01 step):
    every tag stays finite and bounded, and every prefix of service stays within one slot per tenant of
    the weighted split, across the rebase."""
    queue = FairQueue(max_queued_per_tenant=1000, background_share=0.01)
    queue.clock = clock
    for _ in range(pops):
        queue.push(waiter("A", background=background), w_a)
        queue.push(waiter("B", background=background), w_b)
    served: Counter[str] = Counter()
    for n in range(1, pops + 1):
        served[queue.pop().tenant] += 1
        assert queue_is_finite(queue), queue.clock
        ideal_b = n * w_b / (w_a + w_b)
        assert abs(served["B"] - ideal_b) <= 1 + 1e-6, (n, served)


@settings(max_examples=200, deadline=None)
@given(weight=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([5e-324, 1e308, -0.0]),
       calls=st.integers(1, 300))
def test_any_float_given_to_the_queue_is_clamped(weight: float, calls: int) -> None:
    """The fair queue itself cannot be pushed to infinity, NaN or lost steps by a weight that skipped the
    API's validation (a key stored before the bounds): it counts the clamped weight."""
    assert MIN_WEIGHT <= clamp_weight(weight) <= MAX_WEIGHT
    queue = FairQueue(max_queued_per_tenant=1000)
    queue.clock = REBASE_AT - 1000.0
    for _ in range(calls):
        queue.push(waiter("A"), weight)
        queue.push(waiter("B"), 1.0)
    for _ in range(calls):
        queue.pop()
        assert queue_is_finite(queue)
    assert 0 < queue.share("A", weight) < 1


# -- bursts and the restart rule ------------------------------------------------------------


def most_in_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max((bisect.bisect_left(starts, t + window - 1e-9) - i for i, t in enumerate(starts)), default=0)


def test_burst_rule_of_keys() -> None:
    config = AdmissionConfig()
    assert config.key_bursts(600, None) == (10.0, None)  # one second's worth
    assert config.key_bursts(60, None) == (5.0, None)  # at least key_min_burst
    assert config.key_bursts(3, None) == (3.0, None)  # never more than the per-minute limit
    assert config.key_bursts(None, 600_000) == (None, 10_000.0)


def test_a_fresh_key_gets_its_burst_at_once_then_is_paced() -> None:
    core = RateLimiterCore(started_at=0.0)
    budget = Budget(rpm=600, rpm_burst=10)
    starts = [core.reserve("key:k", budget, 1, 0, now=1000.0, max_wait_s=60) for _ in range(20)]
    assert starts[:10] == pytest.approx([1000.0] * 10)
    assert starts[10:] == pytest.approx([1000.0 + 0.1 * i for i in range(1, 11)])


@settings(max_examples=100, deadline=None)
@given(
    arrivals=st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), min_size=1, max_size=200),
    rate=st.floats(0.5, 50),
    capacity=st.integers(1, 20),
    restart_at=st.floats(0, 30),
    first_seen=st.floats(0, 30),
)
def test_a_restarted_limiter_never_grants_more_than_one_burst(
    arrivals: list[float], rate: float, capacity: int, restart_at: float, first_seen: float
) -> None:
    """A budget first seen long after its limiter started gets its full burst; the replacement
    limiter (started at the restart) must not add a second one: every window stays within
    capacity + rate * W + 1, the bound of a limiter that never died."""
    budget = Budget(rpm=max(1, round(rate * 60)), rpm_burst=capacity)
    rate = budget.rpm / 60 if budget.rpm else rate
    times = sorted(t + first_seen for t in arrivals)
    restart_at += first_seen
    old = RateLimiterCore(started_at=first_seen - 1000)  # long up: the budget is fresh, so full
    starts = [s for s in (old.reserve("key:k", budget, 1, 0, t, 1e9) for t in times if t < restart_at)
              if s <= restart_at]
    new = RateLimiterCore(started_at=restart_at)
    starts += [new.reserve("key:k", budget, 1, 0, t, 1e9) for t in times if t >= restart_at]
    for window in (1.0, 5.0, 60.0):
        assert most_in_window(starts, window) <= capacity + rate * window + 1 + 1e-6


def test_a_changed_limit_starts_empty() -> None:
    core = RateLimiterCore(started_at=0.0)
    assert core.reserve("key:k", Budget(rpm=60, rpm_burst=5), 1, 0, 1000.0, 60) == 1000.0
    assert core.reserve("key:k", Budget(rpm=120, rpm_burst=5), 1, 0, 1000.0, 60) == pytest.approx(1000.5)


# -- deadlines and Retry-After on a key's own budget -----------------------------------------


def ask(max_wait_s: float, share: Share | None = None) -> BookingAsk:
    return BookingAsk(requests=1, tokens=0, max_wait_s=max_wait_s, share=share)


def test_a_call_behind_a_queue_waits_if_it_fits_and_else_learns_the_true_wait() -> None:
    core = RateLimiterCore(started_at=0.0)
    budget = Budget(rpm=60, rpm_burst=5)
    for _ in range(15):  # 5 at once, 10 queued over the next 10 s
        assert isinstance(core.book("key:k", budget, ask(60), now=1000.0), Granted)
    refused = core.book("key:k", budget, ask(1), now=1000.0)
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(11.0)
    patient = core.book("key:k", budget, ask(60), now=1000.0)  # nothing was booked for the refused one
    assert isinstance(patient, Granted) and patient.start - 1000.0 == pytest.approx(refused.retry_after)


def test_a_keys_queue_is_bounded() -> None:
    core = RateLimiterCore(started_at=0.0, max_queued_per_tenant=3)
    budget = Budget(rpm=60, rpm_burst=1)
    decisions = [core.book("key:k", budget, ask(3600), now=1000.0) for _ in range(6)]
    assert [type(d) for d in decisions] == [Granted] * 4 + [Refused] * 2  # 1 at once + 3 waiting
    assert isinstance(decisions[-1], Refused) and decisions[-1].retry_after == pytest.approx(4.0)


# -- the fair queue of a shared budget ---------------------------------------------------------


def drain(core: RateLimiterCore, name: str, until: float) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Run the dispatcher as the shell does (at each ``next_wake``) until ``until``: the grants
    ``(tenant, start)`` and refusals ``(tenant, retry_after)``."""
    grants: list[tuple[str, float]] = []
    refusals: list[tuple[str, float]] = []
    now = 1000.0
    while now < until:
        granted, refused = core.dispatch(name, now)
        grants += [(w.tenant, start) for w, start in granted]
        refusals += [(w.tenant, retry_after) for w, retry_after in refused]
        wake = core.next_wake(name, now)
        if wake is None:
            break
        now = max(wake, now + 1e-6)
    return grants, refusals


def test_shared_budget_hands_slots_out_fairly_not_first_come() -> None:
    core = RateLimiterCore(started_at=0.0, grant_ahead_s=0.1)
    budget = Budget(rpm=300)  # 5/s
    name = "model:m"
    decisions = [core.book(name, budget, ask(60, Share(tenant="A")), now=1000.0) for _ in range(64)]
    decisions += [core.book(name, budget, ask(60, Share(tenant="B")), now=1000.0) for _ in range(8)]
    assert sum(isinstance(d, Queued) for d in decisions) >= 70
    grants, refusals = drain(core, name, until=1004.0)
    assert refusals == []
    first_16 = Counter(tenant for tenant, _ in grants[:16])
    assert first_16["B"] == 8  # every other slot, though A queued 64 before B's first
    starts = [s for _, s in grants]
    assert starts == sorted(starts)
    assert most_in_window(starts, 1.0) <= 2 + 5  # capacity (0.5 % of 300, at least 1) + rate, +1


def test_shared_budget_refuses_what_cannot_fit_and_expires_the_late() -> None:
    core = RateLimiterCore(started_at=0.0, grant_ahead_s=0.1)
    budget = Budget(rpm=60)  # 1/s
    name = "model:m"
    assert isinstance(core.book(name, budget, ask(60, Share(tenant="A")), now=1000.0), Granted)
    for _ in range(9):
        assert isinstance(core.book(name, budget, ask(60, Share(tenant="A")), now=1000.0), Queued)
    # B behind A's queue: its fair turn is ~2 slots away, so a 1 s deadline cannot fit.
    refused = core.book(name, budget, ask(1, Share(tenant="B")), now=1000.0)
    assert isinstance(refused, Refused) and refused.retry_after == pytest.approx(3.0)
    late = core.book(name, budget, ask(3.5, Share(tenant="C")), now=1000.0)
    assert isinstance(late, Queued)
    core.pause(name, until=1010.0)  # an upstream 429: nothing starts for 10 s
    grants, refusals = drain(core, name, until=1005.0)
    assert grants == [] and [tenant for tenant, _ in refusals] == ["C"]
    assert refusals[0][1] >= 1010.0 - 1003.5  # the Retry-After knows about the pause
