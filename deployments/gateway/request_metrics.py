"""ASGI middleware: every HTTP request the Gateway answers, counted and timed (``promptfleet_requests``,
``promptfleet_request_duration_seconds``).

It is the outermost layer of the Gateway's app, so it sees what clients see on the Gateway's own
listener and through Serve's proxy alike — 401s from the key check and 413s for large bodies
included, which never reach a route. Clients talk to the Gateway's listener, so Serve's own HTTP
metrics never see this traffic.

Labels, all bounded: ``route`` is the route's template (``/v1/runs/{run_id}``, never the path a
client sent; ``unmatched`` for no route), ``model`` the requested model when a route names one
(``other`` for a name that is not configured), the status class (``2xx``…), and the ``code`` of an
error answer (our own, from ``deployments.errors``). The latency runs to the end of the response:
for a stream, its last event.

A route names the model in ``scope["state"]["model"]`` (``note_model``; the access line reads it
too). The error code is read from the answer itself (an error body is small JSON), so nothing else
in the Gateway has to report it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.telemetry import OTHER, Metrics

MODEL_KEY = "model"  # what routes put in scope["state"] (the access line reads it too)
UNMATCHED = "unmatched"
MAX_ERROR_BODY = 8192
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def note_model(request: Request, model: str) -> None:
    """Tell the request metrics which model the request asked for."""
    setattr(request.state, MODEL_KEY, model)


def error_code(body: bytes) -> str:
    """The ``error.code`` of an OpenAI-shaped error body ("unknown" when there is none)."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return code if isinstance(code, str) and _CODE.match(code) else "unknown"


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, models: Iterable[str], routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.models = frozenset(models)
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.metrics.enabled:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # if the app fails before answering, Starlette answers 500
        error_body: list[bytes] = []

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status >= 400 and message["type"] == "http.response.body":
                if sum(map(len, error_body)) < MAX_ERROR_BODY:
                    error_body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            state: dict[str, Any] = scope.get("state") or {}
            model = state.get(MODEL_KEY) or ""
            if model and model not in self.models:
                model = OTHER
            caller = state.get("caller")
            self.metrics.request(
                self.route(scope),
                model,
                status,
                error_code(b"".join(error_body)) if status >= 400 else "",
                getattr(caller, "key_id", None),
                time.monotonic() - started,
            )

    def route(self, scope: Scope) -> str:
        """The template of the route that served the request (looked up when none was reached:
        refused before routing, e.g. 401 or 413)."""
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                return str(getattr(candidate, "path", UNMATCHED))
        return UNMATCHED
