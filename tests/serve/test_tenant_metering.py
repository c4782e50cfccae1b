"""Issue 10's findings, reproduced against the application with API keys on (tests/fixtures.py: auth_app):
every path that calls a model is metered to its key, bad integers are 400s, upstream signals are capped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import openai
import pytest

from jobs import batch
from tests.fixtures import ADMIN_KEY, ServeApp
from tests.jobs.test_batch_cluster import job_logs
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

HELLO = [{"role": "user", "content": "hello"}]
AUTH_APP = "promptfleet-auth"
T = TypeVar("T")


def new_key(app: ServeApp, **limits: Any) -> dict[str, Any]:
    response = httpx.post(f"{app.auth_base_url}/admin/keys", json={"name": "tenant", **limits},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert response.status_code == 201, response.text
    return dict(response.json())


def client(app: ServeApp, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.auth_base_url, api_key=key, max_retries=0, timeout=60)


def chat(app: ServeApp, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{app.auth_base_url}/chat/completions", json={"model": "fake", "messages": HELLO, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def usage(app: ServeApp, key: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{app.auth_base_url}/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def eventually(check: Callable[[], T | None], timeout: float = 30, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy (usage reaches the store about once a second)."""
    return cast(T, wait_for(check, timeout_s=timeout, interval_s=0.3, message=what))


def requests_of(app: ServeApp, key: str, model: str = "fake") -> int:
    return sum(row["requests"] for row in usage(app, key) if row["model"] == model)


def spend_budget(app: ServeApp, key: str) -> None:
    """Chat until the key's budget is spent: the Gateway answers 403 once the usage it knows covers it."""

    def spent() -> bool:
        response = chat(app, key, {})
        if response.status_code == 403:
            assert response.json()["error"]["code"] == "permission_denied"
            return True
        assert response.status_code == 200, response.text
        return False

    wait_for(spent, timeout_s=60, interval_s=0.3, message="the token budget spent (403)")


def chat_line(custom_id: str, text: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "fake", "messages": [{"role": "user", "content": text}], "max_tokens": 16}}


# -- budgets and usage on every path ------------------------------------------------------------


def test_a_spent_budget_refuses_chat_and_batches(app: ServeApp) -> None:
    key = new_key(app, token_budget=20)
    spend_budget(app, key["key"])
    with pytest.raises(openai.PermissionDeniedError):
        client(app, key["key"]).chat.completions.create(model="fake", messages=HELLO, stream=True)
    tenant = client(app, key["key"])
    uploaded = tenant.files.create(file=("in.jsonl", (json.dumps(chat_line("a", "x")) + "\n").encode()),
                                   purpose="batch")
    calls_before = app.upstream.stats()["calls"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        tenant.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "budget" in str(refused.value.message)
    assert tenant.batches.list().data == [] and app.upstream.stats()["calls"] == calls_before
    # Another tenant is not affected.
    assert chat(app, new_key(app)["key"], {}).status_code == 200


def job_agent_ready(app: ServeApp) -> None:
    """Wait until the cluster runs jobs: on a loaded machine the dashboard agent comes up late, and the
    Batches API gives up on a batch whose job it could not submit a few times ("No available agent")."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(app.dashboard)
    probe = eventually(lambda: _try_submit(jobs), timeout=120, what="the job agent")
    eventually(lambda: str(jobs.get_job_status(probe).value) in ("SUCCEEDED", "FAILED", "STOPPED") or None,
               timeout=120, what="the probe job")


def _try_submit(jobs: Any) -> str | None:
    try:
        return str(jobs.submit_job(entrypoint="true"))
    except RuntimeError:
        return None


def test_batch_lines_are_billed_to_the_batch_owner(app: ServeApp) -> None:
    job_agent_ready(app)
    key = new_key(app)
    tenant = client(app, key["key"])
    lines = "".join(json.dumps(chat_line(f"l{i}", f"line {i}")) + "\n" for i in range(3))
    uploaded = tenant.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    created = tenant.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    try:
        done = eventually(lambda: (b := tenant.batches.retrieve(created.id)).status in ("completed", "failed") and b,
                          timeout=200, what="the batch to end")
    except AssertionError:
        raise AssertionError(job_logs(app, created.id)) from None
    assert done.status == "completed", job_logs(app, created.id)
    assert done.request_counts is not None and done.request_counts.completed == 3
    rows = eventually(lambda: [r for r in usage(app, key["key"]) if r["requests"] >= 3], what="batch usage")
    assert rows[0]["model"] == "fake" and rows[0]["total_tokens"] > 0


def test_a_batch_whose_key_runs_out_fails_its_remaining_lines(app: ServeApp, tmp_path: Path) -> None:
    """The `ray job submit -- python -m jobs.batch --key-id …` path (run in-process here)."""
    key = new_key(app, token_budget=25)  # the fake upstream reports about 10 tokens per call
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(chat_line(f"l{i}", f"line {i}")) + "\n" for i in range(12)))
    code = batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--app", AUTH_APP, "--key-id", key["id"], "--concurrency", "1", "--progress-every", "5"])
    assert code == 0
    out = [json.loads(line)["response"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    statuses = [r["status_code"] for r in out]
    assert len(out) == 12 and 2 <= statuses.count(200) <= 4 and statuses.count(403) == 12 - statuses.count(200)
    refused = next(r for r in out if r["status_code"] == 403)["body"]["error"]
    assert refused["code"] == "permission_denied" and "budget" in refused["message"]
    assert eventually(lambda: requests_of(app, key["key"]) == statuses.count(200) or None, what="usage")


def test_batch_job_billed_to_an_unknown_key_fails_at_once(app: ServeApp, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps(chat_line("a", "x")) + "\n")
    calls_before = app.upstream.stats()["calls"]
    assert batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--app", AUTH_APP, "--key-id", "key_0000000000000000"]) == batch.EXIT_SETUP
    assert not (tmp_path / "out.jsonl").exists() and app.upstream.stats()["calls"] == calls_before


def test_streams_are_billed_without_include_usage_and_when_abandoned(app: ServeApp) -> None:
    full, abandoned = new_key(app), new_key(app)
    stream = client(app, full["key"]).chat.completions.create(model="fake", messages=HELLO, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)  # the client did not ask for usage
    row = eventually(lambda: next(iter(usage(app, full["key"])), None), what="the stream's usage")
    assert row["requests"] == 1 and row["completion_tokens"] > 0 and row["prompt_tokens"] > 0

    # Two chunks (the role, then text), then the upstream goes silent; the client reads the text
    # and hangs up.
    app.upstream.configure(mode="stall_stream")
    headers = {"Authorization": f"Bearer {abandoned['key']}"}
    with httpx.stream("POST", f"{app.auth_base_url}/chat/completions", headers=headers, timeout=30,
                      json={"model": "fake", "messages": HELLO, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    row = eventually(lambda: next(iter(usage(app, abandoned["key"])), None), what="the abandoned stream's usage")
    assert row["requests"] == 1 and row["completion_tokens"] >= 1
    # The abandoned upstream stream was closed, not left hanging until its timeout.
    eventually(lambda: app.upstream.stats()["in_flight"] == 0 or None, timeout=15, what="the upstream to be let go")


# -- bounded integers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 1_000_000_000_000, "stream": True}, "max_tokens"),
        ({"max_tokens": int("9" * 400)}, "max_tokens"),
        ({"max_tokens": 16385}, "max_tokens"),  # above the model's max_output_tokens (16384)
        ({"max_completion_tokens": 16385, "stream": True}, "max_completion_tokens"),
        ({"seed": int("9" * 400)}, "seed"),
        ({"top_logprobs": 10**6}, "top_logprobs"),
        ({"n": 10**12}, "n"),
    ],
)
def test_out_of_range_integers_are_400_and_other_tenants_flow(app: ServeApp, body: dict[str, Any], field: str) -> None:
    attacker, other = new_key(app)["key"], new_key(app)["key"]
    response = chat(app, attacker, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    # Nothing was booked or broken: both tenants' next requests succeed.
    assert chat(app, other, {"max_tokens": 16}).status_code == 200
    assert chat(app, attacker, {"max_tokens": 16, "stream": True}).status_code == 200


def test_admin_key_limits_are_bounded(app: ServeApp) -> None:
    for field in ("rpm", "tpm", "token_budget"):
        response = httpx.post(f"{app.auth_base_url}/admin/keys", json={"name": "k", field: int("9" * 400)},
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == field


# -- capped upstream signals --------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [float("inf"), 1e9])
def test_an_upstream_retry_after_of_inf_or_huge_is_capped(app: ServeApp, retry_after: float) -> None:
    key = new_key(app)["key"]
    app.upstream.configure(mode="rate_limit", retry_after=retry_after, fail_first_n=1)
    response = httpx.post(f"{app.auth_base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "fake-capped", "messages": HELLO}, timeout=60)
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "2"  # the model's max_retry_after_s
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    # The model-wide pause it started is as short: the next calls succeed within seconds.
    reply = eventually(lambda: (r := httpx.post(
        f"{app.auth_base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-capped", "messages": HELLO}, timeout=60)).status_code == 200 and r,
        timeout=20, what="the capped pause to end")
    assert reply.json()["model"] == "fake-capped"
