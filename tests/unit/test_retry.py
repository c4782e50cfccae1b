from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from deployments.core.retry import BackoffPolicy, parse_retry_after


@given(attempt=st.integers(1, 30), seed=st.integers(0, 1000))
def test_backoff_is_bounded_by_the_exponential_ceiling(attempt: int, seed: int) -> None:
    policy = BackoffPolicy(base_s=0.2, cap_s=8, rng=random.Random(seed))
    assert 0 <= policy.delay(attempt) <= min(8, 0.2 * 2 ** (attempt - 1))


def test_retry_after_wins() -> None:
    assert BackoffPolicy().delay(1, retry_after=3.0) == 3.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
