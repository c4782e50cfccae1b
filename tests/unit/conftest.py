"""Fixtures shared by the unit tests: the run store's backends, the replica log's records."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def fresh_location(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes, at each call, the location of a new and empty database of the backend under test:
    a SQLite file path, or a URL into a fresh schema of the session's PostgreSQL server."""
    if request.param == "postgres":
        fresh_url: Callable[[], str] = request.getfixturevalue("postgres_server").fresh_url
        return fresh_url
    numbers = itertools.count()
    return lambda: str(tmp_path / f"db{next(numbers)}" / "tasks.sqlite3")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serve_log() -> Iterator[Records]:
    """What is logged at INFO and above on the ``ray.serve`` logger (the replica log) meanwhile."""
    handler, logger = Records(), logging.getLogger("ray.serve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
