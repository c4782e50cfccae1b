"""The run loop and the lease keeper of a TaskRunner replica (plain asyncio; no Ray).

``RunLoop`` leases queued runs from a ``RunQueue`` into at most ``slots`` concurrent
executions, runs each through an ``Executor`` while a ``LeaseKeeper`` renews its lease,
and hands every run back with exactly one of ``complete``, ``fail`` or ``release``:

    claim ─▶ execute ─┬─ result ──────────────────────▶ complete
                      ├─ transient error, starts left ─▶ release(delay_s = backoff)
                      ├─ transient error, no starts ───▶ fail
                      ├─ task error / bug ─────────────▶ fail
                      └─ lease lost / cancelled ───────▶ (nothing: the current holder finishes it)

A transient failure never waits *holding* the lease: the run goes back to the queue at once
with a "not before" time (``delay_s``), so no slot is parked and no lease quietly runs out
while nobody renews it. ``stop()`` (the replica is being stopped) releases every held run at
once rather than leaving them to wait out their leases.

Everything the loop touches is injected — the queue (the TaskStore handle in production, a
``RunStore`` in tests), the executor, the clock and the transient-error test — so it is
tested without Ray and without reaching around a constructor (tests/unit/test_runner.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deployments.core.retry import BackoffPolicy
from deployments.errors import PromptfleetError
from deployments.store.records import RunRecord

__all__ = ["Clock", "Executor", "LeaseKeeper", "RunLoop", "RunQueue", "SystemClock"]

logger = logging.getLogger("ray.serve")

CLAIM_WAIT_S = 10.0
"""How long one ``claim`` long-polls the queue for work."""
CLAIM_ERROR_PAUSE_S = 1.0
"""Pause after a failed ``claim`` (store restarting or unreachable)."""
MAX_RELEASE_DELAY_S = 60.0
"""Cap of a released run's "not before" delay, whatever Retry-After an upstream sent."""


class RunQueue(Protocol):
    """The TaskStore's runner side, as the loop sees it. Errors are raised (the shell unwraps)."""

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[RunRecord]: ...

    async def renew(self, run_id: str, lease_token: str) -> bool: ...

    async def complete(
        self, run_id: str, lease_token: str, result: dict[str, Any], usage: dict[str, Any], owner: str,
        messages: list[dict[str, str]] | None = None,
    ) -> bool: ...

    async def fail(self, run_id: str, lease_token: str, error: dict[str, Any]) -> bool: ...

    async def release(self, run_id: str, lease_token: str, delay_s: float) -> bool: ...


class Executor(Protocol):
    async def execute(
        self,
        name: str,
        task_input: dict[str, Any],
        payer: str | None = None,
        wait: bool = False,
        background: bool = False,
        version: int | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``version`` of the task (None: the active one) once, billed to the key ``payer``;
        ``wait``: the payer's limits may delay the model calls instead of refusing them (nobody waits
        on a queued run); ``background``: behind the payer's interactive calls in a limited model's
        fair queue; ``request_id``: the id its model calls go by (a queued run's: the submitting
        request's)."""
        ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class LeaseKeeper:
    """Renews one run's lease every ``interval_s`` while ``work`` runs.

    A renewal answered False means the lease is no longer ours (the owner cancelled the run, or
    it expired and another runner claimed it): the work is cancelled. A renewal that fails or
    takes longer than ``interval_s`` (the store is briefly unreachable or stuck) is retried at the
    next interval; the store honours a late renewal as long as nobody has reclaimed the run.
    """

    queue: RunQueue
    run_id: str
    lease_token: str
    interval_s: float
    clock: Clock
    renewals: int = field(default=0, init=False)

    async def keep(self, work: asyncio.Task[Any]) -> None:
        while not work.done():
            await self.clock.sleep(self.interval_s)
            if work.done():
                return
            try:
                # Bounded: a renewal stuck on a hung store must not stop the next ones.
                kept = await asyncio.wait_for(self.queue.renew(self.run_id, self.lease_token), self.interval_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("renewing the lease of run %s failed; retrying", self.run_id, exc_info=True)
                continue
            self.renewals += 1
            if not kept:
                work.cancel()
                return


class RunLoop:
    """Leases runs from ``queue`` into at most ``slots`` concurrent executions (see the module doc).

    ``held`` maps lease token → run id of the runs executing now. It is keyed by token, not run
    id: a run whose lease this replica lost (its event loop stalled past the lease) can be
    claimed again by this same loop while the old attempt is still winding down; both count
    against ``slots``, and the old attempt's cleanup must not drop the new attempt's entry.
    """

    def __init__(
        self,
        queue: RunQueue,
        executor: Executor,
        *,
        worker_id: str,
        slots: int,
        lease_s: float,
        max_starts: int,
        transient: Callable[[BaseException], bool],
        clock: Clock | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        if slots < 1 or lease_s <= 0 or max_starts < 1:
            raise ValueError("slots and max_starts must be >= 1, lease_s > 0")
        self.queue = queue
        self.executor = executor
        self.worker_id = worker_id
        self.slots = slots
        self.lease_s = lease_s
        self.max_starts = max_starts
        self.transient = transient
        self.clock = clock or SystemClock()
        self.backoff = backoff or BackoffPolicy(base_s=1.0, cap_s=30.0)
        self.held: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.slot_free = asyncio.Event()
        self.loop_task: asyncio.Task[None] | None = None

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.tasks)

    def start(self) -> None:
        """Start claiming (on the running event loop)."""
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._claim_loop())

    async def stop(self) -> None:
        """Stop claiming, stop every execution and hand its run back to the queue now."""
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop_task
        held = list(self.held.items())
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A run that finished meanwhile is no longer ours to release: the store ignores the token.
        await asyncio.gather(
            *(self.queue.release(run_id, token, 0.0) for token, run_id in held), return_exceptions=True
        )

    async def _claim_loop(self) -> None:
        while True:
            try:
                if self.free_slots <= 0:
                    self.slot_free.clear()
                    await self.slot_free.wait()
                    continue
                for run in await self.queue.claim(self.worker_id, self.free_slots, CLAIM_WAIT_S):
                    self.launch(run)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("claim failed; retrying")
                await self.clock.sleep(CLAIM_ERROR_PAUSE_S)

    def launch(self, run: RunRecord) -> asyncio.Task[None]:
        """Execute a claimed run in a slot of its own."""
        if run.lease_token is None:
            raise ValueError(f"run {run.id} has no lease")
        token = run.lease_token
        self.held[token] = run.id
        task = asyncio.get_running_loop().create_task(self._execute(run, token))
        self.tasks[token] = task
        return task

    async def _execute(self, run: RunRecord, token: str) -> None:
        keeper = LeaseKeeper(self.queue, run.id, token, self.lease_s / 3, self.clock)
        # The version pinned at submit (None for runs queued before versions: the active one).
        work = asyncio.create_task(self.executor.execute(
            run.task, run.input, run.owner, True, True, run.task_version, request_id=run.request_id
        ))
        renewer = asyncio.create_task(keeper.keep(work))
        try:
            await self._settle(run, token, work)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store did not take the outcome (unreachable): the lease runs out and the run
            # is claimed again — at-least-once, and the store keeps only one result.
            logger.exception("could not hand run %s back to the store", run.id)
        finally:
            renewer.cancel()
            work.cancel()
            self.tasks.pop(token, None)
            self.held.pop(token, None)
            self.slot_free.set()

    async def _settle(self, run: RunRecord, token: str, work: asyncio.Task[dict[str, Any]]) -> None:
        try:
            result = await work
        except asyncio.CancelledError:
            if work.cancelled() and not _current_task_cancelling():
                return  # lease lost or run cancelled: whoever holds it now finishes it
            raise
        except Exception as exc:
            await self._hand_back_failure(run, token, exc)
            return
        usage = result.pop("usage", None) or {}
        messages = result.pop("messages", None)  # kept beside the result, for the console; not shown to clients
        await self.queue.complete(run.id, token, result, usage, run.owner, messages)

    async def _hand_back_failure(self, run: RunRecord, token: str, exc: Exception) -> None:
        if self.transient(exc) and run.attempt < self.max_starts:
            retry_after = exc.retry_after if isinstance(exc, PromptfleetError) else None
            # Back to the queue now, to be claimed again after the backoff: no slot waits it out.
            delay_s = min(self.backoff.delay(run.attempt, retry_after), MAX_RELEASE_DELAY_S)
            await self.queue.release(run.id, token, delay_s)
            return
        if isinstance(exc, PromptfleetError):
            error = exc.to_body()["error"]
        else:
            logger.error("run %s failed unexpectedly", run.id, exc_info=exc)
            error = PromptfleetError("Internal error while running the task.").to_body()["error"]
        await self.queue.fail(run.id, token, error)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

