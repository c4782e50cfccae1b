"""`promptfleet batch`: submit a JSONL batch as a Ray job running `jobs.batch`, print how to follow it.

    promptfleet batch --input in.jsonl --output out.jsonl [--errors err.jsonl] [--task NAME]
                      [--concurrency N] [--dashboard URL] [--working-dir .] [--wait]

The same as ``ray job submit -- python -m jobs.batch …``, with the paths made absolute (the job's
driver runs on the head node, in a directory of its own: on a one-machine cluster absolute
paths of this machine are right; on a remote cluster give paths of the head node). By default
the job runs the promptfleet installed on the cluster; ``--working-dir`` uploads a checkout
instead (``.gitignore`` applies, so ``.venv`` stays behind). Running it again with the same
output resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cluster import local

# Never uploaded with --working-dir, whatever .gitignore says.
EXCLUDES = [".git", ".venv", "**/__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", ".benchmarks"]


def ray_command() -> str:
    """The `ray` CLI as a person can paste it: this environment's (it may not be on PATH), with the
    token mode on — Ray's client commands send the cluster token only with RAY_AUTH_MODE=token."""
    ray = Path(local.ray_executable())
    try:
        shown = str(ray.relative_to(Path.cwd()))
    except ValueError:
        shown = str(ray)
    return f"RAY_AUTH_MODE=token {shown}"


def add_parser(sub: Any) -> None:
    batch = sub.add_parser("batch", help="run a JSONL batch as a Ray job (resumable; see `ray job logs -f`)")
    batch.add_argument("--input", type=Path, required=True, help="input JSONL (OpenAI batch lines or task lines)")
    batch.add_argument("--output", type=Path, required=True, help="output JSONL (re-running resumes it)")
    batch.add_argument("--errors", type=Path, default=None, help="error lines go here (default: --output)")
    batch.add_argument("--task", default=None, help="task for lines that name none (`{custom_id, input}` lines)")
    batch.add_argument("--key-id", default=None, help="API key id (key_…) the lines are billed to and limited by "
                       "(default: none, the operator's own job)")
    batch.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    batch.add_argument("--app", default="promptfleet", help="Serve application (default: %(default)s)")
    batch.add_argument("--dashboard", default=local.DEFAULT_DASHBOARD, help="dashboard URL (default: %(default)s)")
    batch.add_argument("--working-dir", type=Path, default=None, help="upload this checkout for the job")
    batch.add_argument("--ray-address", default=None, help="GCS address for the job's driver (default: the "
                       "one Ray gives the job)")
    batch.add_argument("--wait", action="store_true", help="follow the job's log until it ends")


def entrypoint(args: argparse.Namespace, python: str = "python") -> str:
    command = [python, "-m", "jobs.batch", "--input", str(args.input.resolve()),
               "--output", str(args.output.resolve()), "--app", args.app, "--concurrency", str(args.concurrency)]
    if args.errors is not None:
        command += ["--errors", str(args.errors.resolve())]
    if args.task is not None:
        command += ["--task", args.task]
    if args.key_id is not None:
        command += ["--key-id", args.key_id]
    if args.ray_address is not None:
        command += ["--ray-address", args.ray_address]
    return shlex.join(command)


def run(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not args.input.is_file():
        print(f"promptfleet: {args.input}: no such file", file=sys.stderr)
        return 1
    try:
        client = JobSubmissionClient(args.dashboard)
    except Exception:
        print(f"promptfleet: no Ray dashboard answers at {args.dashboard}; is promptfleet started?", file=sys.stderr)
        return 1
    runtime_env = None
    if args.working_dir is not None:
        runtime_env = {"working_dir": str(args.working_dir.resolve()), "excludes": EXCLUDES}
    # The job's driver is started by the cluster with the cluster's Python: the interpreter running
    # this command is the right one when the cluster was started from the same environment.
    job_id = client.submit_job(entrypoint=entrypoint(args, sys.executable), runtime_env=runtime_env,
                               metadata={"promptfleet": "batch", "input": args.input.name})
    ray = ray_command()
    print(f"Submitted batch job {job_id}.\n"
          f"  follow:  {ray} job logs -f {job_id} --address {args.dashboard}\n"
          f"  status:  {ray} job status {job_id} --address {args.dashboard}\n"
          f"  stop:    {ray} job stop {job_id} --address {args.dashboard}   (re-run to resume)\n"
          f"  output:  {args.output.resolve()}")
    if not args.wait:
        return 0
    printed = 0
    while True:
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)
