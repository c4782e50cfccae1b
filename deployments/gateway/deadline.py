"""How long a request may wait for its slot: the deadline a client gives, or the model's default.

Honoured, first found wins:

* ``X-Request-Timeout: <seconds>`` — promptfleet's own header; a value that is
  not a number in (0, 86400] is a 400 naming the header.
* ``X-Stainless-Read-Timeout: <seconds>`` — what the official openai-python
  client sends with every request: the read timeout of its ``timeout`` option
  (``openai.OpenAI(timeout=…)`` or per call; its default is 600). A value we
  cannot read is ignored, never an error: it is the SDK's header, not the user's.

The wait is the client's timeout, capped at ``admission.max_wait_s``; without
one, the model's ``admission_wait_s``. A request whose slot starts later than
that gets 429 at once, with the wait as Retry-After; one whose slot fits waits
for it. (A slot counts as fitting when it *starts* before the client's timeout:
the call itself then runs into the client's own timeout like any other.)

The headers are read by hand rather than declared as a FastAPI ``Header`` dependency: on the
chat route that dependency cost ~50 µs of the Gateway's ~2 ms CPU per request. ``OPENAPI``
documents the header on the route instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from deployments.errors import InvalidRequest
from deployments.limits.metering import admission_wait

__all__ = ["OPENAPI", "admission_wait", "client_timeout"]

REQUEST_TIMEOUT_HEADER = "x-request-timeout"
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"
MAX_TIMEOUT_S = 86400.0

# The route's `openapi_extra`: the header as /docs shows it.
OPENAPI: dict[str, Any] = {
    "parameters": [{
        "name": "X-Request-Timeout",
        "in": "header",
        "required": False,
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
        "description": "Seconds this client waits for the answer; a request that would wait longer for "
        "its rate-limit slot gets 429 with Retry-After instead. Default: the openai SDK's "
        "`X-Stainless-Read-Timeout`, else the model's `admission_wait_s`.",
    }]
}


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S else None


def client_timeout(headers: Mapping[str, str]) -> float | None:
    """The client's timeout in seconds, if it gave one (``headers``: lower-case names, as Starlette's)."""
    ours = headers.get(REQUEST_TIMEOUT_HEADER)
    if ours is not None:
        seconds = _seconds(ours)
        if seconds is None:
            raise InvalidRequest(
                f"{REQUEST_TIMEOUT_HEADER}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}].",
                param=REQUEST_TIMEOUT_HEADER,
            )
        return seconds
    sdk = headers.get(SDK_TIMEOUT_HEADER)
    return _seconds(sdk) if sdk is not None else None
