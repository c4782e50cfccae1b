"""Request models: tolerant of unknown OpenAI fields, strict about what we cannot honour."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.schemas import MAX_TOKENS_LIMIT, ChatCompletionRequest, KeyCreate, TaskRunRequest, Usage
from deployments.schemas.base import MAX_JSON_DEPTH, nested_deeper_than

MESSAGES = [{"role": "user", "content": "hi"}]


def test_unknown_fields_are_kept_for_upstreams() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "logit_bias": {"1": 1}, "top_k": 3}
    )
    dumped = request.model_dump(exclude_unset=True)
    assert dumped["top_k"] == 3 and dumped["logit_bias"] == {"1": 1}


def test_content_parts_are_accepted() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    )
    assert request.messages[0].content == [{"type": "text", "text": "hi"}]


def test_max_completion_tokens_wins() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 9}
    )
    assert request.effective_max_tokens == 9


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"n": 9}, ("n",)),
        ({"tool_choice": "required"}, ("tool_choice",)),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, ("tools", 0, "function", "name")),
        ({"stream_options": {"include_usage": True}}, ("stream_options",)),
        ({"temperature": -1}, ("temperature",)),
        ({"response_format": {"type": "json_schema"}}, ("response_format",)),
        ({"response_format": {"type": "xml"}}, ("response_format", "type")),
    ],
)
def test_unsupported_values_name_their_field(extra: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **extra})
    assert caught.value.errors()[0]["loc"] == loc


# -- bounds on client integers (issue 10): out of range is a 400 naming the field -----------------


def first_error_field(body: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **body})
    return ".".join(str(part) for part in caught.value.errors()[0]["loc"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 1_000_000_000_000}, "max_tokens"),
        ({"max_tokens": int("9" * 400)}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 10**20}, "max_completion_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_out_of_range_integers_name_their_field(body: dict[str, object], field: str) -> None:
    assert first_error_field(body) == field


def test_integers_in_range_pass() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "max_tokens": MAX_TOKENS_LIMIT, "seed": -(2**63),
         "top_logprobs": 20, "logit_bias": {"1": -100}, "stop": ["a", "b", "c", "d"]}
    )
    assert request.effective_max_tokens == MAX_TOKENS_LIMIT and request.max_tokens_field == "max_tokens"


@pytest.mark.parametrize("field", ["rpm", "tpm", "token_budget"])
def test_key_limits_are_bounded(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        KeyCreate.model_validate({"name": "k", field: int("9" * 400)})
    assert caught.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError):
        KeyCreate.model_validate({"name": "k", field: 0})
    assert getattr(KeyCreate.model_validate({"name": "k", field: 1000}), field) == 1000


def test_usage_of_provider_dicts() -> None:
    assert Usage.of({"prompt_tokens": 3, "completion_tokens": 2}) == Usage(
        prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert Usage.of(None) is None and Usage.of({"prompt_tokens": None}) is None


def nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_json_depth_is_counted_without_recursion() -> None:
    assert not nested_deeper_than(nested(MAX_JSON_DEPTH)) and nested_deeper_than(nested(MAX_JSON_DEPTH + 1))
    assert not nested_deeper_than([[[]]], limit=3) and nested_deeper_than([[[[]]]], limit=3)
    assert not nested_deeper_than("text") and not nested_deeper_than({"a": 1, "b": [1, 2, "x"]}, limit=2)
    assert nested_deeper_than(nested(100_000))  # far past Python's recursion limit


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(200)}}},
         ("response_format", "json_schema")),
        ({"x_vendor": nested(200)}, ()),
        ({"messages": [{"role": "user", "content": [nested(200)]}]}, ("messages", 0, "content")),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [nested(200)]}]},
             ("messages", 0, "tool_calls")),
    ],
)
def test_values_nested_too_deep_name_their_field(body: dict[str, object], loc: tuple[object, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **body})
    assert [e["loc"] for e in info.value.errors()] == [loc]
    assert "nested more than 64 levels" in info.value.errors()[0]["msg"]


def test_usual_depths_pass_and_task_inputs_are_bounded_too() -> None:
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": nested(20)}}}
    ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "x_vendor": nested(30),
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    )
    assert TaskRunRequest.model_validate({"input": nested(MAX_JSON_DEPTH)}).input
    with pytest.raises(ValidationError) as info:
        TaskRunRequest.model_validate({"input": nested(MAX_JSON_DEPTH + 1)})
    assert info.value.errors()[0]["loc"] == ("input",)


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"max_tokens": True}, ("max_tokens",)),
        ({"max_tokens": "5"}, ("max_tokens",)),
        ({"stream": "yes"}, ("stream",)),
        ({"stream": 1}, ("stream",)),
        ({"temperature": float("nan")}, ("temperature",)),
        ({"top_p": float("inf")}, ("top_p",)),
        ({"temperature": "0.5"}, ("temperature",)),
        ({"seed": 1.5}, ("seed",)),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, ("stream_options", "include_usage")),
    ],
)
def test_numbers_and_flags_are_strict_like_openais(extra: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **extra})
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_ints_where_floats_go_and_ordinary_values_pass() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 1, "top_p": 1, "max_tokens": 5, "stream": True,
         "stream_options": {"include_usage": True}, "seed": -3, "presence_penalty": 0})
    assert request.temperature == 1.0 and request.include_usage and request.effective_max_tokens == 5
