"""The measurements wrk cannot make: time to first token of a stream, and a model's tokens per second.

TTFT: one stream at a time (no queueing, so the number is the system's own added latency), time
from sending the request to the first ``data:`` event of the answer; the stream must then end with
``data: [DONE]`` or the request counts as an error. Tokens/s: closed-loop chat completions at a given
concurrency, after one unmeasured answer per client: the completion tokens (``usage``) generated in the
window, per second, an answer that straddles an edge of the window counted for its share of time inside.
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
    tokens: float = 0.0  # completion tokens; an answer cut by an edge of the window counts in part
    requests: int = 0  # answers finished inside the window
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "seconds": self.seconds, "tokens": round(self.tokens),
                "requests": self.requests, "tokens_per_s": round(self.tokens_per_s, 2), "errors": self.errors,
                "p50_ms": round(statistics.median(self.latencies_ms), 1) if self.latencies_ms else None}


def share_inside(sent: float, done: float, start: float, end: float) -> float:
    """The share of an answer's time (``sent`` to ``done``) inside the window ``start``–``end``.

    Its tokens count for that share: counting only whole answers finished inside the window made the
    total jump by a whole round of answers (eight same-length answers finish together), up or down
    with where the window's edges fell among the rounds."""
    if done <= sent:
        return 1.0 if start <= done < end else 0.0
    return max(0.0, min(done, end) - max(sent, start)) / (done - sent)


async def _tokens(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> TokenRate:
    rate = TokenRate(concurrency, seconds)
    payload = json.dumps(body).encode()

    async def ask(session: aiohttp.ClientSession) -> tuple[int, str]:
        """The answer's completion tokens, or why there is none."""
        try:
            async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as answer:
                data = await answer.read()
                if answer.status != 200:
                    return 0, str(answer.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await asyncio.sleep(0.1)
            return 0, type(exc).__name__
        return int(json.loads(data)["usage"]["completion_tokens"]), ""

    async def worker(session: aiohttp.ClientSession, start: float, end: float) -> None:
        while (sent := time.perf_counter()) < end:
            tokens, error = await ask(session)
            done = time.perf_counter()
            if error:
                rate.errors[error] = rate.errors.get(error, 0) + 1
                continue
            rate.tokens += tokens * share_inside(sent, done, start, end)
            if done < end:
                rate.requests += 1
                rate.latencies_ms.append((done - sent) * 1000)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        # Warm-up: one answer per client, so a model's slots hold the prompt before the window opens
        # (a closed loop of one prompt measures decoding with the prompt cached, not the first fill).
        await asyncio.gather(*(ask(session) for _ in range(concurrency)))
        start = time.perf_counter()
        end = start + seconds
        tasks = [asyncio.create_task(worker(session, start, end)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + 60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def tokens_per_s(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> TokenRate:
    """Closed-loop chat completions on ``url``: completion tokens generated inside the window, per second."""
    return asyncio.run(_tokens(url, body, concurrency, seconds))
