"""A private Ray cluster serving a promptfleet checkout, held by a child process of the bench.

    cd CHECKOUT && PYTHONPATH=CHECKOUT python /path/to/bench/peers/serve_child.py SPEC_JSON

Run as a script (not imported from the bench) so that it works for any checkout, this one or a
previous release: it uses only Ray and the checkout's own ``cluster.local`` (``RAY_START_ENV``,
``load_serve_config``, ``deploy``, ``wait_until_running``, the same calls ``promptfleet start``
makes), with the checkout's ``configs/serve.yaml``. Like ``bench.kit.private_cluster`` it sets
fresh ports, a throwaway state directory and the given models, and, unless ``local_models`` is
true, drops the embedded model's workers.

SPEC_JSON: ``{"state": DIR, "models": [...] | null, "app_args": {...}, "env_vars": {...},
"local_models": bool}``. When every application is RUNNING it
prints one JSON line ``{"apps": {name: api_url}, "dashboard": url}`` and then holds the cluster
until its standard input closes. The cluster's processes (GCS, raylet, replicas …) are this
process's descendants, so the bench can account their CPU from /proc.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(spec: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from cluster import local  # the checkout's

    for name, value in local.RAY_START_ENV.items():
        os.environ.setdefault(name, value)
    state = Path(spec["state"])
    tasks_dir = state / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    dashboard_port, http_port = free_port(), free_port()
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        config = local.load_serve_config(Path("configs/serve.yaml"))
        config["http_options"]["port"] = http_port
        app = config["applications"][0]
        args = app["args"]
        if spec.get("models") is not None:
            args["models"] = spec["models"]
        args["gateway"]["listen_port"] = free_port()
        args["tasks"].update(definitions_dir=str(tasks_dir), state_dir=str(state / "db"))
        args.update(spec.get("app_args") or {})
        if spec.get("env_vars"):
            app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(spec["env_vars"])
        if not spec.get("local_models"):
            app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("worker-")]
        apis = {app["name"]: f"http://127.0.0.1:{args['gateway']['listen_port']}/v1"}
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        local.deploy(config, dashboard)
        local.wait_until_running(dashboard, list(apis), timeout_s=300, echo=False)
        print(json.dumps({"apps": apis, "dashboard": dashboard}), flush=True)
        sys.stdin.read()  # hold the cluster until the bench closes our stdin
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    # The checkout first, before any installed promptfleet, and not this script's directory.
    sys.path[0] = os.getcwd()
    raise SystemExit(main(json.loads(sys.argv[1])))
