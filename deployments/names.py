"""Names of the deployments of a promptfleet application, and which of them must stay single.

Everything that finds a deployment by name (``app.py`` binding them, ``jobs.batch`` getting handles
through ``serve.get_deployment_handle``, the CLI reading ``serve status``, the config tests) uses
these constants. This module imports nothing, so a batch job can use it without FastAPI or Ray.
"""

from __future__ import annotations

GATEWAY = "Gateway"
TASK_STORE = "TaskStore"
TASK_RUNNER = "TaskRunner"
RATE_LIMITER = "RateLimiter"
BATCH_SERVICE = "BatchService"
WORKER_PREFIX = "worker-"

ALL = (GATEWAY, TASK_STORE, TASK_RUNNER, RATE_LIMITER, BATCH_SERVICE)

# Deployments that own state in one place and must never run as two replicas, not even during a
# rolling update: the store owns the SQLite file, the limiter owns the budgets, the batch
# service owns the batch directory. ``app.py`` pins them to one replica; ``configs/serve.yaml``
# may not set ``num_replicas`` or autoscaling for them (tests/unit/test_configs.py checks).
SINGLE_REPLICA = frozenset({TASK_STORE, RATE_LIMITER, BATCH_SERVICE})


def worker(model_name: str) -> str:
    """The ModelWorker deployment serving ``model_name``."""
    return f"{WORKER_PREFIX}{model_name}"
