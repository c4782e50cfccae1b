"""The console's pages: overview, tasks, runs, keys and usage, batches.

Every page is rendered on the server from the same clients and functions the JSON API uses
(``deployments.clients``): runs through ``RunsClient`` (``list_details``/``detail`` are
``list_runs``/``get`` with the owner and input the admin may see), keys and usage through
``admin_routes.KeyAdmin`` and its ``KeysClient``, batches and their files through ``BatchClient``
with the admin's scope (``None``), budgets through ``Meter.check_token_budget``. Lists
are keyset-paginated (the store's cursor), so a page costs the same with 100,000 runs as with 10:
runs, keys (newest first) and usage rows alike. Nothing loads a whole table: the usage chart is
summed by the database over the days it shows, and the CSV export streams the rows page by page
(the TaskStore writes each page's CSV lines: ``TaskStore.usage_csv``).
Parts marked ``data-live`` are re-fetched every few seconds by ``static/console.js``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

from fastapi import FastAPI, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError

from deployments import request_ids
from deployments.catalogue import CatalogueFollower
from deployments.clients.batches import BatchClient
from deployments.clients.runs import RunsClient
from deployments.console.charts import bar_chart, day_points
from deployments.console.overview import Overview
from deployments.errors import InvalidRequest, PromptfleetError, field_path
from deployments.gateway.admin_routes import KeyAdmin
from deployments.gateway.files import file_response
from deployments.limits.metering import KeyEntry, Meter
from deployments.schemas import (
    BatchView,
    KeyCreate,
    KeyLimits,
)
from deployments.store import usage as usage_rows
from deployments.store.records import STATUSES, encode_cursor
from deployments.task_executor import check_input

PAGE = 50
CHART_DAYS = 14  # the usage chart without a start day
MAX_CHART_DAYS = 31
Render = Callable[..., str]


def parse_json_object(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{param}: not valid JSON ({exc.msg} at line {exc.lineno}).", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param}: must be a JSON object.", param=param)
    return value


def optional_int(value: str | None, param: str) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{param}: must be a whole number.", param=param) from None


def before_cursor(before: str | None) -> str | None:
    """A time filter as a list cursor: runs created before ``before`` (UTC, from a datetime-local field)."""
    if not before:
        return None
    try:
        at = datetime.fromisoformat(before).replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise InvalidRequest("before: not a date and time.", param="before") from None
    return encode_cursor(at, "run_" + "f" * 24)  # the largest id: every run created at `at` is after it


def chart_window(since: str | None, until: str | None, today: str) -> tuple[int, str]:
    """The usage chart's days: (how many, the last). It ends at ``until`` (else today) and starts
    at ``since`` if given — at most ``MAX_CHART_DAYS`` back — else ``CHART_DAYS`` back."""
    if since is None:
        return CHART_DAYS, usage_rows.check_day(until, "until") if until else today
    since = usage_rows.check_day(since, "since")
    last = usage_rows.check_day(until, "until") if until else max(today, since)
    span = (date.fromisoformat(last) - date.fromisoformat(since)).days + 1
    if span < 1:
        raise InvalidRequest("until must not be before since.", param="until")
    return min(span, MAX_CHART_DAYS), last


def batch_progress(batch: BatchView, now: float) -> dict[str, Any]:
    """Lines done and failed, lines per second since the job started, and the expected end."""
    counts = batch.request_counts
    done = counts.completed + counts.failed
    started = batch.in_progress_at
    rate = done / (now - started) if started and now > started and done else None
    left = max(0, counts.total - done)
    return {
        "done": done,
        "percent": 100 * done / counts.total if counts.total else 0,
        "rate": rate,
        "eta_s": left / rate if rate and batch.status == "in_progress" else None,
    }


class Pages:
    def __init__(
        self,
        *,
        tasks: CatalogueFollower,
        runs: RunsClient,
        batches: BatchClient | None,
        keys: KeyAdmin,
        meter: Meter,
        overview: Overview,
        owner: str,
    ) -> None:
        self.tasks = tasks
        self.runs = runs
        self.batches = batches
        self.keys = keys
        self.meter = meter
        self.overview = overview
        self.owner = owner  # whose runs the "try" form makes: the admin's (or anonymous, auth off)

    def register(self, app: FastAPI, render: Render) -> None:
        def page(name: str, request: Request, **context: Any) -> HTMLResponse:
            return HTMLResponse(render(name, request, **context))

        def back(request: Request, path: str) -> RedirectResponse:
            return RedirectResponse(f"{request.scope.get('root_path', '')}{path}", status_code=303)

        @app.get("/", response_class=HTMLResponse)
        async def overview(request: Request) -> HTMLResponse:
            return page("overview.html", request, nav="overview", o=await self.overview.gather())

        # -- tasks ---------------------------------------------------------------------------

        @app.get("/tasks", response_class=HTMLResponse)
        async def tasks(request: Request) -> HTMLResponse:
            catalogue = await self.tasks.ready()
            listed = [catalogue.tasks[name].definition for name in sorted(catalogue.tasks)]
            return page("tasks.html", request, nav="tasks", tasks=listed)

        @app.get("/tasks/{name}", response_class=HTMLResponse)
        async def task(request: Request, name: str) -> HTMLResponse:
            entry = await self.tasks.active(name)
            return page("task.html", request, nav="tasks", task=entry.definition, input_text="{}", error=None)

        @app.post("/tasks/{name}/try", response_model=None)
        async def try_task(request: Request, name: str, input: str = Form(max_length=100_000)) -> Response:
            entry = await self.tasks.active(name)
            defn = entry.definition
            try:
                task_input = parse_json_object(input, "input")
                check_input(defn, task_input)  # the same check as POST /v1/tasks/{name}/submit
                view, _ = await self.runs.create(task=name, task_input=task_input, owner=self.owner,
                                                 task_version=entry.version, request_id=request_ids.current())
            except PromptfleetError as exc:
                return HTMLResponse(render("task.html", request, nav="tasks", task=defn, input_text=input,
                                           error=exc.message), status_code=exc.status_code)
            return back(request, f"/runs/{view.id}")

        # -- runs ----------------------------------------------------------------------------

        @app.get("/runs", response_class=HTMLResponse)
        async def runs(
            request: Request,
            status: str = Query("", max_length=20),
            task: str = Query("", max_length=64),
            owner: str = Query("", max_length=64),
            before: str = Query("", max_length=40),
            cursor: str = Query("", max_length=200),
        ) -> HTMLResponse:
            if status and status not in STATUSES:
                raise InvalidRequest(f"status: unknown run status '{status[:20]}'.", param="status")
            started = time.perf_counter()
            listing = await self.runs.list_details(owner=owner or None, status=status or None, task=task or None,
                                                   limit=PAGE, cursor=cursor or before_cursor(before))
            filters = {"status": status, "task": task, "owner": owner, "before": before}
            return page("runs.html", request, nav="runs", runs=listing.data, next_cursor=listing.next_cursor,
                        filters=filters, query={k: v for k, v in filters.items() if v}, statuses=sorted(STATUSES),
                        task_names=sorted((await self.tasks.ready()).tasks), cursor=cursor,
                        took_ms=(time.perf_counter() - started) * 1000)

        @app.get("/runs/{run_id}", response_class=HTMLResponse)
        async def run(request: Request, run_id: str) -> HTMLResponse:
            # The messages the run's first model call sent, as stored when it succeeded: never rendered
            # again here (a page re-fetched every few seconds would re-run the template each time).
            detail = await self.runs.detail(run_id[:64])
            return page("run.html", request, nav="runs", run=detail, messages=detail.messages, now=time.time())

        @app.post("/runs/{run_id}/cancel")
        async def cancel_run(request: Request, run_id: str) -> RedirectResponse:
            await self.runs.cancel(run_id[:64], owner=None)
            return back(request, f"/runs/{run_id[:64]}")

        @app.post("/runs/{run_id}/rerun")
        async def rerun(request: Request, run_id: str) -> RedirectResponse:
            """A new run of the same task and input, for the same owner (billed to its key, if it still may)."""
            old = await self.runs.detail(run_id[:64])
            entry = await self.tasks.active(old.task)  # a re-run gets the task's active version
            check_input(entry.definition, old.input)
            # The key as stored now (not a cached copy): its limits may have changed a moment ago.
            if old.owner.startswith("key_"):
                key = await self.keys.keys.get(old.owner)
                if key is None:
                    raise InvalidRequest(f"The key {old.owner} of this run no longer exists.")
                Meter.check_token_budget(KeyEntry(key=key, fetched_at=time.monotonic()))
            view, _ = await self.runs.create(task=old.task, task_input=old.input, owner=old.owner,
                                             task_version=entry.version, request_id=request_ids.current())
            return back(request, f"/runs/{view.id}")

        # -- keys and usage --------------------------------------------------------------------

        @app.get("/keys", response_class=HTMLResponse)
        async def keys(request: Request, after: str = Query("", max_length=64)) -> HTMLResponse:
            return page("keys.html", request, nav="keys", **await self._keys(after), created=None, error=None)

        @app.post("/keys", response_class=HTMLResponse)
        async def create_key(
            request: Request,
            name: str = Form(max_length=200),
            rpm: str = Form(""), tpm: str = Form(""), token_budget: str = Form(""), weight: str = Form("1"),
        ) -> HTMLResponse:
            try:
                body = KeyCreate(name=name, rpm=optional_int(rpm, "rpm"), tpm=optional_int(tpm, "tpm"),
                                 token_budget=optional_int(token_budget, "token_budget"), weight=weight or "1")
                created = await self.keys.create(body)
            except (PromptfleetError, ValidationError) as exc:
                message = exc.message if isinstance(exc, PromptfleetError) else _first_error(exc)
                return HTMLResponse(render("keys.html", request, nav="keys", **await self._keys(""),
                                           created=None, error=message), status_code=400)
            # The plain key is in this response only (not in a URL, not stored): shown once. The
            # first page is the newest keys, so the new one is at its top.
            return page("keys.html", request, nav="keys", **await self._keys(""), created=created, error=None)

        @app.post("/keys/{key_id}/limits", response_model=None)
        async def set_limits(
            request: Request, key_id: str,
            rpm: str = Form(""), tpm: str = Form(""), token_budget: str = Form(""), weight: str = Form("1"),
        ) -> Response:
            try:
                body = KeyLimits(rpm=optional_int(rpm, "rpm"), tpm=optional_int(tpm, "tpm"),
                                 token_budget=optional_int(token_budget, "token_budget"), weight=weight or "1")
            except ValidationError as exc:
                return HTMLResponse(render("keys.html", request, nav="keys", **await self._keys(""),
                                           created=None, error=_first_error(exc)), status_code=400)
            await self.keys.set_limits(key_id[:64], body)
            return back(request, "/keys")

        @app.post("/keys/{key_id}/revoke")
        async def revoke(request: Request, key_id: str) -> RedirectResponse:
            await self.keys.revoke(key_id[:64])
            return back(request, "/keys")

        @app.get("/usage", response_class=HTMLResponse)
        async def usage(
            request: Request,
            key_id: str = Query("", max_length=64),
            since: str = Query("", max_length=10),
            until: str = Query("", max_length=10),
            cursor: str = Query("", max_length=400),
        ) -> HTMLResponse:
            filters = {"key_id": key_id.strip(), "since": since, "until": until}
            days, last = chart_window(since or None, until or None, time.strftime("%Y-%m-%d", time.gmtime()))
            await self.meter.flush()  # this replica's last second too, as GET /v1/usage does
            listing = await self.keys.keys.usage(key_id=filters["key_id"] or None, since=since or None,
                                                 until=until or None, limit=PAGE, cursor=cursor or None)
            totals = await self.keys.keys.tokens_per_day(days, key_id=filters["key_id"] or None, today=last)
            chart = bar_chart(day_points(totals, days, last), title="Tokens per day")
            return page("usage.html", request, nav="usage", rows=listing.data, next_cursor=listing.next_cursor,
                        chart=chart, chart_days=days, filters=filters, cursor=cursor,
                        query={k: v for k, v in filters.items() if v})

        @app.get("/usage.csv")
        async def usage_csv(
            key_id: str = Query("", max_length=64),
            since: str = Query("", max_length=10),
            until: str = Query("", max_length=10),
        ) -> StreamingResponse:
            await self.meter.flush()
            usage = self.keys.keys
            owner, first_day, last_day = key_id.strip() or None, since or None, until or None
            # The first page before the answer starts: a bad filter is still a 400 page, not a
            # 200 with a broken body. Then a page a store call, as the browser reads them.
            first = await usage.usage_csv(key_id=owner, since=first_day, until=last_day, cursor=None)

            async def pages() -> AsyncIterator[str]:
                chunk = first
                yield chunk.csv
                while chunk.next_cursor is not None:
                    chunk = await usage.usage_csv(key_id=owner, since=first_day, until=last_day,
                                                  cursor=chunk.next_cursor)
                    yield chunk.csv

            return StreamingResponse(pages(), media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition": 'attachment; filename="usage.csv"'})

        # -- batches ---------------------------------------------------------------------------

        @app.get("/batches", response_class=HTMLResponse)
        async def batches(request: Request, after: str = Query("", max_length=64)) -> HTMLResponse:
            listing = await self._batches().list_batches(None, PAGE, after or None)
            now = time.time()
            rows = [(b, batch_progress(b, now)) for b in listing.data]
            return page("batches.html", request, nav="batches", rows=rows, has_more=listing.has_more,
                        last_id=listing.last_id, after=after)

        @app.post("/batches/{batch_id}/cancel")
        async def cancel_batch(request: Request, batch_id: str) -> RedirectResponse:
            await self._batches().cancel_batch(None, batch_id[:64])
            return back(request, "/batches")

        @app.get("/files/{file_id}/content")
        async def file_content(
            file_id: str, range_header: str | None = Header(None, alias="Range", max_length=200)
        ) -> Response:
            return await file_response(self._batches(), None, file_id[:64], range_header)

    def _batches(self) -> BatchClient:
        if self.batches is None:
            raise InvalidRequest("This application has no batch service.")
        return self.batches

    async def _keys(self, after: str) -> dict[str, Any]:
        """The keys page's listing: newest first, ``PAGE`` at a time, after the key ``after``."""
        listing = await self.keys.list(PAGE, after or None, "desc")
        return {"keys": listing.data, "has_more": listing.has_more, "last_id": listing.last_id, "after": after}


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = field_path(first.get("loc", ()))
    return f"{field}: {first.get('msg', 'invalid')}".removeprefix(": ")
