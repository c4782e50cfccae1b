"""The promptfleet exception tree, and its one mapping to HTTP.

Every error a client can see is one of these classes. Each carries the HTTP
``status_code``, the OpenAI error ``type`` and a stable ``code``; the Gateway
renders them as ``{"error": {"message", "type", "param", "code", "request_id"}}``,
the body openai-python's ``APIStatusError`` parses (it takes the id from the
``X-Request-ID`` header). Anything else that escapes (a bug, another process's
exception) becomes a bare 500 whose text never reaches the client.

    PromptfleetError                    500 internal_error
    ├── InvalidRequest                  400 invalid_request      (param names the field)
    │   ├── RequestTooLarge             413 request_too_large
    │   ├── RequestTimeout              408 request_timeout      (headers or body not sent in time)
    │   └── RangeNotSatisfiable         416 range_not_satisfiable (a download's Range header)
    ├── AuthenticationFailed            401 invalid_api_key
    ├── PermissionDenied                403 permission_denied
    │   └── QuotaExceeded               403 quota_exceeded       (stored files, concurrent batches)
    ├── NotFound                        404 not_found
    │   ├── ModelNotFound               404 model_not_found
    │   ├── TaskNotFound                404 task_not_found
    │   └── RunNotFound                 404 run_not_found
    ├── MethodNotAllowed                405 method_not_allowed
    ├── Conflict                        409 conflict             (idempotency key reuse, …)
    ├── TaskFailed                      422 task_failed          (output never validated)
    │   └── TemplateFailed              422 template_error       (the task's template raised)
    ├── RateLimited                     429 rate_limited         (Retry-After; a key's rpm/tpm)  R
    │   ├── ModelRateLimited            429 model_rate_limited   (a model's rpm/tpm or pause)  T R
    │   └── UpstreamRateLimited         429 upstream_rate_limited (the upstream said 429)      T
    ├── UpstreamError                   502 upstream_error                                     T
    ├── Overloaded                      503 overloaded           (Retry-After)                 T R
    │   └── CircuitOpen                 503 circuit_open                                       T R
    └── UpstreamTimeout                 504 upstream_timeout                                   T

Two class attributes say what a caller may do about an error, so no module keeps its own list:

- ``transient`` (T): the failure belongs to the model side and may pass — the model call path
  (``deployments.model_calls``) falls back to the next model, a queued run goes back to the
  queue instead of failing. ``TRANSIENT`` is the tuple of these classes, for ``except``.
- ``before_upstream`` (R): a refusal of our own that happened before any upstream call (a
  key's or model's budget, backpressure, an open circuit), so trying again later costs no
  upstream call. The batch job re-tries only these: the provider's ``max_retries`` is the one
  layer that re-calls an upstream.

These cross Ray process boundaries (worker → gateway), so every class must
survive ``pickle``: all state lives in ``__init__`` keyword arguments that
``__reduce__`` hands back. ``tests/unit/test_errors.py`` round-trips each one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any


class PromptfleetError(Exception):
    """Base of every error promptfleet reports to a client."""

    status_code = 500
    type = "internal_error"
    code = "internal_error"
    transient = False
    before_upstream = False

    def __init__(
        self,
        message: str = "Internal error.",
        *,
        param: str | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        # Extra, client-safe data added to the error body (e.g. a task's last raw output).
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.param, self.retry_after, self.details),
        )

    def to_body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.details:
            error.update(self.details)
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After is whole seconds (RFC 9110); round up so clients never retry early. The openai
        # SDKs read the precise `retry-after-ms` first (openai-python _base_client._parse_retry_after_header).
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after))),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after * 1000))),
        }


# The labels pydantic puts in an error's location for the member of a union it tried
# (``str``, ``list[…]``, ``literal['none','auto']``, ``function-after[…]``, a model's class name):
# not fields, so not part of the ``param`` a client is told.
_UNION_LABEL = re.compile(r"^(?:str|int|float|bool|bytes|none|[A-Z][A-Za-z0-9_]*|[a-z-]+\[.*\])$", re.DOTALL)


def field_path(loc: Iterable[str | int]) -> str:
    """A pydantic error location as the dotted field path a client sent (``messages.0.content``)."""
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and _UNION_LABEL.match(part)))


def _rebuild(
    cls: type[PromptfleetError],
    message: str,
    param: str | None,
    retry_after: float | None,
    details: dict[str, Any] | None,
) -> PromptfleetError:
    return cls(message, param=param, retry_after=retry_after, details=details)


class InvalidRequest(PromptfleetError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class RequestTimeout(InvalidRequest):
    status_code = 408
    code = "request_timeout"


class RangeNotSatisfiable(InvalidRequest):
    status_code = 416
    code = "range_not_satisfiable"


class AuthenticationFailed(PromptfleetError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(PromptfleetError):
    status_code = 403
    type = "permission_error"
    code = "permission_denied"


class QuotaExceeded(PermissionDenied):
    code = "quota_exceeded"


class NotFound(PromptfleetError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class MethodNotAllowed(PromptfleetError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(PromptfleetError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class TaskFailed(PromptfleetError):
    status_code = 422
    type = "task_error"
    code = "task_failed"


class TemplateFailed(TaskFailed):
    """A task's template raised while rendering (the task's fault, or its input's: ``1/0``, a blocked
    attribute): the run cannot start, and saying why beats a 500."""

    code = "template_error"


class RateLimited(PromptfleetError):
    """Over a key's rpm/tpm: the key's own limit, so another model would not help."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limited"
    before_upstream = True


class ModelRateLimited(RateLimited):
    """The model's configured rpm/tpm, or the model-wide pause after an upstream 429, would not
    let the call start within its deadline; nothing was sent upstream."""

    code = "model_rate_limited"
    transient = True


class UpstreamRateLimited(RateLimited):
    """The upstream answered 429 (after the provider's own retries)."""

    code = "upstream_rate_limited"
    transient = True
    before_upstream = False


class UpstreamError(PromptfleetError):
    status_code = 502
    type = "upstream_error"
    code = "upstream_error"
    transient = True


class Overloaded(PromptfleetError):
    status_code = 503
    type = "overloaded_error"
    code = "overloaded"
    transient = True
    before_upstream = True


class CircuitOpen(Overloaded):
    code = "circuit_open"


class UpstreamTimeout(PromptfleetError):
    status_code = 504
    type = "timeout_error"
    code = "upstream_timeout"
    transient = True


def all_error_classes() -> list[type[PromptfleetError]]:
    """Every class in the tree, for tests and docs."""
    seen: list[type[PromptfleetError]] = []
    stack: list[type[PromptfleetError]] = [PromptfleetError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return seen


TRANSIENT: tuple[type[PromptfleetError], ...] = tuple(c for c in all_error_classes() if c.transient)
