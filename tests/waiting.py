"""Waiting on conditions, never for a fixed time: the tests' one way to wait.

``wait_for(predicate, timeout_s)`` polls until ``predicate()`` is truthy and returns its value,
or fails the test with ``message`` once ``timeout_s`` has passed. Timeouts are generous (the
machine is small and shared); a passing wait costs only as long as the condition takes.
``await until(...)`` is the same inside an event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Deadline:
    def __init__(self, timeout_s: float, what: object) -> None:
        self.timeout_s, self.what = timeout_s, what
        self.at = time.monotonic() + timeout_s

    def met(self, value: object) -> bool:
        if value:
            return True
        if time.monotonic() > self.at:
            raise AssertionError(f"condition not met within {self.timeout_s:g}s: {self.what}")
        return False


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, message: str = "") -> T:
    deadline = _Deadline(timeout_s, message or predicate)
    while not deadline.met(value := predicate()):
        time.sleep(interval_s)
    return value


async def until(predicate: Callable[[], T], timeout_s: float = 10.0, message: str = "") -> T:
    # Polled, not an Event: the condition is state of objects the test does not instrument.
    deadline = _Deadline(timeout_s, message or predicate)
    while True:
        if deadline.met(value := predicate()):
            return value
        await asyncio.sleep(0.005)


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
