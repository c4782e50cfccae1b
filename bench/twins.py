"""Benchmark: what a setting costs, in CPU per request of each process, A/B in one cluster.

    python -m bench.twins --twin 'logs-on={"logs": {"access_log": true}}' [--twin NAME=JSON …]
                          [--concurrency 32] [--duration 8] [--repeat 3]

Deploys the benchmark application (``bench.kit.private_cluster``: one fast fake upstream model) and,
beside it, one twin application per ``--twin``, the same but for the given ``args`` sections, each
with its own Gateway, worker and state deployments. Then drives closed-loop chat load at each
application in turn (``--repeat`` rounds, interleaved, so the machine's noise hits them alike) and
reads every replica's CPU time from /proc before and after: the result is CPU µs per request of
each deployment of each application, the median of the rounds. Per-process CPU is a finer measure
than req/s on a shared machine (the load generator and every other process compete for the same
cores); a setting's cost is the difference between the base application and its twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from bench.kit import fake_model, fake_upstream, private_cluster
from bench.loadtest import run_load

TICK = os.sysconf("SC_CLK_TCK")
# Ray names a Serve replica's process `ray::ServeReplica:<application>:<deployment>`.
REPLICA = re.compile(r"ServeReplica:([^: ]+):(\S+)")


def replica_cpu_seconds() -> dict[int, tuple[str, str, float]]:
    """Every Serve replica process on this machine: pid → (application, deployment, CPU seconds)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        match = REPLICA.search(command)
        if match:
            found[int(pid)] = (match.group(1), match.group(2), (int(stat[11]) + int(stat[12])) / TICK)
    return found


def twin(text: str) -> tuple[str, dict[str, object]]:
    name, _, overrides = text.partition("=")
    if not re.fullmatch(r"[a-z0-9-]+", name):
        raise argparse.ArgumentTypeError(f"twin name {name!r}: lowercase letters, digits and '-'")
    try:
        sections = json.loads(overrides)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"twin {name}: {exc}") from exc
    if not isinstance(sections, dict):
        raise argparse.ArgumentTypeError(f"twin {name}: a JSON object of args sections")
    return name, sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.twins", description=__doc__.splitlines()[0])
    parser.add_argument("--twin", type=twin, action="append", required=True, metavar="NAME=JSON",
                        help="an application beside the base one, with these args sections replaced")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8, help="seconds per run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default: %(default)s)")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream(0))
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-twins-")))
        cluster = stack.enter_context(private_cluster([fake_model("fake", upstream)], state, twins=dict(args.twin)))
        targets = {cluster.app_name: cluster.api, **cluster.twins}
        for url in targets.values():  # warm every path (connections, handles, imports) first
            asyncio.run(run_load(url, "fake", args.concurrency, 3, warmup=0))
        rounds: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in targets}
        for _ in range(args.repeat):
            for name, url in targets.items():
                before = replica_cpu_seconds()
                result = asyncio.run(run_load(url, "fake", args.concurrency, args.duration, warmup=0))
                after = replica_cpu_seconds()
                requests = max(1, result.ok + result.error_count)
                per_deployment: dict[str, float] = {}
                for pid, (app, deployment, cpu) in after.items():
                    if app == name:
                        spent = cpu - before.get(pid, (app, deployment, 0.0))[2]
                        per_deployment[deployment] = per_deployment.get(deployment, 0.0) + spent * 1e6 / requests
                rounds[name].append((result.ok / result.duration_s, per_deployment))
        print(f"{args.concurrency} concurrent, {args.duration:g} s runs, median of {args.repeat} interleaved rounds")
        print(f"{'application':<24} {'req/s':>7} {'Gateway µs':>11} {'worker µs':>10} {'others µs':>10}")
        for name, runs in rounds.items():
            deployments = {d for _, cpu in runs for d in cpu}
            median = {d: statistics.median(cpu.get(d, 0.0) for _, cpu in runs) for d in deployments}
            gateway = median.pop("Gateway", 0.0)
            worker = sum(v for d, v in median.items() if d.startswith("worker-"))
            others = sum(v for d, v in median.items() if not d.startswith("worker-"))
            print(f"{name:<24} {statistics.median(r for r, _ in runs):>7.0f} {gateway:>11.0f} {worker:>10.0f} "
                  f"{others:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
