"""The Gateway's Authenticator and its key index, against a real KeyStore behind the handle shape.

No Ray: the TaskStore handle's ``key_snapshot.remote`` is a coroutine over a real (SQLite)
``KeyStore``; the clock is a number the test moves.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from deployments.clients.keys import KeysClient
from deployments.config import AuthConfig
from deployments.core.replies import Reply
from deployments.errors import AuthenticationFailed, Overloaded, PermissionDenied, PromptfleetError
from deployments.gateway.auth import ADMIN, MISS_RECHECK_S, Authenticator, require_admin, require_prompts
from deployments.gateway.caller import ANONYMOUS, Caller
from deployments.limits.metering import KeyEntry
from deployments.store.keys import ApiKey, KeySnapshot, KeyStore
from deployments.store.records import UsageRecord

ADMIN_KEY = "pf-admin-" + "x" * 20
TTL = 5.0


class StoreHandle:
    """The TaskStore handle's ``key_snapshot`` over a real KeyStore; counts the round trips."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.calls = 0
        self.down = False
        self.answer = asyncio.Event()
        self.answer.set()
        self.key_snapshot = self

    async def remote(self, known_version: int | None, with_usage: bool) -> Reply[KeySnapshot]:
        self.calls += 1
        if self.down:
            await asyncio.sleep(0)  # a real await point, like a handle call
            return Overloaded("store unavailable", retry_after=1)
        snapshot = self.keys.snapshot(known_version, with_usage=with_usage)  # what the store saw when asked
        await self.answer.wait()  # the answer travels back (a test may hold it)
        return snapshot


class Clock:
    """Monotonic seconds that move only when the test, or the Authenticator's sleep, moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "keys.sqlite3") as store:
        yield store


@pytest.fixture
def handle(keys: KeyStore) -> StoreHandle:
    return StoreHandle(keys)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(handle: StoreHandle, clock: Clock) -> Authenticator:
    return Authenticator(AuthConfig(enabled=True, cache_ttl_s=TTL), KeysClient(handle), ADMIN_KEY,
                         clock=clock, sleep=clock.sleep)


def request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers})


def authenticate(auth: Authenticator, authorization: str | None) -> Caller:
    return asyncio.run(auth.authenticate(request(authorization)))


def refused(auth: Authenticator, authorization: str | None) -> PromptfleetError:
    with pytest.raises(PromptfleetError) as info:
        authenticate(auth, authorization)
    return info.value


def test_auth_off_everyone_is_the_anonymous_caller(handle: StoreHandle) -> None:
    auth = Authenticator(AuthConfig(enabled=False), KeysClient(handle), None)
    req = request(None)
    assert asyncio.run(auth.authenticate(req)) is ANONYMOUS
    assert req.state.caller is ANONYMOUS
    assert handle.calls == 0


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "token pf-abc"])
def test_a_missing_or_malformed_header_is_401_naming_authorization(auth: Authenticator, header: str | None) -> None:
    error = refused(auth, header)
    assert isinstance(error, AuthenticationFailed) and error.status_code == 401
    assert error.param == "Authorization" and "Bearer" in error.message


def test_the_admin_key_is_the_admin_without_a_store_call(auth: Authenticator, handle: StoreHandle) -> None:
    req = request(f"Bearer {ADMIN_KEY}")
    assert asyncio.run(auth.authenticate(req)) is ADMIN and req.state.caller is ADMIN
    assert handle.calls == 0
    assert isinstance(refused(auth, f"Bearer {ADMIN_KEY}x"), AuthenticationFailed)


def test_a_valid_key_is_its_caller_and_costs_one_store_call_per_period(
    auth: Authenticator, keys: KeyStore, handle: StoreHandle, clock: Clock
) -> None:
    key, plain = keys.create("ci", rpm=7, token_budget=100)
    for _ in range(50):
        caller = authenticate(auth, f"bearer  {plain} ")  # scheme case and spaces do not matter
        assert (caller.owner, caller.key_id, caller.is_admin) == (key.id, key.id, False)
        assert caller.entry is not None and caller.entry.key.rpm == 7
    assert handle.calls == 1
    clock.now += TTL + 0.1
    authenticate(auth, f"Bearer {plain}")
    assert handle.calls == 2


def test_distinct_bogus_keys_cost_the_store_nothing_per_key(
    auth: Authenticator, keys: KeyStore, handle: StoreHandle, clock: Clock
) -> None:
    """Issue 10 item 4: a flood of made-up keys costs one store call per MISS_RECHECK_S, not one per key."""
    _, plain = keys.create("real")

    async def flood() -> list[BaseException | Caller]:
        requests = [auth.authenticate(request(f"Bearer pf-{secrets.token_urlsafe(32)}")) for _ in range(2000)]
        return await asyncio.gather(*requests, return_exceptions=True)

    started = clock.now
    for _ in range(4):
        answers = asyncio.run(flood())
        assert all(isinstance(a, AuthenticationFailed) and a.status_code == 401 for a in answers)
    # The first load, then one shared recheck per flood, each MISS_RECHECK_S after the one before.
    assert handle.calls == 5
    assert clock.now - started == pytest.approx(4 * MISS_RECHECK_S)
    assert authenticate(auth, f"Bearer {plain}").key_id is not None  # and real keys still work


def test_a_key_created_through_another_replica_works_on_its_first_request_here(
    auth: Authenticator, keys: KeyStore, handle: StoreHandle, clock: Clock
) -> None:
    keys.create("first")
    assert isinstance(refused(auth, "Bearer pf-unknown"), AuthenticationFailed)  # the index is fresh
    key, plain = keys.create("made-through-another-replica")
    before = clock.now
    assert authenticate(auth, f"Bearer {plain}").key_id == key.id  # not refused: it waits for a recheck
    assert clock.now - before <= MISS_RECHECK_S
    calls = handle.calls
    assert authenticate(auth, f"Bearer {plain}").key_id == key.id  # and then it is in the index
    assert handle.calls == calls


def test_a_refresh_that_began_before_the_request_does_not_answer_its_miss(
    auth: Authenticator, keys: KeyStore, handle: StoreHandle, clock: Clock
) -> None:
    """The race CI met: a refresh asked the store, the key was made elsewhere, then its request came."""
    old, plain_old = keys.create("old")
    authenticate(auth, f"Bearer {plain_old}")
    clock.now += TTL + 0.1

    async def race() -> tuple[Caller, Caller]:
        handle.answer.clear()
        by_old_key = asyncio.ensure_future(auth.authenticate(request(f"Bearer {plain_old}")))
        for _ in range(10):  # until that request's refresh has asked the store (its answer is held)
            await asyncio.sleep(0)
        assert handle.calls == 2
        _, plain_new = keys.create("new")  # through another replica, after the store answered
        by_new_key = asyncio.ensure_future(auth.authenticate(request(f"Bearer {plain_new}")))
        for _ in range(10):
            await asyncio.sleep(0)
        handle.answer.set()
        return await by_old_key, await by_new_key

    by_old_key, by_new_key = asyncio.run(race())
    assert by_old_key.key_id == old.id
    assert by_new_key.key_id is not None and by_new_key.key_id != old.id
    assert handle.calls == 3


def test_a_key_created_through_this_replica_works_at_once(auth: Authenticator, keys: KeyStore) -> None:
    keys.create("first")
    refused(auth, "Bearer pf-unknown")
    key, plain = keys.create("new")
    auth.keys_changed()  # what the admin route does after a create
    assert authenticate(auth, f"Bearer {plain}").key_id == key.id


def test_a_revoked_key_stops_within_the_ttl_and_at_once_through_this_replica(
    auth: Authenticator, keys: KeyStore, clock: Clock
) -> None:
    a, plain_a = keys.create("a")
    b, plain_b = keys.create("b")
    assert authenticate(auth, f"Bearer {plain_a}").key_id == a.id
    assert authenticate(auth, f"Bearer {plain_b}").key_id == b.id

    keys.revoke(a.id)  # through another replica
    assert authenticate(auth, f"Bearer {plain_a}").key_id == a.id  # within the ttl: still trusted
    clock.now += TTL + 0.1
    assert isinstance(refused(auth, f"Bearer {plain_a}"), AuthenticationFailed)

    keys.revoke(b.id)
    auth.forget(b.id)  # through this replica
    assert isinstance(refused(auth, f"Bearer {plain_b}"), AuthenticationFailed)


def test_token_counts_are_refreshed_for_budgets(auth: Authenticator, keys: KeyStore, clock: Clock) -> None:
    key, plain = keys.create("a", token_budget=10)
    entry = authenticate(auth, f"Bearer {plain}").entry
    assert entry is not None and entry.tokens_used == 0
    keys.record_usage([UsageRecord(key.id, "m", 1, 6, 5)])  # recorded by another replica
    clock.now += TTL + 0.1
    entry = authenticate(auth, f"Bearer {plain}").entry
    assert entry is not None and entry.tokens_used == 11


def test_a_store_outage_keeps_the_last_index_and_is_not_hammered(
    auth: Authenticator, keys: KeyStore, handle: StoreHandle, clock: Clock
) -> None:
    key, plain = keys.create("a")
    authenticate(auth, f"Bearer {plain}")
    handle.down = True
    clock.now += TTL + 0.1
    for _ in range(20):
        assert authenticate(auth, f"Bearer {plain}").key_id == key.id  # still served
    assert handle.calls == 2  # one failed refresh, then known keys wait for the next period
    started = clock.now
    for _ in range(20):
        assert isinstance(refused(auth, "Bearer pf-bogus"), AuthenticationFailed)
    # Misses ask again, but no more than once per MISS_RECHECK_S.
    assert handle.calls == 22 and clock.now - started == pytest.approx(20 * MISS_RECHECK_S)


def test_before_the_first_load_a_store_outage_is_503_not_401(auth: Authenticator, handle: StoreHandle) -> None:
    handle.down = True
    error = refused(auth, "Bearer pf-anything")
    assert isinstance(error, Overloaded) and error.status_code == 503 and error.retry_after == 1


def test_concurrent_requests_share_one_refresh(auth: Authenticator, keys: KeyStore, handle: StoreHandle) -> None:
    _, plain = keys.create("a")

    async def burst() -> list[Any]:
        return await asyncio.gather(*(auth.authenticate(request(f"Bearer {plain}")) for _ in range(100)))

    assert len({c.key_id for c in asyncio.run(burst())}) == 1
    assert handle.calls == 1


def test_require_admin() -> None:
    require_admin(ADMIN, True)
    require_admin(ANONYMOUS, False)  # auth off: whoever can reach the port is the admin
    with pytest.raises(PermissionDenied) as info:
        require_admin(Caller(owner="key_1", key_id="key_1"), True)
    assert info.value.param == "Authorization"


def test_task_management_needs_the_admin_or_a_prompts_key() -> None:
    def caller(scope: str) -> Caller:
        key = ApiKey(id="key_1", name="k", hint="abcd", created_at=0, revoked_at=None, rpm=None, tpm=None,
                     token_budget=None, scope=scope)
        return Caller(owner=key.id, key_id=key.id, entry=KeyEntry(key=key, fetched_at=0))

    require_prompts(ADMIN, True)
    require_prompts(caller("prompts"), True)
    require_prompts(ANONYMOUS, False)  # authentication off: whoever reaches the port
    for denied in (caller("tenant"), ANONYMOUS):
        with pytest.raises(PermissionDenied):
            require_prompts(denied, True)
    with pytest.raises(PermissionDenied):  # and a prompts key is still no admin
        require_admin(caller("prompts"), True)
    assert caller("prompts").author == "key_1" and ADMIN.author == "admin" and ANONYMOUS.author == "anonymous"


class SlowWrites:
    """``record_usage.remote`` over the real KeyStore, whose write lands only when the test lets it."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.land = asyncio.Event()
        self.record_usage = self

    async def remote(self, rows: list[UsageRecord]) -> None:
        await self.land.wait()
        self.keys.record_usage(rows)


class NoLimiter:
    """The RateLimiter handle's shape; these keys have no rpm/tpm, so it is never called."""

    def __init__(self) -> None:
        self.reserve_now = self

    async def remote(self, *args: Any) -> None:
        raise AssertionError("no booking expected")


def test_a_refresh_during_a_usage_write_keeps_counting_the_tokens_being_written(
    handle: StoreHandle, keys: KeyStore, clock: Clock
) -> None:
    """The index refresh and the meter's write of the same tokens race: whichever lands first, the
    tokens count once the write began and are never forgotten in between (a budget spent on this
    replica stays spent through the refresh)."""
    from deployments.limits.metering import Meter
    from deployments.schemas import Usage

    key, plain = keys.create("a", token_budget=10)
    writes = SlowWrites(keys)
    meter = Meter(KeysClient(writes), NoLimiter())  # type: ignore[arg-type]
    auth = Authenticator(AuthConfig(enabled=True, cache_ttl_s=TTL), KeysClient(handle), ADMIN_KEY,
                         clock=clock, sleep=clock.sleep, usage=meter)

    async def scenario() -> list[int]:
        seen = []
        entry = (await auth.authenticate(request(f"Bearer {plain}"))).entry
        assert entry is not None
        meter.record(entry, "m", Usage(prompt_tokens=6, completion_tokens=5))  # spent: 11 of 10
        seen.append(entry.tokens_used)
        writing = asyncio.create_task(meter.flush())  # the write is under way, not landed
        await asyncio.sleep(0)
        clock.now += TTL + 0.1
        seen.append(await used_after_refresh())  # refreshed while the write is in flight
        writes.land.set()
        await writing
        seen.append(await used_after_refresh())  # refreshed after it landed: counted once
        return seen

    async def used_after_refresh() -> int:
        clock.now += TTL + 0.1
        entry = (await auth.authenticate(request(f"Bearer {plain}"))).entry
        assert entry is not None
        return entry.tokens_used

    assert asyncio.run(scenario()) == [11, 11, 11]
    assert keys.get(key.id) is not None and keys.get(key.id).tokens_used == 11  # type: ignore[union-attr]
