"""The metrics: the catalogue's rules, and what each layer records (a MemoryBackend; no Ray).

The same events through real Ray and a real Prometheus: tests/serve/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from deployments import errors, telemetry
from deployments.config import AdmissionConfig, MetricsConfig, OpenAIModel
from deployments.core.retry import BackoffPolicy
from deployments.gateway.request_metrics import RequestMetrics, error_code, note_model
from deployments.limits.breaker import CircuitBreaker
from deployments.limits.guard import UpstreamGuard
from deployments.limits.rate_limiter import RateLimiter
from deployments.model_calls import ModelCalls
from deployments.providers.openai_compat import OpenAIProvider
from deployments.schemas import BookingAsk, Budget, ChatCompletionRequest, ReserveRequest, Share
from deployments.store import RunStore
from deployments.telemetry import CATALOGUE, Kind, MemoryBackend, Metrics
from tests.fakes.workers import USAGE, FakeWorkers
from tests.waiting import until

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    backend = MemoryBackend()
    telemetry.use_backend(backend)
    try:
        yield backend
    finally:
        telemetry.use_backend(telemetry.RayBackend())


def run(coro: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await coro
    return asyncio.run(go())


# -- the catalogue --------------------------------------------------------------------------------


def test_catalogue_names_labels_and_buckets_follow_the_rules() -> None:
    names = [spec.name for spec in CATALOGUE]
    assert len(names) == len(set(names))
    for spec in CATALOGUE:
        assert spec.name.startswith("promptfleet_") and PROMETHEUS_NAME.match(spec.name), spec.name
        assert spec.labels[0] == "application" and len(set(spec.labels)) == len(spec.labels)
        assert all(PROMETHEUS_NAME.match(label) and not label.startswith("__") for label in spec.labels)
        assert spec.help and spec.why
        if spec.kind is Kind.HISTOGRAM:
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0
        else:
            assert spec.buckets == ()
        # Ray's metrics agent exports `ray_<name>`, counters with `_total`.
        assert spec.exported == "ray_" + spec.name + ("_total" if spec.kind is Kind.COUNTER else "")


def test_latency_buckets_cover_llm_latencies() -> None:
    assert telemetry.LATENCY_BUCKETS[0] <= 0.01 and telemetry.LATENCY_BUCKETS[-1] >= 300
    assert telemetry.FIRST_TOKEN_BUCKETS[0] <= 0.025 and telemetry.FIRST_TOKEN_BUCKETS[-1] >= 30


def test_the_per_key_label_is_off_unless_asked_for(memory: MemoryBackend) -> None:
    plain = Metrics("app")
    plain.request("/v1/chat/completions", "m", 200, "", "key_1", 0.5)
    plain.tokens("m", 10, 5, "key_1")
    assert memory.total(telemetry.REQUESTS, key="") == 1
    assert memory.total(telemetry.TOKENS, key="", kind="prompt") == 10
    keyed = Metrics("app", per_key_label=True)
    keyed.request("/v1/chat/completions", "m", 429, "rate_limited", "key_1", 0.1)
    keyed.tokens("m", 3, 0, "key_1")  # no completion tokens: no zero increment (Ray refuses it)
    assert memory.total(telemetry.REQUESTS, key="key_1", status_class="4xx", error_code="rate_limited") == 1
    assert memory.total(telemetry.TOKENS, key="key_1") == 3
    assert memory.observations(telemetry.REQUEST_DURATION, application="app") == [0.5, 0.1]


def test_disabled_metrics_record_nothing(memory: MemoryBackend) -> None:
    null = telemetry.metrics_for(MetricsConfig(enabled=False), "app")
    assert not null.enabled and isinstance(null, telemetry.NullMetrics)
    null.request("/", "", 200, "", None, 1.0)
    null.declare(*CATALOGUE)
    null.run_moved("t", "start", "running", False)
    assert memory.values == {} and memory.observed == {}
    # Every event of Metrics is a no-op there (so a new event cannot be forgotten).
    events = {n for n, v in vars(Metrics).items() if callable(v) and not n.startswith("_")} - {"key"}
    assert events <= set(vars(telemetry.NullMetrics))


def test_declared_metrics_exist_at_zero(memory: MemoryBackend) -> None:
    metrics = Metrics("app")
    metrics.declare(*telemetry.STORE_METRICS, telemetry.LIMITER_PAUSED, telemetry.REQUEST_DURATION)
    assert memory.total(telemetry.RUN_LEASE_EXPIRIES, application="app") == 0
    assert (telemetry.RUN_LEASE_EXPIRIES.name, frozenset({("application", "app"), ("task", "")})) in memory.values
    assert memory.total(telemetry.LIMITER_PAUSED) == 0
    assert memory.observations(telemetry.REQUEST_DURATION) == []  # a histogram appears with its first value


def test_gauges_are_set_again_while_the_event_loop_runs(memory: MemoryBackend, monkeypatch: Any) -> None:
    """Ray's metrics agent forgets a gauge its process has not set again lately: each is kept set."""
    monkeypatch.setattr(telemetry.recording, "GAUGE_KEEPALIVE_S", 0.01)
    sets: list[float] = []
    record = memory.instrument(telemetry.LOCAL_QUEUE)

    def counting(value: float, tags: dict[str, str]) -> None:
        sets.append(value)
        record(value, tags)

    metrics = Metrics("app")
    metrics.records[telemetry.LOCAL_QUEUE.name] = counting

    async def go() -> None:
        metrics.local_queue("m", 3)
        await until(lambda: sets.count(3) > 3, message="the gauge set again while nothing changed")
        metrics.local_queue("m", 1)
        await until(lambda: sets.count(1) > 3, message="the new value kept set")

    run(go())
    assert len(sets) > 5 and sets[0] == 3 and sets[-1] == 1 and set(sets) == {1, 3}
    assert memory.total(telemetry.LOCAL_QUEUE, model="m") == 1


def test_metrics_for_is_one_object_per_process_and_settings() -> None:
    config = MetricsConfig()
    assert telemetry.metrics_for(config, "a") is telemetry.metrics_for(config, "a")
    assert telemetry.metrics_for(config, "a") is not telemetry.metrics_for(config, "b")


# -- the Gateway's request layer ------------------------------------------------------------------


def gateway_app(metrics: Metrics) -> Any:
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(http: Request) -> JSONResponse:
        body = await http.json()
        note_model(http, body["model"])
        if body["model"] == "broken":
            return JSONResponse(errors.UpstreamError("down").to_body(), status_code=502)
        return JSONResponse({"ok": True})

    @api.get("/v1/runs/{run_id}")
    async def get_run(run_id: str) -> JSONResponse:
        return JSONResponse({"id": run_id})

    async def refuse_without_key(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers", []))
        if b"authorization" not in headers:
            response = JSONResponse(errors.AuthenticationFailed("no key").to_body(), status_code=401)
            await response(scope, receive, send)
            return
        await api(scope, receive, send)

    return RequestMetrics(refuse_without_key, metrics, ["m", "broken"], api.routes)


def test_requests_are_counted_by_route_template_model_status_and_error_code(memory: MemoryBackend) -> None:
    app = gateway_app(Metrics("app"))
    auth = {"Authorization": "Bearer x"}

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for name, status in (("m", 200), ("zz", 200), ("broken", 502)):
                answer = await client.post("/v1/chat/completions", json={"model": name}, headers=auth)
                assert answer.status_code == status
            assert (await client.get("/v1/runs/run_abc", headers=auth)).status_code == 200
            assert (await client.get("/v1/nowhere", headers=auth)).status_code == 404
            # Refused before routing: the route is still named by its template.
            assert (await client.get("/v1/runs/run_xyz")).status_code == 401

    run(go())
    total = memory.total
    chat = "/v1/chat/completions"
    assert total(telemetry.REQUESTS, route=chat, model="m", status_class="2xx", error_code="") == 1
    assert total(telemetry.REQUESTS, route=chat, model="other", status_class="2xx") == 1  # not configured
    assert total(telemetry.REQUESTS, route=chat, model="broken", status_class="5xx", error_code="upstream_error") == 1
    assert total(telemetry.REQUESTS, route="/v1/runs/{run_id}", model="", status_class="2xx") == 1
    assert total(telemetry.REQUESTS, route="/v1/runs/{run_id}", status_class="4xx", error_code="invalid_api_key") == 1
    assert total(telemetry.REQUESTS, route="unmatched", status_class="4xx") == 1
    assert len(memory.observations(telemetry.REQUEST_DURATION)) == 6
    assert all(0 <= s < 5 for s in memory.observations(telemetry.REQUEST_DURATION))


def test_a_request_refused_before_routing_is_named_by_an_included_routers_template(memory: MemoryBackend) -> None:
    router = APIRouter(prefix="/v1")

    @router.get("/runs/{run_id}")
    async def get_run(run_id: str) -> JSONResponse:
        return JSONResponse({"id": run_id})

    api = FastAPI()
    api.include_router(router)

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse(errors.AuthenticationFailed("no key").to_body(), status_code=401)(scope, receive, send)

    async def go(routes: Any) -> None:
        app = RequestMetrics(refuse, Metrics("app"), [], routes)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/v1/runs/run_xyz")).status_code == 401

    run(go(api.routes))  # FastAPI nests the router's routes: not found there
    assert memory.total(telemetry.REQUESTS, route="unmatched", status_class="4xx") == 1
    run(go([*router.routes, *api.routes]))  # what the Gateway passes
    assert memory.total(telemetry.REQUESTS, route="/v1/runs/{run_id}", status_class="4xx") == 1


def test_error_codes_are_bounded() -> None:
    assert error_code(b'{"error": {"code": "rate_limited"}}') == "rate_limited"
    assert error_code(b'{"detail": "x"}') == "unknown"
    assert error_code(b"not json") == "unknown"
    assert error_code(b'{"error": {"code": "Robert\'); DROP TABLE"}}') == "unknown"


# -- the model call path ----------------------------------------------------------------------------


def model(name: str, *fallbacks: str) -> OpenAIModel:
    return OpenAIModel(provider="openai", name=name, base_url="http://127.0.0.1:1/v1", fallback_models=list(fallbacks))


def chat(name: str = "a", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_model_calls_record_tokens_fallbacks_and_first_token(memory: MemoryBackend) -> None:
    metrics = Metrics("app")
    workers = FakeWorkers(script={"a": [errors.UpstreamTimeout("slow")]})
    calls = ModelCalls([model("a", "b"), model("b")], workers, metrics=metrics)

    async def go() -> None:
        await calls.complete(chat())  # a times out, b answers
        chunks = await calls.stream(chat("b", stream=True))
        async for _ in chunks:
            pass

    run(go())
    assert memory.total(telemetry.FALLBACKS, model="a", fallback="b", reason="upstream_timeout") == 1
    assert memory.total(telemetry.TOKENS, model="b", kind="prompt") == 2 * USAGE.prompt_tokens
    assert memory.total(telemetry.TOKENS, model="b", kind="completion") == 2 * USAGE.completion_tokens
    assert memory.total(telemetry.TOKENS, model="a") == 0
    assert len(memory.observations(telemetry.FIRST_TOKEN, model="b")) == 1


# -- workers -----------------------------------------------------------------------------------------


OK = {"id": "x", "object": "chat.completion", "model": "up", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
      "total_tokens": 5}, "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}]}


def test_upstream_calls_retries_429s_and_breaker(memory: MemoryBackend) -> None:
    metrics = Metrics("app")
    answers = [httpx2.Response(429, json={"error": {}}, headers={"retry-after": "0"}),
               httpx2.Response(500, json={"error": {}}), httpx2.Response(200, json=OK),
               httpx2.Response(503, json={"error": {}}), httpx2.Response(503, json={"error": {}})]

    def handler(_: httpx2.Request) -> httpx2.Response:
        return answers.pop(0)

    config = OpenAIModel(provider="openai", name="m", base_url="http://127.0.0.1:1/v1", max_retries=2,
                         breaker_threshold=2, breaker_cooldown_s=60)
    guard = UpstreamGuard("m", budget=None, limiter=None, metrics=metrics,
                          breaker=CircuitBreaker(threshold=2, cooldown_s=60))
    provider = OpenAIProvider(config, api_key=None, guard=guard, metrics=metrics,
                              http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
                              backoff=BackoffPolicy(base_s=0.001, cap_s=0.002))
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    async def go() -> None:
        await provider.chat(dict(body))  # 429, 500, then 200
        with pytest.raises(errors.CircuitOpen):  # 503, 503: the breaker opens before the third try
            await provider.chat(dict(body))
        await provider.close()

    run(go())
    calls = memory.total
    assert calls(telemetry.UPSTREAM_CALLS, model="m", outcome="rate_limited") == 1
    assert calls(telemetry.UPSTREAM_CALLS, model="m", outcome="error") == 3
    assert calls(telemetry.UPSTREAM_CALLS, model="m", outcome="ok") == 1
    assert calls(telemetry.UPSTREAM_RETRIES, model="m") == 4
    assert len(memory.observations(telemetry.UPSTREAM_LATENCY, model="m")) == 5
    assert calls(telemetry.BREAKER_OPENS, model="m") == 1
    assert memory.total(telemetry.BREAKER_STATE, model="m") == 2  # open


# -- the RateLimiter -------------------------------------------------------------------------------------


def test_limiter_records_waits_refusals_pauses_and_samples_state(memory: MemoryBackend) -> None:
    async def go() -> None:
        limiter = RateLimiter(AdmissionConfig(), MetricsConfig(per_key_label=True))
        limits = Budget(rpm=60, rpm_burst=1.0)
        share = Share(tenant="t")

        async def book(budget: str, *asks: BookingAsk) -> list[Any]:
            answers: list[Any] = []
            async for batch in limiter.reserve(ReserveRequest(budget=budget, limits=limits, asks=list(asks))):
                answers += batch
            return answers

        # The restart rule: a budget first seen has refilled since the limiter's start; up for an
        # hour, the limiter gives a fresh budget its whole burst (here 1 call, then a slot a second).
        limiter.core.started_at = time.monotonic() - 3600
        first = await book("model:m", BookingAsk(requests=1, tokens=0, max_wait_s=5, share=share))
        queued = await book("model:m", BookingAsk(requests=1, tokens=0, max_wait_s=5, share=share))
        refused = await book("key:key_1", BookingAsk(requests=1, tokens=0, max_wait_s=0),
                             BookingAsk(requests=1, tokens=0, max_wait_s=0))
        assert first[0].granted and queued[0].granted and not refused[-1].granted
        await limiter.pause("model:m", 30)
        await limiter.sample_metrics()
        if limiter.sampler is not None:
            limiter.sampler.cancel()

    run(go())
    waits = memory.observations(telemetry.LIMITER_WAIT, budget="model", model="m")
    assert len(waits) == 2 and waits[0] < 0.1 and 0.5 < waits[1] < 1.5  # the second waited its slot
    assert len(memory.observations(telemetry.LIMITER_WAIT, budget="key", key="key_1")) == 1
    assert memory.total(telemetry.LIMITER_REFUSALS, budget="key", key="key_1") == 1
    assert memory.total(telemetry.LIMITER_PAUSES, model="m") == 1
    assert 28 < memory.total(telemetry.LIMITER_PAUSED, model="m") <= 30
    assert memory.total(telemetry.LIMITER_QUEUED, model="m") == 0


# -- the run store -----------------------------------------------------------------------------------


def test_run_moves_reach_the_observer_once_committed(tmp_path: Path, memory: MemoryBackend) -> None:
    metrics = Metrics("app")
    moves: list[Any] = []

    def observe(move: Any) -> None:
        moves.append(move)
        metrics.run_moved(move.task, move.event.value, move.status.value, move.lease_expired)

    with RunStore(tmp_path / "runs.sqlite3", max_attempts_total=2, observer=observe) as store:
        now = time.time()
        a, _ = store.create_run(task="t", input={}, owner="o", idempotency_key=None, now=now)
        b, _ = store.create_run(task="t", input={}, owner="o", idempotency_key=None, now=now)
        claimed = store.claim(worker_id="w", lease_s=1, now=now, limit=2)
        assert store.complete(a.id, claimed[0].lease_token or "", result={}, usage={}, now=now)
        # b's lease expires: requeued at the next claim, started again, expires again: failed.
        again = store.claim(worker_id="w", lease_s=1, now=now + 2)
        assert [r.id for r in again] == [b.id]
        assert store.claim(worker_id="w", lease_s=1, now=now + 4) == []
        assert store.get(b.id, None).status == "failed"
        c, _ = store.create_run(task="u", input={}, owner="o", idempotency_key=None, now=now)
        store.cancel(c.id, None, now=now)
        stats = store.queue_stats(now=now + 10)
        assert stats.by_status == {} and stats.oldest_queued_age_s == 0
        d, _ = store.create_run(task="u", input={}, owner="o", idempotency_key=None, now=now + 5)
        stats = store.queue_stats(now=now + 10)
        assert stats.by_status == {"queued": 1} and stats.oldest_queued_age_s == pytest.approx(5)
        del d

    assert memory.total(telemetry.RUN_ATTEMPTS, task="t") == 3
    assert memory.total(telemetry.RUNS_FINISHED, task="t", status="succeeded") == 1
    assert memory.total(telemetry.RUNS_FINISHED, task="t", status="failed") == 1
    assert memory.total(telemetry.RUN_LEASE_EXPIRIES, task="t") == 2
    assert memory.total(telemetry.RUNS_FINISHED, task="u", status="cancelled") == 1


def test_a_rolled_back_move_is_not_observed(tmp_path: Path) -> None:
    moves: list[Any] = []
    with RunStore(tmp_path / "runs.sqlite3", observer=moves.append) as store:
        run_record, _ = store.create_run(task="t", input={}, owner="o", idempotency_key=None)
        original = store._db.transaction

        def failing() -> Any:
            class Failing:
                def __enter__(self) -> Any:
                    self.tx = original()
                    return self.tx.__enter__()

                def __exit__(self, *exc: Any) -> Any:
                    self.tx.__exit__(RuntimeError, RuntimeError("commit failed"), None)
                    raise RuntimeError("commit failed")
            return Failing()

        store._db.transaction = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            store.cancel(run_record.id, None)
        store._db.transaction = original  # type: ignore[method-assign]
        assert moves == []
        store.cancel(run_record.id, None)
        assert [(m.event.value, m.status.value) for m in moves] == [("cancel", "cancelled")]
