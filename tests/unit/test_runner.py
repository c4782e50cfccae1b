"""The TaskRunner's run loop and lease keeper (``deployments.core.runloop``), without Ray.

The loop is built directly with its dependencies: a queue (a scripted one, or a real in-memory
``RunStore`` behind the queue's methods), an executor and a clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from deployments.core.runloop import LeaseKeeper, RunLoop
from deployments.core.runstate import RunStatus
from deployments.errors import Overloaded, TaskFailed
from deployments.store import RunRecord, RunStore
from deployments.task_runner import is_transient
from tests.waiting import ManualClock, until


class ScriptedStore:
    """Leases the same run twice to the runner: first as ``t1``, whose lease is then lost, then as ``t2``."""

    def __init__(self, run: RunRecord) -> None:
        self.claims = [[dataclasses.replace(run, lease_token="t1")],
                       [dataclasses.replace(run, lease_token="t2", attempt=2)]]
        self.completed: list[str] = []
        self.nothing_queued = asyncio.Event()  # never set: the long-poll of an empty queue

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        if self.claims:
            return self.claims.pop(0)
        await self.nothing_queued.wait()
        return []

    async def renew(self, run_id: str, token: str) -> bool:
        return token == "t2"  # t1's lease expired and the run was claimed again

    async def complete(self, run_id: str, token: str, result: Any, usage: Any, owner: str,
                       messages: Any = None) -> bool:
        self.completed.append(token)
        return token == "t2"

    async def fail(self, run_id: str, token: str, error: dict[str, Any]) -> bool:
        raise AssertionError("nothing fails here")

    async def release(self, run_id: str, token: str, delay_s: float) -> bool:
        return False


class GatedExecutor:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.request_ids: list[str | None] = []

    async def execute(self, name: str, task_input: dict[str, Any], *billing: Any, **ids: Any) -> dict[str, Any]:
        self.calls += 1
        self.request_ids.append(ids.get("request_id"))
        await self.gate.wait()
        return {"task": name, "output": {"label": "a"}, "model": "m", "attempts": 1, "usage": {}}


class ScriptedExecutor:
    """Raises the scripted errors in turn, then succeeds; records when it was called."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.called_at: list[float] = []

    async def execute(self, name: str, task_input: dict[str, Any], *billing: Any, **ids: Any) -> dict[str, Any]:
        self.called_at.append(time.time())
        if self.errors:
            raise self.errors.pop(0)
        usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        return {"task": name, "output": {"label": "a"}, "model": "m", "attempts": 1, "usage": usage,
                "messages": [{"role": "user", "content": f"Label: {task_input.get('text')}"}]}


class StoreQueue:
    """A real (in-memory SQLite) RunStore behind the queue methods the loop calls."""

    def __init__(self, store: RunStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self.renewals = 0

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        runs = self.store.claim(worker_id=worker_id, lease_s=self.lease_s, limit=limit)
        if not runs:
            await asyncio.sleep(0.01)  # the store's long-poll, shortened
        return runs

    async def renew(self, run_id: str, token: str) -> bool:
        self.renewals += 1
        return self.store.renew(run_id, token, self.lease_s)

    async def complete(self, run_id: str, token: str, result: Any, usage: Any, owner: str,
                       messages: Any = None) -> bool:
        return self.store.complete(run_id, token, result=result, usage=usage, messages=messages)

    async def fail(self, run_id: str, token: str, error: dict[str, Any]) -> bool:
        return self.store.fail(run_id, token, error=error)

    async def release(self, run_id: str, token: str, delay_s: float) -> bool:
        return self.store.release(run_id, token, delay_s=delay_s)


def new_loop(queue: Any, executor: Any, **kwargs: Any) -> RunLoop:
    options: dict[str, Any] = {"worker_id": "w", "slots": 2, "lease_s": 600.0, "max_starts": 5,
                               "transient": is_transient, **kwargs}
    return RunLoop(queue, executor, **options)


def queued_run() -> RunRecord:
    with RunStore(":memory:") as store:
        store.create_run(task="t", input={"text": "x"}, owner="alice", idempotency_key=None)
        (run,) = store.claim(worker_id="w", lease_s=30)
        return run


def submit(store: RunStore, n: int = 1) -> list[str]:
    return [store.create_run(task="t", input={"i": i}, owner="alice", idempotency_key=None)[0].id
            for i in range(n)]


def test_a_run_claimed_again_by_the_same_replica_keeps_its_slot() -> None:
    async def scenario() -> None:
        store = ScriptedStore(queued_run())
        clock = ManualClock()
        loop = new_loop(store, GatedExecutor(), lease_s=3.0, clock=clock)
        loop.start()
        await until(lambda: len(loop.tasks) == 2 and clock.waiting == 2)  # both attempts run
        clock.advance(1.0)  # lease_s / 3: each keeper renews; t1's lease turns out to be lost
        await until(lambda: "t1" not in loop.tasks)
        # The stale attempt's cleanup must not drop the live attempt: it still holds a slot.
        assert list(loop.tasks) == ["t2"]
        loop.executor.gate.set()  # type: ignore[attr-defined]
        await until(lambda: not loop.tasks)
        assert store.completed == ["t2"] and loop.tasks == {}
        await loop.stop()

    asyncio.run(scenario())


def test_a_queued_runs_model_calls_go_by_the_id_of_the_request_that_submitted_it() -> None:
    async def scenario() -> None:
        with RunStore(":memory:") as store:
            store.create_run(task="t", input={}, owner="alice", idempotency_key=None, request_id="req-submit")
            executor = GatedExecutor()
            executor.gate.set()
            loop = new_loop(StoreQueue(store, lease_s=30), executor)
            loop.start()
            await until(lambda: executor.calls == 1)
            await loop.stop()
            assert executor.request_ids == ["req-submit"]

    asyncio.run(scenario())


def test_model_side_failures_are_transient_task_failures_are_not() -> None:
    # A worker replica dying mid-call reaches the runner as Overloaded (deployments.model_calls):
    # the run must go back to the queue, not fail; invalid output is the task's own failure.
    assert is_transient(Overloaded("Model 'm' is temporarily unavailable.", retry_after=1))
    assert not is_transient(TaskFailed("never valid"))
    assert not is_transient(ValueError("a bug"))


def test_a_stopping_runner_hands_its_runs_back_at_once() -> None:
    """Serve stops the replica gracefully: its runs are queued again now, not after the lease."""

    async def scenario() -> None:
        with RunStore(":memory:") as store:
            ids = submit(store, 3)
            loop = new_loop(StoreQueue(store, lease_s=600), GatedExecutor(), slots=64)  # never finishes
            loop.start()
            await until(lambda: len(loop.tasks) == 3)
            assert {store.get(i, "alice").status for i in ids} == {"running"}

            await loop.stop()

            runs = [store.get(i, "alice") for i in ids]
            assert {r.status for r in runs} == {"queued"}  # with a 600 s lease: only a release does that
            assert {r.attempt for r in runs} == {1}  # a hand-back is not a failed start
            assert {r.available_at for r in runs} == {None}  # and may be claimed again at once

    asyncio.run(scenario())


def test_a_transient_failure_backs_off_in_the_queue_not_on_a_lease() -> None:
    """Issue 10 item 3: the run goes back to the queue with a "not before" time; no slot waits."""

    async def scenario() -> None:
        with RunStore(":memory:") as store:
            (run_id,) = submit(store)
            executor = ScriptedExecutor(Overloaded("busy", retry_after=1.0))
            loop = new_loop(StoreQueue(store, lease_s=600), executor, slots=1)
            loop.start()
            released = await until(lambda: (r := store.get(run_id, "alice")).status == "queued" and r.attempt and r)
            failed_at = executor.called_at[0]
            # Released at once, not after the backoff, holding no lease and no slot meanwhile.
            assert released.lease_token is None and released.attempt == 1
            assert released.available_at is not None
            assert failed_at + 0.9 <= released.available_at <= time.time() + 1.0
            assert loop.free_slots == 1 and loop.tasks == {}

            done = await until(lambda: (r := store.get(run_id, "alice")).terminal and r, timeout_s=10)
            assert (done.status, done.attempt) == (RunStatus.SUCCEEDED, 2)
            assert executor.called_at[1] - failed_at >= 0.95  # not claimed before its time
            await loop.stop()

    asyncio.run(scenario())


def run_one(executor: ScriptedExecutor, **loop_options: Any) -> RunRecord:
    """Submit one run to a fresh store, let a loop run it to its end; the run as it ended."""

    async def scenario() -> RunRecord:
        with RunStore(":memory:") as store:
            (run_id,) = submit(store)
            loop = new_loop(StoreQueue(store, lease_s=600), executor, **loop_options)
            loop.start()
            try:
                ended = await until(lambda: (r := store.get(run_id, "alice")).terminal and r)
                return dataclasses.replace(ended, messages=store.messages(run_id))
            finally:
                await loop.stop()

    return asyncio.run(scenario())


def test_a_transient_failure_of_the_last_start_fails_the_run() -> None:
    run = run_one(ScriptedExecutor(Overloaded("busy")), max_starts=1)
    assert run.status is RunStatus.FAILED and run.attempt == 1
    assert run.error is not None and run.error["code"] == "overloaded"


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (TaskFailed("The output never validated."), "task_failed", "The output never validated."),
        # A bug: the client learns nothing internal.
        (RuntimeError("secret internals"), "internal_error", "Internal error while running the task."),
    ],
)
def test_a_task_error_fails_the_run_without_retry(error: Exception, code: str, message: str) -> None:
    executor = ScriptedExecutor(error)
    run = run_one(executor)
    assert run.status is RunStatus.FAILED and run.attempt == 1 and len(executor.called_at) == 1
    assert run.error is not None and (run.error["code"], run.error["message"]) == (code, message)


def test_a_finished_run_is_completed_with_its_usage() -> None:
    run = run_one(ScriptedExecutor())
    assert run.status is RunStatus.SUCCEEDED
    assert run.result == {"task": "t", "output": {"label": "a"}, "model": "m", "attempts": 1}
    assert run.usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    # The messages it sent are stored beside the result (for the console), not in it (for clients).
    assert run.messages is not None and run.messages[0]["content"].startswith("Label: ")


def test_the_lease_keeper_renews_and_stops_work_whose_lease_is_gone() -> None:
    async def scenario() -> None:
        with RunStore(":memory:") as store:
            (run_id,) = submit(store)
            (run,) = store.claim(worker_id="w", lease_s=30, now=1000.0)
            assert run.lease_token is not None and run.lease_expires_at == 1030.0
            clock = ManualClock()
            queue = StoreQueue(store, lease_s=30)
            keeper = LeaseKeeper(queue, run_id, run.lease_token, interval_s=10, clock=clock)
            work = asyncio.create_task(asyncio.Event().wait())
            keeping = asyncio.create_task(keeper.keep(work))

            await until(lambda: clock.waiting == 1)
            assert queue.renewals == 0  # nothing before the interval
            clock.advance(10)
            await until(lambda: keeper.renewals == 1 and clock.waiting == 1)
            lease = store.get(run_id, "alice").lease_expires_at
            assert lease is not None and lease > time.time() + 25  # renewed for another lease_s
            assert not work.done()

            store.cancel(run_id, "alice")  # the owner cancels: the next renewal finds no lease
            clock.advance(10)
            await until(lambda: work.done())
            assert work.cancelled() and keeping.done() and keeper.renewals == 2
            assert store.get(run_id, "alice").status is RunStatus.CANCELLED

    asyncio.run(scenario())


def test_a_failed_or_stuck_renewal_is_retried_not_taken_as_a_lost_lease() -> None:
    class FlakyQueue(StoreQueue):
        calls = 0

        async def renew(self, run_id: str, token: str) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("store restarting")
            if self.calls == 2:
                await asyncio.Event().wait()  # a store that never answers: bounded by interval_s
            return await super().renew(run_id, token)

    async def scenario() -> None:
        with RunStore(":memory:") as store:
            (run_id,) = submit(store)
            (run,) = store.claim(worker_id="w", lease_s=30)
            assert run.lease_token is not None
            clock = ManualClock()
            queue = FlakyQueue(store, lease_s=30)
            keeper = LeaseKeeper(queue, run_id, run.lease_token, interval_s=0.2, clock=clock)
            work = asyncio.create_task(asyncio.Event().wait())
            keeping = asyncio.create_task(keeper.keep(work))
            for expected in (1, 2, 3):
                await until(lambda: clock.waiting == 1)
                clock.advance(0.2)
                await until(lambda: queue.calls == expected)  # noqa: B023  (awaited in the iteration)
            await until(lambda: keeper.renewals == 1 and clock.waiting == 1)  # the third call succeeded
            assert not work.done()
            work.cancel()
            clock.advance(0.2)
            await until(lambda: keeping.done())

    asyncio.run(scenario())


def test_run_loop_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        new_loop(None, None, slots=0)
    with pytest.raises(ValueError):
        new_loop(None, None, lease_s=0)
