"""Pages of keys and usage, the usage aggregates and the per-key token totals (``store.usage``).

Each test runs on both backends (``fresh_location`` in conftest.py) unless its name says SQLite.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import InvalidRequest
from deployments.store import open_database
from deployments.store.keys import MAX_LIST_LIMIT, ApiKey, KeyStore
from deployments.store.migrations import migrate
from deployments.store.records import UsageRecord
from deployments.store.usage import MAX_LIMIT, csv_text

DAY = 86400
MODELS = ("m-a", "m-b")


@pytest.fixture
def location(fresh_location: Callable[[], str]) -> str:
    return fresh_location()


@pytest.fixture
def store(location: str) -> Iterator[KeyStore]:
    with KeyStore(location) as keys:
        yield keys


def make_keys(store: KeyStore, n: int) -> list[ApiKey]:
    # Pairs share a creation time: the id decides their order.
    return [store.create(f"k{i}", now=float(i // 2))[0] for i in range(n)]


def all_key_pages(store: KeyStore, limit: int, order: str) -> list[list[str]]:
    pages, after = [], None
    while True:
        keys, more = store.list_keys(limit, after, order)
        pages.append([k.id for k in keys])
        if not more:
            return pages
        after = keys[-1].id


def test_key_pages_cover_every_key_once_in_creation_order(store: KeyStore) -> None:
    keys = make_keys(store, 7)
    oldest_first = [k.id for k in sorted(keys, key=lambda k: (k.created_at, k.id))]
    for limit, order in itertools.product((1, 2, 3, 6, 7, 8), ("asc", "desc")):
        pages = all_key_pages(store, limit, order)
        expected = oldest_first if order == "asc" else oldest_first[::-1]
        assert list(itertools.chain(*pages)) == expected, (limit, order)
        assert all(len(page) == limit for page in pages[:-1]) and 0 < len(pages[-1]) <= limit
    # has_more on the boundary: exactly `limit` left is the last page.
    assert store.list_keys(7) == (store.list_keys(7)[0], False)
    assert store.list_keys(6)[1] is True
    assert store.list_keys(3, after=oldest_first[3]) == (store.list_keys(3, after=oldest_first[3])[0], False)


def test_a_key_page_shows_revoked_keys_and_their_tokens(store: KeyStore) -> None:
    a, _ = store.create("a", now=1.0)
    b, _ = store.create("b", now=2.0)
    store.record_usage([UsageRecord(b.id, "m", 1, 5, 2)])
    store.revoke(b.id)
    (first, second), more = store.list_keys(2)
    assert not more and (first.id, second.id) == (a.id, b.id)
    assert (first.tokens_used, second.tokens_used, second.revoked_at is not None) == (0, 7, True)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": MAX_LIST_LIMIT + 1}, "limit"),
        ({"after": "key_0000000000000000"}, "after"),  # well formed, but no such key
        ({"after": "nope\x00"}, "after"),
        ({"order": "newest"}, "order"),
    ],
)
def test_bad_key_page_parameters_are_named(store: KeyStore, kwargs: dict[str, Any], param: str) -> None:
    make_keys(store, 1)
    with pytest.raises(InvalidRequest) as info:
        store.list_keys(**kwargs)
    assert info.value.param == param


def test_the_largest_key_page_is_allowed(store: KeyStore) -> None:
    (key,) = make_keys(store, 1)
    assert store.list_keys(MAX_LIST_LIMIT) == ([key], False)


# -- usage -----------------------------------------------------------------------------------------


def seed_usage(store: KeyStore, keys: int = 3, days: int = 4) -> list[dict[str, Any]]:
    """Usage of ``keys`` keys on both models on each of ``days`` days (1970-01-01…); the rows in
    the listing's order (day DESC, key, model)."""
    made = make_keys(store, keys)
    for day in range(days):
        # The last key skips day 1: a day need not hold every key.
        rows = [UsageRecord(k.id, m, 1, day + 1, n) for n, k in enumerate(made) for m in MODELS
                if not (day == 1 and k is made[-1])]
        store.record_usage(rows, now=day * DAY)
    with store.database.autocommit() as tx:  # what the table holds, in the order sorted here
        everything = tx.rows("SELECT key_id, model, day, requests, prompt_tokens, completion_tokens, total_tokens"
                             " FROM usage")
    return sorted(everything, key=lambda r: (-int(r["day"].replace("-", "")), r["key_id"], r["model"]))


def all_usage_pages(store: KeyStore, limit: int, **filters: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        rows, cursor = store.usage(limit=limit, cursor=cursor, **filters)
        pages.append(rows)
        if cursor is None:
            return pages


def test_usage_pages_cover_every_row_once_newest_day_first(store: KeyStore) -> None:
    expected = seed_usage(store)
    assert len(expected) == 22
    for limit in (1, 2, 3, 5, 21, 22, 23, MAX_LIMIT):
        pages = all_usage_pages(store, limit)
        assert list(itertools.chain(*pages)) == expected, limit
        assert all(len(page) == limit for page in pages[:-1]) and len(pages[-1]) <= limit
    # next_cursor on the boundary: a page that ends with the last row says so.
    assert store.usage(limit=22)[1] is None and store.usage(limit=21)[1] is not None


def test_usage_filters_by_key_and_days(store: KeyStore) -> None:
    expected = seed_usage(store)
    key_id = expected[0]["key_id"]
    cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        ({"key_id": key_id}, lambda r: r["key_id"] == key_id),
        ({"since": "1970-01-02"}, lambda r: r["day"] >= "1970-01-02"),
        ({"until": "1970-01-02"}, lambda r: r["day"] <= "1970-01-02"),
        ({"since": "1970-01-02", "until": "1970-01-02"}, lambda r: r["day"] == "1970-01-02"),
        ({"key_id": key_id, "since": "1970-01-03", "until": "1999-12-31"},
         lambda r: r["key_id"] == key_id and r["day"] >= "1970-01-03"),
        ({"since": "2000-01-01"}, lambda r: False),
    ]
    for filters, keep in cases:
        wanted = [r for r in expected if keep(r)]
        for limit in (1, 3, 100):
            assert list(itertools.chain(*all_usage_pages(store, limit, **filters))) == wanted, (filters, limit)


def cursor_of(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": MAX_LIMIT + 1}, "limit"),
        ({"cursor": "not a cursor!"}, "cursor"),
        ({"cursor": cursor_of("1970-01-01", "key_x")}, "cursor"),  # two parts, not three
        ({"cursor": cursor_of("yesterday", "key_x", "m")}, "cursor"),
        ({"cursor": cursor_of("1970-01-01", 7, "m")}, "cursor"),
        ({"cursor": cursor_of("1970-01-01", "key_x", "m\x00")}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "cursor"),
        ({"since": "not-a-date"}, "since"),
        ({"since": "2026-02-30"}, "since"),
        ({"since": "20261202"}, "since"),  # a date to fromisoformat, but it does not sort as one
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-12-02", "until": "2026-12-01"}, "until"),
    ],
)
def test_bad_usage_parameters_are_named(store: KeyStore, kwargs: dict[str, Any], param: str) -> None:
    seed_usage(store, keys=1, days=1)
    with pytest.raises(InvalidRequest) as info:
        store.usage(**kwargs)
    assert info.value.param == param


def test_one_day_is_a_valid_range_and_a_cursor_of_another_filter_is_only_a_position(store: KeyStore) -> None:
    expected = seed_usage(store)
    assert store.usage(since="1970-01-03", until="1970-01-03")[0] == [r for r in expected if r["day"] == "1970-01-03"]
    # A cursor is a place in the order: with other filters it continues from there.
    _, cursor = store.usage(limit=3)
    key_id = expected[0]["key_id"]
    rows, _ = store.usage(key_id, cursor=cursor, limit=100)
    assert rows == [r for r in expected[3:] if r["key_id"] == key_id]


def test_usage_of_something_that_is_not_a_key_id_is_empty(store: KeyStore) -> None:
    seed_usage(store, keys=1, days=1)
    assert store.usage("nope\x00") == ([], None)


def test_tokens_per_day_sums_the_days_asked_for(store: KeyStore) -> None:
    expected = seed_usage(store)

    def total(day: str, key_id: str | None = None) -> int:
        return sum(r["total_tokens"] for r in expected if r["day"] == day and key_id in (None, r["key_id"]))

    assert store.tokens_per_day(3, today="1970-01-04") == [
        (day, total(day)) for day in ("1970-01-02", "1970-01-03", "1970-01-04")
    ]
    used_on_day_1 = {r["key_id"] for r in expected if r["day"] == "1970-01-02"}
    (last_key,) = {r["key_id"] for r in expected} - used_on_day_1  # seed_usage's key without usage on day 1
    assert store.tokens_per_day(14, last_key, today="1970-01-04") == [
        (day, total(day, last_key)) for day in ("1970-01-01", "1970-01-03", "1970-01-04")
    ]
    assert store.tokens_per_day(1, today="1969-12-31") == []
    for days in (0, 367):
        with pytest.raises(InvalidRequest) as info:
            store.tokens_per_day(days)
        assert info.value.param == "days"


def test_today_by_model_adds_up_every_key(store: KeyStore) -> None:
    expected = seed_usage(store)
    rows = store.today_by_model("1970-01-04")
    assert [r["model"] for r in rows] == list(MODELS)
    for row in rows:
        mine = [r for r in expected if r["day"] == "1970-01-04" and r["model"] == row["model"]]
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            assert row[field] == sum(r[field] for r in mine), field
    assert store.today_by_model("2000-01-01") == []


def test_csv_text_carries_the_header_only_when_asked() -> None:
    row = {"key_id": "key_a", "model": "m,1", "day": "2026-12-02", "requests": 1, "prompt_tokens": 2,
           "completion_tokens": 3, "total_tokens": 5}
    assert csv_text([row], header=True).splitlines() == [
        "day,key_id,model,requests,prompt_tokens,completion_tokens,total_tokens", '2026-12-02,key_a,"m,1",1,2,3,5'
    ]
    assert csv_text([row, row]).splitlines() == ['2026-12-02,key_a,"m,1",1,2,3,5'] * 2
    assert csv_text([]) == ""


# -- per-key totals -------------------------------------------------------------------------------


def summed(store: KeyStore) -> dict[str, int]:
    with store.database.autocommit() as tx:
        rows = tx.rows("SELECT key_id, SUM(total_tokens) AS n FROM usage GROUP BY key_id")
    return {r["key_id"]: int(r["n"]) for r in rows}


def test_key_totals_follow_every_write_to_usage(store: KeyStore) -> None:
    seed_usage(store)
    assert store.snapshot().tokens_used == summed(store) != {}
    some_key = next(iter(summed(store)))
    # Whatever writes the table, not only record_usage: an older store, an operator's SQL.
    with store.database.transaction() as tx:
        tx.run("UPDATE usage SET total_tokens = total_tokens + 100 WHERE key_id = ?", some_key)
        tx.run("INSERT INTO usage (key_id, model, day, total_tokens) VALUES (?, 'new', '1980-01-01', 5)", some_key)
        tx.run("DELETE FROM usage WHERE key_id = ? AND model = ?", some_key, MODELS[0])
    assert store.snapshot().tokens_used == summed(store)
    assert store.get(some_key).tokens_used == summed(store)[some_key]


def test_a_database_from_before_the_totals_gets_them_filled_once(location: str) -> None:
    database = open_database(location)
    try:
        migrate(database, to=10)  # as an older release left it: usage, no totals table, no triggers
        with database.transaction() as tx:
            for n, (key_id, model, day) in enumerate([("key_a", "m1", "1970-01-01"), ("key_a", "m2", "1970-01-02"),
                                                      ("key_b", "m1", "1970-01-01")]):
                tx.run("INSERT INTO usage (key_id, model, day, requests, total_tokens) VALUES (?, ?, ?, 1, ?)",
                       key_id, model, day, 10 + n)
        before = {"key_a": 10 + 11, "key_b": 12}
        with KeyStore(database) as store:
            assert store.snapshot().tokens_used == before
        with KeyStore(database) as store:  # opened again: filled once, not twice
            assert store.snapshot().tokens_used == before
            store.record_usage([UsageRecord(next(iter(before)), "m", 1, 1, 1)])
            assert store.snapshot().tokens_used == summed(store)
    finally:
        database.close()


def test_sqlite_pages_read_index_ranges_without_sorting(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.sqlite3") as store:
        sqlite_plans(store)


def sqlite_plans(store: KeyStore) -> None:
    expected = seed_usage(store)
    _, cursor = store.usage(limit=3)
    day, key_id, model = expected[2]["day"], expected[2]["key_id"], expected[2]["model"]
    assert cursor == cursor_of(day, key_id, model)
    columns = "key_id, model, day, total_tokens"
    plans = {
        "first page": (f"SELECT {columns} FROM usage WHERE 1 = 1 ORDER BY day DESC, key_id, model LIMIT 4", ()),
        "rest of the day": (f"SELECT {columns} FROM usage WHERE 1 = 1 AND day = ? AND (key_id, model) > (?, ?)"
                            " ORDER BY key_id, model LIMIT 4", (day, key_id, model)),
        "days before": (f"SELECT {columns} FROM usage WHERE 1 = 1 AND day < ? ORDER BY day DESC, key_id, model"
                        " LIMIT 4", (day,)),
        "keys page": ("SELECT id FROM api_keys k WHERE (k.created_at, k.id) > (?, ?)"
                      " ORDER BY k.created_at, k.id LIMIT 4", (0.0, "key_0")),
    }
    with store.database.autocommit() as tx:
        for name, (sql, args) in plans.items():
            plan = " / ".join(row["detail"] for row in tx.rows(f"EXPLAIN QUERY PLAN {sql}", *args))
            assert "TEMP B-TREE" not in plan and ("usage_by_day" in plan or "api_keys_by_created" in plan), (
                name, plan)
