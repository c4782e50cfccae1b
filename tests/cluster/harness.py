"""A real multi-node promptfleet cluster on one machine, each node on its own loopback address.

Nodes are started the way a person starts them — ``promptfleet start --head`` and ``promptfleet
join`` (with ``--block``, so each node's processes are the descendants of one command) — from a
shell whose PATH does not hold the virtualenv, with a token file of the test's own and a free port
for everything Ray, Serve and the Gateway open. Ray replaces ``--node-ip-address 127.0.0.1`` with
the machine's interface address, so the head is 127.0.0.5 and the workers 127.0.0.2, 127.0.0.3.

Stopping a node SIGKILLs exactly its processes (never ``ray stop``, which would end every Ray
process on the machine, other people's clusters included): each node's command runs with a marker
variable of its own in its environment, which every process Ray starts for the node inherits, so
the node's processes are found in /proc even when one was orphaned (its parent died first).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tests.cluster_process import alive, descendants

REPO = Path(__file__).resolve().parents[2]
PROMPTFLEET = str(Path(sys.executable).with_name("promptfleet"))
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_HOST = "127.0.0.5"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shell_env(token_path: Path) -> dict[str, str]:
    """A login shell's environment without the virtualenv: its bin is not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    return {**env, "PATH": os.pathsep.join(path), "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PYTHONUNBUFFERED": "1"}


MARKER = "PROMPTFLEET_TEST_NODE"


def marked(marker: str) -> set[int]:
    """Processes whose environment holds ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode() + b"\0"
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes():
                found.add(int(environ.parent.name))
    return found


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
        """The first line of the node's output containing ``needle``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.host} exited ({self.proc.returncode}); see {self.log}")
            time.sleep(0.5)
        raise TimeoutError(f"node {self.host}: no {needle!r} within {timeout_s:.0f}s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL every process of this node at once, like a machine losing power."""
        deadline = time.monotonic() + 30
        tree = descendants(self.proc.pid) | {self.proc.pid} | marked(self.marker)
        while tree and time.monotonic() < deadline:
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            time.sleep(0.2)
            tree = {pid for pid in tree | marked(self.marker) if alive(pid)}
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

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.tmp = tmp
        self.config_file = tmp / "serve.json"
        self.config_file.write_text(json.dumps(config))
        self.token_path = tmp / "auth_token"
        self.env = shell_env(self.token_path)
        self.gcs_port = free_port(HEAD_HOST)
        self.dashboard = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self.listen_port = 0  # the Gateway's port (args.gateway.listen_port), on every node's address
        self.head: Node | None = None
        self.workers: dict[str, Node] = {}
        self.join_command = ""

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_HOST}:{self.gcs_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Node:
        log = self.tmp / f"{name}.log"
        handle = log.open("ab")
        marker = f"{self.tmp}/{name}/{time.monotonic_ns()}"
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**env, MARKER: marker}, cwd=REPO)
        return Node(host=argv[argv.index("--host") + 1], proc=proc, log=log, marker=marker, _log=handle)

    def start_head(self, timeout_s: float = 600) -> None:
        """`promptfleet start --head`, as the README shows; returns once the app is RUNNING."""
        argv = [PROMPTFLEET, "start", "--head", "--block", "--host", HEAD_HOST, "--num-cpus", "0",
                "--port", str(self.gcs_port), "--config", str(self.config_file), "--dashboard", self.dashboard,
                "--timeout", str(timeout_s),
                "--", "--ray-client-server-port", str(free_port(HEAD_HOST)), *node_ports(HEAD_HOST)]
        self.head = self._spawn("head", argv, self.env)
        self.join_command = self.head.wait_for_line("promptfleet join", timeout_s).strip()

    def join(self, host: str, num_cpus: int = 2, timeout_s: float = 300) -> Node:
        """The join command the head printed, run "on another machine" (another loopback address)."""
        assignment, _, join = self.join_command.partition(" ")
        name, _, token = assignment.partition("=")
        assert name == "RAY_AUTH_TOKEN" and join.startswith(".venv/bin/promptfleet join "), self.join_command
        head_address = join.rsplit(" ", 1)[1]
        argv = [PROMPTFLEET, "join", head_address, "--block", "--host", host, "--num-cpus", str(num_cpus),
                "--", *node_ports(host)]
        node = self._spawn(f"worker-{host}", argv, {**self.env, "RAY_AUTH_TOKEN": token})
        node.wait_for_line(f"Joined {head_address}", timeout_s)
        self.workers[host] = node
        return node

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
            with contextlib.suppress(httpx.HTTPError, KeyError):
                last = check()
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
