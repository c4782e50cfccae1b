"""The Gateway's placement policy (one replica per gateway node) and its /healthz logic, without Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.config import NODE_IP, GatewayConfig
from deployments.gateway.health import HealthCheck
from deployments.gateway.placement import OnePerNode, count_gateway_nodes
from deployments.schemas import CatalogueStatus, ModelReadiness

NODES = [
    {"Alive": True, "Resources": {"CPU": 2.0, "promptfleet_gateway": 1.0}},
    {"Alive": True, "Resources": {"CPU": 2.0}},
    {"Alive": False, "Resources": {"CPU": 2.0, "promptfleet_gateway": 1.0}},
    {"Alive": True, "Resources": {"promptfleet_gateway": 1.0}},
]


def test_counts_alive_nodes_or_alive_nodes_with_the_role() -> None:
    assert count_gateway_nodes(NODES, None) == 3
    assert count_gateway_nodes(NODES, "promptfleet_gateway") == 2
    assert count_gateway_nodes(NODES, "other") == 0


def test_policy_follows_nodes_but_asks_the_gcs_at_most_every_recheck() -> None:
    listed: list[list[dict[str, Any]]] = [NODES]
    calls, now = [0], [0.0]

    def list_nodes() -> list[dict[str, Any]]:
        calls[0] += 1
        return listed[0]

    policy = OnePerNode(resource="promptfleet_gateway", recheck_s=2, list_nodes=list_nodes, clock=lambda: now[0])
    assert policy(None) == (2, {})
    listed[0] = [*NODES, {"Alive": True, "Resources": {"promptfleet_gateway": 1.0}}]
    now[0] = 1.0
    assert policy(None) == (2, {}) and calls[0] == 1  # cached
    now[0] = 2.5
    assert policy(None) == (3, {}) and calls[0] == 2  # a node joined
    listed[0] = []
    now[0] = 5.0
    assert policy(None) == (1, {})  # never below one Gateway


def test_policy_keeps_its_count_while_the_gcs_is_away() -> None:
    state = {"fail": False}

    def list_nodes() -> list[dict[str, Any]]:
        if state["fail"]:
            raise ConnectionError("GCS unavailable")
        return NODES

    now = [0.0]
    policy = OnePerNode(recheck_s=1, list_nodes=list_nodes, clock=lambda: now[0])
    assert policy(None)[0] == 3
    state["fail"], now[0] = True, 5.0
    assert policy(None)[0] == 3


def test_listen_host_node_ip_binds_the_nodes_address() -> None:
    assert GatewayConfig(listen_host=NODE_IP).bind_host("10.0.0.7") == "10.0.0.7"
    assert GatewayConfig().bind_host("10.0.0.7") == "127.0.0.1"


class Probe:
    """A store's health check or a worker's ``readiness()``: ok, failing, hanging, or (a worker)
    up with its upstream unreachable."""

    def __init__(self, behaviour: str = "ok") -> None:
        self.behaviour = behaviour
        self.calls = 0

    async def __call__(self) -> ModelReadiness:
        self.calls += 1
        if self.behaviour == "fail":
            raise RuntimeError("replica gone")
        if self.behaviour == "hang":
            await asyncio.sleep(60)
        return ModelReadiness(replicas="up", upstream="unreachable" if self.behaviour == "no-upstream" else "ok")


def test_readiness_is_ok_with_store_and_one_model_and_says_what_each_model_lacks() -> None:
    store, a, b, c = Probe(), Probe(), Probe("fail"), Probe("no-upstream")
    health = asyncio.run(HealthCheck(store, {"a": a, "b": b, "c": c}, node="10.0.0.7").check())
    assert health.status == "ok" and health.store == "ok" and health.node == "10.0.0.7"
    assert health.models == {
        "a": ModelReadiness(replicas="up", upstream="ok"),
        "b": ModelReadiness(replicas="down", upstream="unknown"),
        "c": ModelReadiness(replicas="up", upstream="unreachable"),
    }


@pytest.mark.parametrize(
    ("store", "models", "store_state"),
    [("fail", ["ok"], "unreachable"), ("hang", ["ok"], "unreachable"), ("ok", ["fail", "hang"], "ok"),
     ("ok", ["no-upstream"], "ok")],
)
def test_health_is_unavailable_without_store_or_any_model(store: str, models: list[str], store_state: str) -> None:
    check = HealthCheck(Probe(store), {f"m{i}": Probe(m) for i, m in enumerate(models)}, node="n", timeout_s=0.2)
    health = asyncio.run(check.check())
    assert health.status == "unavailable" and health.store == store_state


def test_probes_share_one_check_and_reuse_it_for_ttl() -> None:
    store, model = Probe(), Probe()
    check = HealthCheck(store, {"m": model}, node="n", ttl_s=60)

    async def many() -> None:
        await asyncio.gather(*(check.check() for _ in range(50)))
        await check.check()

    asyncio.run(many())
    assert store.calls == 1 and model.calls == 1
    expired = HealthCheck(store, {"m": model}, node="n", ttl_s=0)

    async def twice() -> None:
        await expired.check()
        await expired.check()

    asyncio.run(twice())
    assert store.calls == 3


@pytest.mark.parametrize(("state", "status"), [("current", "ok"), ("stale", "unavailable"), ("loading", "unavailable")])
def test_readiness_carries_the_catalogue_and_a_stale_one_is_unavailable(state: str, status: str) -> None:
    catalogue = CatalogueStatus(version=7, tasks=3, state=state, refreshed_s_ago=1.0, error=None, not_loaded=[])
    check = HealthCheck(Probe(), {"m": Probe()}, node="n", catalogue=lambda: catalogue)
    health = asyncio.run(check.check())
    assert health.status == status and health.catalogue == catalogue
