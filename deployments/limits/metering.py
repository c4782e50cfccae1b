"""Metering of API keys: a key's limits before a model call, its usage after (any process).

Used by the one model call path (``deployments.model_calls``) wherever it runs: in the Gateway
(chat, streams), in the TaskRunner (task runs, billed to the run's owner key) and in batch jobs'
driver processes (billed to the batch's key). It reaches the shared state only through handles,
so it works the same in any process:

- a key's ``rpm``/``tpm`` are budgets on the shared RateLimiter (``key:<id>``), so they hold
  across every Gateway, runner and batch driver. A key may send its burst at once
  (``admission.key_burst_s`` seconds' worth of its rate, at least ``admission.key_min_burst``
  requests); beyond it calls are paced: ``admit`` waits for the call's slot if it starts within
  ``wait_s`` (an HTTP client's own timeout, ``gateway.deadline``, or the model's
  ``admission_wait_s``; a queued run's task timeout), and only a call whose slot is further away
  gets 429, with Retry-After = when that slot would be free;
- ``share`` names the payer for the fair share of a limited model's budget (booked by the worker);
- a key's ``token_budget`` is checked against the tokens recorded for it: the key record as
  this process last fetched it (``KeyEntry``: the Gateway's ``Authenticator`` index, or ``account`` here,
  which asks the TaskStore at most every ``KEY_TTL_S``) plus what this process recorded since.
  A call in flight *holds* its token estimate (prompt + its output limit) until it is recorded or
  refunded, and a new call is let in only while the tokens used plus those held are under the
  budget; otherwise it waits (within ``wait_s``, as for rpm/tpm) for the calls in flight to settle
  and looks again — let in, 403 once the budget is spent, or 429 when its wait runs out. A burst
  of concurrent requests cannot spend the budget many times over;
- after the call, ``record`` adds a usage row (accumulated here, written to the TaskStore about
  once a second) and settles the tpm booking with the real count; a call that was refused,
  failed or was cancelled gives its booking back with ``refund``;
- a key record fetched again (``account`` here, the ``Authenticator``'s index refresh) starts from
  the tokens this process recorded that the fetch may not have seen: rows not yet written, rows
  being written, and rows written after the fetch began (``mark``, ``unwritten_since``). Without
  them a refresh that raced a write forgot up to a second of the key's spending.

A budget can therefore be overrun by what the calls let in last spend beyond their estimates (the
estimate counts the messages' text and the tools' and output format's schemas, not a chat template's
tokens; ``core.tokens``), in each process, and by what other
processes recorded within the last second or so (each process holds only its own calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from deployments.clients.keys import KeysClient
from deployments.config import DEFAULT_ADMISSION_WAIT_S, AdmissionConfig
from deployments.errors import AuthenticationFailed, PermissionDenied, RateLimited
from deployments.limits.booking import BookingClient, answered_at_once
from deployments.schemas import Budget, Share, Usage
from deployments.store.keys import ApiKey
from deployments.store.records import UsageRecord

logger = logging.getLogger("ray.serve")

FLUSH_INTERVAL_S = 1.0
# Writes of usage remembered for key refreshes still in flight (``unwritten_since``): far more than a
# refresh outlasts, at one write a second.
WRITES_REMEMBERED = 64
KEY_TTL_S = 5.0  # how long ``account`` trusts a key record fetched from the TaskStore
MAX_CACHED = 10_000  # per-key budgets and shares kept ready (a plain cache: cleared when full)


@dataclass
class KeyEntry:
    """A key record as this Gateway replica last fetched it, plus the tokens it recorded since."""

    key: ApiKey
    fetched_at: float  # monotonic
    tokens_since_fetch: int = 0

    @property
    def tokens_used(self) -> int:
        return self.key.tokens_used + self.tokens_since_fetch


def admission_wait(client_timeout_s: float | None, default_wait_s: float, max_wait_s: float) -> float:
    """Seconds a request may wait for its slot."""
    return min(client_timeout_s if client_timeout_s is not None else default_wait_s, max_wait_s)


class Meter:
    """A process's metering of API keys: key admission before a call, usage after (module doc)."""

    def __init__(
        self,
        keys: KeysClient,
        limiter: DeploymentHandle,
        admission: AdmissionConfig | None = None,
        key_ttl_s: float = KEY_TTL_S,
        anonymous: str | None = None,
    ) -> None:
        self.keys = keys
        # With authentication off, calls without a key are recorded under this owner
        # (``store.keys.ANONYMOUS_OWNER``, the owner ``gateway.caller.ANONYMOUS`` has), so /v1/usage and
        # the console show a local start's traffic; None: they are not recorded.
        self.anonymous = anonymous
        self.admission = admission or AdmissionConfig()
        # A key's own budget never queues (one tenant): its bookings are answered at once, so a plain
        # call does (cheaper than the stream a shared model budget needs).
        self.bookings = BookingClient(answered_at_once(limiter.reserve_now.remote))
        self.key_ttl_s = key_ttl_s
        self.accounts: dict[str, KeyEntry] = {}
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flusher: asyncio.Task[None] | None = None
        # What a key refresh may not have seen yet (``unwritten_since``): rows being written, and the
        # tokens per key of the last writes, numbered by ``flushes``.
        self.flushes = 0
        self.writing: list[list[UsageRecord]] = []
        self.written: deque[tuple[int, dict[str, int]]] = deque(maxlen=WRITES_REMEMBERED)
        self.key_budgets: dict[tuple[str, int | None, int | None], Budget] = {}
        self.shares: dict[tuple[str, float, bool], Share] = {}
        self.held: dict[str, int] = {}  # key id -> token estimates of its calls in flight (keys with a budget)
        self.settled: dict[str, asyncio.Event] = {}  # key id -> set when one of its holds is released

    async def account(self, key_id: str | None) -> KeyEntry | None:
        """The key ``key_id`` as the payer of calls made outside an HTTP request (task runs, batch
        lines); None for no key (unmetered: authentication off, the admin, anonymous runs)."""
        if key_id is None or not key_id.startswith("key_"):
            return None
        now = time.monotonic()
        entry = self.accounts.get(key_id)
        if entry is None or now - entry.fetched_at > self.key_ttl_s:
            mark = self.mark()
            key = await self.keys.get(key_id)
            if key is None:
                raise AuthenticationFailed("The API key this work is billed to does not exist.")
            # Tokens this process recorded that the record may not include are still ours to count.
            entry = KeyEntry(key=key, fetched_at=now, tokens_since_fetch=self.unwritten_since(mark).get(key_id, 0))
            self.accounts[key_id] = entry
        return entry

    def wait_s(self, client_timeout_s: float | None, default_wait_s: float = DEFAULT_ADMISSION_WAIT_S) -> float:
        """How long an HTTP request may wait for its slot (``gateway.deadline``)."""
        return admission_wait(client_timeout_s, default_wait_s, self.admission.max_wait_s)

    def share(self, entry: KeyEntry | None, background: bool = False) -> Share | None:
        """The payer's place in a model's fair queue (None: unmetered)."""
        if entry is None:
            return None
        key = (entry.key.id, entry.key.weight, background)
        share = self.shares.get(key)
        if share is None:
            if len(self.shares) >= MAX_CACHED:
                self.shares.clear()
            share = self.shares[key] = Share(tenant=entry.key.id, weight=entry.key.weight, background=background)
        return share

    def _budget(self, key: ApiKey) -> Budget:
        cache_key = (key.id, key.rpm, key.tpm)
        budget = self.key_budgets.get(cache_key)
        if budget is None:
            if len(self.key_budgets) >= MAX_CACHED:
                self.key_budgets.clear()
            rpm_burst, tpm_burst = self.admission.key_bursts(key.rpm, key.tpm)
            budget = self.key_budgets[cache_key] = Budget(
                rpm=key.rpm, tpm=key.tpm, rpm_burst=rpm_burst, tpm_burst=tpm_burst
            )
        return budget

    @staticmethod
    def check_token_budget(entry: KeyEntry | None) -> None:
        """Refuse new work for a revoked key or one whose token budget is spent (403)."""
        if entry is None:
            return
        key = entry.key
        if key.revoked_at is not None:
            raise AuthenticationFailed("The API key this work is billed to was revoked.", param="Authorization")
        if key.token_budget is not None and entry.tokens_used >= key.token_budget:
            raise PermissionDenied(
                f"The token budget of this API key ({key.token_budget} tokens) is exhausted.",
                param="Authorization",
            )

    async def admit(self, entry: KeyEntry | None, tokens: int, wait_s: float = 0.0) -> int:
        """Admit a model call of about ``tokens`` for the key: its token budget, then its rpm/tpm (a
        booking on ``key:<id>``); return the tokens held for it (to pass to ``record`` or ``refund``,
        which settle the tpm booking and release the token budget hold)."""
        self.check_token_budget(entry)
        if entry is None:
            return 0
        key = entry.key
        deadline = time.monotonic() + wait_s
        held = await self._hold(entry, tokens, deadline)
        if key.rpm is None and key.tpm is None:
            return held
        try:
            retry_after = await self.bookings.book(
                f"key:{key.id}", self._budget(key), 1, tokens if key.tpm else 0, deadline
            )
        except asyncio.CancelledError:
            # Cancelled while waiting for the slot: the booking may already stand. Give it back (if it
            # never went out, the limiter bounds the refund to one burst, so it mints nothing more).
            self.refund(entry, tokens)
            raise
        if retry_after is not None:
            self._release(key, tokens)  # nothing was booked on the limiter
            raise RateLimited(
                f"This API key is over its rate limit; its next slot is {retry_after:.1f}s away, past this "
                "request's deadline.",
                retry_after=retry_after,
            )
        return tokens

    async def _hold(self, entry: KeyEntry, tokens: int, deadline: float) -> int:
        """Hold ``tokens`` of the key's budget for a call in flight. While the calls in flight may
        already spend what is left, wait for them to settle (until ``deadline``, then 429): a burst
        is let in as fast as the budget is known to cover it, and gets 403 once it is spent."""
        key = entry.key
        if key.token_budget is None:
            return tokens if key.tpm else 0
        while True:
            self.check_token_budget(entry)
            in_flight = self.held.get(key.id, 0)
            if not in_flight or entry.tokens_used + in_flight < key.token_budget:
                self.held[key.id] = in_flight + tokens
                return tokens
            left = deadline - time.monotonic()
            if left <= 0:
                raise RateLimited(
                    f"This API key's requests in flight may spend the rest of its token budget "
                    f"({key.token_budget} tokens); retry when they have finished.",
                    retry_after=1,
                )
            settled = self.settled.setdefault(key.id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), left)

    def _release(self, key: ApiKey, held: int) -> None:
        if key.token_budget is None or not held:
            return
        left = self.held.get(key.id, 0) - held
        if left > 0:
            self.held[key.id] = left
        else:
            self.held.pop(key.id, None)
        settled = self.settled.pop(key.id, None)
        if settled is not None:
            settled.set()  # the calls waiting for this key's budget look again

    def record(self, entry: KeyEntry | None, model: str, usage: Usage, booked: int = 0) -> None:
        """Count a finished call's tokens for the key (and settle what ``admit`` held and booked); a call
        without a key counts for ``anonymous`` when that is set (authentication off)."""
        if entry is None:
            if self.anonymous is not None:
                self._pend(self.anonymous, model, usage)
            return
        key = entry.key
        self._pend(key.id, model, usage)
        entry.tokens_since_fetch += usage.prompt_tokens + usage.completion_tokens
        self._release(key, booked)
        if booked and key.tpm:
            self.bookings.settle(f"key:{key.id}", self._budget(key), usage.total_tokens - booked)

    def _pend(self, key_id: str, model: str, usage: Usage) -> None:
        """Add a call's usage to the rows written about once a second."""
        row = self.pending[(key_id, model)]
        row[0] += 1
        row[1] += usage.prompt_tokens
        row[2] += usage.completion_tokens
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def refund(self, entry: KeyEntry | None, booked: int) -> None:
        """Give back what ``admit`` held and booked for a call that produced nothing (refused, failed,
        cancelled)."""
        if entry is None or not booked:
            return
        key = entry.key
        self._release(key, booked)
        if key.tpm:
            self.bookings.settle(f"key:{key.id}", self._budget(key), -booked)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        rows = [UsageRecord(key_id, model, *r) for (key_id, model), r in self.pending.items()]
        self.pending.clear()
        self.writing.append(rows)
        try:
            await self.keys.record_usage(rows)
        except Exception:
            logger.exception("could not record usage; %d rows kept for the next flush", len(rows))
            for usage in rows:
                row = self.pending[(usage.key_id, usage.model)]
                row[0] += usage.requests
                row[1] += usage.prompt_tokens
                row[2] += usage.completion_tokens
        else:
            self.flushes += 1
            self.written.append((self.flushes, _tokens_by_key(rows)))
        finally:
            self.writing.remove(rows)

    def mark(self) -> int:
        """Taken before a key record is fetched, for ``unwritten_since``."""
        return self.flushes

    def unwritten_since(self, mark: int) -> Mapping[str, int]:
        """Tokens per key that this process recorded and a key record fetched after ``mark`` may not
        include: not yet written, being written, or written since the mark. A write that landed
        before the fetch read is counted twice until the next fetch: a budget errs on refusing."""
        unwritten: dict[str, int] = defaultdict(int)
        for (key_id, _), row in self.pending.items():
            unwritten[key_id] += row[1] + row[2]
        for rows in self.writing:
            for key_id, tokens in _tokens_by_key(rows).items():
                unwritten[key_id] += tokens
        for number, tokens_by_key in self.written:
            if number > mark:
                for key_id, tokens in tokens_by_key.items():
                    unwritten[key_id] += tokens
        return unwritten

    async def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        await self.flush()
        await self.bookings.close()


def _tokens_by_key(rows: list[UsageRecord]) -> dict[str, int]:
    tokens: dict[str, int] = defaultdict(int)
    for row in rows:
        tokens[row.key_id] += row.prompt_tokens + row.completion_tokens
    return dict(tokens)
