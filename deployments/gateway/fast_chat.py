"""ASGI layer: the hot route, ``POST /v1/chat/completions`` with a valid JSON body, served below FastAPI.

It sits inside the Gateway's other layers (request id, metrics, auth, body size: they run as for
any route) and in front of the FastAPI app. A request it takes is read, validated with
``ChatCompletionRequest.model_validate_json`` (pydantic's JSON parser: no ``json.loads`` then
validation) and answered by the same ``ChatRoutes.respond`` as the FastAPI route. FastAPI's
routing, body handling and dependency solving cost ~100 µs of CPU per request more than this
(measured in-process, docs/performance.md), about a tenth of what the Gateway spends on one.

Everything else goes to FastAPI untouched, so its behaviour is the route's: another method or
path; a body whose ``Content-Type`` is not ``application/json``; a body that is not valid — its
bytes are handed on as they were read, and the 400 naming the field is FastAPI's, through the
Gateway's handlers. An error raised while answering is rendered as the Gateway's exception
handlers render it (``PromptfleetError`` in the OpenAI shape; anything else a logged bare 500).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import PromptfleetError
from deployments.gateway.chat_routes import CHAT_PATH, ChatRoutes
from deployments.gateway.scopes import route_path
from deployments.schemas import ChatCompletionRequest

logger = logging.getLogger("ray.serve")

JSON = b"application/json"


def is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == JSON)
    return False


class FastChat:
    def __init__(
        self, app: ASGIApp, chat: ChatRoutes, route: BaseRoute | None, render: Callable[[PromptfleetError], Response]
    ) -> None:
        self.app = app
        self.chat = chat
        self.render = render  # the Gateway's ``render_error``
        # Set on the scope as FastAPI's router would: the request metrics read the route's template.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) != CHAT_PATH
                or not is_json(scope)):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left (or the body was over the limit and answered 413): nothing to say
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError:
            await self.app(scope, replay(body, receive), send)
            return
        if self.route is not None:
            scope["route"] = self.route
        try:
            response = await self.chat.respond(request, Request(scope, receive))
        except PromptfleetError as exc:
            response = self.render(exc)
        except Exception:
            logger.exception("unhandled error in gateway")
            response = self.render(PromptfleetError("Internal error."))
        await response(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) first, then whatever ``receive`` gives."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
