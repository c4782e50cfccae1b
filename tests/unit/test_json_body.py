"""The /v1 routers read JSON bodies with pydantic's parser (``deployments.gateway.json_body``): a lone
UTF-16 surrogate is refused with our 400 before the route runs; everything else reads as before."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.testclient import TestClient

from deployments.gateway.ingress import render_error, validation_error
from deployments.gateway.json_body import v1_router


class Body(BaseModel):
    text: str
    n: int = 0


@pytest.fixture
def client() -> TestClient:
    router = v1_router("test")
    seen: list[Body] = []

    @router.post("/echo")
    async def echo(body: Body) -> dict[str, Any]:
        seen.append(body)
        return {"text": body.text, "n": body.n, "calls": len(seen)}

    api = FastAPI()

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render_error(validation_error(exc, request.headers.get("content-type")))

    api.include_router(router)
    return TestClient(api)


@pytest.mark.parametrize("escaped", [r"\ud800 hello", r"\udfff", r"a\ud83d"])
def test_a_lone_surrogate_is_a_400_that_says_so_and_the_route_never_runs(client: TestClient, escaped: str) -> None:
    response = client.post("/v1/echo", content=f'{{"text": "{escaped}"}}'.encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    # pydantic's words ("unexpected end of hex escape", "lone leading surrogate …") and where.
    assert error["message"].startswith("The request body is not valid JSON: ") and "line 1 column" in error["message"]
    assert client.post("/v1/echo", json={"text": "ok"}).json()["calls"] == 1  # the refused body never reached it


def test_a_surrogate_pair_big_numbers_and_repeated_keys_read_as_json_loads_reads_them(client: TestClient) -> None:
    body = rb'{"text": "\ud83d\ude00", "n": 1, "n": 123456789012345678901234567890}'
    response = client.post("/v1/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "\U0001F600", "n": 123456789012345678901234567890, "calls": 1}


def test_broken_json_says_where(client: TestClient) -> None:
    response = client.post("/v1/echo", content=b'{"text": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "line 1 column" in response.json()["error"]["message"]


def test_a_json_object_under_another_content_type_is_told_its_content_type(client: TestClient) -> None:
    response = client.post("/v1/echo", content=b'{"text": "x"}', headers={"content-type": "text/plain"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "The request body was sent as text/plain, not JSON: send a JSON object with Content-Type: application/json.")


def test_a_body_nested_past_the_parsers_depth_reads_as_before_and_its_schema_refuses_it(client: TestClient) -> None:
    deep = "[" * 400 + "]" * 400  # past pydantic's ~200 levels, within json.loads's 1,000
    response = client.post("/v1/echo", content=f'{{"text": "x", "n": {deep}}}'.encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"  # the field named, as json.loads's reading gave it
