"""A task catalogue of any size reaches every replica (issue 19), on a running cluster.

A third application of the session's cluster, deployed for this module only: two Gateway
replicas, one TaskRunner, ``tasks.max_definition_bytes`` lowered to 64 KiB so a file over it fits
in one request. 2,000 tasks of ~26 kB each (over 50 MB of stored definitions) are pushed through
the TaskStore in batches (the HTTP push's own path is the store's ``push_tasks``; going around the
Gateway's per-file checks only saves time), then every replica must hold every one at the store's
version, and a Gateway replica started afterwards (the old one killed) pages them all in. Anchors
and oversized files are refused with a 400 naming the file, and a normal push beside them applies.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import canonical, content_hash
from deployments.store.tasks import VersionInput
from tests.fixtures import ServeApp, beside, free_port, upstream_models
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

APP = "promptfleet-catalogue"
POLL_S = 0.5
BOUND_S = 15.0  # a small push must reach every replica within this (catalogue_poll_s is 0.5 s; shared machine)
TASKS = 2000
PROMPT_BYTES = 26_000
BATCH = 40  # tasks per push_tasks call: ~1 MB, far below Ray's message limit


def task(name: str, prompt: str) -> dict[str, Any]:
    return {
        "name": name, "description": "A task of the big catalogue.", "model": "fake",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                          "additionalProperties": False},
        "prompt": prompt,
    }


def bulk_item(i: int) -> VersionInput:
    name = f"bulk-{i:04d}"
    # Distinct text per task (a hash chain), so no two definitions are alike.
    filler = "".join(hashlib.sha256(f"{name}-{j}".encode()).hexdigest() for j in range(PROMPT_BYTES // 64))
    defn = TaskDefinition.model_validate(task(name, f"{name}: {filler} {{{{ text }}}}"))
    return VersionInput(name=name, definition=canonical(defn), content_hash=content_hash(defn),
                        source=f"# {name}: loaded through the TaskStore by the test\n")


def catalogue_app(upstream_base_url: str, state: Any, port: int) -> dict[str, Any]:
    tasks_dir = state / "catalogue-tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "seeded.yaml").write_text(yaml.safe_dump(task("seeded", "seeded: {{ text }}")))
    zero = {"ray_actor_options": {"num_cpus": 0}}
    return {
        "name": APP,
        "route_prefix": "/catalogue",
        "import_path": "deployments.app:build_app",
        "runtime_env": {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1"}},
        "args": {
            "gateway": {"listen_host": "127.0.0.1", "listen_port": port},
            "tasks": {"definitions_dir": str(tasks_dir), "state_dir": str(state / "catalogue-db"),
                      "catalogue_poll_s": POLL_S, "max_definition_bytes": 64 * 1024},
            "models": [m for m in upstream_models(upstream_base_url) if m["name"] == "fake"],
        },
        "deployments": [
            {"name": "Gateway", "num_replicas": 2, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskRunner", "num_replicas": 1, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskStore", **zero}, {"name": "BatchService", **zero}, {"name": "RateLimiter", **zero},
        ],
    }


class Catalogue:
    def __init__(self, app: ServeApp, port: int) -> None:
        from ray import serve

        self.app = app
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.store = serve.get_deployment_handle("TaskStore", app_name=APP)
        self.gateway = serve.get_deployment_handle("Gateway", app_name=APP)
        self.runner = serve.get_deployment_handle("TaskRunner", app_name=APP)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # A new connection every time: SO_REUSEPORT spreads connections over both Gateway replicas.
        return httpx.request(method, f"{self.base_url}{path}", timeout=120, **kwargs)

    def push(self, **files: str) -> httpx.Response:
        return self.call("POST", "/tasks/push", json={"files": [{"file": f"{n}.yaml", "source": s}
                                                                for n, s in files.items()]})

    def statuses(self, handle: Any, replicas: int, tries: int = 40) -> dict[str, Any]:
        """The catalogue status of every replica behind ``handle`` (asked until ``replicas`` answered)."""
        seen: dict[str, Any] = {}
        for _ in range(tries):
            try:
                replica, status = handle.catalogue_status.remote().result(timeout_s=60)
            except Exception:  # a replica just killed may still be chosen once: ask again
                continue
            seen[replica] = status
            if len(seen) >= replicas:
                break
        return seen


@pytest.fixture(scope="module")
def catalogue(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalogue]:
    port = free_port()
    application = catalogue_app(serve_app.upstream.base_url, tmp_path_factory.mktemp("cat"), port)
    with beside(serve_app, application, f"http://127.0.0.1:{port}/v1/tasks"):
        yield Catalogue(serve_app, port)


def gateway_actors(app: ServeApp) -> list[Any]:
    from ray.util.state import list_actors

    return list(list_actors(address=app.dashboard, limit=1000, filters=[
        ("class_name", "=", f"ServeReplica:{APP}:Gateway"), ("state", "=", "ALIVE")]))


def test_anchors_and_oversized_definitions_are_400s_naming_the_file_and_normal_pushes_apply(
        catalogue: Catalogue) -> None:
    aliased = yaml.safe_dump(task("aliased", "{{ text }}")).replace("input_schema:", "input_schema: &schema")
    aliased += "examples: *schema\n"
    refused = catalogue.push(aliased=aliased)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "files" and "aliased.yaml:" in error["message"]
    assert "anchors and aliases" in error["message"]

    oversized = yaml.safe_dump(task("oversized", "x" * 70_000 + " {{ text }}"))  # 70 kB > 64 KiB, < the body limit
    refused = catalogue.push(oversized=oversized)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "files" and "oversized.yaml: the stored definition would be" in error["message"]
    assert "tasks.max_definition_bytes" in error["message"]
    for name in ("aliased", "oversized"):
        assert catalogue.call("GET", f"/tasks/{name}/versions").status_code == 404

    marker = f"normal-{time.monotonic_ns()}"
    pushed = catalogue.push(normal=yaml.safe_dump(task("normal", f"{marker}: " + "y" * 60_000 + " {{ text }}")))
    assert pushed.status_code == 200, pushed.text
    version = pushed.json()["data"][0]["version"]

    def everywhere() -> bool:  # a dozen renders in a row, each on a new connection (either replica)
        for _ in range(12):
            body = catalogue.call("POST", "/tasks/normal/render", json={"input": {"text": "hi"}}).json()
            if body.get("version") != version or not body["messages"][0]["content"].startswith(marker):
                return False
        return True

    wait_for(everywhere, BOUND_S, interval_s=0.1, message="every Gateway replica to serve the normal push")


def test_two_thousand_tasks_over_50_mb_reach_every_replica_and_a_new_one(catalogue: Catalogue) -> None:
    started = time.monotonic()
    items = [bulk_item(i) for i in range(TASKS)]
    total = sum(len(i.definition.encode()) for i in items)
    assert total > 50_000_000
    for start in range(0, TASKS, BATCH):
        pushed = catalogue.store.push_tasks.remote(items[start:start + BATCH], "admin").result(timeout_s=120)
        assert [changed for _, _, changed in pushed] == [True] * len(items[start:start + BATCH])
    pushed_at = time.monotonic()
    version = catalogue.store.task_changes.remote(None, None, "").result(timeout_s=60).version
    expected = {i.name: i.content_hash for i in items}

    def caught_up(handle: Any, replicas: int) -> bool:
        statuses = catalogue.statuses(handle, replicas)
        return len(statuses) == replicas and all(
            s.version is not None and s.version >= version and s.tasks >= TASKS and s.state == "current"
            for s in statuses.values())

    wait_for(lambda: caught_up(catalogue.gateway, 2), 300, interval_s=0.5, message="both Gateways to load")
    wait_for(lambda: caught_up(catalogue.runner, 1), 300, interval_s=0.5, message="the TaskRunner to load")
    loaded_at = time.monotonic()
    print(f"{total / 1e6:.1f} MB in {TASKS} tasks: pushed in {pushed_at - started:.1f}s, on every replica "
          f"{loaded_at - pushed_at:.1f}s later")

    def listed() -> dict[str, str]:
        response = catalogue.call("GET", "/tasks")
        assert response.status_code == 200, response.text
        return {t["name"]: t["content_hash"] for t in response.json()["data"] if t["name"].startswith("bulk-")}

    for _ in range(6):  # new connections: both replicas answer some of them
        assert listed() == expected
    rendered = catalogue.call("POST", "/tasks/bulk-1999/render", json={"input": {"text": "hi"}}).json()
    assert rendered["messages"][0]["content"].startswith("bulk-1999: ")

    # A replica started afterwards: kill one Gateway; Serve starts another, which pages everything in.
    import ray

    old = gateway_actors(catalogue.app)
    assert len(old) == 2
    before = set(catalogue.statuses(catalogue.gateway, 2))
    ray.kill(ray.get_actor(old[0].name, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    wait_for(lambda: {a.actor_id for a in gateway_actors(catalogue.app)} - {a.actor_id for a in old}, 120,
             interval_s=0.5, message="a new Gateway replica")

    def new_replica_loaded() -> bool:
        statuses = catalogue.statuses(catalogue.gateway, 2)
        fresh = {r: s for r, s in statuses.items() if r not in before}
        return bool(fresh) and all(s.version is not None and s.version >= version and s.tasks >= TASKS
                                   for s in fresh.values())

    wait_for(new_replica_loaded, 300, interval_s=0.5, message="the new Gateway replica to load every task")
    (fresh,) = [s for r, s in catalogue.statuses(catalogue.gateway, 2).items() if r not in before]
    print(f"a Gateway replica started afterwards held all {TASKS} tasks {time.monotonic() - killed_at:.1f}s "
          f"after the old one was killed; its first load took {fresh.first_load_s:.2f}s")
    for _ in range(6):
        assert listed() == expected
