"""How promptfleet starts and joins Ray nodes: environment, token, `ray start` flags, insecure clusters."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster import cli, local, nodes


def test_node_env_puts_this_interpreter_first_and_turns_token_auth_on() -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = nodes.node_env({"PATH": f"/usr/bin:{bin_dir}:/bin", "RAY_AUTH_MODE": "disabled", "HOME": "/h"})
    assert env["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    assert env["RAY_AUTH_MODE"] == "token"  # whatever the shell said
    assert env["HOME"] == "/h"
    for name, value in local.RAY_START_ENV.items():
        assert env[name] == value


def test_head_token_is_created_private_once_and_reused(tmp_path: Path) -> None:
    environ = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "token")}
    token = nodes.ensure_token(environ)
    assert len(token) == 64
    assert stat.S_IMODE((tmp_path / "ray" / "token").stat().st_mode) == 0o600
    assert nodes.ensure_token(environ) == token
    assert nodes.ensure_token({**environ, "RAY_AUTH_TOKEN": "from-env"}) == "from-env"


def test_join_stores_the_token_and_refuses_another_clusters(tmp_path: Path) -> None:
    environ = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    nodes.install_token("abc", environ)
    nodes.install_token("abc", environ)  # the same cluster again: fine
    assert (tmp_path / "token").read_text() == "abc"
    with pytest.raises(local.StartError, match="another cluster"):
        nodes.install_token("xyz", environ)
    assert (tmp_path / "token").read_text() == "abc"


def test_ray_start_commands_for_head_and_worker() -> None:
    head = nodes.ray_start_command(nodes.NodeSpec(host="10.0.0.5", num_cpus=0, extra=["--metrics-export-port", "9"]),
                                   port=7000, dashboard_port=7001)
    assert head[1:3] == ["start", "--disable-usage-stats"]
    assert head[head.index("--port") + 1] == "7000" and head[head.index("--dashboard-port") + 1] == "7001"
    assert head[head.index("--node-ip-address") + 1] == "10.0.0.5"
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"  # never public by default
    assert json.loads(head[head.index("--resources") + 1]) == {nodes.GATEWAY_RESOURCE: 1}
    assert head[-2:] == ["--metrics-export-port", "9"] and "--head" in head
    worker = nodes.ray_start_command(nodes.NodeSpec(host=None, gateway=False, block=True), head_address="10.0.0.5:7000")
    assert worker[worker.index("--address") + 1] == "10.0.0.5:7000"
    assert "--head" not in worker and "--resources" not in worker and "--node-ip-address" not in worker
    assert "--block" in worker


def test_join_command_carries_address_and_token() -> None:
    assert nodes.join_command("10.0.0.5:6379", "t0k") == "RAY_AUTH_TOKEN=t0k .venv/bin/promptfleet join 10.0.0.5:6379"


def test_cli_passes_ray_start_options_after_double_dash() -> None:
    args = cli.parse_args(["join", "10.0.0.5:6379", "--host", "10.0.0.7", "--no-gateway",
                                          "--", "--node-manager-port", "7010"])
    spec = cli._node_spec(args, default_host=None)
    assert args.head_address == "10.0.0.5:6379"
    assert spec == nodes.NodeSpec(host="10.0.0.7", gateway=False, extra=["--node-manager-port", "7010"])
    assert cli.parse_args(["start", "--head"]).ray_args == []
    with pytest.raises(SystemExit):
        cli.parse_args(["status", "--", "--port", "1"])


def test_join_without_a_token_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert cli.main(["join", "127.0.0.5:1"]) == 1
    assert "no cluster token" in capsys.readouterr().err


@pytest.fixture
def dashboard() -> Iterator[tuple[str, dict[str, str]]]:
    """A real HTTP server answering /api/authentication_mode with the mode the test sets."""
    answer = {"mode": "token"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"authentication_mode": answer["mode"]}).encode()
            self.send_response(200 if self.path == "/api/authentication_mode" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()
    server.server_close()


def test_existing_cluster_without_token_auth_is_refused_unless_allowed(
    dashboard: tuple[str, dict[str, str]],
) -> None:
    url, answer = dashboard
    nodes.refuse_insecure(url, allow_insecure=False)  # token: accepted
    answer["mode"] = "disabled"
    with pytest.raises(local.StartError, match=r"without token authentication.*--allow-insecure-cluster"):
        nodes.refuse_insecure(url, allow_insecure=False)
    nodes.refuse_insecure(url, allow_insecure=True)


def test_no_dashboard_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(local.StartError, match="no Ray dashboard answers"):
        nodes.refuse_insecure("http://127.0.0.1:9", allow_insecure=False)


def test_start_prints_the_api_on_this_nodes_address_when_gateways_listen_there() -> None:
    config = {"applications": [{"args": {"models": [{"name": "m", "provider": "llamacpp"}],
                                         "gateway": {"listen_host": "node-ip", "listen_port": 8000}}}]}
    assert local.endpoints(config, "http://127.0.0.1:8265", "10.0.0.5").api == "http://10.0.0.5:8000/v1"
    config["applications"][0]["args"]["gateway"]["listen_host"] = "127.0.0.1"
    assert local.endpoints(config, "http://127.0.0.1:8265", "10.0.0.5").api == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("own_path", [False, True])
def test_the_printed_dashboard_token_command_prints_the_clusters_token(
    tmp_path: Path, own_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.ray/auth_token, here and in the command's shell
    environ = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    if own_path:
        environ["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "my cluster" / "token")
    token = nodes.ensure_token(environ)  # what `promptfleet start` does before `ray start`
    command = nodes.token_command(environ)
    assert ("RAY_AUTH_TOKEN_PATH=" in command) is own_path
    printed = subprocess.run(["bash", "-c", command], env=environ, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == token


def start_output(environ: Mapping[str, str]) -> str:
    """What `promptfleet start` prints once the application runs on a cluster it did not start."""
    config = local.load_serve_config(local.DEFAULT_CONFIG)
    return cli.ready_message(config, local.endpoints(config, local.DEFAULT_DASHBOARD), None, environ, blocking=False)


def test_start_prints_how_to_get_the_dashboard_token() -> None:
    environ = {**os.environ, "RAY_AUTH_MODE": "token"}
    assert f"print it with `{nodes.token_command(environ)}`" in start_output(environ)


def test_start_prints_a_stop_command_a_shell_without_the_venv_can_run() -> None:
    stop = re.search(r"Stop with `(.+) --ray`", start_output(os.environ))
    assert stop is not None
    # `make start` runs without the venv activated: a bare `promptfleet` is "command not found".
    plain = {"HOME": os.environ.get("HOME", "/"), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(["bash", "-c", f"{stop.group(1)} --help"], env=plain, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "--ray" in shown.stdout, shown.stderr


def test_a_token_file_others_can_read_is_made_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "auth_token"
    path.write_text("abc\n")
    path.chmod(0o644)
    assert nodes.ensure_token({"RAY_AUTH_TOKEN_PATH": str(path)}) == "abc"
    assert path.stat().st_mode & 0o777 == 0o600 and "readable by other users" in capsys.readouterr().err
    nodes.ensure_token({"RAY_AUTH_TOKEN_PATH": str(path)})  # already private: nothing said
    assert capsys.readouterr().err == ""


def test_idle_settings_from_the_shell_win_and_the_throughput_settings_do_not() -> None:
    """An operator who wants Serve's faster control loop back sets it in the shell (docs/performance.md)."""
    env = nodes.node_env({"PATH": "/bin", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
                          "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == local.RAY_IDLE_ENV["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_the_log_monitor_setting_reaches_ray_start() -> None:
    """Ray's log monitor reads it from the environment `ray start` gives it (docs/performance.md)."""
    assert nodes.node_env({"PATH": "/bin"})["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"
    assert nodes.node_env({"PATH": "/bin", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "1000"})[
        "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "1000"  # the shell's value wins, as for the others
