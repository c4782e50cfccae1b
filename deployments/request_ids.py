"""Request ids: which id a request goes by, and how it travels between processes.

Every HTTP request gets one id (``deployments.gateway.access.RequestIds``): the client's
``X-Request-ID`` when it is a sane value (``is_sane``), a fresh 32-hex-digit random id otherwise. A
queued run keeps the id of the request that submitted it; a batch line goes by
``<prefix>-<line number>`` (``jobs.batch``).

The id travels in Ray Serve's own request context (``ray.serve.context``): a ``DeploymentHandle``
call copies the caller's context into the request it sends, and the replica that serves it runs
with that context, whose ``request_id`` Serve's log formatter writes on every line of the
``ray.serve`` logger (``request_id=…`` in TEXT, a ``request_id`` field in JSON). So setting it
once, where the request enters, labels the log lines of every replica the request reaches —
Gateway, TaskRunner, TaskStore, ModelWorker. A ``ModelCall`` also carries its id explicitly, and
the worker puts it back in its context (``use``): calls that start outside any request (a queued
run, a batch line) are labelled by their own id too.

``ray.serve.context`` is not a public API; it is the context Serve's own proxy sets from
``X-Request-ID`` (ray/serve/_private/proxy.py) and its log filter reads
(ray/serve/_private/logging_utils.py ``ServeContextFilter``), unchanged in Ray 2.60.
"""

from __future__ import annotations

import dataclasses
from contextvars import Token
from typing import Any

from ray.serve import context as serve_context

from deployments.core.requestids import MAX_LENGTH, is_sane, new_request_id

__all__ = ["MAX_LENGTH", "current", "is_sane", "new_request_id", "reset", "use"]


def current() -> str | None:
    """The id of the request this code serves (Serve's request context), if there is one."""
    context = serve_context._serve_request_context.get()
    return context.request_id if context is not None and context.request_id else None


def use(request_id: str, route: str = "", app_name: str = "") -> Token[Any]:
    """Serve the rest of this task (and the handle calls it makes) under ``request_id``; the token
    undoes it (``reset``)."""
    context = serve_context._serve_request_context.get()
    if context is not None and context.request_id == request_id and not route and not app_name:
        # A worker serving its caller's request: the handle call brought the context already.
        same: Token[Any] = serve_context._serve_request_context.set(context)
        return same
    if context is None:  # the Gateway's own listener: no Serve request around this one
        context = serve_context._RequestContext(route=route, request_id=request_id, app_name=app_name)
    else:
        changes = {"request_id": request_id}
        if route:
            changes["route"] = route
        if app_name:
            changes["app_name"] = app_name
        context = dataclasses.replace(context, **changes)
    token: Token[Any] = serve_context._serve_request_context.set(context)
    return token


def reset(token: Token[Any]) -> None:
    serve_context._serve_request_context.reset(token)
