"""Request ids at the Gateway's edge without Ray: RequestIds around AuthGate and BodySizeLimit.

The serve tier (tests/serve/test_request_ids.py) checks the same in the real Gateway, and that the
id reaches the worker's log.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from deployments import request_ids
from deployments.config import LogsConfig
from deployments.core.requestids import MAX_LENGTH, is_sane
from deployments.gateway.access import RequestIds
from deployments.logs import RequestIdFilter
from tests.unit.conftest import Records
from tests.unit.test_edge import GOOD_KEY, make_app, run

AUTH = {"Authorization": f"Bearer {GOOD_KEY}"}


def send(*requests: tuple[str, str, dict[str, str], bytes]) -> list[httpx.Response]:
    app, _, _ = make_app(limit=1024)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=RequestIds(app, "app", access_log=True)),
                                     base_url="http://t") as client:
            return [await client.request(method, path, headers=headers, content=body)
                    for method, path, headers, body in requests]

    responses: list[httpx.Response] = run(scenario())
    return responses


def test_sane_ids_are_kept_others_replaced() -> None:
    assert is_sane("a") and is_sane("A-z_0.9:x") and is_sane("x" * MAX_LENGTH)
    for bad in ("", " ", "a b", "a/b", "é", "x" * (MAX_LENGTH + 1), "a\n"):
        assert not is_sane(bad), bad
    first, second, bad = send(
        ("POST", "/v1/echo", {**AUTH, "X-Request-ID": "mine-1"}, b"hi"),
        ("POST", "/v1/echo", AUTH, b"hi"),
        ("POST", "/v1/echo", {**AUTH, "X-Request-ID": "not mine"}, b"hi"),
    )
    assert first.headers.get_list("x-request-id") == ["mine-1"]
    generated = second.headers["x-request-id"]
    assert len(generated) == 32 and generated != bad.headers["x-request-id"] != "not mine"


def test_refusals_of_the_inner_layers_carry_the_id_in_header_and_body() -> None:
    no_key, too_large = send(
        ("POST", "/v1/echo", {"X-Request-ID": "r-401"}, b"hi"),
        ("POST", "/v1/echo", {**AUTH, "X-Request-ID": "r-413"}, b"x" * 2000),
    )
    for response, request_id, status in ((no_key, "r-401", 401), (too_large, "r-413", 413)):
        assert response.status_code == status
        assert response.headers["x-request-id"] == request_id
        assert response.json()["error"]["request_id"] == request_id


def test_nothing_of_a_requests_id_outlives_it() -> None:
    send(("POST", "/v1/echo", {**AUTH, "X-Request-ID": "gone-after"}, b"hi"))
    assert request_ids.current() is None


def test_one_access_line_per_request_with_key_id_never_the_key(serve_log: Records) -> None:
    lines = serve_log
    send(("POST", "/v1/echo", {**AUTH, "X-Request-ID": "acc-1"}, b"hi"),
         ("POST", "/v1/echo", {"X-Request-ID": "acc-2"}, b"hi"))
    access: list[dict[str, Any]] = [r.__dict__ for r in lines.records if hasattr(r, "latency_ms")]
    assert [(a["status"], a["key_id"], a["method"], a["path"]) for a in access] == [
        (200, "key_0000000000000001", "POST", "/v1/echo"), (401, "-", "POST", "/v1/echo")]
    assert all(GOOD_KEY not in r.getMessage() for r in lines.records)
    assert "POST /v1/echo 200" in lines.records[0].getMessage()


def test_the_access_line_is_off_unless_turned_on(serve_log: Records) -> None:
    assert LogsConfig().access_log is False  # ~90 µs of CPU per request: the operator's choice
    lines = serve_log
    app, _, _ = make_app()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=RequestIds(app, "app")),
                                     base_url="http://t") as client:
            await client.post("/v1/echo", headers=AUTH, content=b"hi")

    run(scenario())
    assert not [r for r in lines.records if hasattr(r, "latency_ms")]


def test_json_lines_carry_the_id_and_the_access_fields(serve_log: Records) -> None:
    from ray._common.formatters import JSONFormatter  # what Serve writes with `encoding: JSON`

    serve_log.addFilter(RequestIdFilter())  # what deployments.logs adds to Serve's replica handler
    send(("POST", "/v1/echo", {**AUTH, "X-Request-ID": "json-1"}, b"hi"))
    (record,) = [r for r in serve_log.records if hasattr(r, "latency_ms")]
    line = json.loads(JSONFormatter().format(record))
    assert {k: line[k] for k in ("request_id", "method", "path", "status", "key_id", "model")} == {
        "request_id": "json-1", "method": "POST", "path": "/v1/echo", "status": 200,
        "key_id": "key_0000000000000001", "model": "-"}
    assert line["latency_ms"] >= 0 and GOOD_KEY not in json.dumps(line)

