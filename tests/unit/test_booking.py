"""BookingClient: a replica's bookings coalesced into few limiter calls, paced, failing closed.

The limiter here is the real ``RateLimiter`` class, called in-process (its ``reserve`` is what
the Serve handle calls remotely); only the transport is left out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments.errors import Overloaded
from deployments.limits.booking import RETRY_INTERVAL_S, BookingClient, answered_at_once
from deployments.limits.pacing import window_capacity
from deployments.limits.rate_limiter import RateLimiter
from deployments.schemas import BookingAnswer, BookingAsk, Budget, ReserveRequest, Share
from tests.waiting import until


class CountingLimiter:
    """The real limiter, counting calls and able to be 'down' for a while."""

    def __init__(self, down_for_calls: int = 0, started_at: float | None = None) -> None:
        self.limiter = RateLimiter()
        if started_at is not None:
            self.limiter.core.started_at = started_at
        self.calls: list[tuple[int, int]] = []  # (number of bookings, token delta) per call
        self.down_for_calls = down_for_calls

    async def reserve(self, request: ReserveRequest) -> AsyncIterator[list[BookingAnswer]]:
        self.calls.append((len(request.asks), request.token_delta))
        if len(self.calls) <= self.down_for_calls:
            raise ConnectionError("limiter replica is restarting")
        async for answers in self.limiter.reserve(request):
            yield answers


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def start_times(client: BookingClient, budget: Budget, n: int, deadline_s: float = 30.0) -> list[Any]:
    async def one() -> float | None:
        retry_after = await client.book("model:m", budget, 1, 0, time.monotonic() + deadline_s)
        return time.monotonic() if retry_after is None else None

    return list(await asyncio.gather(*(one() for _ in range(n))))


def test_concurrent_bookings_share_one_limiter_call_and_are_paced() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=6000)  # 100/s, capacity 30

    started = asyncio.run(start_times(client, budget, 80))

    assert limiter.calls == [(80, 0)]  # 80 bookings, one call
    assert all(t is not None for t in started)
    rate, capacity = 100.0, window_capacity(6000)
    for window in (0.05, 0.2, 0.4):
        assert max_in_window(started, window) <= capacity + rate * window + 1, window


def test_bookings_arriving_while_a_call_is_out_leave_together_in_the_next() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=600_000)

    async def main() -> None:
        first = asyncio.ensure_future(client.book("model:m", budget, 1, 0, time.monotonic() + 5))
        await asyncio.sleep(0)  # the first call is now out
        rest = [client.book("model:m", budget, 1, 0, time.monotonic() + 5) for _ in range(20)]
        assert await asyncio.gather(first, *rest) == [None] * 21

    asyncio.run(main())
    assert [n for n, _ in limiter.calls] == [1, 20]


def test_over_the_deadline_answers_retry_after_and_books_nothing() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=60)  # 1/s, capacity 1: a new budget starts empty, so the first waits ~1 s

    async def main() -> None:
        retry_after = await client.book("key:k", budget, 1, 0, time.monotonic())
        assert retry_after is not None and 0.5 < retry_after <= 1.0
        # Nothing was booked: the next caller that may wait gets the same slot, not a later one.
        begun = time.monotonic()
        assert await client.book("key:k", budget, 1, 0, time.monotonic() + 5) is None
        assert time.monotonic() - begun <= 1.0 + 0.2

    asyncio.run(main())


def test_settle_rides_along_with_the_next_booking() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(tpm=600_000)

    async def main() -> None:
        client.settle("model:m", budget, -40)
        client.settle("model:m", budget, 15)
        assert await client.book("model:m", budget, 1, 100, time.monotonic() + 5) is None

    asyncio.run(main())
    assert limiter.calls == [(1, -25)]


def test_a_lone_settle_is_sent_too() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)

    async def main() -> None:
        client.settle("model:m", Budget(tpm=1000), 7)
        await asyncio.wait_for(client.senders["model:m"], 2)

    asyncio.run(main())
    assert limiter.calls == [(0, 7)]


def test_limiter_down_fails_closed_then_recovers() -> None:
    """Bookings retry while the limiter is down; those whose deadline comes first get Overloaded."""
    limiter = CountingLimiter(down_for_calls=2)
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=600_000)

    async def main() -> None:
        now = time.monotonic()
        patient = asyncio.ensure_future(client.book("model:m", budget, 1, 0, now + 10))
        hasty = asyncio.ensure_future(client.book("model:m", budget, 1, 0, now + RETRY_INTERVAL_S / 2))
        with pytest.raises(Overloaded):
            await hasty
        assert await patient is None
        assert time.monotonic() - now >= 2 * RETRY_INTERVAL_S * 0.9  # it waited out both failures

    asyncio.run(main())
    assert [n for n, _ in limiter.calls] == [2, 1, 1]


def test_a_cancelled_caller_does_not_stall_the_others() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=60)  # slots 1 s apart

    async def main() -> None:
        deadline = time.monotonic() + 10
        waiting = asyncio.ensure_future(client.book("model:m", budget, 1, 0, deadline))
        await until(lambda: client.calls == 1 and not client.senders, message="the booking answered")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await asyncio.wait_for(client.book("model:m", budget, 1, 0, deadline), 5) is None

    asyncio.run(main())


def test_queued_bookings_of_two_tenants_alternate_through_the_real_limiter() -> None:
    """A floods with 30 bookings, B has 2 at a time: B still gets about every other slot (fair queue
    in the limiter, answers streamed back as each turn comes), not the slots after A's 30."""
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=600)  # 10/s: 100 ms for a B client to book again, even on a busy machine
    a, b = Share(tenant="A"), Share(tenant="B")

    async def main() -> list[str]:
        order: list[str] = []

        async def one(share: Share) -> None:
            assert await client.book("model:m", budget, 1, 0, time.monotonic() + 60, share) is None
            order.append(share.tenant)

        async def b_client() -> None:
            for _ in range(6):
                await one(b)

        flood = [asyncio.ensure_future(one(a)) for _ in range(30)]
        # A's flood is booked first: its one call answered, the rest waiting in the limiter's queue.
        await until(lambda: client.calls == 1 and not client.senders and limiter.limiter.core.queues.get("model:m"))
        await asyncio.gather(b_client(), b_client())
        await asyncio.gather(*flood)
        return order

    order = asyncio.run(main())
    before_b_done = order[: max(i for i, tenant in enumerate(order) if tenant == "B") + 1]
    # B's 12 went out alternating with A, not behind A's 30: at most as many A as B in that span, plus
    # A's head start (the slot granted before B came) and one per B client of slack.
    assert before_b_done.count("A") <= before_b_done.count("B") + 3, order


def test_a_stream_broken_while_queued_books_again() -> None:
    """The limiter dies while bookings wait in its fair queue: they are booked again on the next
    call (its successor), within their deadline, and none is lost or granted twice."""

    class DyingLimiter(CountingLimiter):
        async def reserve(self, request: ReserveRequest) -> AsyncIterator[list[BookingAnswer]]:
            self.calls.append((len(request.asks), request.token_delta))
            stream = self.limiter.reserve(request)
            yield await anext(stream)
            if len(self.calls) == 1:
                await stream.aclose()  # frees the queued places, like a dead replica's
                self.limiter = RateLimiter()  # the successor: a fresh replica
                raise ConnectionError("replica died")
            async for answers in stream:
                yield answers

    limiter = DyingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=600)  # 10/s; the first one at once, the rest queued

    async def main() -> list[float | None]:
        deadline = time.monotonic() + 20
        return list(await asyncio.gather(*(
            client.book("model:m", budget, 1, 0, deadline, Share(tenant="A")) for _ in range(5)
        )))

    assert asyncio.run(main()) == [None] * 5
    assert [n for n, _ in limiter.calls][:2] == [5, 4]  # the 4 queued ones were sent again


def test_a_fresh_keys_burst_starts_at_once_and_the_rest_is_paced() -> None:
    limiter = CountingLimiter(started_at=time.monotonic() - 3600)  # up for an hour: the key is fresh
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=600, rpm_burst=10)

    async def main() -> list[float]:
        begun = time.monotonic()
        results = await start_times(client, budget, 20)
        return [t - begun for t in results]

    waits = sorted(asyncio.run(main()))
    assert waits[9] < 0.1  # the burst: no pacing
    assert waits[19] == pytest.approx(1.0, abs=0.15)  # then 10/s


def test_closing_the_client_answers_its_queued_bookings() -> None:
    limiter = CountingLimiter()
    client = BookingClient(limiter.reserve)
    budget = Budget(rpm=60)  # 1/s: the second booking waits in the fair queue

    async def main() -> None:
        deadline = time.monotonic() + 30
        first = asyncio.ensure_future(client.book("model:m", budget, 1, 0, deadline, Share(tenant="A")))
        queued = asyncio.ensure_future(client.book("model:m", budget, 1, 0, deadline, Share(tenant="A")))
        await until(lambda: limiter.limiter.core.queues.get("model:m"), message="a booking in the fair queue")
        assert not queued.done()
        await client.close()
        with pytest.raises(Overloaded):
            await asyncio.wait_for(queued, 2)
        first.cancel()

    asyncio.run(main())
    assert not limiter.limiter.core.queues["model:m"]  # the closed stream gave its place back


def test_a_keys_bookings_go_in_one_plain_call_answered_at_once() -> None:
    """The Gateway books a key's budget with ``reserve_now`` (no stream): paced and refused the same."""
    limiter = RateLimiter()
    limiter.core.started_at = time.monotonic() - 3600  # the key is fresh: its burst is available
    client = BookingClient(answered_at_once(limiter.reserve_now))
    budget = Budget(rpm=60, rpm_burst=2)

    async def main() -> list[float | None]:
        now = time.monotonic()
        return list(await asyncio.gather(*(client.book("key:k", budget, 1, 0, now + 1.5) for _ in range(4))))

    answers = asyncio.run(main())
    assert answers[:3] == [None] * 3  # the burst of 2, then one paced within the 1.5 s deadline
    assert answers[3] is not None and answers[3] == pytest.approx(2.0, abs=0.2)  # the true wait


def test_reserve_now_refuses_asks_that_could_queue() -> None:
    request = ReserveRequest(budget="model:m", limits=Budget(rpm=60),
                             asks=[BookingAsk(requests=1, tokens=0, max_wait_s=5, share=Share(tenant="A"))])
    with pytest.raises(ValueError):
        asyncio.run(RateLimiter().reserve_now(request))
