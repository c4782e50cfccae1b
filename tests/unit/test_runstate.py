"""The run state machine: the transition table, and properties of random event sequences."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.core.runstate import (
    TERMINAL,
    InvalidTransition,
    RunEvent,
    RunState,
    RunStatus,
    transition,
)

Q, R, S, F, C = (
    RunStatus.QUEUED,
    RunStatus.RUNNING,
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
)
ALLOWED = {
    (Q, R),
    (Q, C),
    (R, S),
    (R, F),
    (R, Q),
    (R, C),
}
events = st.lists(st.sampled_from(list(RunEvent)), max_size=40)


def test_terminal_states() -> None:
    assert TERMINAL == {S, F, C}
    assert RunState().status is Q and RunState().attempt == 0


# The brief's table, spelled out independently of the module's TRANSITIONS.
EXPECTED = {
    (Q, RunEvent.START): R,
    (Q, RunEvent.CANCEL): C,
    (R, RunEvent.SUCCEED): S,
    (R, RunEvent.FAIL): F,
    (R, RunEvent.REQUEUE): Q,
    (R, RunEvent.CANCEL): C,
}


@pytest.mark.parametrize("status", list(RunStatus))
@pytest.mark.parametrize("event", list(RunEvent))
def test_table_is_exactly_the_allowed_moves(status: RunStatus, event: RunEvent) -> None:
    state = RunState(status, attempt=1)
    if (status, event) not in EXPECTED:
        with pytest.raises(InvalidTransition) as info:
            transition(state, event)
        assert event.value in str(info.value) and status.value in str(info.value)
        return
    after = transition(state, event)
    assert after.status is EXPECTED[status, event]
    assert after.attempt == (2 if event is RunEvent.START else 1)
    assert {(s, t) for (s, _), t in EXPECTED.items()} == ALLOWED


def _allowed(state: RunState, event: RunEvent) -> bool:
    try:
        transition(state, event)
    except InvalidTransition:
        return False
    return True


def test_invalid_transition_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError):
        transition(RunState(S), RunEvent.START)
    exc = InvalidTransition("cannot start a run that is succeeded")
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)


@settings(max_examples=200, deadline=None)
@given(events)
def test_random_event_sequences(sequence: list[RunEvent]) -> None:
    state = RunState()
    starts = 0
    for event in sequence:
        before = state
        try:
            state = transition(state, event)
        except InvalidTransition:
            assert state == before  # a rejected event changes nothing
            continue
        assert not before.terminal, "a terminal state accepted an event"
        assert (before.status, state.status) in ALLOWED
        assert state.attempt >= before.attempt, "attempt decreased"
        if event is RunEvent.START:
            starts += 1
            assert state.status is R
        assert state.attempt == starts, "attempt must count starts exactly"
    if state.terminal:
        for event in RunEvent:
            with pytest.raises(InvalidTransition):
                transition(state, event)


@settings(max_examples=100, deadline=None)
@given(events)
def test_running_only_after_a_start(sequence: list[RunEvent]) -> None:
    # Whatever happens, a run is only ever running with at least one start behind it.
    state = RunState()
    for event in sequence:
        if _allowed(state, event):
            state = transition(state, event)
        assert state.status is not R or state.attempt >= 1
