"""The Responses API over chat, without Ray: request translation, response objects, event order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.core import responses
from deployments.errors import InvalidRequest
from deployments.schemas.responses import ResponseCreate

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def create(**fields: Any) -> ResponseCreate:
    return ResponseCreate.model_validate({"model": "m", "input": "hi", **fields})


def test_string_input_and_instructions() -> None:
    chat = responses.to_chat(create(instructions="Be brief.", max_output_tokens=9, temperature=0.5))
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert chat.messages[0].content == "Be brief." and chat.max_tokens == 9 and chat.temperature == 0.5


def test_items_become_messages_calls_and_results() -> None:
    chat = responses.to_chat(create(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ], tools=[{"type": "function", "name": "w", "parameters": SCHEMA}], tool_choice={"type": "function", "name": "w"}))
    body = chat.model_dump(exclude_none=True)
    assert body["messages"][0]["content"] == "Weather ?"
    assert body["messages"][1]["tool_calls"][0]["id"] == "c1"
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert body["tools"][0]["function"]["name"] == "w" and body["tool_choice"]["function"]["name"] == "w"


def test_text_format_becomes_response_format() -> None:
    chat = responses.to_chat(create(text={"format": {"type": "json_schema", "name": "p", "schema": SCHEMA}}))
    assert chat.response_format is not None and chat.response_format.json_schema == {"name": "p", "schema": SCHEMA}


@pytest.mark.parametrize(("fields", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
])
def test_untranslatable_fields_are_named(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        responses.to_chat(create(**fields))
    assert caught.value.param == param


def test_store_true_is_refused() -> None:
    with pytest.raises(ValueError, match="not stored"):
        create(store=True)


@pytest.mark.parametrize(("chat", "theirs"), [
    ("max_tokens", "max_output_tokens"), ("messages", "input"),
    ("response_format.json_schema.schema.not", "text.format.schema.not"),
    ("tools[1].function.parameters.x", "tools[1].parameters.x"), ("tools.0.function.name", "tools[0].name"),
])
def test_params_are_renamed(chat: str, theirs: str) -> None:
    assert responses.param_of(chat) == theirs


def test_response_of_a_completion() -> None:
    completion = {"created": 1, "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                  "choices": [{"message": {"content": "Hello"}, "finish_reason": "length"}]}
    response = responses.from_chat(create(), completion)
    assert response["output"][0]["content"][0] == {"type": "output_text", "text": "Hello", "annotations": []}
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["total_tokens"] == 5


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_text_event_sequence() -> None:
    events = responses.ResponseEvents(create(stream=True))
    out = events.start()
    for piece in ({"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}):
        out += events.chunk(chunk(piece))
    out += events.chunk(chunk({}, "stop"))
    out += events.chunk({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    out += events.end()
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert out[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert out[-1]["response"]["usage"]["output_tokens"] == 2


def test_call_event_sequence() -> None:
    events = responses.ResponseEvents(create(stream=True))
    out = events.start()
    out += events.chunk(chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "w", "arguments": ""}}]}))
    out += events.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    out += events.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"))
    out += events.end()
    assert [e["type"] for e in out][2:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    item = out[-1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["call_id"] == "c" and json.loads(item["arguments"]) == {"a": 1}


# -- the capability: a model must declare `responses` ------------------------------------------


def test_a_model_without_responses_is_a_400_naming_model() -> None:
    from deployments.config import OpenAIModel
    from deployments.model_calls import ModelCalls
    from tests.fakes.workers import FakeWorkers
    from tests.unit.test_model_calls import run

    def upstream(name: str, *capabilities: str) -> OpenAIModel:
        return OpenAIModel(provider="openai", name=name, base_url="http://127.0.0.1:1/v1",
                           capabilities=list(capabilities))  # type: ignore[arg-type]

    calls = ModelCalls([upstream("chat-only", "chat"), upstream("both", "chat", "responses")], FakeWorkers())
    with pytest.raises(InvalidRequest) as caught:
        run(calls.complete(responses.to_chat(create(model="chat-only")), capability="responses"))
    assert caught.value.param == "model"
    with pytest.raises(InvalidRequest):
        run(calls.stream(responses.to_chat(create(model="chat-only", stream=True)), capability="responses"))
    answer = run(calls.complete(responses.to_chat(create(model="both")), capability="responses"))
    assert responses.from_chat(create(model="both"), answer)["output"][0]["content"][0]["text"]


def test_responses_batch_lines() -> None:
    from jobs.batchlines import LineError, parse_line

    def parsed(body: dict[str, Any]) -> Any:
        return parse_line(json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/responses", "body": body}), 1)

    assert type(parsed({"model": "m", "input": "x"})).__name__ == "BatchResponseLine"
    streaming = parsed({"model": "m", "input": "x", "stream": True})
    assert isinstance(streaming, LineError) and streaming.param == "body"
    stored = parsed({"model": "m", "input": "x", "store": True})
    assert isinstance(stored, LineError) and stored.param == "body.store"


def test_an_error_mid_stream_is_an_error_event_and_no_completed() -> None:
    import asyncio
    from collections.abc import AsyncGenerator

    from deployments.errors import Overloaded, PromptfleetError
    from deployments.gateway.responses_routes import events
    from deployments.response_calls import _translated

    async def chunks() -> AsyncGenerator[list[dict[str, Any]] | PromptfleetError, None]:
        yield [chunk({"content": "Hel"}), chunk({"content": "lo"})]
        yield Overloaded("Model 'm' is temporarily unavailable; retry shortly.", retry_after=1)

    async def collect() -> list[bytes]:
        return [text async for text in events(_translated(create(stream=True), chunks()), "req-1")]

    writes = asyncio.run(collect())
    # One write for the start, one for the events of the two chunks that came together, one for the error.
    assert len(writes) == 3
    sent = [event.decode() for event in b"".join(writes).split(b"\n\n")[:-1]]
    names = [text.split("\n")[0] for text in sent]
    assert names[-1] == "event: error" and "event: response.completed" not in names
    last = json.loads(sent[-1].split("\n")[1][len("data: "):])
    assert last["type"] == "error" and last["error"]["request_id"] == "req-1"
    assert last["sequence_number"] == len(sent) - 1


def test_batch_progress_counts_response_usage() -> None:
    from jobs.batchlines import Done, Progress

    progress = Progress(total=2, done_before=Done())
    progress.add_usage({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    progress.add_usage(responses.usage_of({"prompt_tokens": 4, "completion_tokens": 1}))
    assert (progress.prompt_tokens, progress.completion_tokens, progress.total_tokens) == (7, 3, 10)


def test_an_event_is_encoded_as_compact_json_with_non_ascii_as_utf8() -> None:
    from deployments.gateway.responses_routes import _sse

    event = {"type": "response.output_text.delta", "sequence_number": 3, "delta": "h\u00e9llo \u2713",
             "logprobs": [{"logprob": -0.25, "bytes": [104]}], "obfuscation": None}
    compact = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    assert _sse(event) == b"event: response.output_text.delta\ndata: " + compact + b"\n\n"
    assert json.loads(_sse(event).split(b"data: ")[1]) == event
