"""What crosses the RateLimiter's handle (``deployments.limits.rate_limiter``), booked through
``deployments.limits.booking.BookingClient``. The words (budget, booking, share, pacer, pause) are
those of the glossary in ``deployments.limits``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from deployments.schemas.base import OwnBody
from deployments.schemas.keys import MAX_WEIGHT, MIN_WEIGHT


class Budget(OwnBody):
    """Limits of one budget, sent with every booking (the limiter keeps no config); either may be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute.")
    rpm_burst: float | None = Field(
        default=None, ge=1, description="Requests that may start at once; empty: 0.5 % of `rpm` (at least 1)."
    )
    tpm_burst: float | None = Field(
        default=None, ge=1, description="Tokens that may start at once; empty: 0.5 % of `tpm` (at least 1)."
    )


class Share(OwnBody):
    """Who a call on a shared model budget is for: its tenant's place in the fair queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(max_length=200, description="The key id (or `anonymous`): the unit of fairness.")
    weight: float | None = Field(
        default=1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False,
        description="The key's `weight`; empty: the weight its interactive calls last brought (1 if none).",
    )
    background: bool = Field(
        default=False, description="An async task run or a batch line: served at the background share of "
        "its tenant's turns, behind the tenant's interactive calls."
    )


class BookingAsk(OwnBody):
    """One call asking for its slot on a budget."""

    requests: int = Field(ge=0, description="Requests the call counts (1).")
    tokens: int = Field(ge=0, description="Estimated tokens (0 unless the budget has a `tpm`).")
    max_wait_s: float = Field(ge=0, description="Longest the call may wait for its slot (its deadline).")
    share: Share | None = Field(default=None, description="Its tenant, for a shared budget (fair queue); "
                                "empty: booked in arrival order (a key's own budget).")


class ReserveRequest(OwnBody):
    """A replica's coalesced bookings on one budget (``RateLimiter.reserve``)."""

    budget: str = Field(description="`model:<name>` (upstream limits) or `key:<id>` (a key's limits).")
    limits: Budget = Field(description="The budget's limits.")
    asks: list[BookingAsk] = Field(description="The bookings, answered by index.")
    token_delta: int = Field(default=0, description="Real minus estimated tokens of earlier calls, settled first.")


class BookingAnswer(OwnBody):
    """The answer to ``asks[index]``: start after ``delay_s``, or retry after ``delay_s`` (nothing booked)."""

    index: int = Field(ge=0, description="Position of the ask in its request.")
    granted: bool = Field(description="True: the slot is booked; False: it could not start within `max_wait_s`.")
    delay_s: float = Field(ge=0, description="Granted: seconds until the call may start. Refused: seconds until "
                           "a slot is expected to be free (the Retry-After).")


class PacerState(OwnBody):
    """One unit (requests or tokens) of a budget, as the RateLimiter holds it now."""

    unit: Literal["requests", "tokens"]
    per_minute: float = Field(description="The limit, per minute.")
    capacity: float = Field(description="Units that may start at once (the burst).")
    available: float = Field(description="Units that could start now.")


class BudgetState(OwnBody):
    """One budget of the RateLimiter (``model:<name>`` or ``key:<id>``) now."""

    budget: str
    pacers: list[PacerState]
    queued: int = Field(description="Calls waiting for their turn in the budget's fair queue.")
    paused_s: float = Field(description="Seconds left of a pause an upstream's 429 asked for (0: none).")


class LimiterState(OwnBody):
    """What the RateLimiter holds now (the console's overview)."""

    budgets: list[BudgetState]
