"""Benchmark: chat completions through promptfleet vs. a single-process gateway vs. the upstream itself.

    python -m bench.gateway [--concurrency 16,64,256] [--duration 15] [--repeat 2] [--latency-ms 0]
    python -m bench.gateway --metrics-cost [--concurrency 16,64] [--repeat 4]   what the metrics cost

Starts a fake OpenAI upstream (``tests.fakes.upstream``) and the no-Ray baseline
(``bench.baseline_proxy``) as subprocesses, a private Ray cluster running
``configs/serve.yaml`` with one upstream model ``fake`` pointed at the fake
upstream, then drives closed-loop load at each concurrency against all three,
interleaved (target A, B, C at each level, ``--repeat`` times) so a noisy
machine hurts them alike. Prints req/s medians, latency percentiles, and the
ratio promptfleet / baseline. With ``--url`` it measures an already running
promptfleet instead of starting one (its config must route ``--model`` to an
upstream; ``--upstream-url`` then names that upstream).

``--metrics-cost`` measures what the metrics cost instead: beside ``promptfleet`` (metrics on) it
deploys two twin applications in the same cluster — one with ``metrics.enabled: false``, one with
metrics on again (each with its own Gateway, store, limiter and workers, on its own port) — and
measures the three interleaved. The on / off ratio (both "on" apps averaged) is the cost; the ratio
of the two "on" apps to each other (an A/A test) shows how much of it is noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.kit import child_process, cpu_seconds_of_descendants, fake_model, fake_upstream, free_port, private_cluster
from bench.loadtest import LoadResult, run_load

NO_METRICS = "promptfleet-nometrics"
METRICS_TWIN = "promptfleet-metrics2"
ON, OFF, ON_TWIN = "promptfleet", "metrics off", "metrics on (twin)"


def _measure(url: str, model: str, concurrency: int, duration: float) -> tuple[LoadResult, float]:
    """The run, and the CPU milliseconds per request of every process this one started (the cluster,
    the fake upstream, the baseline; the load generator runs here, outside it)."""
    import asyncio

    cpu = cpu_seconds_of_descendants()
    result = asyncio.run(run_load(url, model, concurrency, duration, warmup=1.0))
    cpu = cpu_seconds_of_descendants() - cpu
    return result, cpu * 1000 / max(1, result.ok + result.error_count)


def _percentiles(results: list[LoadResult]) -> tuple[float, float, float]:
    latencies = sorted(x for r in results for x in r.latencies_ms)
    if not latencies:
        return float("nan"), float("nan"), float("nan")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49], q[89], q[98]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="16,64,256", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=15, help="seconds per run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per level and target (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=0, help="fake upstream latency (default: 0)")
    parser.add_argument("--url", help="measure this running promptfleet (…/v1) instead of starting one")
    parser.add_argument("--upstream-url", help="with --url: that deployment's upstream base URL (…/v1)")
    parser.add_argument("--model", default="fake", help="model to request (default: %(default)s)")
    parser.add_argument("--with-rpm-limit", action="store_true",
                        help="also measure a model behind a (never reached) rpm limit: the limiter's cost")
    parser.add_argument("--with-serve-proxy", action="store_true",
                        help="also measure the same app through Serve's HTTP proxy")
    parser.add_argument("--metrics-cost", action="store_true",
                        help="also measure a twin app with metrics off, in the same cluster, interleaved")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    with contextlib.ExitStack() as stack:
        if args.url:
            if not args.upstream_url:
                parser.error("--url needs --upstream-url")
            upstream_base, promptfleet_url, proxy_url = args.upstream_url, args.url, None
        else:
            upstream_base = stack.enter_context(fake_upstream(args.latency_ms))
            # The same upstream again behind an rpm limit too high to throttle: the limiter's cost.
            models = [fake_model("fake", upstream_base), fake_model("fake-rpm", upstream_base, rpm=10_000_000)]
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-bench-")))
            twins = ({NO_METRICS: {"metrics": {"enabled": False}}, METRICS_TWIN: {"metrics": {"enabled": True}}}
                     if args.metrics_cost else None)
            cluster = stack.enter_context(
                private_cluster(models, state, twins=twins, serve_proxy=args.with_serve_proxy))
            promptfleet_url, proxy_url = cluster.api, cluster.proxy_api
        model = args.model
        targets: dict[str, tuple[str, str]] = {}
        if not args.metrics_cost:
            baseline_port = free_port()
            baseline_url = f"http://127.0.0.1:{baseline_port}/v1"
            stack.enter_context(child_process(
                ["bench.baseline_proxy", "--upstream", upstream_base, "--port", str(baseline_port)],
                f"http://127.0.0.1:{baseline_port}/docs"))
            targets = {"upstream (direct)": (upstream_base, model), "baseline FastAPI": (baseline_url, model)}
        targets[ON] = (promptfleet_url, model)
        if proxy_url and args.with_serve_proxy:
            targets["via Serve proxy"] = (proxy_url, model)
        if not args.url and args.with_rpm_limit:
            targets["promptfleet + rpm"] = (promptfleet_url, "fake-rpm")
        if not args.url and args.metrics_cost:
            targets[OFF] = (cluster.twins[NO_METRICS], model)
            targets[ON_TWIN] = (cluster.twins[METRICS_TWIN], model)
        summary: dict[str, Any] = {"latency_ms": args.latency_ms, "levels": {}}
        print(f"fake upstream latency {args.latency_ms} ms, {args.duration:.0f} s runs, median of {args.repeat}")
        print(f"{'target':<20} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
              f"{'CPU ms/req':>10} errors")
        for level in levels:
            runs: dict[str, list[LoadResult]] = {name: [] for name in targets}
            cpu_ms: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.repeat):
                for name, (url, target_model) in targets.items():
                    result, cpu = _measure(url, target_model, level, args.duration)
                    runs[name].append(result)
                    cpu_ms[name].append(cpu)
            row: dict[str, Any] = {}
            for name, results in runs.items():
                rps = statistics.median(r.ok / r.duration_s for r in results)
                cpu = statistics.median(cpu_ms[name])
                p50, p90, p99 = _percentiles(results)
                errors: dict[str, int] = {}
                for r in results:
                    for key, count in r.errors.items():
                        errors[key] = errors.get(key, 0) + count
                row[name] = {"rps": round(rps, 1), "p50_ms": round(p50, 1), "p90_ms": round(p90, 1),
                             "p99_ms": round(p99, 1), "cpu_ms_per_request": round(cpu, 2), "errors": errors}
                print(f"{name:<20} {level:>5} {rps:>8.1f} {p50:>8.1f} {p90:>8.1f} {p99:>8.1f} {cpu:>10.2f} "
                      f"{errors or ''}")
            if "baseline FastAPI" in row:
                ratio = row[ON]["rps"] / max(row["baseline FastAPI"]["rps"], 1e-9)
                row["promptfleet_vs_baseline"] = round(ratio, 2)
                print(f"{'promptfleet / baseline':<26} {ratio:.2f}x")
            if OFF in row:
                # Interleaved runs of the same app with and without metrics: what they cost; the two
                # apps with metrics against each other: the noise.
                rps_on = (row[ON]["rps"] + row[ON_TWIN]["rps"]) / 2
                cpu_on = (row[ON]["cpu_ms_per_request"] + row[ON_TWIN]["cpu_ms_per_request"]) / 2
                cpu_off = row[OFF]["cpu_ms_per_request"]
                on_off = rps_on / max(row[OFF]["rps"], 1e-9)
                a_a = row[ON]["rps"] / max(row[ON_TWIN]["rps"], 1e-9)
                row["metrics_on_vs_off"] = round(on_off, 3)
                row["metrics_cpu_ms_per_request"] = round(cpu_on - cpu_off, 3)
                row["metrics_on_vs_on"] = round(a_a, 3)
                print(f"{'metrics on / off':<26} {on_off:.3f}x req/s (cost {100 * (1 - on_off):+.1f} %), "
                      f"CPU {cpu_on - cpu_off:+.2f} ms/req ({100 * (cpu_on / max(cpu_off, 1e-9) - 1):+.1f} %); "
                      f"on / on (A/A) {a_a:.3f}x")
            print()
            summary["levels"][level] = row
        if args.json:
            print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
