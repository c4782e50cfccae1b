"""Fixtures shared by the unit tests: the run store's backends and stores, the replica log's records."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.store import RunStore
from tests.unit.runstores import OpenStore

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


@pytest.fixture
def open_store(fresh_location: Callable[[], str]) -> Iterator[OpenStore]:
    """Opens a RunStore on a new database (or on ``location``, to reopen one); closes them all."""
    stores: list[RunStore] = []

    def open_(location: str | None = None, **kwargs: Any) -> RunStore:
        stores.append(RunStore(location or fresh_location(), **kwargs))
        return stores[-1]

    yield open_
    for opened in stores:
        opened.close()


@pytest.fixture
def store(open_store: OpenStore) -> RunStore:
    return open_store()


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
