"""The console in a real headless Chromium against the session's real service (tests/fixtures.py).

The auth-enabled application: sign in with the admin key, create a key and use it from the
``openai`` client, watch the request reach the overview and usage (the pages refresh themselves:
no reload), try a task and watch the run finish, cancel a queued run, re-run a failed one after
raising its key's budget, follow a batch to completion and download its output, revoke the key
and see the client get 401, sign out. Every page is checked for console errors and broken links,
and screenshots are saved (the directory is printed). The auth-off application: open on loopback,
with a banner. ``/docs``: Swagger UI from local files only.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from deployments.limits.metering import KEY_TTL_S
from tests.console.browser import Browser
from tests.fixtures import ADMIN_KEY, ServeApp
from tests.security.tenants import ADMIN, Tenant, call
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

BATCH_LINES = b"".join(
    b'{"custom_id": "c%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fake", '
    b'"messages": [{"role": "user", "content": "line %d"}]}}\n' % (n, n)
    for n in range(20)
)


def console(app: ServeApp) -> str:
    return app.auth_base_url.removesuffix("/v1") + "/console"


def visit(browser: Browser, url: str, shot: str) -> None:
    browser.open(url)
    browser.shot(shot)
    browser.check_links()


def sign_in(browser: Browser, base: str, key: str, expected_status: int | None = None) -> None:
    browser.open(f"{base}/login")
    browser.fill("input[name=key]", key)
    browser.click("form button[type=submit]", expected_status)


def model_count(browser: Browser, model: str, field: str) -> int:
    text = browser.text(f'tr[data-model="{model}"] td[data-field="{field}"]')
    return int(text) if text.isdigit() else -1


def tokens_used(app: ServeApp, key_id: str) -> int:
    """The key's ``tokens_used`` from the API's key list, newest first, a page at a time."""
    params: dict[str, str | int] = {"order": "desc", "limit": 100}
    while True:
        page = call(app, ADMIN, "GET", "/admin/keys", params=params).json()
        found = [k["tokens_used"] for k in page["data"] if k["id"] == key_id]
        if found or not page["has_more"]:
            assert found, f"{key_id} is not listed"
            return int(found[0])
        params["after"] = page["last_id"]


def run_status(app: ServeApp, who: Tenant, run_id: str) -> str:
    return str(call(app, who, "GET", f"/runs/{run_id}").json()["status"])


@pytest.mark.timeout(900)  # a whole session of a person, a batch job included, on a loaded machine
def test_console_end_to_end(app: ServeApp, browser: Browser) -> None:
    base = console(app)
    # Signed out: every page sends the browser to the sign-in form.
    browser.open(f"{base}/runs")
    assert browser.driver.current_url == f"{base}/login"
    browser.shot("sign-in")
    sign_in(browser, base, "pf-not-a-key", expected_status=401)
    assert "Invalid or revoked" in browser.text(".error")
    sign_in(browser, base, ADMIN_KEY)
    assert browser.driver.current_url == f"{base}/"
    cookies = {c["name"]: c for c in browser.driver.get_cookies()}
    session = cookies["pf_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and ADMIN_KEY not in session["value"]
    assert ADMIN_KEY not in browser.driver.page_source
    visit(browser, f"{base}/", "overview")

    # Create a key: shown once, then used by the openai client.
    browser.open(f"{base}/keys")
    browser.fill("input[name=name]", "browser-tenant")
    browser.click("form[action$='/keys'] button[type=submit]")
    plain = browser.text("#new-key")
    assert plain.startswith("pf-"), browser.driver.page_source[:2000]
    browser.shot("key-created")
    key_id = browser.css("tbody tr[data-key]").get_attribute("data-key")
    tenant = Tenant(id=key_id, key=plain)
    browser.open(f"{base}/keys")  # the key is in no later page
    assert plain not in browser.driver.page_source

    # A tenant key cannot open the console, by header or by the sign-in form.
    assert httpx.get(f"{base}/", headers=tenant.headers).status_code == 403
    with httpx.Client() as anonymous:
        form = anonymous.get(f"{base}/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        refused = anonymous.post(f"{base}/login", data={"key": plain, "csrf_token": token.group(1)})
        assert refused.status_code == 403 and "tenant keys" in refused.text
        # A form without its CSRF token is refused, signed in or not.
        assert anonymous.post(f"{base}/login", data={"key": ADMIN_KEY}).status_code == 403
    with browser.session() as signed_in:
        assert signed_in.post(f"{base}/keys", data={"name": "forged"}).status_code == 403

    # The tenant's request shows up in the overview (which refreshes itself) and in usage.
    browser.open(f"{base}/")
    before = max(model_count(browser, "fake", "requests"), 0)
    client = openai.OpenAI(base_url=app.auth_base_url, api_key=plain, max_retries=0, timeout=60)
    client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello console"}])
    browser.wait(lambda: model_count(browser, "fake", "requests") > before, message="the request in the overview")
    assert model_count(browser, "fake", "tokens") > 0
    # Replicas per node: the Gateway's one replica, on the node's address.
    assert re.search(r"\d+\.\d+\.\d+\.\d+ × 1", browser.text('tr[data-deployment="Gateway"]'))
    browser.shot("overview-after-request")
    browser.open(f"{base}/usage")  # the key filter is a text field (not a list of every key)
    browser.fill("form.filters input[name=key_id]", key_id)
    browser.click("form.filters button[type=submit]")
    assert f"key_id={key_id}" in browser.driver.current_url
    assert browser.all(f'tr[data-usage="{key_id}/fake"]')
    visit(browser, f"{base}/usage?key_id={key_id}", "usage")
    with browser.session() as http:
        exported = http.get(f"{base}/usage.csv", params={"key_id": key_id})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    header, *rows = exported.text.splitlines()
    assert header.startswith("day,key_id,model,requests") and any(f",{key_id},fake," in f",{r}" for r in rows)

    # Try a task: a real run, watched until it succeeds.
    visit(browser, f"{base}/tasks", "tasks")
    browser.open(f"{base}/tasks/label_fake")
    browser.fill("textarea[name=input]", '{"text": "hello"}')
    browser.click("form[action$='/try'] button[type=submit]")
    assert "/runs/run_" in browser.driver.current_url
    browser.wait(lambda: browser.text("#run-status") == "succeeded", message="the tried run to succeed")
    assert json.loads(browser.text("#run-output"))["label"] in ("a", "b")
    assert "Label this: hello" in browser.driver.page_source  # the rendered prompt
    # The run's request id and task version, as the API has them (the id of the console's POST).
    tried = call(app, ADMIN, "GET", f"/runs/{browser.driver.current_url.rsplit('/', 1)[1]}").json()
    assert tried["request_id"] and browser.text("#run-request-id") == tried["request_id"]
    assert browser.text("#run-task-version") == f"v{tried['task_version']}"
    visit(browser, browser.driver.current_url, "run-succeeded")

    # Cancel a queued run; re-run a failed one (its key's budget ran out) after raising the budget.
    # A budget one token above what the key used: the runs in the runners' four slots spend it,
    # and the runs waiting behind them fail on it when they start.
    used = tokens_used(app, key_id)
    patched = call(app, ADMIN, "PATCH", f"/admin/keys/{key_id}", json={"token_budget": used + 1})
    assert patched.status_code == 200 and patched.json()["token_budget"] == used + 1
    app.upstream.configure("slow", delay_s=3)
    runs = []
    for n in range(8):  # four runner slots: the rest wait in the queue
        response = call(app, tenant, "POST", "/tasks/label_fake/submit", json={"input": {"text": f"r{n}"}})
        assert response.status_code == 202, response.text
        runs.append(response.json()["id"])
    queued = next(r for r in reversed(runs) if run_status(app, tenant, r) == "queued")
    browser.open(f"{base}/runs?owner={key_id}&status=queued")
    browser.shot("runs-queued")
    browser.open(f"{base}/runs/{queued}")
    browser.click("form[action$='/cancel'] button")
    browser.wait(lambda: browser.text("#run-status") == "cancelled", message="the queued run to be cancelled")
    browser.shot("run-cancelled")
    ended = wait_for(
        lambda: (views := [call(app, tenant, "GET", f"/runs/{r}").json() for r in runs])
        and all(v["status"] in ("succeeded", "failed", "cancelled") for v in views) and views,
        timeout_s=180, interval_s=0.5, message="every run to end",
    )
    failed = next((v["id"] for v in ended if v["status"] == "failed"), None)
    assert failed is not None, [(v["status"], v["error"]) for v in ended]
    app.upstream.reset()
    browser.open(f"{base}/runs/{failed}")
    assert "budget" in browser.text("#run-error")
    browser.shot("run-failed")
    # The runners' usage reaches the store about once a second: the re-run reads the key from there.
    wait_for(lambda: tokens_used(app, key_id) > used, timeout_s=30, message="the runs' usage to be stored")
    browser.click("form[action$='/rerun'] button", expected_status=403)
    assert "budget" in browser.text(".error"), "a re-run on a spent budget is refused"
    browser.open(f"{base}/keys")
    row = f'tr[data-key="{key_id}"]'
    browser.fill(f"{row} input[name=token_budget]", "1000000")
    browser.click(f"{row} form[action$='/limits'] button")
    # The keys table refreshes itself: read the field through wait, which retries a replaced element.
    browser.wait(lambda: browser.css(f"{row} input[name=token_budget]").get_attribute("value") == "1000000",
                 timeout_s=10, message="the new budget in the keys table")
    # The TaskRunners trust a key record for KEY_TTL_S: before that a re-run still meets the old budget.
    time.sleep(KEY_TTL_S + 0.5)
    browser.open(f"{base}/runs/{failed}")
    browser.click("form[action$='/rerun'] button")
    # The POST and its redirect to the new run's page take a moment on a busy machine.
    browser.wait(lambda: browser.driver.current_url != f"{base}/runs/{failed}", timeout_s=30,
                 message="the re-run's page")
    browser.wait(lambda: browser.text("#run-status") == "succeeded", message="the re-run to succeed")
    browser.shot("rerun-succeeded")
    visit(browser, f"{base}/runs?owner={key_id}", "runs")

    # A batch, followed to completion, and its output downloaded.
    uploaded = client.files.create(file=("in.jsonl", BATCH_LINES), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    browser.open(f"{base}/batches")
    browser.wait(lambda: browser.all(f'tr[data-batch="{batch.id}"] .pill.completed'), timeout_s=240,
                 message="the batch to complete")
    browser.shot("batch-completed")
    browser.check_links()
    output = browser.css(f'tr[data-batch="{batch.id}"] a[href*="/files/"]').get_attribute("href")
    with browser.session() as http:
        lines = http.get(output).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"c{n}" for n in range(20))

    # Revoke the key: the client is refused at once.
    browser.open(f"{base}/keys")
    browser.click(f"{row} form[action$='/revoke'] button")
    assert browser.all(f"{row} .pill.bad")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "still there?"}])
    visit(browser, f"{base}/keys", "keys-revoked")

    # Sign out: the session cookie is gone and pages ask for sign-in again.
    with browser.session() as before_sign_out:  # a copy of the session cookie, taken while signed in
        assert before_sign_out.get(f"{base}/").status_code == 200
        browser.click("form.logout button")
        assert browser.driver.current_url == f"{base}/login"
        browser.open(f"{base}/")
        assert browser.driver.current_url == f"{base}/login"
        # The copy is refused too: the sign-out is in the store, not only in this browser.
        copied = before_sign_out.get(f"{base}/")
        assert copied.status_code == 303 and copied.headers["location"].endswith("/login")
    assert not browser.errors


def test_console_without_auth_is_open_on_loopback(app: ServeApp, browser: Browser) -> None:
    browser.open(f"{app.url}/console/")
    assert "Authentication is off" in browser.text(".banner")
    for path in ("/", "/tasks", "/runs", "/keys", "/usage", "/batches"):
        visit(browser, f"{app.url}/console{path}", "noauth" + path.replace("/", "-"))


def test_docs_load_nothing_from_another_host(app: ServeApp, browser: Browser) -> None:
    page = httpx.get(f"{app.url}/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls
    assert "cdn" not in page.text.lower()
    browser.open(f"{app.url}/docs")
    browser.wait(lambda: browser.all(".opblock"), timeout_s=30, message="Swagger UI to render the operations")
    browser.shot("docs")


def test_time_filter_and_pages(app: ServeApp) -> None:
    """The runs list pages by cursor and filters by creation time (plain HTTP, signed in by header)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for n in range(3):
        call(app, ADMIN, "POST", "/tasks/label_fake/submit", json={"input": {"text": f"t{n}"}})
    base = console(app)
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    earlier = "2000-01-01T00:00:00"
    assert "run_" in httpx.get(f"{base}/runs", params={"before": later}, headers=admin).text
    assert "No runs match" in httpx.get(f"{base}/runs", params={"before": earlier}, headers=admin).text
    bad = httpx.get(f"{base}/runs", params={"before": "yesterday"}, headers=admin)
    assert bad.status_code == 400 and "before" in bad.text
    assert httpx.get(f"{base}/runs", params={"status": "nope"}, headers=admin).status_code == 400
