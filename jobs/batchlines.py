"""The files of a batch, without Ray: input lines parsed, output lines built, resume state, progress.

Input (JSONL, one request a line, blank lines ignored):

    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": …, "messages": …}}
    {"custom_id": "t1", "task": "classify_ticket", "input": {"body": "…"}}      (a promptfleet task)

Output (JSONL, the OpenAI batch output format), one line per input line, in completion order:

    {"id": "batch_req_…", "custom_id": "a1", "response": {"status_code": 200, "request_id": …, "body": …},
     "error": null}

A request that ran but failed (upstream 429 after retries, invalid task output, …) also has a
``response``, whose ``status_code`` and ``body`` are those of the same request over HTTP. A line that
could not be run at all has ``"response": null`` and ``"error": {"code", "message", "param", "line"}``.

Resume: a ``custom_id`` with a ``response`` line in the output (or error) file is done; so is the
input line numbered in an ``error`` line. A re-run skips both, so no line is answered twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pydantic_core
from pydantic import ValidationError

from deployments.errors import field_path
from deployments.schemas import (
    BATCH_CHAT_URL,
    BatchChatLine,
    BatchLineError,
    BatchOutputLine,
    BatchProgress,
    BatchResponse,
    BatchTaskLine,
)
from deployments.schemas.batches import (
    BATCH_COMPLETIONS_URL,
    BATCH_EMBEDDINGS_URL,
    BATCH_RESPONSES_URL,
    BatchCompletionLine,
    BatchEmbeddingLine,
    BatchResponseLine,
)

BatchItem = BatchChatLine | BatchEmbeddingLine | BatchCompletionLine | BatchResponseLine | BatchTaskLine
# The model lines other than chat, by url.
MODEL_LINES: dict[str, type[BatchChatLine | BatchEmbeddingLine | BatchCompletionLine | BatchResponseLine]] = {
    BATCH_EMBEDDINGS_URL: BatchEmbeddingLine,
    BATCH_COMPLETIONS_URL: BatchCompletionLine,
    BATCH_RESPONSES_URL: BatchResponseLine,
}
# A longer input line is not read: it gets a `line_too_large` error line. Eight times the HTTP
# body limit's default (gateway.max_body_bytes): a line is one request body plus its envelope.
MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LineError:
    """A line that cannot be run."""

    line: int
    code: str
    message: str
    param: str | None = None
    custom_id: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def parse_line(raw: bytes | str | None, line: int, default_task: str | None = None) -> BatchItem | LineError:
    """One input line as a chat or task request, or the error naming what is wrong with it
    (``None``: a line over ``MAX_LINE_BYTES``, skipped unread by ``read_lines``)."""
    if raw is None:
        return LineError(line, "line_too_large", f"Line {line} is longer than {MAX_LINE_BYTES} bytes.")
    try:
        # pydantic's parser, as the Gateway's: it refuses a lone UTF-16 surrogate ("\ud800"), which
        # json.loads takes and no output line could hold.
        data = pydantic_core.from_json(raw)
    except ValueError as exc:
        return LineError(line, "invalid_json_line", f"Line {line} is not valid JSON: {str(exc)[:200]}.")
    if not isinstance(data, dict):
        return LineError(line, "invalid_json_line", f"Line {line} is not a JSON object.")
    custom_id = data.get("custom_id") if isinstance(data.get("custom_id"), str) else None
    is_task = "task" in data or "input" in data
    if default_task is not None and "url" not in data and "body" not in data:
        is_task = True
        data = {"task": default_task, **data}
    try:
        if is_task:
            return BatchTaskLine.model_validate(data)
        url = data.get("url")
        if isinstance(url, str) and url != BATCH_CHAT_URL and url not in MODEL_LINES:
            urls = ", ".join([BATCH_CHAT_URL, *MODEL_LINES])
            return LineError(line, "invalid_request", f"Line {line}: url: must be one of {urls}.", "url", custom_id)
        return MODEL_LINES.get(url, BatchChatLine).model_validate(data)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        param = field_path(first["loc"]) or None
        message = "Field required" if first["type"] == "missing" else first["msg"]
        text = f"Line {line}: {param}: {message}" if param else f"Line {line}: {message}"
        return LineError(line, "invalid_request", text, param, custom_id)


def read_lines(f: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """Every line of ``f``, newline included; ``None`` for a line over ``limit`` bytes, which is
    read past a MiB at a time and never held: one line of a 200 MB file cannot take 200 MB."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
            pass
        yield None


def count_lines(path: Path) -> int:
    """Non-blank lines (a line too long to read counts: it gets an error line), streamed."""
    with path.open("rb") as f:
        return sum(1 for raw in read_lines(f) if raw is None or raw.strip())


def iter_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line) for every non-blank line; the line is None if too long to read."""
    for number, raw in enumerate(read_lines(f), start=1):
        if raw is None or raw.strip():
            yield number, raw


def response_line(custom_id: str, status_code: int, body: dict[str, Any], request_id: str) -> str:
    line = BatchOutputLine(
        id=new_id("batch_req_"),
        custom_id=custom_id,
        response=BatchResponse(status_code=status_code, request_id=request_id, body=body),
        error=None,
    )
    return line.model_dump_json() + "\n"


def error_line(error: LineError) -> str:
    line = BatchOutputLine(
        id=new_id("batch_req_"),
        custom_id=error.custom_id,
        response=None,
        error=BatchLineError(code=error.code, message=error.message, param=error.param, line=error.line),
    )
    return line.model_dump_json() + "\n"


@dataclass
class Done:
    """What earlier runs finished: ids answered, input lines reported as errors, and their counts."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0


def scan_done(path: Path, done: Done) -> None:
    """Add the finished work recorded in ``path`` to ``done``; cut off a torn last line.

    A run killed mid-write can leave half a line at the end; it is truncated away so the
    next line appended starts on a line of its own.
    """
    if not path.exists():
        return
    good_end = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
            except ValueError:
                break
            good_end += len(raw)
            response, error = record.get("response"), record.get("error")
            if isinstance(error, dict) and isinstance(error.get("line"), int):
                done.lines.add(error["line"])
                done.failed += 1
            elif isinstance(response, dict) and isinstance(record.get("custom_id"), str):
                done.ids.add(record["custom_id"])
                status = response.get("status_code")
                if isinstance(status, int) and 200 <= status < 300:
                    done.completed += 1
                else:
                    done.failed += 1
    if good_end < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_end)


class OutputWriter:
    """Appends output and error lines, flushed per line (a crash loses at most the line being written)."""

    def __init__(self, output: Path, errors: Path | None) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output.open("a", encoding="utf-8")
        self.errors = self.output
        if errors is not None and errors.resolve() != output.resolve():
            errors.parent.mkdir(parents=True, exist_ok=True)
            self.errors = errors.open("a", encoding="utf-8")

    def write(self, line: str, ok: bool) -> None:
        f = self.output if ok else self.errors
        f.write(line)
        f.flush()

    def close(self) -> None:
        self.output.close()
        if self.errors is not self.output:
            self.errors.close()


@dataclass
class Progress:
    """Counts of one run, and how they are shown in the job log."""

    total: int
    done_before: Done
    started: float = field(default_factory=time.monotonic)
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            # A response's usage names them input/output tokens.
            for name, other in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"),
                                ("total_tokens", "total_tokens")):
                value = usage.get(name, usage.get(other))
                if isinstance(value, int):
                    setattr(self, name, getattr(self, name) + value)

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.skipped - self.finished)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.finished / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = f"{self.remaining / rate:.0f}s" if rate > 0 else "?"
        done = self.skipped + self.finished
        fraction = done / self.total if self.total else 1.0
        bar = "#" * int(20 * fraction) + "." * (20 - int(20 * fraction))
        return (
            f"batch: [{bar}] {done}/{self.total} ({100 * fraction:.1f}%) | {self.completed} ok, {self.failed} failed, "
            f"{self.skipped} already done, {self.remaining} remaining | {rate:.1f} lines/s | ETA {eta}"
        )

    def summary(self, interrupted: bool) -> str:
        elapsed = time.monotonic() - self.started
        state = "stopped" if interrupted else "finished"
        return (
            f"batch {state}: {self.total} lines: {self.completed} ok, {self.failed} failed, "
            f"{self.skipped} already done, {self.remaining} not run | tokens: {self.prompt_tokens} prompt, "
            f"{self.completion_tokens} completion, {self.total_tokens} total | {elapsed:.1f}s "
            f"({self.rate():.1f} lines/s)"
        )

    def snapshot(self, finished: bool) -> BatchProgress:
        return BatchProgress(
            total=self.total,
            completed=self.done_before.completed + self.completed,
            failed=self.done_before.failed + self.failed,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            finished=finished,
            updated_at=time.time(),
        )


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
