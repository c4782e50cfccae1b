"""Benchmark: what fair admission costs and how fair it is (issue 15).

    python -m bench.admission [--concurrency 16,256] [--duration 10] [--repeat 2] [--fair-seconds 20]

Starts a fake upstream (0 ms) and a private cluster with authentication on and two
models on it: ``fake`` (no model limit) and ``fake-shared`` (300 rpm, shared by keys).
Then, in one run:

1. Burst: a fresh key with rpm 600 sends 20 at once: when each got through.
2. Cost of admission: closed-loop load at each concurrency from a key without limits and
   from a key whose rpm is too high to ever wait (so every request books its slot on the
   RateLimiter), interleaved, ``--repeat`` times. Prints req/s, p50/p95 latency, the latency
   admission adds (paced − unlimited) and CPU per request of the whole cluster (every process
   this benchmark started, from /proc).
3. Fairness: key A floods ``fake-shared`` with 64 concurrent clients while key B sends 2;
   prints each key's completed calls, B's share and B's latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.kit import cpu_seconds_of_descendants, fake_model, fake_upstream, private_cluster
from bench.loadtest import LoadResult, run_load

ADMIN_KEY = "pf-bench-admin"
SHARED_RPM = 300




def _key(api: str, **limits: Any) -> str:
    response = httpx.post(f"{api}/admin/keys", json={"name": "bench", **limits},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    response.raise_for_status()
    return str(response.json()["key"])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def _burst(api: str, key: str, n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as http:
        begun = time.monotonic()

        async def one() -> float:
            response = await http.post(f"{api}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
            response.raise_for_status()
            return time.monotonic() - begun

        return sorted(await asyncio.gather(*(one() for _ in range(n))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="16,256", help="levels for the cost runs (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per cost run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="cost runs per level and key (default: %(default)s)")
    parser.add_argument("--fair-seconds", type=float, default=20, help="fairness run (default: %(default)s)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream(0))
        models = [fake_model("fake", upstream),
                  fake_model("fake-shared", upstream, rpm=SHARED_RPM, timeout_s=40)]
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-bench-")))
        cluster = stack.enter_context(private_cluster(
            models, state, app_args={"auth": {"enabled": True}}, env_vars={"PROMPTFLEET_ADMIN_KEY": ADMIN_KEY}))
        api = cluster.api

        waits = asyncio.run(_burst(api, _key(api, rpm=600), 20))
        print("burst: fresh key, rpm 600 (burst 10 by the rule), 20 at once; seconds until each answered:")
        print("  " + " ".join(f"{w:.2f}" for w in waits))

        free, paced = _key(api), _key(api, rpm=10_000_000)
        print(f"\ncost of admission: unlimited key vs key with an rpm that never waits, {args.duration:.0f} s runs, "
              f"median of {args.repeat}")
        print(f"{'key':<10} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'CPU ms/req':>11} errors")
        for level in levels:
            rows: dict[str, list[tuple[LoadResult, float]]] = {"unlimited": [], "paced": []}
            for _ in range(args.repeat):
                for name, key in (("unlimited", free), ("paced", paced)):
                    cpu = cpu_seconds_of_descendants()
                    result = asyncio.run(run_load(api, "fake", level, args.duration, key, warmup=1.0, grace=10))
                    cpu = cpu_seconds_of_descendants() - cpu
                    rows[name].append((result, cpu * 1000 / max(1, result.ok + result.error_count)))
            p: dict[str, tuple[float, float]] = {}
            for name, runs in rows.items():
                rps = statistics.median(r.rps for r, _ in runs)
                latencies = [x for r, _ in runs for x in r.latencies_ms]
                p[name] = (_pct(latencies, 50), _pct(latencies, 95))
                cpu_ms = statistics.median(c for _, c in runs)
                errors: dict[str, int] = {}
                for r, _ in runs:
                    for code, count in r.errors.items():
                        errors[code] = errors.get(code, 0) + count
                print(f"{name:<10} {level:>5} {rps:>8.1f} {p[name][0]:>8.1f} {p[name][1]:>8.1f} {cpu_ms:>11.2f} "
                      f"{errors or ''}")
            print(f"{'added by admission':<16} {level:>5} p50 {p['paced'][0] - p['unlimited'][0]:+.1f} ms, "
                  f"p95 {p['paced'][1] - p['unlimited'][1]:+.1f} ms\n")

        a_key, b_key = _key(api), _key(api)

        async def fairness() -> tuple[LoadResult, LoadResult]:
            a, b = await asyncio.gather(
                run_load(api, "fake-shared", 64, args.fair_seconds, a_key, warmup=3, grace=40, request_timeout=60),
                run_load(api, "fake-shared", 2, args.fair_seconds, b_key, warmup=3, grace=40, request_timeout=60),
            )
            return a, b

        a, b = asyncio.run(fairness())
        total = a.ok + b.ok
        print(f"fairness: model at {SHARED_RPM} rpm ({SHARED_RPM / 60:.0f}/s), {args.fair_seconds:.0f} s window")
        print(f"  A (64 clients): {a.ok} calls ({a.rps:.2f}/s), p50 {_pct(a.latencies_ms, 50):.0f} ms, "
              f"errors {a.errors}")
        print(f"  B ( 2 clients): {b.ok} calls ({b.rps:.2f}/s), p50 {_pct(b.latencies_ms, 50):.0f} ms, "
              f"p95 {_pct(b.latencies_ms, 95):.0f} ms, errors {b.errors}")
        print(f"  B's share {b.ok / max(1, total):.3f} (fair: 0.5); total {total / args.fair_seconds:.2f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
