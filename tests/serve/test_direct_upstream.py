"""The Gateway calls upstream models from its own process (``deployments.direct_transport``), on a
running cluster: an application of this module only, with two Gateway replicas on one listener
(SO_REUSEPORT spreads new connections over both), models on the fake upstream falling back to one
another, and one with an ``rpm`` limit that both Gateways must share through the RateLimiter.
Streams billed when the client leaves early are ``test_tenant_metering``'s (the auth app's
Gateway takes the same path)."""

from __future__ import annotations

import bisect
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster import local
from deployments.direct_transport import QUEUE_FACTOR
from deployments.limits.pacing import window_capacity
from tests.fixtures import TEST_TASKS, ServeApp, beside, free_port, logged
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

APP = "promptfleet-direct"
RPM = 120
HELLO = [{"role": "user", "content": "hello"}]
# The models' upstream key, as a user's shell holds it: `promptfleet start` copies it into the
# deployments that call the upstream (``cluster.local.with_secrets``); this module deploys the same way.
KEY_ENV, KEY = "PF_TEST_DIRECT_KEY", "direct-upstream-secret"
TASK = "label_direct"


def direct_app(upstream_base_url: str, state: Path, port: int) -> dict[str, Any]:
    (state / "tasks").mkdir(parents=True, exist_ok=True)
    (state / "tasks" / f"{TASK}.yaml").write_text(
        yaml.safe_dump({**TEST_TASKS["label_fake"], "name": TASK, "model": "direct-b"}))
    common = {"provider": "openai", "base_url": upstream_base_url, "upstream_model": "fake-model",
              "breaker_threshold": 1000, "max_retries": 0, "api_key_env": KEY_ENV}
    zero = {"ray_actor_options": {"num_cpus": 0}}
    return {
        "name": APP,
        "route_prefix": "/direct",
        "import_path": "deployments.app:build_app",
        "runtime_env": {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1"}},
        "args": {
            "gateway": {"listen_host": "127.0.0.1", "listen_port": port},
            "logs": {"access_log": True},
            "tasks": {"definitions_dir": str(state / "tasks"), "state_dir": str(state / "db")},
            "models": [
                {**common, "name": "direct-a", "timeout_s": 2, "fallback_models": ["direct-b"]},
                # Two connections: a queue of runs on a slow upstream fills its places (QUEUE_FACTOR × 2).
                {**common, "name": "direct-b", "timeout_s": 10, "max_concurrency": 2},
                {**common, "name": "direct-limited", "timeout_s": 30, "rpm": RPM},
            ],
        },
        "deployments": [
            {"name": "Gateway", "num_replicas": 2, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskRunner", "num_replicas": 1, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskStore", **zero}, {"name": "BatchService", **zero}, {"name": "RateLimiter", **zero},
        ],
    }


@pytest.fixture(scope="module")
def direct(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    application = direct_app(serve_app.upstream.base_url, tmp_path_factory.mktemp("direct"), port)
    (application,) = local.with_secrets({"applications": [application]}, {KEY_ENV: KEY})["applications"]
    with beside(serve_app, application, f"http://127.0.0.1:{port}/healthz"):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def fake(app: ServeApp) -> Any:
    """The session's fake upstream, reset before the test and settled after it (``app``)."""
    return app.upstream


def chat(base_url: str, model: str, request_id: str | None = None, **body: Any) -> httpx.Response:
    # A new connection every time, so both Gateway replicas take calls.
    headers = {"X-Request-ID": request_id} if request_id else {}
    return httpx.post(f"{base_url}/chat/completions", headers=headers, timeout=60,
                      json={"model": model, "messages": HELLO, **body})


@pytest.mark.parametrize(("mode", "params"), [
    ("rate_limit", {"retry_after": 0}), ("error", {}), ("hang", {}),
])
def test_a_transient_upstream_failure_before_the_first_byte_falls_back(
        direct: str, fake: Any, mode: str, params: dict[str, Any]) -> None:
    for tries, stream in enumerate((False, True), start=1):
        fake.configure(mode=mode, fail_first_n=1, **params)
        response = chat(direct, "direct-a", stream=stream)
        assert response.status_code == 200, response.text
        if stream:
            assert '"model":"direct-b"' in response.text and response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.json()["model"] == "direct-b"
        assert fake.stats()["calls_by_mode"].get(mode) == tries


def test_the_upstream_key_reaches_every_process_that_calls_the_upstream(direct: str, fake: Any) -> None:
    """The Gateway (a chat) and the TaskRunner (a task run) call the upstream themselves, so both need
    the model's key; an upstream that requires it answers 401 to a call without it."""
    fake.configure(api_key=KEY)
    assert chat(direct, "direct-b").status_code == 200
    ran = httpx.post(f"{direct}/tasks/{TASK}/run", json={"input": {"text": "x"}}, timeout=60)
    assert ran.status_code == 200, ran.text
    assert ran.json()["output"] == {"label": "a"} and ran.json()["model"] == "direct-b"
    assert fake.stats()["last_authorization"] == f"Bearer {KEY}"
    # Both calls reached the upstream: a call without the key would have been refused.
    assert fake.stats()["calls"] == 2


def test_queued_runs_past_a_models_places_wait_for_them_and_use_no_extra_start(direct: str, fake: Any) -> None:
    """Three times as many queued runs as the TaskRunner has places for the model, on a slow upstream:
    every one succeeds at its first start, and the upstream never sees more than max_concurrency."""
    fake.configure(mode="slow", delay_s=0.4)
    runs = 3 * QUEUE_FACTOR * 2
    with httpx.Client(base_url=direct, timeout=30) as http:
        ids = [http.post(f"/tasks/{TASK}/submit", json={"input": {"text": f"q{i}"}}).json()["id"] for i in range(runs)]

        def ended(run_id: str) -> dict[str, Any]:
            return http.get(f"/runs/{run_id}", params={"wait": 30}).json()

        done = [ended(run_id) for run_id in ids]
    assert [(r["status"], r["attempt"]) for r in done] == [("succeeded", 1)] * runs, [
        (r["status"], r["attempt"], r.get("error")) for r in done]
    stats = fake.stats()
    assert stats["calls"] == runs and stats["max_in_flight"] <= 2


def test_without_a_fallback_the_failure_has_the_openai_shape(direct: str, fake: Any) -> None:
    fake.configure(mode="error")
    client = openai.OpenAI(base_url=direct, api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="direct-b", messages=HELLO, extra_headers={"X-Request-ID": "d-500"})
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_error" and body["request_id"] == "d-500"
    assert "Traceback" not in caught.value.response.text


def test_a_long_stream_arrives_whole_and_in_order_and_a_stalled_one_at_once(direct: str, fake: Any) -> None:
    """500 chunks the upstream wrote at once travel in few writes (``chat_routes.events``): the client
    still gets every event, in order; a stream whose upstream stalls after two chunks gets them now."""
    fake.configure(stream_chunks=500)
    with openai.OpenAI(base_url=direct, api_key="unused", max_retries=0) as client:  # its pool closed after
        chunks = list(client.chat.completions.create(model="direct-b", messages=HELLO, stream=True))
    assert len(chunks) == 502 and {c.model for c in chunks} == {"direct-b"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ("echo: hello" * 46)[:500]

    fake.configure(mode="stall_stream")
    body = {"model": "direct-b", "messages": HELLO, "stream": True}
    # The read timeout guards against a hang; the upstream sends nothing after its two chunks.
    with httpx.stream("POST", f"{direct}/chat/completions", json=body, timeout=httpx.Timeout(60, read=5)) as answer:
        events = (line for line in answer.iter_lines() if line.startswith("data: "))
        assert '"model":"direct-b"' in next(events) and '"model":"direct-b"' in next(events)


def test_the_request_id_reaches_the_upstream_and_the_gateways_log(direct: str, fake: Any) -> None:
    assert chat(direct, "direct-b", "direct-id-1").status_code == 200
    assert chat(direct, "direct-b", "direct-id-2", stream=True).status_code == 200
    assert fake.stats()["request_ids"] == ["direct-id-1", "direct-id-2"]
    # The call's line is written by the process that made it: a Gateway replica of this app.
    wait_for(lambda: logged(f"{APP}_Gateway_", "direct-id-1 -- served direct-b"), 30,
             message="the call's line in a Gateway log")


def test_an_upstream_rpm_holds_across_two_gateway_replicas(direct: str, fake: Any) -> None:
    """~3× the limit offered through both Gateways: every window stays within the one shared budget."""
    fake.configure(mode="ok", latency_ms=20)
    started = time.time()
    stop_at = time.monotonic() + 10

    def client(n: int) -> list[int]:
        statuses = []
        while time.monotonic() < stop_at:
            statuses.append(chat(direct, "direct-limited", f"lim-{n}-{len(statuses)}").status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = [s for result in pool.map(client, range(12)) for s in result]
    calls = sorted(t for t in fake.stats()["call_times"] if t >= started)
    assert set(statuses) == {200}  # waiting for a slot is not an error
    rate = RPM / 60
    for window in (1.0, 5.0):
        assert max_in_window(calls, window) <= window_capacity(RPM) + rate * window + 1, window
    assert len(calls) >= rate * 10 * 0.7  # the limit is used, not wasted
    # Both replicas called the upstream (each wrote call lines into its own log).
    wait_for(lambda: len(logged(f"{APP}_Gateway_", "served direct-limited")) == 2, 30,
             message="both Gateway replicas to have served the limited model")


def max_in_window(times: list[float], window: float) -> int:
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)
