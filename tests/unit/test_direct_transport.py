"""The Gateway's direct path to upstream models (``deployments.direct_transport``), without Ray: the
real provider against the real fake upstream (a uvicorn server in a thread), the real ``ModelCalls``
with its fallbacks, and a fake worker for the models not served here."""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pydantic_core
import pytest

from deployments import errors, request_ids
from deployments.config import OpenAIModel
from deployments.direct_transport import QUEUE_FACTOR, DirectTransport, queued_run
from deployments.gateway.chat_routes import events, sse
from deployments.model_calls import ModelCalls
from deployments.model_serving import ModelServing
from deployments.providers.openai_compat import OpenAIProvider
from deployments.schemas import ChatCompletionRequest
from tests.fakes.upstream import FakeUpstream
from tests.fakes.workers import FakeWorkers, relayed
from tests.waiting import until


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


def model(name: str, base_url: str, *fallbacks: str, **settings: Any) -> OpenAIModel:
    return OpenAIModel(provider="openai", name=name, base_url=base_url, upstream_model="fake-model",
                       fallback_models=list(fallbacks), **{"timeout_s": 2, "max_retries": 0, **settings})


def request(name: str, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def direct(models: list[OpenAIModel], workers: FakeWorkers, local: tuple[str, ...] = ()) -> DirectTransport:
    """The upstream models served here (all but ``local``), the rest by ``workers``."""
    return DirectTransport(
        {m.name: ModelServing(m, OpenAIProvider(m, api_key=None)) for m in models if m.name not in local}, workers)


def scenario(
    fake: FakeUpstream, go: Callable[[ModelCalls, DirectTransport, FakeWorkers], Awaitable[None]],
    *extra: OpenAIModel, local: tuple[str, ...] = (), **settings: Any,
) -> None:
    """Models ``a`` (falling back to ``b``) and ``b`` on the fake upstream, ``extra`` ones too."""
    models = [model("a", fake.base_url, "b", **settings), model("b", fake.base_url), *extra]

    async def run() -> None:
        workers = FakeWorkers()
        transport = direct(models, workers, local)
        try:
            await go(ModelCalls(models, transport), transport, workers)
        finally:
            await transport.close()

    asyncio.run(run())


def test_upstream_models_are_called_from_this_process_and_local_ones_through_their_worker(
        fake: FakeUpstream) -> None:
    async def go(calls: ModelCalls, _: DirectTransport, workers: FakeWorkers) -> None:
        answer = await calls.complete(request("a"))
        assert answer["model"] == "a" and answer["choices"][0]["message"]["content"] == "echo: hi"
        assert fake.stats()["calls"] == 1 and workers.calls == []
        await calls.complete(request("b"))
        assert fake.stats()["calls"] == 1 and [m for m, _ in workers.calls] == ["b"]

    scenario(fake, go, local=("b",))


@pytest.mark.parametrize(("mode", "params", "code"), [
    ("rate_limit", {"retry_after": 0}, "upstream_rate_limited"),
    ("error", {}, "upstream_error"),
    ("hang", {}, "upstream_timeout"),
])
def test_a_transient_upstream_failure_falls_back_to_the_next_model(
        fake: FakeUpstream, mode: str, params: dict[str, Any], code: str) -> None:
    fake.configure(mode=mode, fail_first_n=1, **params)

    async def go(calls: ModelCalls, *_: Any) -> None:
        answer = await calls.complete(request("a"))
        assert answer["model"] == "b"  # `a` failed, `b` (the same upstream, past its fault) answered
        assert fake.stats()["calls_by_mode"] == {mode: 1, "ok": 1}

    scenario(fake, go, timeout_s=1)


@pytest.mark.parametrize(("mode", "error"), [
    ("rate_limit", errors.UpstreamRateLimited), ("error", errors.UpstreamError), ("hang", errors.UpstreamTimeout),
])
def test_the_last_models_failure_reaches_the_caller_as_our_error(
        fake: FakeUpstream, mode: str, error: type[errors.PromptfleetError]) -> None:
    fake.configure(mode=mode, retry_after=0)

    async def go(calls: ModelCalls, *_: Any) -> None:
        with pytest.raises(error):
            await calls.complete(request("b"))
        with pytest.raises(error):  # streams too: before the first chunk, the status code
            await calls.stream(request("b", stream=True))

    scenario(fake, go)


def test_a_stream_relays_the_upstream_chunks_and_a_fallback_streams_too(fake: FakeUpstream) -> None:
    fake.configure(mode="error", fail_first_n=1)

    async def go(calls: ModelCalls, *_: Any) -> None:
        chunks = relayed([c async for c in await calls.stream(request("a", stream=True))])
        assert {c["model"] for c in chunks if isinstance(c, dict)} == {"b"}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == "echo: hi"
        assert not any(isinstance(c, dict) and c.get("usage") and not c.get("choices") for c in chunks)

    scenario(fake, go)


def test_chunks_read_together_are_relayed_together_whole_and_in_order(fake: FakeUpstream) -> None:
    """The fake upstream writes its 500 chunks at once: they reach the Gateway in few reads, and each
    read's chunks go on as one list, then as one write of the same SSE bytes, one event per chunk."""
    fake.configure(stream_chunks=500)

    async def go(calls: ModelCalls, *_: Any) -> None:
        writes = [w async for w in events(await calls.stream(request("b", stream=True)), "r-1")]
        sent = b"".join(writes)
        assert sent.endswith(b"data: [DONE]\n\n")
        chunks = [pydantic_core.from_json(e[len(b"data: "):]) for e in sent.split(b"\n\n")[:-2]]
        assert all(c["model"] == "b" for c in chunks)
        assert sent == b"".join(sse(c) for c in chunks) + b"data: [DONE]\n\n"  # the bytes of one by one
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == ("echo: hi" * 63)[:500] and len(chunks) == 502  # the role chunk, 500, the finish
        assert len(writes) < len(chunks) // 2  # most writes carried several events

    scenario(fake, go)


def test_a_stalled_stream_relays_its_first_chunks_without_waiting_for_more(fake: FakeUpstream) -> None:
    """The fake sends two chunks, then nothing: they are written at once, not held for company."""
    fake.configure(mode="stall_stream")

    async def go(calls: ModelCalls, *_: Any) -> None:
        writes = events(await calls.stream(request("b", stream=True)))
        try:
            received = b""
            while received.count(b"\n\n") < 2:  # the upstream's two chunks, in one write or two
                received += await asyncio.wait_for(anext(writes), 5)  # a guard against a hang, not a timing
            assert received.startswith(b"data: ") and b'"model":"b"' in received
        finally:
            await writes.aclose()

    scenario(fake, go, timeout_s=30)


def test_the_request_id_goes_upstream(fake: FakeUpstream) -> None:
    async def go(calls: ModelCalls, *_: Any) -> None:
        token = request_ids.use("direct-req-1")
        try:
            await calls.complete(request("a"))
            async for _ in await calls.stream(request("a", stream=True)):
                pass
        finally:
            request_ids.reset(token)
        await calls.complete(request("a"), request_id="given-id")  # a caller's own id, outside a request

    scenario(fake, go)
    assert fake.stats()["request_ids"] == ["direct-req-1", "direct-req-1", "given-id"]


def test_a_stream_left_early_stops_the_upstream_and_frees_its_place(fake: FakeUpstream) -> None:
    fake.configure(mode="stall_stream")

    async def go(calls: ModelCalls, transport: DirectTransport, _: FakeWorkers) -> None:
        chunks = await calls.stream(request("a", stream=True))
        assert isinstance(await chunks.__anext__(), list)
        assert transport.in_flight["a"] == 1
        await chunks.aclose()  # the client hung up
        assert transport.in_flight["a"] == 0
        await until(lambda: fake.stats()["in_flight"] == 0, message="the upstream call to end")

    scenario(fake, go, timeout_s=30)


def test_past_its_queue_a_model_answers_overloaded_and_the_next_model_serves(fake: FakeUpstream) -> None:
    fake.configure(mode="slow", delay_s=0.5)
    full = QUEUE_FACTOR * 1

    async def go(calls: ModelCalls, transport: DirectTransport, _: FakeWorkers) -> None:
        waiting = [asyncio.ensure_future(calls.complete(request("c"))) for _ in range(full)]
        await until(lambda: transport.in_flight["c"] == full, message="the queue to fill")
        with pytest.raises(errors.Overloaded) as refused:
            await calls.complete(request("c"))
        assert refused.value.retry_after == 1
        with pytest.raises(errors.Overloaded):
            await calls.stream(request("c", stream=True))
        answer = await calls.complete(request("c2"))  # `c2` falls back past nothing: it has its own room
        assert answer["model"] == "c2"
        assert all(a["model"] == "c" for a in await asyncio.gather(*waiting))
        assert transport.in_flight["c"] == 0

    scenario(fake, go, model("c", fake.base_url, max_concurrency=1, timeout_s=5),
             model("c2", fake.base_url, max_concurrency=1, timeout_s=5))


def test_a_full_model_falls_back(fake: FakeUpstream) -> None:
    fake.configure(mode="slow", delay_s=0.5)

    async def go(calls: ModelCalls, transport: DirectTransport, _: FakeWorkers) -> None:
        waiting = [asyncio.ensure_future(calls.complete(request("c"))) for _ in range(QUEUE_FACTOR)]
        await until(lambda: transport.in_flight["c"] == QUEUE_FACTOR, message="the queue to fill")
        assert (await calls.complete(request("c")))["model"] == "b"
        await asyncio.gather(*waiting)

    scenario(fake, go, model("c", fake.base_url, "b", max_concurrency=1, timeout_s=5))



async def as_queued_run(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``call`` as the TaskRunner makes it for a queued run (its own task, ``queued_run`` set)."""
    queued_run.set(True)
    return await call


def test_a_queued_runs_calls_wait_for_a_place_in_a_full_model_first_come_first_served(
        fake: FakeUpstream) -> None:
    fake.configure(mode="slow", delay_s=0.3)
    runs = 3 * QUEUE_FACTOR

    async def go(calls: ModelCalls, transport: DirectTransport, _: FakeWorkers) -> None:
        queued = [asyncio.ensure_future(as_queued_run(calls.complete(request("c", user=f"r{i}"))))
                  for i in range(runs)]
        await until(lambda: len(transport.waiting["c"]) == runs - QUEUE_FACTOR, message="the runs to queue")
        assert transport.in_flight["c"] == QUEUE_FACTOR
        with pytest.raises(errors.Overloaded):  # a client's call is still refused at once
            await calls.complete(request("c"))
        answers = await asyncio.gather(*queued)
        assert [a["model"] for a in answers] == ["c"] * runs
        assert transport.in_flight["c"] == 0 and not transport.waiting["c"]
        stats = fake.stats()
        assert stats["calls"] == runs and stats["max_in_flight"] == 1  # the pool's max_concurrency held

    scenario(fake, go, model("c", fake.base_url, max_concurrency=1, timeout_s=5))


def test_a_queued_run_cancelled_while_waiting_leaves_no_place_behind(fake: FakeUpstream) -> None:
    fake.configure(mode="slow", delay_s=0.3)

    async def go(calls: ModelCalls, transport: DirectTransport, _: FakeWorkers) -> None:
        holding = [asyncio.ensure_future(as_queued_run(calls.complete(request("c")))) for _ in range(QUEUE_FACTOR)]
        await until(lambda: transport.in_flight["c"] == QUEUE_FACTOR, message="the places to fill")
        gone, kept = (asyncio.ensure_future(as_queued_run(calls.complete(request("c")))) for _ in range(2))
        await until(lambda: len(transport.waiting["c"]) == 2, message="two runs to wait")
        gone.cancel()
        assert (await kept)["model"] == "c"
        await asyncio.gather(*holding)
        assert transport.in_flight["c"] == 0 and not transport.waiting["c"]
        assert gone.cancelled() and fake.stats()["calls"] == QUEUE_FACTOR + 1

    scenario(fake, go, model("c", fake.base_url, max_concurrency=1, timeout_s=5))


@pytest.mark.parametrize(("mode", "error"), [
    ("drop_stream", errors.UpstreamError), ("stall_stream", errors.UpstreamTimeout),
])
def test_a_stream_that_breaks_after_its_first_chunks_ends_with_our_error(
        fake: FakeUpstream, mode: str, error: type[errors.PromptfleetError]) -> None:
    fake.configure(mode=mode)

    async def go(calls: ModelCalls, *_: Any) -> None:
        items = relayed([item async for item in await calls.stream(request("b", stream=True))])
        assert isinstance(items[0], dict) and items[0]["model"] == "b"
        assert isinstance(items[-1], error) and all(isinstance(i, dict) for i in items[:-1])

    scenario(fake, go, model("b", fake.base_url, timeout_s=1))


def test_a_refused_key_is_our_error_without_the_upstreams_text(fake: FakeUpstream) -> None:
    fake.configure(mode="ok", api_key="right-key")

    async def go(calls: ModelCalls, *_: Any) -> None:
        with pytest.raises(errors.UpstreamError) as refused:
            await calls.complete(request("b"))
        assert "401" in refused.value.message and "right-key" not in refused.value.message

    scenario(fake, go)
    assert fake.stats()["last_authorization"] == "Bearer unused"


@pytest.mark.parametrize(("mode", "stream"), [
    ("rate_limit", False), ("rate_limit", True), ("error", False), ("error", True),
])
def test_a_refused_call_leaves_no_reference_cycle_through_our_frames(
        fake: FakeUpstream, mode: str, stream: bool) -> None:
    """An error raised from a local that names it keeps its own frame alive through its traceback:
    garbage only the collector frees, tens of objects a failed call under an error storm."""
    fake.configure(mode=mode, retry_after=0)

    async def go(calls: ModelCalls, *_: Any) -> None:
        async def refused() -> None:
            with pytest.raises(errors.PromptfleetError):
                if stream:
                    await calls.stream(request("b", stream=True))
                else:
                    await calls.complete(request("b"))

        await refused()  # first calls build caches, pools and the breaker's state
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                await refused()
            gc.collect()
            ours = {f"{f.f_code.co_filename}:{f.f_code.co_name}" for f in gc.garbage
                    if isinstance(f, types.FrameType) and "/deployments/" in f.f_code.co_filename}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == set()

    scenario(fake, go, breaker_threshold=1000)
