"""Composes the promptfleet Serve application; the ``import_path`` of configs/serve.yaml.

``build_app(args)`` binds one ``ModelWorker`` deployment per configured model
(named ``worker-<model>``) and hands their handles to the ``Gateway``. Replica
counts, autoscaling and actor options come from the ``deployments:`` section of
the Serve config; the only defaults set here are ones derived from the model's
own config (an upstream model's ``max_concurrency`` is its replicas'
``max_ongoing_requests``, a local model's ``n_threads`` its ``num_cpus``), so a
model added to ``args`` without a ``deployments:`` entry still behaves.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at run time
# to validate `args` into AppArgs.
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import AppArgs, LlamaCppModel, ModelConfig, worker_deployment_name
from deployments.gateway import Gateway
from deployments.worker import ModelWorker

GATEWAY_DEPLOYMENT = "Gateway"


def worker_defaults(model: ModelConfig) -> dict[str, Any]:
    if isinstance(model, LlamaCppModel):
        # One generation at a time per replica; a few queued requests keep it busy
        # while the rest wait at the handle (bounded by max_queued_requests).
        return {
            "max_ongoing_requests": 4,
            "max_queued_requests": 64,
            "ray_actor_options": {"num_cpus": model.n_threads},
        }
    # I/O-bound: Serve's default of 5 ongoing requests would throttle it to a crawl.
    return {
        "max_ongoing_requests": model.max_concurrency,
        "max_queued_requests": 4 * model.max_concurrency,
        "ray_actor_options": {"num_cpus": 0},
    }


def build_app(args: AppArgs) -> Application:
    workers = {
        model.name: serve.deployment(ModelWorker)
        .options(name=worker_deployment_name(model.name), **worker_defaults(model))
        .bind(model)
        for model in args.models
    }
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name=GATEWAY_DEPLOYMENT,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(args, workers)
