"""The replicas' garbage-collector threshold (``deployments.collector``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from deployments import collector


@pytest.fixture(autouse=True)
def restored_threshold() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_first_generation_is_raised_and_the_older_ones_kept() -> None:
    gc.set_threshold(700, 10, 10)
    collector.raise_first_generation()
    assert gc.get_threshold() == (collector.FIRST_GENERATION, 10, 10)


def test_a_higher_threshold_set_by_someone_else_stays() -> None:
    gc.set_threshold(collector.FIRST_GENERATION * 2, 5, 20)
    collector.raise_first_generation()
    assert gc.get_threshold() == (collector.FIRST_GENERATION * 2, 5, 20)
