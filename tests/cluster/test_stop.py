"""`promptfleet stop --ray` stops the cluster promptfleet started, and no other (issue 23, part 2).

Two single-node clusters run side by side on this machine, each started with `promptfleet start
--head` (no --block: `ray start` leaves its processes in the background, as `make start` does) on
an address of its own (127.0.0.6 and 127.0.0.7). Stopping the first ends every process of it;
the second keeps every process and still answers chat completions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import ownership
from tests.cluster.harness import PROMPTFLEET, REPO, cluster_config, free_port, node_ports, shell_env
from tests.fakes.upstream import FakeUpstream

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]


class Started:
    """One cluster started by `promptfleet start --head` in the background."""

    def __init__(self, host: str, upstream: FakeUpstream, tmp: Path, state_dir: Path) -> None:
        self.host = host
        self.listen_port = free_port(host)
        config = cluster_config(upstream.base_url, tmp / "state", self.listen_port, free_port("127.0.0.1"),
                                local_model=False)
        app = config["applications"][0]
        for deployment in app["deployments"]:
            if deployment["name"] == "worker-fake-limited":  # one node: one replica per node is one replica
                deployment["num_replicas"] = 1
        self.config_file = tmp / "serve.json"
        self.config_file.write_text(json.dumps(config))
        self.dashboard = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="pfs-"))  # short: Ray's socket paths live below it
        self.env = {**shell_env(tmp / "auth_token"), ownership.STATE_DIR_ENV: str(state_dir)}
        self.log = tmp / "start.log"

    def start(self) -> None:
        argv = [PROMPTFLEET, "start", "--head", "--host", self.host, "--num-cpus", "2",
                "--port", str(free_port(self.host)), "--config", str(self.config_file), "--dashboard", self.dashboard,
                "--", "--ray-client-server-port", str(free_port(self.host)), *node_ports(self.host),
                "--temp-dir", str(self.ray_tmp)]
        with self.log.open("ab") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, timeout=900)
        assert done.returncode == 0, self.log.read_text()[-3000:]

    def stop(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PROMPTFLEET, "stop", "--ray", "--dashboard", self.dashboard, "--timeout", "20"],
                              capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120)

    def chat(self) -> Any:
        with openai.OpenAI(base_url=f"http://{self.host}:{self.listen_port}/v1", api_key="unused", max_retries=0,
                           timeout=60) as client:
            return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])


def marks(state_dir: Path) -> dict[str, str]:
    """Dashboard URL -> the node mark, from the records `promptfleet start` wrote."""
    return {r.dashboard or "": r.mark for r in ownership.records({ownership.STATE_DIR_ENV: str(state_dir)})}


@pytest.fixture
def two_clusters(upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Started, Started, Path]]:
    state_dir = tmp_path / "promptfleet-state"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = Started("127.0.0.6", upstream, tmp_path / "a", state_dir)
    b = Started("127.0.0.7", upstream, tmp_path / "b", state_dir)
    started_marks: set[str] = set()
    try:
        for cluster in (a, b):
            cluster.start()
            started_marks |= set(marks(state_dir).values())
        yield a, b, state_dir
    finally:
        # Whatever the test left running: exactly the marked processes of these two clusters,
        # a cluster whose start failed half-way included (its record is written before the deploy).
        for mark in started_marks | set(marks(state_dir).values()):
            for pid in ownership.marked(mark):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_stop_ray_ends_this_cluster_and_the_other_keeps_serving(
    two_clusters: tuple[Started, Started, Path], upstream: FakeUpstream
) -> None:
    a, b, state_dir = two_clusters
    mark_a, mark_b = marks(state_dir)[a.dashboard], marks(state_dir)[b.dashboard]
    assert a.chat().choices[0].message.content == "echo: hi"
    assert b.chat().choices[0].message.content == "echo: hi"
    processes_a = ownership.marked(mark_a)
    processes_b = ownership.marked(mark_b)
    assert processes_a and processes_b and not processes_a & processes_b

    stopped = a.stop()
    print(stopped.stdout, stopped.stderr)
    assert stopped.returncode == 0, stopped.stderr
    assert "Serve applications removed" in stopped.stdout

    assert not any(ownership.alive(pid) for pid in processes_a), "a process of the stopped cluster lives"
    assert ownership.marked(mark_a) == set()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{a.host}:{a.listen_port}/healthz", timeout=5)
    # The other cluster lost no process and still serves.
    assert all(ownership.alive(pid) for pid in processes_b), "a process of the other cluster died"
    assert b.chat().choices[0].message.content == "echo: hi"
    assert list(marks(state_dir)) == [b.dashboard]  # the stopped cluster's record is gone, the other's kept

    # Stopping it again finds nothing of its own to stop, and says so.
    again = a.stop()
    assert again.returncode == 1 and "nothing stopped" in again.stderr
    assert b.stop().returncode == 0
    assert ownership.marked(mark_b) == set()
