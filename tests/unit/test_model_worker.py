"""ModelWorker's handle convention, with a fake provider (no Ray): typed in, typed out, errors as values."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments import errors, request_ids
from deployments.config import LogsConfig, OpenAIModel
from deployments.model_worker import ModelWorker
from deployments.schemas import ChatCompletionRequest, ChatReply, ModelCall, StreamEnd, Usage
from tests.unit.conftest import Records


class FakeProvider:
    def __init__(self, fail: errors.PromptfleetError | None = None) -> None:
        self.fail = fail
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, body: dict[str, Any], share: Any = None) -> dict[str, Any]:
        self.bodies.append(body)
        if self.fail is not None:
            raise self.fail
        return {"model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}

    async def stream(self, body: dict[str, Any], share: Any = None) -> AsyncIterator[Any]:
        self.bodies.append(body)
        yield {"choices": [{"delta": {"content": "a"}}]}  # a chunk on its own, as a local model's
        yield [{"choices": [{"delta": {"content": "b"}}]}, {"choices": [{"delta": {"content": "c"}}]}]  # together
        if self.fail is not None:
            raise self.fail
        yield StreamEnd(usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3))

    async def close(self) -> None:
        pass


class Worker(ModelWorker):
    # Serve awaits the async ``__del__`` when it stops a replica; here the garbage collector
    # would only create a never-awaited coroutine.
    def __del__(self) -> None:
        pass


CONFIG = OpenAIModel(provider="openai", name="m", base_url="http://127.0.0.1:1/v1", max_output_tokens=100)


def call(**fields: Any) -> ModelCall:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    **fields})
    return ModelCall(request=request, request_id="req-1")


def test_chat_takes_a_model_call_and_answers_a_chat_reply() -> None:
    provider = FakeProvider()
    reply = asyncio.run(Worker(CONFIG, provider=provider).chat(call(temperature=0.5)))
    assert isinstance(reply, ChatReply) and reply.usage == Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3)
    # Only what the client set reaches the provider.
    assert provider.bodies[0] == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    crossed = pickle.loads(pickle.dumps(call()))  # what crosses the handle pickles, and is validated again
    assert (crossed.request, crossed.request_id, crossed.body()) == (call().request, "req-1", call().body())


def test_expected_errors_come_back_as_values() -> None:
    error = errors.UpstreamRateLimited("429", retry_after=2)
    worker = Worker(CONFIG, provider=FakeProvider(fail=error))
    assert asyncio.run(worker.chat(call())) is error

    async def items() -> list[Any]:
        return [item async for item in worker.chat_stream(call(stream=True))]

    streamed = asyncio.run(items())
    assert isinstance(streamed[0], list) and streamed[-1] is error


def test_a_stream_ends_with_its_usage() -> None:
    async def items() -> list[Any]:
        return [item async for item in Worker(CONFIG, provider=FakeProvider()).chat_stream(call(stream=True))]

    streamed = asyncio.run(items())
    # Served as Chunks: the chunk yielded on its own in a list of one, those yielded together as they came.
    assert [[c["choices"][0]["delta"]["content"] for c in chunks] for chunks in streamed[:-1]] == [["a"], ["b", "c"]]
    assert streamed[-1] == StreamEnd(usage=Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3))


def test_max_tokens_above_the_models_limit_is_lowered_for_a_fallback() -> None:
    provider = FakeProvider()
    asyncio.run(Worker(CONFIG, provider=provider).chat(call(max_tokens=5000, max_completion_tokens=7000)))
    assert provider.bodies[0]["max_tokens"] == 100 and provider.bodies[0]["max_completion_tokens"] == 100
    assert asyncio.run(Worker(CONFIG, provider=provider).describe()) == CONFIG


class ForwardingProvider(FakeProvider):
    """A provider that forwards /v1/responses (as ``providers.openai_compat`` does)."""

    async def respond(self, body: dict[str, Any], share: Any = None) -> dict[str, Any]:
        self.bodies.append(body)
        if self.fail is not None:
            raise self.fail
        return {"object": "response", "output": [], "usage": {"input_tokens": 4, "output_tokens": 2}}

    async def respond_stream(self, body: dict[str, Any], share: Any = None) -> AsyncIterator[Any]:
        self.bodies.append(body)
        yield {"type": "response.created", "sequence_number": 0}
        if self.fail is not None:
            raise self.fail
        yield StreamEnd(usage=Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6))


def test_responses_are_forwarded_by_a_provider_that_can_and_refused_by_one_that_cannot() -> None:
    from deployments.schemas.calls import BodyCall

    body = BodyCall(body={"model": "m", "input": "hi", "max_output_tokens": 5000}, request_id="req-1")
    provider = ForwardingProvider()
    reply = asyncio.run(Worker(CONFIG, provider=provider).respond(body))
    assert isinstance(reply, ChatReply) and reply.usage == Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
    assert provider.bodies[0]["max_output_tokens"] == 100  # lowered to the model's limit, as max_tokens is

    async def items(worker: ModelWorker) -> list[Any]:
        return [item async for item in worker.respond_stream(body)]

    assert asyncio.run(items(Worker(CONFIG, provider=provider)))[-1] == StreamEnd(
        usage=Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6))
    error = errors.UpstreamError("down")
    streamed = asyncio.run(items(Worker(CONFIG, provider=ForwardingProvider(fail=error))))
    assert streamed[0][0]["type"] == "response.created" and streamed[-1] is error
    # A provider without /responses (the local model) answers a 400 naming `model`, as a value.
    refused = asyncio.run(Worker(CONFIG, provider=FakeProvider()).respond(body))
    assert isinstance(refused, errors.InvalidRequest) and refused.param == "model"
    (only,) = asyncio.run(items(Worker(CONFIG, provider=FakeProvider())))
    assert isinstance(only, errors.InvalidRequest)


def test_replies_cross_the_handle_as_plain_data_and_arrive_equal() -> None:
    with_usage = ChatReply.of({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    without = ChatReply.of({"choices": []})
    for reply in (with_usage, without):
        assert pickle.loads(pickle.dumps(reply)) == reply
    assert without.usage is None and with_usage.usage == Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3)


class ContextProvider(FakeProvider):
    """Records the request id its calls run under (what Serve's log filter writes on every line)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str | None] = []

    async def chat(self, body: dict[str, Any], share: Any = None) -> dict[str, Any]:
        self.ids.append(request_ids.current())
        return {"model": "m", "choices": [{"message": {"role": "assistant", "content": "the answer"}}]}


@pytest.mark.parametrize(("access_log", "content"), [(True, False), (True, True), (False, True)])
def test_a_call_runs_under_its_request_id_and_is_logged_once(access_log: bool, content: bool,
                                                              serve_log: Records) -> None:
    provider = ContextProvider()
    asyncio.run(Worker(CONFIG, provider=provider, logs=LogsConfig(access_log=access_log, content=content)).chat(call()))
    assert provider.ids == ["req-1"]
    (line,) = [r for r in serve_log.records if r.getMessage().startswith("served m")]
    assert line.__dict__["outcome"] == "ok" and line.__dict__["model"] == "m"
    # The prompt ("hi") and the output reach the log only when the operator asked for them.
    assert ("'hi'" in line.getMessage() and "the answer" in line.getMessage()) is content


def test_a_call_is_not_logged_by_default(serve_log: Records) -> None:
    provider = ContextProvider()
    asyncio.run(Worker(CONFIG, provider=provider).chat(call()))  # ~90 µs of CPU a line: the operator's choice
    assert provider.ids == ["req-1"]  # it still runs under its id: a warning about it would carry it
    assert not [r for r in serve_log.records if r.getMessage().startswith("served m")]
