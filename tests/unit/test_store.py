"""RunStore: durability, idempotency, leases, first-completion-wins, owner scoping, paging.

Every test that takes ``store`` or ``open_store`` runs once per backend (SQLite, PostgreSQL;
see ``fresh_location`` in conftest.py): the two must behave the same. Concurrent owners and the
lease state machine: ``test_store_races.py``.
"""

from __future__ import annotations

import dataclasses
import pickle
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployments.core.runstate import RunStatus
from deployments.errors import Conflict, InvalidRequest, RunNotFound
from deployments.store import SCHEMA_VERSION, RunRecord, RunStore, open_database
from deployments.store.records import encode_cursor
from deployments.store.sqlite import SqliteDatabase
from tests.unit.runstores import LEASE, OpenStore, claim_one, new_run


def test_create_run_record(store: RunStore) -> None:
    run = new_run(store, now=100.0)
    assert run.id.startswith("run_") and len(run.id) == 4 + 24
    assert int(run.id[4:], 16) >= 0
    assert (run.task, run.owner, run.status, run.input) == (
        "classify",
        "alice",
        RunStatus.QUEUED,
        {"text": "t0"},
    )
    assert (run.attempt, run.created_at, run.updated_at) == (0, 100.0, 100.0)
    assert all(v is None for v in (run.result, run.error, run.usage, run.started_at, run.lease_token))
    assert pickle.loads(pickle.dumps(run)) == run
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = RunStatus.RUNNING  # type: ignore[misc]


def test_idempotency_same_body_returns_existing(store: RunStore) -> None:
    first, created = store.create_run(
        task="t", input={"a": 1, "b": 2}, owner="alice", idempotency_key="k", now=1
    )
    assert created
    # Key order does not matter: the hash is of canonical JSON.
    again, created = store.create_run(
        task="t", input={"b": 2, "a": 1}, owner="alice", idempotency_key="k", now=2
    )
    assert not created and again == first
    assert store.count_queued() == 1


def test_idempotency_different_body_conflicts(store: RunStore) -> None:
    store.create_run(task="t", input={"a": 1}, owner="alice", idempotency_key="k", now=1)
    for task, body in [("t", {"a": 2}), ("other", {"a": 1})]:
        with pytest.raises(Conflict) as info:
            store.create_run(task=task, input=body, owner="alice", idempotency_key="k", now=2)
        assert info.value.param == "Idempotency-Key" and info.value.status_code == 409


def test_idempotency_is_scoped_per_owner(store: RunStore) -> None:
    a, _ = store.create_run(task="t", input={"a": 1}, owner="alice", idempotency_key="k", now=1)
    b, created = store.create_run(task="t", input={"a": 2}, owner="bob", idempotency_key="k", now=1)
    assert created and a.id != b.id


def test_non_json_input_is_invalid_request(store: RunStore) -> None:
    with pytest.raises(InvalidRequest) as info:
        store.create_run(task="t", input={"x": float("nan")}, owner="a", idempotency_key=None, now=1)
    assert info.value.param == "input"
    assert store.count_queued() == 0


def test_claim_is_fifo_and_sets_lease(store: RunStore) -> None:
    # Same created_at for all: order must still be creation order, not id order.
    ids = [new_run(store, n, now=100.0).id for n in range(5)]
    got = store.claim(worker_id="w1", lease_s=LEASE, now=110.0, limit=2)
    got += store.claim(worker_id="w2", lease_s=LEASE, now=111.0, limit=10)
    assert [r.id for r in got] == ids
    first = got[0]
    assert (first.status, first.attempt, first.worker_id) == (RunStatus.RUNNING, 1, "w1")
    assert (first.started_at, first.lease_expires_at) == (110.0, 110.0 + LEASE)
    assert first.lease_token and len({r.lease_token for r in got}) == 5
    assert store.claim(worker_id="w3", lease_s=LEASE, now=112.0) == []
    assert store.count_queued() == 0


def test_claim_rejects_bad_arguments(store: RunStore) -> None:
    with pytest.raises(ValueError):
        store.claim(worker_id="w", lease_s=0, now=1)
    with pytest.raises(ValueError):
        store.claim(worker_id="w", lease_s=1, now=1, limit=0)


def test_expired_lease_is_requeued_and_reclaimed_with_next_attempt(store: RunStore) -> None:
    run = new_run(store)
    first = claim_one(store, now=100.0, worker="w1")
    assert store.claim(worker_id="w2", lease_s=LEASE, now=100.0 + LEASE - 0.001) == []  # not yet
    second = claim_one(store, now=100.0 + LEASE, worker="w2")
    assert second.id == run.id
    assert (second.attempt, second.worker_id, second.started_at) == (2, "w2", 100.0)
    assert second.lease_token != first.lease_token
    assert first.lease_token is not None and second.lease_token is not None
    # The first worker is now stale: nothing it does is visible.
    assert not store.renew(run.id, first.lease_token, LEASE, now=131.0)
    assert not store.complete(run.id, first.lease_token, result={"stale": True}, usage={}, now=131.0)
    assert not store.fail(run.id, first.lease_token, error={"code": "x"}, now=131.0)
    assert not store.release(run.id, first.lease_token, now=131.0)
    assert store.get(run.id, "alice") == second
    assert store.complete(run.id, second.lease_token, result={"ok": 1}, usage={"total_tokens": 3}, now=132.0)
    done = store.get(run.id, "alice")
    assert (done.status, done.result, done.usage, done.finished_at) == (
        RunStatus.SUCCEEDED,
        {"ok": 1},
        {"total_tokens": 3},
        132.0,
    )
    assert done.lease_token is None and done.lease_expires_at is None


def test_first_completion_wins(store: RunStore) -> None:
    run = new_run(store)
    token = claim_one(store, now=100.0).lease_token
    assert token is not None
    assert store.complete(run.id, token, result="first", usage={}, now=101.0)
    assert not store.complete(run.id, token, result="second", usage={}, now=102.0)
    assert not store.fail(run.id, token, error={"code": "late"}, now=102.0)
    assert not store.release(run.id, token, now=102.0)
    assert not store.renew(run.id, token, LEASE, now=102.0)
    final = store.get(run.id, "alice")
    assert (final.status, final.result, final.error, final.updated_at) == (
        RunStatus.SUCCEEDED,
        "first",
        None,
        101.0,
    )


def test_unknown_run_or_token_writes_nothing(store: RunStore) -> None:
    assert not store.complete("run_nope", "t", result=1, usage={}, now=1)
    run = new_run(store)
    assert not store.complete(run.id, "not-a-token", result=1, usage={}, now=1)  # still queued
    claim_one(store, now=100.0)
    assert not store.complete(run.id, "not-a-token", result=1, usage={}, now=101)
    assert store.get(run.id, "alice").status is RunStatus.RUNNING


def test_renew_extends_the_lease_even_after_expiry_if_not_reclaimed(store: RunStore) -> None:
    run = new_run(store)
    token = claim_one(store, now=100.0).lease_token
    assert token is not None
    assert store.renew(run.id, token, LEASE, now=120.0)
    assert store.get(run.id, "alice").lease_expires_at == 150.0
    assert store.claim(worker_id="w2", lease_s=LEASE, now=140.0) == []
    assert store.renew(run.id, token, LEASE, now=160.0)  # expired at 150, but nobody took it
    assert store.get(run.id, "alice").lease_expires_at == 190.0


def test_fail_and_release(store: RunStore) -> None:
    a, b = new_run(store, 1), new_run(store, 2)
    ta, tb = (claim_one(store, now=100.0).lease_token for _ in range(2))
    assert ta is not None and tb is not None
    error = {"message": "bad output", "type": "task_error", "param": None, "code": "task_failed"}
    assert store.fail(a.id, ta, error=error, usage={"total_tokens": 9}, now=101.0)
    failed = store.get(a.id, "alice")
    assert (failed.status, failed.error, failed.usage, failed.finished_at) == (
        RunStatus.FAILED,
        error,
        {"total_tokens": 9},
        101.0,
    )
    assert store.release(b.id, tb, now=102.0)
    released = store.get(b.id, "alice")
    assert (released.status, released.attempt, released.lease_token, released.finished_at) == (
        RunStatus.QUEUED,
        1,
        None,
        None,
    )
    assert claim_one(store, now=103.0).attempt == 2


def test_release_with_a_delay_is_not_claimed_before_its_time(store: RunStore) -> None:
    """Issue 10 item 3: a runner backs off a transient failure in the queue, holding no lease."""
    early, late = new_run(store, 1), new_run(store, 2)
    token = claim_one(store, now=100.0).lease_token  # the oldest run: ``early``
    assert token is not None
    assert store.release(early.id, token, delay_s=30.0, now=101.0)
    held_back = store.get(early.id, "alice")
    assert (held_back.status, held_back.attempt, held_back.lease_token, held_back.available_at) == (
        RunStatus.QUEUED, 1, None, 131.0,
    )
    assert store.count_queued() == 2  # still waiting, so still counted against the queue bound
    # Before its time the younger run is claimed past it; the held-back one is not.
    assert [r.id for r in store.claim(worker_id="w2", lease_s=LEASE, now=102.0, limit=5)] == [late.id]
    assert store.claim(worker_id="w2", lease_s=LEASE, now=130.999) == []
    again = claim_one(store, now=131.0, worker="w3")
    assert (again.id, again.attempt, again.available_at) == (early.id, 2, None)


def test_release_delay_must_be_finite_and_not_negative(store: RunStore) -> None:
    run = new_run(store)
    token = claim_one(store, now=100.0).lease_token
    assert token is not None
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            store.release(run.id, token, delay_s=bad, now=101.0)
    assert store.get(run.id, "alice").status is RunStatus.RUNNING  # nothing written


def test_lease_expiry_beyond_max_attempts_fails_the_run(open_store: OpenStore) -> None:
    store = open_store(max_attempts_total=2)
    run = new_run(store)
    assert claim_one(store, now=100.0).attempt == 1
    assert claim_one(store, now=200.0).attempt == 2
    assert store.claim(worker_id="w", lease_s=LEASE, now=300.0) == []
    failed = store.get(run.id, "alice")
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error["code"] == "lease_expired"
    assert failed.error["type"] == "task_error" and "2 times" in failed.error["message"]
    assert (failed.attempt, failed.finished_at, failed.lease_token) == (2, 300.0, None)


def test_cancel(store: RunStore) -> None:
    done, running, queued = new_run(store, 1), new_run(store, 2), new_run(store, 3)
    token3 = claim_one(store, now=100.0).lease_token  # claims are FIFO: `done` first
    token = claim_one(store, now=100.0).lease_token
    assert token is not None and token3 is not None
    assert store.complete(done.id, token3, result=1, usage={}, now=101.0)
    c1 = store.cancel(queued.id, "alice", now=102.0)
    c2 = store.cancel(running.id, "alice", now=102.0)
    assert (c1.status, c2.status, c2.finished_at, c2.lease_token) == (
        RunStatus.CANCELLED,
        RunStatus.CANCELLED,
        102.0,
        None,
    )
    # The cancelled run's worker learns it through renew/complete returning False.
    assert not store.renew(running.id, token, LEASE, now=103.0)
    assert not store.complete(running.id, token, result=1, usage={}, now=103.0)
    assert store.cancel(done.id, "alice", now=104.0) == store.get(done.id, "alice")
    assert store.get(done.id, "alice").status is RunStatus.SUCCEEDED
    assert store.cancel(queued.id, "alice", now=105.0) == c1  # idempotent


def test_owner_scoping_hides_other_owners_runs(store: RunStore) -> None:
    run = new_run(store, owner="alice")
    calls: list[Callable[[], RunRecord]] = [
        lambda: store.get(run.id, "bob"),
        lambda: store.cancel(run.id, "bob", now=1.0),
        lambda: store.get("run_" + "0" * 24, "alice"),
        lambda: store.cancel("run_missing", "alice", now=1.0),
        # Not even an id (PostgreSQL text cannot hold NUL): the same 404, not a database error.
        lambda: store.get("run_\x00", "alice"),
        lambda: store.cancel(run.id + "\x00", "alice", now=1.0),
    ]
    for call in calls:
        with pytest.raises(RunNotFound) as info:
            call()
        assert info.value.status_code == 404
    assert store.get(run.id, "alice").status is RunStatus.QUEUED
    assert store.list_runs("bob") == ([], None)


def test_pagination_covers_every_row_exactly_once(store: RunStore) -> None:
    # Ties on created_at (several runs per instant) must not lose or repeat rows.
    for n in range(23):
        new_run(store, n, now=float(n // 3))
    new_run(store, 99, owner="bob", now=5.0)
    seen: list[RunRecord] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list_runs("alice", limit=5, cursor=cursor)
        assert len(page) <= 5
        seen.extend(page)
        if cursor is None:
            break
    assert len(seen) == 23 and len({r.id for r in seen}) == 23
    keys = [(r.created_at, r.id) for r in seen]
    assert keys == sorted(keys, reverse=True)
    assert {r.owner for r in seen} == {"alice"}


def test_list_filters_and_validation(store: RunStore) -> None:
    a = new_run(store, 1, now=1.0)
    store.create_run(task="summarize", input={}, owner="alice", idempotency_key=None, now=2.0)
    claim_one(store, now=3.0)
    assert [r.id for r in store.list_runs("alice", status="running")[0]] == [a.id]
    assert [r.task for r in store.list_runs("alice", task="summarize")[0]] == ["summarize"]
    assert store.list_runs("alice", status="queued", task="classify") == ([], None)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"status": "sleeping"}, "status"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "bnVsbA"}, "cursor"),  # base64 of "null"
        # NaN sorts below everything in SQLite and above everything in PostgreSQL: refused.
        ({"cursor": encode_cursor(float("nan"), a.id)}, "cursor"),
        ({"cursor": encode_cursor(1.0, "run_\x00")}, "cursor"),
        ({"task": "a\x00b"}, "task"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidRequest) as info:
            store.list_runs("alice", **kwargs)
        assert info.value.param == param


def test_requeue_all_running_after_cluster_restart(fresh_location: Callable[[], str]) -> None:
    db = fresh_location()
    with RunStore(db, max_attempts_total=2) as store:
        ids = [new_run(store, n).id for n in range(3)]
        claim_one(store, now=100.0)  # ids[0]: attempt 1
        claim_one(store, now=100.0)  # ids[1]: attempt 1
        token = claim_one(store, now=100.0).lease_token  # ids[2]
        assert token is not None
        assert store.release(ids[2], token, now=100.5)
        claim_one(store, now=101.0)  # ids[2]: attempt 2, the limit
    with RunStore(db, max_attempts_total=2) as store:  # the whole cluster restarted
        assert store.requeue_all_running(now=500.0) == 2
        runs = {i: store.get(i, "alice") for i in ids}
        assert [(runs[i].status, runs[i].attempt) for i in ids] == [
            (RunStatus.QUEUED, 1),
            (RunStatus.QUEUED, 1),
            (RunStatus.FAILED, 2),
        ]
        assert runs[ids[0]].lease_token is None
        assert [r.id for r in store.claim(worker_id="w", lease_s=LEASE, now=501.0, limit=5)] == ids[:2]


def test_database_persists_across_reopen(fresh_location: Callable[[], str]) -> None:
    db = fresh_location()
    with RunStore(db) as store:
        run, _ = store.create_run(task="t", input={"x": "ü"}, owner="alice", idempotency_key="k", now=1.0)
    with RunStore(db) as store:
        assert store.get(run.id, "alice") == run
        again, created = store.create_run(
            task="t", input={"x": "ü"}, owner="alice", idempotency_key="k", now=2
        )
        assert not created and again == run
    database = open_database(db)
    try:
        with database.autocommit() as tx:
            assert tx.rows("SELECT version FROM schema_version") == [{"version": SCHEMA_VERSION}]
    finally:
        database.close()


def test_a_repeated_submit_keeps_the_first_requests_id(fresh_location: Callable[[], str]) -> None:
    with RunStore(fresh_location()) as store:
        first, _ = store.create_run(task="t", input={}, owner="alice", idempotency_key="k", request_id="req-1")
        again, created = store.create_run(task="t", input={}, owner="alice", idempotency_key="k", request_id="req-2")
        assert not created and again.request_id == first.request_id == "req-1"


def test_sqlite_file_is_wal_with_synchronous_full(tmp_path: Path) -> None:
    with RunStore(tmp_path / "tasks.db") as store:
        assert isinstance(store.database, SqliteDatabase)
        assert store.database.pragma("journal_mode") == "wal"
        assert store.database.pragma("synchronous") == 2  # FULL
    conn = sqlite3.connect(tmp_path / "tasks.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # a property of the file
    finally:
        conn.close()


def test_newer_schema_version_is_refused(fresh_location: Callable[[], str]) -> None:
    db = fresh_location()
    RunStore(db).close()
    database = open_database(db)
    with database.autocommit() as tx:
        tx.run("UPDATE schema_version SET version = 99")
    database.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        RunStore(db)


def test_text_a_database_cannot_hold_is_invalid_request(store: RunStore) -> None:
    for kwargs, param in [
        ({"idempotency_key": "k\x00"}, "Idempotency-Key"),
        ({"idempotency_key": "\ud800"}, "Idempotency-Key"),  # a lone surrogate is not UTF-8
        ({"task": "t\x00"}, "task"),
        ({"input": {"x": "\ud800"}}, "input"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            store.create_run(**{"task": "t", "input": {}, "owner": "a", "idempotency_key": None, **kwargs})
        assert info.value.param == param
    # Control characters are fine inside JSON (escaped), NUL included.
    run, _ = store.create_run(task="t", input={"x": "a\x00b"}, owner="a", idempotency_key=None, now=1)
    assert store.get(run.id, "a").input == {"x": "a\x00b"}
    assert store.count_queued() == 1


def test_a_succeeded_run_keeps_the_messages_it_sent_for_the_console(store: RunStore) -> None:
    """Stored beside the result, read only one run at a time (not with listings), never re-rendered."""
    run = new_run(store, now=100.0)
    claimed = claim_one(store, now=101.0)
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Text: t0 ✓"}]
    assert store.messages(run.id) is None
    assert claimed.lease_token is not None
    assert store.complete(run.id, claimed.lease_token, result={"label": "a"}, usage={}, messages=sent, now=102.0)
    assert store.messages(run.id) == sent
    assert store.get(run.id, None).detail(messages=store.messages(run.id)).messages == sent
    assert store.messages("run_" + "0" * 24) is None and store.messages("nonsense") is None
