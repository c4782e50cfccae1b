"""Waiting on conditions, never for a fixed time: the tests' one way to wait.

``wait_for(predicate, timeout_s)`` polls until ``predicate()`` is truthy and returns its value,
or fails the test with ``message`` once ``timeout_s`` has passed (a callable ``message`` is asked
then, so it can tell the last state seen: a job's logs, say). Timeouts are generous (the
machine is small and shared); a passing wait costs only as long as the condition takes.
``await until(...)`` is the same inside an event loop; its predicate may be a coroutine function
(an ``async def`` store call, say), awaited on each poll.

``ManualClock`` is time for code that takes a clock (``deployments.core.runloop.Clock``): it moves
only when the test calls ``advance``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


Message = str | Callable[[], str]


class _Deadline:
    def __init__(self, timeout_s: float, message: Message, predicate: object) -> None:
        self.timeout_s, self.message, self.predicate = timeout_s, message, predicate
        self.at = time.monotonic() + timeout_s

    def met(self, value: object) -> bool:
        if value:
            return True
        if time.monotonic() > self.at:
            what = self.message() if callable(self.message) else self.message or self.predicate
            raise AssertionError(f"condition not met within {self.timeout_s:g}s: {what}")
        return False


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05,
             message: Message = "") -> T:
    deadline = _Deadline(timeout_s, message, predicate)
    while not deadline.met(value := predicate()):
        time.sleep(interval_s)
    return value


async def until(predicate: Callable[[], T | Awaitable[T]], timeout_s: float = 10.0, message: Message = "",
                interval_s: float = 0.005) -> T:
    # Polled, not an Event: the condition is state of objects the test does not instrument.
    deadline = _Deadline(timeout_s, message, predicate)
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if deadline.met(value):
            return cast(T, value)
        await asyncio.sleep(interval_s)


class ManualClock:
    """A ``deployments.core.runloop.Clock`` that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time on and wake every sleeper whose time has come."""
        self.now += seconds
        due = [(t, f) for t, f in self.sleepers if t <= self.now]
        self.sleepers = [(t, f) for t, f in self.sleepers if t > self.now]
        for _, future in due:
            if not future.done():
                future.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(not f.done() for _, f in self.sleepers)
