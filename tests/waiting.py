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


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, message: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:g}s: {message or predicate}")
        time.sleep(interval_s)


async def until(predicate: Callable[[], T], timeout_s: float = 10.0, message: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:g}s: {message or predicate}")
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
