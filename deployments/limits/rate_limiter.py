"""RateLimiter: request and token budgets shared by every replica on every node (a one-replica deployment).

Serves: ``reserve`` (book calls on a budget, correcting earlier token estimates
with real usage first), ``pause`` (an upstream said 429 + Retry-After) and
``watch_pause`` (a long-poll that wakes every worker replica of a model when a
pause starts). Budgets are named by the caller — ``model:<name>`` for upstream
limits, ``key:<id>`` for API keys — and carry their limits with each call
(``schemas.ReserveRequest``), so the limiter's only config is how it queues
(``admission`` in the app config).
Calls: nothing.
Owns: one ``Pacer`` per budget and unit (requests, tokens) and, per shared
budget, the ``FairQueue`` of calls waiting for it — in memory.

``reserve`` streams its answers (a Serve streaming handle call): first every
answer known at once — a key's own budget is always answered at once (start
after N seconds, or refused with the true wait as Retry-After); a shared budget
is answered at once while nobody waits for it — then, as queued calls get their
turn in fair order, their grants. A queued call costs a deque entry here and
nothing else: one dispatcher task per budget with calls waiting sleeps until the
next slot or deadline (no polling), and the caller's stream stays open. A
caller that goes away closes its stream, which frees its queued places.

If this replica dies, Serve starts a new one; what it may grant is the restart
rule of ``pacing`` (every budget counts as empty at the restart), so no
window sees more than the documented burst on top of the rate. Callers whose
streams broke book again on the new replica within their own deadline (they
fail closed, never open).

Metrics (``deployments.telemetry``): every booking it grants is observed with the wait it got
(queued ones from when they were booked), every refusal and every pause started is counted;
pauses in force and fair-queue lengths are sampled every ``metrics.sample_interval_s``.

Cost: callers go through ``deployments.limits.booking.BookingClient``, which puts
all of a replica's concurrent bookings on a budget into one call. Unlimited
models and keys never call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from deployments.collector import raise_first_generation
from deployments.config import AdmissionConfig, MetricsConfig
from deployments.limits.fair_queue import Waiter
from deployments.limits.pacing import Granted, Queued, RateLimiterCore, Refused
from deployments.schemas import BookingAnswer, LimiterState, ReserveRequest
from deployments.telemetry import LIMITER_METRICS, metrics_for, start_sampling

WATCH_TIMEOUT_S = 30.0

# (ticket, granted, start time if granted else retry-after seconds), to the stream that queued it.
_Outcome = tuple[int, bool, float]


class RateLimiter:
    """The deployment: books, pauses and reports every budget (module doc)."""

    def __init__(self, config: AdmissionConfig | None = None, metrics: MetricsConfig | None = None) -> None:
        raise_first_generation()
        config = config or AdmissionConfig()
        self.metrics = metrics_for(metrics)
        self.metrics.declare(*LIMITER_METRICS)
        self.core = RateLimiterCore(
            time.monotonic(),
            grant_ahead_s=config.grant_ahead_s,
            max_queued_per_tenant=config.max_queued_per_key,
            background_share=config.background_share,
        )
        self.pause_changed: dict[str, asyncio.Event] = {}
        self.inboxes: dict[int, asyncio.Queue[_Outcome]] = {}  # ticket -> its stream's inbox
        self.dispatchers: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        interval = (metrics or MetricsConfig()).sample_interval_s
        self.sampler = start_sampling(self.metrics, interval, self.sample_metrics, "rate limiter")

    async def sample_metrics(self) -> None:
        """Pauses in force and fair-queue lengths, into the gauges (every model budget seen)."""
        now = time.monotonic()
        paused = {name: until - now for name, until in self.core.paused_until.items()}
        queued = {name: len(queue) for name, queue in self.core.queues.items()}
        self.metrics.limiter_state(paused, queued)

    async def reserve(self, request: ReserveRequest) -> AsyncIterator[list[BookingAnswer]]:
        """Book ``request.asks``; yield answers (by index) as they are decided, the first batch at once.

        A granted answer's ``delay_s`` counts from when it is yielded; a refused one's is the
        expected wait (Retry-After). The stream ends when every ask is answered.
        """
        now = booked_at = time.monotonic()
        name = request.budget
        metrics = self.metrics
        if request.token_delta:
            self.core.settle(name, request.token_delta, now)
        answers: list[BookingAnswer] = []
        queued: dict[int, tuple[int, Waiter]] = {}  # ticket -> (index, waiter)
        inbox: asyncio.Queue[_Outcome] = asyncio.Queue()
        for index, ask in enumerate(request.asks):
            decision = self.core.book(name, request.limits, ask, now)
            if isinstance(decision, Granted):
                answers.append(BookingAnswer(index=index, granted=True, delay_s=max(0.0, decision.start - now)))
                metrics.limiter_wait(name, decision.start - now)
            elif isinstance(decision, Refused):
                answers.append(BookingAnswer(index=index, granted=False, delay_s=decision.retry_after))
                metrics.limiter_refusal(name)
            elif isinstance(decision, Queued):
                queued[decision.waiter.ticket] = (index, decision.waiter)
                self.inboxes[decision.waiter.ticket] = inbox
        if queued:
            self._wake(name)
        try:
            yield answers
            while queued:
                outcomes = [await inbox.get()]
                while not inbox.empty():
                    outcomes.append(inbox.get_nowait())
                now = time.monotonic()
                batch = []
                for ticket, granted, value in outcomes:
                    index, _ = queued.pop(ticket)
                    delay = max(0.0, value - now) if granted else value
                    batch.append(BookingAnswer(index=index, granted=granted, delay_s=delay))
                    if granted:
                        metrics.limiter_wait(name, value - booked_at)
                    else:
                        metrics.limiter_refusal(name)
                yield batch
        finally:
            # The caller went away (or the replica is stopping): its queued calls give up their places.
            for ticket, (_, waiter) in queued.items():
                self.inboxes.pop(ticket, None)
                self.core.cancel(name, waiter)

    async def reserve_now(self, request: ReserveRequest) -> list[BookingAnswer]:
        """``reserve`` for bookings that never queue (no ``share``: a key's own budget), as one
        plain call: a unary handle call costs less than a stream."""
        if any(ask.share is not None for ask in request.asks):
            raise ValueError("reserve_now books only asks without a share (they are answered at once)")
        answers: list[BookingAnswer] = []
        async for batch in self.reserve(request):
            answers += batch
        return answers

    def _wake(self, name: str) -> None:
        event = self.wakeups.get(name)
        if event is not None:
            event.set()
        if name not in self.dispatchers:
            self.wakeups[name] = asyncio.Event()
            self.dispatchers[name] = asyncio.get_running_loop().create_task(self._dispatch(name))

    async def _dispatch(self, name: str) -> None:
        """Hand out a shared budget's slots while calls wait for it; sleep until the next one is due."""
        event = self.wakeups[name]
        try:
            while True:
                now = time.monotonic()
                granted, refused = self.core.dispatch(name, now)
                for waiter, start in granted:
                    self._answer(waiter.ticket, True, start)
                for waiter, retry_after in refused:
                    self._answer(waiter.ticket, False, retry_after)
                wake = self.core.next_wake(name, now)
                if wake is None:
                    return
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(0.0, wake - time.monotonic()))
        finally:
            del self.dispatchers[name]
            del self.wakeups[name]

    def _answer(self, ticket: int, granted: bool, value: float) -> None:
        inbox = self.inboxes.pop(ticket, None)
        if inbox is not None:
            inbox.put_nowait((ticket, granted, value))

    async def state(self) -> LimiterState:
        """What every budget holds now: the console's limiter view (read only)."""
        return self.core.snapshot(time.monotonic())

    async def pause(self, name: str, seconds: float) -> None:
        # Durations, not timestamps, cross the wire: nodes' clocks differ.
        if self.core.pause(name, time.monotonic() + seconds):
            self.metrics.limiter_pause(name)
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
