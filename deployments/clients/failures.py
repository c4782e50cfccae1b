"""Ray's failures of a handle call, as promptfleet errors: the one mapping every client uses.

A call through a ``DeploymentHandle`` can fail before the deployment answers anything — its queue
is full, the replica or its node died with the call in flight, no replica can take calls. Those
are Ray's exceptions, not ours; left alone they reach a client as a bare 500 on one path and as
something else on another. Every typed client (``deployments.clients``) and the model-call path
(``deployments.model_calls``, for the workers) turn them into the same errors here:

    Ray raises                                      the caller gets (Retry-After: 1 s)
    BackPressureError (the handle's queue is full)  Overloaded 503  "<who> is at capacity; retry shortly."
    RayActorError (ActorDiedError,                  Overloaded 503  "<who> is temporarily unavailable;
      ActorUnavailableError), WorkerCrashedError,                    retry shortly."
      NodeDiedError (the replica, its process or
      its node died; Serve replaces it),
      DeploymentUnavailableError,
      ReplicaUnavailableError (no replica to take
      it), GetTimeoutError (no answer in time)

Both are ``Overloaded``: transient (a model call falls back to the next model, a queued run goes
back to the queue) and ``before_upstream`` (a batch line is tried again), and the HTTP answer
carries Retry-After. Nothing about the request was wrong, and a replacement replica may well
take it. A call that died mid-way may have taken effect already, exactly as before this mapping:
a model call is at-least-once, and a run submitted with an ``Idempotency-Key`` is created once.

Anything else is not mapped: a ``RayTaskError`` (the deployment's code raised unexpectedly) is a
bug, a bare 500 whose traceback stays in the log. Expected errors are not exceptions at all on
the way back — shells return them as values (``deployments.core.replies``) and ``answer`` raises
them on the caller's side.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from ray.exceptions import GetTimeoutError, NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from deployments.core.replies import unwrap
from deployments.errors import Overloaded, PromptfleetError

__all__ = ["BUSY", "WORKER_GONE", "answer", "at_capacity", "failure", "gone", "overloaded", "unavailable"]

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1.0

# The deployment's queue is full (``max_queued_requests``): it is there, and busy.
BUSY: tuple[type[BaseException], ...] = (BackPressureError,)

# The replica (ActorDiedError, ActorUnavailableError are RayActorErrors), its worker process or its
# node died with the call in flight, or no replica can take it; Serve replaces them. Nothing about
# the request: transient.
WORKER_GONE: tuple[type[BaseException], ...] = (
    RayActorError, WorkerCrashedError, NodeDiedError, DeploymentUnavailableError, ReplicaUnavailableError,
    GetTimeoutError,
)


def at_capacity(who: str) -> Overloaded:
    return Overloaded(f"{who} is at capacity; retry shortly.", retry_after=RETRY_AFTER_S)


def gone(who: str) -> Overloaded:
    return Overloaded(f"{who} is temporarily unavailable; retry shortly.", retry_after=RETRY_AFTER_S)


def overloaded(model: str) -> Overloaded:
    """A model's workers are at capacity (the model-call path's words for ``at_capacity``)."""
    return at_capacity(f"Model '{model}'")


def unavailable(model: str) -> Overloaded:
    """A model's worker died with the call in flight, or has no replica (``gone``)."""
    return gone(f"Model '{model}'")


def failure(exc: BaseException, who: str) -> PromptfleetError | None:
    """The promptfleet error for Ray's failure ``exc`` of a call to ``who``; None: not one of Ray's."""
    if isinstance(exc, BUSY):
        return at_capacity(who)
    if isinstance(exc, WORKER_GONE):
        logger.warning("%s: call lost (%s); answering 503", who, type(exc).__name__)
        return gone(who)
    return None


async def answer(response: Awaitable[Any], who: str) -> Any:
    """The result of one handle call: Ray's failures mapped (above), an error value raised."""
    try:
        reply = await response
    except (*BUSY, *WORKER_GONE) as exc:
        mapped = failure(exc, who)
        assert mapped is not None
        raise mapped from None
    return unwrap(reply)
