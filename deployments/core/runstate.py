"""The run state machine: which status changes a run (one execution of a task) may make.

Pure and tiny on purpose. ``TaskStore`` asks ``transition`` before every status write, so the
rules live in one place and are property-tested without a database.

    queued ──start──▶ running ──succeed──▶ succeeded
      │  ◀──requeue──   │  ──fail─────▶ failed
      └──cancel──▶ cancelled ◀──cancel──┘

``attempt`` counts starts: it grows by one on every ``start`` (a claim by a worker) and never
otherwise, so a run requeued after a lost lease shows ``attempt == 2`` once it runs again.
Terminal states (succeeded, failed, cancelled) accept no event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "InvalidTransition",
    "RunEvent",
    "RunState",
    "RunStatus",
    "transition",
]


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunEvent(StrEnum):
    START = "start"  # a worker claimed the run
    SUCCEED = "succeed"  # output validated and stored
    FAIL = "fail"  # permanent failure (task failed, attempts exhausted, …)
    REQUEUE = "requeue"  # lease expired, released on shutdown, or retryable failure
    CANCEL = "cancel"  # the owner cancelled it


TERMINAL: frozenset[RunStatus] = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

TRANSITIONS: dict[tuple[RunStatus, RunEvent], RunStatus] = {
    (RunStatus.QUEUED, RunEvent.START): RunStatus.RUNNING,
    (RunStatus.QUEUED, RunEvent.CANCEL): RunStatus.CANCELLED,
    (RunStatus.RUNNING, RunEvent.SUCCEED): RunStatus.SUCCEEDED,
    (RunStatus.RUNNING, RunEvent.FAIL): RunStatus.FAILED,
    (RunStatus.RUNNING, RunEvent.REQUEUE): RunStatus.QUEUED,
    (RunStatus.RUNNING, RunEvent.CANCEL): RunStatus.CANCELLED,
}
"""Every allowed (status, event) pair and the status it leads to; anything else is invalid."""


class InvalidTransition(ValueError):
    """An event that the run's current status does not allow (e.g. completing a cancelled run)."""


@dataclass(frozen=True, slots=True)
class RunState:
    """The part of a run the state machine looks at."""

    status: RunStatus = RunStatus.QUEUED
    attempt: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def transition(state: RunState, event: RunEvent) -> RunState:
    """The state after ``event``; raises ``InvalidTransition`` if ``state`` does not allow it."""
    target = TRANSITIONS.get((state.status, event))
    if target is None:
        raise InvalidTransition(f"cannot {event.value} a run that is {state.status.value}")
    attempt = state.attempt + 1 if event is RunEvent.START else state.attempt
    return RunState(status=target, attempt=attempt)
