"""Chat, completed (issue 21, item 5): tools, n, seed and refused fields, through the official client,
on the embedded model (grammar-constrained calls) and on the fake upstream (passed through)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures import ServeApp

pytestmark = pytest.mark.serve

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMS}}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
               "required": ["timezone"]}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": TIME_PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def arguments_of(reply: Any, schema: dict[str, Any]) -> dict[str, Any]:
    call = reply.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return dict(arguments)


def test_tool_call_then_its_result(app: ServeApp) -> None:
    client = app.client()
    reply = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments_of(reply, WEATHER_PARAMS)
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    # Second turn: the call and its result go back; the model answers in text.
    second = client.chat.completions.create(
        model="smollm2", tools=[WEATHER], tool_choice="none", max_tokens=24,
        messages=[*ASK, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}])
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.tool_calls is None and (second.choices[0].message.content or "").strip()


def test_named_tool_choice_calls_that_function(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
    arguments_of(reply, TIME_PARAMS)


def earlier_call(number: int, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city, "unit": "celsius"})
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{number}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


# Two earlier turns in which the assistant called the tool: SmolLM2 then opens its answer with a call.
HISTORY = [
    {"role": "user", "content": "Weather in London?"}, earlier_call(1, "London"),
    {"role": "tool", "tool_call_id": "call_1", "content": "rain"}, {"role": "assistant", "content": "It rains."},
    {"role": "user", "content": "Weather in Rome?"}, earlier_call(2, "Rome"),
    {"role": "tool", "tool_call_id": "call_2", "content": "sun"}, {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Weather in Paris?"},
]


def test_auto_lets_the_model_choose_a_call_or_text(app: ServeApp) -> None:
    client = app.client()
    called = client.chat.completions.create(model="smollm2", messages=HISTORY, tools=[WEATHER], max_tokens=60,
                                            temperature=0)
    assert called.choices[0].finish_reason == "tool_calls"
    arguments_of(called, WEATHER_PARAMS)
    calls, finish = reassemble(list(client.chat.completions.create(
        model="smollm2", messages=HISTORY, tools=[WEATHER], max_tokens=60, temperature=0, stream=True)))
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMS)
    text = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                          tools=[WEATHER], max_tokens=12, temperature=0)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content


def test_tool_choice_none_answers_text(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],
                                                 tool_choice="none", max_tokens=16)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


def test_a_tool_result_must_answer_a_call(app: ServeApp) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        app.client().chat.completions.create(
            model="smollm2", tools=[WEATHER], max_tokens=8,
            messages=[*ASK, {"role": "tool", "tool_call_id": "call_nowhere", "content": "21"}])
    assert caught.value.body["param"] == "messages[1].tool_call_id"  # type: ignore[index]


def reassemble(chunks: list[Any]) -> tuple[dict[int, dict[str, str]], str | None]:
    """Tool calls from streamed deltas, as a client accumulates them (by index)."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return calls, finish


def test_streamed_tool_call_deltas_reassemble(app: ServeApp) -> None:
    chunks = list(app.client().chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, stream=True))
    calls, finish = reassemble(chunks)
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMS)
    assert sum(1 for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []) > 2  # in pieces


def test_streamed_tool_call_async_client(app: ServeApp) -> None:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = await client.chat.completions.create(
                model="smollm2", messages=ASK, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, stream=True)
            return [chunk async for chunk in stream]

    calls, finish = reassemble(asyncio.run(run()))
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMS)


def test_n_choices_and_seed_reproducibility(app: ServeApp) -> None:
    client = app.client()
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
           "temperature": 1.0, "n": 2}
    first = client.chat.completions.create(**ask, seed=1234)
    assert [c.index for c in first.choices] == [0, 1]
    assert all(c.message.content for c in first.choices)
    again = client.chat.completions.create(**ask, seed=1234)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert first.usage is not None and first.usage.completion_tokens >= 2
    chunks = list(client.chat.completions.create(**ask, seed=1234, stream=True))
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in (0, 1)}
    assert [streamed[0], streamed[1]] == [c.message.content for c in first.choices]


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"top_k": 4}, "top_k"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 100_000}}}}}]}, "tools[0].function.parameters"),
    ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}, "messages[0].audio"),
])
def test_what_the_local_model_cannot_honour_is_a_400_naming_it(
        app: ServeApp, extra: dict[str, Any], param: str) -> None:
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 4, **extra}
    for stream in (False, True):
        response = httpx.post(f"{app.base_url}/chat/completions", json={**body, "stream": stream}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"].startswith(param)


def test_upstream_tools_pass_through(app: ServeApp) -> None:
    client = app.client()
    reply = client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER], tool_choice="required")
    assert reply.choices[0].finish_reason == "tool_calls"
    arguments_of(reply, WEATHER_PARAMS)
    calls, finish = reassemble(list(client.chat.completions.create(
        model="fake", messages=ASK, tools=[WEATHER], stream=True)))
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    # Fields a local model refuses go upstream unchanged.
    assert client.chat.completions.create(model="fake", messages=ASK, logprobs=True, top_logprobs=2).choices
