"""BatchService: the one owner of batch files and batch records (a single-replica Serve deployment).

Serves: the Gateway's Files and Batches routes (``batch_routes``), through a handle.
Calls: the Ray Jobs API (``JobSubmissionClient``): a batch is a Ray job running ``jobs.batch``,
visible in the dashboard's Jobs tab with the batch id in its metadata.
Owns: ``deployments.store.batches.BatchStore`` — the ``files`` and ``batches`` records, in the run
store's database (``TasksConfig.store_location``: the SQLite file under ``tasks.state_dir``, or
PostgreSQL), on a connection of its own (no Ray hop to the TaskStore per call; the store module
says why), and the files' bytes in a directory under ``tasks.state_dir`` on the node of this
replica (pin it to the head node in serve.yaml, like the TaskStore). Each batch job is pinned to
this same node (a node-id label selector), because it reads the input file and writes its output
and progress files there directly.

Status is pulled, not pushed: reading a batch asks the Jobs API for its job's status and reads
the job's progress file; when the job has ended, its output and error files are registered as
files of the batch's owner. A batch whose job vanished (the cluster restarted) is resubmitted
and resumes from its output.

Disk and Jobs API calls (blocking HTTP) run on one dedicated thread, in order; reads of file
bytes (downloads) on a small pool of their own. File bytes cross handle calls in pieces of at
most ``store.batches.PIECE_BYTES`` (``deployments.gateway.files`` says why). Expected errors
come back as values (``PromptfleetError``), not raised, as in ``deployments.model_worker``.
An ``owner`` of ``None`` is the admin, who sees and cancels every owner's batches. Quotas are
``tasks.quotas``. It runs the one retention job of all state (``retention``): every
``tasks.retention.cleanup_interval_s`` expired files and finished batches (records and bytes),
finished runs and old Idempotency-Keys are removed — here, because this is the one process with
both the database and the files' disk; the runs' part goes through a ``RunStore`` on this
process's connection, in bounded steps on a thread of its own. Every ``metrics.sample_interval_s``
the unfinished batches are refreshed and the batches by status go to the ``promptfleet_batches``
gauge (``deployments.telemetry``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from deployments.cleanup import in_steps, start_cleanup
from deployments.config import MetricsConfig, TasksConfig
from deployments.core.retention import Cutoffs
from deployments.errors import Conflict, PromptfleetError
from deployments.schemas import BatchCreate, BatchList, BatchView, FileList, FileView
from deployments.store import RunStore
from deployments.store.batches import STATUSES, BatchRecord, BatchStore, JobState, advance
from deployments.store.runs import EXPIRE_STEP
from deployments.telemetry import metrics_for, start_sampling

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

# Requests a server-side batch keeps in flight (jobs.batch --concurrency). Per-model limits
# (max_ongoing_requests, upstream rpm) still apply on top.
BATCH_CONCURRENCY = 64


class Jobs(Protocol):
    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str]) -> None: ...

    def status(self, submission_id: str) -> JobState | None: ...

    def stop(self, submission_id: str) -> None: ...

    def cluster_address(self) -> str | None: ...


class RayJobs:
    """The Ray Jobs API of the cluster this replica runs in; jobs are pinned to this node."""

    def __init__(self) -> None:
        self._client: Any = None
        self._node_id: str | None = None

    def client(self) -> Any:
        if self._client is None:
            import ray
            from ray.job_submission import JobSubmissionClient

            context = ray.get_runtime_context()
            # The GCS address names this cluster; the client looks the dashboard up from it.
            self._client = JobSubmissionClient(context.gcs_address)
            self._node_id = context.get_node_id()
        return self._client

    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str]) -> None:
        client = self.client()
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            metadata=metadata,
            entrypoint_label_selector={"ray.io/node-id": self._node_id},
        )

    def status(self, submission_id: str) -> JobState | None:
        client = self.client()
        try:
            info = client.get_job_info(submission_id)
        except RuntimeError:
            # The SDK raises RuntimeError for "no such job" and for a failing request alike:
            # tell them apart by listing (raises again if the dashboard is really failing).
            if any(job.submission_id == submission_id for job in client.list_jobs()):
                raise
            return None
        return JobState(status=str(info.status.value), exit_code=getattr(info, "driver_exit_code", None))

    def stop(self, submission_id: str) -> None:
        self.client().stop_job(submission_id)

    def cluster_address(self) -> str | None:
        import ray

        return str(ray.get_runtime_context().gcs_address)


class BatchService:
    def __init__(
        self,
        config: TasksConfig,
        app_name: str | None = None,
        jobs: Jobs | None = None,
        store: BatchStore | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics_for(metrics)
        # The replica's environment is where a database URL with a password may come from.
        self.store = store or BatchStore(Path(config.state_dir).expanduser() / "batches", quotas=config.quotas,
                                         database=config.store_location(os.environ))
        self.jobs = jobs or RayJobs()
        self._app_name = app_name
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        # Downloads read immutable bytes: threads of their own, so a slow Jobs API call on `io`
        # does not stall them, and several downloads go on at once.
        self.reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="batch-reads")
        # Runs' retention shares this process's connection; their writes are the TaskStore's.
        self.runs = RunStore(self.store.database)
        self.sweeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention")
        self.cleanup = start_cleanup(config.retention.cleanup_interval_s, self.retention, "all state")
        interval = (metrics or MetricsConfig()).sample_interval_s
        self.sampler = start_sampling(self.metrics, interval, self.sample_metrics, "batches")
        logger.info("batch files at %s, records in %s", self.store.root, self.store.database.location)

    async def sample_metrics(self) -> None:
        """Batches by status, into the gauge (unfinished ones refreshed from their jobs first)."""

        def count() -> dict[str, int]:
            self._refresh_unfinished()
            return self.store.count_by_status()

        counts = await self._io(count)
        if isinstance(counts, dict):
            self.metrics.batches(counts, STATUSES)

    @property
    def app_name(self) -> str:
        if self._app_name is None:
            from ray import serve

            self._app_name = serve.get_replica_context().app_name
        return self._app_name

    async def _io(
        self, fn: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None
    ) -> T | PromptfleetError:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool or self.io, lambda: fn(*args))
        except PromptfleetError as exc:
            return exc

    # -- files ----------------------------------------------------------------------------------

    async def begin_upload(self, owner: str, filename: str) -> str | PromptfleetError:
        return await self._io(self.store.begin_upload, owner, filename)

    async def write_upload(self, upload_id: str, chunk: bytes) -> PromptfleetError | None:
        """Append one piece (at most ``store.PIECE_BYTES``, so the call stays far under Ray's
        message limit) to the upload; the store counts its size, quota and lines as it goes."""
        return await self._io(self.store.write_upload, upload_id, chunk)

    async def finish_upload(self, upload_id: str) -> FileView | PromptfleetError:
        return await self._io(lambda: self.store.finish_upload(upload_id).view())

    async def abort_upload(self, upload_id: str) -> PromptfleetError | None:
        return await self._io(self.store.abort_upload, upload_id)

    async def get_file(self, owner: str | None, file_id: str) -> FileView | PromptfleetError:
        return await self._io(lambda: self.store.get_file(owner, file_id).view())

    async def read_file(self, owner: str | None, file_id: str, offset: int, size: int) -> bytes | PromptfleetError:
        """Up to ``store.PIECE_BYTES`` of the file from ``offset`` (one piece of a download)."""
        return await self._io(self.store.read_file, owner, file_id, offset, size, pool=self.reads)

    async def list_files(
        self, owner: str, purpose: str | None, limit: int, after: str | None
    ) -> FileList | PromptfleetError:
        def page() -> FileList:
            records, more = self.store.list_files(owner, purpose, limit, after)
            return FileList(data=[r.view() for r in records], has_more=more)

        return await self._io(page)

    async def delete_file(self, owner: str, file_id: str) -> PromptfleetError | None:
        return await self._io(self.store.delete_file, owner, file_id)

    # -- batches --------------------------------------------------------------------------------

    async def create_batch(self, owner: str, body: BatchCreate) -> BatchView | PromptfleetError:
        def create() -> BatchView:
            self._refresh_unfinished()  # status is pulled: batches that ended must not count to the quotas
            batch = self.store.create_batch(
                owner, body.input_file_id, body.endpoint, body.completion_window, body.metadata
            )
            self._submit(batch)
            return batch.view()

        return await self._io(create)

    async def get_batch(self, owner: str | None, batch_id: str) -> BatchView | PromptfleetError:
        return await self._io(lambda: self._refresh(self.store.get_batch(owner, batch_id)).view())

    async def list_batches(self, owner: str | None, limit: int, after: str | None) -> BatchList | PromptfleetError:
        def page() -> BatchList:
            records, more = self.store.list_batches(owner, limit, after)
            views = [self._refresh(b).view() for b in records]
            return BatchList(
                data=views,
                first_id=views[0].id if views else None,
                last_id=views[-1].id if views else None,
                has_more=more,
            )

        return await self._io(page)

    async def cancel_batch(self, owner: str | None, batch_id: str) -> BatchView | PromptfleetError:
        def cancel() -> BatchView:
            batch = self._refresh(self.store.get_batch(owner, batch_id))
            if batch.status in ("cancelling", "cancelled"):
                return batch.view()
            if batch.terminal:
                raise Conflict(f"The batch '{batch_id}' has already ended ({batch.status}).", param="batch_id")
            self._cancel(batch)
            return batch.view()

        return await self._io(cancel)

    async def cancel_owner(self, owner: str) -> int | PromptfleetError:
        """Cancel every unfinished batch of ``owner`` (its key was revoked); returns how many."""

        def cancel_all() -> int:
            batches = [b for b in self.store.unfinished_batches(owner) if b.cancelling_at is None]
            for batch in batches:
                self._cancel(batch)
            return len(batches)

        return await self._io(cancel_all)

    def _cancel(self, batch: BatchRecord) -> None:
        batch.status, batch.cancelling_at = "cancelling", int(time.time())
        self.store.save_batch(batch)
        if batch.job_id is not None:
            try:
                self.jobs.stop(batch.job_id)
            except Exception:
                logger.exception("stopping job %s of batch %s failed; will show on refresh", batch.job_id, batch.id)

    async def expire(self, now: float | None = None) -> tuple[int, int] | PromptfleetError:
        """Retention: remove expired files and finished batches; returns (files, batches) removed."""
        cutoffs = Cutoffs.at(self.config.retention, time.time() if now is None else now)

        def sweep() -> tuple[int, int]:
            self._refresh_unfinished()  # finalize batches nobody polled, so they can expire in time
            return self.store.expire(cutoffs)

        return await self._io(sweep)

    async def retention(self, now: float | None = None) -> dict[str, int] | PromptfleetError:
        """The one retention job: expired files and batches, then finished runs and old
        Idempotency-Keys; returns how many of each were removed."""
        moment = time.time() if now is None else now
        removed = await self.expire(moment)
        if isinstance(removed, PromptfleetError):
            return removed
        cutoffs = Cutoffs.at(self.config.retention, moment)
        loop = asyncio.get_running_loop()
        runs, keys = await in_steps(
            lambda: loop.run_in_executor(
                self.sweeper, self.runs.expire, cutoffs.runs_before, cutoffs.idempotency_before, EXPIRE_STEP
            ),
            EXPIRE_STEP,
        )
        return {"files": removed[0], "batches": removed[1], "runs": runs, "idempotency_keys": keys}

    def _refresh_unfinished(self) -> None:
        # At most quotas.max_batches of them: that many Jobs API calls.
        for batch in self.store.all_unfinished():
            self._refresh(batch)

    # -- the job --------------------------------------------------------------------------------

    def _submit(self, batch: BatchRecord) -> None:
        paths = self.store.job_paths(batch)
        batch.job_starts += 1
        batch.job_id = batch.id if batch.job_starts == 1 else f"{batch.id}-{batch.job_starts}"
        entrypoint = shlex.join([
            sys.executable, "-m", "jobs.batch",
            "--input", str(paths["input"]), "--output", str(paths["output"]), "--errors", str(paths["errors"]),
            "--progress-file", str(paths["progress"]), "--app", self.app_name,
            "--concurrency", str(BATCH_CONCURRENCY), "--progress-every", "5",
            # Line N of the batch goes by the request id <batch id>-N, in every start of its job.
            "--request-id-prefix", batch.id,
        ] + (["--ray-address", address] if (address := self.jobs.cluster_address()) else [])
          # Lines are billed to, and limited as, the owner's key (its id; the key never leaves the store).
          + (["--key-id", batch.owner] if batch.owner.startswith("key_") else [])
          + ([] if self.metrics.enabled else ["--no-metrics"]))
        self.store.save_batch(batch)  # before submitting: a crash in between resubmits, never loses it
        try:
            self.jobs.submit(batch.job_id, entrypoint, {"promptfleet_batch": batch.id, "owner": batch.owner})
        except Exception:
            # The next read finds no such job and submits again (up to MAX_JOB_STARTS starts).
            logger.exception("batch %s: submitting job %s failed", batch.id, batch.job_id)
            return
        logger.info("batch %s: submitted job %s", batch.id, batch.job_id)

    def _refresh(self, batch: BatchRecord) -> BatchRecord:
        if batch.terminal:
            return batch
        try:
            job = self.jobs.status(batch.job_id) if batch.job_id is not None else None
        except Exception:
            logger.exception("batch %s: the Jobs API did not answer; showing the last known state", batch.id)
            return batch
        before = dataclasses.asdict(batch)
        action = advance(batch, job, self.store.read_progress(batch), int(time.time()))
        if action == "submit":
            logger.warning("batch %s: job %s is gone or failed; resubmitting", batch.id, batch.job_id)
            self._submit(batch)
        elif action == "finalize":
            self.store.finalize(batch)
        elif dataclasses.asdict(batch) != before:
            self.store.save_batch(batch)
        return batch

