"""``/healthz`` for load balancers: can this node's Gateway serve?

Healthy means the TaskStore answers its health check and at least one model's workers answer
theirs, each within ``timeout_s`` (``Health`` in the schema module has the body). The checks go
through the same ``DeploymentHandle``s requests use, so they see what a request would see from
this node. A load balancer may probe as often as it likes: one check runs at a time per Gateway
replica and its answer is reused for ``ttl_s``, so probes cost at most one store call and one call
per model every ``ttl_s``, none on the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from deployments.schemas import Health

Probe = Callable[[], Awaitable[Any]]


async def _answers(probe: Probe, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except Exception:  # any failure, timeout included, means "not serving": the kind does not matter here
        return False
    return True


class HealthCheck:
    """Cached, single-flight health of one Gateway replica (see the module docstring)."""

    def __init__(self, store: Probe, models: Mapping[str, Probe], node: str,
                 timeout_s: float = 5.0, ttl_s: float = 1.0) -> None:
        self.store = store
        self.models = dict(models)
        self.node = node
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._last: tuple[float, Health] | None = None
        self._running: asyncio.Task[Health] | None = None

    async def check(self) -> Health:
        if self._last is not None and time.monotonic() - self._last[0] < self.ttl_s:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> Health:
        names = sorted(self.models)
        store_ok, *models_ok = await asyncio.gather(
            _answers(self.store, self.timeout_s), *(_answers(self.models[n], self.timeout_s) for n in names)
        )
        ready = dict(zip(names, models_ok, strict=True))
        health = Health(
            status="ok" if store_ok and any(models_ok) else "unavailable",
            models=names,
            store="ok" if store_ok else "unreachable",
            ready=ready,
            node=self.node,
        )
        self._last = (time.monotonic(), health)
        return health
