"""The `promptfleet` command: start, status, stop.

    promptfleet start    start Ray (or use $RAY_ADDRESS), deploy configs/serve.yaml, wait, print URLs;
                         with --head, a head node other machines join, and the command they run
    promptfleet join     start a worker node on this machine, joined to a head node
    promptfleet status   what Serve is running, and where
    promptfleet keys     create, list and revoke API keys
    promptfleet tasks    check, render, test, push, history and rollback of tasks (prompt owners)
    promptfleet batch    run a JSONL batch as a Ray job (resumable), print how to follow it
    promptfleet k8s      print a KubeRay RayService generated from configs/serve.yaml
    promptfleet stop     remove the application; with --ray also stop the local Ray we started
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from cluster import batch_cli, grafana, keys_cli, kuberay, local, nodes, ownership, tasks_cli
from deployments.config import NODE_IP, AuthConfig

JOIN_ADVICE = "To add a machine, run this in its promptfleet checkout (after `make .venv/.installed`):"


def say(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` and its newline in one write. Under ``--block`` the ``ray start`` child keeps writing
    to the same output; ``print`` writes the newline separately, and unbuffered (PYTHONUNBUFFERED, a
    log file) a line of Ray's landed between our join command and its newline, corrupting the
    command a person or a script copies."""
    stream = file or sys.stdout
    stream.write(text + "\n")
    stream.flush()


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
    start.add_argument("--head", action="store_true",
                       help="start a new head node other machines can join, and print the join command")
    start.add_argument("--port", type=int, default=nodes.DEFAULT_GCS_PORT,
                       help="the head's GCS port, the one nodes join (default: %(default)s)")
    start.add_argument("--dashboard", default=None, help=f"dashboard URL (default: {local.DEFAULT_DASHBOARD})")
    start.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING (default: %(default)s)")
    start.add_argument("--allow-insecure-cluster", action="store_true",
                       help="use an existing cluster (--address) even if it runs without token authentication")
    _add_node_arguments(start)

    join = sub.add_parser("join", help="start a worker node on this machine and join it to a head node")
    join.add_argument("head_address", metavar="HEAD_ADDRESS", help="the head's GCS address, HOST:PORT")
    _add_node_arguments(join)

    status = sub.add_parser("status", help="show the Serve applications and their deployments")
    status.add_argument("--dashboard", default=local.DEFAULT_DASHBOARD, help="dashboard URL (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="print Serve's details as JSON")

    keys_cli.add_parser(sub)
    tasks_cli.add_parser(sub)
    batch_cli.add_parser(sub)
    kuberay.add_parser(sub)

    stop = sub.add_parser("stop", help="shut down the Serve application(s)")
    stop.add_argument("--dashboard", default=local.DEFAULT_DASHBOARD, help="dashboard URL (default: %(default)s)")
    stop.add_argument("--ray", action="store_true",
                      help="also stop the Ray nodes `promptfleet start`/`join` started on this machine for this "
                      "cluster (its processes only: any other Ray cluster here keeps running)")
    stop.add_argument("--address", default=None,
                      help="with --ray: the cluster's GCS address HOST:PORT (on a machine with worker nodes only)")
    stop.add_argument("--timeout", type=float, default=30,
                      help="with --ray: seconds between SIGTERM and SIGKILL (default: %(default)s)")
    return parser


def _add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="this node's address, the one other nodes reach it on "
                        "(default: 127.0.0.1 for a single-node start, else the machine's own address)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs this node offers (default: all)")
    parser.add_argument("--no-gateway", action="store_true",
                        help=f"do not give this node the gateway role (resource {nodes.GATEWAY_RESOURCE})")
    parser.add_argument("--block", action="store_true",
                        help="stay in the foreground; the node stops when this command is stopped")
    parser.epilog = "Options after `--` go to `ray start` as they are (ports, resources, labels, …)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; whatever follows a ``--`` is kept apart as ``ray_args`` (for `ray start`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ray_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: len(argv) - len(ray_args) - 1] if "--" in argv else argv)
    if ray_args and args.command not in ("start", "join"):
        build_parser().error(f"`--` options are for `ray start`: not accepted by `{args.command}`")
    args.ray_args = ray_args
    return args


def _node_spec(args: argparse.Namespace, default_host: str | None) -> nodes.NodeSpec:
    return nodes.NodeSpec(
        host=args.host or default_host, num_cpus=args.num_cpus, gateway=not args.no_gateway, block=args.block,
        extra=list(args.ray_args),
    )


def cmd_start(args: argparse.Namespace) -> int:
    config = local.load_serve_config(args.config)
    deployable = local.with_secrets(config, os.environ)
    dashboard = args.dashboard or local.DEFAULT_DASHBOARD
    head: subprocess.Popen[str] | None = None
    record: ownership.NodeRecord | None = None
    join_hint = ""
    node_host = "127.0.0.1"
    if args.address and not args.head:
        if not local.ray_is_running(args.address):
            raise local.StartError(f"no Ray cluster answers at {args.address}")
        nodes.refuse_insecure(dashboard, args.allow_insecure_cluster)
        say(f"Using the Ray cluster at {args.address}", file=sys.stderr)
    elif not args.head and local.ray_is_running(None):
        nodes.refuse_insecure(dashboard, args.allow_insecure_cluster)
        say("Using the Ray cluster already running on this machine", file=sys.stderr)
    else:
        # A single-node start stays on loopback; a head is reached by other machines.
        spec = _node_spec(args, default_host=None if args.head else "127.0.0.1")
        if args.head and spec.host is None:
            spec = dataclasses.replace(spec, host=nodes.detect_host())
        token = nodes.ensure_token(os.environ)
        os.environ["RAY_AUTH_MODE"] = "token"  # this process's own dashboard calls send the token too
        say("Starting a Ray head node…" if args.head else "Starting a local Ray cluster…", file=sys.stderr)
        cmd = nodes.ray_start_command(spec, port=args.port, dashboard_port=int(dashboard.rsplit(":", 1)[1]))
        record = _node_record("head", spec, f"{spec.host or node_host}:{args.port}", dashboard.rstrip("/"))
        head = nodes.start_node(cmd, _marked_env(record), block=spec.block)
        _remember(record)
        node_host = spec.host or node_host
        join_hint = nodes.join_command(f"{spec.host}:{args.port}", token) if args.head else ""
        if join_hint:
            # Now, not after the deploy: replicas that need worker nodes wait for them to join.
            say(f"Ray head node is up. {JOIN_ADVICE}\n  {join_hint}")
    say(f"Deploying {args.config}…", file=sys.stderr)
    try:
        local.deploy(deployable, dashboard)
        names = [app["name"] for app in config["applications"]]
        local.wait_until_running(dashboard, names, args.timeout)
    except BaseException:
        if head is not None:  # --block: the node we started ends with this command
            head.terminate()
            head.wait()
            if record is not None:
                ownership.forget(record, os.environ)
        raise
    urls = local.endpoints(config, dashboard, node_host)
    # Next to Ray's own Grafana dashboards, when the head node (its session directory) is this machine.
    installed = grafana.install_for(dashboard)
    say(ready_message(config, urls, installed, os.environ, blocking=head is not None))
    if join_hint:
        say(f"\n{JOIN_ADVICE}\n  {join_hint}")
    return _wait_if_blocking(head, record)


def ready_message(config: dict[str, Any], urls: local.Endpoints, grafana_dashboard: Path | None,
                  environ: Mapping[str, str], blocking: bool) -> str:
    """What `promptfleet start` prints once the application runs: where it answers, how to call it and how
    to stop it. ``grafana_dashboard``: where the dashboard was installed (None: the checkout's copy);
    ``blocking``: this command holds the node it started (``--block``)."""
    token_hint = (f"                           (it asks for the cluster token; print it with "
                  f"`{nodes.token_command(environ)}`)\n" if environ.get("RAY_AUTH_MODE") == "token" else "")
    return (
        f"\npromptfleet is running.\n"
        f"  API (OpenAI-compatible): {urls.api}\n"
        f"  Ray dashboard:           {urls.dashboard}\n"
        f"{token_hint}"
        f"  Grafana dashboard:       {grafana_dashboard or grafana.DASHBOARD} (docs/reference/metrics.md)\n\n"
        f"  curl {urls.api}/chat/completions -H 'Content-Type: application/json'{auth_header(config)} \\\n"
        f"    -d '{{\"model\": \"smollm2\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
        + ("Ctrl-C (or SIGTERM to this command) stops this node." if blocking
           else f"Stop with `{local.promptfleet_executable()} stop --ray`.")
    )


def _node_record(role: str, spec: nodes.NodeSpec, gcs_address: str, dashboard: str | None) -> ownership.NodeRecord:
    return ownership.NodeRecord(mark=ownership.new_mark(), role=role, dashboard=dashboard, gcs_address=gcs_address,
                                temp_dir=ownership.ray_temp_dir(spec.extra))


def _marked_env(record: ownership.NodeRecord) -> dict[str, str]:
    """The node's `ray start` environment, with the mark every process of the node inherits."""
    return {**nodes.node_env(os.environ), ownership.MARK_ENV: record.mark}


def _remember(record: ownership.NodeRecord) -> None:
    """Record the node just started: its processes and the session directory `ray start` made. (The GCS
    address stays the one the join command names, which worker nodes record too.)"""
    record.session_dir = ownership.session_dir(record.temp_dir)
    ownership.save(record, os.environ)


def auth_header(config: dict[str, Any]) -> str:
    """The curl option the printed example needs when the application has authentication on."""
    args = (config.get("applications") or [{}])[0].get("args") or {}
    auth = AuthConfig.model_validate(args.get("auth") or {})
    return f" \\\n    -H \"Authorization: Bearer ${auth.admin_key_env}\"" if auth.enabled else ""


def cmd_join(args: argparse.Namespace) -> int:
    """Start a worker node joined to ``args.head_address``, with the token the join command carries."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        nodes.install_token(token, os.environ)
    elif not nodes.token_path(os.environ).exists():
        raise local.StartError(
            "no cluster token: run the join command `promptfleet start --head` printed (it sets RAY_AUTH_TOKEN), "
            f"or copy the head's token file to {nodes.token_path(os.environ)}"
        )
    spec = _node_spec(args, default_host=None)
    say(f"Joining {args.head_address}…", file=sys.stderr)
    record = _node_record("worker", spec, args.head_address, None)
    node = nodes.start_node(nodes.ray_start_command(spec, head_address=args.head_address),
                            _marked_env(record), block=spec.block)
    _remember(record)
    say(f"Joined {args.head_address}.")
    return _wait_if_blocking(node, record)


def _wait_if_blocking(node: subprocess.Popen[str] | None, record: ownership.NodeRecord | None = None) -> int:
    """With --block, run until `ray start --block` ends (stop it with SIGTERM or Ctrl-C); the node's
    record goes with it."""
    if node is None:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: node.terminate())
    try:
        return node.wait()
    except KeyboardInterrupt:
        node.terminate()
        return node.wait()
    finally:
        if record is not None:
            ownership.forget(record, os.environ)


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
    proxy = (f"http://{http.get('host')}:{http.get('port')}" if details.get("proxy_location") != "Disabled"
             else "off")
    print(f"Serve proxy: {proxy}   dashboard: {args.dashboard}")
    for name, app in apps.items():
        gateway = ((app.get("deployed_app_config") or {}).get("args") or {}).get("gateway") or {}
        host = gateway.get("listen_host", "127.0.0.1")
        host = "<each node's address>" if host == NODE_IP else host
        api = f"http://{host}:{gateway.get('listen_port', 8000)}/v1"
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
        return _stop_nodes(args)
    return 0


def _stop_nodes(args: argparse.Namespace) -> int:
    """Stop the nodes promptfleet started here for the cluster of ``--dashboard`` (or ``--address``)."""
    mine = ownership.of_cluster(ownership.records(os.environ), None if args.address else args.dashboard, args.address)
    if not mine:
        which = f"GCS {args.address}" if args.address else f"the dashboard {args.dashboard}"
        print(f"No Ray node started by promptfleet on this machine is recorded for {which}; nothing stopped. "
              f"(`ray stop` would end every Ray cluster of this user here; run it yourself if you mean that.)",
              file=sys.stderr)
        return 1
    print(f"Stopping {len(mine)} Ray node(s) of {mine[0].gcs_address} started here…", flush=True)
    terminated, killed = ownership.stop_nodes(mine, os.environ, args.timeout)
    print(f"Ray stopped: {terminated} process(es) ended on SIGTERM, {killed} killed (SIGKILL) after waiting.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    local.use_cluster_token()
    handlers = {
        "start": cmd_start, "join": cmd_join, "status": cmd_status, "stop": cmd_stop,
        "keys": keys_cli.run, "tasks": tasks_cli.run, "batch": batch_cli.run, "k8s": kuberay.run,
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
