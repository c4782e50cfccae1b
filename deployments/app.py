"""Composes the promptfleet Serve application; the ``import_path`` of configs/serve.yaml.

``build_app(args)`` binds one ``ModelWorker`` deployment per configured model
(named ``worker-<model>``) and hands their handles to the ``Gateway``. Replica
counts, autoscaling and actor options come from the ``deployments:`` section of
the Serve config; the only defaults set here are ones derived from the model's
own config (an upstream model's ``max_concurrency`` is its replicas'
``max_ongoing_requests``, a local model's ``n_threads`` its ``num_cpus`` and twice its
``slots`` its ``max_ongoing_requests``), so a model added to ``args`` without a
``deployments:`` entry still behaves.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at run time
# to validate `args` into AppArgs.
from typing import Any

from ray import serve
from ray.serve import Application

from deployments import names
from deployments.batch_service import BatchService
from deployments.config import AppArgs, LlamaCppModel, ModelConfig, OpenAIModel
from deployments.core.taskfile import canonical, content_hash, load_task_files
from deployments.gateway.ingress import Gateway
from deployments.limits.rate_limiter import RateLimiter
from deployments.model_worker import ModelWorker
from deployments.store.keys import ANONYMOUS_OWNER
from deployments.store.tasks import VersionInput
from deployments.task_runner import TaskRunner
from deployments.task_store import TaskStore


def worker_defaults(model: ModelConfig) -> dict[str, Any]:
    if isinstance(model, LlamaCppModel):
        # `slots` generations decoded together per replica; as many again wait in the replica for
        # the next free slot, the rest at the handle (bounded by max_queued_requests).
        return {
            "max_ongoing_requests": 4 if "embeddings" in model.capabilities else 2 * model.slots,
            "max_queued_requests": 64,
            "ray_actor_options": {"num_cpus": model.n_threads},
        }
    # I/O-bound: Serve's default of 5 ongoing requests would throttle it to a crawl.
    return {
        "max_ongoing_requests": model.max_concurrency,
        "max_queued_requests": 4 * model.max_concurrency,
        "ray_actor_options": {"num_cpus": 0},
    }


def seed_tasks(args: AppArgs) -> list[VersionInput]:
    """The deploy's task files, checked (a broken file fails the deploy, naming file, line and field)
    and ready to seed the TaskStore's versions (``store.tasks``: a file unchanged since the last deploy
    leaves a pushed version active)."""
    checked = load_task_files(args.tasks.definitions_path(), args.task_models(), args.tasks.max_definition_bytes)
    return [
        VersionInput(name=c.definition.name, definition=canonical(c.definition),
                     content_hash=content_hash(c.definition), source=c.source)
        for c in checked if c.definition is not None
    ]


def build_app(args: AppArgs) -> Application:
    seed = seed_tasks(args)
    limiter = (
        serve.deployment(RateLimiter)
        # Budgets live in one place; queued bookings and pause watchers each hold a request slot.
        .options(name=names.RATE_LIMITER, num_replicas=1, max_ongoing_requests=100_000)
        .bind(args.admission, args.metrics)
    )
    workers = {
        model.name: serve.deployment(ModelWorker)
        .options(name=names.worker(model.name), **worker_defaults(model))
        .bind(model, limiter if isinstance(model, OpenAIModel) else None, logs=args.logs, metrics=args.metrics)
        for model in args.models
    }
    store = (
        serve.deployment(TaskStore)
        # One owner of the SQLite file, ever: never two replicas, even during a rolling update.
        .options(name=names.TASK_STORE, num_replicas=1, max_ongoing_requests=10000)
        .bind(args.tasks, seed=seed, metrics=args.metrics)
    )
    runner = (
        serve.deployment(TaskRunner)
        .options(name=names.TASK_RUNNER, max_ongoing_requests=1000)
        .bind(workers, store, args.tasks, args.models, limiter, args.admission, args.metrics,
              anonymous=None if args.auth.enabled else ANONYMOUS_OWNER, logs=args.logs)
    )
    batches = (
        serve.deployment(BatchService)
        # One owner of the batch directory, like the TaskStore.
        .options(name=names.BATCH_SERVICE, num_replicas=1, max_ongoing_requests=1000)
        .bind(args.tasks, metrics=args.metrics)
    )
    gateway = serve.deployment(serve.ingress()(Gateway)).options(name=names.GATEWAY)
    return gateway.bind(args, workers, store, runner, limiter, batches)
