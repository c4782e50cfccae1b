from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployments.core.retry import BackoffPolicy, parse_retry_after


@given(attempt=st.integers(1, 30), seed=st.integers(0, 1000))
def test_backoff_is_bounded_by_the_exponential_ceiling(attempt: int, seed: int) -> None:
    policy = BackoffPolicy(base_s=0.2, cap_s=8, rng=random.Random(seed))
    assert 0 <= policy.delay(attempt) <= min(8, 0.2 * 2 ** (attempt - 1))


def test_retry_after_wins() -> None:
    assert BackoffPolicy().delay(1, retry_after=3.0) == 3.0


def test_parse_retry_after_delta_seconds() -> None:
    assert parse_retry_after("2", cap_s=60) == 2.0
    assert parse_retry_after(" 1.5 ", cap_s=60) == 1.5
    assert parse_retry_after("0", cap_s=60) == 0.0
    assert parse_retry_after(None, cap_s=60) is None


def test_parse_retry_after_http_date() -> None:
    now = 1_445_412_450.0  # Wed, 21 Oct 2015 07:27:30 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", cap_s=60, now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", cap_s=60, now=now) == 0.0  # in the past
    assert parse_retry_after("Wed, 21 Oct 2015 09:00:00 GMT", cap_s=60, now=now) == 60.0  # capped


@pytest.mark.parametrize("value", ["inf", "Infinity", "-inf", "nan", "-1", "1e308", "9" * 400, "soon", ""])
def test_parse_retry_after_untrustworthy_values_are_capped(value: str) -> None:
    assert parse_retry_after(value, cap_s=60) == 60.0
