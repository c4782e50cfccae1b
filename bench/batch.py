"""Benchmark: a batch of chat lines through promptfleet against a slow, rate-limited upstream.

    python -m bench.batch [--lines 10000] [--latency-ms 500] [--rpm 3000] [--concurrency 128]

Starts the fake OpenAI upstream (``tests.fakes.upstream``, a subprocess) answering after
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
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.kit import fake_model, fake_upstream, private_cluster
from jobs import batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n")[0])
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
        limit = {"rpm": args.rpm} if args.rpm else {}
        with contextlib.ExitStack() as stack:
            upstream_api = stack.enter_context(fake_upstream(args.latency_ms))
            model = fake_model("fake", upstream_api, timeout_s=600, **limit)
            app_name = stack.enter_context(private_cluster([model], work / "state")).app_name
            upstream = upstream_api.removesuffix("/v1")
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
