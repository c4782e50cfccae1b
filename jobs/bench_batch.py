"""Benchmark: a batch of chat lines through promptfleet against a slow, rate-limited upstream.

    python -m jobs.bench_batch [--lines 10000] [--latency-ms 500] [--rpm 3000] [--concurrency 128]

Starts the fake OpenAI upstream (``jobs.fake_upstream``, a subprocess) answering after
``--latency-ms``, and a private Ray cluster running ``configs/serve.yaml`` with one upstream model
``fake`` (``rpm`` set on it when ``--rpm`` > 0; that limit is shared by every replica through the
RateLimiter). Then runs ``jobs.batch`` in this process (the driver of a ``ray job submit`` does the
same) over ``--lines`` generated lines and reports the time against the ideal:

    ideal = max(lines / rpm minutes, lines × latency / concurrency)

i.e. the limit or the in-flight window, whichever binds. Also checks that every line has exactly
one output line and that the upstream saw exactly one call per line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from jobs import batch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _upstream(latency_ms: float) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.fake_upstream", "--port", str(port), "--latency-ms", str(latency_ms)],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_control/stats", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _cluster(upstream: str, rpm: int | None, state: Path) -> Iterator[str]:
    """A private Ray cluster in this process with the app; yields the app name."""
    import ray
    from ray import serve

    from cluster import local

    for name, value in local.RAY_START_ENV.items():
        os.environ.setdefault(name, value)
    dashboard_port = _free_port()
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        config = local.load_serve_config(REPO / "configs" / "serve.yaml")
        config["http_options"]["port"] = _free_port()
        app = config["applications"][0]
        model: dict[str, Any] = {"name": "fake", "provider": "openai", "base_url": f"{upstream}/v1",
                                 "upstream_model": "fake-model", "max_concurrency": 1000, "timeout_s": 600}
        if rpm:
            model["rpm"] = rpm
        (state / "tasks").mkdir(parents=True, exist_ok=True)
        app["args"]["models"] = [model]
        app["args"]["gateway"]["listen_port"] = _free_port()
        app["args"]["tasks"].update(definitions_dir=str(state / "tasks"), state_dir=str(state / "db"))
        app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("worker-")]
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        local.deploy(config, dashboard)
        local.wait_until_running(dashboard, [app["name"]], timeout_s=300, echo=False)
        yield str(app["name"])
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_batch", description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines in the batch (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=500, help="upstream latency (default: %(default)s)")
    parser.add_argument("--rpm", type=int, default=3000, help="upstream requests/minute limit; 0: none "
                        "(default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=128, help="jobs.batch --concurrency "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        work = Path(tmp)
        with (work / "in.jsonl").open("w") as f:
            for i in range(args.lines):
                f.write(json.dumps({"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"model": "fake", "max_tokens": 16,
                                             "messages": [{"role": "user", "content": f"line {i}"}]}}) + "\n")
        with _upstream(args.latency_ms) as upstream, _cluster(upstream, args.rpm or None, work) as app_name:
            started = time.monotonic()
            code = batch.main(["--input", str(work / "in.jsonl"), "--output", str(work / "out.jsonl"),
                               "--app", app_name, "--concurrency", str(args.concurrency),
                               "--progress-every", "10"])
            elapsed = time.monotonic() - started
            stats = httpx.get(f"{upstream}/_control/stats", timeout=10).json()
        ids = [json.loads(line)["custom_id"] for line in (work / "out.jsonl").read_text().splitlines()]
        statuses: dict[int, int] = {}
        for line in (work / "out.jsonl").read_text().splitlines():
            status = (json.loads(line).get("response") or {}).get("status_code", 0)
            statuses[status] = statuses.get(status, 0) + 1

    by_limit = args.lines / args.rpm * 60 if args.rpm else 0.0
    by_window = args.lines * args.latency_ms / 1000 / args.concurrency
    ideal = max(by_limit, by_window)
    print(f"\nbench_batch: {args.lines} lines, upstream latency {args.latency_ms:g} ms, "
          f"rpm {args.rpm or 'unlimited'}, concurrency {args.concurrency}")
    print(f"  elapsed          {elapsed:8.1f} s   ({args.lines / elapsed:.1f} lines/s)")
    print(f"  ideal            {ideal:8.1f} s   (rpm limit: {by_limit:.1f} s; window: {by_window:.1f} s)")
    print(f"  elapsed / ideal  {elapsed / ideal:8.2f}")
    print(f"  output lines     {len(ids)} ({len(set(ids))} distinct), statuses {statuses}")
    print(f"  upstream calls   {stats['calls']}, max in flight {stats['max_in_flight']}")
    ok = code == 0 and len(ids) == len(set(ids)) == args.lines
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
