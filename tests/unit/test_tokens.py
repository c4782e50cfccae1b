"""Token estimates and counts (core.tokens) and models' output limits (config)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments.config import LlamaCppModel, OpenAIModel
from deployments.core.tokens import (
    DEFAULT_COMPLETION_ESTIMATE,
    StreamCounter,
    chat_prompt_tokens,
    completion_budget,
    prompt_tokens,
    response_prompt_tokens,
    schema_tokens,
)
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatCompletionRequest
from tests.fakes.workers import FakeWorkers

HI = [{"role": "user", "content": "hi"}]
# A tool whose schema is 400 characters of JSON: 100 tokens at 4 characters a token.
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": ""}}}
TOOL["function"]["parameters"]["description"] = "d" * (400 - len(json.dumps(TOOL, separators=(",", ":"))))
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object",
                 "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}}}


def test_completion_budget_is_bounded_by_the_models_limit() -> None:
    assert completion_budget(10**12, 4096) == 4096
    assert completion_budget(None, 4096) == DEFAULT_COMPLETION_ESTIMATE
    assert completion_budget(None, 100) == 100
    assert completion_budget(50, 100) == 50


def test_prompt_tokens_count_text_parts_and_message_overhead() -> None:
    assert prompt_tokens([{"role": "user", "content": "x" * 8}]) == 4 + 2
    assert prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "x" * 5}]}]) == 4 + 2


def test_tool_and_output_schemas_count_in_the_prompt_estimate() -> None:
    assert schema_tokens(TOOL) == 100 and schema_tokens(None) == 0
    bare = prompt_tokens(HI)
    assert prompt_tokens(HI, tools=[TOOL]) == bare + 100
    assert prompt_tokens(HI, tools=[TOOL, TOOL]) == bare + 200
    assert prompt_tokens(HI, response_format=SCHEMA_FORMAT) == bare + schema_tokens(SCHEMA_FORMAT) > bare + 100
    # The same for a validated request (pydantic models) and for its body as a dict.
    body = {"model": "m", "messages": HI, "tools": [TOOL], "response_format": SCHEMA_FORMAT}
    request = ChatCompletionRequest.model_validate(body)
    assert chat_prompt_tokens(request) == chat_prompt_tokens(body) == bare + 100 + schema_tokens(SCHEMA_FORMAT)
    assert chat_prompt_tokens(ChatCompletionRequest.model_validate({"model": "m", "messages": HI})) == bare


def test_the_tpm_estimate_of_a_chat_call_counts_its_tools() -> None:
    from deployments.config import OpenAIModel

    calls = ModelCalls([OpenAIModel(provider="openai", name="m", base_url="http://127.0.0.1:1/v1")], FakeWorkers())
    plain = ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "max_tokens": 10})
    tooled = ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "max_tokens": 10, "tools": [TOOL]})
    assert calls.estimate(tooled) == calls.estimate(plain) + 100


def test_response_prompt_tokens_count_instructions_items_tools_and_format() -> None:
    base = response_prompt_tokens({"input": "x" * 8})
    assert base == 4 + 2
    assert response_prompt_tokens({"input": "x" * 8, "instructions": "y" * 4}) == base + 4 + 1
    items = [{"role": "user", "content": [{"type": "input_text", "text": "x" * 8}]},
             {"type": "function_call_output", "call_id": "c", "output": "o" * 100}]
    assert response_prompt_tokens({"input": items}) == base + 4 + schema_tokens(items[1]) > base + 25
    flat_tool = {"type": "function", **TOOL["function"]}
    assert response_prompt_tokens({"input": "x" * 8, "tools": [flat_tool]}) == base + schema_tokens(flat_tool)
    form = {"type": "json_schema", "name": "p", "schema": SCHEMA_FORMAT["json_schema"]["schema"]}
    assert response_prompt_tokens({"input": "x" * 8, "text": {"format": form}}) == base + schema_tokens(form)


def test_stream_counter_counts_responses_deltas() -> None:
    counter = StreamCounter()
    counter.add({"type": "response.created", "response": {"output": []}})
    counter.add({"type": "response.output_text.delta", "delta": "x" * 40})
    counter.add({"type": "response.function_call_arguments.delta", "delta": "{}"})
    counter.add({"type": "response.output_text.done", "text": "x" * 40})  # not counted twice
    assert counter.completion_tokens == 11


def test_stream_counter_is_conservative() -> None:
    counter = StreamCounter()
    for text in ["a", "b", "c"]:  # three one-character chunks: three tokens, not one
        counter.add({"choices": [{"delta": {"content": text}}]})
    counter.add({"choices": [{"delta": {"role": "assistant"}}]})  # no text: not counted
    counter.add({"choices": [], "usage": None})
    assert counter.completion_tokens == 3
    counter.add({"choices": [{"delta": {"content": "x" * 40}}]})
    assert counter.completion_tokens == 11  # 41 characters: 11 tokens beat 4 chunks


def test_output_limits() -> None:
    assert LlamaCppModel(provider="llamacpp", name="l", n_ctx=2048).output_limit == 2048 - 16
    assert LlamaCppModel(provider="llamacpp", name="l", n_ctx=2048, max_output_tokens=512).output_limit == 512
    upstream = OpenAIModel(provider="openai", name="u", base_url="http://h/v1")
    assert upstream.output_limit == 16384 and upstream.max_retry_after_s == 60
    with pytest.raises(ValidationError, match="exceeds n_ctx"):
        LlamaCppModel(provider="llamacpp", name="l", n_ctx=512, max_output_tokens=1024)
    with pytest.raises(ValidationError, match="default_max_tokens"):
        LlamaCppModel(provider="llamacpp", name="l", n_ctx=512, max_output_tokens=100, default_max_tokens=200)
