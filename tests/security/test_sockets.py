"""Issue 10, item 7: every port the cluster opens is loopback, or Ray's own and behind its token.

Lists every listening TCP socket of the session cluster's processes (this test process's
descendants: GCS, raylet, dashboard and its agents, Serve's proxy and replicas, workers) from
/proc, and checks each against what is allowed. promptfleet's own ports (the Gateways'
listeners, Serve's HTTP proxy, the dashboard) must be on loopback.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.cluster_process import descendants
from tests.fixtures import ServeApp

pytestmark = pytest.mark.serve


def _inodes(pid: int) -> set[str]:
    found = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    if len(host) == 8:
        ip = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
    else:  # IPv6: four little-endian 32-bit words
        words = [bytes.fromhex(host[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
        ip = ":".join("".join(words)[i:i + 4] for i in range(0, 32, 4))
    return ip, int(port, 16)


def listening(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command) of every listening TCP socket of ``pids``."""
    owner = {inode: pid for pid in pids for inode in _inodes(pid)}
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            ip, port = _address(fields[1])
            pid = owner[fields[9]]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                command = "?"
            sockets.append((ip, port, pid, command))
    return sockets


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "0000:0000:0000:0000:0000:0000:0000:0001"


# Ray's own processes, which open ports this project cannot move (Ray 2.60 binds every core
# worker's and the GCS's and raylet's gRPC server to all interfaces, the dashboard agent, the
# dashboard head's and the autoscaler monitor's metrics ports to 0.0.0.0 and the runtime-env agent
# to the machine's address, whatever --node-ip-address says).
# Behind the cluster token when Ray runs with RAY_AUTH_MODE=token (`promptfleet start`); see
# docs/reference/configuration.md "Ports". Anything else listening off loopback fails the test.
RAY_PROCESSES = (
    "ray/core/src/ray/gcs/gcs_server",
    "ray/core/src/ray/raylet/raylet",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::ServeReplica:",
    "ray-dashboard-",
    "ray/dashboard/dashboard.py",
    "ray/autoscaler/_private/monitor.py",
)


def test_promptfleet_ports_are_loopback_and_the_rest_is_rays(serve_app: ServeApp) -> None:
    own_ports = {
        urlsplit(serve_app.url).port,  # the Gateways' own listener, main app
        urlsplit(serve_app.auth_base_url).port,  # and the auth app's
        urlsplit(serve_app.proxy_url).port,  # Serve's HTTP proxy
        urlsplit(serve_app.dashboard).port,  # the dashboard (Serve config, Jobs API)
    }
    sockets = listening(descendants(os.getpid()))
    ports = {port: ip for ip, port, _, _ in sockets}
    assert own_ports <= set(ports), f"not every promptfleet port was found listening: {own_ports - set(ports)}"
    for port in own_ports:
        assert is_loopback(ports[port]), f"promptfleet port {port} listens on {ports[port]}"
    foreign = [s for s in sockets if not is_loopback(s[0]) and not any(p in s[3] for p in RAY_PROCESSES)]
    report = "\n".join(f"  {ip}:{port}  pid {pid}  {command.strip()}" for ip, port, pid, command in foreign)
    assert not foreign, f"listening off loopback, and not one of Ray's own processes:\n{report}"
    # Some of Ray's do listen off loopback (what docs/reference/configuration.md "Ports" documents);
    # the check above must see them.
    assert any(not is_loopback(ip) for ip, _, _, _ in sockets)
    # ... and they take only callers with the cluster token.
    mode = httpx.get(f"{serve_app.dashboard}/api/authentication_mode", timeout=30).json()
    assert mode == {"authentication_mode": "token"}
