"""``/healthz`` and ``/readyz``: is this Gateway alive, and can it serve?

``/healthz`` (liveness) asks nothing of anyone: it answers 200 as long as the replica's event loop
does, so a liveness probe never restarts a Gateway because a model or the store is down.

``/readyz`` (readiness) answers 200 when the TaskStore answers its health check and at least one
model can serve — one of its worker replicas answers ``readiness()`` and, for an upstream model,
that worker can reach the upstream — each within ``timeout_s`` — and this replica's task catalogue is
loaded and current (``CatalogueFollower.status``); else 503. The body says it per
model (``Readiness`` in the schema module), for a person looking at a node. The checks go through
the same ``DeploymentHandle``s requests use, so they see what a request would see from this node.
A load balancer may probe as often as it likes: one check runs at a time per Gateway replica and
its answer is reused for ``ttl_s``, so probes cost at most one store call and one call per model
every ``ttl_s``, none on the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from deployments.schemas import CatalogueStatus, ModelReadiness, Readiness

Probe = Callable[[], Awaitable[Any]]
DOWN = ModelReadiness(replicas="down", upstream="unknown")


async def _answers(probe: Probe, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except Exception:  # any failure, timeout included, means "not serving": the kind does not matter here
        return False
    return True


async def _model(probe: Probe, timeout_s: float) -> ModelReadiness:
    try:
        answer = await asyncio.wait_for(probe(), timeout_s)
    except Exception:  # as above: a replica that fails or does not answer in time is down
        return DOWN
    return answer if isinstance(answer, ModelReadiness) else DOWN


class HealthCheck:
    """Cached, single-flight readiness of one Gateway replica (see the module docstring)."""

    def __init__(self, store: Probe, models: Mapping[str, Probe], node: str,
                 timeout_s: float = 5.0, ttl_s: float = 1.0,
                 catalogue: Callable[[], CatalogueStatus] | None = None) -> None:
        self.store = store
        self.catalogue = catalogue
        self.models = dict(models)
        self.node = node
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._last: tuple[float, Readiness] | None = None
        self._running: asyncio.Task[Readiness] | None = None

    async def check(self) -> Readiness:
        if self._last is not None and time.monotonic() - self._last[0] < self.ttl_s:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> Readiness:
        names = sorted(self.models)
        store_ok, models = await asyncio.gather(
            _answers(self.store, self.timeout_s),
            asyncio.gather(*(_model(self.models[n], self.timeout_s) for n in names)),
        )
        catalogue = self.catalogue() if self.catalogue is not None else None
        catalogue_ok = catalogue is None or catalogue.state == "current"
        readiness = Readiness(
            status="ok" if store_ok and catalogue_ok and any(m.serving for m in models) else "unavailable",
            store="ok" if store_ok else "unreachable",
            models=dict(zip(names, models, strict=True)),
            node=self.node,
            catalogue=catalogue,
        )
        self._last = (time.monotonic(), readiness)
        return readiness
