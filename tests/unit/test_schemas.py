"""Request models: tolerant of unknown OpenAI fields, strict about what we cannot honour."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.schemas import ChatCompletionRequest

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
        ({"n": 2}, ("n",)),
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
