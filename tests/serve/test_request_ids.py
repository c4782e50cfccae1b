"""Request ids end to end (issue 12): X-Request-ID round trip, the id in the worker's log, in error
bodies, on runs; and /healthz, /readyz."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.fixtures import ADMIN_KEY, ServeApp, logged
from tests.waiting import wait_for

HELLO = [{"role": "user", "content": "hello"}]
GENERATED = re.compile(r"[0-9a-f]{32}")


def test_a_sane_client_id_comes_back_and_is_in_the_serving_workers_log(app: ServeApp) -> None:
    with app.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fake", messages=HELLO, extra_headers={"X-Request-ID": "client-id_1.2:3"}
        )
        assert raw.headers["x-request-id"] == "client-id_1.2:3"
        assert raw.parse().choices[0].message.content == "echo: hello"
    # The process that made the call logged it under the id: for an upstream model, the Gateway
    # replica itself (deployments/direct_transport.py).
    wait_for(lambda: logged("promptfleet_Gateway_", "client-id_1.2:3 -- served fake"), 30,
             message="the call's log line")
    (worker_log,) = logged("promptfleet_Gateway_", "client-id_1.2:3 -- served fake")
    line = next(x for x in worker_log.read_text().splitlines() if "client-id_1.2:3 -- served fake" in x)
    assert "hello" not in line  # no prompt in logs unless logs.content
    # And the Gateway wrote its access line for it: method, route, status, model, key id.
    access = "client-id_1.2:3 -- POST /v1/chat/completions 200"
    wait_for(lambda: logged("promptfleet_Gateway_", access), 30, message="the access line")
    (gateway_log,) = logged("promptfleet_Gateway_", access)
    line = next(x for x in gateway_log.read_text().splitlines() if access in x)
    assert line.endswith("model=fake key_id=anonymous") and "ms model=" in line


@pytest.mark.parametrize("sent", [None, "", "has space", "a/b", "x" * 129, "é"])
def test_a_missing_or_insane_id_is_replaced_not_echoed(app: ServeApp, sent: str | None) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent.encode()}
    response = httpx.get(f"{app.base_url}/models", headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
    assert GENERATED.fullmatch(response.headers["x-request-id"]), response.headers


def test_every_error_carries_the_id_in_header_and_body(app: ServeApp) -> None:
    with app.client() as openai_client, pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="nope", messages=HELLO, extra_headers={"X-Request-ID": "e-404"})
    assert caught.value.request_id == "e-404"  # openai-python reads the header
    assert isinstance(caught.value.body, dict) and caught.value.body["request_id"] == "e-404"
    with httpx.Client(timeout=30) as client:
        cases = {
            "e-400": client.post(f"{app.base_url}/chat/completions", json={"model": "fake"},
                                 headers={"X-Request-ID": "e-400"}),
            "e-404r": client.get(f"{app.base_url}/no/such/route", headers={"X-Request-ID": "e-404r"}),
            "e-405": client.delete(f"{app.base_url}/models", headers={"X-Request-ID": "e-405"}),
            "e-413": client.post(f"{app.base_url}/chat/completions", content=b"x" * 2_000_000,
                                 headers={"X-Request-ID": "e-413", "Content-Type": "application/json"}),
            "e-401": client.get(f"{app.auth_base_url}/models", headers={"X-Request-ID": "e-401"}),
            # A path that is not ASCII (what a fuzzer sends): it must not reach a metric tag, which
            # Ray refuses to record (it was a 500 while the path was Serve's request-context route).
            "e-404u": client.get(f"{app.base_url}/runs/%C2%83%C3%81%F2%99%99%B2%C3%A0%3B%17%C3%B4",
                                 headers={"X-Request-ID": "e-404u"}),
        }
    for request_id, response in cases.items():
        assert 400 <= response.status_code < 500, (request_id, response.status_code, response.text)
        assert response.headers["x-request-id"] == request_id, (request_id, response.headers)
        assert response.json()["error"]["request_id"] == request_id, (request_id, response.text)


def test_streams_and_the_serve_proxy_carry_one_id(app: ServeApp) -> None:
    with httpx.stream("POST", f"{app.base_url}/chat/completions", timeout=30, headers={"X-Request-ID": "s-1"},
                      json={"model": "fake", "messages": HELLO, "stream": True}) as response:
        assert response.headers["x-request-id"] == "s-1" and "[DONE]" in response.read().decode()
    proxied = httpx.get(f"{app.proxy_url}/v1/models", headers={"X-Request-ID": "p-1"}, timeout=30)
    assert proxied.headers.get_list("x-request-id") == ["p-1"]


def test_a_runs_record_and_its_model_calls_carry_the_submitting_requests_id(app: ServeApp) -> None:
    with httpx.Client(base_url=app.base_url, timeout=60) as client:
        submitted = client.post("/tasks/label_fake/submit", json={"input": {"text": "x"}},
                                headers={"X-Request-ID": "run-req-1"})
        assert submitted.status_code == 202 and submitted.json()["request_id"] == "run-req-1"
        run = client.get(f"/runs/{submitted.json()['id']}", params={"wait": 30}).json()
    assert run["request_id"] == "run-req-1" and run["status"] in ("succeeded", "failed")
    # An upstream model's call is made (and logged) by the TaskRunner that ran the run.
    wait_for(lambda: logged("promptfleet_TaskRunner_", "run-req-1 -- served fake"), 30,
             message="the run's call in the TaskRunner's log")


def test_liveness_is_cheap_and_readiness_says_per_model_and_store(app: ServeApp) -> None:
    live = httpx.get(f"{app.url}/healthz", timeout=10)
    assert live.status_code == 200 and live.json()["status"] == "ok" and "models" not in live.json()
    ready = httpx.get(f"{app.url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ok" and body["store"] == "ok"
    assert body["models"]["fake"] == {"replicas": "up", "upstream": "ok"}
    assert body["models"]["smollm2"] == {"replicas": "up", "upstream": "local"}
    # `fake-dead` points at a port nobody listens on: its replica is up, its upstream is not.
    assert body["models"]["fake-dead"] == {"replicas": "up", "upstream": "unreachable"}
    auth_ready = httpx.get(f"{app.auth_base_url.removesuffix('/v1')}/readyz", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert auth_ready.status_code == 200 and set(auth_ready.json()["models"]) == {"fake", "fake-capped", "fake-shared"}


def test_no_prompt_output_or_key_reaches_any_replica_log(app: ServeApp) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "zebra-prompt-7731"}]}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Request-ID": "quiet-1"}
    reply = httpx.post(f"{app.auth_base_url}/chat/completions", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200 and "zebra-prompt-7731" in reply.text
    wait_for(lambda: logged("promptfleet-auth_Gateway_", "quiet-1 -- POST"), 30, message="the access line")
    wait_for(lambda: logged("promptfleet-auth_Gateway_", "quiet-1 -- served fake"), 30, message="the call's line")
    for secret in ("zebra-prompt-7731", ADMIN_KEY):
        assert not logged("", secret), secret  # no replica's log, of either app, holds it
