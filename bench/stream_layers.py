"""Benchmark: the Gateway's stream layers in one process, with no HTTP server and no Ray.

    python -m bench.stream_layers [--concurrency 16,256] [--seconds 8] [--repeats 2] [--chunks 500]
                                  [--thresholds 50000,off]

``ModelCalls`` → ``DirectTransport`` → ``ModelServing`` → ``OpenAIProvider`` → the relay, then the
route's SSE bytes (``chat_routes.events``), exactly as the Gateway streams an upstream model's
answer, against the fake upstream in a child process (each answer ``--chunks`` chunks, written at
once). Each cell runs in a fresh process with the collector's first-generation threshold given
(``off``: no collection at all) and reports the process's CPU per stream and the cyclic garbage it
left per stream (what ``gc.collect`` finds at the end). ``bench.peers --perf`` attributes the
Gateway's growth from 16 to 256 concurrent to the interpreter; this says which part of it the
layers themselves and their collector own, apart from the HTTP server, Ray, and the other
processes on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

from bench.kit import REPO, fake_upstream

OFF = 10**9  # a threshold no count reaches: the collector never runs


def child(base_url: str, concurrency: int, seconds: float, threshold: int) -> dict[str, float]:
    """One cell, in this process: CPU ms and cyclic garbage per stream."""
    gc.set_threshold(threshold, 10, 10)
    import uvloop

    from deployments.config import OpenAIModel
    from deployments.direct_transport import DirectTransport
    from deployments.gateway.chat_routes import events
    from deployments.model_calls import ModelCalls
    from deployments.model_serving import ModelServing
    from deployments.providers.openai_compat import OpenAIProvider
    from deployments.schemas import ChatCompletionRequest
    from tests.fakes.workers import FakeWorkers

    async def run() -> dict[str, float]:
        model = OpenAIModel(provider="openai", name="m", base_url=base_url, upstream_model="fake-model",
                            timeout_s=30, max_retries=0, max_concurrency=max(concurrency, 16))
        transport = DirectTransport({"m": ModelServing(model, OpenAIProvider(model, api_key=None))}, FakeWorkers())
        calls = ModelCalls([model], transport)
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        streams = 0
        stop = time.monotonic() + seconds

        async def client() -> None:
            nonlocal streams
            while time.monotonic() < stop:
                async for _ in events(await calls.stream(request), "bench"):
                    pass
                streams += 1

        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(client() for _ in range(concurrency)))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        garbage = gc.collect()
        await transport.close()
        return {"streams": streams, "cpu_ms_per_stream": cpu * 1000 / max(1, streams),
                "cyclic_garbage_per_stream": garbage / max(1, streams)}

    return uvloop.run(run())


def cell(base_url: str, concurrency: int, seconds: float, threshold: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.stream_layers", "--child", base_url, str(concurrency),
                          str(seconds), str(threshold)], cwd=REPO, capture_output=True, text=True, check=True)
    measured: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_layers", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="16,256")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--thresholds", default="50000,off", help="first-generation thresholds; off: none")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        base_url, concurrency, seconds, threshold = args.child
        print(json.dumps(child(base_url, int(concurrency), float(seconds), int(threshold))))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    thresholds = {t: OFF if t == "off" else int(t) for t in args.thresholds.split(",")}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with fake_upstream(stream_chunks=args.chunks) as base_url:
        for repeat in range(args.repeats):
            for name, threshold in thresholds.items():
                for level in levels if repeat % 2 == 0 else levels[::-1]:
                    measured = cell(base_url, level, args.seconds, threshold)
                    results.setdefault((name, level), []).append(measured)
                    print(f"  repeat {repeat + 1}: threshold {name}, {level} concurrent: "
                          f"{measured['cpu_ms_per_stream']:.3f} ms CPU per stream, {measured['streams']:.0f} streams, "
                          f"{measured['cyclic_garbage_per_stream']:.2f} cyclic garbage objects per stream",
                          file=sys.stderr, flush=True)
    print("\n| collector threshold | " + " | ".join(f"CPU ms per stream at {c}" for c in levels)
          + f" | {levels[-1]} vs {levels[0]} | cyclic garbage per stream |")
    print("|---|" + "---|" * (len(levels) + 2))
    for name in thresholds:
        medians = [statistics.median(r["cpu_ms_per_stream"] for r in results[(name, c)]) for c in levels]
        garbage = statistics.median(r["cyclic_garbage_per_stream"] for c in levels for r in results[(name, c)])
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in medians)
              + f" | {medians[-1] / medians[0]:.2f}× | {garbage:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
