"""Upstream (`provider: openai`) models against a real fake upstream that injects faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.fixtures import ServeApp
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

HELLO = [{"role": "user", "content": "hello"}]


def test_completion_passes_through(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(model="fake", messages=HELLO, max_tokens=5, seed=3)
    assert reply.model == "fake"  # our name, not the upstream's
    assert reply.choices[0].message.content == "echo: hello"
    assert app.upstream.stats()["calls"] == 1


def test_unknown_fields_reach_the_upstream(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(
        model="fake", messages=HELLO, extra_body={"top_k": 5, "logit_bias": {"1": 2}}
    )
    assert reply.choices[0].message.content


def test_stream_passes_through_with_usage(app: ServeApp) -> None:
    chunks = list(
        app.client().chat.completions.create(
            model="fake", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_upstream_429_is_429_with_retry_after(app: ServeApp) -> None:
    app.upstream.configure(mode="rate_limit", retry_after=7)
    with pytest.raises(openai.RateLimitError) as caught:
        app.client().chat.completions.create(model="fake", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "7"
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_rate_limited"


def test_upstream_500_is_502_without_internals(app: ServeApp) -> None:
    app.upstream.configure(mode="error")
    with pytest.raises(openai.InternalServerError) as caught:
        app.client().chat.completions.create(model="fake", messages=HELLO)
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_error"
    assert "Traceback" not in str(body) and "openai." not in str(body)


def test_transient_errors_are_retried_once_by_one_layer(app: ServeApp) -> None:
    app.upstream.configure(mode="error", fail_first_n=2)
    reply = app.client().chat.completions.create(model="fake-retry", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    # two failures + one success: no second retry layer multiplying calls
    assert app.upstream.stats()["calls"] == 3


def test_hanging_upstream_is_504_within_the_timeout(app: ServeApp) -> None:
    app.upstream.configure(mode="hang")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        app.client(timeout=30).chat.completions.create(model="fake-short", messages=HELLO)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert 1.5 <= elapsed < 10, elapsed  # fake-short has timeout_s: 2


def test_slow_upstream_within_timeout_succeeds(app: ServeApp) -> None:
    app.upstream.configure(mode="slow", delay_s=0.5)
    reply = app.client().chat.completions.create(model="fake-short", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"


def test_dropped_stream_raises_in_the_client(app: ServeApp) -> None:
    app.upstream.configure(mode="drop_stream")
    stream = app.client().chat.completions.create(model="fake", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "upstream" in str(caught.value.message)


def test_64_concurrent_requests_all_succeed(app: ServeApp) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60)
        async with client:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="fake", messages=[{"role": "user", "content": f"n{i}"}]
                    )
                    for i in range(64)
                )
            )
        return [r.choices[0].message.content or "" for r in replies]

    app.upstream.configure(mode="ok", latency_ms=50)
    contents = asyncio.run(run())
    assert sorted(contents) == sorted(f"echo: n{i}" for i in range(64))
    assert app.upstream.stats()["calls"] == 64


def test_client_disconnect_closes_the_upstream_stream(app: ServeApp) -> None:
    app.upstream.configure(mode="stall_stream")
    body = {"model": "fake", "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{app.base_url}/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk read; now hang up mid-stream
    assert app.upstream.stats()["calls"] == 1
    # The gateway cancels the worker's generator, which closes the upstream connection.
    wait_for(lambda: app.upstream.stats()["in_flight"] == 0, timeout_s=15, message="the upstream stream to close")
