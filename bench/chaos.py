"""Chaos as a figure: a soak that kills nodes and Serve components under mixed load, and counts.

    python -m bench.chaos [--minutes 10] [--seed 23] [--rpm 300] [--out figures.json]

On the tests' loopback multi-node cluster (tests/cluster/harness.py: a head on 127.0.0.5 and worker
nodes on 127.0.0.2 and .3, started with `promptfleet start --head` / `promptfleet join`; two fake
upstreams in child processes, one of them only for the rpm-limited model so its calls can be
counted per window), for ``--minutes``:

- load through the Gateways of every node at once: async task runs (``label_fake``; half with an
  ``Idempotency-Key``, resubmitted with the same key after a connection error or 5xx, as a
  client would), chat completions and SSE streams (a quarter on ``fake-dead``, whose upstream
  refuses connections and which falls back to ``fake``), and a ``ray job submit`` batch on
  ``fake-limited`` (``--rpm`` requests per minute, shared by its replicas on two nodes);
- faults on a seeded schedule (printed): SIGKILL a worker node every ``--node-every`` s and let it
  join again ``--rejoin-after`` s later; every ``--component-every`` s SIGKILL one Serve component
  at random (a Gateway replica, a ``worker-fake`` replica, the TaskRunner, the RateLimiter, the
  Serve controller); once, halfway, SIGKILL the TaskStore's process (Serve starts it again on the
  same SQLite file). Every pid signalled is checked to belong to this cluster's nodes first.

Figures at the end: runs accepted / succeeded exactly once / lost / duplicated; chats by status;
streams completed / cut; batch lines once / missing / duplicated; upstream calls of the limited
model per 60 s window vs the limit; p50/p99 chat latency per minute; per fault, the failures seen
in the 45 s after it and when they stopped (and for a node, when its Gateway answered again).
Exit status 1 when an accepted run or batch line was lost or duplicated, or a 60 s window saw more
than 1 % over the limit. This is a benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.kit import fake_upstream
from bench.soak_record import Fault, Op, Soak, figures, print_figures, verdict
from tests.cluster.harness import (
    HEAD_HOST,
    WORKER_HOSTS,
    LoopbackCluster,
    cluster_config,
    free_port,
    submit_batch_job,
)
from tests.fixtures import upstream_models

COMPONENTS = ("Gateway", "worker-fake", "TaskRunner", "RateLimiter", "controller")
TERMINAL = ("succeeded", "failed", "cancelled")


# -- load -------------------------------------------------------------------------------------


def failure(exc: httpx.HTTPError) -> str:
    """``refused``: no connection (that node's Gateway is down; nothing was sent); ``broken``: the
    connection failed with the request sent (a process died with it in flight) or timed out."""
    return "refused" if isinstance(exc, httpx.ConnectError) else "broken"


async def chats(soak: Soak, client: httpx.AsyncClient, worker: int) -> None:
    i = worker
    while time.monotonic() < soak.stop_at:
        i += 1
        model = "fake-dead" if i % 4 == 0 else "fake"
        body = {"model": model, "messages": [{"role": "user", "content": f"chat {worker}-{i}"}]}
        started = time.monotonic()
        try:
            reply = await client.post(f"{soak.base(i)}/chat/completions", json=body)
            outcome = str(reply.status_code)
        except httpx.HTTPError as exc:
            outcome = failure(exc)
        soak.ops.append(Op(started, "chat", outcome, time.monotonic() - started))
        if outcome != "200":
            await asyncio.sleep(0.2)


async def streams(soak: Soak, client: httpx.AsyncClient, worker: int) -> None:
    i = worker
    while time.monotonic() < soak.stop_at:
        i += 1
        model = "fake-dead" if i % 4 == 0 else "fake"
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"stream {worker}-{i}"}]}
        started = time.monotonic()
        outcome = "broken"
        try:
            async with client.stream("POST", f"{soak.base(i)}/chat/completions", json=body) as reply:
                outcome = str(reply.status_code)
                if reply.status_code == 200:
                    done = error = False
                    async for line in reply.aiter_lines():
                        done = done or line == "data: [DONE]"
                        error = error or (line.startswith("data: ") and '"error"' in line)
                    outcome = "200" if done and not error else ("error_event" if error else "cut")
        except httpx.HTTPError as exc:
            outcome = "cut" if outcome == "200" else failure(exc)
        soak.ops.append(Op(started, "stream", outcome, time.monotonic() - started))
        if outcome != "200":
            await asyncio.sleep(0.2)


async def submits(soak: Soak, client: httpx.AsyncClient, worker: int, every_s: float) -> None:
    """Async runs of ``label_fake``; every other one with an Idempotency-Key, resubmitted (same key,
    next node) after no answer or a 5xx; an unkeyed one is given up, as its client cannot know."""
    i = 0
    while time.monotonic() < soak.stop_at:
        i += 1
        key = f"soak-{worker}-{i}"
        keyed = i % 2 == 0
        if keyed:
            soak.keyed.add(key)
        headers = {"Idempotency-Key": key} if keyed else {}
        body = {"input": {"text": key}}
        for attempt in range(8 if keyed else 1):
            started = time.monotonic()
            try:
                reply = await client.post(f"{soak.base(worker + i + attempt)}/tasks/label_fake/submit",
                                          json=body, headers=headers)
                outcome = str(reply.status_code)
            except httpx.HTTPError as exc:
                outcome = failure(exc)
            soak.ops.append(Op(started, "submit", outcome, time.monotonic() - started))
            if outcome in ("202", "200"):  # 200: the key's run existed already (an earlier try got through)
                soak.runs.setdefault(key, []).append(reply.json()["id"])
                break
            if outcome not in ("refused", "broken") and not outcome.startswith("5"):
                break  # a 4xx is an answer: not accepted
            await asyncio.sleep(0.5)
        else:
            if not keyed:
                soak.unanswered_submits += 1
        await asyncio.sleep(every_s)


async def run_load(soak: Soak, chat_workers: int, stream_workers: int, submit_workers: int) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5), limits=limits) as client:
        await asyncio.gather(
            *(chats(soak, client, w) for w in range(chat_workers)),
            *(streams(soak, client, w) for w in range(stream_workers)),
            *(submits(soak, client, w, every_s=0.5) for w in range(submit_workers)),
        )


async def settle_runs(soak: Soak, timeout_s: float) -> dict[str, dict[str, Any]]:
    """The final view of every accepted run, waiting (long-poll) for those still queued or running."""
    ids = {run_id for ids in soak.runs.values() for run_id in ids}
    views: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(16)

        async def one(run_id: str, n: int) -> None:
            async with sem:
                while time.monotonic() < deadline:
                    try:
                        reply = await client.get(f"{soak.base(n)}/runs/{run_id}", params={"wait": 5})
                    except httpx.HTTPError:
                        n += 1
                        await asyncio.sleep(1)
                        continue
                    views[run_id] = {"status": f"http {reply.status_code}"}
                    if reply.status_code == 200:
                        views[run_id] = reply.json()
                        if views[run_id]["status"] in TERMINAL:
                            return
                    elif reply.status_code < 500:
                        return

        await asyncio.gather(*(one(run_id, n) for n, run_id in enumerate(sorted(ids))))
    return views


# -- faults -----------------------------------------------------------------------------------


def schedule(seconds: float, node_every: float, component_every: float, seed: int) -> list[tuple[float, str, str]]:
    """(offset s, kind, target): node kills on the minute, component kills between them, the TaskStore once."""
    rng = random.Random(seed)
    plan: list[tuple[float, str, str]] = []
    t = node_every
    while t < seconds:
        plan.append((t, "node", rng.choice(WORKER_HOSTS)))
        t += node_every
    t = component_every / 2
    while t < seconds:
        plan.append((t, "component", rng.choice(COMPONENTS)))
        t += component_every
    plan.append((seconds / 2 + 7, "taskstore", "TaskStore"))
    return sorted(plan)


def cluster_pids(cluster: LoopbackCluster) -> set[int]:
    nodes = [cluster.head, *cluster.workers.values()]
    return set().union(*(node.processes() for node in nodes if node is not None))


def component_pid(cluster: LoopbackCluster, name: str, rng: random.Random) -> int | None:
    if name == "controller":
        actors = cluster._get("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
        pids = [a["pid"] for a in actors if a.get("class_name") == "ServeController" and a.get("state") == "ALIVE"]
    else:
        pids = [r["pid"] for r in cluster.running_replicas(name) if r.get("pid")]
    return rng.choice(pids) if pids else None


def gateway_answers(cluster: LoopbackCluster, host: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{cluster.api(host)}/healthz", timeout=3).status_code == 200
    return False


def run_faults(soak: Soak, plan: list[tuple[float, str, str]], rejoin_after: float, seed: int) -> None:
    """The fault thread: follows ``plan`` until the soak ends; joins killed nodes again."""
    cluster, rng = soak.cluster, random.Random(seed + 1)
    rejoins: list[threading.Thread] = []

    def rejoin(host: str, fault: Fault) -> None:
        time.sleep(rejoin_after)
        try:
            cluster.join(host)
            cluster.wait_until(f"{host}'s Gateway", lambda: gateway_answers(cluster, host), 300, 0.5)
            fault.back_s = time.monotonic() - fault.t
        except Exception as exc:  # reported in the figures; the soak goes on with one node fewer
            fault.note = f"rejoin failed: {exc!r}"[:200]

    for offset, kind, target in plan:
        while time.monotonic() < soak.started + offset:
            if time.monotonic() >= soak.stop_at:
                break
            time.sleep(0.2)
        if time.monotonic() >= soak.stop_at:
            break
        try:
            if kind == "node":
                alive = [h for h in WORKER_HOSTS if h in cluster.workers]
                if target not in alive:
                    target = alive[0] if alive else ""
                if not target or (len(alive) < 2 and any(t.is_alive() for t in rejoins)):
                    soak.faults.append(Fault(time.monotonic(), kind, target or "-", note="skipped: no node to kill"))
                    continue
                fault = Fault(time.monotonic(), kind, target)
                cluster.workers.pop(target).kill()
                soak.faults.append(fault)
                thread = threading.Thread(target=rejoin, args=(target, fault), daemon=True)
                thread.start()
                rejoins.append(thread)
            else:
                pid = component_pid(cluster, target, rng)
                fault = Fault(time.monotonic(), kind, target)
                if pid is None or pid not in cluster_pids(cluster):
                    fault.note = f"skipped: no live process of ours (pid {pid})"
                else:
                    os.kill(pid, signal.SIGKILL)
                    fault.note = f"pid {pid}"
                soak.faults.append(fault)
        except Exception as exc:
            soak.faults.append(Fault(time.monotonic(), kind, target, note=f"fault failed: {exc!r}"[:200]))
        print(f"  +{soak.faults[-1].t - soak.started:5.0f}s {kind} {target} {soak.faults[-1].note}", flush=True)
    for thread in rejoins:
        thread.join(timeout=400)


# -- batch ------------------------------------------------------------------------------------




def job_status(cluster: LoopbackCluster, submission_id: str) -> str:
    with contextlib.suppress(Exception):
        return str(cluster._get(f"/api/jobs/{submission_id}")["status"])
    return "UNKNOWN"


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10, help="length of the soak (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=23, help="seed of the fault schedule (default: %(default)s)")
    parser.add_argument("--rpm", type=int, default=300, help="rpm limit of the batch's model (default: %(default)s)")
    parser.add_argument("--batch-lines", type=int, default=None,
                        help="batch size (default: what the rpm limit lets through in 85 %% of the soak)")
    parser.add_argument("--node-every", type=float, default=60,
                        help="seconds between node kills (default: %(default)s)")
    parser.add_argument("--component-every", type=float, default=30,
                        help="seconds between component kills (default: %(default)s)")
    parser.add_argument("--rejoin-after", type=float, default=10, help="seconds before a killed node joins again")
    parser.add_argument("--chats", type=int, default=6, help="concurrent chat clients (default: %(default)s)")
    parser.add_argument("--streams", type=int, default=2, help="concurrent stream clients (default: %(default)s)")
    parser.add_argument("--submitters", type=int, default=2,
                        help="run submitters, 2 runs/s each (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    lines = args.batch_lines or int(args.rpm / 60 * seconds * 0.85)
    plan = schedule(seconds, args.node_every, args.component_every, args.seed)
    print(f"chaos soak: {args.minutes:g} min, seed {args.seed}; fault schedule (s after the load starts):")
    for offset, kind, target in plan:
        print(f"  +{offset:5.0f}s {kind} {target}")
    sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="pf-chaos-") as tmp_dir, \
            fake_upstream(latency_ms=30) as general, fake_upstream(latency_ms=10) as limited:
        tmp = Path(tmp_dir)
        listen_port = free_port(HEAD_HOST)
        config = cluster_config(general, tmp / "state", listen_port, free_port("127.0.0.1"), local_model=False)
        app = config["applications"][0]
        for model in app["args"]["models"]:
            if model["name"] == "fake-limited":
                model.update(base_url=limited, rpm=args.rpm)
        app["args"]["models"] += [m for m in upstream_models(general) if m["name"] == "fake-dead"]
        cluster = LoopbackCluster(config, tmp, listen_port)
        try:
            print("bringing the cluster up…", flush=True)
            cluster.bring_up({"worker-fake": 2, "worker-fake-limited": 2})
            job_id, out = submit_batch_job(cluster, tmp, lines, model="fake-limited", concurrency=16, label="chaos")
            wall_started = time.time()
            started = time.monotonic()
            soak = Soak(cluster, started, started + seconds)
            faults = threading.Thread(target=run_faults, args=(soak, plan, args.rejoin_after, args.seed), daemon=True)
            faults.start()
            print(f"load and faults running ({lines}-line batch submitted as {job_id})…", flush=True)
            asyncio.run(run_load(soak, args.chats, args.streams, args.submitters))
            print("load done; settling runs and the batch…", flush=True)
            faults.join(timeout=400)
            views = asyncio.run(settle_runs(soak, timeout_s=300))
            remaining = lines - len(read_lines(out))
            deadline = time.monotonic() + 120 + remaining * 60 / args.rpm
            while job_status(cluster, job_id) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
                time.sleep(2)
            done = read_lines(out)
            ids = Counter(line.get("custom_id") for line in done)
            batch = {"lines": lines, "status": job_status(cluster, job_id),
                     "once": sum(1 for c in ids.values() if c == 1),
                     "missing": sum(1 for i in range(lines) if f"line-{i}" not in ids),
                     "duplicated": sum(1 for c in ids.values() if c > 1),
                     "statuses": dict(Counter(str((line.get("response") or {}).get("status_code")) for line in done))}
            stats = httpx.get(f"{limited.removesuffix('/v1')}/_control/stats", timeout=30).json()
            calls = list(stats["call_times"])  # only the batch calls this upstream
            result = figures(soak, views, batch, calls, args.rpm, wall_started)
        finally:
            cluster.stop()
    print_figures(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    problems = verdict(result)
    print("verdict: " + ("; ".join(problems) if problems else "nothing accepted was lost or duplicated; rpm held"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
