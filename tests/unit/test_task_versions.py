"""Task versions in the store (both backends, ``fresh_location``), the catalogue a replica keeps,
and runs pinned to their version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.catalogue import WAIT_S, CatalogueFollower
from deployments.config import TasksConfig
from deployments.core.replies import unwrap
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import canonical, content_hash
from deployments.errors import Conflict, NotFound, Overloaded, TaskNotFound
from deployments.store import RunStore, open_database
from deployments.store.migrations import migrate
from deployments.store.tasks import CataloguePage, TaskVersionStore, VersionInput
from deployments.task_store import TaskStore
from tests.waiting import until


def definition(prompt: str = "Label: {{ text }}", name: str = "label") -> TaskDefinition:
    return TaskDefinition.model_validate({
        "name": name, "description": "d", "model": "m",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "output_schema": {"type": "object"}, "prompt": prompt,
    })


def item(prompt: str = "Label: {{ text }}", name: str = "label", source: str = "# file\n") -> VersionInput:
    defn = definition(prompt, name)
    return VersionInput(name=name, definition=canonical(defn), content_hash=content_hash(defn), source=source)


@pytest.fixture
def store(fresh_location: Callable[[], str]) -> Iterator[TaskVersionStore]:
    with TaskVersionStore(fresh_location()) as versions:
        yield versions


def active(store: TaskVersionStore) -> dict[str, int]:
    page = store.changes(None)
    assert page.after is None and page.full
    return {e.name: e.version for e in page.entries}


def test_seed_creates_version_one_and_redeploys_of_the_same_files_change_nothing(store: TaskVersionStore) -> None:
    assert store.seed([item(), item(name="other")], now=1) == [("label", 1, True), ("other", 1, True)]
    version = store.catalogue_version()
    assert store.seed([item(source="# reformatted, same content\n"), item(name="other")], now=2) == [
        ("label", 1, False), ("other", 1, False)]
    assert store.catalogue_version() == version


def test_push_makes_a_new_active_version_and_a_redeploy_of_unchanged_files_keeps_it(store: TaskVersionStore) -> None:
    store.seed([item()], now=1)
    assert store.push([item("v2: {{ text }}")], author="key_1", now=2) == [("label", 2, True)]
    assert active(store) == {"label": 2}
    assert store.seed([item()], now=3) == [("label", 2, False)]  # the deploy's file did not change
    assert active(store) == {"label": 2}
    # A file changed since the last deploy wins: a new version from the file.
    assert store.seed([item("v3 from the file: {{ text }}")], now=4) == [("label", 3, True)]
    versions, activations = store.history("label")
    assert [(v.version, v.author, v.active) for v in versions] == [(3, "deploy", True), (2, "key_1", False),
                                                                   (1, "deploy", False)]
    assert [(a.action, a.version) for a in activations] == [("deploy", 3), ("push", 2), ("deploy", 1)]


def test_pushing_the_active_content_stores_nothing(store: TaskVersionStore) -> None:
    store.seed([item()], now=1)
    version = store.catalogue_version()
    assert store.push([item(source="# other comments\n")], author="admin") == [("label", 1, False)]
    assert store.catalogue_version() == version


def test_a_push_is_one_transaction(store: TaskVersionStore) -> None:
    store.seed([item()], now=1)
    bad = VersionInput(name="other", definition="{}", content_hash="x", source=None)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 — the engine's NOT NULL error: nothing is stored
        store.push([item("v2: {{ text }}"), bad], author="admin")
    assert active(store) == {"label": 1}


def test_rollback_moves_the_pointer_and_bumps_the_catalogue(store: TaskVersionStore) -> None:
    store.seed([item()], now=1)
    store.push([item("v2: {{ text }}")], author="key_1", now=2)
    before = store.catalogue_version()
    rolled = store.rollback("label", 1, actor="key_2", now=3)
    assert rolled.version == 1 and rolled.active
    assert active(store) == {"label": 1} and store.catalogue_version() == before + 1
    assert store.history("label")[1][0].actor == "key_2"
    with pytest.raises(Conflict):
        store.rollback("label", 1, actor="key_2")
    with pytest.raises(NotFound) as info:
        store.rollback("label", 9, actor="key_2")
    assert info.value.param == "version"
    with pytest.raises(NotFound):
        store.history("nope")


def test_changes_send_definitions_only_when_the_catalogue_changed(store: TaskVersionStore) -> None:
    store.seed([item()], now=1)
    first = store.changes(None)
    assert json.loads(first.entries[0].definition)["prompt"] == "Label: {{ text }}"
    assert store.changes(first.version) == CataloguePage(version=first.version, entries=[], after=None, full=False)
    store.push([item("v2: {{ text }}")], author="admin")
    changed = store.changes(first.version)
    assert [(e.name, e.version) for e in changed.entries] == [("label", 2)] and not changed.full
    assert store.get("label", 1).definition["prompt"] == "Label: {{ text }}" and not store.get("label", 1).active


def test_runs_record_their_task_version(fresh_location: Callable[[], str]) -> None:
    with RunStore(fresh_location()) as runs:
        run, _ = runs.create_run(task="label", input={}, owner="a", idempotency_key=None, task_version=3)
        assert run.task_version == 3 and run.view().task_version == 3
        claimed = runs.claim(worker_id="w", lease_s=10)
        assert claimed[0].task_version == 3
        legacy, _ = runs.create_run(task="label", input={}, owner="a", idempotency_key=None)
        assert legacy.task_version is None


def test_an_existing_runs_table_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    database = open_database(path)
    migrate(database, to=6)  # as a database made before issue 14 (store.migrations)
    with database.transaction() as tx:
        assert "task_version" not in {r["name"] for r in tx.rows("SELECT name FROM pragma_table_info('runs')")}
    database.close()
    with RunStore(path) as runs:
        run, _ = runs.create_run(task="t", input={}, owner="a", idempotency_key=None, task_version=2)
        assert runs.get(run.id, "a").task_version == 2


def test_task_versions_share_the_task_stores_database(tmp_path: Path) -> None:
    database = open_database(tmp_path / "db.sqlite3")
    try:
        TaskVersionStore(database).seed([item()])
        RunStore(database)
        assert TaskVersionStore(database).changes(None).version == 1
    finally:
        database.close()


# -- the catalogue a Gateway or TaskRunner replica follows ----------------------------------


class FakeStore:
    """The two TaskStore calls the follower makes, answered by a real ``TaskVersionStore``."""

    def __init__(self, versions: TaskVersionStore) -> None:
        self.versions = versions
        self.pages = self.fetches = 0
        self.down = False

    async def changes(self, since: int | None, version: int | None, after: str) -> Any:
        self.pages += 1
        if self.down:
            raise ConnectionError("store away")
        return self.versions.changes(since, version, after)

    async def fetch(self, name: str, version: int) -> Any:
        self.fetches += 1
        return self.versions.get(name, version)


def test_catalogue_follows_pushes_and_caches_pinned_versions(tmp_path: Path) -> None:
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.seed([item()])
    fake = FakeStore(versions)
    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=0.01)

    async def scenario() -> None:
        assert (await follower.active("label")).version == 1
        versions.push([item("v2: {{ text }}")], author="admin")
        await follower.refresh()
        entry = await follower.active("label")
        assert (entry.version, entry.definition.prompt) == (2, "v2: {{ text }}")
        fresh = CatalogueFollower(fake.changes, fake.fetch, poll_s=0.01)  # a replica started after the push
        old, number = await fresh.definition("label", 1)  # a run pinned before the push
        assert (old.prompt, number) == ("Label: {{ text }}", 1)
        await fresh.definition("label", 1)
        assert fake.fetches == 1  # versions are immutable: fetched once
        with pytest.raises(TaskNotFound):
            await follower.active("nope")
        fake.down = True
        asked = fake.pages
        follower.start()
        # The loop keeps the last catalogue while the store is away (it asked, and failed, twice).
        await until(lambda: fake.pages >= asked + 2, message="the follower polled the store")
        assert (await follower.active("label")).version == 2
        await follower.stop()

    asyncio.run(scenario())
    versions.close()


def test_catalogue_before_its_first_load_answers_503(tmp_path: Path) -> None:
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    fake = FakeStore(versions)
    fake.down = True
    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=1)
    with pytest.raises(Overloaded):
        asyncio.run(follower.active("label"))
    versions.close()


def test_a_stored_definition_that_no_longer_loads_keeps_the_last_good_one(tmp_path: Path) -> None:
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.seed([item(), item(name="other")])
    fake = FakeStore(versions)
    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=1)

    async def scenario() -> None:
        await follower.refresh()
        versions.push([VersionInput(name="label", definition='{"name": "label"}', content_hash="h", source=""),
                       item("v2: {{ text }}", name="other")], "admin")
        await follower.refresh()
        assert follower.catalogue.get("label").version == 1 and follower.catalogue.get("other").version == 2
        assert follower.status().not_loaded == ["label"]
        fresh = CatalogueFollower(fake.changes, fake.fetch, poll_s=1)  # a new replica: the good ones only
        await fresh.refresh()
        assert sorted(fresh.catalogue.tasks) == ["other"] and fresh.status().not_loaded == ["label"]

    asyncio.run(scenario())
    versions.close()


@pytest.mark.parametrize("name", ["x\x00y", "Upper", "a" * 65, "../etc"])
def test_names_no_task_can_have_are_not_found_before_any_sql(store: TaskVersionStore, name: str) -> None:
    for call in (lambda: store.get(name, 1), lambda: store.history(name), lambda: store.rollback(name, 1, "a")):
        with pytest.raises(NotFound):
            call()


def test_an_idle_follower_waits_in_the_long_poll_and_sees_a_push_at_once(tmp_path: Path) -> None:
    """Between changes a replica asks nothing but the long poll; a push ends the wait (docs/performance.md)."""
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.seed([item()])
    fake = FakeStore(versions)
    moved = asyncio.Event()
    waits: list[tuple[int | None, float]] = []

    async def wait(since: int | None, wait_s: float) -> int:
        waits.append((since, wait_s))
        if versions.catalogue_version() == since:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout=0.2)  # the store's bound, shortened
            moved.clear()
        return versions.catalogue_version()

    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=60, wait=wait)

    async def scenario() -> None:
        assert (await follower.active("label")).version == 1
        follower.start()
        await until(lambda: len(waits) >= 3, message="the follower kept waiting")
        assert fake.pages == 1 and all(w == (waits[0][0], WAIT_S) for w in waits)  # no poll while idle
        assert follower.status().state == "current"
        versions.push([item("v2: {{ text }}")], author="admin")
        moved.set()  # the store answers the long poll: seen now, not poll_s (60 s) later
        await until(lambda: follower.catalogue.tasks["label"].version == 2, timeout_s=10, message="push seen")
        await follower.stop()

    asyncio.run(scenario())
    versions.close()


def test_a_follower_whose_long_poll_fails_polls_instead(tmp_path: Path) -> None:
    """A store of an older release has no long poll: the follower keeps polling every poll_s."""
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.seed([item()])
    fake = FakeStore(versions)

    async def wait(since: int | None, wait_s: float) -> int:
        raise AttributeError("task_changes_wait")

    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=0.01, wait=wait)

    async def scenario() -> None:
        assert (await follower.active("label")).version == 1
        follower.start()
        versions.push([item("v2: {{ text }}")], author="admin")
        await until(lambda: follower.catalogue.tasks["label"].version == 2, timeout_s=10, message="push seen")
        assert follower.wait_failed
        await follower.stop()

    asyncio.run(scenario())
    versions.close()


def test_the_stores_long_poll_answers_when_a_push_moves_the_catalogue(tmp_path: Path) -> None:
    config = TasksConfig(state_dir=str(tmp_path))

    async def scenario() -> None:
        service = TaskStore(config, seed=[item()])
        try:
            since = unwrap(await service.task_changes_wait(None, 5))  # behind: answered at once
            began = time.monotonic()
            assert unwrap(await service.task_changes_wait(since, 0.2)) == since  # idle: the bound
            assert time.monotonic() - began >= 0.15
            waiting = asyncio.create_task(service.task_changes_wait(since, 30))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            unwrap(await service.push_tasks([item("v2: {{ text }}")], "admin"))
            assert unwrap(await asyncio.wait_for(waiting, timeout=5)) == since + 1
        finally:
            service.close()

    asyncio.run(scenario())
