"""API keys and tenants on the application with authentication on (tests/fixtures.py: auth_app)."""

from __future__ import annotations

import argparse
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from cluster import keys_cli
from tests.fixtures import ADMIN_KEY, ServeApp
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

HELLO = [{"role": "user", "content": "hello"}]
GATEWAYS = 1  # the session's cluster is one node, and serve.yaml runs one Gateway replica per node


def admin(app: ServeApp, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{app.auth_base_url}{path}", headers=headers, timeout=30, **kwargs)


def new_key(app: ServeApp, **limits: Any) -> dict[str, Any]:
    response = admin(app, "POST", "/admin/keys", json={"name": "test", **limits})
    assert response.status_code == 201, response.text
    return dict(response.json())


def budget_refuses(chat: openai.OpenAI) -> bool:
    """One chat call: True if the key's spent budget refused it (403), False if it went through."""
    try:
        chat.chat.completions.create(model="fake", messages=HELLO)
    except openai.PermissionDeniedError:
        return True
    return False


def client(app: ServeApp, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.auth_base_url, api_key=key, max_retries=0, timeout=30)


@pytest.mark.parametrize("key", [None, "pf-wrong", "Basic abc"])
def test_missing_or_wrong_key_is_401(app: ServeApp, key: str | None) -> None:
    headers = {"Authorization": key if key and " " in key else f"Bearer {key}"} if key else {}
    response = httpx.post(
        f"{app.auth_base_url}/chat/completions", json={"model": "fake", "messages": HELLO}, headers=headers
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_raises_authentication_error(app: ServeApp) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(app, "pf-nope").models.list()


def test_key_works_and_revoked_key_stops(app: ServeApp) -> None:
    created = new_key(app)
    assert created["key"].startswith("pf-") and created["hint"] == created["key"][-4:]
    reply = client(app, created["key"]).chat.completions.create(model="fake", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    revoked = admin(app, "DELETE", f"/admin/keys/{created['id']}").json()
    assert revoked["revoked_at"] is not None

    def refused() -> bool:  # at once on the replica that revoked it; within cache_ttl_s: 1 on others
        try:
            client(app, created["key"]).chat.completions.create(model="fake", messages=HELLO)
        except openai.AuthenticationError:
            return True
        return False

    wait_for(refused, timeout_s=10, message="the revoked key to be refused")
    with pytest.raises(openai.AuthenticationError):
        client(app, created["key"]).chat.completions.create(model="fake", messages=HELLO)


def test_only_admin_manages_keys(app: ServeApp) -> None:
    key = new_key(app)["key"]
    response = httpx.get(f"{app.auth_base_url}/admin/keys", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403
    listed = admin(app, "GET", "/admin/keys").json()["data"]
    assert all("key" not in k for k in listed)  # plain keys are shown once, at creation


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/keys?limit=0", None),
        ("POST", "/admin/keys", {"name": ""}),
        ("PATCH", "/admin/keys/key_x", {"rpm": "x"}),
        ("POST", "/tasks/push", {"files": []}),
        ("POST", "/tasks/classify_ticket/rollback", {}),
        ("GET", "/tasks/classify_ticket/versions/0", None),
    ],
)
def test_a_tenant_gets_403_before_its_request_is_validated(
    app: ServeApp, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """Not a 400 that describes an admin route's fields to someone who may not use it."""
    key = new_key(app)["key"]
    response = httpx.request(method, f"{app.auth_base_url}{path}", json=body,
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "permission_denied"
    # And the admin, sending the same, is told what is wrong with it.
    assert admin(app, method, path, json=body).status_code in (400, 404)


def test_admin_changes_a_keys_limits(app: ServeApp) -> None:
    """PATCH /v1/admin/keys/{id}: a spent budget raised lets the key work again; admin only; checked."""
    created = new_key(app, token_budget=20, rpm=100)
    chat = client(app, created["key"])

    def refused() -> bool:
        return budget_refuses(chat)

    wait_for(refused, timeout_s=15, interval_s=0.2, message="the budget to be exhausted")
    tenant = {"Authorization": f"Bearer {created['key']}"}
    path = f"{app.auth_base_url}/admin/keys/{created['id']}"
    assert httpx.patch(path, json={"token_budget": 10**6}, headers=tenant).status_code == 403
    bad = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"rpm": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    for weight in (5e-324, 0, 0.001, 100.5, 1e308):  # 5e-324 pushed the fair queue's clock to infinity
        bad = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"weight": weight})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "weight", (weight, bad.text)
    for weight in (0.01, 100):  # the bounds themselves are accepted
        edge = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"weight": weight})
        assert edge.status_code == 200 and edge.json()["weight"] == weight, edge.text
    assert admin(app, "PATCH", "/admin/keys/key_0000000000000000", json={}).status_code == 404
    changed = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"token_budget": 10**6, "weight": 2})
    assert changed.status_code == 200, changed.text
    view = changed.json()
    assert (view["token_budget"], view["rpm"], view["weight"]) == (10**6, 100, 2)  # rpm left as it was
    wait_for(lambda: not refused(), timeout_s=15, interval_s=0.2, message="the key to work again")
    # Raising one limit leaves the others alone; null lifts one.
    raised = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"rpm": 500}).json()
    assert (raised["rpm"], raised["token_budget"], raised["weight"]) == (500, 10**6, 2)
    lifted = admin(app, "PATCH", f"/admin/keys/{created['id']}", json={"token_budget": None}).json()
    assert (lifted["rpm"], lifted["token_budget"]) == (500, None)
    assert admin(app, "PATCH", f"/admin/keys/{created['id']}", json={}).json()["rpm"] == 500  # nothing named


def test_per_key_rpm_is_enforced(app: ServeApp) -> None:
    """rpm 3: at most the burst (3) goes at once; the next slot is up to 20 s away, past a 2 s
    deadline: 429, with the wait to that slot as Retry-After. (Fewer than 3 — none in the first 20 s
    — go at once while the limiter itself is less than a minute old: the restart rule counts every
    budget as empty at the limiter's start. That the burst flows on a fresh key is
    tests/serve/test_admission.py's.)"""
    key = new_key(app, rpm=3)["key"]
    statuses = []
    refused: list[tuple[float, float, float]] = []  # (sent, answered, retry_after)
    for _ in range(8):
        sent = time.monotonic()
        response = httpx.post(
            f"{app.auth_base_url}/chat/completions",
            json={"model": "fake", "messages": HELLO},
            headers={"Authorization": f"Bearer {key}", "X-Request-Timeout": "2"},
            timeout=30,
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after = int(response.headers["retry-after-ms"]) / 1000
            refused.append((sent, time.monotonic(), retry_after))
            assert 2 < retry_after <= 20.5 and int(response.headers["retry-after"]) >= retry_after
            assert response.json()["error"]["type"] == "rate_limit_error"
    served = statuses.count(200)
    assert served <= 3 and statuses == [200] * served + [429] * (8 - served)
    # The true wait, not a constant: every refusal points at the same next slot.
    slot = [(sent + answered) / 2 + retry_after for sent, answered, retry_after in refused]
    slack = max(answered - sent for sent, answered, _ in refused) + 0.5
    assert max(slot) - min(slot) <= slack, refused


def test_a_bad_deadline_header_is_a_400_naming_it(app: ServeApp) -> None:
    key = new_key(app, rpm=3)["key"]
    response = httpx.post(
        f"{app.auth_base_url}/chat/completions",
        json={"model": "fake", "messages": HELLO},
        headers={"Authorization": f"Bearer {key}", "X-Request-Timeout": "soon"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-request-timeout"


def test_exhausted_budget_is_403_and_usage_is_recorded(app: ServeApp) -> None:
    key = new_key(app, token_budget=30)["key"]
    chat = client(app, key)
    # The fake upstream reports ~10 tokens per call: a few calls spend the budget.
    for _ in range(3):
        chat.chat.completions.create(model="fake", messages=HELLO)

    def spent() -> bool:  # usage reaches the store about once a second, the key index after that
        return budget_refuses(chat)

    wait_for(spent, timeout_s=15, interval_s=0.2, message="the budget to be exhausted")
    with pytest.raises(openai.PermissionDeniedError):
        chat.chat.completions.create(model="fake", messages=HELLO)
    usage = httpx.get(f"{app.auth_base_url}/usage", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert usage and usage[0]["model"] == "fake" and usage[0]["requests"] >= 3
    assert usage[0]["total_tokens"] >= 30


def test_a_burst_at_once_cannot_spend_a_budget_many_times_over(app: ServeApp) -> None:
    """12 requests at once on a 40-token budget used to spend ~1,200 tokens (each was let in against
    the same 0 used). A call in flight now holds its estimate; the others wait for it to settle and
    are let in while the budget covers them, then refused."""
    app.upstream.configure(mode="ok", latency_ms=300)  # the burst's calls overlap
    created = new_key(app, token_budget=40)
    chat = client(app, created["key"])

    def one(_: int) -> str:
        try:
            chat.chat.completions.create(model="fake", messages=HELLO, max_tokens=60)
        except openai.PermissionDeniedError:
            return "403"
        except openai.RateLimitError as exc:
            assert "in flight" in exc.message
            return "429"
        return "ok"

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    app.upstream.configure(mode="ok", latency_ms=0)
    answered = outcomes.count("ok")
    assert answered >= 1 and outcomes.count("403") + outcomes.count("429") == 12 - answered
    assert outcomes.count("403") >= 1  # the budget ran out within the burst
    wait_for(lambda: admin(app, "GET", "/usage", params={"key_id": created["id"]}).json()["data"], 15,
             interval_s=0.2, message="the usage to be recorded")
    row = admin(app, "GET", "/usage", params={"key_id": created["id"]}).json()["data"][0]
    assert row["requests"] == answered
    per_call = row["total_tokens"] / answered  # the fake upstream's calls all cost the same
    # Each call was let in while the budget was not yet spent: at most the last one per Gateway goes over.
    assert row["total_tokens"] <= 40 + GATEWAYS * per_call - 1


def test_tenants_cannot_see_each_others_runs(app: ServeApp) -> None:
    alice, bob = new_key(app)["key"], new_key(app)["key"]

    def as_(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    run = httpx.post(
        f"{app.auth_base_url}/tasks/label_fake/submit", json={"input": {"text": "x"}}, headers=as_(alice)
    ).json()
    assert httpx.get(f"{app.auth_base_url}/runs/{run['id']}", headers=as_(alice)).status_code == 200
    for response in (
        httpx.get(f"{app.auth_base_url}/runs/{run['id']}", headers=as_(bob)),
        httpx.post(f"{app.auth_base_url}/runs/{run['id']}/cancel", headers=as_(bob)),
    ):
        assert response.status_code == 404  # never 403: ids cannot be probed
    assert httpx.get(f"{app.auth_base_url}/runs", headers=as_(bob)).json()["data"] == []
    # Bob's cancel did nothing to Alice's run.
    status = httpx.get(f"{app.auth_base_url}/runs/{run['id']}", headers=as_(alice)).json()["status"]
    assert status != "cancelled"


def test_database_holds_no_plain_keys(app: ServeApp) -> None:
    created = new_key(app)
    assert app.state_dir is not None
    database = app.state_dir.parent / "auth-db" / "tasks.sqlite3"
    raw = database.read_bytes() + (database.with_name("tasks.sqlite3-wal").read_bytes()
                                   if database.with_name("tasks.sqlite3-wal").exists() else b"")
    assert created["key"].encode() not in raw
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        hashes = [row[0] for row in conn.execute("SELECT key_hash FROM api_keys")]
    assert all(len(h) == 64 for h in hashes)


# -- listing pages: keys (OpenAI's after/has_more) and usage (cursor) -------------------------------


def bad_request(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_keys_are_listed_a_page_at_a_time(app: ServeApp) -> None:
    mine = [new_key(app)["id"] for _ in range(3)]
    newest = admin(app, "GET", "/admin/keys", params={"order": "desc", "limit": 2}).json()
    assert [k["id"] for k in newest["data"]] == mine[:0:-1]  # the limit holds: my two newest
    assert newest["has_more"] and (newest["first_id"], newest["last_id"]) == (mine[2], mine[1])
    after = admin(app, "GET", "/admin/keys", params={"order": "desc", "limit": 2, "after": newest["last_id"]}).json()
    assert after["data"][0]["id"] == mine[0]  # the next page continues where the last one stopped
    # Oldest first by default, 20 a page: following has_more lists every key once.
    seen, params = [], {}
    while True:
        page = admin(app, "GET", "/admin/keys", params=params).json()
        assert len(page["data"]) <= 20 and all("key" not in k for k in page["data"])
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        params = {"after": page["last_id"]}
    assert len(seen) == len(set(seen)) and seen[-3:] == mine


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "key_0000000000000000"}, "after"),
        ({"after": "x" * 65}, "after"),
        ({"order": "sideways"}, "order"),
    ],
)
def test_bad_key_list_parameters_are_named(app: ServeApp, params: dict[str, Any], param: str) -> None:
    bad_request(admin(app, "GET", "/admin/keys", params=params), param)


def test_the_largest_key_page_is_allowed(app: ServeApp) -> None:
    new_key(app)
    assert admin(app, "GET", "/admin/keys", params={"limit": 100}).status_code == 200


def test_usage_is_listed_a_page_at_a_time_with_filters(app: ServeApp) -> None:
    key = new_key(app)
    chat = client(app, key["key"])
    for model in ("fake", "fake-capped"):  # two rows today: one per model
        chat.chat.completions.create(model=model, messages=HELLO)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    mine = {"key_id": key["id"], "since": today}
    wait_for(lambda: len(admin(app, "GET", "/usage", params=mine).json()["data"]) == 2, timeout_s=15,
             message="both rows in the store")
    first = admin(app, "GET", "/usage", params={**mine, "limit": 1}).json()
    assert len(first["data"]) == 1 and first["data"][0]["model"] == "fake" and first["next_cursor"]
    second = admin(app, "GET", "/usage", params={**mine, "limit": 1, "cursor": first["next_cursor"]}).json()
    assert [r["model"] for r in second["data"]] == ["fake-capped"] and second["next_cursor"] is None
    # The tenant reads the same rows, with its own key (its key_id is its own whatever it sends).
    tenant = httpx.get(f"{app.auth_base_url}/usage", params={"key_id": "key_0000000000000000", "limit": 1},
                       headers={"Authorization": f"Bearer {key['key']}"}).json()
    assert tenant["data"] == first["data"]
    # Day filters: nothing before or after today.
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    assert admin(app, "GET", "/usage", params={"key_id": key["id"], "since": tomorrow}).json()["data"] == []
    assert admin(app, "GET", "/usage", params={"key_id": key["id"], "until": yesterday}).json()["data"] == []
    # Every key's usage, a row a page: the rows of this key come once each.
    seen, cursor = [], None
    while True:
        page = admin(app, "GET", "/usage", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        seen += [(r["day"], r["key_id"], r["model"]) for r in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(seen) == len(set(seen)) and {(today, key["id"], "fake"), (today, key["id"], "fake-capped")} <= set(seen)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 100000}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"since": "not-a-date"}, "since"),
        ({"until": "2026-02-30"}, "until"),
        ({"since": "2026-12-02", "until": "2026-12-01"}, "until"),
    ],
)
def test_bad_usage_parameters_are_named(app: ServeApp, params: dict[str, Any], param: str) -> None:
    bad_request(admin(app, "GET", "/usage", params=params), param)
    key = new_key(app)["key"]  # a tenant's parameters are checked the same way
    bad_request(httpx.get(f"{app.auth_base_url}/usage", params=params, headers={"Authorization": f"Bearer {key}"}),
                param)


def test_the_cli_lists_every_key_across_pages(
    app: ServeApp, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = [new_key(app)["id"] for _ in range(3)]
    monkeypatch.setenv("PROMPTFLEET_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setattr(keys_cli, "PAGE", 2)  # several pages from a few keys
    assert keys_cli.run(argparse.Namespace(action="list", url=app.auth_base_url)) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(listed) == len(set(listed)) > 2 and listed[-3:] == mine
