"""TaskStore: the one owner of the durable run records (a single-replica Serve deployment).

Serves: the Gateway (create, get, long-poll, list, cancel runs) and the TaskRunner
replicas (claim under a lease, renew, complete, fail, release), through handles.
Calls: nothing but its database.
Owns: ``deployments.store.RunStore`` and ``deployments.store.keys.KeyStore`` (API keys,
usage), on one ``Database`` chosen by ``TasksConfig.store_location``: by default a
SQLite file under ``tasks.state_dir`` on the node this replica runs on (pin it to the
head node in serve.yaml so a restarted replica finds its file again); with
``tasks.database_url`` or ``PROMPTFLEET_DATABASE_URL``, a PostgreSQL database.

It is a thin async shell: every database call runs on one dedicated thread (they
block on fsync or the network, and must not block the event loop; one thread keeps
them in order), and two kinds of waiters are woken from the loop — runners
long-polling ``claim`` for work, and clients long-polling a run until it ends.
Every ``tasks.retention.cleanup_interval_s`` it deletes finished runs and forgets
Idempotency-Keys past their retention (``expire``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from deployments.cleanup import start_cleanup
from deployments.config import TasksConfig
from deployments.core.retention import Cutoffs
from deployments.errors import Overloaded
from deployments.store import RunRecord, RunStore, open_database
from deployments.store.keys import ApiKey, KeyStore

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
EXPIRE_STEP = 1000  # RunStore.expire's default limit: rows per database call


class TaskStore:
    def __init__(self, config: TasksConfig, store: RunStore | None = None) -> None:
        self.config = config
        # The replica's environment is where a database URL with a password may come from.
        self.database = open_database(config.store_location(os.environ))
        self.store = store or RunStore(self.database, max_attempts_total=config.max_run_starts)
        self.keys = KeyStore(self.database)
        self.db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskstore")
        self.work_available = asyncio.Event()
        self.finished: dict[str, asyncio.Event] = {}
        self.cleanup = start_cleanup(config.retention.cleanup_interval_s, self.expire, "runs")
        logger.info("task store at %s", self.database.location)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.db, lambda: fn(*args, **kwargs))

    def _notify_finished(self, run_id: str) -> None:
        event = self.finished.pop(run_id, None)
        if event is not None:
            event.set()

    # -- the Gateway's side --------------------------------------------------------------

    async def create_run(
        self, task: str, task_input: dict[str, Any], owner: str, idempotency_key: str | None
    ) -> tuple[RunRecord, bool]:
        queued = await self._db(self.store.count_queued)
        if queued >= self.config.max_queued_runs:
            # Checked before the insert: an idempotent repeat of an accepted run still fails
            # fast here, which is safe (the client retries after Retry-After and gets its id).
            raise Overloaded(
                f"The task queue is full ({queued} runs waiting); retry later.", retry_after=5
            )
        run, created = await self._db(
            self.store.create_run, task=task, input=task_input, owner=owner, idempotency_key=idempotency_key
        )
        if created:
            self.work_available.set()
        return run, created

    async def get(self, run_id: str, owner: str | None, wait_s: float = 0.0) -> RunRecord:
        """The run; with ``wait_s`` > 0, block until it is terminal or ``wait_s`` passes."""
        run = await self._db(self.store.get, run_id, owner)
        deadline = time.monotonic() + wait_s
        while not run.terminal and (remaining := deadline - time.monotonic()) > 0:
            event = self.finished.setdefault(run_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout=min(remaining, 5.0))
            except TimeoutError:
                pass  # re-read: a lease expiry or a write we were not told about
            run = await self._db(self.store.get, run_id, owner)
        return run

    async def list_runs(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RunRecord], str | None]:
        return await self._db(self.store.list_runs, owner, status=status, task=task, limit=limit, cursor=cursor)

    async def cancel(self, run_id: str, owner: str | None) -> RunRecord:
        run = await self._db(self.store.cancel, run_id, owner)
        if run.terminal:
            self._notify_finished(run_id)
        return run

    # -- the runners' side ---------------------------------------------------------------

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        """Lease up to ``limit`` runs; if none is queued, wait up to ``wait_s`` for one."""
        deadline = time.monotonic() + wait_s
        while True:
            self.work_available.clear()
            runs = await self._db(
                self.store.claim, worker_id=worker_id, lease_s=self.config.lease_s, limit=limit
            )
            remaining = deadline - time.monotonic()
            if runs or remaining <= 0:
                if runs:
                    self.work_available.set()  # there may be more for the next runner
                return runs
            try:
                # Wake on new work, and at least every lease period to requeue expired leases.
                await asyncio.wait_for(self.work_available.wait(), timeout=min(remaining, self.config.lease_s))
            except TimeoutError:
                pass

    async def renew(self, run_id: str, lease_token: str) -> bool:
        return await self._db(self.store.renew, run_id, lease_token, self.config.lease_s)

    async def complete(
        self, run_id: str, lease_token: str, result: Any, usage: dict[str, Any], owner: str | None = None
    ) -> bool:
        won = await self._db(self.store.complete, run_id, lease_token, result=result, usage=usage)
        self._notify_finished(run_id)
        if won and owner is not None and owner.startswith("key_"):
            # Async runs are billed to their key when their result lands (once: only the winner).
            row = (owner, str(result.get("model", "")), 1, int(usage.get("prompt_tokens", 0)),
                   int(usage.get("completion_tokens", 0)))
            await self._db(self.keys.record_usage, [row])
        return won

    async def fail(
        self, run_id: str, lease_token: str, error: dict[str, Any], usage: dict[str, Any] | None
    ) -> bool:
        won = await self._db(self.store.fail, run_id, lease_token, error=error, usage=usage)
        self._notify_finished(run_id)
        return won

    async def release(self, run_id: str, lease_token: str) -> bool:
        released = await self._db(self.store.release, run_id, lease_token)
        if released:
            self.work_available.set()
        return released

    async def cancel_queued(self, owner: str) -> int:
        """Cancel ``owner``'s queued runs (its key was revoked)."""
        return await self._db(self.store.cancel_queued, owner)

    async def expire(self, now: float | None = None) -> tuple[int, int]:
        """Retention: delete finished runs and forget Idempotency-Keys past their periods, in
        bounded steps so lease renewals get the database in between. Returns (deleted, forgotten)."""
        cutoffs = Cutoffs.at(self.config.retention, time.time() if now is None else now)
        total = (0, 0)
        while True:
            step = await self._db(self.store.expire, cutoffs.runs_before, cutoffs.idempotency_before)
            total = (total[0] + step[0], total[1] + step[1])
            if max(step) < EXPIRE_STEP:
                return total

    async def check_health(self) -> None:
        await self._db(self.store.count_queued)

    # -- API keys and usage (the Gateway's authentication) --------------------------------

    async def create_key(
        self, name: str, rpm: int | None, tpm: int | None, token_budget: int | None
    ) -> tuple[ApiKey, str]:
        return await self._db(self.keys.create, name, rpm=rpm, tpm=tpm, token_budget=token_budget)

    async def lookup_key(self, key_hash: str) -> ApiKey | None:
        return await self._db(self.keys.lookup, key_hash)

    async def list_keys(self) -> list[ApiKey]:
        return await self._db(self.keys.list_keys)

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self._db(self.keys.revoke, key_id)

    async def record_usage(self, rows: list[tuple[str, str, int, int, int]]) -> None:
        await self._db(self.keys.record_usage, rows)

    async def usage(self, key_id: str | None) -> list[dict[str, Any]]:
        return await self._db(self.keys.usage, key_id)
