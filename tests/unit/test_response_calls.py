"""ResponseCalls — /v1/responses on the one model-call path — with fake workers (no Ray): forwarded to a
model whose upstream speaks the Responses API, translated through chat for the others, fallbacks between
the two, and metering of both (a real Meter, tests.fakes.metering)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments import errors
from deployments.config import OpenAIModel
from deployments.core.tokens import response_prompt_tokens
from deployments.model_calls import ModelCalls
from deployments.response_calls import ResponseCalls
from deployments.schemas import ModelCall
from deployments.schemas.calls import BodyCall
from deployments.schemas.responses import ResponseCreate
from tests.fakes.metering import Metered, metered
from tests.fakes.workers import USAGE, FakeWorkers, relayed, response_events
from tests.unit.test_model_calls import run


def model(name: str, api: str = "chat", *fallbacks: str, **settings: Any) -> OpenAIModel:
    return OpenAIModel(provider="openai", name=name, base_url="http://127.0.0.1:1/v1", upstream_api=api,
                       fallback_models=list(fallbacks), **settings)  # type: ignore[arg-type]


# `native` speaks the Responses API and falls back to `chatty` (chat only); `chatty` falls back to `native`.
MODELS = [model("native", "responses", "chatty"), model("chatty", "chat", "native"),
          model("small", "responses", max_output_tokens=100)]
WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def body(name: str = "native", **fields: Any) -> ResponseCreate:
    return ResponseCreate.model_validate({"model": name, "input": "hello", **fields})


def calls_on(workers: FakeWorkers, meter: Any = None) -> ResponseCalls:
    return ResponseCalls(ModelCalls(MODELS, workers, meter))


def test_a_forwarding_model_gets_the_body_as_sent_and_its_answer_is_relayed() -> None:
    workers = FakeWorkers()
    answer = run(calls_on(workers).create(body(reasoning={"effort": "low"}, include=["x"], metadata={"a": "b"})))
    assert answer["id"] == "resp_upstream" and answer["output"][0]["content"][0]["text"] == "Hello!"
    ((name, call),) = workers.calls
    assert name == "native" and isinstance(call, BodyCall)
    assert call.body == {"model": "native", "input": "hello", "reasoning": {"effort": "low"}, "include": ["x"],
                         "metadata": {"a": "b"}, "store": False}


def test_a_chat_model_gets_the_translated_call() -> None:
    workers = FakeWorkers()
    answer = run(calls_on(workers).create(body("chatty", instructions="Be brief.")))
    ((name, call),) = workers.calls
    assert name == "chatty" and isinstance(call, ModelCall)
    assert [m.role for m in call.request.messages] == ["system", "user"]
    assert answer["id"].startswith("resp_") and answer["id"] != "resp_upstream"
    assert answer["output"][0]["content"][0]["text"] == "Hello!" and answer["usage"]["total_tokens"] == 10


def test_a_failing_forwarding_model_falls_back_to_a_chat_model_translated() -> None:
    workers = FakeWorkers({"native": [errors.UpstreamError("HTTP 500")]})
    answer = run(calls_on(workers).create(body()))
    assert workers.models_called() == ["native", "chatty"]
    assert isinstance(workers.calls[1][1], ModelCall) and answer["model"] == "chatty"
    assert answer["object"] == "response" and answer["output"][0]["content"][0]["text"] == "Hello!"
    # And the other way round: a chat model's failure falls back to forwarding.
    workers = FakeWorkers({"chatty": [errors.UpstreamTimeout("slow")]})
    assert run(calls_on(workers).create(body("chatty")))["id"] == "resp_upstream"
    assert isinstance(workers.calls[1][1], BodyCall)


def test_a_fallback_the_request_cannot_go_to_is_skipped() -> None:
    # `reasoning` has no chat translation: `chatty` cannot take it, so `native`'s error is the answer.
    workers = FakeWorkers({"native": [errors.UpstreamError("HTTP 500")]})
    with pytest.raises(errors.UpstreamError):
        run(calls_on(workers).create(body(reasoning={"effort": "low"})))
    assert workers.models_called() == ["native"]
    # For the model asked for, it is a 400 naming the field; nothing is sent.
    workers = FakeWorkers()
    with pytest.raises(errors.InvalidRequest) as caught:
        run(calls_on(workers).create(body("chatty", reasoning={"effort": "low"})))
    assert caught.value.param == "reasoning" and workers.calls == []


@pytest.mark.parametrize(("fields", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"max_output_tokens": 101}, "max_output_tokens"),
])
def test_stateful_fields_and_a_too_long_output_are_refused_before_forwarding(fields: dict[str, Any],
                                                                            param: str) -> None:
    workers = FakeWorkers()
    with pytest.raises(errors.InvalidRequest) as caught:
        run(calls_on(workers).create(body("small", **fields)))
    assert caught.value.param == param and workers.calls == []
    assert run(calls_on(workers).create(body("small", background=False, max_output_tokens=100)))  # both sides


def test_a_forwarded_stream_is_relayed_event_for_event() -> None:
    workers = FakeWorkers()

    async def go() -> list[Any]:
        return relayed([e async for e in await calls_on(workers).stream(body(stream=True))])

    assert run(go()) == response_events("native", workers.chunks, USAGE)
    assert isinstance(workers.calls[0][1], BodyCall)


def test_a_stream_falls_back_to_a_chat_model_and_is_translated_into_events() -> None:
    workers = FakeWorkers({"native": [errors.UpstreamError("HTTP 500")]})

    async def go() -> list[Any]:
        return relayed([e async for e in await calls_on(workers).stream(body(stream=True))])

    events = run(go())
    types = [e["type"] for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-1] == "response.completed" and events[-1]["response"]["model"] == "chatty"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_translated_stream_names_the_responses_field_in_a_late_error() -> None:
    late = errors.InvalidRequest("bad", param="response_format.json_schema.schema.x")
    workers = FakeWorkers({"chatty": [[{"choices": [{"index": 0, "delta": {"content": "a"}}]}, late]]})

    async def go() -> list[Any]:
        return relayed([e async for e in await calls_on(workers).stream(body("chatty", stream=True))])

    assert run(go())[-1].param == "text.format.schema.x"


# -- metering ----------------------------------------------------------------------------------------


def test_a_forwarded_response_is_billed_with_the_upstreams_usage(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        calls = calls_on(FakeWorkers(), m.meter)
        await calls.create(body(max_output_tokens=50), key, wait_s=1)
        events = relayed([e async for e in await calls.stream(body(stream=True), key, wait_s=1)])
        assert events[-1]["type"] == "response.completed"
        (row,) = await m.usage(key)
        assert (row["model"], row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
            "native", 2, 2 * USAGE.prompt_tokens, 2 * USAGE.completion_tokens)
        assert await m.settled(key) == 2 * USAGE.total_tokens

    metered(tmp_path, scenario)


def test_an_abandoned_forwarded_stream_is_billed_what_was_relayed(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        workers = FakeWorkers(chunks=("x" * 40, "y", "z"))
        relay = await calls_on(workers, m.meter).stream(body(stream=True), key, wait_s=1)
        assert [e["type"] for e in await relay.__anext__()] == ["response.created"]
        assert [e.get("delta") for e in await relay.__anext__()] == ["x" * 40, "y", "z", None]  # together
        await relay.aclose()  # the client hung up before the stream's end
        assert workers.streams[0].cancelled
        (row,) = await m.usage(key)
        assert row["completion_tokens"] == 11  # 42 characters, 4 a token
        assert row["prompt_tokens"] == response_prompt_tokens({"model": "native", "input": "hello", "stream": True})

    metered(tmp_path, scenario)


def test_the_estimate_counts_the_tools(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=1_000_000)
        calls = calls_on(FakeWorkers({"native": ["hang"]}), m.meter)
        with_tools = body(tools=[WEATHER], max_output_tokens=10)
        plan = calls.plan(with_tools)
        assert plan.prompt > calls.plan(body(max_output_tokens=10)).prompt + 10
        task = asyncio.create_task(calls.create(with_tools, key, wait_s=1))
        assert await m.booked(key) == calls.estimate(with_tools, plan) == plan.prompt + 10
        task.cancel()

    metered(tmp_path, scenario)
