"""One Gateway replica per gateway node: a Serve autoscaling policy that counts nodes.

configs/serve.yaml names it as the Gateway's ``autoscaling_config.policy`` together with
``max_replicas_per_node: 1``, so Serve keeps exactly one Gateway on each node that should answer
the API, as nodes join and leave:

- every alive node (no ``policy_kwargs``), or
- every alive node offering a custom resource (``policy_kwargs: {resource: promptfleet_gateway}``,
  the role ``promptfleet start``/``join`` give a node unless ``--no-gateway``; the Gateway's
  ``ray_actor_options.resources`` must then ask for a sliver of it so replicas land only there).

Serve runs the policy in its controller, every control-loop tick, and pickles this module by
value; so it imports nothing of promptfleet and asks the GCS for the node list at most once per
``recheck_s`` (one small RPC). Serve then applies min/max_replicas and the up/downscale delays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def count_gateway_nodes(nodes: Iterable[Mapping[str, Any]], resource: str | None) -> int:
    """Alive nodes (``ray.nodes()`` entries) that should run a Gateway."""
    return sum(
        1
        for node in nodes
        if node.get("Alive") and (resource is None or (node.get("Resources") or {}).get(resource, 0) > 0)
    )


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return list(ray.nodes())


class OnePerNode:
    """Serve autoscaling policy (class form): desired replicas = gateway nodes, at least 1."""

    def __init__(self, resource: str | None = None, recheck_s: float = 2.0,
                 list_nodes: Callable[[], list[dict[str, Any]]] = _ray_nodes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resource = resource
        self.recheck_s = recheck_s
        self.list_nodes = list_nodes
        self.clock = clock
        self.checked_at: float | None = None
        self.count = 1

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        if self.checked_at is None or now - self.checked_at >= self.recheck_s:
            self.checked_at = now
            try:
                self.count = max(1, count_gateway_nodes(self.list_nodes(), self.resource))
            except Exception:  # the GCS is briefly away (head restarting): keep the last count
                pass
        return self.count, {}
