"""Request bodies read with pydantic's JSON parser, on every /v1 router (``v1_router``).

FastAPI reads a JSON body with ``json.loads``, which takes a lone UTF-16 surrogate (``"\\ud800"``)
as a string no UTF-8 encoder can write back: a chat with one went to the upstream, was billed, and
its answer failed to encode (a 500, and uvicorn dropped the connection). pydantic's parser refuses
such a body, so the client gets a 400 saying where, before any model call. (The hot chat route's
``FastChat`` already parses with it.) Big integers, ``NaN`` and repeated keys read as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

# pydantic's parser stops at a few hundred levels of nesting.
TOO_DEEP = "recursion limit exceeded"


class PydanticJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as exc:
                if str(exc).startswith(TOO_DEEP):
                    # Read as before: the schemas refuse values nested past 64 levels naming the field,
                    # so such a body is a 400 either way, and no string in it reaches a model.
                    self._json = json.loads(body)
                else:
                    # FastAPI answers JSONDecodeError with a `json_invalid` validation error carrying `msg`.
                    raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from None
        return self._json


class PydanticJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_with_pydantic(request: Request) -> Response:
            return await handler(PydanticJSONRequest(request.scope, request.receive))

        return read_with_pydantic


def v1_router(*tags: str) -> APIRouter:
    """A router of /v1 routes whose JSON bodies pydantic reads."""
    return APIRouter(prefix="/v1", tags=list(tags), route_class=PydanticJSONRoute)
