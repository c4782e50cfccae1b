"""One real Ray cluster and one real Serve app, shared by the serve, jobs and cluster tiers.

The app is deployed the way users deploy it — ``configs/serve.yaml`` through
the dashboard's REST API (what ``serve deploy`` and ``promptfleet start`` do) —
with three changes for the test machine: a free HTTP port, the local model
pinned to one replica, and extra ``openai``-provider models pointed at a real
fake upstream (an HTTP server in this process).

``start_cluster(config)`` is also what ``tests.cluster_process`` runs in a child
process, for tests that stop and start a whole cluster of their own.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster import local
from tests.cluster_process import alive, descendants
from tests.fakes.upstream import FakeUpstream
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeApp:
    url: str  # the Gateway's own listener: http://127.0.0.1:PORT
    proxy_url: str  # the same app through Serve's HTTP proxy
    dashboard: str  # changes when the cluster is restarted (restart_cluster)
    upstream: FakeUpstream
    config: dict[str, Any] = field(default_factory=dict)  # the Serve config deployed
    state_dir: Path | None = None  # tasks.state_dir: the TaskStore's SQLite file lives here

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    @property
    def auth_base_url(self) -> str:
        """The second application, with API keys required (see ``auth_app``)."""
        port = self.config["applications"][1]["args"]["gateway"]["listen_port"]
        return f"http://127.0.0.1:{port}/v1"


def upstream_models(base_url: str) -> list[dict[str, Any]]:
    """Upstream models for the fault tests: each with its own timeout/retry settings."""
    # A high breaker threshold keeps one test's injected failures from opening the circuit for the next.
    common = {"provider": "openai", "base_url": base_url, "upstream_model": "fake-model", "breaker_threshold": 1000}
    return [
        # Every route (the fake upstream speaks them all); the others keep the default text routes.
        {**common, "name": "fake", "timeout_s": 10, "max_retries": 0, "max_concurrency": 256,
         "capabilities": ["chat", "completions", "responses", "embeddings"]},
        {**common, "name": "fake-retry", "timeout_s": 10, "max_retries": 2},
        {**common, "name": "fake-short", "timeout_s": 2, "max_retries": 0},
        # Shared limits (issue 4): 4 replicas share one budget of 300 requests per minute.
        {**common, "name": "fake-limited", "timeout_s": 30, "max_retries": 3, "rpm": LIMITED_RPM},
        {**common, "name": "fake-breaker", "timeout_s": 5, "max_retries": 0, "breaker_threshold": 3,
         "breaker_cooldown_s": 2},
        # Capped Retry-After (issue 10): an upstream asking for hours (or `inf`) pauses it for 2 s.
        {**common, "name": "fake-capped", "timeout_s": 10, "max_retries": 0, "max_retry_after_s": 2},
        # An upstream that speaks the Responses API itself: /v1/responses is forwarded, falling back to
        # `fake` (translated through chat) when it fails.
        {**common, "name": "fake-responses", "timeout_s": 10, "max_retries": 0, "capabilities": ["chat", "responses"],
         "upstream_api": "responses", "fallback_models": ["fake"]},
        # An upstream that refuses connections, falling back to `fake`.
        {**common, "name": "fake-dead", "base_url": "http://127.0.0.1:9/v1", "timeout_s": 5, "max_retries": 0,
         "fallback_models": ["fake"]},
    ]


LIMITED_RPM = 300
METRICS_MODEL = "fake-metrics"
# How often the test cluster's processes hand their metrics to Ray's metrics agent (Ray's default is
# 10 s; its floor 1 s): tests/serve/test_metrics.py reads them through Prometheus, so sooner than
# the default; not every second or two, which is export work in each of the cluster's ~40 processes
# (at 2 s the rate-limit tests' windows got bunched calls more often on two busy cores).
METRICS_REPORT_INTERVAL_MS = 5000


def metrics_model(base_url: str) -> dict[str, Any]:
    """A model only tests/serve/test_metrics.py calls (not even ``settle``), so its metrics move by
    exactly what that test sends."""
    return {"provider": "openai", "base_url": base_url, "upstream_model": "fake-model", "breaker_threshold": 1000,
            "name": METRICS_MODEL, "timeout_s": 10, "max_retries": 0}


def shared_model(base_url: str) -> dict[str, Any]:
    """A model of the auth app whose 300 rpm keys share (fair admission, tests/serve/test_admission.py);
    its deadline leaves room for a 64-deep queue at 5 calls/s."""
    return {"provider": "openai", "base_url": base_url, "upstream_model": "fake-model", "breaker_threshold": 1000,
            "name": "fake-shared", "timeout_s": 40, "max_retries": 0, "rpm": LIMITED_RPM}


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
            "additionalProperties": False,  # OpenAI strict mode (every task is checked against its models)
        },
        "prompt": "Label this: {{ text }}",
    },
    "label_fallback": {
        "name": "label_fallback",
        "description": "Same, on a model that times out fast, falling back to `fake`.",
        "model": "fake-short",
        "fallback_models": ["fake"],
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                          "additionalProperties": False},
        "prompt": "Label this: {{ text }}",
    },
    "label_metrics": {
        "name": "label_metrics",
        "description": "Label a text on the model only the metrics test calls.",
        "model": METRICS_MODEL,
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                          "additionalProperties": False},
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


MAX_UPLOAD_BYTES = 16 * 1024**2  # tasks.quotas.max_file_bytes of the main test app


def make_config(http_port: int, listen_port: int, upstream_base_url: str, state: Path) -> dict[str, Any]:
    config = copy.deepcopy(local.load_serve_config(REPO / "configs" / "serve.yaml"))
    config["http_options"]["port"] = http_port
    config["proxy_location"] = "HeadOnly"  # off by default; the tests keep its route working (proxy_url)
    app = config["applications"][0]
    app["args"]["gateway"]["listen_port"] = listen_port
    app["args"]["tasks"].update(
        definitions_dir=str(make_tasks_dir(state / "tasks")),
        state_dir=str(state / "db"),
        lease_s=3,  # short, so the fault tests see lost leases requeued quickly
        # Small enough that tests/serve/test_files.py can pass it (the default is 200 MiB).
        quotas={**app["args"]["tasks"].get("quotas", {}), "max_file_bytes": MAX_UPLOAD_BYTES},
    )
    app["args"]["models"] += [*upstream_models(upstream_base_url), metrics_model(upstream_base_url)]
    app["runtime_env"] = {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1"}}
    app["args"]["logs"] = {"access_log": True}  # tests/serve/test_request_ids.py reads the lines
    for deployment in app["deployments"]:
        if deployment["name"] == "worker-smollm2":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
    app["deployments"].append({"name": "worker-fake-limited", "num_replicas": 4})
    config["applications"].append(auth_app(app, upstream_base_url, state))
    return config


ADMIN_KEY = "pf-test-admin-key"


def auth_app(main: dict[str, Any], upstream_base_url: str, state: Path) -> dict[str, Any]:
    """A second, small application with API keys on: only the `fake` model, its own store."""
    tasks_dir = state / "auth-tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "label_fake.yaml").write_text(yaml.safe_dump(TEST_TASKS["label_fake"]))
    return {
        "name": "promptfleet-auth",
        "route_prefix": "/auth",
        "import_path": main["import_path"],
        "runtime_env": {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1", "PROMPTFLEET_ADMIN_KEY": ADMIN_KEY}},
        "args": {
            "gateway": {"listen_host": "127.0.0.1", "listen_port": free_port()},
            "auth": {"enabled": True, "cache_ttl_s": 1},
            "logs": {"access_log": True},  # a request's lines hold no prompt or key: checked on them
            "tasks": {
                "definitions_dir": str(tasks_dir), "state_dir": str(state / "auth-db"), "lease_s": 3,
                # Small, so tests/security can reach every quota and fill the runners (queued runs).
                "runner_concurrency": 4,
                "quotas": {"max_files_per_key": 4, "max_file_bytes_per_key": 1_000_000, "max_batches_per_key": 1,
                           "max_batches": 2, "max_batch_lines": 400},
            },
            "models": [
                *(m for m in upstream_models(upstream_base_url) if m["name"] in ("fake", "fake-capped")),
                shared_model(upstream_base_url),
            ],
        },
        "deployments": [
            d for d in main["deployments"] if d["name"] in ("Gateway", "TaskStore", "TaskRunner", "BatchService")
        ],
    }


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@contextlib.contextmanager
def free_agent_port() -> Iterator[None]:
    """Give the dashboard agent of the cluster ``ray.init`` starts a free port.

    ray.init has no option for it, and its fixed default (52365, bound on the machine's address)
    collides with any other Ray cluster on a shared machine: the agent then fails to start and
    every job submission (each batch is a Ray job) fails with "Agent info not found".
    """
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", free_port())
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original  # type: ignore[method-assign]


def start_cluster(config: dict[str, Any]) -> str:
    """Start a local Ray cluster in this process, deploy ``config``, wait; return the dashboard URL."""
    import ray

    os.environ.update(local.RAY_START_ENV)
    if "RAY_AUTH_MODE" not in os.environ:
        # Token auth, as `promptfleet start` runs Ray (cluster/local.py). Ray turns it on for a new
        # local cluster when a token exists, so make sure one does (setting RAY_AUTH_MODE here would
        # come too late: this process read Ray's config when it imported ray).
        subprocess.run(
            [local.ray_executable(), "get-auth-token", "--generate"], capture_output=True, check=True, timeout=120
        )
    dashboard_port = free_port()
    for attempt in range(2):
        before = descendants(os.getpid())
        try:
            with free_agent_port():
                ray.init(
                    # Always a new cluster of our own: without this, ray.init() joins a cluster that
                    # `ray start` left in /tmp/ray/ray_current_cluster (another user's, on a shared machine).
                    address="local",
                    num_cpus=4,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dashboard_port,
                    _node_ip_address="127.0.0.1",
                    runtime_env={"working_dir": None},
                    log_to_driver=False,
                    _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
                )
            break
        except Exception as exc:
            # Ray gives a new raylet a fixed 30 s to register with the GCS (ray/_private/node.py);
            # on two busy cores, with another cluster starting next door, that is sometimes too
            # little. The failed attempt's processes are left running by Ray: end them (they are
            # this process's children, ended by pid), then try once more.
            if attempt or "timed out during startup" not in str(exc):
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()  # reaps the processes Ray knows it started
            _end(descendants(os.getpid()) - before, grace_s=5)
        # Ray's handles of the failed attempt's processes: collected here, where their "still
        # running" ResourceWarning is expected, not in some later test (warnings are errors).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    local.deploy(config, dashboard)
    names = [application["name"] for application in config["applications"]]
    local.wait_until_running(dashboard, names, timeout_s=300, echo=False)
    return dashboard


def _end(pids: set[int], grace_s: float) -> None:
    """SIGTERM ``pids`` (processes of our own failed cluster start), SIGKILL what is left after ``grace_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def serve_app(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    http_port, listen_port = free_port(), free_port()
    state = tmp_path_factory.mktemp("state")
    config = make_config(http_port, listen_port, upstream.base_url, state)
    try:
        dashboard = start_cluster(config)
        yield ServeApp(
            url=f"http://127.0.0.1:{listen_port}",
            proxy_url=f"http://127.0.0.1:{http_port}",
            dashboard=dashboard,
            upstream=upstream,
            config=config,
            state_dir=state / "db",
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def beside(serve_app: ServeApp, application: dict[str, Any], ready: str) -> Iterator[None]:
    """Deploy ``application`` beside the session's two (for one test module), wait until its URL
    ``ready`` answers 200, and put the session's applications back afterwards."""
    config = copy.deepcopy(serve_app.config)
    config["applications"].append(application)
    local.deploy(config, serve_app.dashboard)
    try:
        local.wait_until_running(serve_app.dashboard, [application["name"]], timeout_s=300, echo=False)
        wait_for(lambda: httpx.get(ready, timeout=30).status_code == 200, 60, interval_s=0.2,
                 message=f"{application['name']} to answer")
        yield
    finally:
        local.deploy(serve_app.config, serve_app.dashboard)


@pytest.fixture
def app(serve_app: ServeApp) -> Iterator[ServeApp]:
    """The session's app, left by each test as the next one expects it (see ``settle``)."""
    serve_app.upstream.reset()
    yield serve_app
    settle(serve_app)


UNFINISHED = ("queued", "running")


def settle(app: ServeApp, timeout_s: float = 60) -> None:
    """Undo what a test can leave behind for the next one, waiting on conditions:

    - unfinished runs (they would call the upstream during the next test): cancelled, and their
      upstream calls ended (a cancelled run's runner notices at its next lease renewal);
    - the fake upstream's faults and counters: reset;
    - open circuit breakers and model-wide 429 pauses: every upstream model of both apps answers
      a request again (a probe closes a breaker after its cooldown; a pause is waited out).
    """
    with httpx.Client(base_url=app.base_url, timeout=30) as client:
        for status in UNFINISHED:
            for run in list_runs(client, status):
                client.post(f"/runs/{run}/cancel")
        wait_for(lambda: app.upstream.stats()["in_flight"] == 0, timeout_s, message="upstream calls to end")
        app.upstream.reset()
        for model in (m["name"] for m in upstream_models(app.upstream.base_url)):
            wait_for(lambda: answers(client, model), timeout_s, interval_s=0.2, message=f"model {model} to answer")  # noqa: B023
    with httpx.Client(
        base_url=app.auth_base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as admin:
        wait_for(lambda: answers(admin, "fake"), timeout_s, interval_s=0.2, message="the auth app's model")
    app.upstream.reset()


def list_runs(client: httpx.Client, status: str) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": status, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get("/runs", params=params).json()
        ids += [run["id"] for run in page["data"]]
        if not (cursor := page["next_cursor"]):
            return ids


def answers(client: httpx.Client, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "settle"}], "max_tokens": 4}
    return client.post("/chat/completions", json=body).status_code == 200


def logged(prefix: str, text: str) -> list[Path]:
    """The replica log files of this process's Ray session (``logs/serve/replica_<prefix>…``) that
    contain ``text``."""
    import ray

    serve_logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [p for p in serve_logs.glob(f"replica_{prefix}*.log") if text in p.read_text(errors="replace")]


@pytest.fixture(scope="session")
def serve_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
