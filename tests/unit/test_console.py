"""The console's pure parts: sessions and CSRF, charts, the runs time filter, batch progress, the
limiter snapshot, and the store functions the console added (counts, details, key limits)."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.testclient import TestClient

from deployments.clients.keys import KeysClient
from deployments.clients.sessions import SessionsClient
from deployments.config import AuthConfig
from deployments.console import session
from deployments.console.app import build_console, is_loopback, templates
from deployments.console.charts import bar_chart, compact, day_points
from deployments.console.pages import (
    batch_progress,
    before_cursor,
    chart_window,
    optional_int,
    parse_json_object,
)
from deployments.console.prometheus import DURATION, QUERIES, REQUESTS, TOKENS, query_rates
from deployments.errors import InvalidRequest, NotFound
from deployments.gateway.auth import Authenticator
from deployments.limits.pacing import RateLimiterCore
from deployments.schemas import BatchRequestCounts, BatchView, Budget, DayTokens, KeyLimits
from deployments.store import RunStore
from deployments.store.keys import KeyStore
from deployments.store.records import decode_cursor

SECRET = session.session_secret("pf-admin")


def test_a_session_is_valid_until_it_expires() -> None:
    cookie = session.issue(SECRET, now=1000)
    assert session.valid(SECRET, cookie, now=1000 + session.SESSION_S - 1)
    assert not session.valid(SECRET, cookie, now=1000 + session.SESSION_S)
    assert not session.valid(SECRET, cookie, now=999)  # issued in the future: forged clock


def test_a_session_is_bound_to_the_admin_key_and_cannot_be_altered() -> None:
    cookie = session.issue(SECRET, now=1000)
    assert "pf-admin" not in cookie
    assert not session.valid(session.session_secret("pf-other-admin"), cookie, now=1000)
    issued, nonce, signature = cookie.split(".")
    assert not session.valid(SECRET, f"{int(issued) + 3600}.{nonce}.{signature}", now=1000)
    for bad in (None, "", "garbage", "1.2", "x" * 500, f"{issued}.{nonce}.{'0' * 64}"):
        assert not session.valid(SECRET, bad, now=1000)


def test_csrf_needs_the_cookie_and_the_same_token() -> None:
    token = session.new_csrf_token()
    assert session.csrf_ok(token, token)
    assert not session.csrf_ok(token, session.new_csrf_token())
    assert not session.csrf_ok(None, token) and not session.csrf_ok(token, None) and not session.csrf_ok("", "")


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.5") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback("192.0.2.2") and not is_loopback(None)
    assert not is_loopback("testclient")


def test_bar_chart_is_well_formed_svg_with_escaped_labels() -> None:
    svg = bar_chart([("<b>", 10), ("b", 2500), ("c", 0)], title="T & U")
    root = ET.fromstring(svg)
    bars = root.findall("{http://www.w3.org/2000/svg}rect")
    heights = [float(b.get("height", "0")) for b in bars]
    assert heights[1] > heights[0] > heights[2] == 0
    assert "&lt;b&gt;" in svg and "2.5k" in svg
    assert "no data yet" in bar_chart([], title="empty")
    assert ET.fromstring(bar_chart([("zero", 0)], title="zeros")) is not None
    assert compact(999) == "999" and compact(1500) == "1.5k" and compact(2_000_000) == "2.0M"


def test_runs_time_filter_is_a_cursor_before_that_time() -> None:
    assert before_cursor(None) is None and before_cursor("") is None
    cursor = before_cursor("2026-01-02T03:04:05")
    assert cursor is not None
    at, run_id = decode_cursor(cursor)
    assert at == 1767323045.0 and run_id == "run_" + "f" * 24
    with pytest.raises(InvalidRequest) as bad:
        before_cursor("yesterday")
    assert bad.value.param == "before"


def test_the_usage_chart_window_follows_the_date_filters() -> None:
    today = "2026-12-02"
    assert chart_window(None, None, today) == (14, today)
    assert chart_window(None, "2026-11-01", today) == (14, "2026-11-01")
    assert chart_window("2026-11-30", None, today) == (3, today)
    assert chart_window("2026-11-30", "2026-11-30", today) == (1, "2026-11-30")
    assert chart_window("2026-01-01", "2026-12-01", today) == (31, "2026-12-01")  # at most 31 bars
    assert chart_window("2027-01-05", None, today) == (1, "2027-01-05")  # a start after today: that day
    for since, until, param in (("2026-12-02", "2026-12-01", "until"), ("soon", None, "since"),
                                (None, "2026-02-30", "until")):
        with pytest.raises(InvalidRequest) as bad:
            chart_window(since, until, today)
        assert bad.value.param == param


def test_day_points_have_a_bar_for_every_day() -> None:
    totals = [DayTokens(day="2026-11-30", total_tokens=5), DayTokens(day="2026-12-02", total_tokens=7)]
    assert day_points(totals, 4, "2026-12-02") == [("11-29", 0), ("11-30", 5), ("12-01", 0), ("12-02", 7)]
    assert day_points([], 1, "2026-12-02") == [("12-02", 0)]


def test_form_values_are_checked_naming_the_field() -> None:
    assert parse_json_object('{"a": 1}', "input") == {"a": 1}
    for text in ("[1]", "{nope", ""):
        with pytest.raises(InvalidRequest) as bad:
            parse_json_object(text, "input")
        assert bad.value.param == "input"
    assert optional_int("", "rpm") is None and optional_int(" 5 ", "rpm") == 5
    with pytest.raises(InvalidRequest, match="rpm"):
        optional_int("5.5", "rpm")


def batch(status: str, done: int, failed: int, total: int, started: int | None) -> BatchView:
    return BatchView(id="batch_x", endpoint="/v1/chat/completions", input_file_id="file-x", completion_window="24h",
                     status=status, created_at=0, in_progress_at=started,  # type: ignore[arg-type]
                     request_counts=BatchRequestCounts(total=total, completed=done, failed=failed))


def test_batch_progress_rate_and_eta() -> None:
    running = batch_progress(batch("in_progress", 30, 10, 100, started=100), now=120)
    assert running["done"] == 40 and running["percent"] == 40 and running["rate"] == 2 and running["eta_s"] == 30
    assert batch_progress(batch("validating", 0, 0, 100, started=None), now=120)["eta_s"] is None
    assert batch_progress(batch("completed", 100, 0, 100, started=100), now=150)["eta_s"] is None


def test_limiter_snapshot_shows_budget_use_queue_and_pauses() -> None:
    core = RateLimiterCore(started_at=0.0)
    budget = Budget(rpm=60, rpm_burst=10)
    assert core.snapshot(100.0).budgets == []
    for _ in range(4):
        core.reserve("key:k", budget, 1, 0, now=100.0, max_wait_s=60)
    core.pause("model:m", 130.0)
    state = {b.budget: b for b in core.snapshot(100.0).budgets}
    (pacer,) = state["key:k"].pacers
    assert pacer.unit == "requests" and pacer.capacity == 10 and pacer.available == pytest.approx(6)
    assert state["model:m"].paused_s == pytest.approx(30) and state["key:k"].paused_s == 0
    later = {b.budget: b for b in core.snapshot(110.0).budgets}
    assert later["key:k"].pacers[0].available == pytest.approx(10)  # refilled at 1 per second, capped


@pytest.fixture
def runs(fresh_location: Callable[[], str]) -> Iterator[RunStore]:
    with RunStore(fresh_location()) as store:
        yield store


def test_counts_by_status_and_details(runs: RunStore) -> None:
    assert runs.count_by_status() == dict.fromkeys(["cancelled", "failed", "queued", "running", "succeeded"], 0)
    a, _ = runs.create_run(task="t", input={"x": 1}, owner="key_a", idempotency_key="i1", now=10)
    runs.create_run(task="t", input={"x": 2}, owner="key_b", idempotency_key=None, now=11)
    runs.cancel(a.id, None, now=12)
    assert runs.count_by_status()["queued"] == 1 and runs.count_by_status()["cancelled"] == 1
    detail = runs.get(a.id, None).detail()
    assert detail.owner == "key_a" and detail.input == {"x": 1} and detail.idempotency_key == "i1"
    assert "lease_token" not in detail.model_dump()


@pytest.fixture
def keys(fresh_location: Callable[[], str]) -> Iterator[KeyStore]:
    with KeyStore(fresh_location()) as store:
        yield store


def test_set_limits_replaces_them_and_tells_the_key_index(keys: KeyStore) -> None:
    key, _ = keys.create("k", rpm=10, tpm=100, token_budget=1000)
    version = keys.version()
    limits = KeyLimits(rpm=None, tpm=5000, token_budget=None, weight=2)
    updated = keys.set_limits(key.id, **limits.model_dump())
    assert (updated.rpm, updated.tpm, updated.token_budget, updated.weight) == (None, 5000, None, 2)
    assert keys.version() > version  # every Gateway reloads its keys
    for missing in ("key_0000000000000000", "nope"):
        with pytest.raises(NotFound):
            keys.set_limits(missing, **limits.model_dump())


def test_every_template_compiles_and_links_stay_under_the_console() -> None:
    env = templates()
    names = env.list_templates()
    assert {"base.html", "overview.html", "runs.html", "run.html", "keys.html", "usage.html", "batches.html"} <= set(
        names
    )
    for name in names:
        source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
        env.get_template(name)
        # No inline script or style attribute (the Content-Security-Policy forbids them), no CDN.
        assert not re.search(r"<script>|\sstyle=|\sonclick=|https?://(?!www\.w3\.org)", source), name


# -- the gate, on the console app with one page (Starlette's TestClient: no Ray) -------------------


class OnePage:
    """Pages with a single route, so the gate and the sign-in flow are tested on their own."""

    def register(self, app: FastAPI, render: Callable[..., str]) -> None:
        @app.get("/", response_class=HTMLResponse)
        async def home(request: Request) -> str:
            return render("error.html", request, status=200, message="home page")

        @app.post("/act", response_class=HTMLResponse)
        async def act(request: Request) -> str:
            return render("error.html", request, status=200, message="acted")


def console_client(auth: Authenticator, host: str = "127.0.0.1") -> TestClient:
    # The sessions are the same (fake) TaskStore's as the keys.
    sessions = SessionsClient(auth.keys.handle)
    return TestClient(build_console(OnePage(), auth, sessions), client=(host, 5000), follow_redirects=False)


class Method:
    """``handle.<method>.remote(...)`` over a real KeyStore method."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class KeyHandle:
    """The TaskStore handle's key index and console session calls, over a real KeyStore."""

    def __init__(self, store: KeyStore) -> None:
        self.key_snapshot = Method(lambda version, with_usage: store.snapshot(version, with_usage=with_usage))
        self.end_console_session = Method(store.end_session)
        self.console_session_ended = Method(store.session_ended)


def csrf_of(client: TestClient) -> str:
    page = client.get("/login").text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


def test_with_auth_off_the_console_is_open_on_loopback_only(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "k.sqlite3") as store:
        auth = Authenticator(AuthConfig(enabled=False), KeysClient(KeyHandle(store)), None)
        local = console_client(auth).get("/")
        assert local.status_code == 200 and "Authentication is off" in local.text
        assert console_client(auth, host="192.0.2.10").get("/").status_code == 403
        # Forms still need the CSRF token of the browser's cookie.
        client = console_client(auth)
        assert client.post("/act", data={}).status_code == 403
        client.get("/")
        token = client.cookies.get(session.CSRF_COOKIE)
        assert token and client.post("/act", data={"csrf_token": token}).status_code == 200


def test_with_auth_on_only_the_admin_gets_in(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "k.sqlite3") as store:
        _, tenant = store.create("tenant")
        auth = Authenticator(AuthConfig(enabled=True), KeysClient(KeyHandle(store)), "pf-admin-key")
        client = console_client(auth)
        assert client.get("/").headers["location"] == "/login"
        assert client.post("/act", data={}).status_code == 401
        assert client.get("/", headers={"Authorization": f"Bearer {tenant}"}).status_code == 403
        assert client.get("/", headers={"Authorization": "Bearer pf-admin-key"}).status_code == 200
        assert client.get("/", headers={"Authorization": "Bearer pf-nope"}).status_code == 401
        token = csrf_of(client)
        assert client.post("/login", data={"key": "pf-admin-key"}).status_code == 403  # no CSRF token
        refused = client.post("/login", data={"key": tenant, "csrf_token": token})
        assert refused.status_code == 403 and "tenant keys" in refused.text
        assert session.SESSION_COOKIE not in client.cookies
        signed_in = client.post("/login", data={"key": "pf-admin-key", "csrf_token": token})
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "pf-admin-key" not in cookie
        assert "Secure" not in cookie  # plain http here
        home = client.get("/")
        assert home.status_code == 200 and "Sign out" in home.text and "pf-admin-key" not in home.text
        assert "script-src 'self'" in home.headers["content-security-policy"]
        assert client.post("/act", data={"csrf_token": "forged"}).status_code == 403
        assert client.post("/act", data={"csrf_token": token}).status_code == 200
        copied = client.cookies.get(session.SESSION_COOKIE)
        client.post("/logout", data={"csrf_token": token})
        assert client.get("/").status_code == 303
        # A copy of the cookie taken before the sign-out is refused too (by every replica: it is in the store).
        elsewhere = console_client(auth)
        elsewhere.cookies.set(session.SESSION_COOKIE, copied)
        assert elsewhere.get("/").headers["location"] == "/login"
        assert elsewhere.post("/act", data={"csrf_token": token}).status_code in (401, 403)
        # Unknown pages are pages too (not JSON), and need signing in first.
        assert console_client(auth).get("/nope", headers={"Authorization": "Bearer pf-admin-key"}).status_code == 404


def test_without_the_store_a_session_is_not_trusted_and_sign_out_says_so(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "k.sqlite3") as store:
        handle = KeyHandle(store)
        auth = Authenticator(AuthConfig(enabled=True), KeysClient(handle), "pf-admin-key")
        client = console_client(auth)
        token = csrf_of(client)
        assert client.post("/login", data={"key": "pf-admin-key", "csrf_token": token}).status_code == 303
        assert client.get("/").status_code == 200

        def unreachable(*args: Any) -> Any:
            raise ConnectionError("the store is down")

        handle.console_session_ended = handle.end_console_session = Method(unreachable)
        assert client.get("/").status_code == 503
        refused = client.post("/logout", data={"csrf_token": token})
        assert refused.status_code == 503 and "retry" in refused.text
        assert session.SESSION_COOKIE in client.cookies  # kept, so that the sign-out can be retried


def test_rates_come_from_prometheus_when_there_is_one() -> None:
    assert asyncio.run(query_rates(None)).source is None
    asked: list[str] = []

    def prometheus(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        asked.append(query)
        value = {"rate": "2.5", "errors": "0.1", "p50": "0.2", "p95": "NaN", "tokens": "900"}
        name = next(n for n, q in QUERIES.items() if q == query)
        result = [{"metric": {"model": "fake"}, "value": [0, value[name]]}]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})

    rates = asyncio.run(query_rates("http://prometheus:9090", transport=httpx.MockTransport(prometheus)))
    assert rates.error is None and set(asked) == set(QUERIES.values())
    fake = rates.models["fake"]
    assert (fake.rate, fake.errors, fake.p50, fake.p95, fake.tokens) == (2.5, 0.1, 0.2, None, 900)
    assert all(name in " ".join(QUERIES.values()) for name in (REQUESTS, DURATION, TOKENS))

    down = asyncio.run(query_rates("http://prometheus:9090",
                                   transport=httpx.MockTransport(lambda _: httpx.Response(503))))
    assert down.models == {} and down.error is not None and "did not answer" in down.error
