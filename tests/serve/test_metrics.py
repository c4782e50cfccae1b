"""promptfleet's metrics end to end: Ray's metrics agent → a real Prometheus → PromQL.

A Prometheus server (``tests.prometheus``) scrapes the session's cluster through the service-
discovery file Ray writes into the session directory (found from the dashboard, as ``promptfleet
start`` finds it). The test sends a known set of requests — chats, a stream, a sync task run, a
queued run, a failing request, a batch through the Batches API — and asserts through PromQL that
every counter and histogram moved by exactly that much. Isolation on a shared cluster: the model
``fake-metrics`` and the task ``label_metrics`` are called by this test only (``settle`` leaves them
alone), and every query is pinned to this cluster's ``SessionName``; the batch-line counter, which
has no model label, is compared before/after once it is still.

The processes of the test cluster report their metrics every ``METRICS_REPORT_INTERVAL_MS``,
Prometheus scrapes every ``SCRAPE_INTERVAL_S``, and values are polled until they arrive, never slept
for; while a scrape fails (the target is down) nothing is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster import grafana
from deployments import telemetry
from deployments.telemetry import MetricSpec
from tests.fixtures import METRICS_MODEL, METRICS_REPORT_INTERVAL_MS, ServeApp
from tests.prometheus import SCRAPE_INTERVAL_S, PrometheusServer
from tests.unit.test_grafana import all_exprs, promql_metric_names
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

APP = "promptfleet"
TASK = "label_metrics"
CHAT = "/v1/chat/completions"
# A value unchanged this long has arrived: more than one report interval and one scrape interval.
SETTLE_S = METRICS_REPORT_INTERVAL_MS / 1000 + SCRAPE_INTERVAL_S + 1.0


@pytest.fixture(scope="module")
def prometheus(serve_app: ServeApp) -> Iterator[PrometheusServer]:
    session = grafana.session_dir(serve_app.dashboard, os.environ)
    assert session is not None, "the session directory of the test cluster"
    sd_file = session / "prom_metrics_service_discovery.json"
    wait_for(sd_file.exists, 60, message="Ray's service-discovery file")
    server = PrometheusServer.start(sd_file)
    try:
        wait_for(lambda: any(t["health"] == "up" for t in server.targets()), 60, 0.5, "a Ray target scraped")
        yield server
    finally:
        server.stop()


class Queries:
    """PromQL over this cluster's series of the main application."""

    def __init__(self, prometheus: PrometheusServer, session: str) -> None:
        self.prometheus = prometheus
        self.base = {"SessionName": session, "application": APP}

    def selector(self, series: str, **labels: str) -> str:
        matchers = ",".join(f'{k}="{v}"' for k, v in {**self.base, **labels}.items())
        return f"{series}{{{matchers}}}"

    def total(self, spec: MetricSpec, **labels: str) -> str:
        return f"sum({self.selector(spec.exported, **labels)})"

    def count(self, spec: MetricSpec, **labels: str) -> str:
        return f"sum({self.selector(spec.exported + '_count', **labels)})"

    def bucket(self, spec: MetricSpec, le: str, **labels: str) -> str:
        return f"sum({self.selector(spec.exported + '_bucket', le=le, **labels)})"

    def values(self, queries: dict[str, str]) -> dict[str, float] | None:
        """The queries' values; None while a target's last scrape failed, when every series it
        exports reads as absent (0) and no value means anything."""
        if self.prometheus.unhealthy_targets():
            return None
        return {name: self.prometheus.value(q) for name, q in queries.items()}

    def settled(self, queries: dict[str, str], timeout_s: float = 60) -> dict[str, float]:
        """The values once they have stopped moving (everything recorded so far has arrived): the
        same in two reads ``SETTLE_S`` apart, every target up in both."""
        last: list[dict[str, float] | None] = []

        def unchanged() -> dict[str, float] | None:
            now = self.values(queries)
            if now is not None and last and now == last[0]:
                return now
            last[:] = [now]
            return None

        return wait_for(unchanged, timeout_s=timeout_s, interval_s=SETTLE_S,
                        message=lambda: f"metrics still moving: {last}; {self.scrapes()}")

    def scrapes(self) -> str:
        down = self.prometheus.unhealthy_targets()
        return f"targets down: {down}" if down else "every target up"


def session_name(app: ServeApp) -> str:
    session = grafana.session_dir(app.dashboard, os.environ)
    assert session is not None
    return session.name


def usage_of(answer: dict[str, Any]) -> tuple[int, int]:
    usage = answer["usage"]
    return int(usage["prompt_tokens"]), int(usage["completion_tokens"])


def send_traffic(app: ServeApp, client: openai.OpenAI) -> tuple[int, int]:
    """The requests of the test; the prompt and completion tokens their answers report."""
    prompt = completion = 0
    # Two chats and a stream.
    for text in ("one", "two"):
        answer = client.chat.completions.create(model=METRICS_MODEL, messages=[{"role": "user", "content": text}])
        p, c = usage_of(answer.model_dump())
        prompt, completion = prompt + p, completion + c
    stream = client.chat.completions.create(
        model=METRICS_MODEL, messages=[{"role": "user", "content": "three"}], stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    prompt, completion = prompt + usages[0].prompt_tokens, completion + usages[0].completion_tokens
    # A failing request: the upstream answers 500 once (no retries on this model): 502 upstream_error.
    app.upstream.configure(mode="error", fail_first_n=1)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model=METRICS_MODEL, messages=[{"role": "user", "content": "four"}])
    assert failed.value.status_code == 502
    app.upstream.configure(mode="ok")
    # A task run now, and one through the queue.
    with httpx.Client(base_url=app.base_url, timeout=60) as http:
        ran = http.post(f"/tasks/{TASK}/run", json={"input": {"text": "five"}})
        assert ran.status_code == 200, ran.text
        p, c = usage_of(ran.json())
        prompt, completion = prompt + p, completion + c
        submitted = http.post(f"/tasks/{TASK}/submit", json={"input": {"text": "six"}})
        assert submitted.status_code == 202, submitted.text
        run = http.get(f"/runs/{submitted.json()['id']}", params={"wait": 60}).json()
        assert run["status"] == "succeeded" and run["attempt"] == 1, run
        p, c = usage_of(run)
        prompt, completion = prompt + p, completion + c
    # A batch of three chat lines and one line that cannot run, through the Batches API.
    lines = [{"custom_id": f"m-{i}", "method": "POST", "url": CHAT,
              "body": {"model": METRICS_MODEL, "messages": [{"role": "user", "content": f"line {i}"}]}}
             for i in range(3)]
    content = "".join(json.dumps(line) + "\n" for line in lines) + "not json\n"
    uploaded = client.files.create(file=("metrics.jsonl", content.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
                     180, 0.5, "the batch to end")
    assert batch.status == "completed" and batch.output_file_id
    for line in client.files.content(batch.output_file_id).text.splitlines():
        p, c = usage_of(json.loads(line)["response"]["body"])
        prompt, completion = prompt + p, completion + c
    # One call of a model behind an rpm limit (LIMITED_RPM): one booked wait.
    client.chat.completions.create(model="fake-limited", messages=[{"role": "user", "content": "seven"}])
    return prompt, completion


def test_counters_and_histograms_move_by_exactly_what_was_sent(app: ServeApp, prometheus: PrometheusServer) -> None:
    q = Queries(prometheus, session_name(app))
    model = {"model": METRICS_MODEL}
    queries = {
        "chat_ok": q.total(telemetry.REQUESTS, route=CHAT, status_class="2xx", error_code="", **model),
        "chat_failed": q.total(telemetry.REQUESTS, route=CHAT, status_class="5xx", error_code="upstream_error",
                               **model),
        "chat_latency": q.count(telemetry.REQUEST_DURATION, route=CHAT, **model),
        "chat_latency_inf": q.bucket(telemetry.REQUEST_DURATION, "+Inf", route=CHAT, **model),
        "task_run_ok": q.total(telemetry.REQUESTS, route="/v1/tasks/{name}/run", status_class="2xx"),
        "submits": q.total(telemetry.REQUESTS, route="/v1/tasks/{name}/submit", status_class="2xx"),
        "first_token": q.count(telemetry.FIRST_TOKEN, **model),
        "prompt_tokens": q.total(telemetry.TOKENS, kind="prompt", **model),
        "completion_tokens": q.total(telemetry.TOKENS, kind="completion", **model),
        "upstream_ok": q.total(telemetry.UPSTREAM_CALLS, outcome="ok", **model),
        "upstream_error": q.total(telemetry.UPSTREAM_CALLS, outcome="error", **model),
        "upstream_latency": q.count(telemetry.UPSTREAM_LATENCY, **model),
        "runs_submitted": q.total(telemetry.RUNS_SUBMITTED, task=TASK),
        "runs_succeeded": q.total(telemetry.RUNS_FINISHED, task=TASK, status="succeeded"),
        "run_attempts": q.total(telemetry.RUN_ATTEMPTS, task=TASK),
        "batch_lines_done": q.total(telemetry.BATCH_LINES, kind="chat", outcome="done"),
        "batch_lines_failed": q.total(telemetry.BATCH_LINES, kind="invalid", outcome="failed"),
        "limited_waits": q.count(telemetry.LIMITER_WAIT, budget="model", model="fake-limited"),
    }
    before = q.settled(queries)
    with app.client() as client:
        prompt, completion = send_traffic(app, client)

    sent = {
        "chat_ok": 3, "chat_failed": 1, "chat_latency": 4, "chat_latency_inf": 4, "task_run_ok": 1, "submits": 1,
        "first_token": 1, "prompt_tokens": prompt, "completion_tokens": completion,
        # Each answered call is one upstream call: 2 chats, the stream, 2 task runs, 3 batch lines.
        "upstream_ok": 8, "upstream_error": 1, "upstream_latency": 9,
        "runs_submitted": 1, "runs_succeeded": 1, "run_attempts": 1,
        "batch_lines_done": 3, "batch_lines_failed": 1, "limited_waits": 1,
    }
    expected = {name: before[name] + delta for name, delta in sent.items()}
    assert prompt > 0 and completion > 0
    wait_for(lambda: q.values(queries) == expected, timeout_s=90, interval_s=0.5,
             message=lambda: f"metrics moved by {_delta(q.values(queries), before)}; sent {sent}; {q.scrapes()}")
    # And nothing more arrives after them.
    assert q.settled(queries) == expected

    # The gauges the stores sample are there: runs by status, the oldest queued run, batches.
    assert prometheus.query(q.selector(telemetry.RUNS.exported, status="queued"))
    assert prometheus.query(q.selector(telemetry.OLDEST_QUEUED.exported))
    completed = q.total(telemetry.BATCHES, status="completed")
    wait_for(lambda: prometheus.value(completed) >= 1, 60, 0.5, "the completed batch in the gauge")


def _delta(now: dict[str, float] | None, before: dict[str, float]) -> dict[str, float] | str:
    if now is None:
        return "(not read: a target is down)"
    return {name: now[name] - before[name] for name in now}


def test_the_dashboards_queries_name_only_metrics_the_cluster_exports(
    app: ServeApp, prometheus: PrometheusServer
) -> None:
    """Every metric the shipped dashboard reads is in a live scrape of the running cluster."""
    # Histograms exist from their first value: give each one (the other test may not have run).
    with app.client() as client:
        for chunk in client.chat.completions.create(
            model=METRICS_MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        ):
            del chunk
        client.chat.completions.create(model="fake-limited", messages=[{"role": "user", "content": "y"}])
    dashboard = json.loads(grafana.DASHBOARD.read_text())
    wanted = set().union(*(promql_metric_names(expr) for expr in all_exprs(dashboard)))
    assert len(wanted) > 20

    # The sampled gauges (run queue, batches) appear within a sample interval of the stores' start.
    this_cluster = f'{{SessionName="{session_name(app)}"}}'

    def missing() -> list[str]:
        return sorted(wanted - prometheus.metric_names(this_cluster))

    wait_for(lambda: not missing(), timeout_s=60, interval_s=1.0,
             message=lambda: f"read by the dashboard, not exported: {missing()}")


def test_queries_of_the_dashboard_run(prometheus: PrometheusServer, app: ServeApp) -> None:
    """Prometheus accepts every query of the dashboard, with Grafana's variables filled in."""
    dashboard = json.loads(grafana.DASHBOARD.read_text())
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$application": ".*"}
    for expr in all_exprs(dashboard):
        if expr.startswith("label_values("):
            continue
        for name, value in substitutions.items():
            expr = expr.replace(name, value)
        prometheus.query(expr)  # raises on a query Prometheus refuses


def test_start_installs_the_dashboard_where_rays_grafana_provisioning_loads_dashboards(app: ServeApp) -> None:
    """What ``promptfleet start`` does after the deploy, on the session's real Ray session directory:
    the file lands in the folder Ray's Grafana provisioning reads, next to Ray's own dashboards."""
    installed = grafana.install_for(app.dashboard)
    assert installed is not None and installed.name == grafana.INSTALLED_NAME
    try:
        assert json.loads(installed.read_text())["uid"] == "promptfleet"
        assert (installed.parent / "serve_grafana_dashboard.json").is_file()  # Ray's Serve dashboard
        session = grafana.session_dir(app.dashboard, os.environ)
        assert session is not None
        provisioning = yaml.safe_load(
            (session / "metrics" / "grafana" / "provisioning" / "dashboards" / "default.yml").read_text()
        )
        assert [Path(p["options"]["path"]) for p in provisioning["providers"]] == [installed.parent]
    finally:
        installed.unlink()
