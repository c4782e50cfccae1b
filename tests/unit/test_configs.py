"""Every YAML file in configs/ is valid, and the files agree with each other."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments import names
from deployments.config import DATABASE_URL_ENV, AppArgs, OpenAIModel, TasksConfig
from deployments.config import docs as config_docs
from deployments.core.taskfile import load_task_definitions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "serve.yaml").read_text())


def test_serve_yaml_is_a_valid_serve_config(serve_config: dict[str, Any]) -> None:
    ServeDeploySchema.model_validate(serve_config)


def test_serve_yaml_listens_on_loopback(serve_config: dict[str, Any]) -> None:
    # Serve's schema default is 0.0.0.0: the file must say otherwise explicitly.
    assert serve_config["http_options"]["host"] == "127.0.0.1"


def test_app_args_are_valid(serve_config: dict[str, Any]) -> None:
    for app in serve_config["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        AppArgs.model_validate(app["args"])


def test_deployment_entries_name_real_deployments(serve_config: dict[str, Any]) -> None:
    for app in serve_config["applications"]:
        args = AppArgs.model_validate(app["args"])
        known = set(names.ALL) | {names.worker(m.name) for m in args.models}
        listed = {d["name"] for d in app.get("deployments", [])}
        assert listed <= known, f"unknown deployments in serve.yaml: {listed - known}"


def test_task_definitions_are_valid_and_use_configured_models(serve_config: dict[str, Any]) -> None:
    models = {m.name: m.provider for m in AppArgs.model_validate(serve_config["applications"][0]["args"]).models}
    tasks = load_task_definitions(CONFIGS / "tasks", models)  # models exist and express the output schemas
    assert len(tasks) >= 3


def test_every_yaml_file_is_covered() -> None:
    covered = {CONFIGS / "serve.yaml"} | set((CONFIGS / "tasks").glob("*.yaml"))
    assert set(CONFIGS.rglob("*.yaml")) == covered


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"models": []}, "models"),
        ({"models": [{"name": "a", "provider": "nope"}]}, "models.0"),
        ({"models": [{"name": "a", "provider": "openai"}]}, "base_url"),
        ({"models": [{"name": "a", "provider": "openai", "base_url": "ftp://x"}]}, "base_url"),
        ({"models": [{"name": "a", "provider": "openai", "base_url": "http://x", "api_key_env": "sk-123"}]},
         "api_key_env"),
        ({"models": [{"name": "a", "provider": "llamacpp"}, {"name": "a", "provider": "llamacpp"}]}, "duplicate"),
        ({"models": [{"name": "a", "provider": "llamacpp", "threads": 2}]}, "threads"),
        ({"models": [{"name": "a", "provider": "llamacpp"}], "tasks": {"database_url": "mysql://h/db"}},
         "tasks.database_url"),
    ],
)
def test_bad_app_args_fail_naming_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    assert field in str(caught.value)


def test_api_key_is_named_not_stored() -> None:
    fields = OpenAIModel.model_fields
    assert "api_key_env" in fields and "api_key" not in fields


def test_store_location_sqlite_by_default_postgresql_by_url(tmp_path: Path) -> None:
    url = "postgresql://pf:secret@db.internal:5432/promptfleet"
    assert TasksConfig(state_dir=str(tmp_path)).store_location({}) == tmp_path / "tasks.sqlite3"
    assert TasksConfig(database_url=url).store_location({}) == url
    assert TasksConfig().store_location({DATABASE_URL_ENV: url}) == url
    assert TasksConfig(database_url=url).store_location({DATABASE_URL_ENV: url}) == url
    assert TasksConfig().store_location({DATABASE_URL_ENV: ""}) == TasksConfig().store_location({})
    assert "secret" not in repr(TasksConfig(database_url=url))  # config reprs reach logs


@pytest.mark.parametrize(
    ("config", "environ", "message"),
    [
        ({}, {DATABASE_URL_ENV: "sqlite:///x.db"}, DATABASE_URL_ENV),
        ({"database_url": "postgresql://a/b"}, {DATABASE_URL_ENV: "postgresql://c/d"}, "both set"),
    ],
)
def test_bad_store_location_is_a_clear_error(config: dict[str, str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TasksConfig.model_validate(config).store_location(environ)


# -- single-replica deployments (deployments.names.SINGLE_REPLICA) --------------------------------


def single_replica_violations(config: dict[str, Any]) -> list[str]:
    """Entries of a Serve config that would scale a single-replica deployment past one replica."""
    found = []
    for app in config["applications"]:
        for entry in app.get("deployments", []):
            if entry["name"] not in names.SINGLE_REPLICA:
                continue
            if entry.get("num_replicas", 1) != 1:
                found.append(f"{app['name']}/{entry['name']}: num_replicas {entry['num_replicas']}")
            autoscaling = entry.get("autoscaling_config") or {}
            if max(autoscaling.get("max_replicas", 1), autoscaling.get("min_replicas", 1)) > 1:
                found.append(f"{app['name']}/{entry['name']}: autoscaling_config {autoscaling}")
    return found


def test_serve_yaml_keeps_single_replica_deployments_single(serve_config: dict[str, Any]) -> None:
    assert single_replica_violations(serve_config) == []


@pytest.mark.parametrize("name", sorted(names.SINGLE_REPLICA))
@pytest.mark.parametrize(
    "scaling", [{"num_replicas": 2}, {"num_replicas": "auto"}, {"autoscaling_config": {"max_replicas": 3}}]
)
def test_the_single_replica_check_catches_scaling(
    serve_config: dict[str, Any], name: str, scaling: dict[str, Any]
) -> None:
    config = copy.deepcopy(serve_config)
    entries = config["applications"][0]["deployments"]
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
        entries.append(entry := {"name": name})
    entry.update(scaling)
    assert len(single_replica_violations(config)) == 1


def bound_deployments(app: Any) -> dict[str, Any]:
    """Every deployment of a built (not deployed) application, by name: no Ray needed."""
    from ray.serve import Application

    found: dict[str, Any] = {}
    stack: list[Any] = [app]
    while stack:
        item = stack.pop()
        if isinstance(item, Application):
            deployment = item._bound_deployment
            if deployment.name not in found:
                found[deployment.name] = deployment
                stack += [*deployment.init_args, *deployment.init_kwargs.values()]
        elif isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list | tuple):
            stack += item
    return found


def test_build_app_pins_single_replica_deployments_to_one(serve_config: dict[str, Any]) -> None:
    from deployments.app import build_app

    args = AppArgs.model_validate(serve_config["applications"][0]["args"])
    deployments = bound_deployments(build_app(args))
    assert set(names.ALL) | {names.worker(m.name) for m in args.models} == set(deployments)
    for name in names.SINGLE_REPLICA:
        assert deployments[name].num_replicas == 1, name
        assert deployments[name]._deployment_config.autoscaling_config is None, name


def test_relative_paths_are_taken_from_the_checkout() -> None:
    # Found broken after the move of deployments/config.py into a package: it resolved
    # `configs/tasks` under deployments/, so `promptfleet start` could not find the shipped tasks.
    assert TasksConfig().definitions_path() == CONFIGS / "tasks"
    assert config_docs.PAGE == CONFIGS.parent / "docs" / "reference" / "configuration.md"
