"""A real ``Meter`` without Ray, for unit tests: over the real RateLimiter and TaskStore classes (SQLite
in a temporary directory), reached through handle-shaped wrappers on the test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deployments.clients.keys import KeysClient
from deployments.config import TasksConfig
from deployments.core.replies import unwrap
from deployments.limits.metering import KeyEntry, Meter
from deployments.limits.rate_limiter import RateLimiter
from deployments.schemas import BookingAnswer, ReserveRequest, UsageList
from deployments.task_store import TaskStore
from tests.fakes.workers import Handle


class RecordingLimiter(RateLimiter):
    """The real RateLimiter, recording the tokens booked and settled per budget."""

    def __init__(self) -> None:
        super().__init__()
        self.net: dict[str, int] = {}
        self.requests: dict[str, int] = {}

    async def reserve_now(self, request: ReserveRequest) -> list[BookingAnswer]:
        answers = await super().reserve_now(request)
        granted = [request.asks[a.index] for a in answers if a.granted]
        name = request.budget
        self.net[name] = self.net.get(name, 0) + sum(ask.tokens for ask in granted) + request.token_delta
        self.requests[name] = self.requests.get(name, 0) + len(granted)
        return answers


class Metered:
    """A Meter over the real RateLimiter and TaskStore (SQLite under ``tmp``), and one key."""

    def __init__(self, tmp: Path) -> None:
        self.limiter = RecordingLimiter()
        self.store = TaskStore(TasksConfig(state_dir=str(tmp)))
        self.meter = Meter(KeysClient(Handle(self.store)), Handle(self.limiter))

    async def key(self, **limits: Any) -> KeyEntry:
        key, _ = unwrap(await self.store.create_key("tenant", limits.get("rpm"), limits.get("tpm"),
                                             limits.get("token_budget")))
        return KeyEntry(key=key, fetched_at=time.monotonic())

    async def booked(self, key: KeyEntry) -> int:
        """Tokens booked on the key's tpm, once a booking reached the limiter."""
        for _ in range(100):
            if self.limiter.net:
                break
            await asyncio.sleep(0.01)
        return self.limiter.net[f"key:{key.key.id}"]

    async def settled(self, key: KeyEntry) -> int:
        """Tokens left booked on the key's tpm once corrections went out."""
        for _ in range(100):
            if not self.meter.bookings.unsettled and not self.meter.bookings.senders:
                break
            await asyncio.sleep(0.05)
        return self.limiter.net.get(f"key:{key.key.id}", 0)

    async def usage(self, key: KeyEntry) -> list[dict[str, Any]]:
        await self.meter.flush()
        page: UsageList = unwrap(await self.store.usage(key.key.id))
        return [row.model_dump() for row in page.data]

    async def close(self) -> None:
        await self.meter.close()
        self.store.close()


def metered(tmp_path: Path, scenario: Callable[[Metered], Awaitable[None]]) -> None:
    async def go() -> None:
        m = Metered(tmp_path)
        try:
            await scenario(m)
        finally:
            await m.close()
    asyncio.run(go())
