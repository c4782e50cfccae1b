"""The multi-node tier's cluster: a head and two worker nodes on loopback addresses (see harness.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import local
from deployments.config import NODE_IP
from tests.cluster.harness import HEAD_HOST, LoopbackCluster, free_port
from tests.fakes.upstream import FakeUpstream
from tests.fixtures import REPO, make_tasks_dir, upstream_models

WORKER_HOSTS = ("127.0.0.2", "127.0.0.3")


def cluster_config(upstream_base_url: str, state: Path, listen_port: int, http_port: int) -> dict[str, Any]:
    """configs/serve.yaml, with each Gateway on its node's address and the workers spread out.

    The head starts with no CPUs, so everything that asks for CPU (the local model, 1 CPU per
    replica; the upstream workers, a sliver each) must run on worker nodes.
    """
    config = copy.deepcopy(local.load_serve_config(REPO / "configs" / "serve.yaml"))
    # One Serve proxy: proxies of several nodes on one machine would all bind the same 127.0.0.1 port.
    config["proxy_location"] = "HeadOnly"
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["args"]["gateway"].update(listen_host=NODE_IP, listen_port=listen_port)
    app["args"]["tasks"].update(
        definitions_dir=str(make_tasks_dir(state / "tasks")), state_dir=str(state / "db"), lease_s=3,
    )
    wanted = {"fake", "fake-limited", "fake-short"}  # fake-short: the shipped test task label_fallback
    app["args"]["models"] += [m for m in upstream_models(upstream_base_url) if m["name"] in wanted]
    app["runtime_env"] = {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1"}}
    deployments = [d for d in app["deployments"] if d["name"] != "worker-smollm2"]
    deployments += [
        # A local model at 1 CPU per replica: one replica on each worker node.
        {"name": "worker-smollm2", "num_replicas": 2, "max_replicas_per_node": 1, "max_ongoing_requests": 4,
         "ray_actor_options": {"num_cpus": 1}},
        # Upstream workers go wherever there is room; lost ones come back on surviving nodes.
        {"name": "worker-fake", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
        # The shared budget's callers: one replica on each worker node.
        {"name": "worker-fake-limited", "num_replicas": 2, "max_replicas_per_node": 1,
         "ray_actor_options": {"num_cpus": 0.1}},
    ]
    app["deployments"] = deployments
    return config


@pytest.fixture(scope="module")
def loopback_cluster(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    listen_port = free_port(HEAD_HOST)
    config = cluster_config(upstream.base_url, tmp / "state", listen_port, free_port("127.0.0.1"))
    cluster = LoopbackCluster(config, tmp)
    cluster.listen_port = listen_port
    try:
        cluster.start_head()
        for host in WORKER_HOSTS:
            cluster.join(host)
        # Every node gets its Gateway (the placement policy sees the joined nodes).
        cluster.wait_until("a Gateway on every node",
                           lambda: cluster.replica_hosts("Gateway") == sorted([HEAD_HOST, *WORKER_HOSTS]), 300)
        cluster.wait_until("workers placed", lambda: len(cluster.running_replicas("worker-smollm2")) == 2, 300)
        yield cluster
    finally:
        cluster.stop()
