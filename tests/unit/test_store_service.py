"""TaskStore (the TaskStore deployment's class) on each backend, without Ray.

The class is plain Python under the Serve decorator that ``deployments/app.py`` applies, so a
test builds it directly and awaits its methods on one event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deployments.config import DATABASE_URL_ENV, TasksConfig
from deployments.core.replies import unwrap
from deployments.core.runstate import RunStatus
from deployments.errors import Conflict, RunNotFound
from deployments.schemas import RunList, RunView
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
            key, _ = unwrap(await service.create_key("ci", None, None, None))
            run, created = unwrap(await service.create_run("classify", {"text": "hi"}, key.id, "idem-1"))
            assert created and run.status == "queued"
            again, created = unwrap(await service.create_run("classify", {"text": "hi"}, key.id, "idem-1"))
            assert not created and again.id == run.id

            waiting = asyncio.ensure_future(service.get(run.id, key.id, wait_s=10))
            (claimed,) = unwrap(await service.claim("runner-1", limit=4, wait_s=1))
            assert (claimed.id, claimed.status, claimed.attempt) == (run.id, RunStatus.RUNNING, 1)
            assert claimed.lease_token is not None
            assert await service.renew(run.id, claimed.lease_token) is True
            result = {"task": "classify", "output": {"label": "a"}, "model": "m", "attempts": 1}
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            assert await service.complete(run.id, claimed.lease_token, result, usage, key.id) is True
            assert await service.complete(run.id, claimed.lease_token, result, usage, key.id) is False

            done = unwrap(await asyncio.wait_for(waiting, timeout=5))  # the long-poll woke on completion
            assert isinstance(done, RunView)  # what the Gateway gets: a view, never a lease token
            assert done.usage is not None and done.usage.model_dump() == usage
            assert (done.status, done.result) == ("succeeded", result)
            assert unwrap(await service.get(run.id, key.id)) == done
            assert unwrap(await service.claim("runner-1", limit=1, wait_s=0)) == []
            # A run's usage is billed call by call by the model call path, not again on completion.
            assert unwrap(await service.usage(key.id)).data == []
            assert unwrap(await service.get_key(key.id)) == key
            assert unwrap(await service.get_key("key_0000000000000000")) is None
        finally:
            service.close()

    asyncio.run(scenario())


def test_the_backend_follows_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    service = TaskStore(TasksConfig(state_dir=str(tmp_path)))
    assert isinstance(service.database, SqliteDatabase)
    assert service.database.location == str(tmp_path / "tasks.sqlite3")
    service.close()


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
        service.close()


def test_expected_errors_come_back_as_values(fresh_location: Callable[[], str], tmp_path: Path) -> None:
    """One convention across handles: a 404 or 409 is returned, never raised (no RayTaskError)."""
    config = service_config(fresh_location(), tmp_path)

    async def scenario() -> None:
        service = TaskStore(config)
        try:
            missing = await service.get("run_" + "0" * 24, "alice")
            assert isinstance(missing, RunNotFound) and missing.status_code == 404
            assert isinstance(await service.cancel("nope", "alice"), RunNotFound)
            unwrap(await service.create_run("t", {"a": 1}, "alice", "k"))
            reused = await service.create_run("t", {"a": 2}, "alice", "k")
            assert isinstance(reused, Conflict) and reused.param == "Idempotency-Key"
            page = unwrap(await service.list_runs("alice", None, None, 10, None))
            assert isinstance(page, RunList) and len(page.data) == 1
            assert isinstance(await service.list_runs("alice", None, None, 10, "garbage"), Exception)
        finally:
            service.close()

    asyncio.run(scenario())


def test_a_delayed_release_wakes_waiting_runners_when_it_is_due(tmp_path: Path) -> None:
    config = TasksConfig(state_dir=str(tmp_path), lease_s=60)

    async def scenario() -> None:
        service = TaskStore(config)
        try:
            run, _ = unwrap(await service.create_run("t", {}, "alice", None))
            (claimed,) = unwrap(await service.claim("r", 1, 0))
            assert await service.release(run.id, claimed.lease_token, 0.3) is True
            started = time.monotonic()
            # The long-poll (lease_s 60) wakes when the run becomes claimable, not a lease later.
            (again,) = unwrap(await service.claim("r", 1, 30))
            waited = time.monotonic() - started
            assert again.id == run.id and again.attempt == 2
            assert 0.25 <= waited < 10
        finally:
            service.close()

    asyncio.run(scenario())


def test_renewals_do_not_queue_behind_user_traffic(tmp_path: Path) -> None:
    """Issue 10 item 4: the runners' calls have their own lane; a stuck user lane does not hold them."""
    config = TasksConfig(state_dir=str(tmp_path), lease_s=60)

    async def scenario() -> None:
        service = TaskStore(config)
        release_user_lane = threading.Event()
        try:
            run, _ = unwrap(await service.create_run("t", {}, "alice", None))
            (claimed,) = unwrap(await service.claim("r", 1, 0))
            # The user lane is busy with a slow call, and a long queue of reads waits behind it.
            blocker = asyncio.get_running_loop().run_in_executor(service.user_lane, release_user_lane.wait)
            reads = [asyncio.ensure_future(service.get(run.id, "alice")) for _ in range(200)]
            renewed = await asyncio.wait_for(service.renew(run.id, claimed.lease_token), timeout=5)
            assert renewed is True
            assert not any(read.done() for read in reads)  # they were still queued: renew went first
            release_user_lane.set()
            await blocker
            views = [unwrap(await read) for read in reads]
            assert {view.status for view in views} == {"running"}
        finally:
            release_user_lane.set()
            service.close()

    asyncio.run(scenario())
