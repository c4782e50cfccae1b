"""The shipped Grafana dashboard: generated from the metric catalogue, a valid Grafana dashboard model,
laid out on Grafana's grid, installed where Ray's Grafana provisioning loads dashboards.

That its queries name only metrics a running cluster exports is checked against a live scrape in
tests/serve/test_metrics.py (``promql_metric_names`` is shared with it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

from cluster import grafana
from deployments.telemetry import CATALOGUE, Kind

SHIPPED = json.loads(grafana.DASHBOARD.read_text())

# PromQL words that are not metric names: functions, aggregations and their modifiers, Grafana's macros.
PROMQL_WORDS = frozenset({
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "clamp_min", "clamp_max", "abs",
    "topk", "bottomk", "vector", "scalar", "label_values",
})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside label matchers, ranges, strings and
    grouping clauses that are not PromQL's own words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"label_values\(([^,{]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)", r"\1", text)  # Grafana: its label
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # groupings
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("__")}


def exported_series_names() -> set[str]:
    names = set()
    for spec in CATALOGUE:
        if spec.kind is Kind.HISTOGRAM:
            names |= {spec.exported + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(spec.exported)
    return names


def all_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_the_shipped_dashboard_is_the_generated_one() -> None:
    assert grafana.DASHBOARD.read_text() == grafana.render(), "run: python -m cluster.grafana --write"


def test_the_metrics_page_lists_every_metric_as_generated() -> None:
    text = grafana.METRICS_PAGE.read_text()
    assert grafana.with_metrics_table(text) == text, "run: python -m cluster.grafana --write"


def test_the_name_finder_finds_metric_names_only() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(ray_a_bucket{application=~"$application",'
            'x="rate(y)"}[$__rate_interval]))) / on(app) group_left count(ray_b_total) or vector(0)')
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b_total"}
    assert promql_metric_names('label_values(ray_c{a="b"}, application)') == {"ray_c"}


def test_queries_use_only_catalogued_metrics_under_their_exported_names() -> None:
    used = set().union(*(promql_metric_names(e) for e in all_exprs(SHIPPED)))
    assert used and used <= exported_series_names(), used - exported_series_names()
    # Every metric is on the dashboard.
    assert {spec.exported for spec in CATALOGUE} <= {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}


def test_it_loads_as_a_grafana_dashboard_model_and_keeps_every_field() -> None:
    register_default_plugins()
    model = Dashboard.from_json(SHIPPED)
    assert model.uid == "promptfleet" and model.title and model.schema_version == 39
    assert model.panels is not None and len(model.panels) == len(SHIPPED["panels"])
    assert all(isinstance(p, RowPanel if raw["type"] == "row" else Panel)
               for p, raw in zip(model.panels, SHIPPED["panels"], strict=True))
    round_trip = json.loads(json.dumps(model, cls=JSONEncoder))

    def kept(ours: Any, theirs: Any, where: str) -> None:
        if isinstance(ours, dict):
            assert isinstance(theirs, dict), where
            for key, value in ours.items():
                assert key in theirs, f"{where}.{key} was dropped by the model"
                kept(value, theirs[key], f"{where}.{key}")
        elif isinstance(ours, list):
            assert isinstance(theirs, list) and len(theirs) == len(ours), where
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                kept(a, b, f"{where}[{i}]")
        else:
            assert ours == theirs, where

    for key in ("uid", "title", "tags", "schemaVersion", "time", "templating", "panels"):
        kept(SHIPPED[key], round_trip[key], key)


def test_panels_sit_on_grafanas_grid_without_overlapping() -> None:
    panels = SHIPPED["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["description"] and panel["fieldConfig"]["defaults"]["unit"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert all('application=~"$application"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_rows_follow_an_operators_questions() -> None:
    rows = [p["title"] for p in SHIPPED["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Errors", "Latency", "Tokens", "Limits", "Queue", "Batches"]


# -- installing --------------------------------------------------------------------------------------


def ray_session(tmp_path: Path) -> Path:
    """A session directory as Ray's dashboard leaves it: its dashboards in the provisioning folder."""
    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    dashboards = session / "metrics" / "grafana" / "dashboards"
    dashboards.mkdir(parents=True)
    (dashboards / grafana.RAY_DEFAULT_DASHBOARD).write_text("{}")
    return session


def test_install_puts_it_next_to_rays_dashboards(tmp_path: Path) -> None:
    session = ray_session(tmp_path)
    installed = grafana.install(session, {})
    assert installed == session / "metrics" / "grafana" / "dashboards" / grafana.INSTALLED_NAME
    assert json.loads(installed.read_text())["uid"] == "promptfleet"


def test_install_follows_rays_output_overrides(tmp_path: Path) -> None:
    session = ray_session(tmp_path)
    elsewhere = tmp_path / "dash"
    elsewhere.mkdir()
    (elsewhere / grafana.RAY_DEFAULT_DASHBOARD).write_text("{}")
    environ = {"RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR": str(elsewhere)}
    assert grafana.install(session, environ) == elsewhere / grafana.INSTALLED_NAME
    root = {"RAY_METRICS_OUTPUT_ROOT": str(tmp_path / "root")}
    assert grafana.dashboards_dir(session, root) == tmp_path / "root" / "grafana" / "dashboards"


def test_install_waits_for_ray_then_gives_up(tmp_path: Path) -> None:
    assert grafana.install(tmp_path / "no-session", {}, wait_s=0.2) is None


def test_session_dir_of_an_unreachable_dashboard_is_none(unused_tcp_port: int) -> None:
    assert grafana.session_dir(f"http://127.0.0.1:{unused_tcp_port}", {}) is None


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
