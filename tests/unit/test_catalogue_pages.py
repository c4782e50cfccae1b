"""The catalogue in bounded pages (issue 19): the store's ``changes`` on both backends, and a
replica's follower moving from one consistent catalogue version to the next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.catalogue import CatalogueFollower, stale_after_s
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import canonical, content_hash
from deployments.store import open_database
from deployments.store.migrations import migrate
from deployments.store.tasks import CatalogueEntry, CataloguePage, TaskVersionStore, VersionInput


def item(name: str, prompt: str = "Label: {{ text }}") -> VersionInput:
    defn = TaskDefinition.model_validate({
        "name": name, "description": "d", "model": "m",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "output_schema": {"type": "object"}, "prompt": prompt,
    })
    return VersionInput(name=name, definition=canonical(defn), content_hash=content_hash(defn), source="# f\n")


def sized(name: str, size: int, marker: str = "") -> VersionInput:
    """A task whose prompt makes its stored definition roughly ``size`` bytes."""
    return item(name, f"{marker}{'x' * size} {{{{ text }}}}")


@pytest.fixture
def store(fresh_location: Callable[[], str]) -> Iterator[TaskVersionStore]:
    with TaskVersionStore(fresh_location()) as versions:
        yield versions


def all_pages(store: TaskVersionStore, since: int | None, **limits: int) -> tuple[list[CataloguePage], int]:
    first = store.changes(since, **limits)
    pages = [first]
    while pages[-1].after is not None:
        pages.append(store.changes(since, first.version, pages[-1].after, **limits))
    return pages, first.version


def entries(pages: list[CataloguePage]) -> dict[str, CatalogueEntry]:
    found: dict[str, CatalogueEntry] = {}
    for page in pages:
        for entry in page.entries:
            assert entry.name not in found  # no task twice in one change
            found[entry.name] = entry
    return found


def test_pages_are_bounded_by_count_and_bytes_and_together_hold_the_catalogue(store: TaskVersionStore) -> None:
    store.push([sized(f"t{i:03d}", 100 + 37 * i) for i in range(120)], author="admin")
    pages, version = all_pages(store, None, max_bytes=20_000, max_count=16)
    assert len(pages) > 120 // 16
    for page in pages:
        size = sum(len(e.definition.encode()) for e in page.entries)
        assert 1 <= len(page.entries) <= 16 and (size <= 20_000 or len(page.entries) == 1)
        assert page.version == version and page.full
    got = entries(pages)
    assert sorted(got) == [f"t{i:03d}" for i in range(120)]
    assert all(e.version == 1 and len(e.content_hash) == 64 for e in got.values())
    assert [e.name for p in pages for e in p.entries] == sorted(got)  # by name, each page after the last


def test_a_definition_over_the_page_budget_still_travels_alone(store: TaskVersionStore) -> None:
    store.push([sized("big", 50_000), sized("small", 10)], author="admin")
    pages, _ = all_pages(store, None, max_bytes=1_000, max_count=10)
    assert [[e.name for e in p.entries] for p in pages] == [["big"], ["small"]]


def test_a_change_is_paged_as_of_one_version_while_pushes_continue(store: TaskVersionStore) -> None:
    store.push([item(f"t{i}", f"v1 {i} {{{{ text }}}}") for i in range(10)], author="admin")
    start = store.catalogue_version()
    store.push([item(f"t{i}", f"v2 {i} {{{{ text }}}}") for i in (2, 7)], author="admin")
    first = store.changes(start, max_count=1)
    target = first.version
    assert [e.name for e in first.entries] == ["t2"] and first.after == "t2" and not first.full
    # Meanwhile: a push touching a task already paged and one not yet paged, and a rollback.
    store.push([item(f"t{i}", f"v3 {i} {{{{ text }}}}") for i in (2, 7, 9)], author="admin")
    store.rollback("t7", 1, actor="admin")
    rest = store.changes(start, target, first.after, max_count=1)
    assert [(e.name, e.version) for e in rest.entries] == [("t7", 2)] and rest.after is None  # as of `target`
    # The next change from `target` holds exactly what happened after it.
    later, now = all_pages(store, target)
    assert {n: e.version for n, e in entries(later).items()} == {"t2": 3, "t7": 1, "t9": 2}
    assert now == store.catalogue_version()
    assert all_pages(store, now)[0] == [CataloguePage(version=now, entries=[], after=None, full=False)]


def test_a_full_load_as_of_an_older_version_sees_that_version(store: TaskVersionStore) -> None:
    store.push([item("a", "one {{ text }}"), item("b", "one {{ text }}")], author="admin")
    first = store.changes(None, max_count=1)
    store.push([item("a", "two {{ text }}"), item("b", "two {{ text }}"), item("c")], author="admin")
    rest = store.changes(None, first.version, first.after or "", max_count=1)
    assert [(e.name, e.version) for e in [*first.entries, *rest.entries]] == [("a", 1), ("b", 1)]


def test_a_caller_ahead_of_the_store_gets_the_whole_catalogue(store: TaskVersionStore) -> None:
    store.push([item("a"), item("b")], author="admin")
    page = store.changes(10_000)  # the database was replaced by an older one
    assert page.full and [e.name for e in page.entries] == ["a", "b"]
    replaced = store.changes(None, 10_000, "a")  # paging a version the store no longer has: from the start
    assert replaced.full and replaced.version == store.catalogue_version() and [e.name for e in replaced.entries] == [
        "a", "b"]


def test_activations_from_before_pages_still_name_the_active_versions(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with TaskVersionStore(path) as versions:  # the versions a, b deployed; a pushed twice, rolled back to 2
        versions.seed([item("a"), item("b")])
        versions.push([item("a", "two {{ text }}")], author="admin")
        versions.push([item("a", "three {{ text }}")], author="admin")
        versions.rollback("a", 2, actor="admin")
        with versions.database.autocommit() as tx:
            stored = {table: tx.rows(f"SELECT * FROM {table}") for table in ("task_versions", "task_active")}
            activations = tx.rows("SELECT name, version, action, actor, at FROM task_activations ORDER BY seq")
    path.unlink()
    old = open_database(path)  # the same history in a database made before catalogue pages
    migrate(old, to=12)
    with old.transaction() as tx:
        for table, rows in stored.items():
            for row in rows:
                tx.run(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", *row.values())
        for row in activations:
            tx.run("INSERT INTO task_activations (name, version, action, actor, at) VALUES (?, ?, ?, ?, ?)",
                   *row.values())
    old.close()
    with TaskVersionStore(path) as versions:
        pages, version = all_pages(versions, None)
        assert {n: e.version for n, e in entries(pages).items()} == {"a": 2, "b": 1}
        versions.push([item("b", "two {{ text }}")], author="admin")
        assert [(e.name, e.version) for e in versions.changes(version).entries] == [("b", 2)]


# -- the follower ------------------------------------------------------------------------------


class PagedStore:
    """The TaskStore calls a follower makes, answered by a real store in small pages; ``between``
    runs before every page after the first (a push landing while a replica pages)."""

    def __init__(self, versions: TaskVersionStore, max_count: int = 3) -> None:
        self.versions, self.max_count = versions, max_count
        self.calls: list[tuple[int | None, int | None, str]] = []
        self.between: Callable[[], None] = lambda: None
        self.down = False

    async def changes(self, since: int | None, version: int | None, after: str) -> Any:
        if self.down:
            raise ConnectionError("store away")
        if after:
            self.between()
        self.calls.append((since, version, after))
        return self.versions.changes(since, version, after, max_count=self.max_count)

    async def fetch(self, name: str, version: int) -> Any:
        return self.versions.get(name, version)


def test_a_new_replica_pages_in_everything_and_applies_one_version_at_a_time(tmp_path: Path) -> None:
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.push([item(f"t{i:02d}") for i in range(10)], author="admin")
    loaded_at = versions.catalogue_version()
    fake = PagedStore(versions)
    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=1)
    seen: list[tuple[int | None, int]] = []
    pushed = False

    def push_once() -> None:
        nonlocal pushed
        seen.append((follower.catalogue.version, len(follower.catalogue.tasks)))  # nothing applied mid-change
        if not pushed:
            pushed = True
            versions.push([item("t00", "two {{ text }}"), item("t99")], author="admin")

    fake.between = push_once

    async def scenario() -> None:
        assert follower.status().state == "loading"
        await follower.refresh()
        assert follower.catalogue.version == loaded_at and len(follower.catalogue.tasks) == 10
        assert follower.catalogue.get("t00").version == 1  # the push landed after the version it paged
        assert len(fake.calls) == 4 and {v for _, v, _ in fake.calls[1:]} == {loaded_at}
        assert set(seen) == {(None, 0)}
        fake.calls.clear()
        await follower.refresh()  # the next poll: only the change
        assert fake.calls == [(loaded_at, None, "")]
        assert follower.catalogue.get("t00").version == 2 and "t99" in follower.catalogue.tasks
        assert follower.catalogue.version == versions.catalogue_version()
        fake.calls.clear()
        await follower.refresh()  # nothing changed: one call
        assert len(fake.calls) == 1 and follower.status().state == "current"

    asyncio.run(scenario())
    versions.close()


def test_a_follower_that_cannot_reach_the_store_reports_stale(tmp_path: Path) -> None:
    versions = TaskVersionStore(tmp_path / "db.sqlite3")
    versions.push([item("a")], author="admin")
    fake = PagedStore(versions)
    follower = CatalogueFollower(fake.changes, fake.fetch, poll_s=0.5)

    async def scenario() -> None:
        await follower.refresh()
        fake.down = True
        with pytest.raises(ConnectionError):
            await follower.refresh()
        status = follower.status()
        assert (status.state, status.error, status.tasks) == ("current", "ConnectionError", 1)
        assert follower.refreshed_at is not None
        follower.refreshed_at = time.monotonic() - stale_after_s(0.5) - 1  # as if it had failed since then
        assert follower.status().state == "stale"
        fake.down = False
        await follower.refresh()
        assert follower.status().state == "current" and follower.status().error is None

    asyncio.run(scenario())
    versions.close()
