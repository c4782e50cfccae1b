"""How long a request may wait for its slot: the deadline a client gives, or the model's default.

Honoured, first found wins:

* ``X-Request-Timeout: <seconds>`` — promptfleet's own header; a value that is
  not a positive number is a 400 naming the header.
* ``X-Stainless-Read-Timeout: <seconds>`` — what the official openai-python
  client sends with every request: the read timeout of its ``timeout`` option
  (``openai.OpenAI(timeout=…)`` or per call; its default is 600). A value we
  cannot read is ignored, never an error: it is the SDK's header, not the user's.

The wait is the client's timeout, capped at ``admission.max_wait_s``; without
one, the model's ``admission_wait_s``. A request whose slot starts later than
that gets 429 at once, with the wait as Retry-After; one whose slot fits waits
for it. (A slot counts as fitting when it *starts* before the client's timeout:
the call itself then runs into the client's own timeout like any other.)
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Header

from deployments.metering import admission_wait

__all__ = ["admission_wait", "client_timeout"]

REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
SDK_TIMEOUT_HEADER = "X-Stainless-Read-Timeout"


async def client_timeout(
    x_request_timeout: Annotated[
        float | None,
        Header(
            gt=0,
            le=86400,
            description="Seconds this client waits for the answer; a request that would wait longer for "
            "its rate-limit slot gets 429 with Retry-After instead. Default: the openai SDK's "
            "`X-Stainless-Read-Timeout`, else the model's `admission_wait_s`.",
        ),
    ] = None,
    x_stainless_read_timeout: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> float | None:
    """The client's timeout in seconds, if it gave one (a FastAPI dependency)."""
    if x_request_timeout is not None:
        return x_request_timeout
    if x_stainless_read_timeout is not None:
        try:
            value = float(x_stainless_read_timeout)
        except ValueError:
            return None
        if math.isfinite(value) and value > 0:
            return value
    return None
