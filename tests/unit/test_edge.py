"""The Gateway's ASGI edge without Ray: AuthGate (the key before the body) and BodySizeLimit (413).

The layers wrap a small FastAPI app here; the Authenticator gets an in-process key store. The
serve tier (tests/security) runs the same layers in the real Gateway behind real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.types import Message, Receive, Scope, Send

from deployments.clients.keys import KeysClient
from deployments.config import AuthConfig
from deployments.gateway.auth import Authenticator
from deployments.gateway.caller import Caller, get_caller
from deployments.gateway.ingress import AuthGate, BodySizeLimit
from deployments.store.keys import ApiKey, KeySnapshot, hash_key

GOOD_KEY = "pf-good"


class Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class KeyStore:
    """The TaskStore's ``key_snapshot`` (what the Authenticator's key index polls), in process:
    one valid key; counts the round trips."""

    def __init__(self) -> None:
        self.lookups = 0
        self.key_snapshot = Remote(self._snapshot)

    async def _snapshot(self, known_version: int | None, with_usage: bool = True) -> KeySnapshot:
        self.lookups += 1
        key = ApiKey(id="key_0000000000000001", name="t", hint="good", created_at=0, revoked_at=None,
                     rpm=None, tpm=None, token_budget=None)
        return KeySnapshot(version=1, keys=None if known_version == 1 else {hash_key(GOOD_KEY): key},
                           tokens_used={} if with_usage else None)


def make_app(limit: int = 1024) -> tuple[Any, dict[str, int], KeyStore]:
    api = FastAPI()
    reads = {"body_messages": 0}

    @api.post("/v1/echo")
    async def echo(request: Request) -> dict[str, Any]:
        caller: Caller = await get_caller(request)
        body = await request.body()
        return {"owner": caller.owner, "bytes": len(body)}

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                reads["body_messages"] += 1
            return message

        await api(scope, counted, send)

    store = KeyStore()
    auth = Authenticator(AuthConfig(enabled=True), KeysClient(store), admin_key="pf-admin")
    return AuthGate(BodySizeLimit(counting, limit=limit), auth), reads, store


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def test_no_key_is_401_in_the_openai_shape_before_the_body_is_read() -> None:
    app, reads, store = make_app()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for headers in ({}, {"Authorization": "Bearer pf-wrong"}, {"Authorization": "Basic abc"}):
                response = await client.post("/v1/echo", content=chunks(10_000), headers=headers)
                assert response.status_code == 401
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
                assert response.headers["connection"] == "close"  # the server stops reading the body
            assert reads["body_messages"] == 0
            ok = await client.post("/v1/echo", content=b"hello", headers={"Authorization": f"Bearer {GOOD_KEY}"})
            assert ok.status_code == 200 and ok.json() == {"owner": "key_0000000000000001", "bytes": 5}
            assert reads["body_messages"] >= 1  # read once authenticated

    run(scenario())
    # The index is loaded once; a miss re-checks at most once per period (tests/unit/test_auth.py
    # proves distinct bogus keys cost no call each); none for the admin or a missing key.
    assert 1 <= store.lookups <= 2


def test_chunked_body_over_the_limit_is_413_in_the_openai_shape() -> None:
    app, _, _ = make_app(limit=1024)
    auth = {"Authorization": f"Bearer {GOOD_KEY}"}

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            chunked = await client.post("/v1/echo", content=chunks(5000), headers=auth)
            assert chunked.status_code == 413, chunked.text
            assert chunked.json()["error"]["code"] == "request_too_large"
            declared = await client.post("/v1/echo", content=b"y" * 2000, headers=auth)
            assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
            under = await client.post("/v1/echo", content=chunks(1024), headers=auth)
            assert under.status_code == 200 and under.json()["bytes"] == 1024

    run(scenario())


@pytest.mark.parametrize("path", ["/healthz", "/docs", "/nope"])
def test_paths_outside_v1_need_no_key(path: str) -> None:
    app, _, store = make_app()

    async def scenario() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get(path)).status_code

    assert run(scenario()) != 401 and store.lookups == 0
