"""Tools on a local model, without a model: plans, grammars, conversation, reading calls back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.config import LlamaCppModel
from deployments.core import toolcalls
from deployments.core.localchat import LocalChat
from deployments.errors import InvalidRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
MODEL = LlamaCppModel(provider="llamacpp", name="local")


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "local", "messages": ASK, **fields}


def refused(fields: dict[str, Any]) -> str | None:
    with pytest.raises(InvalidRequest) as caught:
        LocalChat.of(body(**fields), MODEL)
    return caught.value.param


def test_modes() -> None:
    assert toolcalls.plan(body(), "local").mode == "none"
    assert toolcalls.plan(body(tools=[WEATHER]), "local").mode == "auto"
    assert toolcalls.plan(body(tools=[WEATHER], tool_choice="none"), "local").calls is False
    named = toolcalls.plan(body(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                     "function": {"name": "get_time"}}), "local")
    assert named.mode == "required" and [f["name"] for f in named.functions] == ["get_time"]


def test_required_grammar_is_only_the_call() -> None:
    gbnf = toolcalls.plan(body(tools=[WEATHER, TIME], tool_choice="required"), "local").gbnf()
    assert gbnf is not None and "get_weather" in gbnf and "get_time" in gbnf


def test_auto_starts_free_and_has_the_call_grammar_for_a_call() -> None:
    tool_plan = toolcalls.plan(body(tools=[WEATHER]), "local")
    assert tool_plan.probes and tool_plan.gbnf() is None
    gbnf = tool_plan.call_gbnf()
    assert gbnf is not None and "get_weather" in gbnf
    from llama_cpp.llama_grammar import LlamaGrammar

    LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp parses it


def test_defs_move_to_the_root() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    schema = toolcalls.plan(body(tools=[tool], tool_choice="required"), "local").schema
    assert schema is not None and schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["properties"]["arguments"]


def test_hostile_parameters_are_a_400_naming_them() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 100_000}}}}}
    assert (refused({"tools": [tool]}) or "").startswith("tools[0].function.parameters")
    negated = {"type": "function", "function": {"name": "f", "parameters": {"not": {"type": "string"}}}}
    assert refused({"tools": [negated]}) == "tools[0].function.parameters.not"


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"top_k": 5}, "top_k"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x", "audio": {}}]}, "messages[0].audio"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0].tool_call_id"),
])
def test_what_a_local_model_cannot_honour_is_named(fields: dict[str, Any], param: str) -> None:
    assert refused(fields) == param


def test_choices_sample_with_successive_seeds() -> None:
    chat = LocalChat.of(body(n=3, seed=2**32 + 5), MODEL)
    assert [k["seed"] for k in chat.kwargs] == [5, 6, 7]
    assert [k["seed"] for k in LocalChat.of(body(n=2), MODEL).kwargs] == [MODEL.seed, MODEL.seed + 1]


def test_second_turn_shows_call_and_result() -> None:
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    chat = LocalChat.of(body(messages=messages, tools=[WEATHER]), MODEL)
    shown = chat.kwargs[0]["messages"]
    assert shown[0]["role"] == "system" and "get_weather" in shown[0]["content"]
    assert json.loads(shown[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert shown[3]["role"] == "user" and "sunny" in shown[3]["content"] and "call_1" in shown[3]["content"]


def test_reading_a_call_back() -> None:
    tool_plan = toolcalls.plan(body(tools=[WEATHER]), "local")
    choice = {"index": 0, "message": {"role": "assistant", "content": '{"name": "get_weather", '
                                      '"arguments": {"city": "Paris"}}'}, "finish_reason": "stop"}
    called = toolcalls.as_tool_call(choice, tool_plan)
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] is None
    call = called["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    text = {"index": 0, "message": {"role": "assistant", "content": "It is sunny."}, "finish_reason": "stop"}
    assert toolcalls.as_tool_call(text, tool_plan) == text


@pytest.mark.parametrize("pieces", [
    ['{"name": "get_weather", "arguments": {"city": "Paris"}}'],
    ['{"', 'name', '": "', 'get_', 'weather', '", "arguments": {', '"city', '": "', 'Par', 'is"', '}', '}'],
    [' {"name":"get_weather","arguments":{"city":"Paris"}} ', ''],
])
def test_streamed_call_reassembles(pieces: list[str]) -> None:
    stream = toolcalls.CallStream(toolcalls.plan(body(tools=[WEATHER]), "local"))
    deltas = [d for piece in pieces for d in stream.feed(piece)]
    last, reason = stream.finish("stop")
    deltas += last
    assert reason == "tool_calls"
    head = deltas[0]["tool_calls"][0]
    assert head["function"]["name"] == "get_weather" and head["id"].startswith("call_")
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"}
    assert all("content" not in d for d in deltas)


def test_streamed_text_passes_through() -> None:
    stream = toolcalls.CallStream(toolcalls.plan(body(tools=[WEATHER]), "local"))
    deltas = stream.feed(" ") + stream.feed("Hello") + stream.feed(" there")
    last, reason = stream.finish("stop")
    assert "".join(d["content"] for d in deltas + last) == " Hello there" and reason == "stop"
