"""Prompt owners ship without the web team (issue 14), on a running cluster.

A third application of the session's cluster, deployed for this module only: authentication on,
two Gateway replicas and two TaskRunner replicas (one run each at a time), the fake upstream.
Pushes and rollbacks reach every replica within a bounded time, new runs record the new version,
a run queued before a push completes with the version it was submitted with, and the ``prompts``
scope may manage tasks but not keys while a tenant key may do neither. ``promptfleet tasks test``
runs examples against it (and, once, against the embedded model of the main application).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster import cli
from tests.fixtures import ADMIN_KEY, REPO, ServeApp, beside, free_port, upstream_models
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

APP = "promptfleet-prompts"
POLL_S = 0.5
BOUND_S = 15.0  # a push must reach every replica within this (catalogue_poll_s is 0.5 s; the machine is shared)


def greet(marker: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "greet",
        "description": "Label a greeting (the template carries a marker the fake upstream records).",
        "model": "fake",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
                          "required": ["label"], "additionalProperties": False},
        "prompt": f"{marker}: {{{{ text }}}}",
        **extra,
    }


def owners_app(upstream_base_url: str, state: Path, port: int) -> dict[str, Any]:
    tasks_dir = state / "owners-tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "greet.yaml").write_text(yaml.safe_dump(greet("deployed-v1")))
    zero = {"ray_actor_options": {"num_cpus": 0}}
    return {
        "name": APP,
        "route_prefix": "/prompts",
        "import_path": "deployments.app:build_app",
        "runtime_env": {"env_vars": {"PROMPTFLEET_UPSTREAM_HOSTS": "127.0.0.1", "PROMPTFLEET_ADMIN_KEY": ADMIN_KEY}},
        "args": {
            "gateway": {"listen_host": "127.0.0.1", "listen_port": port},
            "auth": {"enabled": True, "cache_ttl_s": 1},
            "tasks": {"definitions_dir": str(tasks_dir), "state_dir": str(state / "owners-db"), "lease_s": 3,
                      "runner_concurrency": 1, "catalogue_poll_s": POLL_S},
            "models": [m for m in upstream_models(upstream_base_url) if m["name"] == "fake"],
        },
        "deployments": [
            {"name": "Gateway", "num_replicas": 2, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskRunner", "num_replicas": 2, "max_ongoing_requests": 1000, **zero},
            {"name": "TaskStore", **zero}, {"name": "BatchService", **zero}, {"name": "RateLimiter", **zero},
        ],
    }


class Owners:
    def __init__(self, app: ServeApp, port: int) -> None:
        self.app = app
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def call(self, method: str, path: str, key: str = ADMIN_KEY, **kwargs: Any) -> httpx.Response:
        # A new connection every time: SO_REUSEPORT spreads connections over both Gateway replicas.
        return httpx.request(method, f"{self.base_url}{path}", headers={"Authorization": f"Bearer {key}"},
                             timeout=60, **kwargs)

    def key(self, scope: str) -> str:
        return str(self.new_key(scope)["key"])

    def new_key(self, scope: str) -> dict[str, Any]:
        response = self.call("POST", "/admin/keys", json={"name": f"{scope}-key", "scope": scope})
        assert response.status_code == 201, response.text
        assert response.json()["scope"] == scope
        return dict(response.json())

    def push(self, key: str = ADMIN_KEY, **files: dict[str, Any] | str) -> httpx.Response:
        body = [{"file": f"{name}.yaml", "source": d if isinstance(d, str) else yaml.safe_dump(d)}
                for name, d in files.items()]
        return self.call("POST", "/tasks/push", key, json={"files": body})

    def run(self, text: str) -> dict[str, Any]:
        response = self.call("POST", "/tasks/greet/run", json={"input": {"text": text}})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def versions_seen(self, marker: str, version: int, count: int = 12) -> bool:
        """``count`` runs in a row, each on a new connection, ran ``version`` with its template."""
        for i in range(count):
            text = f"probe-{time.monotonic_ns()}-{i}"
            result = self.run(text)
            if result["task_version"] != version or f"{marker}: {text}" not in self.app.upstream.stats()["prompts"]:
                return False
        return True


@pytest.fixture(scope="module")
def owners(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owners]:
    port = free_port()
    application = owners_app(serve_app.upstream.base_url, tmp_path_factory.mktemp("owners"), port)
    # /v1/tasks needs the admin key here (authentication is on): /healthz says the listener is up.
    with beside(serve_app, application, f"http://127.0.0.1:{port}/healthz"):
        owners = Owners(serve_app, port)
        wait_for(lambda: owners.call("GET", "/tasks").status_code == 200, 60, interval_s=0.2,
                 message="the owners app to answer")
        yield owners


def test_two_gateways_and_two_runners(owners: Owners) -> None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(owners.app.dashboard).get_serve_details()
    deployments = details["applications"][APP]["deployments"]
    for name in ("Gateway", "TaskRunner"):
        running = [r for r in deployments[name]["replicas"] if r["state"] == "RUNNING"]
        assert len(running) == 2, (name, deployments[name]["replicas"])


def test_a_new_key_works_on_its_first_request_whichever_gateway_takes_it(owners: Owners) -> None:
    """Create a key and use it at once, twenty times; each call on a new connection, so both replicas
    see keys made through the other moments before (a replica's index refreshed just before the create
    used to answer 401 until its next recheck)."""
    for i in range(20):
        key = owners.key("tenant")
        response = owners.call("GET", "/models", key)
        assert response.status_code == 200, (i, response.text)
    assert owners.call("GET", "/models", "pf-" + "b" * 40).status_code == 401  # and a made-up key is not let in


def test_push_reaches_every_replica_and_queued_runs_keep_their_version(owners: Owners) -> None:
    upstream = owners.app.upstream
    upstream.reset()
    # The deploy seeded version 1 (or a push of an earlier test left a later one active: start from there).
    start = owners.call("GET", "/tasks").json()["data"][0]
    base = start["version"]
    pushed = owners.push(greet=greet("first")).json()["data"][0]
    assert pushed == {"name": "greet", "version": base + 1, "changed": True}
    wait_for(lambda: owners.versions_seen("first", base + 1), BOUND_S, interval_s=0.1,
             message="every replica to run the first push")

    # Both runner slots busy with slow calls, then a run queued behind them, pinned to base + 1.
    upstream.configure("slow", delay_s=6, fail_first_n=2)
    blockers = [owners.call("POST", "/tasks/greet/submit", json={"input": {"text": f"block-{i}"}}).json()
                for i in range(2)]
    wait_for(lambda: upstream.stats()["in_flight"] == 2, 30, message="both runners busy")
    queued = owners.call("POST", "/tasks/greet/submit", json={"input": {"text": "queued-before-push"}}).json()
    assert queued["status"] == "queued" and queued["task_version"] == base + 1

    # Push a changed template: within the bound every Gateway hands out the new version, and every run
    # renders the new template.
    pushed_at, pushed_wall = time.monotonic(), time.time()
    second = owners.push(greet=greet("second")).json()["data"][0]
    assert second["version"] == base + 2 and second["changed"]
    wait_for(lambda: owners.versions_seen("second", base + 2), BOUND_S, interval_s=0.1,
             message="every replica to run the second push")
    print(f"push visible on every replica after {time.monotonic() - pushed_at:.2f}s")
    listed = owners.call("GET", "/tasks").json()["data"][0]
    assert (listed["name"], listed["version"]) == ("greet", base + 2) and len(listed["content_hash"]) == 64

    # The run submitted before the push ran with the version recorded on it, and its template.
    done = owners.call("GET", f"/runs/{queued['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded", done
    assert done["started_at"] > pushed_wall  # it started after the push: the pin, not timing, chose v1
    assert done["task_version"] == base + 1 and done["result"]["task_version"] == base + 1
    assert "first: queued-before-push" in upstream.stats()["prompts"]
    assert "second: queued-before-push" not in upstream.stats()["prompts"]
    for blocker in blockers:
        assert owners.call("GET", f"/runs/{blocker['id']}", params={"wait": 30}).json()["status"] == "succeeded"
    new = owners.call("POST", "/tasks/greet/submit", json={"input": {"text": "after"}}).json()
    assert new["task_version"] == base + 2

    # Pushing the same content again stores nothing.
    again = owners.push(greet=greet("second")).json()["data"][0]
    assert again == {"name": "greet", "version": base + 2, "changed": False}


def test_rollback_and_history(owners: Owners) -> None:
    prompts_key = owners.key("prompts")
    base = owners.call("GET", "/tasks").json()["data"][0]["version"]
    assert owners.push(prompts_key, greet=greet("to-roll-back")).status_code == 200
    rolled = owners.call("POST", "/tasks/greet/rollback", prompts_key, json={"version": base})
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["version"] == base and rolled.json()["active"]
    old_marker = yaml.safe_load(owners.call("GET", f"/tasks/greet/versions/{base}").json()["source"])["prompt"]
    wait_for(lambda: owners.versions_seen(old_marker.split(":")[0], base), BOUND_S, interval_s=0.1,
             message="every replica to run the rolled-back version")

    history = owners.call("GET", "/tasks/greet/versions", prompts_key).json()
    assert [v["version"] for v in history["data"]] == list(range(base + 1, 0, -1))
    assert [v["active"] for v in history["data"]].count(True) == 1 and history["data"][1]["active"]
    assert history["data"][-1]["author"] == "deploy"
    key_id = history["data"][0]["author"]
    assert key_id.startswith("key_")
    assert [(a["action"], a["version"], a["actor"]) for a in history["activations"][:2]] == [
        ("rollback", base, key_id), ("push", base + 1, key_id)]
    assert history["activations"][-1]["action"] == "deploy"

    conflict = owners.call("POST", "/tasks/greet/rollback", prompts_key, json={"version": base})
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "version"
    missing = owners.call("POST", "/tasks/greet/rollback", prompts_key, json={"version": 999})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "version"


def test_templates_that_reach_for_internals_are_refused_and_ones_that_raise_fail_clearly(owners: Owners) -> None:
    """Found by a hostile walkthrough: `{{ text.__class__ }}` passed check and push and then every run
    was a 500; `{{ 1/0 }}` too."""
    prompts_key = owners.key("prompts")
    sneaky = greet("x", name="sneaky", prompt="{{ text.__class__.__mro__ }}")
    checked = owners.call("POST", "/tasks/check", prompts_key, json={"files": [
        {"file": "sneaky.yaml", "source": yaml.safe_dump(sneaky)}]}).json()
    assert not checked["ok"]
    assert [(p["file"], p["field"]) for p in checked["problems"]] == [("sneaky.yaml", "prompt")]
    assert "is not allowed" in checked["problems"][0]["message"]
    assert owners.push(prompts_key, sneaky=sneaky).status_code == 400

    divides = greet("x", name="divides", prompt="{{ 1 / 0 if text == 'zero' else text }}")
    assert owners.push(prompts_key, divides=divides).status_code == 200

    def known_everywhere() -> bool:  # a dozen renders in a row, each on a new connection (either replica)
        return all(owners.call("POST", "/tasks/divides/render", prompts_key,
                               json={"input": {"text": "zero"}}).status_code == 422 for _ in range(12))

    wait_for(known_everywhere, BOUND_S, interval_s=0.2, message="every replica to know the pushed task")
    assert owners.call("POST", "/tasks/divides/run", json={"input": {"text": "fine"}}).status_code == 200
    error = owners.call("POST", "/tasks/divides/run", json={"input": {"text": "zero"}}).json()["error"]
    assert error["code"] == "template_error" and "ZeroDivisionError" in error["message"]
    rendered = owners.call("POST", "/tasks/divides/render", prompts_key, json={"input": {"text": "zero"}})
    assert rendered.status_code == 422 and rendered.json()["error"]["code"] == "template_error"
    queued = owners.call("POST", "/tasks/divides/submit", json={"input": {"text": "zero"}}).json()
    finished = owners.call("GET", f"/runs/{queued['id']}", params={"wait": 30}).json()
    assert finished["status"] == "failed" and finished["error"]["code"] == "template_error", finished


def test_a_push_that_fails_check_is_refused_whole(owners: Owners) -> None:
    before = owners.call("GET", "/tasks/greet/versions").json()["data"][0]["version"]
    broken = greet("x", name="broken", model="no-such-model")
    response = owners.push(greet=greet("never-published"), broken=broken)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "files" and "broken.yaml:" in error["message"] and "model" in error["message"]
    assert "no-such-model" in error["message"]
    assert owners.call("GET", "/tasks/greet/versions").json()["data"][0]["version"] == before
    assert owners.call("GET", "/tasks/broken/versions").status_code == 404

    checked = owners.call("POST", "/tasks/check", json={"files": [
        {"file": "broken.yaml", "source": yaml.safe_dump(broken)},
        {"file": "bad.yaml", "source": "name: bad\nprompt: [unclosed\n"}]}).json()
    assert not checked["ok"]
    assert {(p["file"], p["field"]) for p in checked["problems"]} >= {("broken.yaml", "model"), ("bad.yaml", "")}
    assert all(p["line"] for p in checked["problems"])


def test_prompts_key_manages_tasks_but_not_keys_and_tenants_neither(owners: Owners) -> None:
    prompts_key, tenant_key = owners.key("prompts"), owners.key("tenant")
    assert owners.push(prompts_key, greet=greet("by-prompts-key")).status_code == 200
    assert owners.call("POST", "/admin/keys", prompts_key, json={"name": "nope"}).status_code == 403
    assert owners.call("GET", "/admin/keys", prompts_key).status_code == 403

    denied = owners.push(tenant_key, greet=greet("by-tenant"))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    for method, path, body in [
        ("POST", "/tasks/check", {"files": [{"file": "greet.yaml", "source": yaml.safe_dump(greet("t"))}]}),
        ("POST", "/tasks/greet/rollback", {"version": 1}),
        ("GET", "/tasks/greet/versions", None),
        ("POST", "/tasks/greet/render", {"input": {"text": "hi"}}),
        ("POST", "/tasks/greet/run", {"input": {"text": "hi"}, "model": "fake"}),
        ("POST", "/admin/keys", {"name": "nope"}),
    ]:
        response = owners.call(method, path, tenant_key, **({"json": body} if body else {}))
        assert response.status_code == 403, (path, response.text)
    submitted = owners.call("POST", "/tasks/greet/submit", prompts_key, json={"input": {"text": "hi"}, "model": "fake"})
    assert submitted.status_code == 400 and submitted.json()["error"]["param"] == "model"  # /run only
    # Both still use tasks the normal way.
    for key in (prompts_key, tenant_key):
        assert owners.call("POST", "/tasks/greet/run", key, json={"input": {"text": "hi"}}).status_code == 200

    def rendered() -> bool:  # the other Gateway replica follows within catalogue_poll_s
        body = owners.call("POST", "/tasks/greet/render", prompts_key, json={"input": {"text": "hi"}}).json()
        return bool(body["messages"] == [{"role": "user", "content": "by-prompts-key: hi"}])

    wait_for(rendered, BOUND_S, interval_s=0.1, message="render of the pushed version")


HOSTILE_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer", "minimum": 1},
                                                  "items": {"type": "array", "items": {"type": "string"}}},
                  "required": ["text"]}
# Both render trivially on the push check's sample input (n = 2, one item) and explode on a large one.
SLOW = "{% for a in items %}{% for b in items %}{% if a == b %}{% endif %}{% endfor %}{% endfor %}{{ text }}"
HUGE = "{{ text * n }}"


def median_s(call: Callable[[], object], times: int) -> float:
    took = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def test_a_hostile_template_cannot_stall_other_tenants(owners: Owners) -> None:
    """Issue 19: one pushed template and one large input blocked the API for 16 s. Now, while a hostile
    run (TaskRunner) and renders (Gateway) run out their budgets back to back, another tenant's GET /v1/models and
    chat answer at their usual speed (medians within a generous factor of a baseline taken in this test),
    the hostile calls get a 422 template_error naming the limit, and ordinary templates still render."""
    prompts_key, tenant, attacker = owners.key("prompts"), owners.key("tenant"), owners.key("tenant")
    slow = greet("x", name="slowloop", input_schema=HOSTILE_SCHEMA, prompt=SLOW)
    huge = greet("x", name="huge", input_schema=HOSTILE_SCHEMA, prompt=HUGE)
    assert owners.push(prompts_key, slowloop=slow, huge=huge).status_code == 200
    items = [f"item-{i}" for i in range(20_000)]  # 4e8 comparisons: minutes of CPU without a budget
    big = {"input": {"text": "hi", "items": items}}

    def known_everywhere() -> bool:
        return all(owners.call("POST", "/tasks/huge/render", prompts_key,
                               json={"input": {"text": "ab", "n": 2}}).status_code == 200 for _ in range(8))

    wait_for(known_everywhere, BOUND_S, interval_s=0.2, message="every replica to know the pushed tasks")

    client = openai.OpenAI(base_url=owners.base_url, api_key=tenant, max_retries=0, timeout=60)
    try:
        def models() -> None:
            assert any(m.id == "fake" for m in client.models.list().data)

        def chat() -> None:
            reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}])
            assert reply.choices[0].message.content

        for warm in (models, chat):
            warm()
        baseline = {"models": median_s(models, 15), "chat": median_s(chat, 15)}

        stop = threading.Event()
        outcomes: list[httpx.Response] = []

        def hostile(path: str, key: str, body: dict[str, Any]) -> None:
            while not stop.is_set():
                outcomes.append(owners.call("POST", path, key, json=body))

        attackers = [
            threading.Thread(target=hostile, args=("/tasks/slowloop/run", attacker, big)),
            threading.Thread(target=hostile, args=("/tasks/slowloop/render", prompts_key, big)),
            threading.Thread(target=hostile, args=("/tasks/huge/render", prompts_key,
                                                   {"input": {"text": "xy" * 1000, "n": 10**9}})),
        ]
        for thread in attackers:
            thread.start()
        try:
            time.sleep(0.5)  # the hostile renders are under way
            under_attack = {"models": median_s(models, 15), "chat": median_s(chat, 15)}
            ordinary = owners.call("POST", "/tasks/greet/run", tenant, json={"input": {"text": "fine"}})
        finally:
            stop.set()
            for thread in attackers:
                thread.join(timeout=60)
    finally:
        client.close()

    print(f"medians (s) before {baseline}, while hostile templates render {under_attack}; "
          f"{len(outcomes)} hostile calls")  # shown with -s: the numbers of docs/_incoming/templates.md
    for name, usual in baseline.items():
        # Generous: two cores are shared with the hostile renders and the rest of the machine, and the fake
        # upstream shares this process with the attackers (measured: models 1.4 -> 1.9 ms, chat 6.0 -> 52 ms).
        # Rendered on the event loop, each of these waited for whole renders (1 s here, 16 s in the issue).
        assert under_attack[name] <= 20 * usual, (name, usual, under_attack[name])
    assert ordinary.status_code == 200, ordinary.text
    assert len(outcomes) >= 3
    for response in outcomes:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "template_error", error
        assert "tasks.render_timeout_s" in error["message"] or "tasks.render_max_chars" in error["message"], error
    assert any("tasks.render_max_chars" in r.json()["error"]["message"] for r in outcomes)


def run_cli(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


def test_cli_push_test_history_rollback(owners: Owners, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = owners.new_key("prompts")
    env = {"PROMPTFLEET_API_KEY": created["key"]}
    examples = [
        {"name": "labels-a", "input": {"text": "hello"}, "expect": {"equals": {"label": "a"}}},
        {"name": "schema", "input": {"text": "hello"},
         "expect": {"schema": {"properties": {"label": {"const": "a"}}}, "matches": {"label": "^[ab]$"}}},
        {"name": "judged", "input": {"text": "hello"},
         "expect": {"judge": {"model": "fake", "prompt": "Is {{ output }} a fine label for {{ input.text }}?"}}},
    ]
    (tmp_path / "greet.yaml").write_text(yaml.safe_dump(greet("cli", examples=examples)))
    code, out = run_cli(["tasks", "--url", owners.base_url, "push", str(tmp_path)], env, monkeypatch)
    assert code == 0 and "greet: version" in out and "now active" in out

    code, out = run_cli(["tasks", "--url", owners.base_url, "test", "--dir", str(tmp_path)], env, monkeypatch)
    assert code == 0, out
    assert out.count(" pass ") == 3 and "greet: 3/3 passed (100%)" in out and "total: 3/3 passed" in out

    failing = [*examples, {"name": "labels-b", "input": {"text": "hello"}, "expect": {"equals": {"label": "b"}}}]
    (tmp_path / "greet.yaml").write_text(yaml.safe_dump(greet("cli", examples=failing)))
    code, out = run_cli(["tasks", "--url", owners.base_url, "test", "greet", "--dir", str(tmp_path)], env,
                        monkeypatch)
    assert code == 1
    assert "FAIL" in out and 'label: "a" != "b"' in out and "total: 3/4 passed (75%)" in out

    code, out = run_cli(["tasks", "--url", owners.base_url, "history", "greet"], env, monkeypatch)
    assert code == 0 and f"push     by {created['id']}" in out
    version = int(out.split("\n")[1].split()[0].removeprefix("v"))
    code, out = run_cli(["tasks", "--url", owners.base_url, "rollback", "greet", str(version)], env, monkeypatch)
    assert code == 0 and f"version {version} is active again" in out

    # check --cluster: the models are the running cluster's (only `fake` here).
    code, out = run_cli(["tasks", "--url", owners.base_url, "check", "--cluster", str(tmp_path)], env, monkeypatch)
    assert code == 0 and "1/1 task files ok" in out
    (tmp_path / "greet.yaml").write_text(yaml.safe_dump(greet("cli", model="smollm2")))
    code, out = run_cli(["tasks", "--url", owners.base_url, "check", "--cluster", str(tmp_path)], env, monkeypatch)
    assert code == 1 and "model: unknown model 'smollm2' (configured: fake)" in out

    tenant = {"PROMPTFLEET_API_KEY": owners.key("tenant")}
    code, _ = run_cli(["tasks", "--url", owners.base_url, "push", str(tmp_path)], tenant, monkeypatch)
    assert code == 1


def test_cli_test_on_the_embedded_model(app: ServeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoke run of the shipped examples on the main application's embedded model (auth off)."""
    monkeypatch.delenv("PROMPTFLEET_API_KEY", raising=False)
    monkeypatch.delenv("PROMPTFLEET_ADMIN_KEY", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["tasks", "--url", app.base_url, "test", "classify_ticket",
                         "--dir", str(REPO / "configs" / "tasks"), "--model", "smollm2"])
    assert "classify_ticket" in out.getvalue() and "smollm2" in out.getvalue(), out.getvalue()
    assert code == 0, out.getvalue()
