"""A real multi-node promptfleet cluster on one machine, each node on its own loopback address.

Nodes are started the way a person starts them — ``promptfleet start --head`` and ``promptfleet
join`` (with ``--block``, so each node's processes are the descendants of one command) — from a
shell whose PATH does not hold the virtualenv, with a token file of the test's own and a free port
for everything Ray, Serve and the Gateway open. Ray replaces ``--node-ip-address 127.0.0.1`` with
the machine's interface address, so the head is 127.0.0.5 and the workers 127.0.0.2, 127.0.0.3.

Each node gets a Ray temp dir of its own (``--temp-dir``): `ray start` records the last cluster it
started in its temp dir's ``ray_current_cluster``, and a ``ray.init()`` without an address anywhere
on the machine connects to the cluster named in /tmp/ray's — so the default one is never touched.

Stopping a node SIGKILLs exactly its processes (never ``ray stop``, which would end every Ray
process on the machine, other people's clusters included): each node's command runs with a marker
variable of its own in its environment, which every process Ray starts for the node inherits, so
the node's processes are found in /proc even when one was orphaned (its parent died first).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from cluster import local, ownership
from deployments.config import NODE_IP
from tests.cluster_process import alive, descendants
from tests.fixtures import TEST_TASKS, make_tasks_dir, upstream_models

REPO = Path(__file__).resolve().parents[2]
PROMPTFLEET = str(Path(sys.executable).with_name("promptfleet"))
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_HOST = "127.0.0.5"
WORKER_HOSTS = ("127.0.0.2", "127.0.0.3")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shell_env(token_path: Path) -> dict[str, str]:
    """A login shell's environment without the virtualenv: its bin is not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    # The records of the nodes promptfleet starts (cluster.ownership) stay with the test too.
    return {**env, "PATH": os.pathsep.join(path), "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PROMPTFLEET_STATE_DIR": str(token_path.parent / "promptfleet-state"), "PYTHONUNBUFFERED": "1"}


def cluster_config(upstream_base_url: str, state: Path, listen_port: int, http_port: int,
                   local_model: bool = True) -> dict[str, Any]:
    """configs/serve.yaml, with each Gateway on its node's address and the workers spread out.

    ``local_model=False`` leaves the embedded model out (benchmarks of the Gateway path).
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
    if local_model:
        # A local model at 1 CPU per replica: one replica on each worker node.
        deployments.append({"name": "worker-smollm2", "num_replicas": 2, "max_replicas_per_node": 1,
                            "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 1}})
    else:
        local_workers = {f"worker-{m['name']}" for m in app["args"]["models"] if m["provider"] == "llamacpp"}
        app["args"]["models"] = [m for m in app["args"]["models"] if m["provider"] != "llamacpp"]
        deployments = [d for d in deployments if d["name"] not in local_workers]  # the embedding model's too
        for shipped in (REPO / "configs" / "tasks").glob("*.yaml"):  # they run on the embedded model
            (state / "tasks" / shipped.name).unlink()
    # Every task is checked against the configured models at deploy: leave out the test tasks of
    # models this cluster does not run (the metrics test's `fake-metrics`).
    configured = {m["name"] for m in app["args"]["models"]}
    for name, definition in TEST_TASKS.items():
        if definition["model"] not in configured:
            (state / "tasks" / f"{name}.yaml").unlink()
    deployments += [
        # Upstream workers go wherever there is room; lost ones come back on surviving nodes.
        {"name": "worker-fake", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
        # The shared budget's callers: one replica on each worker node.
        {"name": "worker-fake-limited", "num_replicas": 2, "max_replicas_per_node": 1,
         "ray_actor_options": {"num_cpus": 0.1}},
    ]
    app["deployments"] = deployments
    return config


MARKER = "PROMPTFLEET_TEST_NODE"


def marked(marker: str) -> set[int]:
    """Processes whose environment holds ``MARKER=marker``."""
    return ownership.marked(marker, MARKER)


def node_ports(host: str) -> list[str]:
    """`ray start` options giving every port a node opens a free one on its address."""
    ports = {
        "--node-manager-port": free_port(host),
        "--object-manager-port": free_port(host),
        "--metrics-export-port": free_port(host),
        "--dashboard-agent-listen-port": free_port(host),
        "--dashboard-agent-grpc-port": free_port(host),
        "--runtime-env-agent-port": free_port(host),
    }
    return [item for name, port in ports.items() for item in (name, str(port))]


@dataclass
class Node:
    host: str
    proc: subprocess.Popen[bytes]
    log: Path
    marker: str
    _log: IO[bytes] = field(repr=False)

    def wait_for_line(self, needle: str, timeout_s: float) -> str:
        """The first line of the node's output containing ``needle``; RuntimeError naming the log
        (the node's processes killed) if the command exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"node {self.host} exited ({self.proc.returncode}); see {self.log}")
            time.sleep(0.5)
        raise TimeoutError(f"node {self.host}: no {needle!r} within {timeout_s:.0f}s; see {self.log}")

    def processes(self) -> set[int]:
        """This node's live processes: its command's tree, and any that were orphaned (by marker;
        a process that rewrote its title, as Ray workers do, may no longer show its environment)."""
        tree = descendants(self.proc.pid) | {self.proc.pid} if self.proc.poll() is None else set()
        return {pid for pid in tree | marked(self.marker) if alive(pid)}

    def kill(self) -> None:
        """SIGKILL every process of this node at once, like a machine losing power."""
        deadline = time.monotonic() + 30
        tree = self.processes()
        while tree and time.monotonic() < deadline:
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            time.sleep(0.2)
            tree = {pid for pid in tree if alive(pid)} | self.processes()
        self._log.close()

    def stop(self) -> None:
        """Stop the node the way Ctrl-C would (SIGTERM to the command), then kill what is left."""
        if self.proc.poll() is None:
            tree = descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
            for pid in tree:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.kill()


class LoopbackCluster:
    """A head and workers started with the promptfleet CLI; see the module docstring."""

    def __init__(self, config: dict[str, Any], tmp: Path, listen_port: int) -> None:
        """``listen_port``: the Gateway's port in ``config`` (args.gateway.listen_port)."""
        self.tmp = tmp
        self.config_file = tmp / "serve.json"
        self.config_file.write_text(json.dumps(config))
        self.token_path = tmp / "auth_token"
        self.env = shell_env(self.token_path)
        self.gcs_port = free_port(HEAD_HOST)
        self.dashboard = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self.listen_port = listen_port  # on every node's address
        self.head: Node | None = None
        self.workers: dict[str, Node] = {}
        self.join_command = ""
        self.spawned = 0
        # Short: Ray's unix socket paths live below it (108 bytes at most).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="pfc-"))

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_HOST}:{self.gcs_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Node:
        self.spawned += 1
        log = self.tmp / f"{name}-{self.spawned}.log"  # a node joining again writes a new log
        handle = log.open("ab")
        marker = f"{self.tmp}/{name}/{time.monotonic_ns()}"
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**env, MARKER: marker}, cwd=REPO)
        return Node(host=argv[argv.index("--host") + 1], proc=proc, log=log, marker=marker, _log=handle)

    def start_head(self, timeout_s: float = 600) -> None:
        """`promptfleet start --head`, as docs/operations/several-machines.md shows; returns once it
        printed the join command."""

        def attempt() -> Node:
            self.gcs_port = free_port(HEAD_HOST)
            argv = [PROMPTFLEET, "start", "--head", "--block", "--host", HEAD_HOST, "--num-cpus", "0",
                    "--port", str(self.gcs_port), "--config", str(self.config_file), "--dashboard", self.dashboard,
                    "--timeout", str(timeout_s),
                    "--", "--ray-client-server-port", str(free_port(HEAD_HOST)), *node_ports(HEAD_HOST),
                    "--temp-dir", str(self.ray_tmp / "head")]
            node = self._spawn("head", argv, self.env)
            self.join_command = node.wait_for_line("promptfleet join", timeout_s).strip()
            return node

        self.head = self._retrying(attempt)

    def join(self, host: str, num_cpus: int = 2, timeout_s: float = 300) -> Node:
        """The join command the head printed, run "on another machine" (another loopback address)."""
        assignment, _, join = self.join_command.partition(" ")
        name, _, token = assignment.partition("=")
        assert name == "RAY_AUTH_TOKEN" and join.startswith(".venv/bin/promptfleet join "), self.join_command
        head_address = join.rsplit(" ", 1)[1]

        def attempt() -> Node:
            argv = [PROMPTFLEET, "join", head_address, "--block", "--host", host, "--num-cpus", str(num_cpus),
                    "--", *node_ports(host), "--temp-dir", str(self.ray_tmp / host)]
            node = self._spawn(f"worker-{host}", argv, {**self.env, "RAY_AUTH_TOKEN": token})
            node.wait_for_line(f"Joined {head_address}", timeout_s)
            return node

        self.workers[host] = self._retrying(attempt)
        return self.workers[host]

    @staticmethod
    def _retrying(attempt: Callable[[], Node]) -> Node:
        """Ray gives a new raylet a fixed 30 s to register with the GCS (ray/_private/node.py); on two
        cores loaded by other clusters that is sometimes too little. Such a start is tried once more
        (its processes killed first), like tests.fixtures.start_cluster does; any other failure raises."""
        try:
            return attempt()
        except RuntimeError as exc:
            log = Path(str(exc).rsplit("see ", 1)[-1])
            if not log.exists() or "timed out during startup" not in log.read_text(errors="replace"):
                raise
        return attempt()

    def bring_up(self, replicas: dict[str, int], timeout_s: float = 600) -> None:
        """Head and both worker nodes, then wait for a Gateway on every node and ``replicas``
        (deployment name → RUNNING replicas) in place."""
        self.start_head(timeout_s)
        for host in WORKER_HOSTS:
            self.join(host)
        everywhere = sorted([HEAD_HOST, *WORKER_HOSTS])
        self.wait_until("a Gateway on every node", lambda: self.replica_hosts("Gateway") == everywhere, timeout_s)
        self.wait_until(f"replicas {replicas}", lambda: all(
            len(self.running_replicas(name)) == count for name, count in replicas.items()), timeout_s)

    # -- what the cluster says about itself (dashboard REST, with the token) -----------------

    def _get(self, path: str) -> Any:
        response = httpx.get(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        response.raise_for_status()
        return response.json()

    def serve_details(self) -> dict[str, Any]:
        return dict(self._get("/api/serve/applications/"))

    def running_replicas(self, deployment: str, app: str = "promptfleet") -> list[dict[str, Any]]:
        deployments = self.serve_details()["applications"][app]["deployments"]
        return [r for r in deployments[deployment]["replicas"] if r["state"] == "RUNNING"]

    def replica_hosts(self, deployment: str) -> list[str]:
        return sorted(r["node_ip"] for r in self.running_replicas(deployment))

    def wait_until(self, what: str, check: Any, timeout_s: float, interval_s: float = 1.0) -> float:
        """Poll ``check()`` until it is true; return the seconds it took."""
        started = time.monotonic()
        last: Any = None
        while time.monotonic() - started < timeout_s:
            try:
                last = check()
            except Exception as exc:  # e.g. a node or replica not there yet: try again, report the last
                last = exc
            else:
                if last:
                    return time.monotonic() - started
            time.sleep(interval_s)
        raise TimeoutError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})")

    def alive_nodes(self) -> list[str]:
        nodes = self._get("/api/v0/nodes?limit=1000")["data"]["result"]["result"]
        return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE")

    def api(self, host: str) -> str:
        return f"http://{host}:{self.listen_port}"

    def stop(self) -> None:
        for node in list(self.workers.values()):
            node.kill()
        self.workers.clear()
        if self.head is not None:
            self.head.kill()
            self.head = None
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def submit_batch_job(cluster: LoopbackCluster, tmp: Path, lines: int, *, model: str, concurrency: int,
                     label: str) -> tuple[str, Path]:
    """`ray job submit --working-dir . -- python -m jobs.batch …`, as docs/usage/batches.md shows, from a shell
    without the virtualenv on PATH: ``lines`` chat lines on ``model``; the submission id and the output path.
    ``--ray-address`` names this cluster: several clusters share this machine, and a job's default
    RAY_ADDRESS is the machine's most recently started one."""
    requests = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}]}}
                for i in range(lines)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    submission_id = f"pf-{label}-{int(time.time())}"
    env = {**cluster.env, "RAY_AUTH_MODE": "token"}
    result = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id, "--no-wait",
         "--working-dir", ".", "--", "python", "-m", "jobs.batch", "--input", str(tmp / "in.jsonl"),
         "--output", str(tmp / "out.jsonl"), "--concurrency", str(concurrency),
         "--ray-address", cluster.gcs_address],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ray job submit failed: {result.stdout}{result.stderr}")
    return submission_id, tmp / "out.jsonl"
