"""ModelCalls — the one model call path — with fake workers behind its Transport seam (no Ray).

Metering runs for real: a ``Meter`` over the real RateLimiter and TaskStore classes (SQLite in a
temporary directory), reached through handle-shaped wrappers on the same event loop
(``tests.fakes.metering``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError

from deployments import errors
from deployments.config import OpenAIModel
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatCompletionRequest, StreamEnd, Usage
from tests.fakes.metering import Metered, metered
from tests.fakes.workers import USAGE, FakeWorkers, relayed
from tests.waiting import until


def model(name: str, *fallbacks: str, **settings: Any) -> OpenAIModel:
    return OpenAIModel(provider="openai", name=name, base_url="http://127.0.0.1:1/v1",
                       fallback_models=list(fallbacks), **settings)


MODELS = [model("a", "b", "c"), model("b"), model("c"), model("small", max_output_tokens=100)]


def request(name: str = "a", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": name, "messages": [{"role": "user", "content": "x" * 40}], **fields})


def run(coro: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await coro
    return asyncio.run(go())


# -- resolving and fallbacks ----------------------------------------------------------------------


def test_unknown_model_is_404_naming_model() -> None:
    workers = FakeWorkers()
    with pytest.raises(errors.ModelNotFound) as caught:
        run(ModelCalls(MODELS, workers).complete(request("nope")))
    assert caught.value.param == "model" and caught.value.status_code == 404
    assert workers.calls == []


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_output_above_the_models_limit_is_400_naming_the_field(field: str) -> None:
    workers = FakeWorkers()
    calls = ModelCalls(MODELS, workers)
    with pytest.raises(errors.InvalidRequest) as caught:
        run(calls.complete(request("small", **{field: 101})))
    assert caught.value.param == field and "100" in caught.value.message
    assert workers.calls == []
    assert run(calls.complete(request("small", **{field: 100})))["model"] == "small"  # at the limit: fine


def test_fallbacks_are_tried_in_order_and_the_answer_names_the_model() -> None:
    workers = FakeWorkers({"a": [errors.UpstreamTimeout("slow")], "b": [errors.UpstreamError("down")]})
    result = run(ModelCalls(MODELS, workers).complete(request("a")))
    assert workers.models_called() == ["a", "b", "c"] and result["model"] == "c"
    # Each model got the request under its own name, with the same request id.
    assert [call.request.model for _, call in workers.calls] == ["a", "b", "c"]
    assert len({call.request_id for _, call in workers.calls}) == 1


def test_a_non_transient_error_stops_the_chain() -> None:
    workers = FakeWorkers({"a": [errors.UpstreamError("down")], "b": [errors.InvalidRequest("bad", param="x")]})
    with pytest.raises(errors.InvalidRequest):
        run(ModelCalls(MODELS, workers).complete(request("a")))
    assert workers.models_called() == ["a", "b"]


def test_the_last_models_error_is_raised() -> None:
    workers = FakeWorkers({m: [errors.UpstreamRateLimited("429", retry_after=2)] for m in "abc"})
    with pytest.raises(errors.UpstreamRateLimited) as caught:
        run(ModelCalls(MODELS, workers).complete(request("a")))
    assert caught.value.retry_after == 2 and workers.models_called() == ["a", "b", "c"]


@pytest.mark.parametrize("cls", errors.all_error_classes(), ids=lambda c: c.__name__)
def test_fallback_happens_exactly_for_transient_error_classes(cls: type[errors.PromptfleetError]) -> None:
    workers = FakeWorkers({"a": [cls("x")]})
    calls = ModelCalls(MODELS, workers)
    if cls.transient:
        assert run(calls.complete(request("a")))["model"] == "b"
    else:
        with pytest.raises(cls):
            run(calls.complete(request("a")))
    assert workers.models_called() == (["a", "b"] if cls.transient else ["a"])


def test_transient_is_what_the_tree_says() -> None:
    transient = {c.__name__ for c in errors.all_error_classes() if c.transient}
    assert transient == {"ModelRateLimited", "UpstreamRateLimited", "UpstreamError", "Overloaded",
                         "CircuitOpen", "UpstreamTimeout"}
    assert set(errors.TRANSIENT) == {c for c in errors.all_error_classes() if c.transient}
    before = {c.__name__ for c in errors.all_error_classes() if c.before_upstream}
    assert before == {"RateLimited", "ModelRateLimited", "Overloaded", "CircuitOpen"}


RAY_FAILURES = [
    BackPressureError(num_queued_requests=10, max_queued_requests=10),
    RayActorError(),
    ActorDiedError(),
    ActorUnavailableError("unavailable", None),
    WorkerCrashedError(),
    NodeDiedError("node died"),
]


@pytest.mark.parametrize("failure", RAY_FAILURES, ids=lambda e: type(e).__name__)
def test_ray_failures_are_503_with_retry_after(failure: Exception) -> None:
    workers = FakeWorkers({"b": [failure]})
    with pytest.raises(errors.Overloaded) as caught:
        run(ModelCalls(MODELS, workers).complete(request("b")))
    assert caught.value.status_code == 503 and caught.value.headers()["Retry-After"] == "1"
    assert type(failure).__name__ not in caught.value.message  # nothing internal


@pytest.mark.parametrize("failure", RAY_FAILURES, ids=lambda e: type(e).__name__)
def test_ray_failures_fall_back_json_and_streaming(failure: Exception) -> None:
    workers = FakeWorkers({"a": [failure, failure]})
    calls = ModelCalls(MODELS, workers)
    assert run(calls.complete(request("a")))["model"] == "b"

    async def stream() -> list[Any]:
        return relayed([chunk async for chunk in await calls.stream(request("a", stream=True))])

    chunks = run(stream())
    assert workers.models_called()[-2:] == ["a", "b"] and chunks[0]["model"] == "b"
    assert workers.streams[0].cancelled  # the failed model's stream was let go


def test_an_unexpected_worker_answer_is_a_bare_500() -> None:
    workers = FakeWorkers({"b": [{"not": "a ChatReply"}]})
    with pytest.raises(errors.PromptfleetError) as caught:
        run(ModelCalls(MODELS, workers).complete(request("b")))
    assert type(caught.value) is errors.PromptfleetError and caught.value.message == "Internal error."


# -- streaming ------------------------------------------------------------------------------------


def test_stream_errors_before_the_first_chunk_raise_and_after_it_are_values() -> None:
    early = FakeWorkers({"b": [errors.InvalidRequest("bad", param="messages")]})
    with pytest.raises(errors.InvalidRequest):
        run(ModelCalls(MODELS, early).stream(request("b", stream=True)))

    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    late = FakeWorkers({"b": [[chunk, errors.UpstreamError("dropped")]]})

    async def relay() -> list[Any]:
        return [c async for c in await ModelCalls(MODELS, late).stream(request("b", stream=True))]

    # The chunk in its list as the worker sent it, then the error value.

    items = run(relay())
    assert items[0] == [chunk] and isinstance(items[1], errors.UpstreamError) and len(items) == 2


# -- metering -------------------------------------------------------------------------------------


def test_a_call_is_admitted_then_recorded_and_its_booking_settled(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        calls = ModelCalls(MODELS, FakeWorkers(), m.meter)
        # (A new budget starts empty, so even the first booking waits a moment: let it.)
        await calls.complete(request("a", max_tokens=50), key, wait_s=1)
        assert await m.settled(key) == USAGE.total_tokens  # the estimate was replaced by the real count
        (row,) = await m.usage(key)
        assert (row["model"], row["requests"], row["total_tokens"]) == ("a", 1, USAGE.total_tokens)
        assert key.tokens_used == USAGE.total_tokens

    metered(tmp_path, scenario)


def test_the_estimate_is_bounded_by_the_models_output_limit(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=1_000_000)
        calls = ModelCalls(MODELS, FakeWorkers({"small": ["hang"]}), m.meter)
        task = asyncio.create_task(calls.complete(request("small"), key, wait_s=1))
        # No max_tokens asked: the default estimate, cut to the model's 100-token limit.
        assert await m.booked(key) == calls.estimate(request("small")) <= 100 + 20
        task.cancel()

    metered(tmp_path, scenario)


@pytest.mark.parametrize("failure", [errors.UpstreamError("down"), errors.InvalidRequest("bad", param="x"),
                                     BackPressureError(num_queued_requests=1, max_queued_requests=1)],
                         ids=lambda e: type(e).__name__)
def test_a_failed_call_gives_its_booking_back_and_bills_nothing(tmp_path: Path, failure: Exception) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        with pytest.raises(errors.PromptfleetError):
            await ModelCalls(MODELS, FakeWorkers({"b": [failure]}), m.meter).complete(request("b"), key, wait_s=1)
        assert await m.settled(key) == 0
        assert await m.usage(key) == []

    metered(tmp_path, scenario)


def test_a_cancelled_call_gives_its_booking_back(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        calls = ModelCalls(MODELS, FakeWorkers({"b": ["hang"]}), m.meter)
        task = asyncio.create_task(calls.complete(request("b"), key, wait_s=1))
        assert await m.booked(key) > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m.settled(key) == 0

    metered(tmp_path, scenario)


def test_a_spent_budget_is_403_before_any_call_and_a_live_one_flows(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=USAGE.total_tokens)
        workers = FakeWorkers()
        calls = ModelCalls(MODELS, workers, m.meter)
        await calls.complete(request("b"), key)  # 0 of 10 tokens used: under the budget, it flows
        with pytest.raises(errors.PermissionDenied) as caught:
            await calls.complete(request("b"), key)
        assert caught.value.status_code == 403 and len(workers.calls) == 1
        with pytest.raises(errors.PermissionDenied):
            await calls.stream(request("b", stream=True), key)
        assert len(workers.calls) == 1

    metered(tmp_path, scenario)


def test_a_burst_of_concurrent_calls_cannot_spend_a_budget_many_times_over(tmp_path: Path) -> None:
    """Found by a hostile walkthrough: 12 requests at once on a 40-token budget spent 1,176 tokens.
    A call in flight holds its estimate; while the held tokens may spend the rest, others get 429."""
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=40)
        workers = FakeWorkers()
        calls = ModelCalls(MODELS, workers, m.meter)
        burst = await asyncio.gather(*(calls.complete(request("b", max_tokens=60), key) for _ in range(12)),
                                     return_exceptions=True)
        answered = [r for r in burst if isinstance(r, dict)]
        refused = [r for r in burst if isinstance(r, errors.RateLimited)]
        assert len(answered) == 1 and len(refused) == 11 and len(workers.calls) == 1
        assert refused[0].status_code == 429 and refused[0].retry_after == 1 and "in flight" in refused[0].message
        assert m.meter.held == {}  # the answered call's hold was released when it was recorded
        # Under the budget, with nothing in flight, calls flow again (one at a time or several at once).
        used = key.tokens_used
        assert used == USAGE.total_tokens
        await calls.complete(request("b", max_tokens=5), key)
        assert key.tokens_used == 2 * USAGE.total_tokens

    metered(tmp_path, scenario)


def test_calls_that_may_wait_are_let_in_as_the_budget_covers_them_then_get_403(tmp_path: Path) -> None:
    """A queued run or batch line (or an HTTP request within its deadline) waits for the calls in
    flight to settle: 10 tokens a call on a 40-token budget lets 4 in, one after another."""
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=40)
        workers = FakeWorkers()
        calls = ModelCalls(MODELS, workers, m.meter)
        burst = await asyncio.gather(
            *(calls.complete(request("b", max_tokens=60), key, wait_s=5) for _ in range(12)), return_exceptions=True)
        answered = [r for r in burst if isinstance(r, dict)]
        spent = [r for r in burst if isinstance(r, errors.PermissionDenied)]
        assert len(answered) == 4 and len(spent) == 8 and len(workers.calls) == 4
        assert key.tokens_used == 40 and m.meter.held == {} and m.meter.settled == {}

    metered(tmp_path, scenario)


def test_a_failed_or_cancelled_call_releases_its_hold_on_the_budget(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=40)
        calls = ModelCalls(MODELS, FakeWorkers({"b": [errors.UpstreamError("down"), "hang"]}), m.meter)
        with pytest.raises(errors.UpstreamError):
            await calls.complete(request("b", max_tokens=60), key)
        assert m.meter.held == {}
        hanging = asyncio.create_task(calls.complete(request("b", max_tokens=60), key))
        await until(lambda: m.meter.held, message="the hanging call holds its estimate")
        assert m.meter.held == {key.key.id: calls.estimate(request("b", max_tokens=60))}
        with pytest.raises(errors.RateLimited):  # held while in flight
            await calls.complete(request("b", max_tokens=1), key)
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        assert m.meter.held == {}
        await calls.complete(request("b", max_tokens=1), key)  # and the budget is there again

    metered(tmp_path, scenario)


def test_a_keys_rpm_refuses_at_once_or_waits_when_asked(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(rpm=60)  # one request a second
        workers = FakeWorkers()
        calls = ModelCalls(MODELS, workers, m.meter)
        await calls.complete(request("b"), key, wait_s=2)  # (a new budget starts empty: its first call waits)
        with pytest.raises(errors.RateLimited) as caught:
            await calls.complete(request("b"), key)  # an HTTP client: 429 at once
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 1.5
        assert type(caught.value) is errors.RateLimited and len(workers.calls) == 1
        started = time.monotonic()
        await calls.complete(request("b"), key, wait_s=5)  # a batch line: waits for its slot
        assert len(workers.calls) == 2 and time.monotonic() - started > 0.3

    metered(tmp_path, scenario)


def test_a_stream_without_include_usage_is_billed_with_the_workers_count(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        chunks = relayed([c async for c in await ModelCalls(MODELS, FakeWorkers(), m.meter).stream(
            request("b", stream=True), key, wait_s=1)])
        assert all(isinstance(c, dict) and "usage" not in c for c in chunks) and len(chunks) == 3
        (row,) = await m.usage(key)
        assert row["total_tokens"] == USAGE.total_tokens
        assert await m.settled(key) == USAGE.total_tokens

    metered(tmp_path, scenario)


def test_an_abandoned_stream_is_cancelled_and_billed_what_was_relayed(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        workers = FakeWorkers(chunks=("x" * 40, "y", "z", "w"))
        calls = ModelCalls(MODELS, workers, m.meter)
        relay = await calls.stream(request("b", stream=True), key, wait_s=1)
        assert len(await relay.__anext__()) == 1
        assert len(await relay.__anext__()) == 3  # the rest, as the worker sent them: together
        await relay.aclose()  # the client hung up before the end
        assert workers.streams[0].cancelled
        (row,) = await m.usage(key)
        # Counted conservatively: 43 characters -> 11 tokens (more than the 4 chunks).
        assert row["completion_tokens"] == 11
        assert row["prompt_tokens"] == calls.estimate(request("b")) - 256  # the prompt estimate
        assert await m.settled(key) == row["total_tokens"]

    metered(tmp_path, scenario)


def test_a_stream_failing_before_its_first_chunk_gives_its_booking_back(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(tpm=100_000)
        workers = FakeWorkers({"b": [errors.UpstreamRateLimited("429", retry_after=1)]})
        with pytest.raises(errors.UpstreamRateLimited):
            await ModelCalls(MODELS, workers, m.meter).stream(request("b", stream=True), key, wait_s=1)
        assert await m.settled(key) == 0 and await m.usage(key) == []

    metered(tmp_path, scenario)


def test_usage_counted_here_when_the_worker_reports_none(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key()
        await ModelCalls(MODELS, FakeWorkers(usage=None, chunks=("a" * 41,)), m.meter).complete(request("b"), key)
        (row,) = await m.usage(key)
        assert row["completion_tokens"] == 11  # 41 characters, 4 a token, rounded up

    metered(tmp_path, scenario)


def test_work_billed_by_key_id_finds_the_key_and_refuses_revoked_or_unknown_keys(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=1000)
        entry = await m.meter.account(key.key.id)
        assert entry is not None and entry.key.id == key.key.id
        assert await m.meter.account(None) is None and await m.meter.account("anonymous") is None
        with pytest.raises(errors.AuthenticationFailed):
            await m.meter.account("key_0000000000000000")
        await m.store.revoke_key(key.key.id)
        m.meter.accounts.clear()
        with pytest.raises(errors.AuthenticationFailed):
            await ModelCalls(MODELS, FakeWorkers(), m.meter).complete(request("b"), await m.meter.account(key.key.id))

    metered(tmp_path, scenario)


def test_stream_end_without_chunks_is_an_empty_stream() -> None:
    workers = FakeWorkers({"b": [[StreamEnd(usage=Usage())]]})

    async def collect() -> list[Any]:
        return [item async for item in await ModelCalls(MODELS, workers).stream(request("b", stream=True))]

    assert run(collect()) == []
