"""Retention, quotas and private state: what expires, what one key may store, who may read the files.

Pure expiry rules (``core.retention``), then the stores that apply them (``BatchStore.expire``,
``RunStore.expire`` on each backend), the per-key and global quotas of the batch store, the
revocation sweep (``RunStore.cancel_queued``), and the modes of the state on disk.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployments.config import QuotasConfig, RetentionConfig, TasksConfig
from deployments.core.replies import unwrap
from deployments.core.retention import Cutoffs, expired_batches, expired_files
from deployments.core.runstate import RunStatus
from deployments.errors import InvalidRequest, NotFound, Overloaded, QuotaExceeded, RunNotFound
from deployments.store import RunStore
from deployments.store.batches import BatchStore
from deployments.task_store import TaskStore
from tests.waiting import until

DAY = 86400.0
NOW = 1_000_000_000.0


@dataclass
class File:
    id: str
    created_at: int


@dataclass
class Batch:
    id: str
    input_file_id: str
    terminal: bool
    ended_at: int | None


def test_cutoffs_are_now_minus_each_period() -> None:
    config = RetentionConfig(files_s=30 * DAY, runs_s=7 * DAY, idempotency_s=DAY)
    cutoffs = Cutoffs.at(config, NOW)
    assert cutoffs == Cutoffs(files_before=NOW - 30 * DAY, runs_before=NOW - 7 * DAY, idempotency_before=NOW - DAY)


def test_old_files_expire_unless_an_unfinished_batch_reads_them() -> None:
    cutoffs = Cutoffs(files_before=100, runs_before=0, idempotency_before=0)
    files = [File("old", 99), File("new", 100), File("old-in-use", 50), File("old-used-by-ended", 50)]
    batches = [
        Batch("b1", "old-in-use", terminal=False, ended_at=None),
        Batch("b2", "old-used-by-ended", terminal=True, ended_at=10),
    ]
    assert expired_files(files, batches, cutoffs) == ["old", "old-used-by-ended"]


def test_only_batches_that_ended_before_the_cutoff_expire() -> None:
    cutoffs = Cutoffs(files_before=100, runs_before=0, idempotency_before=0)
    batches = [
        Batch("ended-long-ago", "f", terminal=True, ended_at=99),
        Batch("ended-recently", "f", terminal=True, ended_at=100),
        Batch("running-for-ever", "f", terminal=False, ended_at=None),
    ]
    assert expired_batches(batches, cutoffs) == ["ended-long-ago"]


def upload(store: BatchStore, owner: str, content: bytes, now: int | None = None) -> str:
    upload_id = store.begin_upload(owner, "in.jsonl")
    store.write_upload(upload_id, content)
    return store.finish_upload(upload_id, now=now).id


def test_batch_store_expires_files_and_ended_batches_with_their_outputs(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "batches")
    old = upload(store, "alice", b"{}\n", now=1000)
    in_use = upload(store, "alice", b"{}\n", now=1000)
    fresh = upload(store, "alice", b"{}\n", now=5000)
    running = store.create_batch("alice", in_use, "/v1/chat/completions", "24h", None, now=1000)
    ended = store.create_batch("alice", fresh, "/v1/chat/completions", "24h", None, now=1000)
    ended.status, ended.completed_at = "completed", 1500
    store.finalize(ended, now=1500)
    assert ended.output_file_id is not None
    output_path = tmp_path / "batches" / store.files[ended.output_file_id].path

    files, batches = store.expire(Cutoffs(files_before=2000, runs_before=0, idempotency_before=0))

    assert (files, batches) == (2, 1)  # `old` and the ended batch's output; the ended batch
    with pytest.raises(NotFound):
        store.get_file("alice", old)
    with pytest.raises(NotFound):
        store.get_batch("alice", ended.id)
    assert not output_path.exists() and not store.batch_dir(ended.id).exists()
    assert store.get_file("alice", in_use) and store.get_file("alice", fresh)  # in use; too young
    assert store.get_batch("alice", running.id).status == "validating"
    # What expired stays gone after a restart; what did not is still there.
    reopened = BatchStore(tmp_path / "batches")
    assert set(reopened.files) == {in_use, fresh} and set(reopened.batches) == {running.id}


def test_file_quotas_count_and_bytes_per_key(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, quotas=QuotasConfig(max_files_per_key=2, max_file_bytes_per_key=2048))
    first = upload(store, "alice", b"{}\n")
    upload(store, "alice", b"{}\n")
    with pytest.raises(QuotaExceeded) as refused:
        store.begin_upload("alice", "third.jsonl")
    assert refused.value.param == "file" and "quota" in refused.value.message
    upload(store, "bob", b"{}\n")  # another key's quota is its own
    store.delete_file("alice", first)
    upload(store, "alice", b"{}\n")  # room again after a delete

    upload_id = store.begin_upload("bob", "big.jsonl")
    store.write_upload(upload_id, b"x" * 1500 + b"\n")
    with pytest.raises(QuotaExceeded):
        store.write_upload(upload_id, b"y" * 1000 + b"\n")  # 3 + 1501 + 1001 > 2048
    assert upload_id not in store.uploads and not list((tmp_path / "uploads").iterdir())
    upload(store, "bob", b"z" * 1000 + b"\n")  # under the quota: still flows


def test_batch_quotas_per_key_and_in_total(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, quotas=QuotasConfig(max_batches_per_key=1, max_batches=2))
    alice, bob, carol = (upload(store, owner, b"{}\n") for owner in ("alice", "bob", "carol"))
    first = store.create_batch("alice", alice, "/v1/chat/completions", "24h", None)
    with pytest.raises(QuotaExceeded):
        store.create_batch("alice", alice, "/v1/chat/completions", "24h", None)
    store.create_batch("bob", bob, "/v1/chat/completions", "24h", None)
    with pytest.raises(Overloaded) as full:
        store.create_batch("carol", carol, "/v1/chat/completions", "24h", None)
    assert full.value.retry_after is not None
    first.status = "completed"  # an ended batch no longer counts
    store.save_batch(first)
    store.create_batch("carol", carol, "/v1/chat/completions", "24h", None)


def test_a_batch_of_more_lines_than_the_limit_is_refused_before_it_starts(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, quotas=QuotasConfig(max_batch_lines=3))
    at_limit = upload(store, "alice", b"{}\n" * 3 + b"\n\n")  # blank lines are not lines
    over = upload(store, "alice", b"{}\n" * 4)
    with pytest.raises(InvalidRequest) as refused:
        store.create_batch("alice", over, "/v1/chat/completions", "24h", None)
    assert refused.value.status_code == 400 and refused.value.param == "input_file_id"
    assert "4 lines" in refused.value.message and "at most 3" in refused.value.message
    assert store.batches == {} and not list((tmp_path / "batches").iterdir())  # nothing half-made
    store.create_batch("alice", at_limit, "/v1/chat/completions", "24h", None)


def test_admin_scope_sees_every_owners_batches(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = store.create_batch("alice", upload(store, "alice", b"{}\n"), "/v1/chat/completions", "24h", None)
    assert store.get_batch(None, batch.id) == batch
    with pytest.raises(NotFound):
        store.get_batch("bob", batch.id)
    assert [b.id for b in store.list_batches(None, 10, None)[0]] == [batch.id]
    assert store.list_batches("bob", 10, None)[0] == []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_on_disk_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    service = TaskStore(TasksConfig(state_dir=str(state)))
    try:
        batches = BatchStore(state / "batches")
        file_id = upload(batches, "alice", b"{}\n")
        batch = batches.create_batch("alice", file_id, "/v1/chat/completions", "24h", None)
        batches.job_paths(batch)["output"].write_bytes(b"{}\n")  # as the job writes it: umask mode
        batch.status = "completed"
        batches.finalize(batch)
        paths = [state, *state.rglob("*")]
        assert any(p.name == "tasks.sqlite3" for p in paths) and any(p.suffix == ".jsonl" for p in paths)
        for path in paths:
            expected = 0o700 if path.is_dir() else 0o600
            assert mode(path) == expected, f"{path} is {oct(mode(path))}"
    finally:
        service.database.close()


def test_run_store_expires_finished_runs_and_forgets_idempotency_keys(
    fresh_location: Callable[[], str],
) -> None:
    store = RunStore(fresh_location())
    try:
        old_done, _ = store.create_run(task="t", input={"n": 1}, owner="alice", idempotency_key="k1", now=100)
        store.cancel(old_done.id, "alice", now=200)
        old_queued, _ = store.create_run(task="t", input={"n": 2}, owner="alice", idempotency_key="k2", now=100)
        young_done, _ = store.create_run(task="t", input={"n": 3}, owner="alice", idempotency_key=None, now=100)
        store.cancel(young_done.id, "alice", now=900)

        assert store.expire(finished_before=500, idempotency_before=500) == (1, 1)  # old_done; k2 forgotten

        with pytest.raises(RunNotFound):
            store.get(old_done.id, "alice")
        assert store.get(young_done.id, "alice").status is RunStatus.CANCELLED
        assert store.get(old_queued.id, "alice").status is RunStatus.QUEUED  # unfinished: kept
        again, created = store.create_run(task="t", input={"n": 2}, owner="alice", idempotency_key="k2", now=1000)
        assert created and again.id != old_queued.id  # the key was forgotten: a new run
        same, created = store.create_run(task="t", input={"n": 2}, owner="alice", idempotency_key="k2", now=1001)
        assert not created and same.id == again.id  # a young key still deduplicates
        assert store.expire(finished_before=500, idempotency_before=500) == (0, 0)

        # Bounded steps: a backlog is removed `limit` rows per call.
        for n in range(5):
            run, _ = store.create_run(task="t", input={"m": n}, owner="bob", idempotency_key=None, now=100)
            store.cancel(run.id, "bob", now=100)
        assert store.expire(finished_before=500, idempotency_before=0, limit=3) == (3, 0)
        assert store.expire(finished_before=500, idempotency_before=0, limit=3) == (2, 0)
    finally:
        store.close()


def test_cancel_queued_ends_only_that_owners_queued_runs(fresh_location: Callable[[], str]) -> None:
    store = RunStore(fresh_location())
    try:
        mine = [store.create_run(task="t", input={"n": n}, owner="alice", idempotency_key=None)[0] for n in range(3)]
        theirs, _ = store.create_run(task="t", input={}, owner="bob", idempotency_key=None)
        claimed = store.claim(worker_id="w", lease_s=30, limit=1)
        assert [r.id for r in claimed] == [mine[0].id]
        assert store.cancel_queued("alice") == 2
        assert [store.get(r.id, "alice").status for r in mine] == [
            RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.CANCELLED
        ]
        assert store.get(theirs.id, "bob").status is RunStatus.QUEUED
        assert store.cancel_queued("alice") == 0
        # The admin's scope (owner None) reads and lists every owner's runs.
        assert store.get(theirs.id, None).id == theirs.id
        runs, _ = store.list_runs(None, limit=10)
        assert {r.id for r in runs} == {*(r.id for r in mine), theirs.id}
    finally:
        store.close()


def test_the_one_retention_job_removes_runs_too(tmp_path: Path) -> None:
    """Built on a running event loop (as a Serve replica builds it), the BatchService runs the one
    retention job every ``cleanup_interval_s`` without being asked: a finished run past ``runs_s``
    disappears from the run store's database, which the BatchService's records share."""
    retention = RetentionConfig(runs_s=0.5, cleanup_interval_s=1)
    config = TasksConfig(state_dir=str(tmp_path), retention=retention)

    async def scenario() -> None:
        from deployments.batch_service import BatchService

        service = TaskStore(config)
        batches = BatchService(config, app_name="test", jobs=NoJobs())
        try:
            assert batches.cleanup is not None
            assert batches.store.database.location == service.database.location  # one database
            done, _ = unwrap(await service.create_run("t", {}, "alice", None))
            unwrap(await service.cancel(done.id, "alice"))
            waiting, _ = unwrap(await service.create_run("t", {"n": 1}, "alice", None))
            async def gone() -> bool:
                return isinstance(await service.get(done.id, "alice"), RunNotFound)  # errors come back as values

            await until(gone, timeout_s=10, interval_s=0.2, message="the finished run cleaned up")
            assert unwrap(await service.get(waiting.id, "alice")).status == "queued"  # unfinished: kept
        finally:
            if batches.cleanup is not None:
                batches.cleanup.cancel()
            service.database.close()

    asyncio.run(scenario())


class NoJobs:
    """The BatchService's Jobs seam, in process: no job was ever submitted."""

    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str]) -> None:
        raise AssertionError("nothing is submitted here")

    def status(self, submission_id: str) -> None:
        return None

    def stop(self, submission_id: str) -> None:
        return None

    def cluster_address(self) -> str | None:
        return None


def test_the_batch_service_cleanup_runs_by_itself(tmp_path: Path) -> None:
    from deployments.batch_service import BatchService

    retention = RetentionConfig(files_s=0.5, cleanup_interval_s=1)
    config = TasksConfig(state_dir=str(tmp_path), retention=retention)

    async def scenario() -> None:
        service = BatchService(config, app_name="test", jobs=NoJobs())
        try:
            assert service.cleanup is not None
            old = upload(service.store, "alice", b"{}\n", now=int(time.time()) - 10)
            fresh = upload(service.store, "alice", b"{}\n", now=int(time.time()) + 3600)
            await until(lambda: old not in service.store.files, timeout_s=10, interval_s=0.2,
                        message="the expired file cleaned up")
            assert fresh in service.store.files
        finally:
            if service.cleanup is not None:
                service.cleanup.cancel()

    asyncio.run(scenario())
