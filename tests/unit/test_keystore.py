"""API keys: hashed at rest, shown once, revocable; usage per key, model and day."""

from __future__ import annotations

from pathlib import Path

from deployments.keystore import KeyStore, hash_key


def test_key_is_stored_only_as_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = KeyStore(path)
    _, plain = store.create("ci", rpm=10)
    store.close()
    assert plain.startswith("pf-") and len(plain) > 40
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert plain.encode() not in data
    assert hash_key(plain).encode() in data


def test_lookup_and_revoke(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "db.sqlite3")
    key, plain = store.create("ci", rpm=10, tpm=100, token_budget=1000)
    found = store.lookup(hash_key(plain))
    assert found is not None and found.id == key.id and found.rpm == 10 and found.token_budget == 1000
    assert store.lookup(hash_key(plain + "x")) is None
    store.revoke(key.id)
    assert store.lookup(hash_key(plain)) is None
    assert store.get(key.id).revoked_at is not None


def test_usage_accumulates_per_key_model_and_day(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "db.sqlite3")
    a, _ = store.create("a")
    b, _ = store.create("b")
    store.record_usage([(a.id, "m1", 1, 10, 5), (a.id, "m1", 2, 1, 1), (b.id, "m2", 1, 3, 3)], now=0)
    rows = store.usage(a.id)
    assert len(rows) == 1 and rows[0]["requests"] == 3 and rows[0]["total_tokens"] == 17
    assert {r["key_id"] for r in store.usage()} == {a.id, b.id}
    assert store.get(a.id).tokens_used == 17
