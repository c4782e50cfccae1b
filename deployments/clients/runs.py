"""The runs the TaskStore holds, as two typed clients over its one handle.

- ``RunsClient``: what the Gateway and the console ask — submit (durably, idempotent per key),
  read or long-poll, list, cancel; whole records and counts for the console; cancelling a revoked
  key's queued runs; the store's health.
- ``LeasesClient``: what a TaskRunner's run loop asks — claim under a lease, renew, complete, fail,
  release. It is the ``core.runloop.RunQueue`` the loop runs on; the store serves these on its
  lease lane, apart from everything ``RunsClient`` asks (``deployments.task_store``).

Ray's failures of either become ``Overloaded`` naming the task store (``clients.failures``).
"""

from __future__ import annotations

from typing import Any

from deployments.clients.base import HandleClient
from deployments.schemas import RunDetail, RunDetailList, RunList, RunView
from deployments.store import RunRecord

STORE = "The task store"


class RunsClient(HandleClient):
    who = STORE

    async def create(
        self, *, task: str, task_input: dict[str, Any], owner: str, idempotency_key: str | None = None,
        task_version: int | None = None, request_id: str | None = None,
    ) -> tuple[RunView, bool]:
        """Queue a run pinned to ``task_version``, committed before this returns: ``(view, created)``;
        an idempotent repeat gives the existing run with ``created`` False. 503 when the queue is full."""
        created: tuple[RunView, bool] = await self._answer(self.handle.create_run.remote(
            task, task_input, owner, idempotency_key, task_version, request_id))
        return created

    async def get(self, run_id: str, *, owner: str | None, wait_s: float = 0.0) -> RunView:
        """The run (``owner`` None: anyone's); with ``wait_s`` > 0, once it ended or ``wait_s`` passed."""
        view: RunView = await self._answer(self.handle.get.remote(run_id, owner, wait_s))
        return view

    async def cancel(self, run_id: str, *, owner: str | None) -> RunView:
        view: RunView = await self._answer(self.handle.cancel.remote(run_id, owner))
        return view

    async def list_runs(
        self, *, owner: str | None, status: str | None = None, task: str | None = None, limit: int,
        cursor: str | None = None,
    ) -> RunList:
        """A keyset page of runs, newest first (``owner`` None: every owner's)."""
        runs: RunList = await self._answer(self.handle.list_runs.remote(owner, status, task, limit, cursor))
        return runs

    async def detail(self, run_id: str) -> RunDetail:
        """The whole record of any owner's run, with the messages it sent (the console)."""
        detail: RunDetail = await self._answer(self.handle.run_detail.remote(run_id))
        return detail

    async def list_details(
        self, *, owner: str | None, status: str | None = None, task: str | None = None, limit: int,
        cursor: str | None = None,
    ) -> RunDetailList:
        """``list_runs`` with each run's owner and input (the console)."""
        listing: RunDetailList = await self._answer(
            self.handle.list_details.remote(owner, status, task, limit, cursor))
        return listing

    async def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = await self._answer(self.handle.count_by_status.remote())
        return counts

    async def cancel_queued(self, owner: str) -> int:
        """Cancel ``owner``'s queued runs (its key was revoked); how many."""
        cancelled: int = await self._answer(self.handle.cancel_queued.remote(owner))
        return cancelled

    async def check_health(self) -> None:
        """Returns once the store answers a read on its lease lane (``/readyz``)."""
        await self._answer(self.handle.check_health.remote())


class LeasesClient(HandleClient):
    """The runners' side (``core.runloop.RunQueue``): every answer is whether the lease still held."""

    who = STORE

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        """Lease up to ``limit`` queued runs; if none is claimable, wait up to ``wait_s`` for one."""
        runs: list[RunRecord] = await self._answer(self.handle.claim.remote(worker_id, limit, wait_s))
        return runs

    async def renew(self, run_id: str, lease_token: str) -> bool:
        return bool(await self._answer(self.handle.renew.remote(run_id, lease_token)))

    async def complete(
        self, run_id: str, lease_token: str, result: dict[str, Any], usage: dict[str, Any], owner: str,
        messages: list[dict[str, str]] | None = None,
    ) -> bool:
        return bool(await self._answer(
            self.handle.complete.remote(run_id, lease_token, result, usage, owner, messages)))

    async def fail(self, run_id: str, lease_token: str, error: dict[str, Any]) -> bool:
        return bool(await self._answer(self.handle.fail.remote(run_id, lease_token, error)))

    async def release(self, run_id: str, lease_token: str, delay_s: float) -> bool:
        """Back to the queue, not claimed again before ``delay_s``."""
        return bool(await self._answer(self.handle.release.remote(run_id, lease_token, delay_s)))
