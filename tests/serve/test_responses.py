"""/v1/responses (issue 21, item 3) through the official client: text, structured output, tools,
streaming event order (sync and async), refused fields, and the same tenant rules as chat."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures import ServeApp
from tests.serve.test_tenant_metering import client as tenant_client
from tests.serve.test_tenant_metering import eventually, new_key, spend_budget

pytestmark = pytest.mark.serve

TEXT_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    "response.output_text.delta", "response.output_text.done", "response.content_part.done",
    "response.output_item.done", "response.completed",
]
PLACE = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                          "country": {"type": "string", "maxLength": 40}},
         "required": ["city", "country"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}


def collapsed(types: list[str]) -> list[str]:
    """Event types with runs of deltas folded into one."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def test_text_on_the_embedded_model(app: ServeApp) -> None:
    response = app.client().responses.create(model="smollm2", instructions="Answer briefly.",
                                             input="Say hello.", max_output_tokens=16, temperature=0.2)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "smollm2"
    assert response.output_text.strip()
    assert response.status in ("completed", "incomplete")
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_structured_output_on_the_embedded_model(app: ServeApp) -> None:
    response = app.client().responses.create(
        model="smollm2", input=[{"role": "user", "content": [{"type": "input_text", "text": "A big city, as JSON."}]}],
        text={"format": {"type": "json_schema", "name": "place", "schema": PLACE}}, max_output_tokens=80)
    jsonschema.validate(json.loads(response.output_text), PLACE)


def test_stream_event_order_sync(app: ServeApp) -> None:
    events = list(app.client().responses.create(model="smollm2", input="Say hello.", max_output_tokens=12,
                                                stream=True))
    types = [e.type for e in events]
    assert collapsed(types) in (TEXT_EVENTS, [*TEXT_EVENTS[:-1], "response.incomplete"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text  # type: ignore[union-attr]
    assert events[-1].response.usage.output_tokens > 0  # type: ignore[union-attr]


def test_stream_event_order_async_on_upstream(app: ServeApp) -> None:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = await client.responses.create(model="fake", input="hello there", stream=True)
            return [event async for event in stream]

    events = asyncio.run(run())
    assert collapsed([e.type for e in events]) == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "echo: hello there"


def test_stream_helper_of_the_client(app: ServeApp) -> None:
    with app.client().responses.stream(model="fake", input="hello there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "echo: hello there"


def test_upstream_translated_with_tools_and_results(app: ServeApp) -> None:
    client = app.client()
    first = client.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                    tool_choice="required")
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = client.responses.create(model="fake", tools=[WEATHER], input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.output[0].type == "message"
    json_reply = client.responses.create(model="fake", input="x", text={"format": {
        "type": "json_schema", "name": "place", "schema": PLACE}})
    jsonschema.validate(json.loads(json_reply.output_text), PLACE)


def test_tool_call_on_the_embedded_model_streamed(app: ServeApp) -> None:
    events = list(app.client().responses.create(model="smollm2", input="What is the weather in Paris?",
                                                tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                                max_output_tokens=60, stream=True))
    types = collapsed([e.type for e in events])
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    item = events[-1].response.output[0]  # type: ignore[union-attr]
    assert item.type == "function_call" and item.name == "get_weather"
    jsonschema.validate(json.loads(item.arguments), WEATHER["parameters"])


@pytest.mark.parametrize(("extra", "param"), [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"max_output_tokens": 10**9}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {"type": "string"}}}}},
     "text.format.schema.not"),
])
def test_unsupported_fields_are_a_400_naming_them(app: ServeApp, extra: dict[str, Any], param: str) -> None:
    for model in ("smollm2", "fake"):
        if model == "fake" and param.startswith("text.format"):
            continue  # an upstream judges the schemas it is sent
        body = {"model": model, "input": "hi", "max_output_tokens": 8, **extra}
        response = httpx.post(f"{app.base_url}/responses", json=body, timeout=60)
        assert response.status_code == 400, (model, response.text)
        assert response.json()["error"]["param"].startswith(param), (model, response.text)


def test_nothing_is_stored(app: ServeApp) -> None:
    with pytest.raises(openai.NotFoundError):
        app.client().responses.retrieve("resp_whatever")


def test_a_spent_budget_is_refused(app: ServeApp) -> None:
    key = new_key(app, token_budget=20)
    spend_budget(app, key["key"])
    calls_before = app.upstream.stats()["calls"]
    tenant = tenant_client(app, key["key"])
    with pytest.raises(openai.PermissionDeniedError):
        tenant.responses.create(model="fake", input="hello")
    with pytest.raises(openai.PermissionDeniedError):
        tenant.responses.create(model="fake", input="hello", stream=True)
    assert app.upstream.stats()["calls"] == calls_before
    # Under its budget, a key is served on the same route.
    assert tenant_client(app, new_key(app)["key"]).responses.create(model="fake", input="hi").output_text


def test_responses_lines_in_a_mixed_batch(app: ServeApp, tmp_path: Path) -> None:
    """`jobs.batch` (as `ray job submit` runs it, in-process here): chat and /v1/responses lines mixed,
    a structured response on the embedded model, and a refused field as that line's 400."""
    from jobs import batch
    from tests.serve.test_route_metering import line

    lines = [
        line("chat", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
        line("resp", "/v1/responses", {"model": "fake", "input": "hello"}),
        line("resp-json", "/v1/responses", {
            "model": "smollm2", "input": "A big city, as JSON.", "max_output_tokens": 80,
            "text": {"format": {"type": "json_schema", "name": "p", "schema": PLACE}}}),
        line("resp-refused", "/v1/responses", {"model": "fake", "input": "x", "reasoning": {"effort": "low"}}),
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    code = batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--errors", str(tmp_path / "errors.jsonl"), "--progress-every", "5"])
    assert code == 0
    out = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert out["chat"]["response"]["body"]["object"] == "chat.completion"
    body = out["resp"]["response"]["body"]
    assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "echo: hello"
    structured = out["resp-json"]["response"]["body"]["output"][0]["content"][0]["text"]
    jsonschema.validate(json.loads(structured), PLACE)
    failed = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "errors.jsonl").read_text().splitlines())}
    refused = failed["resp-refused"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "reasoning"


# -- forwarded to an upstream that speaks the Responses API (`fake-responses`: upstream_api: responses) ----


def keyless_usage(app: ServeApp, model: str) -> tuple[int, int, int]:
    """Requests, input and output tokens recorded under `anonymous` (the main app has auth off)."""
    rows = httpx.get(f"{app.base_url}/usage", params={"key_id": "anonymous", "limit": 1000}, timeout=30).json()["data"]
    mine = [r for r in rows if r["model"] == model]
    return (sum(r["requests"] for r in mine), sum(r["prompt_tokens"] for r in mine),
            sum(r["completion_tokens"] for r in mine))


def billed(app: ServeApp, before: tuple[int, int, int], usage: Any) -> bool | None:
    """Whether one more call was recorded with at least the upstream's own counts (``usage``)."""
    now = keyless_usage(app, "fake-responses")
    grown = (now[0] - before[0], now[1] - before[1], now[2] - before[2])
    return (grown[0] >= 1 and grown[1] >= usage.input_tokens and grown[2] >= usage.output_tokens) or None


def test_forwarded_sync_relays_the_upstreams_response_and_bills_its_usage(app: ServeApp) -> None:
    # 300 words: the fake counts 304 input tokens (a word a token, 4 a message); the settle probes between
    # tests are far smaller, so the growth below is this call's.
    words = " ".join(["word"] * 300)
    before = keyless_usage(app, "fake-responses")
    raw = app.client().responses.with_raw_response.create(model="fake-responses", input=words,
                                                          reasoning={"effort": "low"}, metadata={"k": "v"})
    response = raw.parse()
    assert raw.headers["x-request-id"]
    # The upstream's own object (its ids), relayed; the model named as configured.
    assert response.id.startswith("resp_fake") and response.model == "fake-responses"
    assert response.output_text == f"echo: {words}"[:200] and response.metadata == {"k": "v"}
    assert response.usage is not None and response.usage.input_tokens == 304
    stats = app.upstream.stats()
    assert stats["calls_by_route"] == {"responses": 1}
    sent = stats["last_bodies"]["responses"]
    assert sent["reasoning"] == {"effort": "low"} and sent["store"] is False and sent["model"] == "fake-model"
    eventually(lambda: billed(app, before, response.usage), what="the upstream's usage billed")


def test_forwarded_stream_relays_the_event_order_async_and_bills_the_completed_usage(app: ServeApp) -> None:
    words = " ".join(["word"] * 300)
    before = keyless_usage(app, "fake-responses")

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = await client.responses.create(model="fake-responses", input=words, stream=True)
            return [event async for event in stream]

    events = asyncio.run(run())
    assert collapsed([e.type for e in events]) == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.id.startswith("resp_fake") and final.model == "fake-responses"
    assert final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert app.upstream.stats()["calls_by_route"] == {"responses": 1}
    eventually(lambda: billed(app, before, final.usage), what="the stream's usage billed")


def test_forwarded_stream_with_the_sync_client_and_a_tool_call(app: ServeApp) -> None:
    events = list(app.client().responses.create(model="fake-responses", input="Weather in Paris?", stream=True,
                                                tools=[WEATHER], tool_choice="required"))  # type: ignore[list-item]
    assert collapsed([e.type for e in events]) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    item = events[-1].response.output[0]  # type: ignore[union-attr]
    assert item.type == "function_call" and item.name == "get_weather"
    jsonschema.validate(json.loads(item.arguments), WEATHER["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_500_falls_back_to_a_chat_only_model_translated(app: ServeApp, stream: bool) -> None:
    app.upstream.configure("error", fail_first_n=1)  # the forwarded call gets the 500; `fake`'s chat call, ok
    client = app.client()
    if stream:
        events = list(client.responses.create(model="fake-responses", input="hello there", stream=True))
        assert collapsed([e.type for e in events]) == TEXT_EVENTS
        response = events[-1].response  # type: ignore[union-attr]
    else:
        response = client.responses.create(model="fake-responses", input="hello there")
    assert response.model == "fake" and not response.id.startswith("resp_fake")  # made by translation
    assert response.output_text == "echo: hello there"
    assert app.upstream.stats()["calls_by_route"] == {"responses": 1, "chat": 1}


def test_forwarded_errors_have_the_openai_shape(app: ServeApp) -> None:
    client = app.client()
    for field, value in (("previous_response_id", "resp_1"), ("conversation", "conv_1"), ("store", True)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="fake-responses", input="x", **{field: value})  # type: ignore[arg-type]
        assert caught.value.body["param"] == field  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="fake-responses", input="x", max_output_tokens=10**6)
    assert caught.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    assert app.upstream.stats()["calls"] == 0
    # A field only the Responses API has cannot go to the chat-only fallback: the upstream's 500 is the answer.
    app.upstream.configure("error", fail_first_n=1)
    with pytest.raises(openai.APIStatusError) as failed:
        client.responses.create(model="fake-responses", input="x", reasoning={"effort": "low"})
    assert failed.value.status_code == 502 and failed.value.body["type"]  # type: ignore[index]
    assert app.upstream.stats()["calls_by_route"] == {"responses": 1}
