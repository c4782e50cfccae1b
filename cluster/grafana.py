"""promptfleet's Grafana dashboard: generated from the metric catalogue, installed next to Ray's own.

    python -m cluster.grafana            print the dashboard JSON
    python -m cluster.grafana --write    write configs/grafana/promptfleet.json and the metrics table of
                                         docs/reference/metrics.md (tests check both are current)

The dashboard (``DASHBOARD``, uid ``promptfleet``) is laid out for an operator, one row each:
traffic, errors, latency, tokens, limits, queue, batches. Its queries use the names Prometheus
sees (``MetricSpec.exported``: ``ray_promptfleet_…``), filtered by the ``$application`` variable,
on the ``$datasource`` Prometheus data source — the conventions of Ray's own dashboards.

Where it goes: Ray's dashboard writes Grafana's provisioning into the session directory of the
head node (``<session>/metrics/grafana``: ``grafana.ini`` and a file provider named "Ray" that
loads every dashboard JSON in ``dashboards/``, or in ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``).
``install`` drops ours into that same folder, so a Grafana started the way Ray's docs say
(``grafana-server --config <session>/metrics/grafana/grafana.ini``) shows it in the "Ray" folder
beside Ray's default, Serve and Serve-deployment dashboards. ``promptfleet start`` calls it when
the head runs on this machine. Ray rewrites that folder when its dashboard process starts, so a
restarted dashboard needs ``promptfleet start`` (or a copy of the file) again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments import telemetry as t
from deployments.telemetry import MetricSpec

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "configs" / "grafana" / "promptfleet.json"
INSTALLED_NAME = "promptfleet_grafana_dashboard.json"
UID = "promptfleet"
RAY_DEFAULT_DASHBOARD = "default_grafana_dashboard.json"  # written by Ray's dashboard; ours goes beside it
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application=~"$application"'
WIDTH, HEIGHT = 24, 8


def _selector(extra: str = "") -> str:
    return "{" + APP + (f",{extra}" if extra else "") + "}"


def per_second(spec: MetricSpec, by: str, extra: str = "") -> str:
    """The rate of a counter, summed by ``by``."""
    return f"sum by ({by}) (rate({spec.exported}{_selector(extra)}[$__rate_interval]))"


def quantile(q: float, spec: MetricSpec, by: str, extra: str = "") -> str:
    """The ``q`` quantile of a histogram, by ``by``."""
    buckets = f"{spec.exported}_bucket{_selector(extra)}"
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({buckets}[$__rate_interval])))"


def current(spec: MetricSpec, by: str, how: str = "sum", extra: str = "") -> str:
    """A gauge's value, combined over replicas with ``how``."""
    return f"{how} by ({by}) ({spec.exported}{_selector(extra)})"


def error_ratio(status_class: str) -> str:
    """The share of answers in ``status_class``, per application."""
    errors = per_second(t.REQUESTS, "application", f'status_class="{status_class}"')
    return f"{errors} / {per_second(t.REQUESTS, 'application')}"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 12


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _why(*specs: MetricSpec) -> str:
    return " ".join(spec.why for spec in specs)


REQ, LAT, TTFT, TOK = t.REQUESTS, t.REQUEST_DURATION, t.FIRST_TOKEN, t.TOKENS

ROWS: list[Row] = [
    Row("Traffic", [
        Panel("Requests per second by route", _why(REQ), "reqps",
              (Target(per_second(REQ, "route"), "{{route}}"),)),
        Panel("Requests per second by model", "Chat requests by the model they asked for.", "reqps",
              (Target(per_second(REQ, "model", 'model!=""'), "{{model}}"),)),
    ]),
    Row("Errors", [
        Panel("Error answers per second", "4xx and 5xx answers by status class and error code. " + REQ.why,
              "reqps", (Target(per_second(REQ, "status_class, error_code", 'status_class=~"4xx|5xx"'),
                               "{{status_class}} {{error_code}}"),)),
        Panel("Error ratio", "Share of answers that are 5xx (ours or the upstream's) and 4xx (the client's).",
              "percentunit",
              tuple(Target(error_ratio(status), f"{status} {{{{application}}}}") for status in ("5xx", "4xx"))),
        Panel("Upstream calls by outcome", _why(t.UPSTREAM_CALLS), "reqps",
              (Target(per_second(t.UPSTREAM_CALLS, "model, outcome"), "{{model}} {{outcome}}"),)),
        Panel("Retries, fallbacks and circuit breakers",
              "Upstream retries and fallbacks per second; circuit breakers opening. "
              + _why(t.UPSTREAM_RETRIES, t.FALLBACKS), "short",
              (Target(per_second(t.UPSTREAM_RETRIES, "model"), "retries {{model}}"),
               Target(per_second(t.FALLBACKS, "model, fallback"), "fallback {{model}} → {{fallback}}"),
               Target(per_second(t.BREAKER_OPENS, "model"), "breaker opened {{model}}"))),
        Panel("Replicas with an open circuit", _why(t.BREAKER_STATE), "short",
              (Target(f"count by (model) ({t.BREAKER_STATE.exported}{_selector()} == 2)", "open {{model}}"),
               Target(f"count by (model) ({t.BREAKER_STATE.exported}{_selector()} == 1)", "half-open {{model}}"))),
    ]),
    Row("Latency", [
        Panel("Request latency by route (p50, p95, p99)", _why(LAT), "s",
              tuple(Target(quantile(q, LAT, "route"), f"p{int(q * 100)} {{{{route}}}}") for q in (0.5, 0.95, 0.99))),
        Panel("Time to first token by model (p50, p95)", _why(TTFT), "s",
              tuple(Target(quantile(q, TTFT, "model"), f"p{int(q * 100)} {{{{model}}}}") for q in (0.5, 0.95))),
        Panel("Upstream latency by model (p50, p95)", _why(t.UPSTREAM_LATENCY), "s",
              tuple(Target(quantile(q, t.UPSTREAM_LATENCY, "model"), f"p{int(q * 100)} {{{{model}}}}")
                    for q in (0.5, 0.95))),
        Panel("Request latency by model (p95)", "Chat latency per requested model. " + LAT.why, "s",
              (Target(quantile(0.95, LAT, "model", 'model!=""'), "p95 {{model}}"),)),
    ]),
    Row("Tokens", [
        Panel("Tokens per second by model", _why(TOK), "short",
              (Target(per_second(TOK, "model, kind"), "{{model}} {{kind}}"),)),
        Panel("Tokens in the selected time range", "Prompt and completion tokens spent per model over the "
              "dashboard's time range.", "short",
              (Target(f"sum by (model, kind) (increase({TOK.exported}{_selector()}[$__range]))",
                      "{{model}} {{kind}}"),), kind="stat"),
        Panel("Local model: tokens per second while generating", _why(t.LOCAL_TOKENS), "short",
              (Target(f"{per_second(t.LOCAL_TOKENS, 'model')} / {per_second(t.LOCAL_SECONDS, 'model')}",
                      "{{model}}"),)),
        Panel("Local model: generations queued or running", _why(t.LOCAL_QUEUE), "short",
              (Target(current(t.LOCAL_QUEUE, "model"), "{{model}}"),
               Target(per_second(t.LOCAL_SECONDS, "model"), "busy (generation seconds per second) {{model}}"))),
    ]),
    Row("Limits", [
        Panel("Booked waits for a slot (p50, p95)", _why(t.LIMITER_WAIT), "s",
              tuple(Target(quantile(q, t.LIMITER_WAIT, "budget, model"), f"p{int(q * 100)} {{{{budget}}}} "
                           "{{model}}") for q in (0.5, 0.95))),
        Panel("Refused bookings per second", _why(t.LIMITER_REFUSALS), "short",
              (Target(per_second(t.LIMITER_REFUSALS, "budget, model"), "{{budget}} {{model}}"),)),
        Panel("Model pauses in force (upstream 429s)", _why(t.LIMITER_PAUSED, t.LIMITER_PAUSES), "s",
              (Target(current(t.LIMITER_PAUSED, "model", "max"), "pause left {{model}}"),
               Target(f"sum by (model) (increase({t.LIMITER_PAUSES.exported}{_selector()}[$__rate_interval]))",
                      "pauses started {{model}}"))),
        Panel("Calls waiting in fair queues", _why(t.LIMITER_QUEUED), "short",
              (Target(current(t.LIMITER_QUEUED, "model", "max"), "{{model}}"),)),
    ]),
    Row("Queue", [
        Panel("Runs by status", _why(t.RUNS), "short",
              (Target(current(t.RUNS, "application, status", "max"), "{{status}} {{application}}"),)),
        Panel("Oldest queued run", _why(t.OLDEST_QUEUED), "s",
              (Target(current(t.OLDEST_QUEUED, "application", "max"), "{{application}}"),)),
        Panel("Runs submitted and finished per second", _why(t.RUNS_SUBMITTED, t.RUNS_FINISHED), "short",
              (Target(per_second(t.RUNS_SUBMITTED, "task"), "submitted {{task}}"),
               Target(per_second(t.RUNS_FINISHED, "task, status"), "{{status}} {{task}}"))),
        Panel("Attempts per finished run, lease expiries", _why(t.RUN_ATTEMPTS, t.RUN_LEASE_EXPIRIES), "short",
              (Target(f"{per_second(t.RUN_ATTEMPTS, 'application')} / {per_second(t.RUNS_FINISHED, 'application')}",
                      "attempts per run {{application}}"),
               Target(per_second(t.RUN_LEASE_EXPIRIES, "task"), "lease expiries {{task}}"))),
    ]),
    Row("Batches", [
        Panel("Batch lines per second", _why(t.BATCH_LINES), "short",
              (Target(per_second(t.BATCH_LINES, "kind, outcome"), "{{kind}} {{outcome}}"),)),
        Panel("Batches by status", _why(t.BATCHES), "short",
              (Target(current(t.BATCHES, "status"), "{{status}}"),)),
    ]),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"refId": chr(ord("A") + i), "expr": target.expr, "legendFormat": target.legend, "datasource": DATASOURCE}
        for i, target in enumerate(panel.targets)
    ]
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        body["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "textMode": "value_and_name"}
    return body


def dashboard() -> dict[str, Any]:
    """The dashboard model (Grafana's JSON)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y = 0, y + HEIGHT
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
        y += HEIGHT
    return {
        "uid": UID,
        "title": "promptfleet",
        "description": "promptfleet's gateway, model calls, limits, run queue and batches "
        "(generated by `python -m cluster.grafana --write`).",
        "tags": ["promptfleet", "ray", "serve"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "hide": 0, "current": {}, "options": [], "refresh": 1},
            {"name": "application", "label": "Application", "type": "query", "datasource": DATASOURCE,
             "query": {"query": f"label_values({REQ.exported}, application)", "refId": "application"},
             "includeAll": True, "multi": True, "allValue": ".*", "hide": 0, "refresh": 2, "sort": 1,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


# -- the metrics table of docs/reference/metrics.md ---------------------------------------------------

METRICS_PAGE = REPO / "docs" / "reference" / "metrics.md"
TABLE_START = "<!-- metrics-reference:start (generated by `python -m cluster.grafana --write`) -->"
TABLE_END = "<!-- metrics-reference:end -->"


def metrics_table() -> str:
    lines = [TABLE_START, "", "| metric (as Prometheus sees it) | type | labels | why an operator needs it |",
             "|---|---|---|---|"]
    for spec in t.CATALOGUE:
        labels = ", ".join(f"`{label}`" for label in spec.labels[1:]) or "—"
        text = f"{spec.help} {spec.why}".replace("|", "\\|")
        lines.append(f"| `{spec.exported}` | {spec.kind.value} | {labels} | {text} |")
    return "\n".join([*lines, "", TABLE_END])


def with_metrics_table(text: str) -> str:
    before, found, rest = text.partition(TABLE_START)
    if not found:
        raise ValueError(f"{METRICS_PAGE.name} has no {TABLE_START}")
    _, _, after = rest.partition(TABLE_END)
    return before + metrics_table() + after


# -- installing it where Ray's Grafana provisioning looks --------------------------------------------


def dashboards_dir(session_dir: Path, environ: Mapping[str, str]) -> Path:
    """The folder Ray's Grafana provisioning loads dashboards from, for the session at ``session_dir``
    (the overrides Ray's dashboard reads: ray.dashboard.modules.metrics.metrics_head)."""
    override = environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR")
    if override:
        return Path(override)
    root = environ.get("RAY_METRICS_OUTPUT_ROOT")
    return (Path(root) if root else session_dir / "metrics") / "grafana" / "dashboards"


def _auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    token = environ.get("RAY_AUTH_TOKEN")
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def session_dir(dashboard_url: str, environ: Mapping[str, str], temp_dir: str | None = None) -> Path | None:
    """The session directory of the cluster whose dashboard is ``dashboard_url``, if it is on this machine."""
    request = urllib.request.Request(f"{dashboard_url.rstrip('/')}/api/version", headers=_auth_headers(environ))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            name = json.loads(response.read()).get("session_name")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or not name.startswith("session_"):
        return None
    root = Path(temp_dir) if temp_dir else Path(environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    candidate = root / name
    return candidate if candidate.is_dir() else None


def install(session: Path, environ: Mapping[str, str], wait_s: float = 15.0) -> Path | None:
    """Copy the dashboard next to Ray's in ``session``'s Grafana provisioning; its path, or None when
    Ray's dashboards are not there (no dashboard on this machine, or it never wrote them)."""
    target_dir = dashboards_dir(session, environ)
    deadline = time.monotonic() + wait_s
    # Ray's dashboard (re)creates the folder when its metrics module starts: write after it did.
    while not (target_dir / RAY_DEFAULT_DASHBOARD).is_file():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
    target = target_dir / INSTALLED_NAME
    shutil.copyfile(DASHBOARD, target)
    return target


def install_for(dashboard_url: str, environ: Mapping[str, str] | None = None,
                temp_dir: str | None = None) -> Path | None:
    """``install`` for the cluster whose dashboard is ``dashboard_url``, when its head is this machine."""
    environ = os.environ if environ is None else environ
    session = session_dir(dashboard_url, environ, temp_dir)
    return install(session, environ) if session is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.grafana", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help=f"write {DASHBOARD.relative_to(REPO)} and the metrics table of "
                             f"{METRICS_PAGE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
        DASHBOARD.write_text(text)
        METRICS_PAGE.write_text(with_metrics_table(METRICS_PAGE.read_text()))
        print(f"wrote {DASHBOARD.relative_to(REPO)} and the metrics table of {METRICS_PAGE.relative_to(REPO)}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
