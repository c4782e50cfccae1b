"""Where this application's replicas run: per deployment, its status and replicas per node.

Asks Serve's controller (``serve.status``) for each deployment's status and replica states, and
the GCS's actor table for the node of every live replica actor. Both block, so
``Deployments.get`` runs them on a thread, at most once per ``ttl_s`` however many people watch
the overview; if the actor table cannot be read the page still shows the statuses, without nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")

REPLICA_CLASS = "ServeReplica:{app}:"  # Serve's replica actors are named ServeReplica:<app>:<deployment>


@dataclass
class DeploymentRow:
    name: str
    status: str
    replica_states: dict[str, int]
    nodes: dict[str, int] = field(default_factory=dict)  # node address -> running replicas


@dataclass
class Snapshot:
    app: str
    rows: list[DeploymentRow]
    nodes_known: bool
    error: str | None = None


def _word(value: object) -> str:
    """An enum's value (Serve's statuses are str enums), or the text of anything else."""
    return str(getattr(value, "value", value))


def read_snapshot() -> Snapshot:
    """The snapshot of the application this replica belongs to (blocking: run it on a thread)."""
    from ray import serve

    app = serve.get_replica_context().app_name
    status = serve.status().applications.get(app)
    rows = [
        DeploymentRow(
            name=name,
            status=_word(d.status),
            replica_states={_word(state): n for state, n in d.replica_states.items()},
        )
        for name, d in sorted((status.deployments if status else {}).items())
    ]
    try:
        # The GCS's actor table, read directly (what `ray list actors` shows, without the dashboard:
        # the state API's HTTP hop failed under load and where the dashboard listens elsewhere).
        from ray._private.state import actors

        prefix = REPLICA_CLASS.format(app=app)
        per_node = Counter(
            (info["ActorClassName"].removeprefix(prefix), info["Address"]["IPAddress"])
            for info in actors(actor_state_name="ALIVE").values()
            if info["ActorClassName"].startswith(prefix)
        )
    except Exception as exc:
        logger.warning("console: could not read the actor table: %s", exc)
        return Snapshot(app=app, rows=rows, nodes_known=False, error=type(exc).__name__)
    for row in rows:
        row.nodes = {node: n for (name, node), n in sorted(per_node.items()) if name == row.name}
    return Snapshot(app=app, rows=rows, nodes_known=True)


class Deployments:
    """The snapshot, refreshed at most every ``ttl_s`` (one refresh at a time)."""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._last: tuple[float, Snapshot] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Snapshot | None:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last[0] >= self.ttl_s:
                try:
                    self._last = (time.monotonic(), await asyncio.to_thread(read_snapshot))
                except Exception:
                    logger.warning("console: could not read Serve's status", exc_info=True)
                    return self._last[1] if self._last else None
            return self._last[1]
