"""RunStore under concurrency: two owners of one database, and random interleavings of lease moves.

Every test runs once per backend (SQLite, PostgreSQL; ``fresh_location`` in conftest.py).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from deployments.core.runstate import RunStatus
from deployments.store import RunRecord, RunStore
from tests.unit.runstores import LEASE, OpenStore, new_run


def two_stores_on_one_database(open_store: OpenStore, fresh_location: Callable[[], str]) -> list[RunStore]:
    """Two store owners (two connections, or pools) on the same database."""
    db = fresh_location()
    return [open_store(db), open_store(db)]


def test_concurrent_idempotent_creates_make_one_run(
    open_store: OpenStore, fresh_location: Callable[[], str]
) -> None:
    """Owners of one database racing on one key: one run is created, every caller gets it."""
    stores = two_stores_on_one_database(open_store, fresh_location)
    results: list[tuple[RunRecord, bool]] = []
    barrier = threading.Barrier(8)

    def create(n: int) -> None:
        barrier.wait()
        results.append(
            stores[n % 2].create_run(task="t", input={"a": 1}, owner="alice", idempotency_key="same", now=1)
        )

    run_threads(create, 8)
    assert sum(created for _, created in results) == 1
    assert len({run.id for run, _ in results}) == 1 and len(results) == 8
    assert stores[1].count_queued() == 1


def test_two_stores_claiming_concurrently_never_hand_out_a_run_twice(
    open_store: OpenStore, fresh_location: Callable[[], str]
) -> None:
    """Several store owners on one database, many threads each: every run claimed exactly once.

    On PostgreSQL this is what ``FOR UPDATE SKIP LOCKED`` is for (without row locks, two
    READ COMMITTED claims select the same queued rows and both win); on SQLite ``BEGIN
    IMMEDIATE`` serializes the two connections.
    """
    stores = two_stores_on_one_database(open_store, fresh_location)
    first = stores[0]
    total = 300
    for n in range(total):
        new_run(first, n, now=1.0)
    claimed: list[RunRecord] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        store, rng = stores[n % 2], random.Random(n)
        while True:
            got = store.claim(worker_id=f"w{n}", lease_s=LEASE, now=2.0, limit=rng.randint(1, 5))
            with lock:
                claimed.extend(got)
            # Empty while others hold the rest locked is not the end: stop when none is queued.
            if not got and store.count_queued() == 0:
                return

    run_threads(worker, 12)
    ids = [run.id for run in claimed]
    assert len(ids) == total and len(set(ids)) == total, f"{len(ids) - len(set(ids))} runs handed out twice"
    assert len({run.lease_token for run in claimed}) == total
    assert all(run.attempt == 1 for run in claimed)
    assert len(first.list_runs("alice", status="running", limit=1000)[0]) == total


def run_threads(target: Callable[[int], None], count: int) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]


class LeaseRaces(RuleBasedStateMachine):
    """Random interleavings of create/claim/expire/renew/complete/fail/release/cancel.

    A model tracks, per run, the only lease token that may write. Checked: a write succeeds
    exactly when it holds that token; each run gets at most one visible outcome, which never
    changes once written; attempts never decrease; claims are FIFO.
    """

    def __init__(self, store: RunStore) -> None:
        super().__init__()
        self.store = store  # a new, empty database, with max_attempts_total=3
        self.now = 1000.0
        self.order: list[str] = []  # creation order
        self.current: dict[str, str | None] = {}  # run id -> token allowed to write
        self.tokens: list[tuple[str, str]] = []  # every (run id, token) ever handed out
        self.outcome: dict[str, RunRecord] = {}  # first terminal record per run
        self.attempts: dict[str, int] = {}

    def teardown(self) -> None:
        self.store.close()

    @rule()
    def create(self) -> None:
        run = new_run(self.store, len(self.order), now=self.now)
        self.order.append(run.id)
        self.current[run.id] = None

    @rule(dt=st.sampled_from([0.0, 1.0, 10.0, LEASE]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(limit=st.integers(1, 3))
    def claim(self, limit: int) -> None:
        before = {i: self.store.get(i, "alice") for i in self.order}
        claimed = self.store.claim(worker_id="w", lease_s=LEASE, now=self.now, limit=limit)
        for run in claimed:
            self.current[run.id] = run.lease_token
            assert run.lease_token is not None
            self.tokens.append((run.id, run.lease_token))
        # FIFO: claimed runs are the oldest ones that were queued (or expired) before the claim.
        eligible = [
            i
            for i in self.order
            if before[i].status is RunStatus.QUEUED
            or (
                before[i].status is RunStatus.RUNNING
                and (before[i].lease_expires_at or 0) <= self.now
                and before[i].attempt < 3
            )
        ]
        assert [r.id for r in claimed] == eligible[:limit]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), action=st.sampled_from(["complete", "fail", "release", "renew"]))
    def write(self, data: st.DataObject, action: str) -> None:
        run_id, token = data.draw(st.sampled_from(self.tokens))
        before = self.store.get(run_id, "alice")
        may = before.status is RunStatus.RUNNING and self.current[run_id] == token
        if action == "complete":
            ok = self.store.complete(run_id, token, result={"token": token}, usage={}, now=self.now)
        elif action == "fail":
            ok = self.store.fail(run_id, token, error={"token": token}, now=self.now)
        elif action == "release":
            ok = self.store.release(run_id, token, now=self.now)
        else:
            ok = self.store.renew(run_id, token, LEASE, now=self.now)
        assert ok == may
        if not ok:
            assert self.store.get(run_id, "alice") == before, "a refused write changed the run"

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.store.cancel(data.draw(st.sampled_from(self.order)), "alice", now=self.now)

    @invariant()
    def outcomes_are_final_and_single(self) -> None:
        for run_id in self.order:
            run = self.store.get(run_id, "alice")
            assert run.attempt >= self.attempts.get(run_id, 0)
            self.attempts[run_id] = run.attempt
            if run_id in self.outcome:
                assert run == self.outcome[run_id], "a finished run changed"
            elif run.terminal:
                self.outcome[run_id] = run
            # A result exists only for succeeded runs, and it came from the winning token.
            assert (run.result is not None) == (run.status is RunStatus.SUCCEEDED)
            if run.status is RunStatus.SUCCEEDED:
                assert (run_id, run.result["token"]) in self.tokens
            if run.status is not RunStatus.RUNNING:
                assert run.lease_token is None


def test_lease_races(open_store: OpenStore) -> None:
    run_state_machine_as_test(
        lambda: LeaseRaces(open_store(max_attempts_total=3)),
        settings=settings(
            max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),
    )
