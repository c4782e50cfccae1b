"""Embeddings and completions on the one path: keys, budgets, usage (keyless too), batches.

The auth app (keys on) serves ``fake``, which speaks every route; the main app (auth off) records
calls without a key under ``anonymous``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from jobs import batch
from tests.fixtures import ADMIN_KEY, ServeApp
from tests.jobs.test_batch_cluster import job_logs
from tests.serve.test_tenant_metering import client, eventually, job_agent_ready, new_key, spend_budget, usage

pytestmark = pytest.mark.serve


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def mixed_lines(embed_model: str) -> list[dict[str, Any]]:
    return [
        line("chat", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 8}),
        line("embed", "/v1/embeddings", {"model": embed_model, "input": ["one", "two"]}),
        line("embed-b64", "/v1/embeddings", {"model": "fake", "input": "three", "encoding_format": "base64"}),
        line("complete", "/v1/completions", {"model": "fake", "prompt": "four", "max_tokens": 5}),
    ]


def test_a_spent_budget_refuses_embeddings_and_completions(app: ServeApp) -> None:
    key = new_key(app, token_budget=20)
    spend_budget(app, key["key"])
    tenant = client(app, key["key"])
    calls = app.upstream.stats()["calls"]
    with pytest.raises(openai.PermissionDeniedError):
        tenant.embeddings.create(model="fake", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        tenant.completions.create(model="fake", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        tenant.completions.create(model="fake", prompt="x", stream=True)
    assert app.upstream.stats()["calls"] == calls
    # Another tenant's calls flow.
    other = client(app, new_key(app)["key"])
    assert len(other.embeddings.create(model="fake", input="x").data) == 1
    assert other.completions.create(model="fake", prompt="x").choices[0].text == "echo: x"


def test_embeddings_and_completions_are_billed_to_the_key(app: ServeApp) -> None:
    key = new_key(app)
    tenant = client(app, key["key"])
    tenant.embeddings.create(model="fake", input=["a b c", "d"])
    tenant.completions.create(model="fake", prompt="e f", max_tokens=4)
    list(tenant.completions.create(model="fake", prompt="g", stream=True))
    row = eventually(lambda: next((r for r in usage(app, key["key"]) if r["requests"] >= 3), None),
                     what="the usage of three calls")
    assert row["model"] == "fake" and row["requests"] == 3
    # 4 words embedded + 2 + 1 prompt words; the fake counts words as tokens.
    assert row["prompt_tokens"] == 7 and row["completion_tokens"] > 0


def anonymous_requests(app: ServeApp, model: str) -> int:
    rows = httpx.get(f"{app.base_url}/usage", params={"key_id": "anonymous", "limit": 1000}, timeout=30).json()["data"]
    return sum(r["requests"] for r in rows if r["model"] == model)


def test_calls_without_a_key_are_recorded_when_auth_is_off(app: ServeApp) -> None:
    before = anonymous_requests(app, "smollm2-embed")
    app.client().embeddings.create(model="smollm2-embed", input="keyless")
    eventually(lambda: anonymous_requests(app, "smollm2-embed") == before + 1 or None, what="keyless usage")
    chat_before = anonymous_requests(app, "smollm2")
    app.client().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    eventually(lambda: anonymous_requests(app, "smollm2") == chat_before + 1 or None, what="keyless chat usage")
    overview = httpx.get(f"{app.url}/console/", timeout=30).text
    assert 'data-model="smollm2-embed"' in overview and "No requests recorded today" not in overview


def test_a_mixed_batch_file_runs_through_jobs_batch(app: ServeApp, tmp_path: Path) -> None:
    """`ray job submit -- python -m jobs.batch` (in-process here) on the main app: chat, embeddings on the
    embedded model and the upstream, completions, and a line on a model without the capability."""
    lines = [*mixed_lines("smollm2-embed"),
             line("wrong", "/v1/embeddings", {"model": "smollm2", "input": "x"}),
             line("bad", "/v1/completions", {"model": "fake", "prompt": "x", "stream": True})]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    code = batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--errors", str(tmp_path / "errors.jsonl"), "--progress-every", "5"])
    assert code == 0
    out = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert out["chat"]["response"]["body"]["object"] == "chat.completion"
    embedded = out["embed"]["response"]["body"]
    assert embedded["model"] == "smollm2-embed" and len(embedded["data"]) == 2
    assert isinstance(out["embed-b64"]["response"]["body"]["data"][0]["embedding"], str)
    assert out["complete"]["response"]["body"]["choices"][0]["text"] == "echo: four"
    # Lines that failed go to --errors: one that ran (400 naming `model`), one that could not run.
    errors = {e["custom_id"]: e for e in map(json.loads, (tmp_path / "errors.jsonl").read_text().splitlines())}
    assert set(out) == {"chat", "embed", "embed-b64", "complete"} and set(errors) == {"wrong", "bad"}
    assert errors["wrong"]["response"]["status_code"] == 400
    assert errors["wrong"]["response"]["body"]["error"]["param"] == "model"
    assert errors["bad"]["error"]["param"] == "body"


def test_a_mixed_batch_through_the_batches_api_is_billed_to_its_key(app: ServeApp) -> None:
    job_agent_ready(app)
    key = new_key(app)
    tenant = client(app, key["key"])
    text = "".join(json.dumps(item) + "\n" for item in mixed_lines("fake"))
    uploaded = tenant.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    created = tenant.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    try:
        done = eventually(lambda: (b := tenant.batches.retrieve(created.id)).status in ("completed", "failed") and b,
                          timeout=200, what="the batch to end")
    except AssertionError:
        raise AssertionError(job_logs(app, created.id)) from None
    assert done.status == "completed" and done.request_counts is not None, job_logs(app, created.id)
    assert done.request_counts.completed == 4 and done.output_file_id is not None
    outputs = [json.loads(o) for o in tenant.files.content(done.output_file_id).text.splitlines()]
    assert {o["response"]["body"]["object"] for o in outputs} == {"chat.completion", "list", "text_completion"}
    assert eventually(lambda: [r for r in usage(app, key["key"]) if r["requests"] == 4] or None, what="batch usage")


def anonymous_usage(app: ServeApp, model: str) -> tuple[int, int]:
    """Requests and prompt tokens recorded today under `anonymous` for ``model``."""
    rows = httpx.get(f"{app.base_url}/usage", params={"key_id": "anonymous", "limit": 1000}, timeout=30).json()["data"]
    mine = [r for r in rows if r["model"] == model]
    return sum(r["requests"] for r in mine), sum(r["prompt_tokens"] for r in mine)


# 500 words: the fake upstream counts 504 prompt tokens for a message of it (a word a token, 4 a message),
# far above what the probes `settle` sends between tests.
WORDS = " ".join(["word"] * 500)


def keyless_lines(chat_model: str) -> str:
    lines = [line(f"c{i}", "/v1/chat/completions", {"model": chat_model, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": WORDS}]})
             for i in range(2)]
    lines.append(line("r", "/v1/responses", {"model": "fake-responses", "input": WORDS}))
    return "".join(json.dumps(item) + "\n" for item in lines)


def grew_by(app: ServeApp, model: str, before: tuple[int, int], requests: int) -> bool | None:
    """Whether `anonymous`' usage of ``model`` grew by at least ``requests`` lines of WORDS."""
    now = anonymous_usage(app, model)
    return (now[0] - before[0] >= requests and now[1] - before[1] >= requests * 504) or None


def test_keyless_batch_lines_are_recorded_when_auth_is_off(app: ServeApp, tmp_path: Path) -> None:
    """The main app has authentication off: a batch without a key is recorded under `anonymous`, as
    keyless HTTP calls are — run by hand (`ray job submit -- python -m jobs.batch`, in-process here) and
    through the Batches API (the BatchService's job). Its /v1/responses line is forwarded natively."""
    before = {m: anonymous_usage(app, m) for m in ("fake-retry", "fake-short", "fake-responses")}
    (tmp_path / "in.jsonl").write_text(keyless_lines("fake-retry"))
    code = batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--progress-every", "5"])
    assert code == 0
    out = [json.loads(o) for o in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["response"]["status_code"] for o in out] == [200, 200, 200]
    assert next(o for o in out if o["custom_id"] == "r")["response"]["body"]["id"].startswith("resp_fake")
    eventually(lambda: grew_by(app, "fake-retry", before["fake-retry"], 2), what="the job's chat usage")
    eventually(lambda: grew_by(app, "fake-responses", before["fake-responses"], 1), what="the job's responses usage")

    job_agent_ready(app)
    client = app.client()
    uploaded = client.files.create(file=("in.jsonl", keyless_lines("fake-short").encode()), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    done = eventually(lambda: (b := client.batches.retrieve(created.id)).status in ("completed", "failed") and b,
                      timeout=200, what="the batch to end")
    assert done.status == "completed" and done.request_counts is not None, job_logs(app, created.id)
    assert done.request_counts.completed == 3, job_logs(app, created.id)
    eventually(lambda: grew_by(app, "fake-short", before["fake-short"], 2), what="the batch's chat usage")
    eventually(lambda: grew_by(app, "fake-responses", before["fake-responses"], 2), what="the batch's responses")


def test_a_keyless_job_on_an_app_with_auth_on_is_the_operators_and_unrecorded(app: ServeApp,
                                                                              tmp_path: Path) -> None:
    """The other side: with authentication on, `ray job submit` without --key-id is the operator's own job
    (the cluster's credentials), and its lines are recorded for nobody — as the admin's HTTP calls."""
    lines = [line(f"c{i}", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
             for i in range(2)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    code = batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--app", "promptfleet-auth", "--progress-every", "5"])
    assert code == 0
    out = [json.loads(o) for o in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["response"]["status_code"] for o in out] == [200, 200]
    rows = httpx.get(f"{app.auth_base_url}/usage", params={"key_id": "anonymous"}, timeout=30,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert rows.status_code == 200 and rows.json()["data"] == []
