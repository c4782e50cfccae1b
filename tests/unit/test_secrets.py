"""Secrets go only where they are needed: what ``promptfleet start`` deploys, and what status prints."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster import local

ENVIRON = {
    "PROMPTFLEET_ADMIN_KEY": "admin-secret",
    "PROMPTFLEET_DATABASE_URL": "postgresql://pf:db-secret@db:5432/pf",
    "UPSTREAM_A_KEY": "upstream-a-secret",
    "UPSTREAM_B_KEY": "upstream-b-secret",
    "PROMPTFLEET_UPSTREAM_HOSTS": "api.example.com",  # a setting, not a secret
    "HOME": "/root",
}
SECRETS = ("admin-secret", "db-secret", "upstream-a-secret", "upstream-b-secret")


def config() -> dict[str, Any]:
    upstream = {"provider": "openai", "base_url": "https://api.example.com/v1"}
    return {
        "applications": [{
            "name": "promptfleet",
            "import_path": "deployments.app:build_app",
            "runtime_env": {"env_vars": {}},
            "args": {
                "auth": {"enabled": True},
                "models": [
                    {"name": "local", "provider": "llamacpp"},
                    {**upstream, "name": "a", "api_key_env": "UPSTREAM_A_KEY"},
                    {**upstream, "name": "b", "api_key_env": "UPSTREAM_B_KEY"},
                ],
            },
            "deployments": [{"name": "Gateway", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}],
        }]
    }


def env_of(app: dict[str, Any], deployment: str) -> dict[str, str]:
    """What a replica of ``deployment`` gets: Serve merges the app's env_vars with the deployment's."""
    merged = dict(app["runtime_env"]["env_vars"])
    for entry in app["deployments"]:
        if entry["name"] == deployment:
            merged.update(entry.get("ray_actor_options", {}).get("runtime_env", {}).get("env_vars", {}))
    return merged


def test_each_secret_reaches_only_its_deployment() -> None:
    app = local.with_secrets(config(), ENVIRON)["applications"][0]
    # Upstream keys go to every process that calls the upstream: the Gateway (HTTP calls), the
    # TaskRunner (task runs) and the model's own worker (batch lines).
    upstream_keys = {"UPSTREAM_A_KEY": "upstream-a-secret", "UPSTREAM_B_KEY": ENVIRON["UPSTREAM_B_KEY"]}
    assert env_of(app, "Gateway") == {"PROMPTFLEET_UPSTREAM_HOSTS": "api.example.com",
                                      "PROMPTFLEET_ADMIN_KEY": "admin-secret", **upstream_keys}
    assert env_of(app, "TaskRunner") == {"PROMPTFLEET_UPSTREAM_HOSTS": "api.example.com", **upstream_keys}
    assert env_of(app, "TaskStore")["PROMPTFLEET_DATABASE_URL"] == ENVIRON["PROMPTFLEET_DATABASE_URL"]
    # The BatchService keeps file and batch records in the same database: the URL, no other secret.
    assert env_of(app, "BatchService") == {"PROMPTFLEET_UPSTREAM_HOSTS": "api.example.com",
                                           "PROMPTFLEET_DATABASE_URL": ENVIRON["PROMPTFLEET_DATABASE_URL"]}
    assert env_of(app, "worker-a") == {"PROMPTFLEET_UPSTREAM_HOSTS": "api.example.com",
                                       "UPSTREAM_A_KEY": "upstream-a-secret"}
    assert "UPSTREAM_A_KEY" not in env_of(app, "worker-b")
    for deployment in ("RateLimiter", "worker-local"):
        assert not set(SECRETS) & set(env_of(app, deployment).values()), deployment
    gateway = next(d for d in app["deployments"] if d["name"] == "Gateway")
    assert gateway["num_replicas"] == 1 and gateway["ray_actor_options"]["num_cpus"] == 0  # kept
    # Serve takes a config's ray_actor_options whole: a worker's entry made for its key keeps the
    # CPUs the app gives an upstream model's worker (none), not Serve's default of one.
    worker_a = next(d for d in app["deployments"] if d["name"] == "worker-a")
    assert worker_a["ray_actor_options"]["num_cpus"] == 0


def test_a_missing_upstream_key_fails_the_start() -> None:
    with pytest.raises(local.StartError, match="UPSTREAM_B_KEY"):
        local.with_secrets(config(), {k: v for k, v in ENVIRON.items() if k != "UPSTREAM_B_KEY"})


def test_status_output_masks_every_secret() -> None:
    deployed = local.with_secrets(config(), ENVIRON)
    deployed["applications"][0]["args"]["tasks"] = {"database_url": "postgresql://pf:in-args-secret@db/pf"}
    # The shape of Serve's details: the config as deployed, and each deployment's actor options.
    details = {"applications": {"promptfleet": {
        "deployed_app_config": deployed["applications"][0],
        "deployments": {d["name"]: {"deployment_config": {"ray_actor_options": d.get("ray_actor_options", {})}}
                        for d in deployed["applications"][0]["deployments"]},
    }}}
    text = json.dumps(local.redacted(details))
    for secret in (*SECRETS, "in-args-secret"):
        assert secret not in text
    assert "PROMPTFLEET_ADMIN_KEY" in text  # which variables are set stays visible
