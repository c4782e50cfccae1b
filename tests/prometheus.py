"""A throwaway Prometheus server scraping the test cluster through Ray's service-discovery file.

``PrometheusServer.start(sd_file)``: Debian's ``prometheus`` binary (``.ci/run`` installs the package
when missing) with a config of the kind Ray's dashboard writes (``<session>/metrics/prometheus/
prometheus.yml``: one ``file_sd_configs`` job reading ``<session>/prom_metrics_service_discovery.json``)
but scraping every second, on 127.0.0.1 and a free port, storage in a temporary directory. Ray
lists its targets by the node's address; the one relabel rule keeps the scrapes on loopback (the
agents listen on every interface), as the tests' network rules require. ``stop()`` ends it and
removes the directory.

``query(promql)`` runs an instant query and returns the sample values by their label sets.
Without the binary the tests skip — or fail, when ``PROMPTFLEET_REQUIRE_PROMETHEUS=1`` (CI sets it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.fixtures import free_port

REQUIRE_ENV = "PROMPTFLEET_REQUIRE_PROMETHEUS"
# Also the scrape timeout (Prometheus allows none longer than the interval). Late in a long tier the
# agent's exposition has thousands of series, and a loaded 2-core machine can take over a second to
# serve it: with a 1 s interval every scrape timed out and each series read as absent (0).
SCRAPE_INTERVAL_S = 2

CONFIG = """\
global:
  scrape_interval: {interval}s
  scrape_timeout: {interval}s
  evaluation_interval: {interval}s
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ['{sd_file}']
        refresh_interval: {interval}s
    relabel_configs:
      - source_labels: [__address__]
        regex: '.*:([0-9]+)'
        target_label: __address__
        replacement: '127.0.0.1:$1'
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@dataclass
class PrometheusServer:
    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, sd_file: Path, timeout_s: float = 60) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            _unavailable("no `prometheus` binary (Debian package `prometheus`)")
        root = Path(tempfile.mkdtemp(prefix="pf-prometheus-"))
        config = root / "prometheus.yml"
        config.write_text(CONFIG.format(interval=SCRAPE_INTERVAL_S, sd_file=sd_file))
        port = free_port()
        with (root / "prometheus.log").open("wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=root,
            )
        server = cls(root, port, process)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"prometheus did not start: {(root / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"prometheus: {body}")
        return body["data"]

    def query(self, promql: str) -> dict[frozenset[tuple[str, str]], float]:
        """An instant query's samples: {label set: value}."""
        data = self._get("/api/v1/query", query=promql)
        return {frozenset(item["metric"].items()): float(item["value"][1]) for item in data["result"]}

    def value(self, promql: str) -> float:
        """The one value of a query that aggregates to a single sample (0 when it has none)."""
        samples = self.query(promql)
        if len(samples) > 1:
            raise AssertionError(f"{promql}: {len(samples)} samples, expected one")
        return next(iter(samples.values()), 0.0)

    def metric_names(self, match: str | None = None) -> set[str]:
        """Names of the metrics scraped (of the series ``match`` selects)."""
        params = {"match[]": match} if match else {}
        return set(self._get("/api/v1/label/__name__/values", **params))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def unhealthy_targets(self) -> list[str]:
        """The targets whose last scrape failed, with Prometheus's reason: while any is down, its series
        read as absent."""
        return [f"{t['scrapeUrl']} {t['health']}: {t.get('lastError') or 'no error'} "
                f"(last scrape took {float(t.get('lastScrapeDuration') or 0):.2f} s)"
                for t in self.targets() if t["health"] != "up"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
