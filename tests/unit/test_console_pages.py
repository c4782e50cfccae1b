"""The console's keys and usage pages over a real TaskStore (SQLite), in process: no Ray.

The pages talk to the TaskStore class through ``tests.fakes.workers.Handle`` (the handle's
``method.remote`` shape on one event loop); requests go through the console app over ASGI, signed
in as on loopback with authentication off. What a browser does with these pages is
tests/console's.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from deployments.clients.keys import KeysClient
from deployments.clients.runs import RunsClient
from deployments.clients.sessions import SessionsClient
from deployments.config import AuthConfig, TasksConfig
from deployments.console.app import build_console
from deployments.console.pages import PAGE, Pages
from deployments.gateway.admin_routes import KeyAdmin
from deployments.gateway.auth import Authenticator
from deployments.store.records import UsageRecord
from deployments.store.usage import MAX_LIMIT as CSV_PAGE
from deployments.task_store import TaskStore
from tests.fakes.workers import Handle

DAY = 86400


class NoMeter:
    async def flush(self) -> None:
        pass


def with_console(tmp_path: Path, scenario: Callable[[TaskStore, httpx.AsyncClient], Awaitable[None]]) -> None:
    async def go() -> None:
        service = TaskStore(TasksConfig(state_dir=str(tmp_path)))
        handle: Any = Handle(service)
        auth = Authenticator(AuthConfig(enabled=False), KeysClient(handle), None)
        runs = RunsClient(handle)
        pages = Pages(tasks=None, runs=runs, batches=None,  # type: ignore[arg-type]
                      keys=KeyAdmin(KeysClient(handle), runs, auth, None),
                      meter=NoMeter(), overview=None, owner="anonymous")  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=build_console(pages, auth, SessionsClient(handle)),
                                        client=("127.0.0.1", 5000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
                await scenario(service, client)
        finally:
            service.close()

    asyncio.run(go())


def links(page: str) -> str | None:
    """The page's \"next\" link, if it has one."""
    found = re.search(r'<a href="([^"]+)" rel="next">', page)
    return found.group(1).replace("&amp;", "&") if found else None


def test_the_keys_page_pages_newest_first_through_every_key(tmp_path: Path) -> None:
    async def scenario(service: TaskStore, client: httpx.AsyncClient) -> None:
        made = [service.keys.create(f"k{n}", now=1000.0 + n)[0].id for n in range(PAGE * 2 + 3)]
        seen: list[str] = []
        url: str | None = "/keys"
        while url is not None:
            response = await client.get(url)
            assert response.status_code == 200
            rows = re.findall(r'<tr data-key="(key_[0-9a-f]+)"', response.text)
            assert 0 < len(rows) <= PAGE
            assert ("Newest keys" in response.text) == (url != "/keys")
            seen += rows
            url = links(response.text)
        assert seen == made[::-1]  # each once, newest first
        bad = await client.get("/keys", params={"after": "key_0000000000000000"})
        assert bad.status_code == 400 and "after" in bad.text

    with_console(tmp_path, scenario)


def seed_usage(service: TaskStore, keys: int, days: int) -> list[str]:
    made = [service.keys.create(f"k{n}")[0].id for n in range(keys)]
    start = time.time() - days * DAY
    for day in range(days):
        service.keys.record_usage([UsageRecord(k, m, 1, 10, day) for k in made for m in ("m1", "m2")],
                                  now=start + (day + 1) * DAY)
    return made


def test_the_usage_page_filters_and_pages(tmp_path: Path) -> None:
    async def scenario(service: TaskStore, client: httpx.AsyncClient) -> None:
        made = seed_usage(service, keys=6, days=10)  # 120 rows
        today = time.strftime("%Y-%m-%d", time.gmtime())
        since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 3 * DAY))
        rows: list[str] = []
        url: str | None = f"/usage?key_id={made[0]}&since={since}"
        pages = 0
        while url is not None:
            response = await client.get(url)
            assert response.status_code == 200, response.text
            rows += re.findall(r'<tr data-usage="([^"]+)"><td>(\d{4}-\d\d-\d\d)', response.text)
            url, pages = links(response.text), pages + 1
        assert pages == 1 and len(rows) == 8 and {r[0] for r in rows} == {f"{made[0]}/m1", f"{made[0]}/m2"}
        assert all(since <= day <= today for _, day in rows)
        # Every key: 120 rows, PAGE a page, each row once.
        everything, url = [], "/usage"
        while url is not None:
            page = (await client.get(url)).text
            everything += re.findall(r'<tr data-usage="([^"]+)"><td>(\d{4}-\d\d-\d\d)', page)
            url = links(page)
        assert len(everything) == 120 and len(set(everything)) == 120
        # The chart is summed by the store: the key's bars add up to its tokens.
        chart = (await client.get("/usage", params={"key_id": made[0], "since": since})).text
        assert "4 days" in chart and f"key {made[0]}" in chart
        for params, param in (({"since": "not-a-date"}, "since"), ({"since": today, "until": since}, "until"),
                              ({"cursor": "garbage"}, "cursor")):
            bad = await client.get("/usage", params=params)
            assert bad.status_code == 400 and param in bad.text, params

    with_console(tmp_path, scenario)


def test_the_csv_export_streams_every_matching_row_in_pages(tmp_path: Path) -> None:
    async def scenario(service: TaskStore, client: httpx.AsyncClient) -> None:
        made = seed_usage(service, keys=CSV_PAGE // 20 + 1, days=10)  # more rows than one store call reads
        total = len(made) * 2 * 10
        assert total > CSV_PAGE
        pages_read = []
        read_page = service.usage_csv

        async def counted(*args: Any) -> Any:
            pages_read.append(args)
            return await read_page(*args)

        service.usage_csv = counted  # type: ignore[method-assign]
        response = await client.get("/usage.csv")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        # Page by page, CSV_PAGE rows a store call (not one list of every row).
        assert len(pages_read) == -(-total // CSV_PAGE)
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert len(rows) == total and len({(r["day"], r["key_id"], r["model"]) for r in rows}) == total
        one = list(csv.DictReader(io.StringIO((await client.get("/usage.csv", params={"key_id": made[1]})).text)))
        assert len(one) == 20 and {r["key_id"] for r in one} == {made[1]}
        bad = await client.get("/usage.csv", params={"until": "2026-13-01"})
        assert bad.status_code == 400 and "until" in bad.text

    with_console(tmp_path, scenario)


def test_the_run_page_shows_the_messages_the_run_stored_without_rendering(tmp_path: Path) -> None:
    """Issue 19: the run page (re-fetched every few seconds) re-rendered the task's template each time.
    It shows what the run's first model call sent, as stored; this console has no task catalogue at all."""

    async def scenario(service: TaskStore, client: httpx.AsyncClient) -> None:
        store = service.store
        run, _ = store.create_run(task="label", input={"text": "<b>hi</b>"}, owner="anonymous", idempotency_key=None)
        waiting = (await client.get(f"/runs/{run.id}")).text
        assert "Kept once the run succeeds" in waiting
        (claimed,) = store.claim(worker_id="w", lease_s=30)
        assert claimed.lease_token is not None
        sent = [{"role": "system", "content": "Label it."}, {"role": "user", "content": "Text: <b>hi</b>"}]
        assert store.complete(run.id, claimed.lease_token, result={"output": {"label": "a"}}, usage={}, messages=sent)
        page = await client.get(f"/runs/{run.id}")
        assert page.status_code == 200, page.text
        assert "Label it." in page.text and "Text: &lt;b&gt;hi&lt;/b&gt;" in page.text  # escaped, as stored

    with_console(tmp_path, scenario)
