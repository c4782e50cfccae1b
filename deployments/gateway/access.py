"""The Gateway's outermost ASGI layer: the request's id, and its access line.

``RequestIds`` runs before anything else of the app, so every response the app sends carries
``X-Request-ID`` — the refusals of ``AuthGate`` and ``BodySizeLimit``, the exception handlers'
errors, 500s and streams alike — and every log line the request causes, here or in a replica it
reaches, carries the same id (``deployments.request_ids``). Per request it costs one pass over the
header list, at most one random id, and two ``perf_counter`` reads.

Through Serve's own HTTP proxy the proxy has already chosen the id (the client's ``X-Request-ID``,
else one of its own) and puts it on the response itself; the app then uses that id and adds no
second header — unless the client's value fails our check, in which case the request goes by an id
of ours, sent as a second ``X-Request-ID``.

The access line (``logs.access_log``; off by default, Serve's log handlers make it cost ~90 µs of
CPU): one INFO line per request on the ``ray.serve`` logger when the response has ended (a stream:
when its last byte went out or the client left) — method, route, status, latency, model and key id,
never the key. Routes add the model to ``scope["state"]``.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import request_ids
from deployments.gateway.caller import Caller

logger = logging.getLogger("ray.serve")
HEADER = b"x-request-id"


def client_request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-ID``, if it is sane; the first one if several were sent."""
    for name, value in scope["headers"]:
        if name == HEADER:
            candidate: str = value.decode("latin-1")
            return candidate if request_ids.is_sane(candidate) else None
    return None


class RequestIds:
    """ASGI middleware: the request's id (see the module docstring) and its access line."""

    def __init__(self, app: ASGIApp, app_name: str = "", access_log: bool = False) -> None:
        self.app = app
        self.app_name = app_name
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        proxied = request_ids.current()
        if proxied is not None and request_ids.is_sane(proxied):
            request_id, header, token = proxied, None, None  # Serve's proxy answers with this id itself
        else:
            request_id = client_request_id(scope) or request_ids.new_request_id()
            header = (HEADER, request_id.encode())
            # No route: Serve's handles tag their request metrics with the context's route, and a
            # raw path (a run id in it, or any bytes a client sends) is unbounded and may not be
            # ASCII, which Ray's metric recorder refuses with a UnicodeEncodeError (a 500).
            token = request_ids.use(request_id, app_name=self.app_name)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 499  # stays if no response went out: the client left first (nginx's code for it)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if header is not None:
                    message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                self.log(scope, state, status, time.perf_counter() - started)
            if token is not None:
                request_ids.reset(token)  # nothing of this request's context outlives it

    @staticmethod
    def log(scope: Scope, state: dict[str, object], status: int, elapsed_s: float) -> None:
        caller = state.get("caller")
        key_id = caller.owner if isinstance(caller, Caller) else "-"
        model = state.get("model") or "-"
        latency_ms = round(elapsed_s * 1000, 1)
        logger.info(
            "%s %s %d %.1fms model=%s key_id=%s", scope["method"], scope["path"], status, latency_ms, model, key_id,
            extra={"method": scope["method"], "path": scope["path"], "status": status, "latency_ms": latency_ms,
                   "model": model, "key_id": key_id},
        )
