"""What a multi-node cluster costs and gives: idle CPU and memory per node, and throughput through
one node's Gateway vs two nodes' Gateways at once.

    python -m bench.cluster [--concurrency 64] [--duration 8] [--rounds 2] [--idle 20]

Starts the tests' loopback cluster (tests/cluster/harness.py: a head on 127.0.0.5 and worker
nodes on 127.0.0.2 and .3, started with `promptfleet start --head` / `promptfleet join`) with the
fast fake upstream (a child process) and no local model. Per node it reports the CPU time its
processes used over ``--idle`` seconds with no traffic (as % of one core) and their memory (PSS,
so pages shared between processes count once). Then closed-loop load with the same total
concurrency goes to one worker node's Gateway, then to both worker nodes' Gateways at once,
alternating for ``--rounds``; medians are printed. Everything shares this machine's cores, the
load generator included: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.kit import fake_upstream
from bench.loadtest import LoadResult, run_load
from tests.cluster.harness import HEAD_HOST, WORKER_HOSTS, LoopbackCluster, Node, cluster_config, free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def pss_mib(pids: set[int]) -> float:
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def idle_cost(nodes: dict[str, Node], seconds: float) -> dict[str, dict[str, float]]:
    pids = {host: node.processes() for host, node in nodes.items()}
    before = {host: cpu_seconds(p) for host, p in pids.items()}
    time.sleep(seconds)
    return {
        host: {"cpu_pct": 100 * (cpu_seconds(p) - before[host]) / seconds, "pss_mib": pss_mib(p),
               "processes": len(p)}
        for host, p in pids.items()
    }


async def load(urls: list[str], concurrency: int, duration: float) -> float:
    share = max(1, concurrency // len(urls))
    results: list[LoadResult] = await asyncio.gather(
        *(run_load(url, "fake", share, duration, warmup=1.0) for url in urls)
    )
    errors = {k: v for r in results for k, v in r.errors.items()}
    if errors:
        print(f"  errors: {errors}", file=sys.stderr)
    return sum(r.rps for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64, help="total concurrent clients (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=8, help="seconds per measurement (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two setups (default: %(default)s)")
    parser.add_argument("--idle", type=float, default=20, help="seconds of idle measurement (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pf-bench-cluster-") as tmp_dir, fake_upstream() as upstream:
        tmp = Path(tmp_dir)
        listen_port = free_port(HEAD_HOST)
        config = cluster_config(upstream, tmp / "state", listen_port, free_port("127.0.0.1"), local_model=False)
        cluster = LoopbackCluster(config, tmp, listen_port)
        try:
            cluster.bring_up({"worker-fake": 2})
            time.sleep(15)  # let start-up work settle before measuring idle
            assert cluster.head is not None
            idle = idle_cost({HEAD_HOST: cluster.head, **cluster.workers}, args.idle)
            one = [f"{cluster.api(WORKER_HOSTS[0])}/v1"]
            two = [f"{cluster.api(h)}/v1" for h in WORKER_HOSTS]
            rps: dict[str, list[float]] = {"one": [], "two": []}
            asyncio.run(load(two, args.concurrency, 3))  # warm connections and replicas
            for _ in range(args.rounds):
                rps["one"].append(asyncio.run(load(one, args.concurrency, args.duration)))
                rps["two"].append(asyncio.run(load(two, args.concurrency, args.duration)))
        finally:
            cluster.stop()
    print(f"idle, {args.idle:.0f} s (CPU % of one core; PSS MiB):")
    for host, cost in idle.items():
        role = "head" if host == HEAD_HOST else "worker"
        print(f"  {host} ({role}): {cost['cpu_pct']:.1f} % CPU, {cost['pss_mib']:.0f} MiB, "
              f"{cost['processes']:.0f} processes")
    print(f"throughput, model `fake` (fast fake upstream), {args.concurrency} concurrent in total, "
          f"median of {args.rounds} x {args.duration:.0f} s:")
    print(f"  one node's Gateway ({WORKER_HOSTS[0]}):       {statistics.median(rps['one']):.0f} req/s  {rps['one']}")
    print(f"  two nodes' Gateways at once:        {statistics.median(rps['two']):.0f} req/s  {rps['two']}")
    print(json.dumps({"idle": idle, "rps": rps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
