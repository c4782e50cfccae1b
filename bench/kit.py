"""What every benchmark script needs: free ports, child processes, a fake upstream, a private cluster.

``private_cluster`` starts a Ray cluster in the calling process and deploys ``configs/serve.yaml``
with the benchmark's models only (no embedded model competing for the cores), a throwaway state
directory and fresh ports, the same way ``promptfleet start`` deploys it; it yields the URLs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds_of_descendants() -> float:
    """CPU time (user + system) of every live process below this one (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    ticks = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        stat = stats.get(pid)
        if stat:
            total += (int(stat[11]) + int(stat[12])) / ticks  # utime, stime
        stack.extend(children.get(pid, []))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    """Return once ``url`` answers below 500."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@contextlib.contextmanager
def child_process(module_args: list[str], ready_url: str) -> Iterator[None]:
    """``python -m <module_args>`` from the repository, up once ``ready_url`` answers; stopped after."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        wait_http(ready_url)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def fake_upstream(latency_ms: float = 0, stream_chunks: int = 0) -> Iterator[str]:
    """A ``tests.fakes.upstream`` server in a child process; yields its API base URL (…/v1)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    with child_process(["tests.fakes.upstream", "--port", str(port), "--latency-ms", str(latency_ms),
                        "--stream-chunks", str(stream_chunks)], f"{base}/models"):
        yield base


def fake_model(name: str, upstream_base: str, **settings: Any) -> dict[str, Any]:
    """A model entry for the fake upstream (``settings`` override, e.g. rpm, timeout_s)."""
    return {"name": name, "provider": "openai", "base_url": upstream_base, "upstream_model": "fake-model",
            "max_concurrency": 1000, **settings}


@dataclass
class BenchCluster:
    api: str  # the Gateway's own listener, …/v1
    proxy_api: str | None  # the same app through Serve's HTTP proxy, …/v1 (with ``serve_proxy``)
    dashboard: str
    app_name: str
    db: Path  # the TaskStore's SQLite file
    twins: dict[str, str] = field(default_factory=dict)  # application name → its API, …/v1


@contextlib.contextmanager
def private_cluster(
    models: list[dict[str, Any]], state: Path, *, tasks_dir: Path | None = None,
    app_args: dict[str, Any] | None = None, env_vars: dict[str, str] | None = None,
    twins: dict[str, dict[str, Any]] | None = None, serve_proxy: bool = False, **tasks: Any
) -> Iterator[BenchCluster]:
    """A Ray cluster in this process running configs/serve.yaml with ``models`` only.

    ``state`` holds the run store; ``tasks_dir`` the task definitions (none if omitted);
    ``tasks`` override other ``args.tasks`` settings (e.g. ``lease_s``); ``app_args`` other
    sections of ``args`` (e.g. ``auth``); ``env_vars`` reach the replicas (runtime_env).
    ``twins``: more applications beside it, by name, the same but for these ``args`` sections
    (e.g. ``{"metrics": {"enabled": False}}``), each on a listener of its own: A/B in one cluster.
    ``serve_proxy``: Serve's HTTP proxy on as well (off in configs/serve.yaml), for ``proxy_api``.
    """
    import ray
    from ray import serve

    from cluster import local

    for name, value in local.RAY_START_ENV.items():
        os.environ.setdefault(name, value)  # the shell may override, to compare Serve modes
    if tasks_dir is None:
        tasks_dir = state / "tasks"
        tasks_dir.mkdir(parents=True, exist_ok=True)
    dashboard_port, http_port, listen_port = free_port(), free_port(), free_port()
    # address="local": a new cluster of our own, never one `ray start` left on this machine.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        config = local.load_serve_config(REPO / "configs" / "serve.yaml")
        config["http_options"]["port"] = http_port
        if serve_proxy:
            config["proxy_location"] = "HeadOnly"
        app = config["applications"][0]
        app["args"]["models"] = models
        app["args"]["gateway"]["listen_port"] = listen_port
        app["args"]["tasks"].update(definitions_dir=str(tasks_dir), state_dir=str(state / "db"), **tasks)
        app["args"].update(app_args or {})
        if env_vars:
            app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
        # Only the benchmark's models: no embedded model competing for the cores.
        app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("worker-")]
        twin_apis: dict[str, str] = {}
        for name, overrides in (twins or {}).items():
            twin = copy.deepcopy(app)
            twin.update(name=name, route_prefix=f"/{name}")
            twin["args"]["gateway"]["listen_port"] = port = free_port()
            twin["args"]["tasks"]["state_dir"] = str(state / name / "db")
            twin["args"].update(overrides)
            config["applications"].append(twin)
            twin_apis[name] = f"http://127.0.0.1:{port}/v1"
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        local.deploy(config, dashboard)
        local.wait_until_running(dashboard, [a["name"] for a in config["applications"]], timeout_s=300, echo=False)
        proxy_api = f"http://127.0.0.1:{http_port}/v1" if serve_proxy else None
        yield BenchCluster(f"http://127.0.0.1:{listen_port}/v1", proxy_api, dashboard, str(app["name"]),
                           state / "db" / "tasks.sqlite3", twin_apis)
    finally:
        serve.shutdown()
        ray.shutdown()
