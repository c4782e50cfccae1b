"""jobs.batch and the batch store without Ray: line parsing, resume, retries, stop, the status machine."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from deployments.config import QuotasConfig
from deployments.errors import (
    InvalidRequest,
    NotFound,
    Overloaded,
    RateLimited,
    RequestTooLarge,
    UpstreamError,
    UpstreamRateLimited,
)
from deployments.schemas import BatchChatLine, BatchProgress, BatchTaskLine, ChatCompletionRequest
from deployments.store.batches import MAX_JOB_STARTS, BatchStore, JobState, advance
from jobs import batch
from jobs.batchlines import MAX_LINE_BYTES, LineError, parse_line
from tests.waiting import until


def chat(custom_id: str, model: str = "fake", text: str = "hi") -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class FakeBackend:
    """Answers like the Serve app; ``script`` maps a prompt to errors returned before success."""

    def __init__(self, models: set[str] = frozenset({"fake"}), script: dict[str, list[Any]] | None = None,
                 delay: float = 0.0) -> None:
        self.models = models
        self.script = script or {}
        self.delay = delay
        self.calls: list[str] = []
        self.request_ids: dict[str, str] = {}  # prompt or task text -> the request id it was sent with
        self.in_flight = self.max_in_flight = 0

    def has_model(self, model: str) -> bool:
        return model in self.models

    async def _answer(self, key: str, result: dict[str, Any]) -> Any:
        self.calls.append(key)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        queued = self.script.get(key)
        if queued:
            return queued.pop(0)
        return result

    async def chat(self, request: ChatCompletionRequest, request_id: str) -> Any:
        model, text = request.model, str(request.messages[-1].content)
        self.request_ids[text] = request_id
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return await self._answer(text, {"id": f"chatcmpl-{text}", "model": model, "usage": usage,
                                         "choices": [{"message": {"role": "assistant", "content": text}}]})

    async def run_task(self, task: str, task_input: dict[str, Any], request_id: str) -> Any:
        self.request_ids[task_input.get("text", "")] = request_id
        return await self._answer(task_input.get("text", ""), {"task": task, "output": {"label": "a"}})

    async def check_payer(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


def run(tmp: Path, backend: FakeBackend, *extra: str) -> int:
    return batch.main(["--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out.jsonl"),
                       "--progress-every", "0.05", *extra], backend=backend)


def test_parse_line_names_line_and_field() -> None:
    assert isinstance(parse_line(json.dumps(chat("a")), 1), BatchChatLine)
    assert isinstance(parse_line('{"custom_id": "t", "task": "x", "input": {}}', 2), BatchTaskLine)
    assert isinstance(parse_line('{"custom_id": "t", "input": {"a": 1}}', 3, default_task="x"), BatchTaskLine)
    cases = {
        "{not json": ("invalid_json_line", None),
        "[1, 2]": ("invalid_json_line", None),
        # A lone UTF-16 surrogate: json.loads would take it, and no output line could hold it.
        json.dumps(chat("a", text="x")).replace('"x"', '"\\ud800"'): ("invalid_json_line", None),
        json.dumps({**chat("a"), "method": "GET"}): ("invalid_request", "method"),
        json.dumps({k: v for k, v in chat("a").items() if k != "body"}): ("invalid_request", "body"),
        json.dumps({**chat("a"), "body": {"model": "fake", "messages": []}}): ("invalid_request", "body.messages"),
        json.dumps({**chat("a"), "body": {"model": "m", "messages": [{"role": "x"}]}}): (
            "invalid_request", "body.messages.0.role"),
        json.dumps({**chat("a"), "body": {**chat("a")["body"], "stream": True}}): ("invalid_request", "body"),
        '{"custom_id": "t", "input": {}}': ("invalid_request", "task"),
        json.dumps({**chat("a"), "custom_id": ""}): ("invalid_request", "custom_id"),
    }
    for raw, (code, param) in cases.items():
        error = parse_line(raw, 7)
        assert isinstance(error, LineError), raw
        assert (error.code, error.param, error.line) == (code, param, 7), raw
        assert error.message.startswith("Line 7")
        if param:
            assert param in error.message


def test_an_answer_that_cannot_be_written_is_a_failed_line_not_a_lost_one(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("bad", text="odd"), chat("good", text="fine")])
    odd = {"id": "chatcmpl-odd", "model": "fake", "choices": [{"message": {"role": "assistant", "content": "\ud800"}}]}
    assert run(tmp_path, FakeBackend(script={"odd": [odd]})) == 0
    lines = {line["custom_id"]: line for line in read_jsonl(tmp_path / "out.jsonl")}
    assert set(lines) == {"bad", "good"}
    assert lines["good"]["response"]["status_code"] == 200
    failed = lines["bad"]["response"]
    assert failed["status_code"] == 500 and "could not be written as JSON" in failed["body"]["error"]["message"]


def test_bad_lines_become_error_lines_and_the_rest_runs(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [
        chat("ok-1"), "{broken", {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"},
        chat("ok-1", text="again"), chat("nomodel", model="nope"), "", chat("ok-2", text="two"),
        {"custom_id": "t1", "task": "label", "input": {"text": "t"}},
    ])
    backend = FakeBackend()
    assert batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--errors", str(tmp_path / "err.jsonl"), "--request-id-prefix", "batch_abc"],
                      backend=backend) == 0
    ok = {line["custom_id"]: line for line in read_jsonl(tmp_path / "out.jsonl")}
    assert set(ok) == {"ok-1", "ok-2", "t1"}
    assert ok["ok-1"]["response"]["status_code"] == 200 and ok["ok-1"]["error"] is None
    assert ok["ok-1"]["response"]["body"]["choices"][0]["message"]["content"] == "hi"
    assert ok["ok-1"]["id"].startswith("batch_req_")
    # Each line's calls went by <prefix>-<line number>, and its output line names that id.
    assert {c: line["response"]["request_id"] for c, line in ok.items()} == {
        "ok-1": "batch_abc-1", "ok-2": "batch_abc-7", "t1": "batch_abc-8"}
    assert backend.request_ids == {"hi": "batch_abc-1", "two": "batch_abc-7", "t": "batch_abc-8"}
    assert ok["t1"]["response"]["body"]["output"] == {"label": "a"}
    errors = {line["error"]["line"]: line for line in read_jsonl(tmp_path / "err.jsonl")}
    assert {n: e["error"]["code"] for n, e in errors.items()} == {
        2: "invalid_json_line", 3: "invalid_request", 4: "duplicate_custom_id", 5: "model_not_found"}
    assert errors[3]["error"]["param"] == "body" and errors[3]["custom_id"] == "no-body"
    assert errors[4]["error"]["param"] == "custom_id" and errors[4]["custom_id"] == "ok-1"
    assert errors[5]["error"]["param"] == "body.model" and errors[5]["response"] is None
    assert sorted(backend.calls) == ["hi", "t", "two"]


def test_a_line_too_long_to_read_is_an_error_line_and_the_rest_runs(tmp_path: Path) -> None:
    text = "x" * (MAX_LINE_BYTES + 1)
    (tmp_path / "in.jsonl").write_text(json.dumps(chat("first")) + "\n" + json.dumps(chat("huge", text=text))
                                       + "\n" + json.dumps(chat("last", text="last")) + "\n")
    backend = FakeBackend()
    assert batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
                      backend=backend) == 0
    lines = {line["custom_id"] or line["error"]["line"]: line for line in read_jsonl(tmp_path / "out.jsonl")}
    assert set(lines) == {"first", "last", 2}
    assert lines[2]["error"]["code"] == "line_too_large" and sorted(backend.calls) == ["hi", "last"]


def test_resume_skips_done_lines_and_cuts_a_torn_line(tmp_path: Path) -> None:
    lines = [chat(f"id-{i}", text=f"p{i}") for i in range(40)] + ["{bad"]
    write_jsonl(tmp_path / "in.jsonl", lines)
    first = FakeBackend()
    assert run(tmp_path, first) == 0
    output = read_jsonl(tmp_path / "out.jsonl")
    assert len(output) == 41
    # Keep 15 answered lines and the error line, then a torn half line, as a killed job leaves them.
    kept = [line for line in output if line["error"]][:1] + [line for line in output if not line["error"]][:15]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept) + '{"id": "batch_req_x", "cus')
    second = FakeBackend()
    assert run(tmp_path, second) == 0
    final = read_jsonl(tmp_path / "out.jsonl")
    ids = [line["custom_id"] for line in final if not line["error"]]
    assert sorted(ids) == sorted(f"id-{i}" for i in range(40)) and len(ids) == len(set(ids))
    assert len(second.calls) == 25
    assert sum(1 for line in final if line["error"]) == 1
    third = FakeBackend()
    assert run(tmp_path, third) == 0 and third.calls == []


def test_resume_after_a_duplicate_error_still_runs_the_first_occurrence(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("x", text="first"), chat("x", text="second")])
    (tmp_path / "out.jsonl").write_text(json.dumps({
        "id": "batch_req_1", "custom_id": "x", "response": None,
        "error": {"code": "duplicate_custom_id", "message": "dup", "param": "custom_id", "line": 2}}) + "\n")
    backend = FakeBackend()
    assert run(tmp_path, backend) == 0
    assert backend.calls == ["first"] and len(read_jsonl(tmp_path / "out.jsonl")) == 2


def test_transient_errors_are_retried_then_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("a", text="flaky"), chat("b", text="down"), chat("c", text="bad"),
                                        chat("d", text="upstream"), chat("e", text="busy")])
    script: dict[str, list[Any]] = {
        "flaky": [RateLimited("slow down", retry_after=0.01)] * 2,
        "down": [RateLimited("slow down", retry_after=0.01)] * 10,
        "bad": [UpstreamError("The upstream failed.")],
        # The upstream said 429 after the provider's own retries: re-trying would call it again.
        "upstream": [UpstreamRateLimited("The upstream is rate limiting.", retry_after=0.01)] * 10,
        "busy": [Overloaded("At capacity.", retry_after=0.01)],
    }
    backend = FakeBackend(script=script)
    assert run(tmp_path, backend, "--max-attempts", "3") == 0
    lines = {line["custom_id"]: line["response"] for line in read_jsonl(tmp_path / "out.jsonl")}
    assert lines["a"]["status_code"] == 200
    assert lines["b"]["status_code"] == 429 and lines["b"]["body"]["error"]["code"] == "rate_limited"
    assert lines["c"]["status_code"] == 502 and lines["c"]["body"]["error"]["message"] == "The upstream failed."
    # A failed line's error body names its request id, like an HTTP error body.
    assert lines["c"]["request_id"] == lines["c"]["body"]["error"]["request_id"]
    assert lines["c"]["request_id"].startswith("batch-") and lines["c"]["request_id"].endswith("-3")
    assert backend.calls.count("flaky") == 3 and backend.calls.count("down") == 3 and backend.calls.count("bad") == 1
    # Only refusals that never reached an upstream are re-tried here (one retry layer per path).
    assert lines["d"]["status_code"] == 429 and backend.calls.count("upstream") == 1
    assert lines["e"]["status_code"] == 200 and backend.calls.count("busy") == 2


def test_concurrency_is_bounded_and_progress_is_reported(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"id-{i}", text=str(i)) for i in range(60)])
    backend = FakeBackend(delay=0.02)
    out = io.StringIO()
    options = batch.Options(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", concurrency=7,
                            progress_every=0.05, progress_file=tmp_path / "progress.json")
    assert asyncio.run(batch.BatchRun(options, backend, out=out).run()) == 0
    assert backend.max_in_flight == 7
    log = out.getvalue()
    assert "remaining" in log and "lines/s" in log and "ETA" in log
    assert "batch finished: 60 lines: 60 ok, 0 failed" in log and "300 total" in log
    progress = BatchProgress.model_validate_json((tmp_path / "progress.json").read_text())
    assert (progress.total, progress.completed, progress.failed, progress.finished) == (60, 60, 0, True)


def test_stop_abandons_in_flight_and_a_rerun_finishes(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"id-{i}", text=str(i)) for i in range(50)])
    backend = FakeBackend(delay=0.05)
    options = batch.Options(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", concurrency=5)
    run_ = batch.BatchRun(options, backend, out=io.StringIO())

    async def stop_soon() -> int:
        task = asyncio.create_task(run_.run())
        await until(lambda: len(backend.calls) - backend.in_flight >= 10)  # some lines answered
        run_.stop()
        return await task

    assert asyncio.run(stop_soon()) == batch.EXIT_STOPPED
    done_first = len(read_jsonl(tmp_path / "out.jsonl"))
    assert 5 <= done_first < 50
    again = FakeBackend()
    assert run(tmp_path, again) == 0
    ids = [line["custom_id"] for line in read_jsonl(tmp_path / "out.jsonl")]
    assert len(ids) == len(set(ids)) == 50 and len(again.calls) == 50 - done_first


def test_missing_input_is_a_setup_error(tmp_path: Path) -> None:
    assert run(tmp_path, FakeBackend()) == batch.EXIT_SETUP


# -- the batch store ---------------------------------------------------------------------------


def upload(store: BatchStore, owner: str, content: bytes) -> str:
    upload_id = store.begin_upload(owner, "in.jsonl")
    store.write_upload(upload_id, content)
    return store.finish_upload(upload_id).id


def test_files_and_batches_are_owner_scoped_and_survive_a_restart(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    file_id = upload(store, "alice", b'{"a": 1}\n\n{"b": 2}\n')
    assert store.get_file("alice", file_id).lines == 2
    with pytest.raises(NotFound):
        store.get_file("bob", file_id)
    with pytest.raises(NotFound):
        store.create_batch("bob", file_id, "/v1/chat/completions", "24h", None)
    created = store.create_batch("alice", file_id, "/v1/chat/completions", "24h", {"k": "v"})
    with pytest.raises(NotFound):
        store.get_batch("bob", created.id)
    assert store.list_batches("bob", 10, None) == ([], False)
    reopened = BatchStore(tmp_path)
    assert reopened.get_batch("alice", created.id).view().request_counts.total == 2
    assert reopened.read_file("alice", file_id, 0, 100) == b'{"a": 1}\n\n{"b": 2}\n'


def test_upload_limits(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, max_file_bytes=10)
    upload_id = store.begin_upload("alice", "x.jsonl")
    with pytest.raises(RequestTooLarge):
        store.write_upload(upload_id, b"x" * 11)
    assert not list((tmp_path / "uploads").iterdir())
    with pytest.raises(InvalidRequest):
        upload(store, "alice", b"\n \n")


def test_pages_newest_first(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, quotas=QuotasConfig(max_batches_per_key=5))
    file_id = upload(store, "alice", b"{}\n")
    ids = [store.create_batch("alice", file_id, "/v1/chat/completions", "24h", None, now=100 + i).id
           for i in range(5)]
    page, more = store.list_batches("alice", 2, None)
    assert [b.id for b in page] == ids[::-1][:2] and more
    page, more = store.list_batches("alice", 10, page[-1].id)
    assert [b.id for b in page] == ids[::-1][2:] and not more


def test_status_follows_the_job(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch_ = store.create_batch("o", upload(store, "o", b"{}\n{}\n"), "/v1/chat/completions", "24h", None)
    batch_.job_starts, batch_.job_id = 1, batch_.id
    assert advance(batch_, JobState("PENDING"), None, 1) == "none" and batch_.status == "validating"
    progress = BatchProgress(total=2, completed=1, failed=0, total_tokens=9, updated_at=0)
    assert advance(batch_, JobState("RUNNING"), progress, 2) == "none"
    assert (batch_.status, batch_.in_progress_at, batch_.completed) == ("in_progress", 2, 1)
    assert advance(batch_, None, progress, 3) == "submit"  # the cluster lost the job: resume it
    batch_.job_starts = MAX_JOB_STARTS
    assert advance(batch_, JobState("FAILED", exit_code=None), progress, 4) == "finalize"
    assert batch_.status == "failed" and batch_.errors[0]["code"] == "batch_job_failed"
    assert advance(batch_, JobState("SUCCEEDED"), progress, 5) == "none"  # terminal stays terminal
    store.save_batch(batch_)  # as the BatchService does after each step: records are rows, not shared objects

    other = store.create_batch("o", batch_.input_file_id, "/v1/chat/completions", "24h", None)
    other.job_starts = 1
    assert advance(other, JobState("FAILED", exit_code=batch.EXIT_SETUP), None, 1) == "finalize"  # no retry
    store.save_batch(other)
    third = store.create_batch("o", batch_.input_file_id, "/v1/chat/completions", "24h", None)
    third.status, third.cancelling_at = "cancelling", 5
    assert advance(third, JobState("RUNNING"), None, 6) == "none" and third.status == "cancelling"
    assert advance(third, JobState("STOPPED"), None, 7) == "finalize" and third.status == "cancelled"
    store.finalize(third)
    assert third.output_file_id is not None and third.error_file_id is None
    assert store.get_file("o", third.output_file_id).purpose == "batch_output"



def test_relative_paths_are_refused_inside_a_ray_job_package_and_fine_elsewhere(tmp_path: Path) -> None:
    """`ray job submit --working-dir .` runs the job in Ray's temporary copy of the directory: a relative
    `--errors err.jsonl` was written there, out of the user's sight."""
    args = batch.build_parser().parse_args(["--input", "/abs/in.jsonl", "--output", "/abs/out.jsonl",
                                            "--errors", "err.jsonl"])
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    with pytest.raises(batch.SetupError) as info:
        batch.options_from(args, cwd=package)
    assert "--errors err.jsonl" in str(info.value) and "absolute" in str(info.value)
    assert "--output" not in str(info.value)
    assert batch.options_from(args, cwd=tmp_path).errors == Path("err.jsonl")  # a local run: relative is fine
    args.errors = Path("/abs/err.jsonl")
    assert batch.options_from(args, cwd=package).errors == Path("/abs/err.jsonl")
