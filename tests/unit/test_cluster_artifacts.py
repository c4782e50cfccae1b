"""The deployment artifacts in cluster/: the `ray up` launcher file and the KubeRay RayService."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster import cli, kuberay, local, nodes
from deployments.config import NODE_IP

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return local.load_serve_config(REPO / "configs" / "serve.yaml")


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["k8s", "--config", str(REPO / "configs" / "serve.yaml"), "--workers", "3"]) == 0
    return yaml.safe_load(out.getvalue())


def test_launcher_yaml_validates_against_rays_schema(launcher: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(launcher)  # ray/autoscaler/ray-schema.json from the installed wheel, plus Ray's checks


def test_launcher_schema_check_can_fail(launcher: dict[str, Any]) -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(jsonschema.ValidationError):
        validate_config({**launcher, "head_start_ray_commands": "not a list"})


def test_launcher_starts_nodes_the_promptfleet_way(launcher: dict[str, Any]) -> None:
    head = " ".join(launcher["head_start_ray_commands"])
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert "promptfleet start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "promptfleet join $RAY_HEAD_IP:6379" in worker
    # Every node gets the same token file; the venv is built on the node, never uploaded.
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".venv" in launcher["rsync_exclude"]


def test_serve_config_v2_round_trips_to_the_deployed_serve_config(
    manifest: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    deployed = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert deployed == kuberay.k8s_serve_config(serve_config)
    ServeDeploySchema.model_validate(deployed)
    # The changes from configs/serve.yaml: each Gateway listens on its pod's address; Serve's proxy is on.
    for app in deployed["applications"]:
        assert app["args"]["gateway"]["listen_host"] == NODE_IP
        app["args"]["gateway"]["listen_host"] = "127.0.0.1"
    assert deployed.pop("proxy_location") == "EveryNode"
    assert deployed == {k: v for k, v in serve_config.items() if k != "proxy_location"}


def test_ray_containers_carry_the_node_environment_and_gateway_port(
    manifest: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    port = serve_config["applications"][0]["args"]["gateway"]["listen_port"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 3
    for group in groups:
        # '"{\"promptfleet_gateway\": 1}"': KubeRay hands rayStartParams to a shell, quotes included.
        assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {nodes.GATEWAY_RESOURCE: 1}
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name, value in local.RAY_START_ENV.items():
            assert env[name]["value"] == value
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "promptfleet-ray-token", "key": "token"}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == port  # the port KubeRay's serve Service exposes
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}


def test_k8s_turns_serves_proxy_on_where_the_shipped_config_has_it_off(serve_config: dict[str, Any]) -> None:
    assert serve_config["proxy_location"] == "Disabled"  # an idle node does without it
    assert kuberay.k8s_serve_config(serve_config)["proxy_location"] == "EveryNode"
    assert kuberay.k8s_serve_config({**serve_config, "proxy_location": "HeadOnly"})["proxy_location"] == "HeadOnly"


def test_k8s_needs_the_gateway_listener(serve_config: dict[str, Any]) -> None:
    config = kuberay.k8s_serve_config(serve_config)
    config["applications"][0]["args"]["gateway"]["listen_port"] = None
    with pytest.raises(local.StartError, match="listen_port"):
        kuberay.rayservice(config, name="x", image="i", workers=1, max_workers=1)


def test_secrets_reach_the_containers_from_one_optional_secret(serve_config: dict[str, Any]) -> None:
    """With authentication on the Gateway needs the admin key in a pod too; upstream keys likewise."""
    config = kuberay.k8s_serve_config(serve_config)
    args = config["applications"][0]["args"]
    args["auth"] = {"enabled": True}
    args["models"].append({"name": "gpt", "provider": "openai", "base_url": "https://api.example.com/v1",
                           "api_key_env": "OPENAI_API_KEY"})
    manifest = kuberay.rayservice(config, name="pf", image="i", workers=1, max_workers=1)
    (container,) = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    for name in ("PROMPTFLEET_ADMIN_KEY", "OPENAI_API_KEY", "PROMPTFLEET_DATABASE_URL"):
        assert env[name] == {"name": "pf-secrets", "key": name, "optional": True}
    assert "PROMPTFLEET_ADMIN_KEY" not in yaml.safe_dump(manifest["spec"]["serveConfigV2"])  # never in the config
