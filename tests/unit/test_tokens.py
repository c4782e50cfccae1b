"""Token estimates and counts (core.tokens) and models' output limits (config)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.config import LlamaCppModel, OpenAIModel
from deployments.core.tokens import DEFAULT_COMPLETION_ESTIMATE, StreamCounter, completion_budget, prompt_tokens


def test_completion_budget_is_bounded_by_the_models_limit() -> None:
    assert completion_budget(10**12, 4096) == 4096
    assert completion_budget(None, 4096) == DEFAULT_COMPLETION_ESTIMATE
    assert completion_budget(None, 100) == 100
    assert completion_budget(50, 100) == 50


def test_prompt_tokens_count_text_parts_and_message_overhead() -> None:
    assert prompt_tokens([{"role": "user", "content": "x" * 8}]) == 4 + 2
    assert prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "x" * 5}]}]) == 4 + 2


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
