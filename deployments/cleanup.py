"""The periodic retention cleanup: one job, run by the BatchService shell, for all state.

``start_cleanup`` schedules ``sweep`` every ``interval_s`` on the running event loop (a Serve
replica constructs its deployment inside one). A sweep that fails is logged and tried again at
the next interval; it never ends the loop. What expires is ``deployments.core.retention``'s call.
``in_steps`` repeats a bounded delete until it removes less than a step, so no one call holds
the database for long (lease renewals share it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger("ray.serve")


async def _every(interval_s: float, sweep: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await sweep()
            logger.info("retention cleanup of %s: removed %s", name, removed)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("retention cleanup of %s failed; trying again in %.0fs", name, interval_s)


async def in_steps(step: Callable[[], Awaitable[tuple[int, int]]], size: int) -> tuple[int, int]:
    """Call ``step`` (one bounded database call, removing up to ``size`` of each of two kinds) until
    a call removes fewer than ``size`` of both; returns the two totals."""
    total = (0, 0)
    while True:
        done = await step()
        total = (total[0] + done[0], total[1] + done[1])
        if max(done) < size:
            return total


def start_cleanup(
    interval_s: float, sweep: Callable[[], Awaitable[object]], name: str
) -> asyncio.Task[None] | None:
    """Run ``sweep`` every ``interval_s`` from now on; None when no event loop runs (a shell built by
    a plain unit test, which calls the sweep itself)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.create_task(_every(interval_s, sweep, name), name=f"cleanup-{name}")
