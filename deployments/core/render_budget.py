"""The budget of one template render: time, output and work (pure; used by ``deployments.core.sandbox``).

A render runs inside ``budget_for(limits)``; everything the sandbox does on its behalf goes through the
active ``Budget`` of the thread (a context variable): ``tick`` for each step (the clock is read every
``CHECK_EVERY`` steps), ``need`` before an operation that could outgrow its operands, ``produced`` for
what an operation returned, ``collect`` for the template's output. Over a budget, ``RenderLimitExceeded``
names the config key that sets the limit. Owns nothing but the budget of the render in progress.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECK_EVERY",
    "DEFAULT_LIMITS",
    "ITEM_CHARS",
    "MAX_INT_BITS",
    "WORK_FACTOR",
    "Budget",
    "RenderLimitExceeded",
    "RenderLimits",
    "active",
    "budget_for",
    "size",
]

WORK_FACTOR = 8
"""What the operations of one render may produce in total, as a multiple of its output budget."""
MAX_INT_BITS = 65_536
"""Largest integer a template may compute (about 19,700 digits)."""
ITEM_CHARS = 8  # a list, tuple or dict item counts as this many characters of work
CHECK_EVERY = 32  # steps between two looks at the clock
_YIELD_EVERY_S = 0.001  # how long a render holds the GIL before it lets other threads in


@dataclass(frozen=True)
class RenderLimits:
    """Budgets of one render (all the templates of one task: system and prompt together)."""

    timeout_s: float = 1.0
    max_chars: int = 1_000_000

    @property
    def max_work(self) -> int:
        return WORK_FACTOR * self.max_chars


DEFAULT_LIMITS = RenderLimits()


class RenderLimitExceeded(Exception):
    """A render went over one of its budgets. ``limit`` is the config key that sets it, ``message``
    says what happened in words a task's owner can act on."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.limit, self.message)


@dataclass
class Budget:
    limits: RenderLimits
    deadline: float
    work_left: int
    steps: int = 0
    yielded_at: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.steps += 1
        if self.steps % CHECK_EVERY == 0:
            self.check_clock()

    def check_clock(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise RenderLimitExceeded(
                "render_timeout_s",
                f"rendering took longer than its time budget of {self.limits.timeout_s:g}s "
                "(tasks.render_timeout_s)",
            )
        if now - self.yielded_at > _YIELD_EVERY_S:
            time.sleep(0)  # releases the GIL: a waiting event loop runs now, not at the next switch interval
            self.yielded_at = time.monotonic()

    def need(self, size: int | float) -> None:
        """Refuse an operation that would produce ``size`` characters of work, before it runs."""
        if size > self.work_left:
            raise RenderLimitExceeded(
                "render_max_chars",
                f"the template's operations would produce more than {self.limits.max_work:,} characters "
                f"({WORK_FACTOR} × tasks.render_max_chars of {self.limits.max_chars:,})",
            )

    def charge(self, size: int) -> None:
        self.need(size)
        self.work_left -= size

    def produced(self, value: Any) -> Any:
        """Charge what an operation returned; hand it back."""
        self.tick()
        produced = size(value)
        if produced:
            self.charge(produced)
        return value

    def collect(self, chunks: Iterable[str]) -> str:
        """Join a template's output chunks, within the output budget."""
        out: list[str] = []
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.limits.max_chars:
                raise RenderLimitExceeded(
                    "render_max_chars",
                    f"the rendered prompt is longer than {self.limits.max_chars:,} characters "
                    "(tasks.render_max_chars)",
                )
            self.tick()
            out.append(chunk)
        self.check_clock()
        return "".join(out)


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("render_budget", default=None)


@contextmanager
def budget_for(limits: RenderLimits) -> Iterator[Budget]:
    """Make ``limits`` the budget of every render in this block (one budget shared by all of them);
    inside an enclosing block, the enclosing budget stays."""
    current = _BUDGET.get()
    if current is not None:
        yield current
        return
    budget = Budget(limits, time.monotonic() + limits.timeout_s, limits.max_work)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def active() -> Budget:
    budget = _BUDGET.get()
    if budget is None:
        # Only the compiler's constant folding calls these outside a render; raising makes it leave
        # the expression to run time (Jinja turns any exception there into ``Impossible``).
        raise RuntimeError("no render budget is active")
    return budget


def size(value: Any) -> int:
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        return len(value) * ITEM_CHARS
    return 0
