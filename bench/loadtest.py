"""Closed-loop HTTP load generator for OpenAI-compatible chat completion endpoints.

For each concurrency level N, N asyncio workers share one aiohttp session (a keep-alive pool of N
connections); each sends the next ``POST {url}/chat/completions`` as soon as its previous one has
been fully read. Only requests that *finish* inside the measurement window (after ``warmup``,
``duration`` seconds long) are counted; ``rps`` is the number of 200 answers per second of window.
After the window, in-flight requests get ``grace`` seconds to finish (so the next run starts on an
idle server) and are then cancelled: a run always ends within warmup + duration + grace seconds.

    python -m bench.loadtest --url http://127.0.0.1:8000/v1 --model fake-model \\
        --concurrency 16,64,256 --duration 15 --repeat 2 --compare-url http://127.0.0.1:9100/v1

With ``--compare-url`` the same load runs against a second base URL, interleaved (A then B at
each level and repetition), so that the A/B ratio is measured under the same machine noise.
``--json`` prints the human-readable table to stderr and one JSON summary to stdout.

Library use: ``await run_load(url, model, concurrency, duration)`` returns a :class:`LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Coroutine
from typing import Any, TextIO

import aiohttp


@dataclasses.dataclass
class LoadResult:
    """What one closed-loop run measured."""

    url: str
    concurrency: int
    duration_s: float  # length of the measurement window
    ok: int = 0  # 200 answers (for streams: ended by [DONE]) finished inside the window
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # "429", "timeout", ...
    latencies_ms: list[float] = dataclasses.field(default_factory=list, repr=False)  # ok only

    @property
    def rps(self) -> float:
        """Successful requests per second of measurement window."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile_ms(self, q: float) -> float | None:
        """Nearest-rank percentile ``q`` (0-100) of ok latencies; None without any ok request."""
        return _percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (latencies reduced to p50/p90/p99)."""
        return {"url": self.url, "concurrency": self.concurrency, "duration_s": self.duration_s,
                "rps": round(self.rps, 2), "ok": self.ok, "errors": dict(self.errors),
                **_latency_summary(sorted(self.latencies_ms))}


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def _latency_summary(ordered: list[float]) -> dict[str, float | None]:
    return {f"p{q}_ms": None if (v := _percentile(ordered, q)) is None else round(v, 2)
            for q in (50, 90, 99)}


def _request_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 16}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


async def _one_request(session: aiohttp.ClientSession, endpoint: str, body: bytes,
                       headers: dict[str, str], stream: bool) -> str | None:
    """Send one request and read all of it; None if it succeeded, else the error's name."""
    try:
        async with session.post(endpoint, data=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                return str(response.status)
            if not stream:
                await response.read()
                return None
            async for line in response.content:  # SSE: done only once [DONE] arrived
                if line.startswith(b"data: [DONE]"):
                    await response.read()
                    return None
            return "incomplete_stream"
    except TimeoutError:  # includes aiohttp.ServerTimeoutError, also a ClientError
        return "timeout"
    except aiohttp.ClientError as exc:
        if not isinstance(exc, aiohttp.ClientResponseError):
            # A refused or broken connection fails at once: pause so a dead target is not
            # hammered in a tight loop that would steal the CPU of whatever else runs here.
            await asyncio.sleep(0.01)
        return type(exc).__name__


async def run_load(url: str, model: str, concurrency: int, duration: float,
                   api_key: str | None = None, stream: bool = False, *, warmup: float = 0.0,
                   grace: float = 10.0, request_timeout: float = 30.0) -> LoadResult:
    """Run ``concurrency`` closed-loop workers against ``{url}/chat/completions``.

    ``url`` is an OpenAI base URL (ending in ``/v1``). The run takes at most
    ``warmup + duration + grace`` seconds; see the module docstring for what is counted.
    """
    if concurrency < 1 or duration <= 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    endpoint = url.rstrip("/") + "/chat/completions"
    body = _request_body(model, stream)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    result = LoadResult(url=url, concurrency=concurrency, duration_s=duration)
    errors: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while (sent := time.perf_counter()) < window_end:
            error = await _one_request(session, endpoint, body, headers, stream)
            done = time.perf_counter()
            if window_start <= done < window_end:
                if error is None:
                    result.ok += 1
                    result.latencies_ms.append((done - sent) * 1000)
                else:
                    errors[error] += 1

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):  # a worker bug, not a failed request: never hide it
            raise outcome
    result.errors = dict(errors)
    return result


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop, when installed, leaves more CPU to the system under test
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(coro)


def _row(label: str, concurrency: int, run: str, rps: float, ok: int, errors: dict[str, int],
         lat: dict[str, float | None]) -> str:
    errs = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"
    ms = " ".join(f"{'-' if lat[k] is None else format(lat[k], '.1f'):>8}"
                  for k in ("p50_ms", "p90_ms", "p99_ms"))
    return f"{label:<3}{concurrency:>6} {run:>6} {rps:>10.1f} {ok:>8} {errs:<24}{ms}"


def _level_summary(url: str, runs: list[LoadResult]) -> dict[str, Any]:
    errors: collections.Counter[str] = collections.Counter()
    for run in runs:
        errors.update(run.errors)
    latencies = sorted(x for run in runs for x in run.latencies_ms)
    return {"url": url, "median_rps": round(statistics.median(r.rps for r in runs), 2),
            "runs_rps": [round(r.rps, 2) for r in runs], "ok": sum(r.ok for r in runs),
            "errors": dict(errors), **_latency_summary(latencies)}


def _concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest",
                                     description="Closed-loop load on /chat/completions.")
    parser.add_argument("--url", required=True,
                        help="OpenAI base URL (A), e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="fake-model",
                        help="model name sent (default: %(default)s)")
    parser.add_argument("--concurrency", type=_concurrency_list, default=[16],
                        help="comma-separated levels, e.g. 16,64,256 (default: 16)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="measured seconds per run (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds before each run's window (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per level and URL; the median req/s is reported (default: 1)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--stream", action="store_true", help="stream=true, read SSE to [DONE]")
    parser.add_argument("--compare-url", default=None, help="second base URL (B), interleaved")
    parser.add_argument("--compare-api-key", default=None, help="key for B (default: --api-key)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="per-request timeout in seconds (default: %(default)s)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight requests get after a window (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="table to stderr, one JSON summary to stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every level (A then B, ``--repeat`` times) and print results.

    Returns 0, or 1 if some level of some target had no successful request at all.
    """
    args = _parser().parse_args(argv)
    if args.repeat < 1 or args.duration <= 0:
        _parser().error("--repeat must be >= 1 and --duration > 0")
    out: TextIO = sys.stderr if args.json else sys.stdout
    targets = [("A", args.url, args.api_key)]
    if args.compare_url:
        targets.append(("B", args.compare_url, args.compare_api_key or args.api_key))
    for label, url, _ in targets:
        print(f"{label} = {url}", file=out)
    print(f"{'':<3}{'conc':>6} {'run':>6} {'req/s':>10} {'ok':>8} {'errors':<24}"
          f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}", file=out, flush=True)
    levels = []
    for concurrency in args.concurrency:
        runs: dict[str, list[LoadResult]] = {label: [] for label, _, _ in targets}
        for i in range(args.repeat):
            for label, url, key in targets:
                result = _run(run_load(url, args.model, concurrency, args.duration, key,
                                      args.stream, warmup=args.warmup, grace=args.grace,
                                      request_timeout=args.timeout))
                runs[label].append(result)
                lat = _latency_summary(sorted(result.latencies_ms))
                print(_row(label, concurrency, str(i + 1), result.rps, result.ok, result.errors,
                           lat), file=out, flush=True)
        level: dict[str, Any] = {"concurrency": concurrency}
        for label, url, _ in targets:
            summary = level[label.lower()] = _level_summary(url, runs[label])
            if args.repeat > 1:
                print(_row(label, concurrency, "median", summary["median_rps"], summary["ok"],
                           summary["errors"], summary), file=out, flush=True)
        if args.compare_url:
            b_rps = level["b"]["median_rps"]
            ratio = round(level["a"]["median_rps"] / b_rps, 3) if b_rps else None
            level["ratio_a_over_b"] = ratio
            print(f"{'':<3}{concurrency:>6}  A/B = {ratio}", file=out, flush=True)
        levels.append(level)
    if args.json:
        print(json.dumps({"model": args.model, "duration_s": args.duration,
                          "warmup_s": args.warmup, "repeat": args.repeat, "stream": args.stream,
                          "levels": levels}))
    failed = any(level[label.lower()]["ok"] == 0 for level in levels for label, _, _ in targets)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
