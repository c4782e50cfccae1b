"""Weighted fair queueing of calls waiting for one shared budget (pure; the RateLimiter's queue).

When calls of several tenants (API keys) wait for the same model budget, the
next slot goes to the tenant that has had the least service for its weight,
not to the call that came first. This is start-time fair queueing (Goyal, Vin,
Cheng, SIGCOMM 1996) over tenants, with the tags computed when a tenant is
served rather than per call:

* every tenant with calls waiting has a start tag ``S``; the next slot goes to
  the smallest ``S`` (ties: the tenant that has waited longest);
* serving it moves the virtual clock to ``S`` and ``S`` on by ``1 / weight``;
* a tenant that starts waiting again begins at ``max(virtual clock, its old tag)``,
  so idling earns no credit and a flood earns no priority.

Two tenants with calls always waiting so get slots in the ratio of their
weights; a tenant with a single call waiting is served within one round (one
slot per other waiting tenant, scaled by weights), however deep the other
queues are. Fairness counts calls (one slot each), not tokens.

Inside a tenant, interactive calls (chat, synchronous task runs) and
background calls (async task runs, batch lines) share the tenant's turns in
the ratio ``1 : background_share`` by the same rule: background work counts
against its key's share and runs behind its interactive work without starving.

Memory is a deque entry per waiting call, bounded per tenant
(``max_queued_per_tenant``); idle tenants' tags are dropped once the virtual
clock passes them (they would restart at the clock anyway).

Arithmetic: a weight is clamped to ``[MIN_WEIGHT, MAX_WEIGHT]`` whatever its
source (a key stored before the bounds, a caller that skipped validation), so
one call moves a tag by at most ``1 / MIN_WEIGHT`` (100) and at least
``1 / MAX_WEIGHT`` (0.01). Tags only grow, so once the virtual clock passes
``REBASE_AT`` every tag is shifted down by the smallest (a no-op for the order,
which compares differences only): tags stay below ~2**32, where a float still
resolves the smallest step to ~1e-6, instead of drifting to where ``tag + 0.01``
rounds back to ``tag``. Each tenant's lane tags are rebased the same way.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from deployments.schemas.keys import MAX_WEIGHT, MIN_WEIGHT

MAX_REMEMBERED = 100_000  # tenants whose weight is remembered while idle
REBASE_AT = 2.0**32  # virtual time past which tags are shifted back towards 0


def clamp_weight(weight: float) -> float:
    """``weight`` within the accepted bounds (a NaN or non-positive weight counts as 1, the default)."""
    if math.isnan(weight) or weight <= 0:
        return 1.0
    return min(MAX_WEIGHT, max(MIN_WEIGHT, weight))


@dataclass(eq=False)
class Waiter:
    """A call waiting for its slot. ``ticket`` is the caller's handle for it."""

    ticket: int
    tenant: str
    background: bool
    requests: int
    tokens: int
    deadline: float  # monotonic; past it the call is refused


@dataclass(eq=False)
class _Tenant:
    weight: float
    tag: float
    seq: int  # when it last became active: the tie-break
    lanes: tuple[deque[Waiter], deque[Waiter]] = field(default_factory=lambda: (deque(), deque()))
    lane_tags: list[float] = field(default_factory=lambda: [0.0, 0.0])
    lane_clock: float = 0.0

    def __len__(self) -> int:
        return len(self.lanes[0]) + len(self.lanes[1])

    def head_lane(self) -> int:
        interactive, background = self.lanes
        if not background:
            return 0
        if not interactive:
            return 1
        return 0 if self.lane_tags[0] <= self.lane_tags[1] else 1


class FairQueue:
    """The waiting calls of one budget, handed out by weighted fair share of tenants."""

    def __init__(self, max_queued_per_tenant: int = 1000, background_share: float = 0.25) -> None:
        if max_queued_per_tenant < 1 or not MIN_WEIGHT <= background_share <= 1:
            raise ValueError(f"max_queued_per_tenant must be >= 1 and {MIN_WEIGHT} <= background_share <= 1")
        self.max_queued_per_tenant = max_queued_per_tenant
        self.background_share = background_share
        self.active: dict[str, _Tenant] = {}
        self.idle_tags: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # the last weight each tenant's calls brought
        self.clock = 0.0
        self.seq = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def queued(self, tenant: str) -> int:
        active = self.active.get(tenant)
        return len(active) if active is not None else 0

    def full(self, tenant: str) -> bool:
        return self.queued(tenant) >= self.max_queued_per_tenant

    def push(self, waiter: Waiter, weight: float | None) -> None:
        """Queue ``waiter`` (the caller checked ``full`` first); ``weight`` None: the tenant's last known."""
        if weight is None:
            weight = self.weight(waiter.tenant)
        else:
            weight = clamp_weight(weight)
            if len(self.weights) >= MAX_REMEMBERED and waiter.tenant not in self.weights:
                self.weights.clear()
            self.weights[waiter.tenant] = weight
        tenant = self.active.get(waiter.tenant)
        if tenant is None:
            self.seq += 1
            start = max(self.clock, self.idle_tags.pop(waiter.tenant, 0.0))
            tenant = self.active[waiter.tenant] = _Tenant(weight=weight, tag=start, seq=self.seq)
        tenant.weight = weight  # the latest weight of the key wins
        lane = 1 if waiter.background else 0
        if not tenant.lanes[lane]:
            tenant.lane_tags[lane] = max(tenant.lane_clock, tenant.lane_tags[lane])
        tenant.lanes[lane].append(waiter)
        self.size += 1

    def peek(self) -> Waiter | None:
        """The call the next slot goes to (None when nothing waits)."""
        tenant = self._next_tenant()
        return None if tenant is None else tenant.lanes[tenant.head_lane()][0]

    def pop(self) -> Waiter:
        """Take the call ``peek`` named, charging its tenant (and lane) one slot."""
        tenant = self._next_tenant()
        if tenant is None:
            raise IndexError("no call is waiting")
        if tenant.tag > REBASE_AT:
            self._rebase(tenant.tag)  # before the step below, which would be lost at such a magnitude
        lane = tenant.head_lane()
        waiter = tenant.lanes[lane].popleft()
        self.clock = tenant.tag
        tenant.tag += 1.0 / tenant.weight
        tenant.lane_clock = tenant.lane_tags[lane]
        tenant.lane_tags[lane] += 1.0 if lane == 0 else 1.0 / self.background_share
        if tenant.lane_clock > REBASE_AT:
            shift = tenant.lane_clock
            tenant.lane_clock = 0.0
            tenant.lane_tags = [max(0.0, tag - shift) for tag in tenant.lane_tags]
        self.size -= 1
        if not tenant:
            self._retire(waiter.tenant, tenant)
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out without serving it (deadline passed, caller gone); False if not queued."""
        tenant = self.active.get(waiter.tenant)
        if tenant is None:
            return False
        lane = tenant.lanes[1 if waiter.background else 0]
        try:
            lane.remove(waiter)
        except ValueError:
            return False
        self.size -= 1
        if not tenant:
            self._retire(waiter.tenant, tenant)
        return True

    def weight(self, tenant: str) -> float:
        """The tenant's weight as its calls last brought it (1 if never given)."""
        return self.weights.get(tenant, 1.0)

    def share(self, tenant: str, weight: float | None) -> float:
        """The fraction of slots ``tenant`` gets while everyone now waiting keeps waiting (with it)."""
        weight = self.weight(tenant) if weight is None else clamp_weight(weight)
        total = sum(t.weight for name, t in self.active.items() if name != tenant) + weight
        return weight / total

    def _next_tenant(self) -> _Tenant | None:
        # A scan of the tenants with calls waiting: few in practice (a heap would pay per push).
        best: _Tenant | None = None
        for tenant in self.active.values():
            if best is None or (tenant.tag, tenant.seq) < (best.tag, best.seq):
                best = tenant
        return best

    def _rebase(self, shift: float) -> None:
        """Shift every tag and the clock down by ``shift``, the smallest active tag (the order of
        tenants is unchanged; idle tags behind it mean no more than the clock)."""
        self.clock = max(0.0, self.clock - shift)
        for tenant in self.active.values():
            tenant.tag = max(0.0, tenant.tag - shift)
        # Idle tags at or behind the clock mean nothing more than the clock itself.
        self.idle_tags = {n: tag - shift for n, tag in self.idle_tags.items() if tag > shift}

    def _retire(self, name: str, tenant: _Tenant) -> None:
        del self.active[name]
        self.idle_tags[name] = tenant.tag
        if len(self.idle_tags) > 4 * (len(self.active) + 64):
            # Tags at or behind the clock mean nothing more than the clock itself.
            self.idle_tags = {n: tag for n, tag in self.idle_tags.items() if tag > self.clock}
