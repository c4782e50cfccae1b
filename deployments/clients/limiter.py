"""The RateLimiter's state, for the console: ``LimiterClient``.

Bookings and pauses — the limiter's hot path — go through the typed adapters that own them
(``limits.booking.BookingClient`` built by ``limits.metering.Meter`` and ``limits.guard.UpstreamGuard``);
this client is the rest: the budgets and queues the console's overview shows. Ray's failures
become ``Overloaded`` naming the rate limiter (``clients.failures``).
"""

from __future__ import annotations

from deployments.clients.base import HandleClient
from deployments.schemas import LimiterState


class LimiterClient(HandleClient):
    who = "The rate limiter"

    async def state(self) -> LimiterState:
        state: LimiterState = await self._answer(self.handle.state.remote())
        return state
