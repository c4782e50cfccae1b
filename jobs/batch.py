"""Batch job: JSONL in, JSONL out, through the running promptfleet Serve application.

    ray job submit --working-dir . -- python -m jobs.batch --input in.jsonl --output out.jsonl \\
        [--errors err.jsonl] [--app promptfleet] [--concurrency 32] [--task NAME] [--key-id key_…]

(or ``promptfleet batch …``, which submits the same job). Paths are on the node the job's driver
runs on (the head node by default), so give absolute paths when submitting to a remote cluster.

Each input line is a chat request in the OpenAI batch format or a task line (see
``jobs.batchlines``). Chat lines go through the same model call path as HTTP chat
(``deployments.model_calls``: the model's fallbacks, its output limit, Ray failures → 503) to
the ``ModelWorker`` deployments, task lines to the ``TaskRunner`` through the client the task
route uses (``deployments.clients.runner``: the same 503 for a runner at capacity or one that
died), through ``DeploymentHandle``s of the running app: the same replicas and the same global
limits as HTTP traffic. Nothing runs in this process but the bookkeeping and the metering.

Billing: with ``--key-id`` (the Batches API passes the batch owner's key id — never the key)
every line is metered to that key like an HTTP request of it: a spent token budget or a revoked
key fails the remaining lines with a 403/401 error line, the key's rpm/tpm pace the lines (a
line waits up to ``serve_backend.LINE_WAIT_S`` for its slot), and the tokens land in the key's usage
(``/v1/usage``), written through the TaskStore. Without ``--key-id`` (a batch of the Batches API
with authentication off, or a ``ray job submit`` with the cluster's own credentials) the lines are
limited by nothing but the models' own limits, and recorded as the app records calls without a key:
under ``anonymous`` when its authentication is off (``/v1/usage``, the console), not at all when it is
on (the operator's own job).

Contract:

- One output line per input line, written and flushed as each request finishes, so the output is
  in **completion order**, not input order (match lines by ``custom_id``). With ``--errors``,
  failures go to that file and successes to ``--output``; without it, both go to ``--output``.
- A malformed line, a duplicate ``custom_id``, an unknown model or a line over 8 MiB
  (``batchlines.MAX_LINE_BYTES``, skipped without being read whole) gives an error line naming
  the line number and field; it never stops the batch.
- Exactly one layer re-calls an upstream: the model's provider (its ``max_retries``). This job
  re-tries only refusals that never reached an upstream — errors whose class has
  ``before_upstream`` (our own 503 backpressure, a key's or model's rpm/tpm pacing, an open
  circuit) — with backoff (``Retry-After`` honoured) up to ``--max-attempts`` tries; every other
  failure (an upstream 429/5xx/timeout after the provider's retries, a bad request) is written
  as it is.
- Re-running with the same output (and errors) files resumes: lines already answered are skipped.
  A request in flight when the job was stopped has no line yet and runs again (at-least-once
  model calls; exactly one output line per ``custom_id``).
- The input is streamed; at most ``--concurrency`` requests are in flight.
- Progress is printed every ``--progress-every`` seconds (``ray job logs -f`` shows it), then a
  summary line with counts, tokens and time. ``--progress-file`` also keeps a JSON snapshot
  (``schemas.BatchProgress``), which the Batches API reads for ``request_counts``.
- Every line ends up in ``promptfleet_batch_lines`` (``deployments.telemetry``; kind chat, task or
  invalid, outcome done or failed), recorded by this driver through Ray's metrics agent; off with
  ``--no-metrics`` (the BatchService passes it when the app's ``metrics.enabled`` is false).
- Request ids: line N goes by ``<prefix>-N`` (``--request-id-prefix``; the Batches API passes the
  batch id, so a resumed batch keeps its ids; default ``batch-`` and 12 random hex digits, printed
  at the start). Its model calls are logged under it, and its output or error line carries it as
  ``response.request_id`` (and ``error.request_id`` in a failed response's body). Lines refused
  before any call (malformed, duplicate ``custom_id``, unknown model) name their ``line`` instead.
- ``SIGTERM``/``SIGINT`` (``ray job stop``) stops promptly: nothing new starts, requests in flight
  are abandoned, the summary is printed. Exit status: 0 done (even with failed lines), 3 could
  not start (no input, no app), 130 stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deployments.config import MetricsConfig
from deployments.core.requestids import is_sane, new_request_id
from deployments.core.retry import BackoffPolicy
from deployments.errors import PromptfleetError
from deployments.schemas import BatchTaskLine
from deployments.telemetry import BATCH_DRIVER_METRICS, NULL, Metrics, metrics_for
from jobs.batchlines import (
    BatchItem,
    Done,
    LineError,
    OutputWriter,
    Progress,
    count_lines,
    error_line,
    iter_lines,
    parse_line,
    response_line,
    scan_done,
    write_atomically,
)
from jobs.serve_backend import Backend, Result, ServeBackend, SetupError

logger = logging.getLogger("promptfleet.batch")

MAX_RETRY_WAIT_S = 60.0
# 1 is what Python exits with on an uncaught exception; a setup error has a code of its own.
EXIT_OK, EXIT_SETUP, EXIT_STOPPED = 0, 3, 130

# The `kind` label of a model line's metric, by url.
LINE_KINDS = {"/v1/embeddings": "embeddings", "/v1/completions": "completions", "/v1/responses": "responses"}


@dataclass(frozen=True)
class Options:
    input: Path
    output: Path
    errors: Path | None = None
    app: str = "promptfleet"
    concurrency: int = 32
    task: str | None = None
    max_attempts: int = 4
    progress_every: float = 10.0
    progress_file: Path | None = None
    key_id: str | None = None
    request_id_prefix: str = "batch"
    metrics: bool = True


class BatchRun:
    """One pass over the input: skip what is done, run the rest with bounded concurrency."""

    def __init__(
        self,
        options: Options,
        backend: Backend,
        out: IO[str] | None = None,
        backoff: BackoffPolicy | None = None,
        metrics: Metrics = NULL,
    ) -> None:
        self.options = options
        self.backend = backend
        self.metrics = metrics
        self.out = out or sys.stdout
        self.backoff = backoff or BackoffPolicy(base_s=0.5, cap_s=20.0)
        self.stopping = asyncio.Event()
        self.progress: Progress | None = None

    def stop(self) -> None:
        """Start nothing new and abandon requests in flight (what SIGTERM does)."""
        self.stopping.set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(self) -> int:
        opts = self.options
        if not opts.input.is_file():
            raise SetupError(f"input file {opts.input} does not exist")
        done = Done()
        scan_done(opts.output, done)
        if opts.errors is not None and opts.errors.resolve() != opts.output.resolve():
            scan_done(opts.errors, done)
        await self.backend.check_payer()
        progress = self.progress = Progress(total=count_lines(opts.input), done_before=done)
        if done.ids or done.lines:
            self.say(f"batch: resuming; {len(done.ids) + len(done.lines)} lines already done in {opts.output}")
        self.say(f"batch: {progress.total} lines from {opts.input}, concurrency {opts.concurrency}, "
                 f"request ids {opts.request_id_prefix}-<line>")
        writer = OutputWriter(opts.output, opts.errors)
        ticker = asyncio.create_task(self._tick(progress))
        try:
            await self._feed(progress, done, writer)
        finally:
            ticker.cancel()
            writer.close()
            await self.backend.close()
        interrupted = self.stopping.is_set()
        self._report(progress, finished=not interrupted)
        self.say(progress.summary(interrupted))
        return EXIT_STOPPED if interrupted else EXIT_OK

    async def _feed(self, progress: Progress, done: Done, writer: OutputWriter) -> None:
        slots = asyncio.Semaphore(self.options.concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        seen: set[str] = set()
        stop_wait = asyncio.create_task(self.stopping.wait())
        try:
            with self.options.input.open("rb") as f:
                for count, (number, raw) in enumerate(iter_lines(f)):
                    if self.stopping.is_set():
                        break
                    if count % 500 == 0:
                        await asyncio.sleep(0)  # let the progress ticker run through long skips
                    item = parse_line(raw, number, self.options.task)
                    custom_id = item.custom_id
                    if number in done.lines or (custom_id in done.ids and custom_id not in seen):
                        if custom_id is not None:
                            seen.add(custom_id)
                        progress.skipped += 1
                        continue
                    if custom_id is not None and custom_id in seen:
                        item = LineError(number, "duplicate_custom_id", f"Line {number}: custom_id "
                                         f"{custom_id!r} appears on an earlier line.", "custom_id", custom_id)
                    elif custom_id is not None:
                        seen.add(custom_id)
                    if not isinstance(item, (BatchTaskLine, LineError)) and not self.backend.has_model(item.body.model):
                        item = LineError(number, "model_not_found", f"Line {number}: body.model: the model "
                                         f"{item.body.model!r} does not exist.", "body.model", custom_id)
                    if isinstance(item, LineError):
                        writer.write(error_line(item), ok=False)
                        progress.failed += 1
                        self.metrics.batch_line("invalid", ok=False)
                        continue
                    acquire = asyncio.create_task(slots.acquire())
                    await asyncio.wait({acquire, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if not acquire.done() or self.stopping.is_set():
                        acquire.cancel()
                        break
                    task = asyncio.create_task(self._process(item, number, progress, writer, slots))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            while in_flight and not self.stopping.is_set():
                await asyncio.wait({*in_flight, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _process(
        self, item: BatchItem, number: int, progress: Progress, writer: OutputWriter, slots: asyncio.Semaphore
    ) -> None:
        request_id = f"{self.options.request_id_prefix}-{number}"
        kind = "task" if isinstance(item, BatchTaskLine) else LINE_KINDS.get(item.url, "chat")
        try:
            result = await self._call_with_retries(item, request_id)
            if not isinstance(result, PromptfleetError):
                try:
                    answer = response_line(item.custom_id, 200, result, request_id)
                except ValueError:  # pydantic's serialization error, e.g. a lone surrogate in the answer
                    logger.exception("request %s (%r): its answer cannot be written as JSON", request_id,
                                     item.custom_id)
                    result = PromptfleetError("The model's answer could not be written as JSON.")
                else:
                    progress.add_usage(result.get("usage"))
                    writer.write(answer, ok=True)
                    progress.completed += 1
                    self.metrics.batch_line(kind, ok=True)
                    return
            body = result.to_body(request_id)
            writer.write(response_line(item.custom_id, result.status_code, body, request_id), ok=False)
            progress.failed += 1
            self.metrics.batch_line(kind, ok=False)
        finally:
            slots.release()

    async def _call_with_retries(self, item: BatchItem, request_id: str) -> Result:
        attempt = 0
        while True:
            attempt += 1
            try:
                if isinstance(item, BatchTaskLine):
                    result = await self.backend.run_task(item.task, item.input, request_id)
                else:
                    result = await self.backend.chat(item.body, request_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Another process's failure: its text stays in this log, never in the output.
                logger.exception("request %s (%r) failed unexpectedly", request_id, item.custom_id)
                return PromptfleetError("Internal error.")
            # Only refusals that never reached an upstream: the provider owns upstream retries.
            if not isinstance(result, PromptfleetError) or not result.before_upstream:
                return result
            if attempt >= self.options.max_attempts:
                return result
            await asyncio.sleep(min(MAX_RETRY_WAIT_S, self.backoff.delay(attempt, result.retry_after)))

    async def _tick(self, progress: Progress) -> None:
        while True:
            await asyncio.sleep(self.options.progress_every)
            self.say(progress.line())
            self._report(progress, finished=False)

    def _report(self, progress: Progress, finished: bool) -> None:
        if self.options.progress_file is not None:
            write_atomically(self.options.progress_file, progress.snapshot(finished).model_dump_json())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.batch",
        description="Run a JSONL batch (OpenAI batch lines or task lines) through the running promptfleet app.",
    )
    parser.add_argument("--input", type=Path, required=True, help="input JSONL file")
    parser.add_argument("--output", type=Path, required=True, help="output JSONL file (appended; resumes)")
    parser.add_argument("--errors", type=Path, default=None, help="error lines go here (default: --output)")
    parser.add_argument("--app", default="promptfleet", help="Serve application name (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    parser.add_argument("--task", default=None, help="task for lines that name none (`{custom_id, input}` lines)")
    parser.add_argument("--max-attempts", type=int, default=4, help="tries per line refused before reaching "
                        "an upstream (our own 429/503 pacing and backpressure) (default: %(default)s)")
    parser.add_argument("--key-id", default=None, help="API key id (`key_…`) the lines are billed to and "
                        "limited as; default: none (unmetered, the operator's own job)")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--progress-file", type=Path, default=None, help="JSON progress snapshot to keep")
    parser.add_argument("--no-metrics", action="store_true", help="record no promptfleet_batch_lines metrics")
    parser.add_argument("--request-id-prefix", default=None, help="line N goes by the request id <prefix>-N "
                        "(logs, output lines); default: batch- and 12 random hex digits")
    parser.add_argument("--ray-address", default=None, help="GCS address of the cluster (default: the job's "
                        "RAY_ADDRESS, else the local cluster)")
    return parser


def _in_a_job_package(cwd: Path) -> bool:
    """Whether this runs in the copy of ``--working-dir`` that ``ray job submit`` made (and deletes)."""
    return "working_dir_files" in cwd.parts or any(part.startswith("_ray_pkg_") for part in cwd.parts)


def options_from(args: argparse.Namespace, cwd: Path | None = None) -> Options:
    if _in_a_job_package(cwd or Path.cwd()):
        relative = [f"--{name} {path}" for name, path in
                    (("input", args.input), ("output", args.output), ("errors", args.errors),
                     ("progress-file", args.progress_file)) if path is not None and not path.is_absolute()]
        if relative:
            raise SetupError(f"{', '.join(relative)}: give absolute paths — under `ray job submit` the job runs "
                             "in Ray's temporary copy of the working dir, and files written there are lost")
    if args.concurrency < 1 or args.max_attempts < 1 or args.progress_every <= 0:
        raise SetupError("--concurrency and --max-attempts must be >= 1, --progress-every > 0")
    if args.key_id is not None and not args.key_id.startswith("key_"):
        raise SetupError("--key-id must be an API key id (key_…), not a key")
    prefix = args.request_id_prefix or f"batch-{new_request_id()[:12]}"
    if not is_sane(f"{prefix}-{2**40}"):
        raise SetupError("--request-id-prefix: up to 100 characters of letters, digits and ._:-")
    return Options(
        input=args.input, output=args.output, errors=args.errors, app=args.app,
        concurrency=args.concurrency, task=args.task, max_attempts=args.max_attempts,
        progress_every=args.progress_every, progress_file=args.progress_file, key_id=args.key_id,
        request_id_prefix=prefix,
        metrics=not args.no_metrics,
    )


def main(argv: list[str] | None = None, backend: Backend | None = None) -> int:
    args = build_parser().parse_args(argv)
    started_ray = False
    try:
        options = options_from(args)
        metrics = metrics_for(MetricsConfig(enabled=options.metrics), options.app)
        if backend is None:
            import ray

            if not ray.is_initialized():
                address = "auto"  # inside `ray job submit`: the RAY_ADDRESS the job was given
                if args.ray_address:
                    # Ray sets a job's RAY_ADDRESS from the machine's most recently started
                    # cluster (/tmp/ray/ray_current_cluster), which is not always the job's own
                    # when several clusters share a machine; and RAY_ADDRESS beats ray.init's
                    # argument. An explicit address wins here.
                    os.environ.pop("RAY_ADDRESS", None)
                    address = args.ray_address
                ray.init(address=address, log_to_driver=False)
                started_ray = True
            backend = ServeBackend(options.app, options.key_id, metrics=metrics)
        metrics.declare(*BATCH_DRIVER_METRICS)
        return asyncio.run(_run(BatchRun(options, backend, metrics=metrics)))
    except SetupError as exc:
        print(f"batch: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP
    finally:
        if started_ray:
            import ray

            ray.shutdown()


async def _run(batch: BatchRun) -> int:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    # Signal handlers can only be set from the main thread (tests may run main() elsewhere).
    handled = threading.current_thread() is threading.main_thread()
    if handled:
        for sig in signals:
            loop.add_signal_handler(sig, batch.stop)
    try:
        return await batch.run()
    finally:
        if handled:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
