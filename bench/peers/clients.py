"""The measurements wrk cannot make: time to first token of a stream, and a model's tokens per second.

TTFT: one stream at a time (no queueing, so the number is the system's own added latency), time
from sending the request to the first ``data:`` event of the answer; the stream must then end with
``data: [DONE]`` or the request counts as an error. Tokens/s: closed-loop chat completions at a given
concurrency; the completion tokens (``usage``) of the answers finished inside the window, per second.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.peers.systems import Target


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0–100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * int(q) // 100) - 1)]


@dataclass
class Ttft:
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {"n": len(self.ttft_ms), "p50_ms": r(percentile(self.ttft_ms, 50)),
                "p99_ms": r(percentile(self.ttft_ms, 99)), "total_p50_ms": r(percentile(self.total_ms, 50)),
                "errors": self.errors}


async def _ttft(target: Target, seconds: float, max_requests: int) -> Ttft:
    result = Ttft()
    body = json.dumps(target.body(stream=True)).encode()
    headers = {"Content-Type": "application/json", **target.headers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and len(result.ttft_ms) < max_requests:
            sent, first, error = time.perf_counter(), None, "incomplete_stream"
            try:
                async with session.post(target.url, data=body, headers=headers) as answer:
                    if answer.status != 200:
                        await answer.read()
                        error = str(answer.status)
                    else:
                        async for line in answer.content:
                            if first is None and line.startswith(b"data:"):
                                first = time.perf_counter()
                            if line.startswith(b"data: [DONE]"):
                                error = ""
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            if error or first is None:
                result.errors[error or "no_data"] = result.errors.get(error or "no_data", 0) + 1
                if sum(result.errors.values()) >= 20:
                    break  # a system that cannot stream: do not spend the whole window on it
                continue
            result.ttft_ms.append((first - sent) * 1000)
            result.total_ms.append((time.perf_counter() - sent) * 1000)
    return result


def ttft(target: Target, seconds: float, max_requests: int = 2000) -> Ttft:
    return asyncio.run(_ttft(target, seconds, max_requests))


@dataclass
class TokenRate:
    concurrency: int
    seconds: float
    tokens: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "seconds": self.seconds, "tokens": self.tokens,
                "requests": self.requests, "tokens_per_s": round(self.tokens_per_s, 2), "errors": self.errors,
                "p50_ms": round(statistics.median(self.latencies_ms), 1) if self.latencies_ms else None}


async def _tokens(url: str, body: dict[str, Any], concurrency: int, seconds: float, warmup: float) -> TokenRate:
    rate = TokenRate(concurrency, seconds)
    payload = json.dumps(body).encode()
    begun = time.perf_counter()
    start, end = begun + warmup, begun + warmup + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while (sent := time.perf_counter()) < end:
            try:
                async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as answer:
                    data = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                rate.errors[type(exc).__name__] = rate.errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.1)
                continue
            done = time.perf_counter()
            if not start <= done < end:
                continue
            if status != 200:
                rate.errors[str(status)] = rate.errors.get(str(status), 0) + 1
                continue
            rate.tokens += int(json.loads(data)["usage"]["completion_tokens"])
            rate.requests += 1
            rate.latencies_ms.append((done - sent) * 1000)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        _, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def tokens_per_s(url: str, body: dict[str, Any], concurrency: int, seconds: float, warmup: float = 2) -> TokenRate:
    """Closed-loop chat completions on ``url``: completion tokens finished inside the window, per second."""
    return asyncio.run(_tokens(url, body, concurrency, seconds, warmup))
