"""The upstream provider in-process, with httpx2.MockTransport as the upstream."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable

import httpx2
import pytest

from deployments import errors
from deployments.config import OpenAIModel
from deployments.core.retry import BackoffPolicy
from deployments.providers.openai_compat import OpenAIProvider
from deployments.schemas import StreamEnd, Usage

Handler = Callable[[httpx2.Request], httpx2.Response]
OK = {"id": "x", "object": "chat.completion", "model": "up", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def provider(handler: Handler, **config: object) -> OpenAIProvider:
    settings: dict[str, object] = {"name": "m", "provider": "openai", "base_url": "http://127.0.0.1:1/v1",
                                   "upstream_model": "up", "timeout_s": 5, "max_retries": 2}
    settings.update(config)
    return OpenAIProvider(
        OpenAIModel.model_validate(settings),
        api_key="k",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        backoff=BackoffPolicy(base_s=0.01, cap_s=0.02, rng=random.Random(0)),
    )


def run(p: OpenAIProvider) -> dict[str, object]:
    async def go() -> dict[str, object]:
        try:
            return await p.chat(dict(BODY))
        finally:
            await p.close()
    return asyncio.run(go())


def test_body_passes_through_with_upstream_model_name() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        assert request.headers["authorization"] == "Bearer k"
        return httpx2.Response(200, json=OK)

    result = run(provider(handler))
    assert seen[0]["model"] == "up" and seen[0]["messages"] == BODY["messages"]
    assert result["model"] == "m"


def test_rate_limit_carries_retry_after_after_retries() -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(429, headers={"retry-after": "0.01"}, json={"error": {"message": "slow down"}})

    with pytest.raises(errors.UpstreamRateLimited) as caught:
        run(provider(handler))
    assert len(calls) == 3  # 1 + max_retries, never more
    assert caught.value.retry_after == pytest.approx(0.01)


def test_retry_after_beyond_the_deadline_is_not_waited_for() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(429, headers={"retry-after": "60"}, json={})

    started = time.monotonic()
    with pytest.raises(errors.UpstreamRateLimited):
        run(provider(handler, timeout_s=2))
    assert time.monotonic() - started < 1.5


def test_server_errors_are_retried_then_succeed() -> None:
    answers = iter([httpx2.Response(500, json={}), httpx2.Response(503, json={}), httpx2.Response(200, json=OK)])
    result = run(provider(lambda request: next(answers)))
    assert result["choices"]


def test_client_errors_pass_the_upstream_message_and_are_not_retried() -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(400, json={"error": {"message": "max_tokens too large", "param": "max_tokens"}})

    with pytest.raises(errors.InvalidRequest) as caught:
        run(provider(handler))
    assert caught.value.param == "max_tokens" and "max_tokens too large" in caught.value.message
    assert len(calls) == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_upstream_auth_and_routing_failures_are_502(status: int) -> None:
    with pytest.raises(errors.UpstreamError) as caught:
        run(provider(lambda request: httpx2.Response(status, json={"error": {"message": "secret detail"}})))
    assert "secret detail" not in caught.value.message


def test_connection_errors_become_502() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused")

    with pytest.raises(errors.UpstreamError):
        run(provider(handler, max_retries=1))


def test_read_timeout_becomes_504() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("slow")

    with pytest.raises(errors.UpstreamTimeout):
        run(provider(handler))


@pytest.mark.parametrize("header", ["inf", "nan", "-5", "1e400", "99999999999", "garbage"])
def test_untrustworthy_retry_after_is_capped_and_so_is_the_pause(header: str) -> None:
    p = provider(lambda request: httpx2.Response(429, headers={"retry-after": header}, json={}),
                 max_retries=0, max_retry_after_s=7)

    async def go() -> None:
        try:
            with pytest.raises(errors.UpstreamRateLimited) as caught:
                await p.chat(dict(BODY))
            assert caught.value.retry_after == 7 and caught.value.headers()["Retry-After"] == "7"
            assert 6 < p.guard.paused_until - time.monotonic() <= 7  # the model-wide pause is bounded too
        finally:
            await p.close()

    asyncio.run(go())


def test_a_pause_beyond_the_deadline_is_a_model_rate_limit_without_an_upstream_call() -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, json=OK)

    p = provider(handler, timeout_s=2)

    async def go() -> None:
        try:
            p.guard.rate_limited(10_000)  # capped at max_retry_after_s (60): still beyond the 2 s deadline
            with pytest.raises(errors.ModelRateLimited) as caught:
                await p.chat(dict(BODY))
            assert caught.value.retry_after is not None and caught.value.retry_after <= 60
        finally:
            await p.close()

    asyncio.run(go())
    assert calls == []


def sse_response(*events: dict[str, object]) -> httpx2.Response:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "up",
         "choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE_CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "up", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


@pytest.mark.parametrize("client_asked", [False, True])
def test_streams_always_ask_for_usage_and_hand_it_back_at_the_end(client_asked: bool) -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return sse_response(CHUNK, USAGE_CHUNK)

    p = provider(handler)
    body = {**BODY, "stream": True, **({"stream_options": {"include_usage": True}} if client_asked else {})}

    async def go() -> list[object]:
        try:
            return [item async for item in p.stream(body)]
        finally:
            await p.close()

    items = asyncio.run(go())
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert items[-1] == StreamEnd(usage=Usage(prompt_tokens=5, completion_tokens=1, total_tokens=6))
    chunks = [c for i in items if isinstance(i, list) for c in i]
    assert [bool(c.get("usage")) for c in chunks] == ([False, True] if client_asked else [False])
    assert all(c["model"] == "m" for c in chunks)


# -- /v1/responses forwarded (upstream_api: responses) -------------------------------------------------

RESPONSE = {"id": "resp_up", "object": "response", "model": "up", "status": "completed", "output": [],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}
RESPONSE_BODY = {"model": "m", "input": "hello", "reasoning": {"effort": "low"}, "store": False}


def event_stream(*events: dict[str, object]) -> httpx2.Response:
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


def respond(handler: Handler, stream: bool) -> object:
    p = provider(handler, capabilities=["responses"], upstream_api="responses")

    async def go() -> object:
        try:
            if stream:
                return [item async for item in p.respond_stream({**RESPONSE_BODY, "stream": True})]
            return await p.respond(dict(RESPONSE_BODY))
        finally:
            await p.close()

    return asyncio.run(go())


def test_a_response_is_forwarded_to_the_upstreams_responses_route() -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx2.Response(200, json=RESPONSE)

    answer = respond(handler, stream=False)
    assert seen == [("/v1/responses", {**RESPONSE_BODY, "model": "up", "stream": False})]
    assert isinstance(answer, dict) and answer["model"] == "m" and answer["usage"]["total_tokens"] == 7


def test_a_forwarded_stream_relays_events_and_ends_with_the_completed_usage() -> None:
    created = {"type": "response.created", "sequence_number": 0, "response": {**RESPONSE, "status": "in_progress",
                                                                              "usage": None}}
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "delta": "hi"}
    completed = {"type": "response.completed", "sequence_number": 2, "response": RESPONSE}
    streamed = respond(lambda request: event_stream(created, delta, completed), stream=True)
    assert isinstance(streamed, list)
    items = [*(event for events in streamed[:-1] for event in events), streamed[-1]]
    assert [i["type"] for i in items[:-1]] == [
        "response.created", "response.output_text.delta", "response.completed"]
    assert items[0]["response"]["model"] == items[2]["response"]["model"] == "m"
    assert items[1] == delta
    assert items[-1] == StreamEnd(usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7))


@pytest.mark.parametrize("kind", ["error", "response.failed"])
def test_an_upstream_error_event_ends_the_stream_in_our_words(kind: str) -> None:
    failed = {"type": kind, "sequence_number": 1, "message": "secret upstream detail",
              "response": {**RESPONSE, "status": "failed", "error": {"message": "secret upstream detail"}}}
    with pytest.raises(errors.UpstreamError) as caught:
        respond(lambda request: event_stream({"type": "response.created", "sequence_number": 0}, failed), stream=True)
    assert "secret" not in caught.value.message


def test_a_forwarded_call_is_retried_like_chat() -> None:
    answers = iter([httpx2.Response(500, json={"error": {"message": "boom"}}), httpx2.Response(200, json=RESPONSE)])
    assert respond(lambda request: next(answers), stream=False)["id"] == "resp_up"  # type: ignore[index]


def test_upstream_api_responses_needs_the_capability() -> None:
    with pytest.raises(ValueError, match="needs `responses` in capabilities"):
        OpenAIModel(provider="openai", name="m", base_url="http://h/v1", upstream_api="responses",
                    capabilities=["chat"])
    assert OpenAIModel(provider="openai", name="m", base_url="http://h/v1", upstream_api="responses").forwards_responses
