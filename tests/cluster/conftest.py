"""The multi-node tier's cluster: a head and two worker nodes on loopback addresses (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.harness import HEAD_HOST, LoopbackCluster, cluster_config, free_port
from tests.fakes.upstream import FakeUpstream


@pytest.fixture(scope="module")
def loopback_cluster(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    listen_port = free_port(HEAD_HOST)
    config = cluster_config(upstream.base_url, tmp / "state", listen_port, free_port("127.0.0.1"))
    cluster = LoopbackCluster(config, tmp, listen_port)
    try:
        cluster.bring_up({"worker-smollm2": 2, "worker-fake": 2, "worker-fake-limited": 2})
        yield cluster
    finally:
        cluster.stop()
