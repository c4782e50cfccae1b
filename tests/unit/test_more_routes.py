"""Embeddings and text completions on the one model-call path, without Ray: input shapes, capabilities,
fallbacks, metering (keyed and keyless), batch lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments import errors
from deployments.clients.keys import KeysClient
from deployments.config import LlamaCppModel, OpenAIModel
from deployments.core.capabilities import require_capability
from deployments.core.replies import unwrap
from deployments.core.tokens import StreamCounter
from deployments.limits.metering import Meter
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatCompletionRequest
from deployments.schemas.completions import CompletionRequest
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.store.keys import ANONYMOUS_OWNER
from jobs.batchlines import LineError, parse_line
from tests.fakes.metering import Metered, metered
from tests.fakes.workers import FakeWorkers, Handle, relayed
from tests.unit.test_model_calls import run


def model(name: str, *fallbacks: str, capabilities: tuple[str, ...] = ("embeddings", "completions")) -> OpenAIModel:
    return OpenAIModel(provider="openai", name=name, base_url="http://127.0.0.1:1/v1",
                       fallback_models=list(fallbacks), capabilities=list(capabilities))  # type: ignore[arg-type]


MODELS = [model("a", "chatty", "b"), model("chatty", capabilities=("chat",)), model("b")]


def embedding(name: str = "a", **fields: Any) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": name, "input": ["one two", "three"], **fields})


def completion(name: str = "a", **fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": name, "prompt": "x" * 40, **fields})


# -- input shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "count"), [("hi", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1], [2, 3]], 2)])
def test_the_four_input_shapes(value: Any, count: int) -> None:
    assert len(EmbeddingRequest(model="m", input=value).inputs()) == count
    assert len(CompletionRequest(model="m", prompt=value).prompts()) == count


@pytest.mark.parametrize("value", ["", [], [""], ["a", 1], [1, "a"], [[1], 2], [[]], [-1], [True], [2**31],
                                   {"a": 1}, None, 3, ["x"] * 2049])
def test_bad_inputs_are_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest(model="m", input=value)
    assert caught.value.errors()[0]["loc"] == ("input",)
    with pytest.raises(ValidationError) as caught:
        CompletionRequest(model="m", prompt=value)
    assert caught.value.errors()[0]["loc"] == ("prompt",)


def test_embedding_estimate_counts_text_and_token_arrays() -> None:
    assert EmbeddingRequest(model="m", input=["abcd", "abcde"]).estimate() == 3
    assert EmbeddingRequest(model="m", input=[[1, 2, 3], [4]]).estimate() == 4


def test_completion_chunks_are_counted_when_a_stream_ends_early() -> None:
    counter = StreamCounter()
    counter.add({"choices": [{"index": 0, "text": "Hello there"}]})
    counter.add({"choices": [{"index": 0, "text": ""}]})
    assert counter.completion_tokens == 3


# -- capabilities -------------------------------------------------------------------------------


def test_a_model_without_the_capability_is_400_naming_model() -> None:
    require_capability(MODELS[0], "embeddings")
    with pytest.raises(errors.InvalidRequest) as caught:
        require_capability(MODELS[1], "embeddings")
    assert caught.value.param == "model" and "/v1/embeddings" in caught.value.message


def test_default_capabilities_and_embedding_models_that_cannot_also_generate() -> None:
    assert OpenAIModel(provider="openai", name="m", base_url="http://h/v1").capabilities == [
        "chat", "completions", "responses"]
    assert LlamaCppModel(provider="llamacpp", name="e", capabilities=["embeddings"], n_ctx=512).pooling == "mean"
    with pytest.raises(ValidationError, match="cannot have another"):
        LlamaCppModel(provider="llamacpp", name="e", capabilities=["embeddings", "chat"])
    with pytest.raises(ValidationError, match="n_batch"):
        LlamaCppModel(provider="llamacpp", name="e", capabilities=["embeddings"], n_ctx=256, n_batch=512)
    with pytest.raises(ValidationError):
        OpenAIModel(provider="openai", name="m", base_url="http://h/v1", capabilities=["images"])  # type: ignore[list-item]


def test_chat_to_an_embedding_model_is_refused_before_any_call() -> None:
    workers = FakeWorkers()
    chat = ChatCompletionRequest.model_validate({"model": "b", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(errors.InvalidRequest) as caught:
        run(ModelCalls(MODELS, workers).complete(chat))
    assert caught.value.param == "model" and workers.calls == []


# -- the call path ------------------------------------------------------------------------------


def test_embeddings_fall_back_only_to_models_that_embed() -> None:
    workers = FakeWorkers({"a": [errors.UpstreamError("down")]})
    answer = run(ModelCalls(MODELS, workers).embed(embedding()))
    assert [m for m, _ in workers.calls] == ["a", "b"] and answer["model"] == "b"
    assert workers.calls[1][1].body == {"model": "b", "input": ["one two", "three"]}


def test_completions_json_and_stream_through_the_path() -> None:
    workers = FakeWorkers()
    calls = ModelCalls(MODELS, workers)
    assert run(calls.text_complete(completion()))["choices"][0]["text"] == "Hello!"

    async def stream() -> list[Any]:
        chunks = await calls.text_stream(completion(stream=True))
        return relayed([c async for c in chunks])

    assert [c["choices"][0]["text"] for c in run(stream())] == ["Hel", "lo", "!"]


def test_output_above_the_limit_is_400_on_completions() -> None:
    models = [OpenAIModel(provider="openai", name="s", base_url="http://h/v1", max_output_tokens=10)]
    with pytest.raises(errors.InvalidRequest) as caught:
        run(ModelCalls(models, FakeWorkers()).text_complete(completion("s", max_tokens=11)))
    assert caught.value.param == "max_tokens"


def test_embeddings_are_billed_to_the_key_and_a_spent_budget_is_403(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        calls = ModelCalls(MODELS, FakeWorkers(), m.meter)
        key = await m.key(token_budget=12)
        await calls.embed(embedding(), key)
        await calls.text_complete(completion(), key)
        rows = await m.usage(key)
        assert rows[0]["requests"] == 2 and rows[0]["prompt_tokens"] == 12 and rows[0]["completion_tokens"] == 3
        with pytest.raises(errors.PermissionDenied):
            await calls.embed(embedding(), key)
        with pytest.raises(errors.PermissionDenied):
            await calls.text_stream(completion(stream=True), key)

    metered(tmp_path, scenario)


def test_calls_without_a_key_are_recorded_only_when_told_to(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        keyless = Meter(KeysClient(Handle(m.store)), Handle(m.limiter), anonymous=ANONYMOUS_OWNER)
        await ModelCalls(MODELS, FakeWorkers(), keyless).embed(embedding())
        await ModelCalls(MODELS, FakeWorkers(), m.meter).embed(embedding())  # not told: not recorded
        await keyless.flush()
        await m.meter.flush()
        rows = unwrap(await m.store.usage(ANONYMOUS_OWNER)).data
        assert [(r.key_id, r.model, r.requests, r.prompt_tokens) for r in rows] == [(ANONYMOUS_OWNER, "a", 1, 5)]
        await keyless.close()

    metered(tmp_path, scenario)


# -- batch lines --------------------------------------------------------------------------------


def test_batch_lines_of_every_model_url_and_a_clear_error_for_others() -> None:
    def parsed(url: str, body: dict[str, Any]) -> Any:
        return parse_line(json.dumps({"custom_id": "c", "method": "POST", "url": url, "body": body}), 1)

    assert type(parsed("/v1/embeddings", {"model": "m", "input": "x"})).__name__ == "BatchEmbeddingLine"
    assert type(parsed("/v1/completions", {"model": "m", "prompt": "x"})).__name__ == "BatchCompletionLine"
    bad = parsed("/v1/images", {"model": "m"})
    assert isinstance(bad, LineError) and bad.param == "url" and "/v1/embeddings" in bad.message
    streaming = parsed("/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert isinstance(streaming, LineError) and streaming.param == "body"
    wrong_input = parsed("/v1/embeddings", {"model": "m", "input": []})
    assert isinstance(wrong_input, LineError) and wrong_input.param == "body.input"
