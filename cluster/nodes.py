"""Ray nodes as promptfleet starts them: a head, and worker nodes that join it.

Every node ``promptfleet start`` starts or ``promptfleet join`` joins gets the same four things,
whatever Ray's own defaults are:

- **token authentication** (``RAY_AUTH_MODE=token``). The token is the file at
  ``$RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``), created on the head if missing; the
  join command the head prints carries it to the other machines as ``RAY_AUTH_TOKEN``, and
  ``join`` stores it in the same file there so later ``promptfleet``/``ray`` commands find it;
- the **throughput settings** Serve reads from the environment of ``ray start``
  (``local.RAY_START_ENV``), and the **idle settings** (``local.RAY_IDLE_ENV``: Serve's control loop
  and metrics export intervals, how often Ray's log monitor looks for new files; a value already in
  the shell wins);
- this interpreter's ``bin`` directory **first on PATH**, so the ``python`` of
  ``ray job submit -- python -m jobs.batch …`` is the project's interpreter (Ray runs a job's
  entrypoint in a shell that inherits the node's environment);
- the **gateway role**: the custom resource ``promptfleet_gateway: 1`` unless ``--no-gateway``
  (configs/serve.yaml decides whether Gateways go to every node or only to nodes with the role).
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cluster import local

GATEWAY_RESOURCE = "promptfleet_gateway"
DEFAULT_GCS_PORT = 6379
STARTED_LINE = "Ray runtime started."


@dataclass(frozen=True)
class NodeSpec:
    """One ``ray start``: what the CLI flags of ``start``/``join`` say about this node."""

    host: str | None  # --node-ip-address; None: Ray picks this machine's address
    num_cpus: int | None = None
    gateway: bool = True
    block: bool = False  # keep `ray start` in the foreground: the node's processes are its children
    extra: list[str] = field(default_factory=list)  # passed to `ray start` verbatim (after `--`)


def token_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()


def ensure_token(environ: Mapping[str, str]) -> str:
    """The cluster token: ``$RAY_AUTH_TOKEN``, else the token file, created (0600) if missing."""
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"]
    path = token_path(environ)
    if path.exists():
        _keep_private(path)
        return path.read_text().strip()
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes: 256 random bits
    _write_private(path, token)
    return token


def token_command(environ: Mapping[str, str]) -> str:
    """The shell command that prints the cluster token — what the Ray dashboard asks for on its login
    page (then kept in a cookie). ``ray get-auth-token`` reads ``$RAY_AUTH_TOKEN``, else the file at
    ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``: the places ``ensure_token`` uses."""
    command = shlex.join([local.ray_executable(), "get-auth-token"])
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    return f"RAY_AUTH_TOKEN_PATH={shlex.quote(path)} {command}" if path else command


def install_token(token: str, environ: Mapping[str, str]) -> None:
    """Store the token a join command carried, so later commands on this machine send it.

    A different token already in the file belongs to another cluster this user runs here:
    refuse rather than break it.
    """
    path = token_path(environ)
    if path.exists():
        if path.read_text().strip() != token:
            raise local.StartError(
                f"{path} holds the token of another cluster; set RAY_AUTH_TOKEN_PATH to another file for this one"
            )
        return
    _write_private(path, token)


def _keep_private(path: Path) -> None:
    """A token file others on the machine can read is the cluster's key in their hands: make it the
    owner's only (a file another tool wrote 0644, say), and say so."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        path.chmod(mode & 0o700)
        print(f"promptfleet: {path} was readable by other users (mode {mode:o}); it is now {mode & 0o700:o}.",
              file=sys.stderr)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def node_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of `ray start` on every promptfleet node (see the module docstring)."""
    bin_dir = str(Path(sys.executable).parent)
    path = [p for p in environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {
        **environ,
        **local.RAY_START_ENV,
        **{name: environ[name] for name in local.RAY_IDLE_ENV if name in environ},
        "RAY_AUTH_MODE": "token",
        "PATH": os.pathsep.join([bin_dir, *path]),
    }


def ray_start_command(spec: NodeSpec, head_address: str | None = None, port: int = DEFAULT_GCS_PORT,
                      dashboard_port: int | None = None) -> list[str]:
    """`ray start` for a head (``head_address`` None) or for a worker joining ``head_address``."""
    cmd = [local.ray_executable(), "start", "--disable-usage-stats"]
    if head_address is None:
        cmd += ["--head", "--port", str(port), "--dashboard-host", "127.0.0.1"]
        if dashboard_port is not None:
            cmd += ["--dashboard-port", str(dashboard_port)]
    else:
        cmd += ["--address", head_address]
    if spec.host is not None:
        cmd += ["--node-ip-address", spec.host]
    if spec.num_cpus is not None:
        cmd += ["--num-cpus", str(spec.num_cpus)]
    if spec.gateway:
        cmd += ["--resources", f'{{"{GATEWAY_RESOURCE}": 1}}']
    if spec.block:
        cmd.append("--block")
    return cmd + spec.extra


def start_node(
    cmd: list[str], env: dict[str, str], block: bool, timeout_s: float = 180
) -> subprocess.Popen[str] | None:
    """Run `ray start`; with ``block``, return the still-running process once the node is up."""
    if not block:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        if result.returncode != 0:
            raise local.StartError(f"`ray start` failed:\n{result.stdout}\n{result.stderr}")
        return None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    started = threading.Event()

    def echo() -> None:
        # Ray's output goes on to our stderr for as long as the node runs (a full pipe would stall it).
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            if STARTED_LINE in line:
                started.set()

    threading.Thread(target=echo, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not started.wait(0.5):
        if proc.poll() is not None:
            raise local.StartError(f"`ray start` exited with status {proc.returncode}; see its output above")
        if time.monotonic() > deadline:
            proc.kill()
            raise local.StartError(f"`ray start` did not come up within {timeout_s:.0f}s")
    return proc


def detect_host() -> str:
    """This machine's address as other machines would reach it (Ray's own detection)."""
    from ray.util import get_node_ip_address

    return str(get_node_ip_address())


def join_command(head_address: str, token: str) -> str:
    """The command another machine runs (from its promptfleet checkout) to join this head."""
    return f"RAY_AUTH_TOKEN={token} .venv/bin/promptfleet join {head_address}"


def authentication_mode(dashboard: str) -> str | None:
    """What the cluster's dashboard says about token authentication (``token``/``disabled``), or
    None when it does not say (no such endpoint, or no dashboard)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{dashboard.rstrip('/')}/api/authentication_mode", timeout=10) as response:
            mode = json.loads(response.read()).get("authentication_mode")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return str(mode) if mode is not None else None


def refuse_insecure(dashboard: str, allow_insecure: bool) -> None:
    """Refuse an existing cluster that runs without token authentication, unless allowed."""
    mode = authentication_mode(dashboard)
    if mode == "token" or allow_insecure:
        return
    if mode is None:
        raise local.StartError(f"no Ray dashboard answers at {dashboard} (pass --dashboard URL)")
    raise local.StartError(
        f"the Ray cluster at {dashboard} runs without token authentication (mode {mode!r}): anyone who "
        "can reach its ports can run code on it. Restart it with RAY_AUTH_MODE=token (`promptfleet start` "
        "does), or pass --allow-insecure-cluster to use it anyway."
    )
