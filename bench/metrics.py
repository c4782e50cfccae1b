"""Benchmark: what recording the metrics of one chat request costs, in a Ray worker process.

    python -m bench.metrics [--requests 20000]

Starts a small local Ray cluster and, in an actor (a worker process like a replica's, its metrics
going to Ray's agent), records what one chat request records on its way — the Gateway's request
count and latency, its prompt and completion tokens, the worker's upstream call and latency —
``--requests`` times, with metrics on and off (``NullMetrics``), and prints microseconds per
request. ``python -m bench.gateway --metrics-cost`` measures the same cost as throughput and CPU
of a whole cluster under load.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from deployments.config import MetricsConfig


def record_requests(enabled: bool, count: int) -> float:
    """CPU microseconds per request of the recording calls one chat request makes (this process's
    CPU time, every thread: a busy machine stretches wall time, not this)."""
    from deployments.telemetry import metrics_for

    metrics = metrics_for(MetricsConfig(enabled=enabled), "bench")
    started = time.process_time()
    for i in range(count):
        metrics.request("/v1/chat/completions", "fake", 200, "", None, 0.012 + (i % 7) / 1000)
        metrics.tokens("fake", 12, 30, None)
        metrics.upstream_call("fake", "ok", 0.008)
    return (time.process_time() - started) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests to record (default: %(default)s)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        recorder: Any = ray.remote(record_requests)
        ray.get(recorder.remote(True, 1000))  # warm up: instruments created, imports done
        on = ray.get(recorder.remote(True, args.requests))
        off = ray.get(recorder.remote(False, args.requests))
    finally:
        ray.shutdown()
    print(f"recording one chat request's metrics in a Ray worker: {on:.1f} µs CPU on, {off:.1f} µs off "
          f"({args.requests} requests; 4 counter increments, 2 histogram observations each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
