"""Benchmark: durable task runs — accepted/s, completed/s, and recovery after a TaskRunner kill.

    python -m bench.tasks [--runs 2000] [--concurrency 32] [--latency-ms 0,500] [--repeat 2]
                               [--kill-repeat 2] [--kill-runs 300] [--lease-s 15]

Starts a fake OpenAI upstream (``tests.fakes.upstream``) as a subprocess and a private Ray
cluster running ``configs/serve.yaml`` with one upstream model ``fake`` pointed at it, one task
on that model (in a temporary definitions dir) and a temporary ``state_dir``; everything else
(replicas, ``runner_concurrency``, the lease unless ``--lease-s`` is given) is the shipped config.

For each upstream latency (set through the fake's ``/_control/config``), ``--repeat`` times:
``--concurrency`` closed-loop submitters POST ``/v1/tasks/bench_label/submit`` until ``--runs``
runs are accepted. Printed per latency, medians over the repeats:

- accepted/s: 202 answers per second of the submission phase (runs execute meanwhile, on the
  same cores, as they would in production);
- completed/s: runs / (last run's ``finished_at`` − first run's ``created_at``), i.e. from the
  first submit until every run has ``succeeded``.

Then ``--kill-repeat`` times: ``--kill-runs`` runs at 500 ms latency, the TaskRunner replica is
``ray.kill``-ed while runs are in flight, and the times from the kill until Serve has a new
replica, until the first interrupted run has succeeded on its second start, and until every run
has succeeded are printed (medians). Run states are read from the store's SQLite file (the
benchmark owns the state dir), so polling does not load the Gateway being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from bench.kit import REPO, BenchCluster, fake_model, fake_upstream, private_cluster

APP = "promptfleet"
TASK = "bench_label"
TASK_DEFINITION = {
    "name": TASK,
    "description": "Label a text (benchmark task on the fake upstream).",
    "model": "fake",
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    "output_schema": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
        "required": ["label"],
    },
    "prompt": "Label this: {{ text }}",
}


@dataclass
class Throughput:
    runs: int
    accepted_per_s: float
    completed_per_s: float
    refused: dict[str, int]


def _write_task(state: Path) -> Path:
    tasks_dir = state / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(TASK_DEFINITION))
    return tasks_dir


def _configure_upstream(upstream_base: str, **config: Any) -> None:
    control = upstream_base.removesuffix("/v1") + "/_control/config"
    httpx.post(control, json=config, timeout=10).raise_for_status()


def _read_db(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _wait_done(db: Path, ids: list[str], timeout: float) -> list[tuple[Any, ...]]:
    """Wait until every run in ``ids`` is terminal; return (id, status, attempt, created, started, finished)."""
    marks = ",".join("?" * len(ids))
    sql = (f"SELECT id, status, attempt, created_at, started_at, finished_at FROM runs"
           f" WHERE id IN ({marks})")
    deadline = time.monotonic() + timeout
    while True:
        rows = _read_db(db, sql, *ids)
        if len(rows) == len(ids) and all(r[1] in ("succeeded", "failed", "cancelled") for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"runs unfinished after {timeout:.0f}s")
        time.sleep(0.25)


async def _submit(api: str, runs: int, concurrency: int, label: str) -> tuple[list[str], float, dict[str, int]]:
    """Closed loop: ``concurrency`` submitters until exactly ``runs`` are accepted.

    Returns the run ids, the seconds from the first submit to the last 202, and the refusals
    (status code or exception name: counted, paused on, and retried).
    """
    endpoint = f"{api}/tasks/{TASK}/submit"
    ids: list[str] = []
    refused: dict[str, int] = {}
    slots, sent = runs, 0  # slots: accepts still wanted and not in flight

    async def submitter(session: aiohttp.ClientSession) -> None:
        nonlocal slots, sent
        while slots > 0:
            slots, sent = slots - 1, sent + 1
            try:
                async with session.post(endpoint, json={"input": {"text": f"{label}-{sent}"}}) as response:
                    body = await response.read()
                    if response.status == 202:
                        ids.append(json.loads(body)["id"])
                        continue
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            slots += 1
            refused[key] = refused.get(key, 0) + 1
            if sum(refused.values()) > 10 * runs:
                raise RuntimeError(f"too many refused submits: {refused}")
            await asyncio.sleep(0.05)  # overloaded or down: do not spin

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(submitter(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return ids, elapsed, refused


def _throughput(cluster: BenchCluster, runs: int, concurrency: int, label: str, timeout: float) -> Throughput:
    ids, elapsed, refused = asyncio.run(_submit(cluster.api, runs, concurrency, label))
    rows = _wait_done(cluster.db, ids, timeout)
    failed = [r for r in rows if r[1] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} runs did not succeed, e.g. {failed[0]}")
    span = max(r[5] for r in rows) - min(r[3] for r in rows)
    return Throughput(len(ids), len(ids) / elapsed, len(ids) / span, refused)


def _runner_replicas(dashboard: str) -> list[Any]:
    from ray.util.state import list_actors

    replicas: list[Any] = list_actors(address=dashboard, limit=1000, filters=[
        ("class_name", "=", f"ServeReplica:{APP}:TaskRunner"), ("state", "=", "ALIVE")])
    return replicas


def _recovery(cluster: BenchCluster, runs: int, label: str, timeout: float) -> dict[str, float]:
    """Kill the TaskRunner replica with runs in flight; seconds from the kill to recovery marks."""
    import ray

    ids, _, _ = asyncio.run(_submit(cluster.api, runs, 16, label))
    marks = ",".join("?" * len(ids))
    deadline = time.monotonic() + 60
    while _read_db(cluster.db, f"SELECT COUNT(*) FROM runs WHERE status = 'running' AND id IN ({marks})",
                   *ids)[0][0] < 20:
        if time.monotonic() > deadline:
            raise RuntimeError("runs never started")
        time.sleep(0.05)
    (old,) = _runner_replicas(cluster.dashboard)
    killed_at = time.time()
    ray.kill(ray.get_actor(old.name, namespace="serve"), no_restart=True)
    while not any(a.actor_id != old.actor_id for a in _runner_replicas(cluster.dashboard)):
        if time.time() > killed_at + timeout:
            raise RuntimeError("no new TaskRunner replica")
        time.sleep(0.1)
    replaced_at = time.time()
    rows = _wait_done(cluster.db, ids, timeout)
    if any(r[1] != "succeeded" for r in rows):
        raise RuntimeError("some runs did not succeed after the kill")
    reruns = [r[5] for r in rows if r[2] >= 2]
    return {
        "interrupted": float(len(reruns)),
        "replica_replaced_s": replaced_at - killed_at,
        "first_rerun_done_s": (min(reruns) - killed_at) if reruns else float("nan"),
        "all_done_s": max(r[5] for r in rows) - killed_at,
    }


def _latency_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per measurement (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent submitters (default: %(default)s)")
    parser.add_argument("--latency-ms", type=_latency_list, default=[0.0, 500.0],
                        help="fake upstream latencies, comma-separated (default: 0,500)")
    parser.add_argument("--repeat", type=int, default=2, help="measurements per latency (default: %(default)s)")
    parser.add_argument("--kill-repeat", type=int, default=2, help="TaskRunner kills (default: %(default)s; 0: none)")
    parser.add_argument("--kill-runs", type=int, default=300, help="runs in flight per kill (default: %(default)s)")
    parser.add_argument("--lease-s", type=float, help="override tasks.lease_s of configs/serve.yaml")
    parser.add_argument("--timeout", type=float, default=600, help="give up on a measurement after (s)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = parser.parse_args(argv)

    summary: dict[str, Any] = {"runs": args.runs, "concurrency": args.concurrency, "latency": {}}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream())
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tasks-")))
        lease = {"lease_s": args.lease_s} if args.lease_s is not None else {}
        cluster = stack.enter_context(private_cluster(
            [fake_model("fake", upstream, max_retries=0)], state, tasks_dir=_write_task(state), **lease))
        shipped = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["applications"][0]["args"]
        summary["lease_s"] = args.lease_s or shipped["tasks"]["lease_s"]
        print(f"{args.runs} runs per measurement, {args.concurrency} submitters, median of {args.repeat}")
        print(f"{'latency ms':>10} {'accepted/s':>11} {'completed/s':>12}  each (accepted/completed)")
        for latency in args.latency_ms:
            _configure_upstream(upstream, mode="ok", latency_ms=latency)
            results = [_throughput(cluster, args.runs, args.concurrency, f"l{latency:g}r{r}", args.timeout)
                       for r in range(args.repeat)]
            accepted = statistics.median(r.accepted_per_s for r in results)
            completed = statistics.median(r.completed_per_s for r in results)
            each = "  ".join(f"{r.accepted_per_s:.0f}/{r.completed_per_s:.0f}" for r in results)
            refused = {k: v for r in results for k, v in r.refused.items()}
            print(f"{latency:>10g} {accepted:>11.1f} {completed:>12.1f}  {each}  {refused or ''}", flush=True)
            summary["latency"][latency] = {"accepted_per_s": round(accepted, 1),
                                           "completed_per_s": round(completed, 1),
                                           "each": [vars(r) for r in results]}
        if args.kill_repeat:
            _configure_upstream(upstream, mode="ok", latency_ms=500)
            kills = [_recovery(cluster, args.kill_runs, f"kill{r}", args.timeout) for r in range(args.kill_repeat)]
            print(f"\nTaskRunner replica killed with {args.kill_runs} runs in flight at 500 ms "
                  f"(lease {summary['lease_s']:g} s), median of {args.kill_repeat}:")
            recovery = {key: statistics.median(k[key] for k in kills) for key in kills[0]}
            for key, value in recovery.items():
                print(f"  {key:<22} {value:8.2f}   each: {', '.join(f'{k[key]:.2f}' for k in kills)}")
            summary["recovery"] = {"median": recovery, "each": kills}
        if args.json:
            print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
