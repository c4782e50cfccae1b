"""TaskStore (the TaskStore deployment's class) on each backend, without Ray.

The class is plain Python under the Serve decorator that ``deployments/app.py`` applies, so a
test builds it directly and awaits its methods on one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from deployments.config import DATABASE_URL_ENV, TasksConfig
from deployments.core.runstate import RunStatus
from deployments.store.postgres import PostgresDatabase
from deployments.store.sqlite import SqliteDatabase
from deployments.task_store import TaskStore
from tests.postgres import PostgresServer


def service_config(location: str, tmp_path: Path) -> TasksConfig:
    if location.startswith("postgresql://"):
        return TasksConfig(database_url=location, state_dir=str(tmp_path / "unused"), lease_s=5)
    return TasksConfig(state_dir=str(Path(location).parent), lease_s=5)


def test_create_claim_complete_get(fresh_location: Callable[[], str], tmp_path: Path) -> None:
    config = service_config(fresh_location(), tmp_path)

    async def scenario() -> None:
        service = TaskStore(config)
        try:
            key, _ = await service.create_key("ci", None, None, None)
            run, created = await service.create_run("classify", {"text": "hi"}, key.id, "idem-1")
            assert created and run.status is RunStatus.QUEUED
            again, created = await service.create_run("classify", {"text": "hi"}, key.id, "idem-1")
            assert not created and again.id == run.id

            waiting = asyncio.ensure_future(service.get(run.id, key.id, wait_s=10))
            (claimed,) = await service.claim("runner-1", limit=4, wait_s=1)
            assert (claimed.id, claimed.status, claimed.attempt) == (run.id, RunStatus.RUNNING, 1)
            assert claimed.lease_token is not None
            assert await service.renew(run.id, claimed.lease_token)
            result = {"task": "classify", "output": {"label": "a"}, "model": "m", "attempts": 1}
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            assert await service.complete(run.id, claimed.lease_token, result, usage, key.id)
            assert not await service.complete(run.id, claimed.lease_token, result, usage, key.id)

            done = await asyncio.wait_for(waiting, timeout=5)  # the long-poll woke on completion
            assert (done.status, done.result, done.usage) == (RunStatus.SUCCEEDED, result, usage)
            assert (await service.get(run.id, key.id)) == done
            assert await service.claim("runner-1", limit=1, wait_s=0) == []
            # A run's usage is billed call by call by the model call path, not again on completion.
            assert await service.usage(key.id) == []
            assert await service.get_key(key.id) == key
            assert await service.get_key("key_0000000000000000") is None
        finally:
            service.db.shutdown(wait=True)
            service.database.close()

    asyncio.run(scenario())


def test_the_backend_follows_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    service = TaskStore(TasksConfig(state_dir=str(tmp_path)))
    assert isinstance(service.database, SqliteDatabase)
    assert service.database.location == str(tmp_path / "tasks.sqlite3")
    service.database.close()
    service.db.shutdown()


def test_the_database_url_can_come_from_the_environment(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = postgres_server.fresh_url()
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    service = TaskStore(TasksConfig(state_dir=str(tmp_path)))
    try:
        assert isinstance(service.database, PostgresDatabase)
        assert "***" in service.database.location  # logged: the password is masked
        assert postgres_server.password not in service.database.location
        assert not (tmp_path / "tasks.sqlite3").exists()
    finally:
        service.database.close()
        service.db.shutdown()
