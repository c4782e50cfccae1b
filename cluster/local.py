"""Bringing promptfleet up on a Ray cluster: start Ray if needed, deploy the Serve config, wait.

Deployment goes through the same REST API as ``serve deploy`` (the dashboard's
``/api/serve/applications/``), so what ``promptfleet start`` deploys is exactly
what ``serve deploy configs/serve.yaml`` would, plus two things the file must
not hold: secrets (the admin key, the database URL, upstream API keys, copied
from this shell into the ``runtime_env`` of the deployments that read each)
and ``PROMPTFLEET_*`` settings (into the application's ``runtime_env``).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments import names
from deployments.config import DATABASE_URL_ENV, AppArgs

DEFAULT_CONFIG = Path("configs/serve.yaml")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ENV_PREFIX = "PROMPTFLEET_"

# Read by Ray Serve when the cluster starts, so they must be in the environment of `ray start`
# (ray/serve/_private/constants.py). Throughput-optimized mode: gRPC between replicas, no
# separate user-code thread, GC frozen after start-up.
RAY_START_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Direct ingress makes each ingress replica open its own port besides the proxy's :8000;
    # promptfleet keeps the single stable proxy address (see docs/performance.md).
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}

# Serve's own background work, which is most of what an idle cluster spends (docs/performance.md,
# "Idle cluster"). Serve's defaults: the controller's control loop every 0.1 s (each tick also reads
# the node list from the GCS), and every replica and every handle exporting its cached request
# metrics every 0.1 s. A new replica, an autoscaling decision or a dead replica's replacement now
# waits up to 0.5 s longer for its tick; the metrics reach Ray's metrics agent, which reports every
# 10 s anyway, at most 1 s later. Ray's log monitor globs the session's log directory for new files
# on every 0.1 s round while it watches fewer than RAY_LOG_MONITOR_MANY_FILES_THRESHOLD (1000)
# files, else every LOG_NAME_UPDATE_INTERVAL_S (0.5 s) (ray/_private/log_monitor.py): a threshold
# of 0 makes that 0.5 s always. A new worker's log file is then streamed to drivers up to 0.4 s
# later, from its first line as before; files it already follows are still read every 0.1 s, and
# the dashboard's log view reads the files itself. A value set in the shell of
# `promptfleet start`/`join` wins.
RAY_IDLE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}
RAY_START_ENV.update(RAY_IDLE_ENV)


class StartError(RuntimeError):
    """Bring-up failed; the message says why and what to do."""


@dataclass(frozen=True)
class Endpoints:
    api: str
    dashboard: str


def load_serve_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StartError(f"{path}: no such file (run from the promptfleet checkout or pass --config)") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise StartError(f"{path}: not a Serve config (no `applications:`)")
    return config


def secrets_by_deployment(args: AppArgs) -> dict[str, set[str]]:
    """The environment variables holding secrets, by the deployments that read each: the admin key
    (the Gateway), the database URL (the TaskStore and the BatchService, which keep their records in
    that one database), each upstream model's API key (every process that calls the upstream: the
    Gateway for HTTP calls and the TaskRunner for task runs, ``deployments.direct_transport``, and the
    model's worker for batch lines)."""
    secrets: dict[str, set[str]] = {
        names.GATEWAY: {args.auth.admin_key_env},
        names.TASK_STORE: {DATABASE_URL_ENV},
        names.BATCH_SERVICE: {DATABASE_URL_ENV},
    }
    for model in args.models:
        key_env = getattr(model, "api_key_env", None)
        if key_env:
            for caller in (names.GATEWAY, names.TASK_RUNNER, names.worker(model.name)):
                secrets.setdefault(caller, set()).add(key_env)
    return secrets


def with_secrets(config: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Copy of ``config`` carrying, from ``environ``, each secret to the deployments that need it.

    The admin key (``auth.admin_key_env``) goes to the Gateway, ``PROMPTFLEET_DATABASE_URL`` to the
    TaskStore and the BatchService, a model's ``api_key_env`` to the Gateway, the TaskRunner and that
    model's worker (``secrets_by_deployment``) — each in the deployment's own
    ``ray_actor_options.runtime_env`` (Serve merges it with the application's ``env_vars``), so no
    other replica has them. Other ``PROMPTFLEET_*`` settings go to the whole application.
    """
    config = copy.deepcopy(config)
    for app in config["applications"]:
        args = AppArgs.model_validate(app.get("args") or {})
        secrets = secrets_by_deployment(args)
        # Only upstream models have keys, and their workers take no CPU (deployments.app.worker_defaults;
        # not imported here: its Ray imports would fix Ray's auth mode before `start` sets it).
        worker_options = {names.worker(m.name): {"num_cpus": 0} for m in args.models if hasattr(m, "api_key_env")}
        for model in args.models:
            key_env = getattr(model, "api_key_env", None)
            if key_env and key_env not in environ:
                raise StartError(
                    f"model {model.name!r} reads its API key from ${key_env}, which is not set in this shell"
                )
        secret_names = set().union(*secrets.values())
        settings = {name for name in environ if name.startswith(ENV_PREFIX) and name not in secret_names}
        env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {}) or {}
        env_vars.update({name: environ[name] for name in sorted(settings)})
        app["runtime_env"]["env_vars"] = env_vars
        deployments = app.setdefault("deployments", [])
        for deployment_name, wanted in sorted(secrets.items()):
            present = {name: environ[name] for name in sorted(wanted) if name in environ}
            if not present:
                continue
            entry = next((d for d in deployments if d.get("name") == deployment_name), None)
            if entry is None:
                entry = {"name": deployment_name}
                deployments.append(entry)
            if "ray_actor_options" not in entry:
                # Serve takes a config's ray_actor_options whole, in place of the code's: a model's
                # worker keeps the CPUs its code gives it (an upstream model's: none), not Serve's 1.
                entry["ray_actor_options"] = dict(worker_options.get(deployment_name, {}))
            runtime_env = entry["ray_actor_options"].setdefault("runtime_env", {})
            runtime_env.setdefault("env_vars", {}).update(present)
    return config


def redacted(details: Any) -> Any:
    """Serve's details (or config) with every ``runtime_env`` ``env_vars`` value masked, as the
    dashboard masks them for browsers (ray.dashboard.runtime_env_redaction), and the password of a
    ``database_url`` in the args replaced."""
    from ray.dashboard.runtime_env_redaction import redact_runtime_env_deep

    def passwords(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: re.sub(r"(://[^:/@]+:)[^@]*@", r"\1<redacted>@", v) if k == "database_url" and isinstance(v, str)
                else passwords(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [passwords(v) for v in value]
        return value

    return passwords(redact_runtime_env_deep(details))


def use_cluster_token() -> None:
    """Send the cluster's auth token with dashboard requests.

    `ray start` turns token authentication on and writes ~/.ray/auth_token, but a process that
    did not start Ray only sends the token when RAY_AUTH_MODE=token; without it the dashboard
    answers 401 to deploy/status calls.
    """
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (token_file.exists() or "RAY_AUTH_TOKEN" in os.environ):
        os.environ["RAY_AUTH_MODE"] = "token"


def ray_is_running(address: str | None) -> bool:
    cmd = [ray_executable(), "status"] + (["--address", address] if address else [])
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


def deploy(config: dict[str, Any], dashboard: str) -> None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard).deploy_applications(config)


def wait_until_running(dashboard: str, app_names: list[str], timeout_s: float, echo: bool = True) -> None:
    """Poll Serve until every app is RUNNING; fail fast with Serve's own message on DEPLOY_FAILED."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        details = client.get_serve_details()
        apps = details.get("applications", {})
        statuses = {name: apps.get(name, {}).get("status", "NOT_STARTED") for name in app_names}
        summary = ", ".join(f"{n}: {s}" for n, s in statuses.items())
        if echo and summary != last:
            print(f"  {summary}", file=sys.stderr)
        last = summary
        for name, status in statuses.items():
            if status == "DEPLOY_FAILED":
                message = apps[name].get("message", "")
                raise StartError(f"application {name!r} failed to deploy:\n{_last_exception(message)}")
        if all(s == "RUNNING" for s in statuses.values()):
            return
        time.sleep(1.0)
    raise StartError(f"not running after {timeout_s:.0f}s ({last}); see `serve status` and the dashboard")


def _last_exception(message: str) -> str:
    """The last exception of a Serve deploy failure, without Ray's traceback frames around it."""
    lines = message.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return "\n".join(lines[starts[-1]:]) if starts else message


def endpoints(config: dict[str, Any], dashboard: str, node_host: str = "127.0.0.1") -> Endpoints:
    """The API and dashboard URLs; ``node_host`` is this node's address (for ``listen_host: node-ip``)."""
    gateway = AppArgs.model_validate(config["applications"][0].get("args") or {}).gateway
    if gateway.listen_port is not None:
        host, port = gateway.bind_host(node_host), gateway.listen_port
    else:
        http = config.get("http_options") or {}
        host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    return Endpoints(api=f"http://{host}:{port}/v1", dashboard=dashboard)


def ray_executable() -> str:
    # The `ray` next to this interpreter, so a venv's Ray is used even when the venv is not activated.
    return _beside_interpreter("ray")


def promptfleet_executable() -> str:
    """This `promptfleet`, as a command a shell without the venv on its PATH can run (printed hints)."""
    return _beside_interpreter("promptfleet")


def _beside_interpreter(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)
