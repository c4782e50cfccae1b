"""TaskRunner's bookkeeping of the runs it holds, against a scripted store (no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError

from deployments.config import TasksConfig
from deployments.errors import Overloaded
from deployments.store import RunRecord, RunStore
from deployments.task_executor import TRANSIENT, TaskExecutor
from deployments.task_runner import TaskRunner


class _Method:
    """Stands in for a DeploymentHandle method: ``.remote(...)`` returns an awaitable."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class ScriptedStore:
    """Leases the same run twice to the runner: first as ``t1``, whose lease is then lost, then as ``t2``."""

    def __init__(self, run: RunRecord) -> None:
        self.claims = [[dataclasses.replace(run, lease_token="t1")],
                       [dataclasses.replace(run, lease_token="t2", attempt=2)]]
        self.completed: list[str] = []
        self.claim, self.renew, self.complete = _Method(self._claim), _Method(self._renew), _Method(self._complete)

    async def _claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        if self.claims:
            return self.claims.pop(0)
        await asyncio.sleep(wait_s)  # nothing queued: the long-poll
        return []

    async def _renew(self, run_id: str, token: str) -> bool:
        return token == "t2"  # t1's lease expired and the run was claimed again

    async def _complete(self, run_id: str, token: str, result: Any, usage: Any, *rest: Any) -> bool:
        self.completed.append(token)
        return token == "t2"


class GatedExecutor:
    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def execute(self, name: str, task_input: dict[str, Any], share: Any = None) -> dict[str, Any]:
        await self.gate.wait()
        return {"task": name, "output": {"label": "a"}, "model": "m", "attempts": 1, "usage": {}}


class _Runner(TaskRunner):
    # Serve awaits the async ``__del__`` at shutdown (the test does so explicitly); the garbage
    # collector would only create a never-awaited coroutine.
    def __del__(self) -> None:
        pass


def queued_run() -> RunRecord:
    with RunStore(":memory:") as store:
        store.create_run(task="t", input={"text": "x"}, owner="alice", idempotency_key=None)
        (run,) = store.claim(worker_id="w", lease_s=30)
        return run


def test_a_run_claimed_again_by_the_same_replica_keeps_its_slot() -> None:
    async def scenario() -> None:
        store = ScriptedStore(queued_run())
        runner = object.__new__(_Runner)
        # Serve awaits TaskRunner's async constructor; so does this test.
        await TaskRunner.__init__(runner, {}, {}, store, TasksConfig(lease_s=1, runner_concurrency=2))
        runner.executor = GatedExecutor()  # type: ignore[assignment]
        # Both attempts start; t1's first renewal (after lease_s / 3) finds its lease lost and stops it.
        await asyncio.sleep(0.7)
        # The stale attempt's cleanup must not drop the live attempt: it still holds a slot.
        assert list(runner.active) == ["t2"]
        runner.executor.gate.set()  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        assert store.completed == ["t2"] and runner.active == {}
        await TaskRunner.__del__(runner)

    asyncio.run(scenario())


class _DeadWorker:
    """A worker handle whose replica died with the call in flight."""

    def __init__(self) -> None:
        self.chat = _Method(self._chat)

    async def _chat(self, body: dict[str, Any], share: Any = None) -> Any:
        raise ActorUnavailableError("Actor is unavailable.", None)


def test_a_worker_replica_dying_mid_call_is_transient_not_a_task_failure() -> None:
    executor = TaskExecutor({}, {"m": _DeadWorker()})  # type: ignore[dict-item]
    with pytest.raises(Overloaded) as info:
        asyncio.run(executor._chat("m", {"messages": []}))
    assert isinstance(info.value, TRANSIENT)  # so a queued run is released, not failed
    assert info.value.retry_after == 1


class StoreMethods:
    """A real (in-memory SQLite) RunStore behind the handle-method shape the runner calls."""

    def __init__(self, store: RunStore, lease_s: float) -> None:
        async def claim(worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
            runs = store.claim(worker_id=worker_id, lease_s=lease_s, limit=limit)
            if not runs:
                await asyncio.sleep(min(wait_s, 0.05))
            return runs

        async def renew(run_id: str, token: str) -> bool:
            return store.renew(run_id, token, lease_s)

        async def release(run_id: str, token: str) -> bool:
            return store.release(run_id, token)

        self.claim, self.renew, self.release = _Method(claim), _Method(renew), _Method(release)


def test_a_stopping_runner_hands_its_runs_back_at_once() -> None:
    """Serve stops the replica gracefully: its runs are queued again now, not after the lease."""

    async def scenario() -> None:
        with RunStore(":memory:") as store:
            ids = [store.create_run(task="t", input={"i": i}, owner="alice", idempotency_key=None)[0].id
                   for i in range(3)]
            runner = object.__new__(_Runner)
            await TaskRunner.__init__(runner, {}, {}, StoreMethods(store, lease_s=600), TasksConfig())
            runner.executor = GatedExecutor()  # type: ignore[assignment]  # never finishes
            for _ in range(100):
                if len(runner.active) == 3:
                    break
                await asyncio.sleep(0.01)
            assert {store.get(i, "alice").status for i in ids} == {"running"}

            await TaskRunner.__del__(runner)

            runs = [store.get(i, "alice") for i in ids]
            assert {r.status for r in runs} == {"queued"}  # with a 600 s lease: only a release does that
            assert {r.attempt for r in runs} == {1}  # a hand-back is not a failed start

    asyncio.run(scenario())
