"""TaskStore: the one owner of the durable run records (a single-replica Serve deployment).

Serves: the Gateway (create, get, long-poll, list, cancel runs) and the TaskRunner
replicas (claim under a lease, renew, complete, fail, release), through handles.
Calls: nothing but its database.
Owns: ``deployments.store.RunStore``, ``deployments.store.keys.KeyStore`` (API keys,
usage) and ``deployments.store.tasks.TaskVersionStore`` (task versions, seeded at start from the
deploy's task files), on one ``Database`` chosen by ``TasksConfig.store_location``: by default a
SQLite file under ``tasks.state_dir`` on the node this replica runs on (pin it to the
head node in serve.yaml so a restarted replica finds its file again); with
``tasks.database_url`` or ``PROMPTFLEET_DATABASE_URL``, a PostgreSQL database.

It is a thin async shell. Database calls block (fsync, the network), so they run off the
event loop, on two lanes of one thread each: the *lease lane* for the runners' calls (claim,
renew, complete, fail, release) and the *user lane* for everything the Gateway asks (runs,
long-poll reads, keys, usage). However much user traffic queues up, a lease renewal waits for
at most the one user statement in flight, never for the queue behind it — renewals cannot be
starved past the lease (tests/serve/test_flood.py). Two kinds of waiters are woken from the
loop: runners long-polling ``claim`` for work, and clients long-polling a run until it ends.
Retention of runs is part of the one retention job, which the BatchService runs for all state
(``deployments.cleanup``); ``expire`` does the same for runs alone, on the user lane, in steps.

Metrics (``deployments.telemetry``): runs submitted, started, finished and lost to an expired
lease are counted as the store commits them (``RunStore``'s observer); queue depth by status and
the oldest queued run's age are sampled every ``metrics.sample_interval_s`` on the user lane.

Expected errors (404, 409, 503) are returned as values, never raised
(``deployments.core.replies``); what the Gateway gets is a ``RunView``, never a lease token.

Why one actor for runs, keys and usage, console sign-outs and task versions, and not one each:
they are tables of one database, and this actor is what keeps access to it safe and fair. SQLite
has one writer per file: actors of their own would queue on its lock in no particular order,
where the two lanes above decide who goes first, so that a lease renewal waits for at most one
user statement. And one single-replica actor pinned to the head node is one process to place,
back up and restart (and one connection pool on PostgreSQL). Callers never see the mix: each
surface has a client named for what it holds (``deployments.clients``: ``RunsClient``,
``LeasesClient``, ``KeysClient``, ``SessionsClient``, ``TaskVersionsClient``). The deployment keeps
its first name: renaming it would rename a part of every operator's running application, and what
``serve status`` shows them, for no change in behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from deployments.cleanup import in_steps
from deployments.collector import raise_first_generation
from deployments.config import MetricsConfig, TasksConfig
from deployments.core.replies import Reply, replying
from deployments.core.retention import Cutoffs
from deployments.errors import NotFound, Overloaded
from deployments.logs import watch_serve_log
from deployments.schemas import (
    DayTokens,
    KeyList,
    KeyView,
    ModelUsage,
    RunDetail,
    RunDetailList,
    RunList,
    RunView,
    UsageCsv,
    UsageList,
    UsageRow,
)
from deployments.store import RunRecord, RunStore, open_database
from deployments.store import usage as usage_rows
from deployments.store.keys import ApiKey, KeySnapshot, KeyStore
from deployments.store.records import UsageRecord
from deployments.store.runs import EXPIRE_STEP, RunMove
from deployments.store.tasks import CataloguePage, TaskActivation, TaskVersion, TaskVersionStore, VersionInput
from deployments.telemetry import STORE_METRICS, metrics_for, start_sampling

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class TaskStore:
    def __init__(
        self,
        config: TasksConfig,
        store: RunStore | None = None,
        seed: list[VersionInput] | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        watch_serve_log()
        raise_first_generation()
        self.config = config
        self.metrics = metrics_for(metrics)
        # The replica's environment is where a database URL with a password may come from.
        self.database = open_database(config.store_location(os.environ))
        self.store = store or RunStore(self.database, max_attempts_total=config.max_run_starts)
        if self.metrics.enabled:
            self.store.observer = self._moved
            self.metrics.declare(*STORE_METRICS)
        self.keys = KeyStore(self.database)
        self.tasks = TaskVersionStore(self.database)
        if seed:
            for name, version, changed in self.tasks.seed(seed):
                if changed:
                    logger.info("task %s: version %d from the deploy's files is active", name, version)
        # One thread per lane keeps each lane's calls in order (see the module docstring).
        self.lease_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskstore-lease")
        self.user_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskstore-user")
        self.work_available = asyncio.Event()
        self.finished: dict[str, asyncio.Event] = {}
        # Set (and replaced) when a push or rollback may have moved the catalogue: wakes the replicas
        # long-polling ``task_changes_wait``. Every change goes through this one replica.
        self.catalogue_moved = asyncio.Event()
        interval = (metrics or MetricsConfig()).sample_interval_s
        self.sampler = start_sampling(self.metrics, interval, self.sample_metrics, "run queue")
        logger.info("task store at %s", self.database.location)

    def _moved(self, move: RunMove) -> None:
        self.metrics.run_moved(move.task, move.event.value, move.status.value, move.lease_expired)

    async def sample_metrics(self) -> None:
        """Queue depth by status and the oldest queued run's age, into the gauges."""
        stats = await self._user(self.store.queue_stats)
        self.metrics.run_queue(stats.by_status, stats.oldest_queued_age_s)

    async def _lease(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.lease_lane, lambda: fn(*args, **kwargs))

    async def _user(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.user_lane, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Stop both lanes and close the database (tests; Serve simply ends the process)."""
        self.lease_lane.shutdown(wait=True)
        self.user_lane.shutdown(wait=True)
        self.database.close()

    def _notify_finished(self, run_id: str) -> None:
        event = self.finished.pop(run_id, None)
        if event is not None:
            event.set()


    # -- the Gateway's side --------------------------------------------------------------

    async def create_run(
        self, task: str, task_input: dict[str, Any], owner: str, idempotency_key: str | None,
        task_version: int | None = None, request_id: str | None = None,
    ) -> Reply[tuple[RunView, bool]]:
        """Queue a run (durably, before answering) pinned to ``task_version``: ``(view, created)``; an
        idempotent repeat gives the existing run with ``created`` False. ``request_id``: the
        submitting request's."""
        return await replying(self._create_run(task, task_input, owner, idempotency_key, task_version, request_id))

    async def _create_run(
        self, task: str, task_input: dict[str, Any], owner: str, idempotency_key: str | None,
        task_version: int | None, request_id: str | None,
    ) -> tuple[RunView, bool]:
        queued = await self._user(self.store.count_queued)
        if queued >= self.config.max_queued_runs:
            # Checked before the insert: an idempotent repeat of an accepted run still fails
            # fast here, which is safe (the client retries after Retry-After and gets its id).
            raise Overloaded(
                f"The task queue is full ({queued} runs waiting); retry later.", retry_after=5
            )
        run, created = await self._user(
            self.store.create_run, task=task, input=task_input, owner=owner, idempotency_key=idempotency_key,
            task_version=task_version, request_id=request_id,
        )
        if created:
            self.work_available.set()
            self.metrics.run_submitted(task)
        return run.view(), created

    async def get(self, run_id: str, owner: str | None, wait_s: float = 0.0) -> Reply[RunView]:
        """The run; with ``wait_s`` > 0, block until it is terminal or ``wait_s`` passes."""
        return await replying(self._get(run_id, owner, wait_s))

    async def _get(self, run_id: str, owner: str | None, wait_s: float) -> RunView:
        run = await self._user(self.store.get, run_id, owner)
        deadline = time.monotonic() + wait_s
        while not run.terminal and (remaining := deadline - time.monotonic()) > 0:
            event = self.finished.setdefault(run_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout=min(remaining, 5.0))
            except TimeoutError:
                pass  # re-read: a lease expiry or a write we were not told about
            run = await self._user(self.store.get, run_id, owner)
        return run.view()

    async def list_runs(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> Reply[RunList]:
        return await replying(self._list_runs(owner, status, task, limit, cursor))

    async def _list_runs(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> RunList:
        runs, next_cursor = await self._page(owner, status, task, limit, cursor)
        return RunList(data=[run.view() for run in runs], next_cursor=next_cursor)

    async def _page(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RunRecord], str | None]:
        return await self._user(self.store.list_runs, owner, status=status, task=task, limit=limit, cursor=cursor)

    # -- the admin's console: whole records and counts ----------------------------------

    async def run_detail(self, run_id: str) -> Reply[RunDetail]:
        return await replying(self._run_detail(run_id))

    async def _run_detail(self, run_id: str) -> RunDetail:
        run = await self._user(self.store.get, run_id, None)
        return run.detail(messages=await self._user(self.store.messages, run.id))

    async def list_details(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> Reply[RunDetailList]:
        """``list_runs`` (the same query and keyset pages) with each run's owner and input."""
        return await replying(self._list_details(owner, status, task, limit, cursor))

    async def _list_details(
        self, owner: str | None, status: str | None, task: str | None, limit: int, cursor: str | None
    ) -> RunDetailList:
        runs, next_cursor = await self._page(owner, status, task, limit, cursor)
        return RunDetailList(data=[run.detail() for run in runs], next_cursor=next_cursor)

    async def count_by_status(self) -> Reply[dict[str, int]]:
        return await replying(self._user(self.store.count_by_status))

    async def cancel(self, run_id: str, owner: str | None) -> Reply[RunView]:
        return await replying(self._cancel(run_id, owner))

    async def _cancel(self, run_id: str, owner: str | None) -> RunView:
        run = await self._user(self.store.cancel, run_id, owner)
        if run.terminal:
            self._notify_finished(run_id)
        return run.view()

    # -- the runners' side (the lease lane) ----------------------------------------------

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> Reply[list[RunRecord]]:
        """Lease up to ``limit`` runs; if none is claimable, wait up to ``wait_s`` for one."""
        return await replying(self._claim(worker_id, limit, wait_s))

    async def _claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]:
        deadline = time.monotonic() + wait_s
        while True:
            self.work_available.clear()
            runs = await self._lease(
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

    async def renew(self, run_id: str, lease_token: str) -> Reply[bool]:
        return await replying(self._lease(self.store.renew, run_id, lease_token, self.config.lease_s))

    async def complete(
        self, run_id: str, lease_token: str, result: dict[str, Any], usage: dict[str, Any], owner: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> Reply[bool]:
        return await replying(self._complete(run_id, lease_token, result, usage, owner, messages))

    async def _complete(
        self, run_id: str, lease_token: str, result: dict[str, Any], usage: dict[str, Any], owner: str | None,
        messages: list[dict[str, str]] | None = None,
    ) -> bool:
        # Usage is not billed here: every model call of the run was metered to its key as it
        # was made (``deployments.model_calls``), the calls of a lost attempt included.
        won = await self._lease(self.store.complete, run_id, lease_token, result=result, usage=usage,
                                messages=messages)
        self._notify_finished(run_id)
        return won

    async def fail(self, run_id: str, lease_token: str, error: dict[str, Any]) -> Reply[bool]:
        return await replying(self._fail(run_id, lease_token, error))

    async def _fail(self, run_id: str, lease_token: str, error: dict[str, Any]) -> bool:
        won = await self._lease(self.store.fail, run_id, lease_token, error=error)
        self._notify_finished(run_id)
        return won

    async def release(self, run_id: str, lease_token: str, delay_s: float = 0.0) -> Reply[bool]:
        """Back to the queue; with ``delay_s``, not claimed again before that many seconds."""
        return await replying(self._release(run_id, lease_token, delay_s))

    async def _release(self, run_id: str, lease_token: str, delay_s: float) -> bool:
        released = await self._lease(self.store.release, run_id, lease_token, delay_s=delay_s)
        if released:
            # A run released with a delay wakes the claim long-polls when it becomes claimable.
            asyncio.get_running_loop().call_later(delay_s, self.work_available.set)
        return released

    async def cancel_queued(self, owner: str) -> Reply[int]:
        """Cancel ``owner``'s queued runs (its key was revoked)."""
        return await replying(self._user(self.store.cancel_queued, owner))

    async def expire(self, now: float | None = None) -> tuple[int, int]:
        """Retention of runs: delete finished runs and forget Idempotency-Keys past their periods, in
        bounded steps so lease renewals get the database in between. Returns (deleted, forgotten)."""
        cutoffs = Cutoffs.at(self.config.retention, time.time() if now is None else now)
        return await in_steps(
            lambda: self._user(self.store.expire, cutoffs.runs_before, cutoffs.idempotency_before), EXPIRE_STEP
        )

    async def check_health(self) -> None:
        await self._lease(self.store.count_queued)

    # -- API keys and usage (the Gateway's authentication) --------------------------------

    async def create_key(
        self, name: str, rpm: int | None, tpm: int | None, token_budget: int | None, weight: float = 1.0,
        scope: str = "tenant",
    ) -> Reply[tuple[ApiKey, str]]:
        return await replying(
            self._user(self.keys.create, name, rpm=rpm, tpm=tpm, token_budget=token_budget, weight=weight,
                       scope=scope)
        )

    async def key_snapshot(self, known_version: int | None, with_usage: bool = True) -> Reply[KeySnapshot]:
        """What a Gateway replica's key index polls for (``KeyStore.snapshot``)."""
        return await replying(self._user(self.keys.snapshot, known_version, with_usage=with_usage))

    async def end_console_session(self, session_id: str, expires_at: float) -> Reply[None]:
        """A console sign-out (``KeyStore.end_session``)."""
        return await replying(self._user(self.keys.end_session, session_id, expires_at))

    async def console_session_ended(self, session_id: str) -> Reply[bool]:
        return await replying(self._user(self.keys.session_ended, session_id))

    async def get_key(self, key_id: str) -> Reply[ApiKey | None]:
        """The key ``key_id`` (revoked ones too), or None: for metering work billed to a key."""
        return await replying(self._get_key(key_id))

    async def _get_key(self, key_id: str) -> ApiKey | None:
        try:
            key: ApiKey = await self._user(self.keys.get, key_id)
        except NotFound:
            return None
        return key

    async def list_keys(self, limit: int, after: str | None, order: str = "asc") -> Reply[KeyList]:
        """A page of keys in creation order (``asc`` or ``desc``) after the key ``after``."""
        return await replying(self._list_keys(limit, after, order))

    async def _list_keys(self, limit: int, after: str | None, order: str) -> KeyList:
        keys, more = await self._user(self.keys.list_keys, limit, after, order)
        return KeyList(data=[KeyView(**dataclasses.asdict(k)) for k in keys], has_more=more,
                       first_id=keys[0].id if keys else None, last_id=keys[-1].id if keys else None)

    async def set_key_limits(
        self, key_id: str, rpm: int | None, tpm: int | None, token_budget: int | None, weight: float
    ) -> Reply[ApiKey]:
        return await replying(
            self._user(self.keys.set_limits, key_id, rpm=rpm, tpm=tpm, token_budget=token_budget, weight=weight)
        )

    async def revoke_key(self, key_id: str) -> Reply[ApiKey]:
        return await replying(self._user(self.keys.revoke, key_id))

    async def record_usage(self, rows: list[UsageRecord]) -> Reply[None]:
        return await replying(self._user(self.keys.record_usage, rows))

    async def usage(
        self, key_id: str | None, since: str | None = None, until: str | None = None,
        limit: int = usage_rows.DEFAULT_LIMIT, cursor: str | None = None,
    ) -> Reply[UsageList]:
        """A page of usage rows (every key's for ``key_id`` None) and the next page's cursor."""
        return await replying(self._usage(key_id, since, until, limit, cursor))

    async def _usage(
        self, key_id: str | None, since: str | None, until: str | None, limit: int, cursor: str | None
    ) -> UsageList:
        rows, next_cursor = await self._user(
            self.keys.usage, key_id, since=since, until=until, limit=limit, cursor=cursor
        )
        return UsageList(data=[UsageRow(**row) for row in rows], next_cursor=next_cursor)

    async def usage_csv(
        self, key_id: str | None, since: str | None, until: str | None, cursor: str | None
    ) -> Reply[UsageCsv]:
        """The next ``usage_rows.MAX_LIMIT`` usage rows as CSV lines (the header line first when
        ``cursor`` is None), and the cursor after them: the console's export, a page a call."""
        return await replying(self._usage_csv(key_id, since, until, cursor))

    async def _usage_csv(
        self, key_id: str | None, since: str | None, until: str | None, cursor: str | None
    ) -> UsageCsv:
        rows, next_cursor = await self._user(
            self.keys.usage, key_id, since=since, until=until, limit=usage_rows.MAX_LIMIT, cursor=cursor
        )
        return UsageCsv(csv=usage_rows.csv_text(rows, header=cursor is None), next_cursor=next_cursor)

    async def tokens_per_day(
        self, days: int, key_id: str | None = None, today: str | None = None
    ) -> Reply[list[DayTokens]]:
        """Tokens of each of the ``days`` days up to ``today`` that has usage, for the console's
        charts: summed by the database over those days only."""
        return await replying(self._tokens_per_day(days, key_id, today))

    async def _tokens_per_day(self, days: int, key_id: str | None, today: str | None) -> list[DayTokens]:
        points = await self._user(self.keys.tokens_per_day, days, key_id, today)
        return [DayTokens(day=day, total_tokens=tokens) for day, tokens in points]

    async def today_by_model(self) -> Reply[list[ModelUsage]]:
        """Today's (UTC) requests and tokens per model, every key together (the console's overview)."""
        return await replying(self._today_by_model())

    async def _today_by_model(self) -> list[ModelUsage]:
        return [ModelUsage(**row) for row in await self._user(self.keys.today_by_model)]

    # -- task versions (the catalogue every Gateway and TaskRunner follows) --------------------

    async def task_changes(self, since: int | None, version: int | None, after: str) -> Reply[CataloguePage]:
        """One bounded page of the catalogue's change from ``since`` to ``version`` (``TaskVersionStore.changes``;
        one primary-key read when nothing changed)."""
        return await replying(self._user(self.tasks.changes, since, version, after))

    async def task_version(self, name: str, version: int) -> Reply[TaskVersion]:
        return await replying(self._user(self.tasks.get, name, version))

    async def task_changes_wait(self, since: int | None, wait_s: float) -> Reply[int]:
        """The catalogue's version once it is not ``since``, or after ``wait_s`` (then ``since``): the long
        poll each replica's catalogue follows, so that an idle cluster asks nothing and a push is seen at once."""
        return await replying(self._task_changes_wait(since, wait_s))

    async def _task_changes_wait(self, since: int | None, wait_s: float) -> int:
        moved = self.catalogue_moved  # taken before the read: a change committed after it sets this one
        version = await self._user(self.tasks.catalogue_version)
        if version != since:
            return version
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(moved.wait(), timeout=wait_s)
            version = await self._user(self.tasks.catalogue_version)
        return version

    def _catalogue_may_have_moved(self) -> None:
        self.catalogue_moved.set()
        self.catalogue_moved = asyncio.Event()

    async def push_tasks(self, items: list[VersionInput], author: str) -> Reply[list[tuple[str, int, bool]]]:
        """Store and activate checked definitions, all or none: ``(name, active version, changed)``."""
        try:
            return await replying(self._user(self.tasks.push, items, author))
        finally:
            self._catalogue_may_have_moved()

    async def rollback_task(self, name: str, version: int, actor: str) -> Reply[TaskVersion]:
        try:
            return await replying(self._user(self.tasks.rollback, name, version, actor))
        finally:
            self._catalogue_may_have_moved()

    async def task_history(self, name: str) -> Reply[tuple[list[TaskVersion], list[TaskActivation]]]:
        return await replying(self._user(self.tasks.history, name))
