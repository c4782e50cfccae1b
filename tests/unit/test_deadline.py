"""The deadline a request waits for its slot within: the client's header, else the model's default."""

from __future__ import annotations

import pytest

from deployments.errors import InvalidRequest
from deployments.gateway.deadline import admission_wait, client_timeout


@pytest.mark.parametrize(
    ("ours", "sdk", "expected"),
    [
        (None, None, None),
        ("2.5", None, 2.5),
        ("2.5", "600", 2.5),  # ours wins
        (None, "600.0", 600.0),  # what openai-python sends by default
        (None, "nonsense", None),  # the SDK's header is never a reason for a 400
        (None, "-1", None),
        (None, "inf", None),
        ("86400", None, 86400.0),
    ],
)
def test_client_timeout(ours: str | None, sdk: str | None, expected: float | None) -> None:
    headers = {name: value for name, value in
               (("x-request-timeout", ours), ("x-stainless-read-timeout", sdk)) if value is not None}
    assert client_timeout(headers) == expected


@pytest.mark.parametrize("ours", ["soon", "0", "-1", "nan", "inf", "86401"])
def test_a_bad_own_header_is_a_400_naming_it(ours: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client_timeout({"x-request-timeout": ours, "x-stainless-read-timeout": "600"})
    assert raised.value.param == "x-request-timeout"


def test_admission_wait_is_the_clients_else_the_models_capped() -> None:
    assert admission_wait(None, 30.0, 300.0) == 30.0
    assert admission_wait(1.0, 30.0, 300.0) == 1.0
    assert admission_wait(600.0, 30.0, 300.0) == 300.0
