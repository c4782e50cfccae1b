"""API keys: hashed at rest, shown once, revocable; usage per key, model and day.

Each test runs on both backends (``fresh_location`` in conftest.py) unless its name says SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployments.errors import InvalidRequest, NotFound
from deployments.store import RunStore, open_database
from deployments.store.keys import KeyStore, hash_key
from deployments.store.migrations import migrate
from deployments.store.records import UsageRecord


@pytest.fixture
def location(fresh_location: Callable[[], str]) -> str:
    return fresh_location()


@pytest.fixture
def store(location: str) -> Iterator[KeyStore]:
    with KeyStore(location) as keys:
        yield keys


def test_key_is_stored_only_as_its_hash(store: KeyStore) -> None:
    _, plain = store.create("ci", rpm=10)
    assert plain.startswith("pf-") and len(plain) > 40
    with store.database.autocommit() as tx:
        stored = repr(tx.rows("SELECT * FROM api_keys"))
    assert plain not in stored and plain[:-4] not in stored
    assert hash_key(plain) in stored


def test_sqlite_file_holds_no_plain_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "db.sqlite3")
    _, plain = store.create("ci", rpm=10)
    store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the WAL too
    assert plain.encode() not in data
    assert hash_key(plain).encode() in data


def test_lookup_and_revoke(store: KeyStore) -> None:
    key, plain = store.create("ci", rpm=10, tpm=100, token_budget=10**12)  # budgets beyond 32 bits
    found = store.lookup(hash_key(plain))
    assert found is not None and found.id == key.id and found.rpm == 10 and found.token_budget == 10**12
    assert store.lookup(hash_key(plain + "x")) is None
    assert store.lookup("not a digest\x00") is None
    store.revoke(key.id, now=0.0)  # revoked at the epoch is still revoked
    assert store.lookup(hash_key(plain)) is None
    assert store.get(key.id).revoked_at == 0.0
    assert store.revoke(key.id, now=5.0).revoked_at == 0.0  # the first revocation stands


def test_unknown_or_malformed_key_ids_are_not_found(store: KeyStore) -> None:
    for key_id in ["key_0000000000000000", "nope", "key_\x00"]:
        with pytest.raises(NotFound) as info:
            store.get(key_id)
        assert info.value.param == "key_id"
        with pytest.raises(NotFound):
            store.revoke(key_id)
        assert store.usage(key_id) == ([], None)
    with pytest.raises(InvalidRequest) as bad_name:
        store.create("a\x00b")
    assert bad_name.value.param == "name"


def test_usage_accumulates_per_key_model_and_day(store: KeyStore) -> None:
    a, _ = store.create("a", now=1.0)
    b, _ = store.create("b", now=2.0)
    store.record_usage(
        [UsageRecord(a.id, "m1", 1, 10, 5), UsageRecord(a.id, "m1", 2, 1, 1), UsageRecord(b.id, "m2", 1, 3, 3)],
        now=0,
    )
    store.record_usage([UsageRecord(a.id, "M0", 1, 1, 0)], now=86400)
    rows, more = store.usage(a.id)
    assert more is None and [(r["day"], r["model"], r["requests"], r["total_tokens"]) for r in rows] == [
        ("1970-01-02", "M0", 1, 1),
        ("1970-01-01", "m1", 3, 17),
    ]
    assert set(rows[0]) == {"key_id", "model", "day", "requests", "prompt_tokens", "completion_tokens",
                            "total_tokens"}
    assert {r["key_id"] for r in store.usage()[0]} == {a.id, b.id}
    assert store.usage("") == store.usage()  # no key id: every key's usage (admin)
    assert store.get(a.id).tokens_used == 18
    assert [(k.id, k.tokens_used) for k in store.list_keys()[0]] == [(a.id, 18), (b.id, 6)]


def test_key_store_shares_the_run_store_database(location: str) -> None:
    database = open_database(location)
    try:
        runs, keys = RunStore(database), KeyStore(database)
        key, _ = keys.create("k")
        runs.create_run(task="t", input={}, owner=key.id, idempotency_key=None, now=1)
        runs.close()  # a shared database stays open for the other store
        keys.close()
        assert keys.get(key.id).name == "k"
    finally:
        database.close()


def test_snapshot_has_the_active_keys_by_digest_and_a_version_that_moves_on_change(store: KeyStore) -> None:
    empty = store.snapshot(None)
    assert (empty.keys, empty.tokens_used) == ({}, {})
    a, plain_a = store.create("a")
    b, plain_b = store.create("b", rpm=5)
    store.record_usage([UsageRecord(a.id, "m", 1, 4, 3)])
    snap = store.snapshot(empty.version)
    assert snap.version > empty.version and snap.keys is not None
    assert set(snap.keys) == {hash_key(plain_a), hash_key(plain_b)}
    assert snap.keys[hash_key(plain_b)].rpm == 5
    assert snap.keys[hash_key(plain_a)].tokens_used == 7
    assert snap.tokens_used == {a.id: 7}

    # Unchanged: no key list, only the token counts (or nothing at all).
    same = store.snapshot(snap.version)
    assert (same.version, same.keys, same.tokens_used) == (snap.version, None, {a.id: 7})
    assert store.snapshot(snap.version, with_usage=False).tokens_used is None
    store.record_usage([UsageRecord(a.id, "m", 1, 1, 0)])
    assert store.snapshot(snap.version).keys is None  # usage is not a key change

    store.revoke(b.id)
    after = store.snapshot(snap.version)
    assert after.version > snap.version and after.keys is not None
    assert set(after.keys) == {hash_key(plain_a)}
    store.revoke(b.id)  # revoking again changes nothing
    assert store.version() == after.version


def test_key_version_survives_reopen(location: str) -> None:
    with KeyStore(location) as keys:
        keys.create("a")
        version = keys.version()
    with KeyStore(location) as keys:
        assert keys.version() == version  # a replica that kept its index stays current
        keys.create("b")
        assert keys.version() == version + 1


def test_weight_is_stored_and_an_old_table_gets_the_column(location: str) -> None:
    """A database made before keys had a weight: opening it adds the column, old keys weigh 1."""
    database = open_database(location)
    try:
        migrate(database, to=4)  # the schema before keys had a weight (store.migrations)
        with database.transaction() as tx:
            tx.run(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at) VALUES (?, ?, ?, ?, ?)",
                "key_00000000000000aa", "old", "0" * 64, "abcd", 1.0,
            )
        with KeyStore(database) as store:
            assert store.get("key_00000000000000aa").weight == 1.0
            assert store.get("key_00000000000000aa").scope == "tenant"  # and the scope column (issue 14)
            created, _ = store.create("heavy", weight=2.5)
            assert store.get(created.id).weight == 2.5
        with KeyStore(database) as store:  # opening it again changes nothing
            assert [k.weight for k in store.list_keys()[0]] == [1.0, 2.5]
    finally:
        database.close()


def test_scope_is_stored_and_travels_with_the_snapshot(store: KeyStore) -> None:
    prompts, plain = store.create("prompts team", scope="prompts")
    tenant, _ = store.create("tenant")
    assert (prompts.scope, tenant.scope) == ("prompts", "tenant")
    assert store.snapshot().keys[hash_key(plain)].scope == "prompts"  # what the Gateway's key index holds
    with pytest.raises(InvalidRequest) as info:
        store.create("x", scope="admin")
    assert info.value.param == "scope"


def test_a_signed_out_console_session_is_remembered_until_it_would_have_expired(store: KeyStore) -> None:
    store.end_session("nonce-a", expires_at=2000.0, now=1000.0)
    store.end_session("nonce-a", expires_at=2000.0, now=1001.0)  # signing out twice is fine
    assert store.session_ended("nonce-a") and not store.session_ended("nonce-b")
    store.end_session("nonce-b", expires_at=3000.0, now=2000.0)  # a's session has expired by now: its row goes
    assert not store.session_ended("nonce-a") and store.session_ended("nonce-b")
