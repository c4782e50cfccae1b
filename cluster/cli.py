"""The `promptfleet` command: start, status, stop.

    promptfleet start    start Ray (or join $RAY_ADDRESS), deploy configs/serve.yaml, wait, print URLs
    promptfleet status   what Serve is running, and where
    promptfleet keys     create, list and revoke API keys
    promptfleet batch    run a JSONL batch as a Ray job (resumable), print how to follow it
    promptfleet stop     remove the application; with --ray also stop the local Ray we started
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cluster import batch_cli, keys_cli, local


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptfleet",
        description="Run LLM work on a Ray cluster: OpenAI-compatible HTTP API, tasks and batch jobs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="start Ray if needed, deploy the Serve config, wait until ready")
    start.add_argument("--config", type=Path, default=local.DEFAULT_CONFIG, help="Serve config (default: %(default)s)")
    start.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="existing Ray cluster to use (default: $RAY_ADDRESS; none: start a local one)",
    )
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs for a new local Ray (default: all)")
    start.add_argument("--dashboard", default=None, help=f"dashboard URL (default: {local.DEFAULT_DASHBOARD})")
    start.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING (default: %(default)s)")

    status = sub.add_parser("status", help="show the Serve applications and their deployments")
    status.add_argument("--dashboard", default=local.DEFAULT_DASHBOARD, help="dashboard URL (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="print Serve's details as JSON")

    keys_cli.add_parser(sub)
    batch_cli.add_parser(sub)

    stop = sub.add_parser("stop", help="shut down the Serve application(s)")
    stop.add_argument("--dashboard", default=local.DEFAULT_DASHBOARD, help="dashboard URL (default: %(default)s)")
    stop.add_argument("--ray", action="store_true", help="also stop Ray on this machine (`ray stop`)")
    return parser


def cmd_start(args: argparse.Namespace) -> int:
    config = local.load_serve_config(args.config)
    deployable = local.with_secrets(config, os.environ)
    dashboard = args.dashboard or local.DEFAULT_DASHBOARD
    if args.address:
        if not local.ray_is_running(args.address):
            raise local.StartError(f"no Ray cluster answers at {args.address}")
        print(f"Using the Ray cluster at {args.address}", file=sys.stderr)
    elif local.ray_is_running(None):
        print("Using the Ray cluster already running on this machine", file=sys.stderr)
    else:
        print("Starting a local Ray cluster…", file=sys.stderr)
        local.start_ray(args.num_cpus, dashboard_port=int(dashboard.rsplit(":", 1)[1]))
    print(f"Deploying {args.config}…", file=sys.stderr)
    local.deploy(deployable, dashboard)
    names = [app["name"] for app in config["applications"]]
    local.wait_until_running(dashboard, names, args.timeout)
    urls = local.endpoints(config, dashboard)
    print(
        f"\npromptfleet is running.\n"
        f"  API (OpenAI-compatible): {urls.api}\n"
        f"  Ray dashboard:           {urls.dashboard}\n\n"
        f"  curl {urls.api}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"smollm2\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
        f"Stop with `promptfleet stop --ray`."
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        # Never print a secret: env_vars values (admin key, database URL, upstream keys) are masked.
        details = local.redacted(ServeSubmissionClient(args.dashboard).get_serve_details())
    except Exception:
        print(f"No Ray dashboard answers at {args.dashboard}; is promptfleet started?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(details, indent=2, default=str))
        return 0
    apps = details.get("applications", {})
    if not apps:
        print("Ray is running; no Serve application is deployed.")
        return 0
    http = details.get("http_options") or {}
    print(f"Serve proxy: http://{http.get('host')}:{http.get('port')}   dashboard: {args.dashboard}")
    for name, app in apps.items():
        gateway = ((app.get("deployed_app_config") or {}).get("args") or {}).get("gateway") or {}
        api = f"http://{gateway.get('listen_host', '127.0.0.1')}:{gateway.get('listen_port', 8000)}/v1"
        print(f"{name}: {app.get('status')}   API: {api}")
        for dep_name, dep in (app.get("deployments") or {}).items():
            replicas = dep.get("replicas") or []
            running = sum(1 for r in replicas if r.get("state") == "RUNNING")
            print(f"  {dep_name}: {dep.get('status')}, {running}/{len(replicas)} replicas running")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        ServeSubmissionClient(args.dashboard).delete_applications()
        print("Serve applications removed.")
    except Exception:
        print(f"No Ray dashboard answers at {args.dashboard}.", file=sys.stderr)
    if args.ray:
        subprocess.run([local._ray(), "stop"], check=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local.use_cluster_token()
    handlers = {
        "start": cmd_start, "status": cmd_status, "stop": cmd_stop, "keys": keys_cli.run, "batch": batch_cli.run,
    }
    try:
        return handlers[args.command](args)
    except local.StartError as exc:
        print(f"promptfleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
