"""Raw ASGI plumbing of the fake upstream: reading a request, answering JSON, errors and SSE.

Plain ASGI, no framework, keeps the fake cheap on the hot path. Error bodies have the OpenAI shape
(``{"error": {"message", "type", "param", "code"}}``); an SSE answer can be cut short on purpose
(the ``drop_stream`` fault).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON: Headers = [(b"content-type", b"application/json")]
_SSE: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def header_value(scope: Message, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: Any, headers: Headers | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON + headers if headers else _JSON})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def respond_error(send: Send, status: int, message: str, type_: str, code: str,
                        headers: Headers | None = None) -> None:
    error = {"message": message, "type": type_, "param": None, "code": code}
    await respond(send, status, {"error": error}, headers)


async def respond_events(send: Send, events: list[bytes], drop: bool, interval_s: float = 0.0) -> None:
    """An SSE answer, ``interval_s`` between events; with ``drop``, its first two events and then a
    truncated body."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    for i, data in enumerate(events[:2] if drop else events):
        if interval_s and i:
            await asyncio.sleep(interval_s)
        await send({"type": "http.response.body", "body": data, "more_body": True})
    if not drop:  # returning mid-body makes uvicorn close the connection: a truncated stream
        await send({"type": "http.response.body", "body": b""})
