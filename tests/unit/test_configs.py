"""Every YAML file in configs/ is valid, and the files agree with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import DEPLOYMENT_NAMES
from deployments.config import AppArgs, OpenAIModel, worker_deployment_name
from deployments.taskdefs import load_task_definitions, validate_models

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
        names = set(DEPLOYMENT_NAMES) | {worker_deployment_name(m.name) for m in args.models}
        listed = {d["name"] for d in app.get("deployments", [])}
        assert listed <= names, f"unknown deployments in serve.yaml: {listed - names}"


def test_task_definitions_are_valid_and_use_configured_models(serve_config: dict[str, Any]) -> None:
    tasks = load_task_definitions(CONFIGS / "tasks")
    assert len(tasks) >= 3
    models = {m.name for m in AppArgs.model_validate(serve_config["applications"][0]["args"]).models}
    validate_models(tasks, models)


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
    ],
)
def test_bad_app_args_fail_naming_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    assert field in str(caught.value)


def test_api_key_is_named_not_stored() -> None:
    fields = OpenAIModel.model_fields
    assert "api_key_env" in fields and "api_key" not in fields
