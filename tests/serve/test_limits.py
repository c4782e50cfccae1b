"""Shared upstream limits, 429 pauses, circuit breaker and fallback, on the real app."""

from __future__ import annotations

import asyncio
import bisect
import time

import openai
import pytest

from deployments.limits.pacing import window_capacity
from tests.fixtures import LIMITED_RPM, ServeApp
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

HELLO = [{"role": "user", "content": "hello"}]


async def closed_loop(app: ServeApp, model: str, concurrency: int, seconds: float) -> tuple[int, list[str]]:
    """``concurrency`` clients sending back to back for ``seconds``; returns (ok, error codes)."""
    client = openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60)
    ok = 0
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    async def one_client() -> None:
        nonlocal ok
        while time.monotonic() < stop_at:
            try:
                await client.chat.completions.create(model=model, messages=HELLO)
                ok += 1
            except openai.APIStatusError as exc:
                errors.append(str(exc.status_code))
                await asyncio.sleep(0.2)

    async with client:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return ok, errors


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def test_rpm_holds_across_four_replicas(app: ServeApp) -> None:
    """4 worker replicas, offered ~3× the limit: every window stays within the shared budget."""
    rate = LIMITED_RPM / 60  # 5 calls/s
    app.upstream.configure(mode="ok", latency_ms=20)
    started = time.time()
    ok, errors = asyncio.run(closed_loop(app, "fake-limited", concurrency=16, seconds=12))
    calls = [t for t in app.upstream.stats()["call_times"] if t >= started]
    assert ok > 0
    # Pacing holds at every scale: for any window W, calls <= burst capacity + rate * W. With W = 60 s
    # that is the per-minute limit plus 0.5%; shorter windows check it without a minute-long test.
    capacity = window_capacity(LIMITED_RPM)
    for window in (1.0, 5.0, 10.0):
        assert max_in_window(calls, window) <= capacity + rate * window + 1, window
    # The limit is used, not wasted: close to the rate over the run.
    assert len(calls) >= rate * 12 * 0.8
    # Waiting for a slot is not an error; nothing failed.
    assert errors == []


def test_upstream_429_pauses_every_replica(app: ServeApp) -> None:
    app.upstream.configure(mode="rate_limit", retry_after=2, fail_first_n=1)
    started = time.time()
    ok, errors = asyncio.run(closed_loop(app, "fake-limited", concurrency=8, seconds=4))
    times = sorted(t for t in app.upstream.stats()["call_times"] if t >= started)
    # The first call got 429 + Retry-After: 2; no replica called again during the pause.
    assert len(times) >= 2
    assert times[1] - times[0] >= 1.9
    assert ok > 0 and set(errors) <= {"429"}


def test_429_storm_gives_clients_a_clear_answer_not_a_hang(app: ServeApp) -> None:
    app.upstream.configure(mode="rate_limit", retry_after=3)
    client = app.client(timeout=60)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fake", messages=HELLO)
    assert int(caught.value.response.headers["retry-after"]) == 3
    # During the pause, callers whose deadline allows it wait it out; the rest get 429 at once.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fake-short", messages=HELLO)
    assert time.monotonic() - started < 5
    # The model-wide pause is the fixture's to wait out (tests/fixtures.py settle).


def test_circuit_opens_after_failures_and_probes_later(app: ServeApp) -> None:
    app.upstream.configure(mode="error")
    client = app.client()
    for _ in range(3):  # threshold 3 (one replica)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="fake-breaker", messages=HELLO)
    calls = app.upstream.stats()["calls"]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="fake-breaker", messages=HELLO)
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "circuit_open"
    assert "retry-after" in caught.value.response.headers
    assert app.upstream.stats()["calls"] == calls  # failed fast: the upstream was not called
    app.upstream.configure(mode="ok")

    def probe() -> bool:  # cooldown_s: 2 → then one probe goes through and closes the circuit
        try:
            return bool(client.chat.completions.create(model="fake-breaker", messages=HELLO).choices)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and app.upstream.stats()["calls"] == calls  # still failing fast
            return False

    wait_for(probe, timeout_s=15, interval_s=0.2, message="the circuit to close")
    assert client.chat.completions.create(model="fake-breaker", messages=HELLO).choices


def test_fallback_model_serves_and_says_so(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(model="fake-dead", messages=HELLO)
    assert reply.model == "fake"
    assert reply.choices[0].message.content == "echo: hello"
    chunks = list(app.client().chat.completions.create(model="fake-dead", messages=HELLO, stream=True))
    assert {c.model for c in chunks} == {"fake"}


def test_rpm_holds_when_the_limiter_is_killed_mid_run(app: ServeApp) -> None:
    """The RateLimiter replica dies mid-run: workers fail closed until Serve replaces it, and the
    replacement starts with empty buckets, so no window goes over the budget."""
    import threading

    from tests.serve.test_task_faults import kill_replica

    rate = LIMITED_RPM / 60
    app.upstream.configure(mode="ok", latency_ms=20)
    started = time.time()
    killer = threading.Timer(4.0, kill_replica, args=(app, "RateLimiter"))
    killer.start()
    try:
        ok, errors = asyncio.run(closed_loop(app, "fake-limited", concurrency=16, seconds=20))
    finally:
        killer.join()
    calls = [t for t in app.upstream.stats()["call_times"] if t >= started]
    assert ok > 0
    capacity = window_capacity(LIMITED_RPM)
    for window in (1.0, 5.0, 10.0):
        assert max_in_window(calls, window) <= capacity + rate * window + 1, window
    # While no limiter answers, callers get a clear 503 (or wait it out) — never an unmetered call.
    assert set(errors) <= {"503"}
