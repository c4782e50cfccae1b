"""Batches against the session's real cluster: jobs.batch in-process, through `ray job submit`, and
through the OpenAI Files + Batches API with the official client. The fake upstream counts calls."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from jobs import batch
from tests.fixtures import REPO, ServeApp, logged
from tests.waiting import wait_for

pytestmark = pytest.mark.serve


def chat(custom_id: str, text: str, model: str = "fake") -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16},
    }


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_batch(tmp: Path, *extra: str) -> int:
    return batch.main(["--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out.jsonl"),
                       "--progress-every", "2", *extra])


def test_thousand_lines_all_answered_by_custom_id(app: ServeApp, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"req-{i}", f"prompt {i}") for i in range(1000)])
    started = time.monotonic()
    assert run_batch(tmp_path, "--concurrency", "64") == 0
    elapsed = time.monotonic() - started
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert len(lines) == 1000
    by_id = {line["custom_id"]: line for line in lines}
    assert set(by_id) == {f"req-{i}" for i in range(1000)}
    for i in (0, 517, 999):
        response = by_id[f"req-{i}"]["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["message"]["content"] == f"echo: prompt {i}"
    assert app.upstream.stats()["calls"] == 1000
    print(f"1000 lines in {elapsed:.1f}s")


def test_bad_lines_get_error_lines_and_good_lines_run(app: ServeApp, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [
        chat("good-1", "one"),
        "{this is not json",
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fake"}},
        chat("unknown-model", "x", model="no-such-model"),
        chat("good-1", "duplicate"),
        {"custom_id": "task-1", "task": "label_fake", "input": {"text": "t"}},
        {"custom_id": "task-bad", "task": "label_fake", "input": {"text": 5}},
        {"custom_id": "task-missing", "task": "no_such_task", "input": {}},
        chat("good-2", "two"),
    ])
    assert run_batch(tmp_path, "--errors", str(tmp_path / "err.jsonl"), "--request-id-prefix", "bt") == 0
    ok = {line["custom_id"]: line["response"] for line in read_jsonl(tmp_path / "out.jsonl")}
    assert set(ok) == {"good-1", "good-2", "task-1"}
    # Line N went by the request id bt-N, to the process that called the model: a chat line's call
    # through the model's worker, a task line's from the TaskRunner (an upstream model is called there).
    assert (ok["good-2"]["request_id"], ok["task-1"]["request_id"]) == ("bt-9", "bt-6")
    for request_id, caller in (("bt-9", "worker-fake"), ("bt-6", "TaskRunner")):
        wait_for(lambda: logged(f"promptfleet_{caller}_", f"{request_id} -- served fake"), 30,  # noqa: B023
                 message=f"{request_id} in the {caller} log")
    assert ok["task-1"]["body"]["output"] == {"label": "a"} and ok["task-1"]["body"]["model"] == "fake"
    errors = read_jsonl(tmp_path / "err.jsonl")
    by_line = {e["error"]["line"]: e["error"] for e in errors if e["error"]}
    assert {n: (e["code"], e["param"]) for n, e in by_line.items()} == {
        2: ("invalid_json_line", None),
        3: ("invalid_request", "body.messages"),
        4: ("model_not_found", "body.model"),
        5: ("duplicate_custom_id", "custom_id"),
    }
    ran = {e["custom_id"]: e["response"] for e in errors if e["response"]}
    assert ran["task-bad"]["status_code"] == 400 and ran["task-bad"]["body"]["error"]["param"] == "input.text"
    assert ran["task-missing"]["status_code"] == 404
    assert app.upstream.stats()["calls"] == 3


def test_rerun_resumes_without_repeating_a_line(app: ServeApp, tmp_path: Path) -> None:
    lines = [chat(f"r-{i}", f"p{i}") for i in range(200)]
    write_jsonl(tmp_path / "in.jsonl", lines[:70])  # the first run only got through a prefix
    assert run_batch(tmp_path) == 0
    write_jsonl(tmp_path / "in.jsonl", lines)
    assert run_batch(tmp_path) == 0
    ids = [line["custom_id"] for line in read_jsonl(tmp_path / "out.jsonl")]
    assert len(ids) == len(set(ids)) == 200
    assert app.upstream.stats()["calls"] == 200
    assert run_batch(tmp_path) == 0  # nothing left
    assert app.upstream.stats()["calls"] == 200


def wait_job(client: Any, job_id: str, statuses: set[str], timeout: float = 120) -> str:
    def reached() -> str | None:
        status = str(client.get_job_status(job_id).value)
        return status if status in statuses else None

    return wait_for(reached, timeout_s=timeout, interval_s=0.5,
                    message=lambda: f"job {job_id} never reached {statuses}; logs:\n{client.get_job_logs(job_id)}")


def gcs_address() -> str:
    """This test cluster's address: a job's own RAY_ADDRESS may name another cluster on this machine."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


def test_ray_job_submit_stop_and_resume(app: ServeApp, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(app.dashboard)
    app.upstream.configure(mode="ok", latency_ms=100)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"j-{i}", f"p{i}") for i in range(200)])
    out = tmp_path / "out.jsonl"
    entrypoint = (f"{sys.executable} -m jobs.batch --input {tmp_path / 'in.jsonl'} --output {out} "
                  f"--concurrency 8 --progress-every 1 --ray-address {gcs_address()}")
    first = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    try:
        def forty_lines_out() -> bool:
            assert client.get_job_status(first).value not in ("FAILED", "SUCCEEDED"), client.get_job_logs(first)
            return len(read_jsonl(out)) >= 40

        wait_for(forty_lines_out, timeout_s=120, interval_s=0.2, message="40 lines written by the first job")
        client.stop_job(first)
        assert wait_job(client, first, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    finally:
        client.stop_job(first)
    done_before = len(read_jsonl(out))
    assert 40 <= done_before < 200
    app.upstream.reset()
    app.upstream.configure(mode="ok", latency_ms=10)
    second = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    try:
        status = wait_job(client, second, {"SUCCEEDED", "FAILED", "STOPPED"})
    finally:
        client.stop_job(second)
    assert status == "SUCCEEDED", client.get_job_logs(second)
    ids = [line["custom_id"] for line in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 200
    assert app.upstream.stats()["calls"] == 200 - done_before  # nothing the output had was redone
    logs = client.get_job_logs(second)
    assert f"resuming; {done_before} lines already done" in logs
    assert "batch finished: 200 lines" in logs and "tokens:" in logs


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 120) -> Any:
    seen: list[Any] = []

    def reached() -> Any:
        seen[:] = [client.batches.retrieve(batch_id)]
        return seen[0] if seen[0].status in statuses else None

    return wait_for(reached, timeout_s=timeout, interval_s=0.5,
                    message=lambda: f"batch {batch_id} never reached {statuses}: {seen}")


def job_logs(app: ServeApp, batch_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(app.dashboard)
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("promptfleet_batch") == batch_id]
    return "\n".join(f"{j.submission_id} {j.status} {j.message}\n{client.get_job_logs(j.submission_id)}" for j in jobs)


def test_openai_client_batches_end_to_end(app: ServeApp) -> None:
    client = app.client()
    content = "".join(json.dumps(chat(f"o-{i}", f"q{i}")) + "\n" for i in range(50)) + "not json\n"
    uploaded = client.files.create(file=("requests.jsonl", content.encode()), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(content) and uploaded.filename == "requests.jsonl"
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == content.encode()

    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"purpose": "test"},
    )
    assert created.status in ("validating", "in_progress") and created.metadata == {"purpose": "test"}
    done = wait_batch(client, created.id, {"completed", "failed", "cancelled"})
    assert done.status == "completed", job_logs(app, created.id)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (51, 50, 1)
    assert done.output_file_id and done.error_file_id and done.completed_at
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == sorted(f"o-{i}" for i in range(50))
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [e["error"]["line"] for e in errors] == [51]
    assert created.id in [b.id for b in client.batches.list(limit=100).data]

    with pytest.raises(openai.ConflictError):
        client.batches.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert bad.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        # /v1/embeddings, /v1/completions and /v1/responses are batch endpoints too; moderations is not.
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations",  # type: ignore[arg-type]
                              completion_window="24h")
    assert bad.value.body["param"] == "endpoint"  # type: ignore[index]


def test_files_larger_than_the_body_limit_upload_list_and_delete(app: ServeApp) -> None:
    client = app.client()
    line = json.dumps(chat("x", "y" * 200)) + "\n"
    content = (line * (3_000_000 // len(line))).encode()  # 3 MB: over gateway.max_body_bytes (1 MB)
    uploaded = client.files.create(file=("big.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content)
    assert client.files.content(uploaded.id).content == content
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_cancel_stops_the_job_and_keeps_partial_output(app: ServeApp) -> None:
    client = app.client()
    app.upstream.configure(mode="ok", latency_ms=500)
    content = "".join(json.dumps(chat(f"c-{i}", f"q{i}")) + "\n" for i in range(2000))
    uploaded = client.files.create(file=("big.jsonl", content.encode()), purpose="batch")
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_batch(client, created.id, {"in_progress"})
    assert client.batches.cancel(created.id).status in ("cancelling", "cancelled")
    cancelled = wait_batch(client, created.id, {"cancelled", "completed", "failed"}, timeout=60)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.output_file_id
    output = client.files.content(cancelled.output_file_id).text.splitlines()
    assert len(output) < 2000


def test_cli_batch_submits_a_job_and_follows_it(app: ServeApp, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cluster import cli

    write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"t-{i}", "input": {"text": f"x{i}"}} for i in range(20)])
    code = cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                     "--task", "label_fake", "--dashboard", app.dashboard, "--working-dir", str(REPO),
                     "--ray-address", gcs_address(), "--wait"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ray job logs -f" in printed and "batch finished: 20 lines: 20 ok" in printed
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(x["custom_id"] for x in lines) == sorted(f"t-{i}" for i in range(20))
    assert all(x["response"]["body"]["output"] == {"label": "a"} for x in lines)


@pytest.mark.parametrize("mode", ["rate_limit", "error"])
def test_a_batch_line_costs_at_most_the_providers_tries(app: ServeApp, tmp_path: Path, mode: str) -> None:
    """One retry layer per call path (issue 9/10): the provider's max_retries (2 for `fake-retry`) is
    the only layer that re-calls an upstream; the batch job does not re-try what reached it (it used to:
    4 batch attempts x 3 provider tries = 12 upstream calls for one line)."""
    app.upstream.configure(mode=mode, retry_after=0.05)
    write_jsonl(tmp_path / "in.jsonl", [chat("only", "x", model="fake-retry")])
    assert run_batch(tmp_path, "--max-attempts", "4") == 0
    (line,) = read_jsonl(tmp_path / "out.jsonl")
    assert line["response"]["status_code"] == (429 if mode == "rate_limit" else 502)
    assert app.upstream.stats()["calls"] == 3  # 1 + max_retries, whatever --max-attempts says


def test_a_key_that_cannot_pay_fails_the_job_at_once(app: ServeApp, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown, revoked or spent: the job ends with a setup error naming --key-id, and writes no
    error line per line; a live key's batch runs."""
    import httpx

    write_jsonl(tmp_path / "in.jsonl", [chat(f"k-{i}", f"paid {i}") for i in range(3)])
    assert run_batch(tmp_path, "--key-id", "key_0000000000000000") == batch.EXIT_SETUP
    assert "--key-id key_0000000000000000" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()

    created = httpx.post(f"{app.base_url}/admin/keys", json={"name": "batch-payer"}, timeout=30).json()
    assert run_batch(tmp_path, "--key-id", created["id"]) == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 3

    httpx.delete(f"{app.base_url}/admin/keys/{created['id']}", timeout=30)
    (tmp_path / "out.jsonl").unlink()
    assert run_batch(tmp_path, "--key-id", created["id"]) == batch.EXIT_SETUP
    assert "revoked" in capsys.readouterr().err
