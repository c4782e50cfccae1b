"""Fixtures shared by the unit tests: the run store's backends."""

from __future__ import annotations

import itertools
from collections.abc import Callable
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
