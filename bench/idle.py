"""What an idle single-node cluster costs, process by process: CPU over a quiet window, RSS and PSS.

    python -m bench.idle                                  this checkout, 120 s idle after 60 s settling
    python -m bench.idle --baseline ../promptfleet-main   a previous checkout first, in the same run
    python -m bench.idle --variant 'slow-loop=RAY_SERVE_CONTROL_LOOP_INTERVAL_S=1'   a knob's worth

Each cluster is started the way a user starts one: ``promptfleet start`` (``python -m cluster.cli
start`` of the checkout, its own ``configs/serve.yaml`` with the embedded model, auth off) in a shell
environment without the bench's ``RAY_*`` variables, on fresh ports and a throwaway Ray temp and
state directory, then one chat completion to the embedded model (the model loaded, as after a first
request). After ``--settle`` seconds it reads from /proc every process carrying the node's mark
(``cluster.ownership``: every process Ray starts for the node inherits it) and their descendants,
waits ``--seconds``, reads again, and stops the cluster with ``promptfleet stop --ray``.

Prints a table per process (what it is, CPU % of one core, RSS, PSS) and per group, and a summary
line per system (``--threads``: also each process's CPU per thread name, from /proc/PID/task);
``--out`` writes the JSON. Run it under the Ray lock (docs/development.md).
A variant is ``NAME=VAR=VALUE[,VAR=VALUE…]``: this checkout with those variables in the environment
of ``promptfleet start`` (and so of ``ray start`` and every Ray process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.kit import REPO, free_port
from bench.peers import procs
from cluster import ownership


@dataclass
class System:
    name: str
    checkout: Path
    env: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # dotted path below the application → value


def role(cmdline: str) -> str:
    """What a process of the cluster is, in words a reader of the table knows."""
    first = cmdline.split(" ", 1)[0]
    if first.startswith("ray::ServeReplica:"):
        return first.rsplit(":", 1)[1]
    if first.startswith("ray::"):  # an actor's title is ray::Class.method while a method runs
        return first[len("ray::"):].split(".", 1)[0]
    for needle, name in (("gcs_server", "GCS"), ("raylet", "raylet"), ("dashboard/agent.py", "DashboardAgent"),
                         ("runtime_env/agent/main.py", "RuntimeEnvAgent"), ("log_monitor.py", "log monitor"),
                         ("ray.util.client.server", "Ray client server"),
                         ("monitor.py", "autoscaler monitor"), ("dashboard/dashboard.py", "dashboard"),
                         ("default_worker.py", "idle worker (starting)")):
        if needle in cmdline:
            return name
    if first.startswith("ray-dashboard-"):
        return f"dashboard module {first[len('ray-dashboard-'):]}"
    return procs.short_name(cmdline, 40)


def group(cmdline: str) -> str:
    """The role folded to the groups of the summary: Ray core, dashboard, Serve, replicas."""
    name = role(cmdline)
    if name in ("GCS", "raylet"):
        return "Ray core (GCS, raylet)"
    if name.startswith(("dashboard", "Dashboard", "RuntimeEnv", "log monitor", "autoscaler", "Ray client")):
        return "Ray dashboard, agents, monitors"
    if name in ("ServeController", "ProxyActor"):
        return "Serve controller and proxy"
    if name.startswith("IDLE") or name.startswith("idle worker"):
        return "idle Ray workers"
    if name.startswith("worker-"):
        return "model workers"
    if cmdline.startswith("ray::ServeReplica:"):
        return "promptfleet state and Gateway replicas"
    return "other"


def override(app: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (``args.tasks.catalogue_poll_s``, ``deployments.TaskRunner.num_replicas``) in ``app``."""
    *parents, leaf = path.split(".")
    node: Any = app
    for i, part in enumerate(parents):
        if isinstance(node, list):  # the deployments list, by name
            found = next((d for d in node if d.get("name") == part), None)
            if found is None:
                found = {"name": part}
                node.append(found)
            node = found
        else:
            node = node.setdefault(part, [] if part == "deployments" and i == 0 else {})
    node[leaf] = value


def _config(system: System, tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    """The checkout's configs/serve.yaml on fresh ports and a throwaway state directory."""
    config = yaml.safe_load((system.checkout / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = free_port()
    for dotted, value in system.config.items():
        override(config["applications"][0], dotted, value)
    args = config["applications"][0]["args"]
    args["gateway"]["listen_port"] = free_port()
    args["tasks"]["state_dir"] = str(tmp / "state")
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    local = next(m["name"] for m in args["models"] if m["provider"] == "llamacpp")
    return path, f"http://127.0.0.1:{args['gateway']['listen_port']}/v1", {"model": local}


def _shell_env(tmp: Path, checkout: Path, extra: dict[str, str]) -> dict[str, str]:
    """A user's shell: none of the bench's RAY_* variables, its own token and node records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    return {**env, "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"), ownership.STATE_DIR_ENV: str(tmp / "pf"),
            "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def started(system: System, timeout_s: float = 900) -> Iterator[tuple[str, dict[str, Any], set[int], dict[str, str]]]:
    """A cluster of ``system`` started with `promptfleet start`: API URL, chat body, process roots, env."""
    tmp = Path(tempfile.mkdtemp(prefix="pfi-"))  # short: Ray's socket paths live below it
    config, api, chat = _config(system, tmp)
    env = _shell_env(tmp, system.checkout, system.env)
    dashboard = f"http://127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "cluster.cli"]
    argv = [*cli, "start", "--config", str(config), "--dashboard", dashboard, "--port", str(free_port()),
            "--", "--ray-client-server-port", str(free_port()), "--temp-dir", str(tmp / "ray"),
            *[x for name in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
              for x in (name, str(free_port()))]]
    log = tmp / "start.log"
    try:
        with log.open("ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=system.checkout,
                                  timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"promptfleet start failed for {system.name}:\n{log.read_text()[-3000:]}")
        marks = [r.mark for r in ownership.records(env)]
        roots = set().union(*(ownership.marked(m) for m in marks))
        yield api, chat, roots, env
    finally:
        subprocess.run([*cli, "stop", "--ray", "--dashboard", dashboard, "--timeout", "20"], env=env,
                       cwd=system.checkout, capture_output=True, timeout=180, check=False)


def first_chat(api: str, model: str, timeout_s: float = 300) -> float:
    """Seconds the first chat completion took (the embedded model loads on the first start)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    deadline = time.monotonic() + timeout_s
    while True:
        began = time.monotonic()
        try:
            answer = httpx.post(f"{api}/chat/completions", json=body, timeout=120)
            if answer.status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no chat answer from {api} in {timeout_s:.0f}s")
        time.sleep(1)


def thread_cpu(pid: int, before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
               seconds: float) -> dict[str, float]:
    """CPU % of a core per thread name of one process between two ``procs.threads`` readings.

    Threads of one name are summed (gRPC and Ray name their pools' threads alike); the process's first
    thread is ``main`` (its name is the process title's first 15 characters)."""
    spent: dict[str, float] = {}
    for tid, (name, ticks) in after.items():
        label = "main" if tid == pid else name
        base = before[tid][1] if tid in before and before[tid][0] == name else 0
        spent[label] = spent.get(label, 0.0) + 100 * (ticks - base) / procs.TICKS_PER_S / seconds
    return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def measure(roots: set[int], seconds: float) -> list[dict[str, Any]]:
    """Every process of the cluster (the marked ones and their descendants): CPU % of a core, RSS, PSS,
    and CPU % per thread name."""
    before = procs.snapshot()
    threads_before = {pid: procs.threads(pid) for pid in procs.descendants(before, roots)}
    time.sleep(seconds)
    after = procs.snapshot()
    rows = []
    for pid in procs.descendants(after, roots):
        now, then = after[pid], before.get(pid)
        same = then is not None and then.start == now.start
        base = then.ticks if same and then is not None else 0
        rows.append({"pid": pid, "role": role(now.cmdline), "group": group(now.cmdline), "cmdline": now.cmdline[:300],
                     "cpu_pct": round(100 * (now.ticks - base) / procs.TICKS_PER_S / seconds, 2),
                     "rss_mib": round(now.rss_kib / 1024, 1), "pss_mib": round(procs.pss_kib(pid) / 1024, 1),
                     "threads": thread_cpu(pid, threads_before.get(pid, {}) if same else {}, procs.threads(pid),
                                           seconds)})
    return sorted(rows, key=lambda r: (r["group"], r["role"]))


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"processes": 0, "cpu_pct": 0.0, "rss_mib": 0.0, "pss_mib": 0.0})
        g["processes"] += 1
        for k in ("cpu_pct", "rss_mib", "pss_mib"):
            g[k] = round(g[k] + r[k], 2)
    total = {k: round(sum(r[k] for r in rows), 1) for k in ("cpu_pct", "rss_mib", "pss_mib")}
    return {"processes": len(rows), **total, "groups": groups}


def run_system(system: System, args: argparse.Namespace) -> dict[str, Any]:
    print(f"{system.name}: starting ({system.checkout}, env {system.env}, config {system.config}) …",
          file=sys.stderr, flush=True)
    with started(system) as (api, chat, roots, _env):
        first = first_chat(api, chat["model"])
        time.sleep(args.settle)
        rows = measure(roots, args.seconds)
    result = {"name": system.name, "checkout": str(system.checkout), "env": system.env, "config": system.config,
              "first_chat_s": round(first, 2), "rows": rows, **summary(rows)}
    print(f"  {system.name}: {result['cpu_pct']} % of a core, RSS {result['rss_mib']:.0f} MiB, "
          f"PSS {result['pss_mib']:.0f} MiB, {result['processes']} processes", file=sys.stderr, flush=True)
    return result


def markdown(results: list[dict[str, Any]], seconds: float, threads: bool = False) -> str:
    names = [r["name"] for r in results]
    lines = [f"Idle {seconds:g} s; CPU % of one core / PSS MiB (RSS MiB) per group, processes in brackets.", "",
             "| group | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    all_groups = sorted({g for r in results for g in r["groups"]})
    for g in all_groups:
        cells = []
        for r in results:
            v = r["groups"].get(g)
            cells.append(f"{v['cpu_pct']:.1f} % / {v['pss_mib']:.0f} ({v['rss_mib']:.0f}) [{v['processes']}]"
                         if v else "—")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    totals = [f"**{r['cpu_pct']:.1f} % / {r['pss_mib']:.0f} ({r['rss_mib']:.0f}) [{r['processes']}]**"
              for r in results]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    for r in results:
        lines += ["", f"{r['name']} (first chat {r['first_chat_s']} s):", "",
                  "| process | group | CPU % | RSS MiB | PSS MiB |", "|---|---|---|---|---|"]
        lines += [f"| {x['role']} | {x['group']} | {x['cpu_pct']:.2f} | {x['rss_mib']:.0f} | {x['pss_mib']:.0f} |"
                  for x in r["rows"]]
        if threads:
            lines += ["", "| process | CPU % per thread name (≥ 0.05 %) |", "|---|---|"]
            lines += [f"| {x['role']} | " + ", ".join(f"{n} {v:.2f}" for n, v in x["threads"].items() if v >= 0.05)
                      + " |" for x in sorted(r["rows"], key=lambda x: -x["cpu_pct"])]
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> System:
    """``NAME=KEY=VALUE[,KEY=VALUE…]``: a KEY with a dot is a path in the application's config, else an
    environment variable."""
    name, _, assignments = text.partition("=")
    pairs = [a.split("=", 1) for a in assignments.split(",") if "=" in a]
    if not name or not pairs:
        raise argparse.ArgumentTypeError(f"a variant is NAME=KEY=VALUE[,KEY=VALUE…], not {text!r}")
    env = {k: v for k, v in pairs if "." not in k}
    config = {k: yaml.safe_load(v) for k, v in pairs if "." in k}
    return System(name, REPO, env, config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120, help="idle window (default: %(default)s)")
    p.add_argument("--settle", type=float, default=60, help="seconds after the first chat (default: %(default)s)")
    p.add_argument("--baseline", type=Path, help="a previous checkout, measured first")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], help="NAME=VAR=VALUE[,…]")
    p.add_argument("--no-current", action="store_true", help="leave this checkout's own defaults out")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--threads", action="store_true", help="also print each process's CPU per thread name")
    args = p.parse_args(argv)
    systems = ([System(f"baseline {args.baseline.name}", args.baseline.resolve())] if args.baseline else [])
    systems += [] if args.no_current else [System("this checkout", REPO)]
    systems += args.variant
    results = [run_system(s, args) for s in systems]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results, args.seconds, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
