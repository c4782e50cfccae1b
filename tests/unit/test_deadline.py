"""The deadline a request waits for its slot within: the client's header, else the model's default."""

from __future__ import annotations

import asyncio

import pytest

from deployments.gateway.deadline import admission_wait, client_timeout


@pytest.mark.parametrize(
    ("ours", "sdk", "expected"),
    [
        (None, None, None),
        (2.5, None, 2.5),
        (2.5, "600", 2.5),  # ours wins
        (None, "600.0", 600.0),  # what openai-python sends by default
        (None, "nonsense", None),  # the SDK's header is never a reason for a 400
        (None, "-1", None),
        (None, "inf", None),
    ],
)
def test_client_timeout(ours: float | None, sdk: str | None, expected: float | None) -> None:
    assert asyncio.run(client_timeout(ours, sdk)) == expected


def test_admission_wait_is_the_clients_else_the_models_capped() -> None:
    assert admission_wait(None, 30.0, 300.0) == 30.0
    assert admission_wait(1.0, 30.0, 300.0) == 1.0
    assert admission_wait(600.0, 30.0, 300.0) == 300.0
