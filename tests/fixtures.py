"""One real Ray cluster and one real Serve app, shared by the serve, jobs and cluster tiers.

The app is deployed the way users deploy it — ``configs/serve.yaml`` through
the dashboard's REST API (what ``serve deploy`` and ``promptfleet start`` do) —
with three changes for the test machine: a free HTTP port, the local model
pinned to one replica, and extra ``openai``-provider models pointed at a real
fake upstream (an HTTP server in this process).
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from cluster import local
from jobs.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeApp:
    url: str  # the Gateway's own listener: http://127.0.0.1:PORT
    proxy_url: str  # the same app through Serve's HTTP proxy
    dashboard: str
    upstream: FakeUpstream

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url, api_key="unused", **kwargs)


def upstream_models(base_url: str) -> list[dict[str, Any]]:
    """Upstream models for the fault tests: each with its own timeout/retry settings."""
    common = {"provider": "openai", "base_url": base_url, "upstream_model": "fake-model"}
    return [
        {**common, "name": "fake", "timeout_s": 10, "max_retries": 0, "max_concurrency": 256},
        {**common, "name": "fake-retry", "timeout_s": 10, "max_retries": 2},
        {**common, "name": "fake-short", "timeout_s": 2, "max_retries": 0},
    ]


# Tasks on the upstream models, next to the shipped ones (which run on the embedded model).
TEST_TASKS = {
    "label_fake": {
        "name": "label_fake",
        "description": "Label a text (runs on the fake upstream).",
        "model": "fake",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
            "required": ["label"],
        },
        "prompt": "Label this: {{ text }}",
    },
    "label_fallback": {
        "name": "label_fallback",
        "description": "Same, on a model that times out fast, falling back to `fake`.",
        "model": "fake-short",
        "fallback_models": ["fake"],
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]},
        "prompt": "Label this: {{ text }}",
    },
}


def make_tasks_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for shipped in (REPO / "configs" / "tasks").glob("*.yaml"):
        (directory / shipped.name).write_text(shipped.read_text())
    for name, definition in TEST_TASKS.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(definition))
    return directory


def make_config(http_port: int, listen_port: int, upstream_base_url: str, state: Path) -> dict[str, Any]:
    config = copy.deepcopy(local.load_serve_config(REPO / "configs" / "serve.yaml"))
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["args"]["gateway"]["listen_port"] = listen_port
    app["args"]["tasks"].update(
        definitions_dir=str(make_tasks_dir(state / "tasks")),
        state_dir=str(state / "db"),
        lease_s=3,  # short, so the fault tests see lost leases requeued quickly
    )
    app["args"]["models"] += upstream_models(upstream_base_url)
    app["runtime_env"] = {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1"}}
    for deployment in app["deployments"]:
        if deployment["name"] == "worker-smollm2":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
    return config


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def serve_app(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    os.environ.update(local.RAY_START_ENV)
    dashboard_port = free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _node_ip_address="127.0.0.1",
        runtime_env={"working_dir": None},
        log_to_driver=False,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    http_port, listen_port = free_port(), free_port()
    config = make_config(http_port, listen_port, upstream.base_url, tmp_path_factory.mktemp("state"))
    try:
        local.deploy(config, dashboard)
        local.wait_until_running(dashboard, ["promptfleet"], timeout_s=300, echo=False)
        yield ServeApp(
            url=f"http://127.0.0.1:{listen_port}",
            proxy_url=f"http://127.0.0.1:{http_port}",
            dashboard=dashboard,
            upstream=upstream,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def app(serve_app: ServeApp) -> Iterator[ServeApp]:
    """The session's app with the fake upstream reset before and after each test."""
    serve_app.upstream.reset()
    yield serve_app
    serve_app.upstream.reset()


@pytest.fixture(scope="session")
def serve_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
